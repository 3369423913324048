"""The files of a run directory (``--out``), each replaced atomically so that a crash at any
moment leaves the previous complete version: a temporary ``.NAME.*`` file beside it is written,
then renamed over it. Temporaries left by a killed run are removed when the next run starts.

A run holds an exclusive OS lock (``fcntl.flock``) on ``--out/.lock`` for its whole life; the OS
releases it when the process ends, however it ends. The exported ``policy/`` folder is replaced
in two renames (old aside, new in place); a run killed between them gets the old one back."""
from __future__ import annotations

import csv
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from stable_baselines3.common.logger import CSVOutputFormat, Logger, make_output_format

from agents.metrics import TOTAL_TIMESTEPS
from agents.state.training_state import save_ppokl

if TYPE_CHECKING:
    from agents.algorithm import PPOKL

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.csv"
ARGS = "args.json"
POLICY = "policy"  # the trained policy as a Hugging Face model folder
SB3_LOGS = "sb3_logs"
PROGRESS = "progress.csv"  # SB3's CSV log, inside SB3_LOGS
CURVES = "curves.png"
LOCK = ".lock"
MODEL_CARD = "README.md"  # inside POLICY
RUN_FILES = (CHECKPOINT, METRICS, ARGS)


class RunDirError(ValueError):
    """A run directory that cannot be used as it is: locked by another run, or a malformed file."""


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
    """Delete the ``.NAME.*`` temporaries of a killed run (checkpoints can be gigabytes), after
    putting back the previous ``policy/`` if a kill came between the two renames of an export."""
    restore_policy(out)
    stale = [
        path
        for folder in (out, out / SB3_LOGS)
        for name in (*RUN_FILES, POLICY, PROGRESS, CURVES)
        for path in folder.glob(f".{name}.*")
    ]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return stale


def save_checkpoint(model: PPOKL, out: Path, run: dict[str, object] | None = None) -> Path:
    """The model's training state (and the run's arguments ``run``) to ``out/checkpoint.safetensors``
    atomically; non-finite state raises ``NonFiniteStateError`` and leaves the previous checkpoint."""
    path = out / CHECKPOINT
    atomic_write(path, lambda tmp: save_ppokl(model, tmp, run))
    return path


def _policy_aside(out: Path) -> tuple[Path, Path]:
    return out / f".{POLICY}.new", out / f".{POLICY}.old"


def restore_policy(out: Path) -> None:
    """Undo a half-done export: the previous ``policy/`` back in place if the new one never arrived."""
    _, old = _policy_aside(out)
    if old.is_dir() and not (out / POLICY).exists():
        os.replace(old, out / POLICY)


def export_policy(model: PPOKL, tokenizer, out: Path, card: str | None = None) -> Path:
    """The policy's language model and its tokenizer as a Hugging Face folder ``out/policy``
    (``save_pretrained``: config + safetensors), loadable with ``from_pretrained``/``pipeline``,
    with ``card`` as its ``README.md``. The folder is complete before it replaces the old one."""
    target = out / POLICY
    new, old = _policy_aside(out)
    shutil.rmtree(new, ignore_errors=True)
    model.policy.lm.save_pretrained(new, safe_serialization=True)
    tokenizer.save_pretrained(new)
    if card is not None:
        (new / MODEL_CARD).write_text(card)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


class RunLock:
    """The open, locked ``--out/.lock``; ``close()`` removes the file, then releases the lock, so a
    run that ends (cleanly or with an error) leaves no ``.lock`` behind. A killed process leaves the
    file but not the lock (the OS releases it), which ``check_unlocked`` tells apart."""

    def __init__(self, handle: IO[str], path: Path) -> None:
        self.handle, self.path = handle, path

    def close(self) -> None:
        """Remove the lock file (while still holding the lock) and release it."""
        if not self.handle.closed:
            self.path.unlink(missing_ok=True)
            self.handle.close()


def lock_run_dir(out: Path) -> RunLock:
    """Hold an exclusive lock on ``out`` for the life of this process (keep the returned lock until
    the run ends, then ``close()`` it); ``RunDirError`` naming the holder's pid if another process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    handle = (out / LOCK).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirError(
            f"--out {out} is in use by another run (pid {holder}; lock {out / LOCK}): wait for it to end or choose another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return RunLock(handle, out / LOCK)


def check_unlocked(out: Path) -> None:
    """``RunDirError`` if another process holds ``out``'s lock (creates nothing)."""
    if (out / LOCK).is_file():
        lock_run_dir(out).close()


def read_rows(path: Path, first_column: str | None = None) -> list[dict[str, str]]:
    """The rows of a CSV file ([] if it does not exist); with ``first_column``, ``RunDirError``
    unless the header starts with it."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if first_column is not None and (reader.fieldnames or [None])[0] != first_column:
            raise RunDirError(f"{path} has no header starting with '{first_column}' (got {reader.fieldnames})")
        return list(reader)


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


def _column(rows: list[dict[str, str]], key: str, kind: type, path: Path) -> list:
    try:
        return [kind(row[key] or 0) for row in rows]
    except (KeyError, TypeError, ValueError):
        raise RunDirError(f"{path}: column '{key}' is missing or not a number in some row") from None


def check_run_files(out: Path, n_iterations: int) -> None:
    """``RunDirError`` naming the file unless metrics.csv (and progress.csv, if any) can continue
    a run resumed after ``n_iterations``: metrics.csv holds its rows up to that iteration, since it
    is written before the checkpoint. Nothing is changed."""
    metrics = out / METRICS
    if n_iterations:
        if not metrics.is_file():
            raise RunDirError(
                f"{metrics} is missing but the checkpoint is at iteration {n_iterations}: restore it, or start a new --out"
            )
        iterations = _column(read_rows(metrics, "iteration"), "iteration", int, metrics)
        if n_iterations not in iterations:
            raise RunDirError(f"{metrics} has no row for iteration {n_iterations}, where the checkpoint is: restore it, or start a new --out")
    progress = out / SB3_LOGS / PROGRESS
    _column(read_rows(progress), TOTAL_TIMESTEPS, float, progress)


def rewind(out: Path, n_iterations: int, num_timesteps: int) -> None:
    """Drop the rows of metrics.csv and SB3's progress.csv written after the state being resumed
    (``n_iterations`` = ``num_timesteps`` = 0 for a run restarted from scratch). Call
    ``check_run_files`` first."""
    metrics = [row for row in read_rows(out / METRICS) if n_iterations and int(row["iteration"]) <= n_iterations]
    if (out / METRICS).exists():
        write_rows(out / METRICS, metrics)
    progress = out / SB3_LOGS / PROGRESS
    if progress.exists():
        kept = [row for row in read_rows(progress) if float(row.get(TOTAL_TIMESTEPS) or 0) <= num_timesteps]
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
