"""The study command lines under hostile input (issue 28, items 1 and 6): flag domains (finite,
in range), ``--out`` checks, a lock, reports that name the bad file, and ``studies.lm`` taking
its lock before it deletes anything. Every refusal is one line and exit 2."""
from __future__ import annotations

import json

import pytest

import studies.lm as study_lm
import studies.lm_variance as lm_variance
import studies.moments as moments
import studies.tabular as tabular
from agents.cli.run_dir import RunDirError, lock_run_dir
from studies.cli_checks import FolderLock

TABULAR_BAD = [
    ["--vocab", "0"], ["--vocab", "1"], ["--vocab", "-3"], ["--length", "0"], ["--length", "-1"],
    ["--beta", "0"], ["--beta", "-1"], ["--beta", "nan"], ["--beta", "inf"], ["--beta", "-inf"],
    ["--eta", "nan"], ["--eta", "0"], ["--eta", "-1"], ["--eta", "inf"], ["--tol", "nan"], ["--tol", "0"],
    ["--tol", "inf"], ["--sgd-eta", "nan"], ["--sgd-eta", "-0.1"], ["--instance-seed", "-1"],
    ["--sampled", "0x3@1"], ["--sampled", "3x0@1"], ["--sampled", "3x3@nan"], ["--sampled", "3x3@-1"],
    ["--sampled", "3x3@0"], ["--sampled", "axb@1"], ["--vocab", "2,x"], ["--beta", "1,,2"],
]  # fmt: skip


@pytest.mark.parametrize("flags", TABULAR_BAD, ids=[" ".join(f) for f in TABULAR_BAD])
def test_tabular_refuses_out_of_domain_flags_before_writing(flags, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        tabular.main(["--out", str(out), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert flags[0] in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists()


@pytest.mark.parametrize("main", [tabular.main, moments.main, lm_variance.main], ids=["tabular", "moments", "lm_variance"])
@pytest.mark.parametrize("kind", ["file", "under-a-file", "empty", "too-long"])
def test_study_out_that_cannot_be_a_folder_is_one_line(main, kind, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    out = {"file": str(tmp_path / "file"), "under-a-file": str(tmp_path / "file" / "sub"), "empty": "", "too-long": str(tmp_path / ("x" * 300))}[kind]
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", out, "--report"])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("content", [b"{", b"", b"\xff\xfe", b"[" * 100_000, b'{"a": 1'])
def test_tabular_report_names_a_truncated_result_file(content, tmp_path, capsys):
    (tmp_path / "exact").mkdir()
    bad = tmp_path / "exact" / "cell.json"
    bad.write_bytes(content)
    assert tabular.main(["--out", str(tmp_path), "--report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0], err


@pytest.mark.parametrize("content", [b"{", b"\xff", b"[" * 100_000])
def test_moments_report_names_a_truncated_result_file(content, tmp_path, capsys):
    (tmp_path / "cells").mkdir()
    bad = tmp_path / "cells" / "c.json"
    bad.write_bytes(content)
    assert moments.main(["--out", str(tmp_path), "--report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0], err


@pytest.mark.parametrize("main", [tabular.main, moments.main], ids=["tabular", "moments"])
def test_study_report_on_an_empty_folder_is_not_a_traceback(main, tmp_path, capsys):
    code = main(["--out", str(tmp_path), "--report"])
    assert code in (0, 2) and "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("main", [tabular.main, moments.main], ids=["tabular", "moments"])
def test_a_second_study_on_the_same_out_is_refused(main, tmp_path, capsys):
    with FolderLock(tmp_path):
        assert main(["--out", str(tmp_path), "--report"]) == 2
    assert "in use" in capsys.readouterr().err


def test_lm_variance_report_names_a_bad_summary(tmp_path, capsys):
    raw = tmp_path / "out" / "raw"
    raw.mkdir(parents=True)
    code = lm_variance.main(["--root", str(tmp_path), "--out", str(tmp_path / "out"), "--report"])
    assert code in (0, 2) and "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--seeds", "-1"], ["--betas", "nan"], ["--betas", "-0.1"], ["--betas", "inf"], ["--seeds", "0,-2"]])
def test_study_lm_refuses_out_of_domain_grid_flags(flags, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("iters: 1\n")
    code = study_lm.main(["--config", str(config), "--study-dir", str(tmp_path / "s"), "--results", str(tmp_path / "r"), *flags])
    assert code == 2 and flags[0] in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def test_study_lm_does_not_delete_a_run_in_progress(tmp_path):
    out = tmp_path / "s0-k1-b0.1"
    out.mkdir()
    (out / "metrics.csv").write_text("iteration\n0\n")  # no checkpoint yet: the study would restart it
    run = study_lm.grid(["k1"], [0.1], [0])[0]
    with lock_run_dir(out):  # a training of it is running
        with pytest.raises(RunDirError, match="in use"):
            study_lm.train(tmp_path / "c.yaml", run, 1, out)
        assert (out / "metrics.csv").read_text() == "iteration\n0\n" and (out / ".lock").is_file()


def test_two_studies_on_one_study_dir_the_second_is_refused(tmp_path, tiny_lm_path, capsys, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_lm_path}\niters: 1\n")
    monkeypatch.setattr(study_lm, "held_out_prompts", lambda base, n: ["a"])
    study_dir = tmp_path / "s"
    with lock_run_dir(study_dir):
        code = study_lm.main(["--config", str(config), "--study-dir", str(study_dir), "--results", str(tmp_path / "r"), "--seeds", "0", "--betas", "0.1", "--variants", "k1"])
    assert code == 2 and "in use" in capsys.readouterr().err
    assert json.dumps(sorted(p.name for p in study_dir.iterdir())) == json.dumps([])  # the lock file goes with the lock


@pytest.mark.parametrize("content", [b"{", b"\xff", b"[" * 100_000])
def test_study_lm_report_names_a_truncated_result_file(content, tmp_path, capsys):
    (tmp_path / "per_run").mkdir()
    bad = tmp_path / "per_run" / "s0-k1-b0.1.json"
    bad.write_bytes(content)
    assert study_lm.main(["--results", str(tmp_path), "--report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0], err
