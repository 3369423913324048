"""Unpadded reference forwards the lmgym tests check the envs against."""
from __future__ import annotations

import numpy as np
import torch


def sequence(obs) -> list[int]:
    """The unpadded tokens of an observation."""
    return obs["input_ids"][obs["attention_mask"] == 1].tolist()


def reference_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1].float().numpy()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.from_numpy(logits), -1).numpy()
