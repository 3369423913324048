"""A run directory you can trust: every damaged run in ``tests/helpers/fault_cases.py`` is refused with one
line (exit 2, nothing in --out changed) or completed by ``--resume``; diverged updates, full or
read-only disks and Ctrl-C stop with one line and keep the last good checkpoint; the run's
lock refuses a second process; the export carries a model card."""
from __future__ import annotations

import csv
import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from agents.state.checkpoint import read_checkpoint
from agents.ppo_kl import main
from agents.cli.run_dir import lock_run_dir
from agents.state.training_state import non_finite
from tests.helpers.fault_cases import FAULT_CASES
from tests.helpers.cli import one_line, run_main, snapshot, tiny_run_flags

BASE_ITERS = 2


def metrics(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in csv.DictReader(f)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def finished_run(tiny_lm_path, tmp_path_factory) -> Path:
    """A finished 2-iteration tiny run (in-process)."""
    out = tmp_path_factory.mktemp("faults") / "base"
    assert main(tiny_run_flags(tiny_lm_path, out, BASE_ITERS)) == 0
    return out


@pytest.mark.parametrize("case", FAULT_CASES, ids=[case.id for case in FAULT_CASES])
def test_damaged_run_is_refused_in_one_line_or_completed(case, finished_run, tiny_lm_path, tiny_gpt2_path, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    case.damage(out, {"other_model": tiny_gpt2_path})
    before = snapshot(out)
    lock = lock_run_dir(out) if case.id == "locked" else None
    try:
        code, err = run_main(["--out", str(out), "--resume", "--iters", str(case.iters)], capsys)
    finally:
        if lock is not None:
            lock.close()
    assert code == case.exit_code, err[-2000:]
    assert "Traceback" not in err
    if case.id == "lock-symlink":
        assert (out.parent / "precious").read_text() == "keep"
    if case.id == "policy-symlink":
        assert (out.parent / "elsewhere" / "model.safetensors").is_file()
    if case.exit_code == 2:
        last = one_line(err)
        assert "error:" in last and case.named in last, err
        assert snapshot(out) == before  # nothing deleted or rewritten before the refusal
        return
    base_rows, rows = metrics(finished_run), metrics(out)
    assert rows[: len(base_rows)] == base_rows and len(rows) == case.iters + 1
    assert not [p for p in out.iterdir() if p.name.startswith(".policy.")]
    if case.iters == BASE_ITERS:
        for name, tensor in weights(finished_run / "policy").items():
            assert torch.equal(weights(out / "policy")[name], tensor), name
        assert (out / "curves.png").read_bytes() == (finished_run / "curves.png").read_bytes() or (out / "curves.png").stat().st_size > 1000
    if case.id == "args-deleted":
        assert (out / "args.json").is_file()
    if case.id == "user-files-kept":
        assert (out / "notes.txt").read_text() == "mine" and (out / ".metrics.csv.backup").read_text() == "mine"
    if case.id == "swap-leftover-symlink":
        assert (out.parent / "outside").is_dir() and not os.path.lexists(out / ".policy.old")



def test_locked_run_names_the_holder(finished_run, tiny_lm_path, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    lock = lock_run_dir(out)
    try:
        code, err = run_main(tiny_run_flags(tiny_lm_path, out, 3) + ["--resume"], capsys)
    finally:
        lock.close()
    assert code == 2 and f"pid {os.getpid()}" in err


class _StepHook:
    """A global optimizer post-step hook that acts at the ``at``-th optimizer step of the process
    (the tiny CLI run takes one step per iteration: one epoch, one minibatch)."""

    def __init__(self, at: int, action):
        self.at, self.action, self.steps = at, action, 0

    def __call__(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if self.steps == self.at:
            self.action(optimizer)

    def __enter__(self):
        self.handle = register_optimizer_step_post_hook(self)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _poison(optimizer) -> None:
    with torch.no_grad():
        optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")


def _interrupt(optimizer) -> None:
    raise KeyboardInterrupt


def test_diverged_update_stops_in_one_line_and_keeps_the_last_good_checkpoint(tiny_lm_path, tmp_path, capsys):
    out = tmp_path / "run"
    with _StepHook(2, _poison):
        code, err = run_main(tiny_run_flags(tiny_lm_path, out, 3), capsys)
    assert code == 2 and "non-finite" in one_line(err), err
    meta, tensors = read_checkpoint(out / "checkpoint.safetensors")
    assert meta.counters.n_iterations == 1
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def test_ctrl_c_is_one_line_exit_130_and_resumes_exactly(finished_run, tiny_lm_path, tmp_path, capsys):
    out = tmp_path / "run"
    with _StepHook(2, _interrupt):
        code, err = run_main(tiny_run_flags(tiny_lm_path, out, BASE_ITERS), capsys)
    assert code == 130 and one_line(err).startswith("interrupted"), err
    assert "interrupted" in err and "at iteration 1" in err and "--resume" in err
    assert run_main(tiny_run_flags(tiny_lm_path, out, BASE_ITERS) + ["--resume"], capsys)[0] == 0
    assert metrics(out) == metrics(finished_run)


def test_full_disk_during_a_checkpoint_write_is_one_line_and_resumes_exactly(finished_run, tiny_lm_path, tmp_path, capsys, monkeypatch):
    import agents.state.training_state as training_state

    out = tmp_path / "run"
    writes = []
    original = training_state.write_checkpoint

    def write(path, tensors, meta):
        writes.append(path)
        if len(writes) == 2:
            Path(path).write_bytes(b"\0" * 100)  # what a full disk leaves half-written
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        original(path, tensors, meta)

    monkeypatch.setattr(training_state, "write_checkpoint", write)
    code, err = run_main(tiny_run_flags(tiny_lm_path, out, BASE_ITERS), capsys)
    assert code == 2 and "No space left" in one_line(err), err
    assert read_checkpoint(out / "checkpoint.safetensors")[0].counters.n_iterations == 1
    monkeypatch.setattr(training_state, "write_checkpoint", original)
    assert run_main(tiny_run_flags(tiny_lm_path, out, BASE_ITERS) + ["--resume"], capsys)[0] == 0
    assert metrics(out) == metrics(finished_run)


def test_read_only_out_is_one_line(tiny_lm_path, tmp_path, capsys, monkeypatch):
    import agents.cli.atomic as atomic

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run"))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    code, err = run_main(tiny_run_flags(tiny_lm_path, tmp_path / "run", 1), capsys)
    assert code == 2 and "Read-only file system" in one_line(err), err


def test_export_has_a_hub_model_card_and_still_loads(finished_run, tiny_lm_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, pipeline

    from agents.cli.formatting import rounded

    folder = finished_run / "policy"
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and card.data.license
    assert "ppo" in card.data.tags and card.data.ppokl == {"iterations": 2, "timesteps": 12, "kl_estimator": "reinforce-future (k1 in the reward)"}
    text = card.text
    for expected in ("python -m agents.ppo_kl", "--iters 2", "`kl_coef` | 0.1", "eval/sentiment", "rollout/task_reward", "Code version", "lmgym-kl"):
        assert expected in text, expected
    final = metrics(finished_run)[-1]
    assert f"| `eval/sentiment` | {rounded('eval/sentiment', final['eval/sentiment'])} |" in text
    exported = AutoModelForCausalLM.from_pretrained(folder)
    assert exported.config.vocab_size > 0
    generator = pipeline("text-generation", model=str(folder))
    assert generator("this movie was", max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith("this movie was")


@pytest.mark.parametrize(
    "model, base, licence",
    [("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"), ("gpt2", "gpt2", "other"), (".", None, "other")],
)
def test_model_card_front_matter_names_the_hub_base_model(model, base, licence, tmp_path):
    """The embedded model is SmolLM2-135M-Instruct (Apache-2.0); a Hub id is its own base; a local
    folder has no Hub base model to name."""
    import yaml

    from agents.cli.config import Args
    from agents.cli.model_card import exported_at, model_card

    card = model_card(Args(model=model, kl_reward="analytic", analytic_grad=True), [], 4, 40, ["--iters", "4"])
    front = yaml.safe_load(card.split("---\n")[1])
    assert front.get("base_model") == base and front["license"] == licence and front["library_name"] == "transformers"
    assert front["ppokl"] == {"iterations": 4, "timesteps": 40, "kl_estimator": "analytic-future"}
    assert "python -m agents.ppo_kl --iters 4" in card
    (tmp_path / "README.md").write_text(card)
    assert exported_at(tmp_path) == front["ppokl"]  # the counts the folder was exported at


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_names_exactly_the_tensors_holding_nan_or_inf(bad):
    huge = torch.full((4,), 3e38)  # finite, but its sum overflows to inf: screened, then cleared
    poisoned = torch.zeros(3, 2)
    poisoned[1, 0] = bad
    named = [("a", torch.ones(5)), ("huge", huge), ("poisoned", poisoned), ("ints", torch.arange(3)), ("half", torch.ones(2, dtype=torch.float16))]
    assert non_finite(named) == ["poisoned"]
    assert non_finite([("huge", huge), ("a", torch.ones(5))]) == []
