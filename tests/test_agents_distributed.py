"""Data-parallel PPOKL on 2 CPU ranks (gloo): one iteration with n episodes per rank updates the
parameters exactly as one process does on the union of both ranks' 2n episodes; a torchrun
launch of the CLI trains, writes from rank 0 only, and resumes."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from agents import distributed
from agents.vec_env import LMGymVecEnv
from lmgym.assets import load_causal_lm
from tests.helpers.ppokl import make_env, make_model
from tests.helpers.cli import tiny_run_flags

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["this movie was", "i loved the acting and the music but the plot", "a", "the worst film i have ever seen"]
N_PER_RANK = 2
SEED = 11
# One minibatch per epoch (the whole rollout), two epochs (the second gradient is taken at the
# updated parameters); the adaptive controller checks that beta follows the global KL. SGD keeps
# the comparison well conditioned: Adam's first step is ~lr x sign(g), so float-rounding noise in
# near-zero gradient coordinates would move parameters by up to lr (SGD moves them by lr x noise).
CONFIG = {
    "analytic_grad": True,
    "kl_reward": "analytic",
    "kl_coef": 0.3,
    "kl_target": 0.05,
    "n_epochs": 2,
    "batch_size": 10**6,
    "learning_rate": 0.1,
    "policy_kwargs": {"optimizer_class": torch.optim.SGD},
}
BUFFER_FIELDS = ("actions", "mask", "logprobs", "ref_logprobs", "values", "analytic_kl", "ref_logits", "kl", "rewards", "advantages", "returns")  # fmt: skip


def frequent_eos_tokenizer(model_path: str):
    """The tiny model's tokenizer with its most likely first generated token made the end-of-text
    token, so that episodes end early and the ranks generate different numbers of tokens (the
    case where the per-rank loss weights W n_r / n matter)."""
    model, tokenizer = load_causal_lm(model_path)
    prompts = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**prompts).logits[:, -1]
    logits[:, tokenizer.pad_token_id] = -torch.inf
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(logits.softmax(-1).mean(0).argmax()))
    return tokenizer


def rank_env(model_path: str, n_envs: int) -> LMGymVecEnv:
    return make_env(model_path, n_envs=n_envs, max_new_tokens=6, prompts=PROMPTS, tokenizer=frequent_eos_tokenizer(model_path))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, model_path: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    assert distributed.init_from_env("cpu") == "cpu"
    try:
        model = make_model(model_path, rank_env(model_path, N_PER_RANK), seed=distributed.rank_seed(SEED), **CONFIG)
        distributed.broadcast_parameters(model.policy)
        model.learn(total_timesteps=N_PER_RANK * model.n_steps)
        buffer = model.rollout_buffer
        tensors = {name: getattr(buffer, name).contiguous() for name in ("prompt_ids", "prompt_mask", "task_rewards", *BUFFER_FIELDS)}
        tensors.update({f"param.{name}": p.detach().contiguous() for name, p in model.policy.named_parameters()})
        save_file(tensors, f"{out}/rank{rank}.safetensors")
        logged = {k: v for k, v in {**model.logger.name_to_value, **model.rollout_stats}.items() if not k.startswith("time/")}
        logged["beta_after_rollout"] = model.kl_controller.value
        Path(f"{out}/rank{rank}.json").write_text(json.dumps(logged))
    finally:
        distributed.shutdown()


def union_of(ranks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The ranks' rollouts as one batch: prompts left-padded, generated steps right-padded."""
    width = max(r["prompt_ids"].shape[1] for r in ranks)
    steps = max(r["actions"].shape[1] for r in ranks)
    union = {}
    for name in ("prompt_ids", "prompt_mask"):
        union[name] = torch.cat([torch.nn.functional.pad(r[name], (width - r[name].shape[1], 0)) for r in ranks])
    for name in BUFFER_FIELDS:
        padded = []
        for r in ranks:
            missing = steps - r[name].shape[1]
            padded.append(torch.cat([r[name], r[name].new_zeros(r[name].shape[0], missing, *r[name].shape[2:])], dim=1))
        union[name] = torch.cat(padded)
    union["task_rewards"] = torch.cat([r["task_rewards"] for r in ranks])
    return union


def test_two_ranks_update_like_one_process_on_the_union_of_their_episodes(tiny_lm_path, tmp_path):
    mp.spawn(_rank_worker, args=(tiny_lm_path, str(tmp_path), free_port()), nprocs=2, join=True)
    saved = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    logged = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert not torch.equal(saved[0]["actions"], saved[1]["actions"])  # each rank sampled its own episodes
    params = [{k[6:]: v for k, v in s.items() if k.startswith("param.")} for s in saved]
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), name  # the ranks stay identical
    assert logged[0] == logged[1]

    tokens = [int(s["mask"].sum()) for s in saved]
    assert tokens[0] != tokens[1]  # unequal shares: the loss weights W n_r / n are not all 1
    single = make_model(tiny_lm_path, rank_env(tiny_lm_path, 2 * N_PER_RANK), seed=SEED, **CONFIG)
    single.setup_learn(total_timesteps=2 * N_PER_RANK * single.n_steps, callback=None)
    union = union_of(saved)
    buffer = single.rollout_buffer
    for name, value in union.items():
        setattr(buffer, name, value)
    buffer.n_steps = union["actions"].shape[1]
    kl_union = float(union["analytic_kl"].sum(dim=1).mean())
    assert logged[0]["rollout/kl_analytic"] == pytest.approx(kl_union, rel=1e-6)
    single.kl_controller.update(kl_union, 2 * N_PER_RANK)
    assert single.kl_controller.value == pytest.approx(logged[0]["beta_after_rollout"], rel=1e-12)
    single.train()

    initial = make_model(tiny_lm_path, make_env(tiny_lm_path, n_envs=1), seed=SEED, **CONFIG).policy
    moved = max(float((p.detach() - params[0][name]).abs().max()) for name, p in initial.named_parameters())
    assert moved > 1e-3
    for name, p in single.policy.named_parameters():
        torch.testing.assert_close(p.detach(), params[0][name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    for key in ("train/loss", "train/policy_gradient_loss", "train/value_loss", "train/kl_loss", "train/approx_kl", "train/explained_variance"):
        assert logged[0][key] == pytest.approx(single.logger.name_to_value[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_torchrun_cli_trains_on_two_ranks_writes_from_rank_0_and_resumes(tiny_lm_path, tmp_path):
    out = tmp_path / "run"
    # torchrun's elastic agent leaves torchelastic_* folders in TMPDIR: give it the test's own
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = torchrun + ["-m", "agents.ppo_kl", "--analytic-grad", "--kl-reward", "analytic", "--kl-target", "0.5"]
    first = subprocess.run(command + tiny_run_flags(tiny_lm_path, out, 1), cwd=REPO, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (first.stdout + first.stderr).count("iter   1") == 1  # rank 0 alone reports
    assert (first.stdout + first.stderr).count("eval: sentiment") == 2  # and evaluates (iterations 0 and 1, the last)
    assert [row.split(",")[0] for row in (out / "metrics.csv").read_text().splitlines()[1:]] == ["0", "1"]
    # SB3's ep_rew_mean (the episodes' task rewards) is over both ranks, like metrics.csv's task reward
    with (out / "metrics.csv").open() as f:
        task_reward = float(list(csv.DictReader(f))[1]["rollout/task_reward"])
    with (out / "sb3_logs" / "progress.csv").open() as f:
        assert float(next(csv.DictReader(f))["rollout/ep_rew_mean"]) == pytest.approx(task_reward, abs=1e-6)

    resumed = subprocess.run(
        command + tiny_run_flags(tiny_lm_path, out, 2) + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert log.count("iter   2") == 1 and "iter   1" not in log
    rows = [row.split(",") for row in (out / "metrics.csv").read_text().splitlines()]
    assert [row[0] for row in rows[1:]] == ["0", "1", "2"]
    timesteps = [int(row[1]) for row in rows[1:]]
    assert timesteps == [0, 12, 24]  # global: 2 ranks x 2 envs x 3 tokens per iteration, continued on resume
