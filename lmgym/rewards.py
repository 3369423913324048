"""Reward models: score a batch of continuation strings with a sentiment, as a float array.

- ``"vader"``: VADER's compound score, in [-1, 1] (rule-based, offline).
- any Hugging Face text-classification model id or local path: the softmax probability of the
  positive class ``positive_label`` (RL4LMs' IMDB task uses ``lvwerra/distilbert-imdb``, label 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lmgym.assets import hub_unavailable

VADER = "vader"


class VaderReward:
    """VADER compound sentiment score in [-1, 1]."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([self.analyzer.polarity_scores(text)["compound"] for text in texts], dtype=np.float32)


class ClassifierReward:
    """Softmax probability of class ``positive_label`` under a sequence classifier."""

    def __init__(self, spec: str, positive_label: int = 1, device: str | torch.device = "cpu", batch_size: int = 32):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        try:
            architectures = AutoConfig.from_pretrained(spec).architectures or []
            if not any(name.endswith("ForSequenceClassification") for name in architectures):
                raise ValueError(
                    f"reward {spec!r} is not a text-classification model (its config lists the architectures "
                    f"{architectures}; a ...ForSequenceClassification model is needed): its classification head "
                    "would be randomly initialised"
                )
            self.tokenizer = AutoTokenizer.from_pretrained(spec)
            self.model = AutoModelForSequenceClassification.from_pretrained(spec).to(device).eval()
        except OSError as error:
            if Path(spec).exists():
                raise
            raise hub_unavailable(spec, error) from error
        num_labels = self.model.config.num_labels
        if not 0 <= positive_label < num_labels:
            raise ValueError(f"positive_label={positive_label} but the classifier {spec!r} has {num_labels} labels")
        self.positive_label = positive_label
        self.batch_size = batch_size
        self.max_length = min(self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", 512))

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        scores = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.model.device)
            logits = self.model(**batch).logits.float()
            scores.append(logits.softmax(-1)[:, self.positive_label])
        return torch.cat(scores).cpu().numpy() if scores else np.zeros(0, dtype=np.float32)


def make_reward_model(spec: str = VADER, positive_label: int = 1, device: str | torch.device = "cpu"):
    """``"vader"`` or a text-classification model id/path -> callable ``list[str] -> float32 array``.

    Args:
        spec: ``"vader"`` (offline) or a sequence classifier: a local folder or a Hub id.
        positive_label: the classifier's class whose probability is the reward.
        device: where the classifier runs.

    Returns:
        A callable mapping a list of texts to a float32 array of rewards.

    Raises:
        lmgym.assets.AssetUnavailableError: the classifier cannot be loaded.
    """
    if spec == VADER:
        return VaderReward()
    return ClassifierReward(spec, positive_label=positive_label, device=device)
