"""One error boundary (issue 28, item 5): whatever a user can cause in the files and flags of
``python -m agents.ppo_kl`` is one line and exit 2, naming the file or flag; a FIFO where a
file belongs never blocks."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tests.helpers.cli import copy_run, finished, no_hang, one_line, own_model, run_main, snapshot, tiny_run_flags  # noqa: F401 (fixtures)


def _resume(out, capsys, iters: int = 3) -> tuple[int, str]:
    return run_main(["--out", str(out), "--resume", "--iters", str(iters)], capsys)


@pytest.mark.parametrize("name", ["sb3_logs/progress.csv", "metrics.csv"])
def test_a_fifo_in_place_of_a_run_file_is_refused_without_blocking(finished, tmp_path, capsys, no_hang, name):  # noqa: F811
    out = copy_run(finished, tmp_path)
    (out / name).unlink()
    os.mkfifo(out / name)
    code, err = _resume(out, capsys)
    assert code == 2 and name.split("/")[-1] in one_line(err), err[-2000:]


@pytest.mark.parametrize("name", ["sb3_logs/progress.csv", "metrics.csv"])
def test_an_over_long_csv_field_is_one_line(finished, tmp_path, capsys, name):  # noqa: F811
    out = copy_run(finished, tmp_path)
    with (out / name).open("a") as f:
        f.write('"' + "x" * 200_000 + '"\n')
    before = snapshot(out)
    code, err = _resume(out, capsys)
    assert code == 2 and name.split("/")[-1] in one_line(err), err[-2000:]
    assert snapshot(out) == before


@pytest.mark.parametrize("name", ["metrics.csv", "sb3_logs/progress.csv"])
def test_a_csv_that_is_not_utf8_is_one_line(finished, tmp_path, capsys, name):  # noqa: F811
    out = copy_run(finished, tmp_path)
    (out / name).write_bytes(b"iteration,x\n\xff\xfe,1\n")
    code, err = _resume(out, capsys)
    assert code == 2 and name.split("/")[-1] in one_line(err), err[-2000:]


def test_deeply_nested_checkpoint_metadata_is_one_line(finished, tmp_path, capsys):  # noqa: F811
    out = copy_run(finished, tmp_path)
    path = out / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    save_file(tensors, str(path), metadata={"ppokl": "[" * 100_000 + "]" * 100_000})
    code, err = _resume(out, capsys)
    assert code == 2 and "checkpoint.safetensors" in one_line(err), err[-2000:]


def test_full_disk_reported_by_safetensors_is_one_line(own_model, tmp_path, capsys, monkeypatch):  # noqa: F811
    import agents.state.training_state as training_state

    def full(path, tensors, meta):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(training_state, "write_checkpoint", full)
    code, err = run_main(tiny_run_flags(str(own_model), tmp_path / "run", 1), capsys)
    assert code == 2 and "checkpoint.safetensors" in one_line(err) and "No space left" in err


@pytest.mark.parametrize(
    "error",
    [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 400000000000 bytes")],
    ids=["MemoryError", "torch-cpu-allocator"],
)
def test_out_of_memory_is_one_line(error, own_model, tmp_path, capsys, monkeypatch):  # noqa: F811
    import agents.cli.train as train

    def oom(args):
        raise error

    monkeypatch.setattr(train, "make_envs", oom)
    code, err = run_main(tiny_run_flags(str(own_model), tmp_path / "run", 1), capsys)
    assert code == 2 and "out of memory" in one_line(err)


@pytest.mark.parametrize("where", ["config-too-long", "config-in-unreadable-folder", "out-in-unreadable-folder"])
def test_os_errors_from_flag_paths_are_one_line(own_model, tmp_path, capsys, where):  # noqa: F811
    if where == "config-too-long":
        argv = ["--config", str(tmp_path / ("c" * 300 + ".yaml"))]
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        (locked / "c.yaml").write_text("iters: 1\n")
        locked.chmod(0)
        if os.access(locked, os.R_OK):  # root reads anything: nothing to test
            locked.chmod(0o700)
            pytest.skip("running as a user who can read any folder")
        argv = ["--config", str(locked / "c.yaml")] if where == "config-in-unreadable-folder" else ["--out", str(locked / "run" / "x")]
    try:
        code, err = run_main(tiny_run_flags(str(own_model), tmp_path / "run", 1) + argv, capsys)
    finally:
        if where != "config-too-long":
            (tmp_path / "locked").chmod(0o700)
    assert code == 2 and "Traceback" not in err
    one_line(err)


def test_manifest_that_is_not_json_is_one_line_naming_it(finished, tmp_path, capsys):  # noqa: F811
    out = copy_run(finished, tmp_path)
    (out / ".ppokl-run.json").write_text("[" * 100_000)
    before = snapshot(out)
    code, err = _resume(out, capsys)
    assert code == 2 and ".ppokl-run.json" in one_line(err)
    assert snapshot(out) == before


def test_manifest_that_is_a_symlink_is_refused(finished, tmp_path, capsys):  # noqa: F811
    out = copy_run(finished, tmp_path)
    shutil.move(out / ".ppokl-run.json", tmp_path / "m.json")
    (out / ".ppokl-run.json").symlink_to(tmp_path / "m.json")
    code, err = _resume(out, capsys)
    assert code == 2 and ".ppokl-run.json" in one_line(err)
    assert json.loads((tmp_path / "m.json").read_text())["format"] == "ppokl-run/1"


@pytest.mark.parametrize("after", [0.5, 2.0])
def test_ctrl_c_during_start_up_is_one_line_exit_130(after, own_model, tmp_path):  # noqa: F811
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "agents.ppo_kl", *tiny_run_flags(str(own_model), tmp_path / "run", 1)]
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 130 and "Traceback" not in err, err[-2000:]


def test_a_too_deeply_nested_config_is_one_line_naming_the_file(tmp_path, capsys):
    config = tmp_path / "deep.yaml"
    config.write_text("a: " + "[" * 100_000 + "]" * 100_000 + "\n")
    code, err = run_main(["--config", str(config), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and str(config) in one_line(err), err
