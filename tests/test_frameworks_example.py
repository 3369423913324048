"""examples/trl_grpo_kl.py and examples/trl_grpo_lora_kl.py (LoRA) run as written (tiny local model, 2 steps)
and differ from plain TRL in <= 5 lines."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

EXAMPLES = [Path(__file__).resolve().parents[1] / "examples" / name for name in ("trl_grpo_kl.py", "trl_grpo_lora_kl.py")]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_example_trains(tiny_lm_path, tmp_path, monkeypatch, example):
    """Run as a script (``__main__``, its own command line) in this process: offline, as conftest sets."""
    monkeypatch.setattr(sys, "argv", [str(example), "--model", tiny_lm_path, "--max-steps", "2", "--output-dir", str(tmp_path / "out")])
    namespace = runpy.run_path(str(example), run_name="__main__")
    assert namespace["trainer"].state.global_step == 2
    assert namespace["trainer"].kl_estimator == "analytic-future-is"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_example_changes_at_most_five_lines(example):
    """Every line that uses this library is marked, and there are at most five marked lines."""
    lines = example.read_text().splitlines()
    changed = [line for line in lines if "  # kl_estimators" in line]
    assert 1 <= len(changed) <= 5
    code = [line for line in lines if not line.lstrip().startswith(("#", '"""')) and line.strip()]
    uses = [line for line in code if ("kl_estimator" in line.split("#")[0] or "KLGRPOTrainer" in line.split("#")[0])]
    assert uses and all(line in changed for line in uses)
