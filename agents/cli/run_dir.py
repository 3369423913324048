"""The files of a run directory (``--out``), each replaced atomically so that a crash at any
moment leaves the previous complete version: a temporary ``.NAME.tmp-XXXXXXXX`` file beside it is
written, then renamed over it. Temporaries left by a killed run are removed when the next run
starts (those names only: what the run owns is in ``agents.ownership``).

A run holds an exclusive OS lock (``fcntl.flock``) on ``--out`` and ``--out/.lock`` for its whole
life; the OS releases it when the process ends, however it ends. The exported ``policy/`` folder is replaced
in two renames (old aside, new in place); a run killed between them gets the old one back."""
from __future__ import annotations

import csv
import contextlib
import errno
import fcntl
import os
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError
from stable_baselines3.common.logger import CSVOutputFormat, Logger, make_output_format

from agents.metrics import TOTAL_TIMESTEPS
from agents.cli.atomic import atomic_write, is_temporary
from agents.cli.ownership import MANIFEST, check_policy_owned, describe_folder, read_manifest, record_export
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


def _remove(path: Path) -> None:
    """Remove a file, a symlink (not what it points to) or a folder."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the temporaries of a killed run (checkpoints can be gigabytes): only the names this
    module makes, whatever they now are; first put back the previous ``policy/`` if a kill came
    between the two renames of an export."""
    restore_policy(out)
    names = (*RUN_FILES, POLICY, PROGRESS, CURVES, MANIFEST)
    stale = [
        folder / entry
        for folder in (out, out / SB3_LOGS)
        if folder.is_dir() and not folder.is_symlink()
        for entry in os.listdir(folder)
        if any(is_temporary(entry, name) for name in names)
    ]
    stale.extend(path for path in _policy_aside(out) if os.path.lexists(path))
    for path in stale:
        _remove(path)
    return stale


def save_checkpoint(model: PPOKL, out: Path, run: dict[str, object] | None = None) -> Path:
    """The model's training state (and the run's arguments ``run``) to ``out/checkpoint.safetensors``
    atomically; non-finite state raises ``NonFiniteStateError`` and leaves the previous checkpoint."""
    path = out / CHECKPOINT
    try:
        atomic_write(path, lambda tmp: save_ppokl(model, tmp, run))
    except SafetensorError as error:  # safetensors reports a failed write (a full disk) as its own error
        raise OSError(errno.EIO, f"writing the checkpoint failed ({' '.join(str(error).split())}); the previous one is kept", str(path)) from None
    return path


def _policy_aside(out: Path) -> tuple[Path, Path]:
    return out / f".{POLICY}.new", out / f".{POLICY}.old"


def restore_policy(out: Path) -> None:
    """Undo a half-done export: the previous ``policy/`` back in place if the new one never arrived."""
    _, old = _policy_aside(out)
    if old.is_dir() and not old.is_symlink() and not os.path.lexists(out / POLICY):
        os.replace(old, out / POLICY)


def export_policy(model: PPOKL, tokenizer, out: Path, card: str | None = None) -> Path:
    """The policy's language model and its tokenizer as a Hugging Face folder ``out/policy``
    (``save_pretrained``: config + safetensors), loadable with ``from_pretrained``/``pipeline``,
    with ``card`` as its ``README.md``. The folder is complete before it replaces the old one,
    and each file written is recorded (``agents.ownership``); a file in ``policy/`` that no export
    wrote is refused, not replaced."""
    target = out / POLICY
    new, old = _policy_aside(out)
    check_policy_owned(out, read_manifest(out))
    for path in (new, old):
        if os.path.lexists(path):
            _remove(path)
    try:
        model.policy.lm.save_pretrained(new, safe_serialization=True)
        tokenizer.save_pretrained(new)
        if card is not None:
            (new / MODEL_CARD).write_text(card)
        files = describe_folder(new)
        if os.path.lexists(target):
            os.replace(target, old)
        os.replace(new, target)
    except BaseException:
        if os.path.lexists(new):
            _remove(new)
        restore_policy(out)
        raise
    if os.path.lexists(old):
        _remove(old)
    record_export(out, files, int(model.n_iterations), int(model.num_timesteps))
    return target


class RunLock:
    """The exclusive lock of a run directory: ``flock`` on the directory itself and on its
    ``.lock`` file (which holds the pid). ``close()`` removes ``.lock`` while both are still held,
    then releases them, so a run that ends (cleanly or with an error) leaves no ``.lock`` behind; a
    killed process leaves the file but not the lock (the OS releases it)."""

    def __init__(self, dir_fd: int, lock_fd: int, path: Path):
        self._fds = [dir_fd, lock_fd]
        self.path = path

    def close(self) -> None:
        """Remove the lock file (the directory's lock still keeps other runs out), then release both locks."""
        if self._fds:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _holder(out: Path) -> str:
    """The pid in ``out/.lock``, read without following a symlink or blocking on a FIFO."""
    try:
        fd = os.open(out / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return "unknown"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "unknown"
        return os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
    finally:
        os.close(fd)


def lock_run_dir(out: Path) -> RunLock:
    """Hold an exclusive lock on ``out`` for the life of this process (keep the returned lock
    open); ``RunDirError`` naming the holder's pid if another process holds it. The directory
    itself is locked (deleting ``.lock`` cannot let a second run in); ``.lock`` is opened without
    following a symlink, must be a regular file, and must still be the file on disk once locked."""
    out.mkdir(parents=True, exist_ok=True)
    busy = f"--out {out} is in use by another run (pid {{}}; lock {out / LOCK}): wait for it to end or choose another --out"
    dir_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(dir_fd)
        raise RunDirError(busy.format(_holder(out))) from None
    try:
        try:
            lock_fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise RunDirError(f"{out / LOCK} is a symlink: remove it (the lock is never written through a link)") from None
            raise
        try:
            opened = os.fstat(lock_fd)
            if not stat.S_ISREG(opened.st_mode):
                raise RunDirError(f"{out / LOCK} is not a regular file: remove it")
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirError(busy.format(_holder(out))) from None
            on_disk = os.stat(out / LOCK, follow_symlinks=False)
            if (on_disk.st_dev, on_disk.st_ino) != (opened.st_dev, opened.st_ino):
                raise RunDirError(f"{out / LOCK} was replaced while it was being locked (another run?): start again")
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(lock_fd)
            raise
    except BaseException:
        os.close(dir_fd)
        raise
    return RunLock(dir_fd, lock_fd, out / LOCK)


def check_unlocked(out: Path) -> None:
    """``RunDirError`` if another process holds ``out``'s lock (creates nothing)."""
    try:
        dir_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunDirError(
            f"--out {out} is in use by another run (pid {_holder(out)}; lock {out / LOCK}): wait for it to end or choose another --out"
        ) from None
    finally:
        os.close(dir_fd)


def read_rows(path: Path, first_column: str | None = None) -> list[dict[str, str]]:
    """The rows of a CSV file ([] if it does not exist); with ``first_column``, ``RunDirError``
    unless the header starts with it."""
    if not os.path.lexists(path):
        return []
    check_regular_file(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if first_column is not None and (reader.fieldnames or [None])[0] != first_column:
                raise RunDirError(f"{path} has no header starting with '{first_column}' (got {str(reader.fieldnames)[:200]})")
            return list(reader)
    except csv.Error as error:
        raise RunDirError(f"{path} is not a readable CSV file ({error})") from None
    except UnicodeDecodeError:
        raise RunDirError(f"{path} is not UTF-8 text") from None


def check_regular_file(path: Path) -> None:
    """``RunDirError`` naming ``path`` unless it is a regular file (not a FIFO, a device, a folder
    or a symlink to one), checked before it is opened, so that reading never blocks."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing (a dangling symlink?)") from None
    if not stat.S_ISREG(info.st_mode):
        raise RunDirError(f"{path} is not a regular file: replace it by the run's file or start a new --out")


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
