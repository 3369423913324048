"""KLGRPOTrainer under accelerate's FSDP2 (``fully_shard``) with 2 CPU processes over gloo (torchrun):
the same loss and parameter gradients as one process on the whole batch, with an analytic and a
sampled estimator. The output layer's weight is then a DTensor shard outside the forward, which the
trainer gathers (``output_layer``). Each run takes ~15 s on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from safetensors.torch import load_file  # noqa: E402

from kl_estimators.integrations.trl import KLGRPOTrainer  # noqa: E402
from tests.helpers.trl_setup import build, fixed_batch, perturb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ("analytic-future-is", "reinforce-future-is"))
def test_fsdp2_two_processes_match_one(tiny_lm_path, tiny_tokenizer, tmp_path, estimator):
    out = tmp_path / "fsdp.safetensors"
    # torchrun's elastic agent leaves torchelastic_* folders in TMPDIR: give it the test's own
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "helpers" / "fsdp_trl_worker.py"), tiny_lm_path, estimator, str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # a hang guard, not a speed bound
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = load_file(out)
    assert sharded.pop("sharded").tolist() == [1.0, 2.0]  # fully_shard applied, 2 processes

    single = build(KLGRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path / "one", kl_estimator=estimator)
    perturb(single.model)
    loss = single._compute_loss(single.model, fixed_batch(tiny_lm_path))
    loss.backward()
    torch.testing.assert_close(sharded.pop("loss"), loss.detach().reshape(1), rtol=1e-5, atol=1e-7)
    grads = {name: p.grad for name, p in single.model.named_parameters()}
    assert set(sharded) == set(grads)
    scale = max(g.abs().max().item() for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(sharded[name], grad, rtol=0.0, atol=1e-5 * scale, msg=name)
