"""The tiny ``python -m agents.ppo_kl`` run the CLI tests share, running ``main`` in-process, its one
error line and a snapshot of a run directory; the fixtures of a finished tiny run to copy and damage."""
from __future__ import annotations

import re
import shutil
import signal
from pathlib import Path

import pytest

from agents.ppo_kl import main

REPO = Path(__file__).resolve().parents[2]


def tiny_run_flags(model: str, out: Path, iters: int) -> list[str]:
    return [
        "--model", model, "--iters", str(iters), "--n-envs", "2", "--max-prompt-tokens", "8",
        "--max-new-tokens", "3", "--n-epochs", "1", "--eval-every", "2", "--eval-prompts", "2",
        "--save-every", "1", "--learning-rate", "1e-3", "--out", str(out),
    ]  # fmt: skip


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    """The error line, checked to be the only one of the program's own output (progress bars aside:
    transformers' weight loading and the run's own, which ends on a line of its own)."""
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip() and not re.match(r"(Loading weights|PPO-KL):", line)]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(out: Path) -> dict[str, bytes | None]:
    """Every file under ``out`` (None for a directory), the lock file aside."""
    return {str(p.relative_to(out)): (p.read_bytes() if p.is_file() else None) for p in sorted(out.rglob("*")) if p.name != ".lock"}


BASE_ITERS = 2


@pytest.fixture(scope="module")
def own_model(tiny_lm_path, tmp_path_factory) -> Path:
    """A copy of the tiny LM that the tests may change on disk."""
    path = tmp_path_factory.mktemp("own_model") / "lm"
    shutil.copytree(tiny_lm_path, path)
    return path


@pytest.fixture(scope="module")
def finished(own_model, tmp_path_factory) -> Path:
    """A finished tiny run of ``BASE_ITERS`` iterations, shared by a module: copy it before changing it."""
    out = tmp_path_factory.mktemp("ownership") / "base"
    assert main(tiny_run_flags(str(own_model), out, BASE_ITERS)) == 0
    return out


def copy_run(finished: Path, tmp_path: Path) -> Path:
    """A copy of the run ``finished`` under ``tmp_path`` (symlinks kept as links)."""
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    return out


@pytest.fixture
def no_hang():
    """Fail instead of hanging: a test that blocks (on a FIFO, a lock) is interrupted after 300 s, a
    bound far above any tiny run here even on a slow machine; it guards against blocking, not speed."""

    def hung(signum, frame):
        raise TimeoutError("blocked for 300 s (on a FIFO or a lock?)")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(300)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
