"""The IMDB task of RL4LMs: continue a movie-review opening (the bundled prompts, or the IMDB
dataset), rewarded for positive sentiment (VADER, or a classifier)."""
from __future__ import annotations

from typing import Any

from lmgym.task import ContinuationTask


def imdb_task(**kwargs: Any) -> ContinuationTask:
    """``ContinuationTask`` with its defaults, which are IMDB's (see its Args)."""
    return ContinuationTask(**kwargs)
