"""examples/trl_grpo_kl.py runs as written (tiny local model, 2 steps) and differs from plain TRL in <= 5 lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_grpo_kl.py"


def test_example_trains(tiny_lm_path, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--model", tiny_lm_path, "--max-steps", "2", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train_runtime" in result.stdout + result.stderr


def test_example_changes_at_most_five_lines():
    changed = [line for line in EXAMPLE.read_text().splitlines() if line.rstrip().endswith(("# kl_estimators",)) or "# kl_estimators" in line]
    assert 1 <= len(changed) <= 5
