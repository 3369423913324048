"""One process of tests/test_frameworks_trl_fsdp.py: KLGRPOTrainer under accelerate's FSDP2
(``fully_shard``, CPU, gloo), its half of a fixed batch; rank 0 writes the loss (mean over ranks)
and every parameter's whole gradient to a safetensors file.

    torchrun --nproc_per_node 2 tests/helpers/fsdp_trl_worker.py MODEL_PATH ESTIMATOR OUT_FILE
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from kl_estimators.integrations.trl import KLGRPOTrainer
from tests.helpers.trl_setup import fixed_batch, perturb, sharded_half


def main(model_path: str, estimator: str, out_file: str) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    from tests.helpers.trl_setup import grpo_config

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    args = grpo_config(
        __import__("pathlib").Path(out_file).parent,     )
    trainer = KLGRPOTrainer(model=model_path, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                            train_dataset=Dataset.from_dict({"prompt": ["a"] * 8}), processing_class=tokenizer,
                            kl_estimator=estimator)
    inputs = fixed_batch(model_path)
    trainer.current_gradient_accumulation_steps = 1
    perturb(trainer.model)  # the weights of fixed_batch's policy
    # accelerate 1.15 turns FSDP on only for accelerator devices (its state.py: MULTI_CPU is not in the
    # list), so on CPU its FSDP2 preparation is called directly, with the plugin Trainer would build
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from trl.models.utils import prepare_fsdp

    trainer.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")
    model = fsdp2_prepare_model(trainer.accelerator, trainer.model)
    trainer.ref_model = prepare_fsdp(trainer.ref_model, trainer.accelerator)  # as GRPOTrainer.__init__ does under FSDP
    trainer.model.train()
    rank, world = dist.get_rank(), dist.get_world_size()
    loss = trainer._compute_loss(model, sharded_half(inputs, rank, world))
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {}
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).contiguous()
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    sharded = isinstance(model, FSDPModule) and all(
        isinstance(m.lm_head.weight, DTensor) for m in (trainer.accelerator.unwrap_model(model), trainer.ref_model))
    if rank == 0:
        save_file({"loss": (total / world).reshape(1), "sharded": torch.tensor([float(sharded), float(world)]), **grads}, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:4])
