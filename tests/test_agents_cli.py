"""``python -m agents.ppo_kl`` as a user runs it: a short run, resume, and bad input."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agents.config import build_parser, parse_args
from agents.ppo_kl import main

REPO = Path(__file__).resolve().parents[1]


def tiny_run_flags(model: str, out: Path, iters: int) -> list[str]:
    return [
        "--model", model, "--iters", str(iters), "--n-envs", "2", "--max-prompt-tokens", "8",
        "--max-new-tokens", "3", "--n-epochs", "1", "--eval-every", "2", "--eval-prompts", "2",
        "--save-every", "1", "--learning-rate", "1e-3", "--out", str(out),
    ]  # fmt: skip


def test_cli_runs_analytic_grad_writes_outputs_and_resumes(tiny_lm_path, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "agents.ppo_kl", "--analytic-grad", "--kl-reward", "analytic"]
    done = subprocess.run(command + tiny_run_flags(tiny_lm_path, out, 2), cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "iter   2" in done.stderr + done.stdout
    assert "eval: sentiment" in done.stderr + done.stdout
    for name in ("metrics.csv", "checkpoint.zip", "curves.png", "args.json"):
        assert (out / name).is_file(), name
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,") and [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2"]
    assert "eval/sentiment" in rows[0]
    assert (out / "sb3_logs" / "progress.csv").is_file()  # SB3's own CSV and TensorBoard loggers
    assert list((out / "sb3_logs").glob("events.out.tfevents.*"))

    resumed = subprocess.run(
        command + tiny_run_flags(tiny_lm_path, out, 3) + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2", "3"]


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--analytic-grad", "--kl-reward", "--kl-loss", "--kl-coef", "--target-kl", "--resume", "--config", "--eval-every"):
        assert flag in text


def test_yaml_config_is_overridden_by_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("kl-coef: 0.05\nkl_reward: analytic\niters: 7\n")
    args = parse_args(["--config", str(config), "--iters", "3"])
    assert (args.kl_coef, args.kl_reward, args.iters) == (0.05, "analytic", 3)
    config.write_text("kl_coefficient: 1\n")
    with pytest.raises(ValueError, match="kl_coefficient"):
        parse_args(["--config", str(config)])


@pytest.mark.parametrize(
    "argv",
    [
        ["--kl-reward", "k4"],
        ["--kl-loss", "k3"],
        ["--analytic-grad", "--kl-loss", "k3-loss"],
        ["--max-new-tokens", "0"],
        ["--target-kl", "-1"],
    ],
)
def test_bad_flags_exit_non_zero_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_resume_without_checkpoint_fails_and_touches_nothing(tiny_lm_path, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(tiny_run_flags(tiny_lm_path, out, 1) + ["--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_existing_run_is_not_overwritten_without_resume(tiny_lm_path, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("iteration\n1\n")
    assert main(tiny_run_flags(tiny_lm_path, out, 1)) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "metrics.csv").read_text() == "iteration\n1\n"
