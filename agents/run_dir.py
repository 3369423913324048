"""The files of a run directory (``--out``), each replaced atomically so that a crash at any
moment leaves the previous complete version: a temporary ``.NAME.*`` file beside it is written,
then renamed over it. Temporaries left by a killed run are removed when the next run starts."""
from __future__ import annotations

import csv
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from stable_baselines3.common.logger import CSVOutputFormat, Logger, make_output_format

if TYPE_CHECKING:
    from agents.algorithm import PPOKL

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.csv"
ARGS = "args.json"
POLICY = "policy"  # the trained policy as a Hugging Face model folder
SB3_LOGS = "sb3_logs"
PROGRESS = "progress.csv"  # SB3's CSV log, inside SB3_LOGS
RUN_FILES = (CHECKPOINT, METRICS, ARGS)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the ``.NAME.*`` temporaries of a killed run (checkpoints can be gigabytes)."""
    stale = [
        path
        for folder in (out, out / SB3_LOGS)
        for name in (*RUN_FILES, POLICY, PROGRESS)
        for path in folder.glob(f".{name}.*")
    ]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return stale


def save_checkpoint(model: PPOKL, out: Path) -> Path:
    """``model.save`` to ``out/checkpoint.safetensors`` atomically."""
    path = out / CHECKPOINT
    atomic_write(path, lambda tmp: model.save(tmp))
    return path


def export_policy(model: PPOKL, tokenizer, out: Path) -> Path:
    """The policy's language model and its tokenizer as a Hugging Face folder ``out/policy``
    (``save_pretrained``: config + safetensors), loadable with ``from_pretrained``/``pipeline``."""
    target = out / POLICY
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{POLICY}."))
    old = tmp.with_name(tmp.name + "-old")
    try:
        model.policy.lm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict[str, object]]) -> None:
    """Rewrite the whole CSV atomically (columns: the union of all rows' keys, first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def rewind(out: Path, n_iterations: int, num_timesteps: int) -> None:
    """Drop the rows of metrics.csv and SB3's progress.csv written after the state being resumed
    (``n_iterations`` = ``num_timesteps`` = 0 for a run restarted from scratch)."""
    metrics = [row for row in read_rows(out / METRICS) if n_iterations and int(row["iteration"]) <= n_iterations]
    if (out / METRICS).exists():
        write_rows(out / METRICS, metrics)
    progress = out / SB3_LOGS / PROGRESS
    if progress.exists():
        kept = [row for row in read_rows(progress) if float(row.get("time/total_timesteps") or 0) <= num_timesteps]
        if kept:
            write_rows(progress, kept)
        else:
            progress.unlink()


class _ContinuedCSVOutputFormat(CSVOutputFormat):
    """SB3's CSV writer, appending to an existing file (whose header it keeps) instead of truncating it."""

    def __init__(self, filename: str):  # noqa: D107 (SB3's __init__ would truncate the file)
        path = Path(filename)
        path.touch()
        self.file = path.open("r+")
        header = self.file.readline().rstrip("\r\n")
        self.keys = header.split(",") if header else []
        self.separator = ","
        self.quotechar = '"'
        self.file.seek(0, os.SEEK_END)


def make_logger(out: Path) -> Logger:
    """SB3's logger for ``out/sb3_logs``: progress.csv (continued on resume) and TensorBoard."""
    folder = out / SB3_LOGS
    folder.mkdir(parents=True, exist_ok=True)
    return Logger(str(folder), [_ContinuedCSVOutputFormat(str(folder / PROGRESS)), make_output_format("tensorboard", str(folder))])
