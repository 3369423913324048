"""``python -m studies.lm`` on a tiny model: result files, skip on restart, resume, the report."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

import studies.lm as study
from agents.cli.run_dir import CHECKPOINT, METRICS, POLICY, read_rows
from lmgym.task import ContinuationTask
from studies.lm_eval import evaluate_held_out
from studies.lm_report import aggregate, compute_summary, mean_sem, paired_table, table


@pytest.fixture
def tiny_config(tiny_lm_path, tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(
        f"model: {tiny_lm_path}\nn_envs: 2\nmax_prompt_tokens: 8\nmax_new_tokens: 3\nn_epochs: 1\n"
        "eval_every: 0\nsave_every: 1\nlearning_rate: 1.0e-3\niters: 1\n"
    )
    return path


def study_argv(config, tmp_path, *extra: str) -> list[str]:
    return [
        "--config", str(config), "--variants", "k1,analytic-agrad", "--betas", "0.1", "--seeds", "0",
        "--study-dir", str(tmp_path / "study"), "--results", str(tmp_path / "results"), "--eval-prompts", "6",
        "--eval-batch", "4", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_study_writes_results_skips_finished_runs_resumes_unfinished_ones(tiny_config, tmp_path, monkeypatch):
    """One study of two runs, rerun twice: the whole life cycle (each run is a subprocess)."""
    results = tmp_path / "results"
    killed_early = tmp_path / "study" / "s0-analytic-agrad-b0.1"  # killed before its first checkpoint
    killed_early.mkdir(parents=True)
    (killed_early / METRICS).write_text("iteration\n0\n")
    assert study.main(study_argv(tiny_config, tmp_path, "--keep-checkpoints")) == 0
    assert [row["iteration"] for row in read_rows(killed_early / METRICS)] == ["1"]  # started again
    records = {path.stem: json.loads(path.read_text()) for path in (results / "per_run").glob("*.json")}
    assert sorted(records) == ["s0-analytic-agrad-b0.1", "s0-k1-b0.1"]
    record = records["s0-k1-b0.1"]
    assert (record["variant"], record["beta"], record["seed"], record["config"]["kl_reward"]) == ("k1", 0.1, 0, "k1")
    assert records["s0-analytic-agrad-b0.1"]["config"]["analytic_grad"] is True
    assert record["train"]["iterations"] == 1 and record["eval"]["n_prompts"] == 6
    assert record["eval"]["kl"]["mean"] > 0 and 1 <= record["eval"]["perplexity"] < 1e4
    in_checkout = subprocess.run(["git", "rev-parse", "HEAD"], cwd=study.REPO, capture_output=True).returncode == 0
    assert len(record["git_commit"]) == (40 if in_checkout else 0)  # an unpacked sdist has no commit
    assert record["machine"]["cpu_count"] >= 1
    assert json.loads((results / "reference.json").read_text())["eval"]["kl"]["max"] == 0.0
    for name in ("table.md", "pareto_kl.png", "pareto_ppl.png"):
        assert (results / name).stat().st_size > 0, name
    assert "| k1 reward (RL4LMs) | 0.1 | 1 |" in (results / "table.md").read_text()

    def no_rerun(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    with monkeypatch.context() as patch:
        patch.setattr(study, "train", no_rerun)
        patch.setattr(study, "evaluate_run", no_rerun)
        assert study.main(study_argv(tiny_config, tmp_path)) == 0  # every run finished: nothing runs

    # an unfinished run: a checkpoint after iteration 1 of 2 and no result file
    (results / "per_run" / "s0-k1-b0.1.json").unlink()
    out = tmp_path / "study" / "s0-k1-b0.1"
    first_row = read_rows(out / METRICS)[0]
    assert study.main(study_argv(tiny_config, tmp_path, "--iters", "2")) == 0
    rows = read_rows(out / METRICS)
    assert [row["iteration"] for row in rows] == ["1", "2"] and rows[0] == first_row  # continued, not restarted
    assert "--resume" in (out / "train.log").read_text()
    assert json.loads((results / "per_run" / "s0-k1-b0.1.json").read_text())["train"]["iterations"] == 2
    assert not (out / CHECKPOINT).exists() and not (out / POLICY).exists()  # deleted once the result is written


def test_grid_is_seed_major():
    runs = study.grid(["k1", "k3-loss"], [0.1, 0.3], [0, 1])
    assert [run.seed for run in runs] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [run.run_id for run in runs[:3]] == ["s0-k1-b0.1", "s0-k3-loss-b0.1", "s0-k1-b0.3"]


@pytest.mark.parametrize(
    "argv, message",
    [(["--variants", "k4"], "--variants"), (["--betas", "x"], "--betas"), (["--seeds", ""], "--seeds")],
)
def test_bad_grid_flags_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        study.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "yaml_text, extra, message",
    [("kl_coef: 0.2\n", [], "kl_coef"), ("iters: 1\n", ["--eval-batch", "0"], "--eval-batch"),
     ("iters: 1\n", ["--eval-prompts", "1000"], "--eval-prompts")],
)  # fmt: skip
def test_bad_study_input_fails_before_any_run(yaml_text, extra, message, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    assert study.main(["--config", str(config), "--results", str(tmp_path / "r"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_reference_policy_has_zero_kl_and_evaluation_is_deterministic(tiny_lm_path, tiny_prompts):
    """The policy evaluated against itself has KL 0 at every position; the same seed gives the
    same continuations, and the perplexity is exp of the mean reference NLL per token."""
    task = ContinuationTask(model=tiny_lm_path, prompts=tiny_prompts, max_prompt_tokens=8, max_new_tokens=4)
    first = evaluate_held_out(task.ref_model, task, tiny_prompts, seed=3, batch_size=2)
    again = evaluate_held_out(task.ref_model, task, tiny_prompts, seed=3, batch_size=2)
    assert first.continuations == again.continuations and np.array_equal(first.nll, again.nll)
    assert np.all(first.kl == 0) and np.all((first.n_tokens >= 1) & (first.n_tokens <= 4))
    assert first.perplexity == pytest.approx(np.exp(first.nll.sum() / first.n_tokens.sum()))


def test_evaluation_kl_is_positive_for_a_different_policy(tiny_lm_path, tiny_gpt2_path, tiny_prompts):
    from lmgym.assets import load_causal_lm

    task = ContinuationTask(model=tiny_lm_path, prompts=tiny_prompts, max_prompt_tokens=8, max_new_tokens=3)
    other, _ = load_causal_lm(tiny_lm_path)
    with torch.no_grad():
        other.lm_head.weight.mul_(2.0)
    scores = evaluate_held_out(other, task, tiny_prompts, seed=0)
    assert np.all(scores.kl > 0)


def test_aggregate_mean_and_standard_error_across_seeds():
    def record(seed: int, sentiment: float) -> dict:
        return {
            "variant": "k1", "beta": 0.1, "seed": seed,
            "eval": {"sentiment": {"mean": sentiment, "sem": 0.04}, "kl": {"mean": 1.0, "sem": 0.02}, "perplexity": 20.0,
                     "distinct_2": 0.9},
        }  # fmt: skip

    (cell,) = aggregate([record(0, 0.1), record(1, 0.3), record(2, 0.2)], ["k1"])
    assert cell.seeds == [0, 1, 2] and cell.mean["sentiment"] == pytest.approx(0.2)
    assert cell.sem["sentiment"] == pytest.approx(0.1 / np.sqrt(3))  # sample std 0.1
    assert cell.sem["kl"] == 0.0 and "train_reward" not in cell.mean
    assert mean_sem([0.5]) == (0.5, None)
    assert "| k1 | 0.1 | 3 | +0.200 ± 0.058 | 1.000 ± 0.000 | +0.100 ± 0.058 |" in table([cell], {}, None)
    assert cell.error("sentiment") == cell.sem["sentiment"]
    (single,) = aggregate([record(0, 0.1)], ["k1"])  # one seed: the error over prompts
    assert single.error("sentiment") == 0.04 and single.error("perplexity") == 0.0
    assert "| k1 | 0.1 | 1 | +0.100 (± 0.040 prompts) | 1.000 (± 0.020 prompts) | +0.000 | 20.0 |" in table([single], {}, None)
    assert cell.mean["objective"] == pytest.approx(0.2 - 0.1 * 1.0)


def test_compute_summary_counts_time_machines_and_code_versions():
    machine = {"cpu": "Xeon", "cpu_count": 2, "omp_num_threads": "1"}
    records = [
        {"train": {"wall_seconds": 1800.0}, "eval": {"seconds": 60.0}, "machine": machine, "git_commit": "a" * 40, "git_dirty": False},
        {"train": {"wall_seconds": 1800.0}, "eval": {"seconds": 120.0}, "machine": machine, "git_commit": "b" * 40, "git_dirty": True},
    ]
    assert compute_summary(records) == (
        "2 runs; training wall time 1.0 h summed over runs, held-out evaluation 3 min. "
        "Machines: Xeon (2 cores, OMP_NUM_THREADS=1): 2 runs. Code: aaaaaaa: 1 run, bbbbbbb (dirty): 1 run.\n"
    )


def test_paired_table_differences_against_the_baseline_at_the_same_beta_and_seed():
    def record(variant: str, seed: int, sentiment: float, kl: float) -> dict:
        return {"variant": variant, "beta": 0.1, "seed": seed,
                "eval": {"sentiment": {"mean": sentiment}, "kl": {"mean": kl}, "perplexity": 20.0, "distinct_2": 0.9}}  # fmt: skip

    records = [record("k1", 0, 0.2, 1.0), record("k1", 1, 0.4, 2.0), record("a", 0, 0.3, 1.0), record("a", 1, 0.6, 2.0),
               record("a", 2, 0.9, 1.0)]  # fmt: skip
    lines = paired_table(records, {}, ["k1", "a"], "k1").splitlines()
    assert lines[2] == "| a | 0.1 | 2 | +0.150 ± 0.050 | +0.150 ± 0.050 | +0.000 ± 0.000 |"
    assert len(lines) == 3  # the baseline gets no row, and seed 2 of "a" has no baseline to pair with


def test_git_dirty_leaves_out_only_a_results_folder_inside_the_repository(tmp_path):
    assert study._excluding(study.REPO / "results" / "lm") == [":(exclude)results/lm"]
    assert study._excluding(study.REPO) == [] and study._excluding(tmp_path) == []
