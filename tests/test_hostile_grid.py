"""A generated grid of hostile inputs to ``python -m agents.ppo_kl`` (issue 28, "tried as a hostile
user would"): non-finite or malformed values of every numeric flag and YAML key, hostile
``--out`` paths, and every run file replaced by something it should not be. The contract checked
everywhere: exit 0 or 2, never a traceback, never a hang; on exit 2 one line and nothing in
``--out`` changed; nothing outside ``--out`` touched.

The damaged-file grid resumes a finished run for each case (a model load per case, --iters 2:
the finish steps only), about a minute on two cores."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from agents.cli.config import Args
from tests.helpers.cli import copy_run, finished, no_hang, one_line, own_model, run_main, snapshot, tiny_run_flags  # noqa: F401 (fixtures)

NUMERIC = [f.name for f in dataclasses.fields(Args) if f.type in ("int", "float", "float | None", "int | None")]
BAD_VALUES = ["nan", "inf", "-inf", "x", "", "1e309", "0x10", "1,2"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("name", NUMERIC)
def test_every_numeric_flag_refuses_malformed_and_non_finite_values(name, value, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_main(["--out", str(out), _flag(name), value], capsys)
    assert code == 2 and "Traceback" not in err
    assert _flag(name) in one_line(err) or name in one_line(err), err
    assert not out.exists()


@pytest.mark.parametrize("value", ["nan", ".inf", "-.inf", "[1]", "{a: 1}", "'x'", "1e999"])
@pytest.mark.parametrize("name", NUMERIC)
def test_every_numeric_yaml_key_refuses_malformed_values(name, value, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"{name}: {value}\n")
    out = tmp_path / "run"
    code, err = run_main(["--config", str(config), "--out", str(out)], capsys)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    one_line(err)
    assert not out.exists()


def _hostile_out(kind: str, tmp_path: Path) -> str:
    (tmp_path / "file").write_text("mine")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "thesis.tex").write_text("mine")
    return {
        "empty": "",
        "spaces": "   ",
        "a-file": str(tmp_path / "file"),
        "under-a-file": str(tmp_path / "file" / "run"),
        "too-long": str(tmp_path / ("x" * 256)),
        "non-run-folder": str(tmp_path / "full"),
        "dangling-symlink": (os.symlink(tmp_path / "nowhere", tmp_path / "dangling"), str(tmp_path / "dangling"))[1],
        "symlink-to-file": (os.symlink(tmp_path / "file", tmp_path / "linkfile"), str(tmp_path / "linkfile"))[1],
        "symlink-to-non-run": (os.symlink(tmp_path / "full", tmp_path / "linkfull"), str(tmp_path / "linkfull"))[1],
        "fifo": (os.mkfifo(tmp_path / "fifo"), str(tmp_path / "fifo"))[1],
        "dev-null": "/dev/null",
        "proc": "/proc/self",
        "root": "/",
        "etc": "/etc",
    }[kind]


OUT_KINDS = ["empty", "spaces", "a-file", "under-a-file", "too-long", "non-run-folder", "dangling-symlink", "symlink-to-file",
             "symlink-to-non-run", "fifo", "dev-null", "proc", "root", "etc"]  # fmt: skip


@pytest.mark.parametrize("resume", [False, True], ids=["new", "resume"])
@pytest.mark.parametrize("kind", OUT_KINDS)
def test_hostile_out_is_refused_in_one_line_and_nothing_is_written(kind, resume, own_model, tmp_path, capsys, no_hang):  # noqa: F811
    out = _hostile_out(kind, tmp_path)
    before = snapshot(tmp_path)
    code, err = run_main(tiny_run_flags(str(own_model), Path("unused"), 1)[:-2] + ["--out", out] + (["--resume"] if resume else []), capsys)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    line = one_line(err)
    assert "--out" in line or (out and out[:40] in line), err
    assert snapshot(tmp_path) == before


RUN_FILES = ["metrics.csv", "sb3_logs/progress.csv", "args.json", "checkpoint.safetensors", ".ppokl-run.json",
             "policy/README.md", "policy/config.json", "curves.png"]  # fmt: skip
DAMAGES = ["fifo", "dangling-symlink", "directory", "empty", "garbage", "not-utf8", "deleted", "symlink-outside"]


def _damage(path: Path, how: str, outside: Path) -> None:
    if how != "deleted" and how != "directory" and not path.exists():
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if how == "fifo":
        os.mkfifo(path)
    elif how == "dangling-symlink":
        path.symlink_to(outside.parent / "nowhere")
    elif how == "directory":
        path.mkdir()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif how == "not-utf8":
        path.write_bytes(b"\xff\xfe\xfd\n" * 10)
    elif how == "symlink-outside":
        path.symlink_to(outside)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", RUN_FILES)
def test_every_run_file_damaged_every_way_is_refused_or_repaired(name, how, finished, tmp_path, capsys, no_hang):  # noqa: F811
    out = copy_run(finished, tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    _damage(out / name, how, outside)
    before = snapshot(out) if how not in ("dangling-symlink", "symlink-outside") else None
    code, err = run_main(["--out", str(out), "--resume", "--iters", "2"], capsys)
    assert code in (0, 2) and "Traceback" not in err, err[-3000:]
    assert outside.read_text() == "keep me"
    if code == 2:
        one_line(err)
        if before is not None:
            assert snapshot(out) == before
    else:
        assert (out / "policy" / "model.safetensors").is_file() and not (out / "policy").is_symlink()
