"""Crash-safe, exact resume of ``python -m agents.ppo_kl``: a run killed with SIGKILL and resumed
with ``--resume`` writes the same metrics.csv (timing columns aside) as an uninterrupted run."""
from __future__ import annotations

import csv
import math
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.cli import REPO, tiny_run_flags

pytestmark = pytest.mark.slow  # subprocess runs of the CLI, a study or a benchmark

ITERS = 6
COMMAND = [sys.executable, "-m", "agents.ppo_kl", "--analytic-grad", "--kl-reward", "analytic", "--kl-target", "0.5"]
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
    stale = out / ".checkpoint.safetensors.tmp-k9x2ab_1.safetensors"  # the name atomic_write gives a temporary
    stale.write_bytes(b"\0" * 1000)
    run(tiny_lm_path, out, "--resume")
    assert not stale.exists()
    assert metrics(out) == expected
    progress = (out / "sb3_logs" / "progress.csv").read_text().splitlines()
    assert len(progress) == 1 + ITERS  # rows of iterations lost to a kill are replaced, not repeated


def _run_until(command: list[str], deadline: float, marker: str) -> str:
    """Run ``command``; SIGKILL it after ``deadline`` seconds or as soon as a stdout line starts
    with ``marker``, whichever comes first. Returns how it ended."""
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    end = time.monotonic() + deadline
    how = "finished"
    while True:
        remaining = end - time.monotonic()
        if remaining <= 0:
            how = "killed at a random time"
            break
        if selector.select(timeout=None if math.isinf(remaining) else remaining):
            line = process.stdout.readline()
            if not line:
                break
            if line.lstrip().startswith(marker):
                how = f"killed at {marker!r}"
                break
    if how != "finished":
        process.send_signal(signal.SIGKILL)
    process.stdout.close()
    code = process.wait()
    assert code == (-signal.SIGKILL if how != "finished" else 0) or (how != "finished" and code == 0), (how, code)
    return how


def test_ten_random_kills_each_resumed_end_as_the_uninterrupted_run(tiny_lm_path, tmp_path):
    """Ten starts in a row on one --out, each SIGKILLed at a random time (uniform over the length of
    an uninterrupted run, start-up included) or as soon as it begins the export, whichever comes
    first; the tenth is killed only at the export, which every start reaches after the last
    iteration. Then one more --resume: metrics.csv and every file of policy/ equal those of the
    uninterrupted run (the model card up to the run's own path)."""
    reference = tmp_path / "reference"
    start = time.monotonic()
    run(tiny_lm_path, reference)
    length = time.monotonic() - start
    out = tmp_path / "killed"
    rng = random.Random(17)
    endings = []
    for attempt in range(10):
        resume = ["--resume"] if any((out / name).exists() for name in ("checkpoint.safetensors", "metrics.csv", "args.json")) else []
        deadline = rng.uniform(0, length) if attempt < 9 else math.inf
        command = COMMAND + tiny_run_flags(tiny_lm_path, out, ITERS) + resume
        endings.append(_run_until(command, deadline, "finish: exporting"))
    assert endings[-1] == "killed at 'finish: exporting'", endings
    run(tiny_lm_path, out, "--resume")
    assert metrics(out) == metrics(reference), endings
    files = sorted(p.name for p in (reference / "policy").iterdir())
    assert sorted(p.name for p in (out / "policy").iterdir()) == files
    for name in files:
        expected, got = (reference / "policy" / name).read_bytes(), (out / "policy" / name).read_bytes()
        if name == "README.md":  # the model card names the run's folder and the code version (commits may land meanwhile)
            expected = expected.split(b"## Code version")[0].replace(b"reference", b"OUT")
            got = got.split(b"## Code version")[0].replace(b"killed", b"OUT")
        assert got == expected, name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name not in (".lock", ".ppokl-run.json")]


def test_two_runs_on_one_out_exactly_one_runs_and_the_other_names_the_lock(tiny_lm_path, tmp_path):
    """A long run holds --out; a second start, and a --resume, beside it exit 2 naming its pid
    (the long run is then killed: it would take minutes)."""
    out = tmp_path / "run"
    long_run = COMMAND + tiny_run_flags(tiny_lm_path, out, 10_000)
    first = subprocess.Popen(long_run, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:
            if line.lstrip().startswith("iter   1"):
                break
        for extra in ([], ["--resume"]):
            second = subprocess.run(long_run + extra, cwd=REPO, env=ENV, capture_output=True, text=True)
            assert second.returncode == 2, second.stderr[-2000:]
            last = second.stderr.strip().splitlines()[-1]
            assert f"pid {first.pid}" in last and "lock" in last, last
        assert first.poll() is None  # still running, undisturbed
    finally:
        first.kill()
        first.stdout.close()
        first.wait()
