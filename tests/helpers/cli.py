"""The tiny ``python -m agents.ppo_kl`` run the CLI tests share, and running ``main`` in-process."""
from __future__ import annotations

from pathlib import Path

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
