"""``python -m agents.ppo_kl`` as a user runs it: a short run, resume, and bad input (every bad
input: exit code 2, one line naming the flag, no traceback, nothing in --out touched)."""
from __future__ import annotations

import dataclasses

import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from agents.cli.config import build_parser, load_config, parse_args
from agents.cli.ownership import claim
from agents.ppo_kl import main
from tests.helpers.cli import REPO, run_main, tiny_run_flags


@pytest.mark.slow
def test_cli_runs_analytic_grad_writes_outputs_and_resumes(tiny_lm_path, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "agents.ppo_kl", "--analytic-grad", "--kl-reward", "analytic"]
    done = subprocess.run(command + tiny_run_flags(tiny_lm_path, out, 2), cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "iter   2" in done.stderr + done.stdout
    assert "eval: sentiment" in done.stderr + done.stdout
    for name in ("metrics.csv", "checkpoint.safetensors", "curves.png", "args.json", "policy/model.safetensors"):
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
    progress = (out / "sb3_logs" / "progress.csv").read_text().splitlines()
    assert len(progress) == 1 + 3  # appended on resume: one row per iteration


def test_help_documents_every_flag_with_its_real_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--analytic-grad", "--kl-reward", "--kl-loss", "--kl-coef", "--kl-target", "--resume", "--config", "--eval-every"):
        assert flag in text
    for default in ("(default: 0.1)", "(default: k1)", "(default: runs/ppo_kl)", "(default: 0.99)", "(default: False)"):
        assert default in text
    assert text.count("(default: None)") == 4  # --kl-target, --kl-loss, --mask-top-k and --mask-top-p, whose default is None


def test_help_answers_before_torch_is_imported():
    """``python -m agents.ppo_kl --help`` prints the help without importing torch, transformers or
    SB3 (what made it take 12-14 s): checked in a fresh interpreter, not timed."""
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['ppo_kl', '--help']\n"
        "try:\n    runpy.run_module('agents.ppo_kl', run_name='__main__')\n"
        "except SystemExit as done:\n    assert done.code == 0, done.code\n"
        "print(sorted({'torch', 'transformers', 'stable_baselines3'} & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--kl-coef" in done.stdout and done.stdout.strip().endswith("[]"), done.stdout[-300:]


def test_yaml_config_is_overridden_by_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("kl-coef: 0.05\nkl_reward: analytic\niters: 7\nlearning_rate: 1e-5\n")
    args = parse_args(["--config", str(config), "--iters", "3"])
    assert (args.kl_coef, args.kl_reward, args.iters, args.learning_rate) == (0.05, "analytic", 3, 1e-5)


class _Payload:
    """Unpickling this creates the file ``path`` (a harmless stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _bin_only_model_with_payload(model: str, tmp_path: Path) -> str:
    """A copy of ``model`` whose weights are a pytorch_model.bin pickle carrying ``_Payload``."""
    import shutil

    folder = tmp_path / "bin_model"
    shutil.copytree(model, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"payload": _Payload(tmp_path / "pwned")}, folder / "pytorch_model.bin")
    return str(folder)


CONFIGS = {
    "missing": None,
    "list": "- iters\n- 3\n",
    "unknown": "kl_coefficient: 1\n",
    "syntax": "iters: [1,\n",
    "type": "iters: three\n",
}


@pytest.mark.parametrize(
    "case, named",
    [
        *[(f"config-{name}", "--config") for name in CONFIGS],
        ("config-type", "iters"),
        ("--device cuda", "--device"),
        ("--device bogus", "--device"),
        ("--out under a file", "--out"),
        ("--iters three", "--iters"),
        ("--clip-range -0.5", "--clip-range"),
        ("--gamma 5", "--gamma"),
        ("--gae-lambda -3", "--gae-lambda"),
        ("--learning-rate 0", "--learning-rate"),
        ("--kl-reward k4", "--kl-reward"),
        ("--max-new-tokens 0", "--max-new-tokens"),
        ("--kl-target -1", "--kl-target"),
        ("empty csv dataset", "dataset"),
        ("reward is a causal LM", "reward"),
        ("--kl-coef inf", "--kl-coef"),
        ("--learning-rate inf", "--learning-rate"),
        ("numeric text column", "'text' column"),
        ("context overflow", "context window"),
        ("pickled .bin model", "pickled weight file"),
    ],
)
def test_bad_input_one_line_error_exit_2_and_out_untouched(case, named, tiny_lm_path, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    claim(out)  # a run's folder (a non-empty --out that holds no run is refused first: test_run_ownership)
    (out / "notes.txt").write_text("keep me")  # with a user's file in it
    flags = tiny_run_flags(tiny_lm_path, out, 1)
    if case.startswith("config-"):
        config = tmp_path / "c.yaml"
        if CONFIGS[case.removeprefix("config-")] is not None:
            config.write_text(CONFIGS[case.removeprefix("config-")])
        flags += ["--config", str(config)]
    elif case == "--device cuda":
        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is available here")
        flags += case.split()
    elif case == "--out under a file":
        (tmp_path / "file").write_text("")
        flags += ["--out", str(tmp_path / "file" / "run")]
    elif case == "empty csv dataset":
        (tmp_path / "empty.csv").write_text("text\n")
        flags += ["--dataset", str(tmp_path / "empty.csv")]
    elif case == "reward is a causal LM":
        flags += ["--reward", tiny_lm_path]
    elif case == "numeric text column":
        (tmp_path / "numbers.csv").write_text("text\n1\n2\n3\n")
        flags += ["--dataset", str(tmp_path / "numbers.csv")]
    elif case == "pickled .bin model":
        flags += ["--model", _bin_only_model_with_payload(tiny_lm_path, tmp_path)]
    elif case == "context overflow":  # the tiny model has 256 positions
        flags += ["--max-prompt-tokens", "250", "--max-new-tokens", "10"]
    else:
        flags += case.split()
    code, err = run_main(flags, capsys)
    assert code == 2
    assert "Traceback" not in err
    assert not (tmp_path / "pwned").exists()
    last = err.strip().splitlines()[-1]
    assert "error" in last and named in last, err
    assert sorted(p.name for p in out.iterdir()) == [".ppokl-run.json", "notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_resume_with_contradicting_flags_names_them(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text('{"kl_coef": 0.1, "iters": 2, "seed": 0}')
    args = parse_args(["--out", str(out), "--resume", "--iters", "5"])  # iters may change; the rest comes from args.json
    assert (args.iters, args.kl_coef) == (5, 0.1)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--out", str(out), "--resume", "--kl-coef", "0.2", "--seed", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--kl-coef 0.2" in err and "--seed" not in err.split("contradict")[0]


def test_resume_without_a_run_fails_and_touches_nothing(tiny_lm_path, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(tiny_run_flags(tiny_lm_path, out, 1) + ["--resume"]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_existing_run_is_not_overwritten_without_resume(tiny_lm_path, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("iteration\n1\n")
    (out / "args.json").write_text("{}")  # a run stopped before its first checkpoint
    assert main(tiny_run_flags(tiny_lm_path, out, 1)) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "metrics.csv").read_text() == "iteration\n1\n" and (out / "args.json").read_text() == "{}"


def test_a_misspelled_flag_gets_the_closest_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--kl-cof", "0.1", "--anlytic-grad"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "did you mean --kl-coef, --analytic-grad?" in err


def test_a_misspelled_config_key_gets_the_closest_key(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("kl_cof: 0.1\n")
    with pytest.raises(ValueError, match="did you mean kl_coef"):
        load_config(config)


def test_the_old_adaptive_target_spelling_is_refused_with_the_new_one(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--target-kl", "0.5"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--target-kl is now --kl-target" in err and len(err.strip().splitlines()) == 1
    config = tmp_path / "old.yaml"
    config.write_text("target_kl: 0.5\n")
    with pytest.raises(ValueError, match="target_kl is now kl_target"):
        load_config(config)


def test_a_run_saved_before_the_sampler_setting_resumes_with_its_old_draw(tmp_path):
    """args.json and the checkpoint's copy of a run made before ``--sampler`` lack it: such a run
    resumes with ``multinomial`` (its draws), and the two copies still agree."""
    import json

    from agents.cli.config import Args, differing_settings

    out = tmp_path / "old"
    out.mkdir()
    old_run = {k: v for k, v in dataclasses.asdict(Args(out=str(out))).items() if k != "sampler"}
    (out / "args.json").write_text(json.dumps(old_run))
    args = parse_args(["--out", str(out), "--resume"])
    assert args.sampler == "multinomial" and Args().sampler == "inverse-cdf"
    assert differing_settings(args, old_run) == []


def test_a_run_saved_under_the_old_name_compares_under_the_new_one():
    from agents.cli.config import Args, differing_settings

    args = Args(kl_target=0.5)
    old_run = {("target_kl" if k == "kl_target" else k): v for k, v in dataclasses.asdict(args).items()}
    assert differing_settings(args, old_run) == []
