"""Crash-safe, exact resume of ``python -m agents.ppo_kl``: a run killed with SIGKILL and resumed
with ``--resume`` writes the same metrics.csv (timing columns aside) as an uninterrupted run."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.test_agents_cli import REPO, tiny_run_flags

ITERS = 6
COMMAND = [sys.executable, "-m", "agents.ppo_kl", "--analytic-grad", "--kl-reward", "analytic", "--target-kl", "0.5"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run(model: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(COMMAND + tiny_run_flags(model, out, ITERS) + list(extra), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_and_kill(model: str, out: Path, marker: str, *extra: str) -> None:
    """Start the run and SIGKILL it as soon as a stdout line starts with ``marker``."""
    process = subprocess.Popen(
        COMMAND + tiny_run_flags(model, out, ITERS) + list(extra),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in process.stdout:
        if line.lstrip().startswith(marker):
            process.send_signal(signal.SIGKILL)
            break
    process.stdout.close()
    assert process.wait() == -signal.SIGKILL, f"the run ended before printing {marker!r}"


def metrics(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in csv.DictReader(f)]


def test_killed_and_resumed_runs_match_the_uninterrupted_run(tiny_lm_path, tmp_path):
    """Kill points: after the untrained policy's evaluation, in a run that checkpoints only at its
    end (so the kill surely comes before the first checkpoint: the resume restarts from scratch);
    right after iteration 2 was reported (its checkpoint written, iteration 3 or a later one in
    progress); and in the middle of a checkpoint write (simulated by the half-written temporary
    such a kill leaves beside the intact previous checkpoint)."""
    reference = tmp_path / "reference"
    run(tiny_lm_path, reference)
    expected = metrics(reference)
    assert [row["iteration"] for row in expected] == [str(i) for i in range(ITERS + 1)]

    out = tmp_path / "killed"
    run_and_kill(tiny_lm_path, out, "eval:", "--save-every", str(ITERS))
    assert not (out / "checkpoint.safetensors").exists()
    run_and_kill(tiny_lm_path, out, "iter   2", "--resume")
    assert (out / "checkpoint.safetensors").exists()
    stale = out / ".checkpoint.safetensors.k9x2ab.safetensors"
    stale.write_bytes(b"\0" * 1000)
    run(tiny_lm_path, out, "--resume")
    assert not stale.exists()
    assert metrics(out) == expected
    progress = (out / "sb3_logs" / "progress.csv").read_text().splitlines()
    assert len(progress) == 1 + ITERS  # rows of iterations lost to a kill are replaced, not repeated
