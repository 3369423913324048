"""Prompt sets: movie-review openings the agent continues.

``spec`` is one of

- ``"bundled"``: ``lmgym/data/prompts.txt``, one prompt per line (works offline), and
  ``lmgym/data/prompts_heldout.txt``, openings used only by the ``"heldout"`` split;
- ``"stanfordnlp/imdb"`` or ``"imdb"``: the IMDB reviews via ``datasets.load_dataset`` (needs the
  Hub or a local ``datasets`` cache); ``split`` is passed through (``"train"``, ``"test"``, ...);
- a local ``.csv``, ``.json``, ``.jsonl`` or ``.parquet`` file with a ``text`` column.

Held-out split for the bundled file and local files: ``split="test"`` is every 10th row (rows
0, 10, 20, ...), ``split="train"`` the other rows, so the two never overlap and are deterministic.
``split="heldout"`` is the test split followed, for the bundled set, by every row of
``prompts_heldout.txt`` (40 + 130 prompts), for studies that need more held-out prompts than the
test split has; for the IMDB data set it is the ``"test"`` split.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from lmgym.assets import hub_unavailable

BUNDLED = "bundled"
HF_IMDB = ("stanfordnlp/imdb", "imdb")
_LOCAL_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_HELD_OUT_EVERY = 10
HELD_OUT = "heldout"


def clean(text: str) -> str:
    """Replace ``<br />`` tags by spaces and collapse runs of whitespace."""
    return " ".join(re.sub(r"<br\s*/?>", " ", text).split())


def held_out_split(rows: list[str], split: str) -> list[str]:
    """``"test"`` and ``"heldout"``: every 10th row from the first; ``"train"``: the rest."""
    if split in ("test", HELD_OUT):
        return rows[::_HELD_OUT_EVERY]
    if split == "train":
        return [row for i, row in enumerate(rows) if i % _HELD_OUT_EVERY]
    raise ValueError(f"split must be 'train', 'test' or 'heldout' for bundled prompts and local files, got {split!r}")


def _read_text_column(builder: str, data_files: str | None, split: str, spec: str) -> list[str]:
    import datasets

    if data_files is None:
        try:
            data = datasets.load_dataset(builder, split=split)
        except (OSError, ConnectionError) as error:
            raise hub_unavailable(spec, error) from error
    else:
        try:
            data = datasets.load_dataset(builder, data_files=data_files, split="train")
        except Exception as error:  # datasets raises many types for an empty or malformed file
            cause = error.__cause__ or error
            raise ValueError(
                f"dataset {spec!r} is empty or not a readable {builder} file ({type(cause).__name__}: {cause})"
            ) from None
    if "text" not in data.column_names:
        raise ValueError(f"dataset {spec!r} has no 'text' column (columns: {data.column_names})")
    rows = list(data["text"])
    wrong = next((row for row in rows if row is not None and not isinstance(row, str)), None)
    if wrong is not None:
        raise ValueError(f"dataset {spec!r}: the 'text' column must hold strings, got {wrong!r} ({type(wrong).__name__})")
    return rows


def _bundled_lines(name: str) -> list[str]:
    text = resources.files("lmgym").joinpath(f"data/{name}").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def load_prompts(spec: str = BUNDLED, split: str = "train", max_prompts: int | None = None) -> list[str]:
    """Cleaned, non-empty prompts of ``spec`` (see the module docstring), at most ``max_prompts``.

    Args:
        spec: ``"bundled"`` (the prompts shipped with lmgym), ``"stanfordnlp/imdb"`` (Hub) or a local
            ``.csv`` / ``.json`` / ``.jsonl`` / ``.parquet`` file with a ``text`` column.
        split: ``"train"``, ``"test"`` or ``"heldout"`` (the evaluation prompts).
        max_prompts: keep at most this many, or None for all.

    Returns:
        The prompts, cleaned and non-empty.

    Raises:
        FileNotFoundError: a local file does not exist.
        ValueError: an unknown ``spec`` or ``split``.
    """
    if spec == BUNDLED:
        rows = held_out_split(_bundled_lines("prompts.txt"), split)
        if split == HELD_OUT:
            rows += _bundled_lines("prompts_heldout.txt")
    elif spec in HF_IMDB:
        rows = _read_text_column("stanfordnlp/imdb", None, "test" if split == HELD_OUT else split, spec)
    elif Path(spec).suffix.lower() in _LOCAL_FORMATS:
        if not Path(spec).is_file():
            raise FileNotFoundError(f"prompt file {spec!r} does not exist")
        builder = _LOCAL_FORMATS[Path(spec).suffix.lower()]
        rows = held_out_split(_read_text_column(builder, spec, split, spec), split)
    else:
        raise ValueError(
            f"unknown prompt set {spec!r}: use 'bundled', 'stanfordnlp/imdb', or a local "
            f"{'/'.join(_LOCAL_FORMATS)} file with a 'text' column"
        )
    prompts = [text for text in map(clean, filter(None, rows)) if text]
    if max_prompts is not None:
        prompts = prompts[:max_prompts]
    if not prompts:
        raise ValueError(f"dataset {spec!r} (split {split!r}) is empty (no non-blank prompts)")
    return prompts
