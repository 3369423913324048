"""Every script in bench/ runs end to end at tiny sizes (tiny local models, a few tokens), so a
benchmark the docs cite cannot stop running unnoticed. Each prints its Markdown table; the
tests check that the table is there, not any number (timings are machine-dependent)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # subprocess runs of the CLI, a study or a benchmark

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def run_script(name: str, *flags: str, timeout: int = 600) -> str:
    """Run ``bench/name`` with ``flags``; its stdout. Its TMPDIR is its own, removed afterwards
    (torchrun's elastic agent leaves torchelastic_* folders there)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": tmp}
        done = subprocess.run(
            [sys.executable, str(BENCH / name), *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def tiny_config(tiny_lm_path, tmp_path_factory) -> Path:
    """A run config of the tiny Llama: 4 envs x (8 prompt + 3 new) tokens, one epoch, one iteration."""
    config = {
        "model": tiny_lm_path, "reward": "vader", "dataset": "bundled", "analytic_grad": True,
        "kl_reward": "analytic", "kl_coef": 0.1, "n_envs": 4, "max_prompt_tokens": 8, "max_new_tokens": 3,
        "n_epochs": 1, "batch_size": 6, "learning_rate": 1e-3, "iters": 1, "eval_every": 1, "eval_prompts": 2,
        "save_every": 1,
    }  # fmt: skip
    path = tmp_path_factory.mktemp("bench_config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_every_bench_script_has_a_smoke_test():
    tested = {"bench_bf16_cpu.py", "bench_env.py", "bench_fused.py", "bench_iteration.py", "bench_kl.py", "bench_malloc.py", "bench_memory.py", "bench_precision.py",
              "bench_ranks.py", "bench_sampler.py", "bench_trl.py", "bench_trl_dropin.py", "compare_kl_variants.py", "profile_iteration.py"}  # fmt: skip
    assert {path.name for path in BENCH.glob("*.py")} == tested


def test_bench_bf16_cpu(tiny_lm_path):
    out = run_script("bench_bf16_cpu.py", "--model", tiny_lm_path, "--rounds", "1", "--batch", "2", "--length", "16",
                     "--new-tokens", "2")
    assert "| forward + backward |" in out and "| generate |" in out and "native bf16" in out


def test_bench_fused_small():
    out = run_script("bench_fused.py", "--small")
    assert "| 300 | 16 | 2 x 3 | unfused |" in out and "| 300 | 16 | 2 x 3 | fused |" in out


def test_bench_fused_against_trl_small():
    out = run_script("bench_fused.py", "--small", "--modes", "fused", "fused-bf16", "trl", "--kl-only")
    for mode in ("fused", "fused-bf16", "trl"):
        assert f"| 300 | 16 | 2 x 3 | {mode} |" in out


def test_bench_fused_marks_what_does_not_fit():
    out = run_script("bench_fused.py", "--small", "--max-gb", "0", "--modes", "unfused")
    assert "does not fit" in out


def test_bench_kl_small():
    out = run_script("bench_kl.py", "--small")
    assert out.count("| 50 | 2 x 3 |") == 6


def test_bench_env(tiny_lm_path):
    out = run_script("bench_env.py", "--model", tiny_lm_path, "--num-envs", "2", "--max-new-tokens", "2", "--naive-samples", "2")
    assert "| vector env, N=2" in out


def test_bench_memory(tiny_lm_path):
    out = run_script("bench_memory.py", "--model", tiny_lm_path, "--n-envs", "2", "--max-new-tokens", "2",
                     "--batch-size", "2", "--repeats", "1")  # fmt: skip
    for mode in ("store", "recompute", "hidden"):
        assert f"| {mode} |" in out


def test_bench_sampler(tiny_lm_path):
    out = run_script("bench_sampler.py", "--model", tiny_lm_path, "--n-envs", "3", "--prompt-tokens", "4",
                     "--max-new-tokens", "3", "--rounds", "2", "--draws", "2", "--top", "3")  # fmt: skip
    for name in ("generate", "loop", "loop, multinomial"):
        assert f"| {name} |" in out
    assert "loop, multinomial drew generate's tokens in every round" in out
    assert "the draw alone" in out and "sample_categorical" in out and "costliest ops" in out


def test_bench_precision(tiny_lm_path):
    out = run_script("bench_precision.py", "--model", tiny_lm_path, "--batch", "2", "--length", "4")
    for name in ("float32", "bf16 head, fp32 KL", "bf16 trunk, fp32 head", "bf16 trunk and head, fp32 KL",
                 "fused, fp32 products", "fused, bf16 products"):
        assert f"| {name} |" in out


def test_bench_ranks(tiny_lm_path):
    out = run_script("bench_ranks.py", "--model", tiny_lm_path, "--total-envs", "2", "--ranks", "1", "2", "--iters", "1",
                     "--max-new-tokens", "2", "--batch-size", "2", "--allreduce-elements", "1000")  # fmt: skip
    assert "| 1 | 2 |" in out and "| 2 | 1 |" in out


def test_bench_iteration(tiny_config):
    out = run_script("bench_iteration.py", "--config", str(tiny_config), "--rounds", "2")
    assert "| PPOKL analytic |" in out and "| HF baseline |" in out and "-row GEMM rate (" in out


def test_bench_iteration_hidden(tiny_config):
    out = run_script("bench_iteration.py", "--config", str(tiny_config), "--rounds", "2", "--ref-logits", "hidden")
    assert "| PPOKL analytic |" in out


def test_bench_malloc(tiny_config):
    out = run_script("bench_malloc.py", "--config", str(tiny_config), "--rounds", "1")
    assert "| 1 | default |" in out and "| 1 | retain |" in out and "paired retain / default" in out


def test_profile_iteration(tiny_config):
    out = run_script("profile_iteration.py", "--config", str(tiny_config), "--iters", "1", "--warmup", "0",
                     "--torch-profile", "--ref-logits", "hidden")  # fmt: skip
    assert "| **total** |" in out and "update: fused output layers" in out


def test_compare_kl_variants(tiny_config, tmp_path):
    out = run_script("compare_kl_variants.py", "--config", str(tiny_config), "--out", str(tmp_path), "--iters", "1")
    for variant in ("k1 reward (RL4LMs)", "analytic reward", "k1 reward + analytic grad", "analytic reward + analytic grad"):
        assert f"\n| {variant} |" in out


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl (the frameworks extra) is not installed")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bench_trl(tiny_config, precision):
    out = run_script("bench_trl.py", "--config", str(tiny_config), "--rounds", "2", "--generations", "2", "--precision", precision)
    assert f"precision {precision} (PPOKL --dtype {'bfloat16' if precision == 'bf16' else 'float32'}" in out
    assert "- TRL GRPOTrainer: " in out
    assert "round 2 of 2 (s): TRL GRPOTrainer " in out and "PPOKL store " in out  # printed as each round ends
    assert "| PPOKL hidden |" in out and "| PPOKL store |" in out and "| TRL GRPOTrainer |" in out and "| PPOKL FLOP floor at " in out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bench_trl_dropin(tiny_config, precision):
    out = run_script("bench_trl_dropin.py", "--config", str(tiny_config), "--rounds", "2", "--generations", "2",
                     "--precision", precision)  # fmt: skip
    for name in ("GRPOTrainer", "KLGRPOTrainer k3-ratio", "KLGRPOTrainer reinforce-future-is", "KLGRPOTrainer analytic-future-is"):
        assert f"| {name} |" in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_check_script_without_cuda_exits_2():
    done = subprocess.run(["bash", str(BENCH / "cuda_check.sh")], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PY": sys.executable, "OUT": str(REPO / ".pytest_cache" / "cuda")})  # fmt: skip
    assert done.returncode == 2 and "no CUDA device" in done.stderr
