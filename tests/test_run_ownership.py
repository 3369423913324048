"""A run touches nothing outside what it created, and loses nothing inside it (issue 28, items 1,
2 and 4): ``--out`` checks, the lock, the temporaries it cleans, the export's ownership of
``policy/`` and its completeness, the model's fingerprint, and no SB3 folder in the temp dir."""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from agents.cli.run_dir import RunDirError, atomic_write, lock_run_dir, remove_stale_temporaries
from tests.helpers.cli import BASE_ITERS, copy_run, finished, one_line, own_model, run_main, snapshot, tiny_run_flags  # noqa: F401 (fixtures)

# ---------------------------------------------------------------- --out


def test_empty_out_is_refused_and_nothing_is_written(own_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(tiny_run_flags(str(own_model), Path("x"), 1)[:-2] + ["--out", ""], capsys)
    assert code == 2 and "--out" in one_line(err)
    assert os.listdir(tmp_path) == []


def test_non_empty_out_that_is_not_a_run_is_refused(own_model, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    code, err = run_main(tiny_run_flags(str(own_model), out, 1), capsys)
    assert code == 2 and "holds no run" in one_line(err) and "notes.txt" in err
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_users_metrics_csv_is_not_rewound_by_resume(own_model, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.csv").write_text("iteration,x\n0,1\n1,2\n")
    code, err = run_main(tiny_run_flags(str(own_model), out, 1) + ["--resume"], capsys)
    assert code == 2 and "holds no run" in one_line(err)
    assert (out / "metrics.csv").read_text() == "iteration,x\n0,1\n1,2\n"


def test_out_with_an_over_long_component_is_one_line(own_model, tmp_path, capsys):
    code, err = run_main(tiny_run_flags(str(own_model), tmp_path / ("x" * 300), 1), capsys)
    assert code == 2 and "long" in one_line(err)


# ---------------------------------------------------------------- the lock


def test_lock_through_a_symlink_is_refused_and_the_target_untouched(tmp_path):
    out, outside = tmp_path / "run", tmp_path / "precious.txt"
    out.mkdir()
    outside.write_text("keep me")
    (out / ".lock").symlink_to(outside)
    with pytest.raises(RunDirError, match="symlink"):
        lock_run_dir(out)
    assert outside.read_text() == "keep me"


def test_lock_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / ".lock")
    signal.alarm(10)  # a blocking open would hang: fail instead
    try:
        with pytest.raises(RunDirError, match="regular file"):
            lock_run_dir(out)
    finally:
        signal.alarm(0)


def test_deleting_the_lock_file_does_not_let_a_second_run_in(tmp_path):
    out = tmp_path / "run"
    with lock_run_dir(out):
        (out / ".lock").unlink()
        with pytest.raises(RunDirError, match="in use"):
            lock_run_dir(out)
    lock_run_dir(out).close()  # free again once released


# ---------------------------------------------------------------- temporaries


def test_only_the_runs_own_temporaries_are_removed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    users = [".metrics.csv.backup", ".checkpoint.safetensors.mine", ".args.json.old"]
    for name in users:
        (out / name).write_text("user")
    leftover = []

    def killed(tmp: Path) -> None:
        leftover.append(tmp.name)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(out / "metrics.csv", killed)
    stale = out / leftover[0]
    stale.write_text("partial")  # what a SIGKILL leaves: atomic_write had no chance to clean up
    removed = remove_stale_temporaries(out)
    assert removed == [stale] and not stale.exists()
    for name in users:
        assert (out / name).read_text() == "user"


@pytest.mark.parametrize("kind", ["file", "symlink", "dir-symlink", "fifo"])
@pytest.mark.parametrize("name", [".policy.new", ".policy.old"])
def test_leftovers_of_a_swap_are_removed_whatever_they_are(tmp_path, name, kind):
    out, outside = tmp_path / "run", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (outside / "keep").write_text("keep")
    (out / "policy").mkdir()
    path = out / name
    {"file": lambda: path.write_text("x"), "symlink": lambda: path.symlink_to(outside / "keep"),
     "dir-symlink": lambda: path.symlink_to(outside), "fifo": lambda: os.mkfifo(path)}[kind]()  # fmt: skip
    remove_stale_temporaries(out)
    assert not os.path.lexists(path) and (outside / "keep").read_text() == "keep"


# ---------------------------------------------------------------- the export


def test_a_users_file_in_policy_is_never_replaced(finished, own_model, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    (out / "policy" / "notes.txt").write_text("mine")
    before = snapshot(out)
    code, err = run_main(["--out", str(out), "--resume", "--iters", "3"], capsys)
    assert code == 2 and "notes.txt" in one_line(err)
    assert snapshot(out) == before


def test_policy_that_is_a_symlink_is_refused_and_its_target_kept(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(out / "policy", elsewhere)
    (out / "policy").symlink_to(elsewhere)
    code, err = run_main(["--out", str(out), "--resume", "--iters", "3"], capsys)
    assert code == 2 and "policy" in one_line(err)
    assert (elsewhere / "model.safetensors").is_file()


@pytest.mark.parametrize("damage", ["weights-deleted", "weights-truncated", "card-not-utf8", "tokenizer-deleted", "config-edited"])
def test_incomplete_export_is_rebuilt_by_resume(finished, tmp_path, capsys, damage):
    out = copy_run(finished, tmp_path)
    policy = out / "policy"
    if damage == "weights-deleted":
        (policy / "model.safetensors").unlink()
    elif damage == "weights-truncated":
        (policy / "model.safetensors").write_bytes((policy / "model.safetensors").read_bytes()[:100])
    elif damage == "card-not-utf8":
        (policy / "README.md").write_bytes(b"---\n\xff\xfe\n---\n")
    elif damage == "tokenizer-deleted":
        (policy / "tokenizer.json").unlink()
    else:
        (policy / "config.json").write_text("{}")
    code, err = run_main(["--out", str(out), "--resume", "--iters", str(BASE_ITERS)], capsys)
    assert code == 0, err[-2000:]
    expected, got = load_file(str(finished / "policy" / "model.safetensors")), load_file(str(policy / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert sorted(os.listdir(policy)) == sorted(os.listdir(finished / "policy"))
    assert (policy / "config.json").read_bytes() == (finished / "policy" / "config.json").read_bytes()


def test_current_export_is_not_rewritten(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    mtime = (out / "policy" / "model.safetensors").stat().st_mtime_ns
    code, err = run_main(["--out", str(out), "--resume", "--iters", str(BASE_ITERS)], capsys)
    assert code == 0 and "exporting" not in err
    assert (out / "policy" / "model.safetensors").stat().st_mtime_ns == mtime


# ---------------------------------------------------------------- the model's fingerprint


def test_resume_refuses_a_model_whose_weights_changed(finished, own_model, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    original = (own_model / "model.safetensors").read_bytes()
    weights = load_file(str(own_model / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    before = snapshot(out)
    try:
        save_file(weights, str(own_model / "model.safetensors"), metadata={"format": "pt"})
        code, err = run_main(["--out", str(out), "--resume", "--iters", "3"], capsys)
    finally:
        (own_model / "model.safetensors").write_bytes(original)
    assert code == 2, err[-2000:]
    line = one_line(err)
    assert "weights" in line and str(own_model) in line, line
    assert snapshot(out) == before


# ---------------------------------------------------------------- the temp dir


def test_learn_without_a_logger_leaves_nothing_in_the_temp_dir(tiny_lm_path):
    from tests.helpers.ppokl import make_env, make_model

    before = set(os.listdir(tempfile.gettempdir()))
    model = make_model(tiny_lm_path, make_env(tiny_lm_path, n_envs=2, max_new_tokens=2), n_epochs=1, batch_size=2)
    model.learn(total_timesteps=4)
    assert {n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("SB3-")} == set()
