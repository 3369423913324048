"""The contract of every study command line (``python -m studies.tabular``, ``studies.moments``,
``studies.lm_variance``, ...): flags checked against their domains (finite numbers, ranges),
``--out`` checked to be usable as a folder, the folder locked while results are written, result
files read so that a bad one is named, and every user-caused error one line with exit 2
(Ctrl-C: one line, exit 130).

The lock is an exclusive ``flock`` on the folder itself (no file is created in it); a second
study writing into the same folder is refused with one line.
"""
from __future__ import annotations

import argparse
import csv
import fcntl
import json
import math
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def number_list(kind: type, name: str, low: float | None = None, open_low: bool = False) -> Callable[[str], list]:
    """An argparse type: comma-separated ``kind`` values, each finite and >= ``low`` (> with
    ``open_low``); ``argparse.ArgumentTypeError`` naming the flag otherwise."""

    def parse(text: str) -> list:
        try:
            values = [kind(item) for item in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected comma-separated {kind.__name__} values, got {text!r}") from None
        for value in values:
            check_number(name, value, low, open_low, error=argparse.ArgumentTypeError)
        return values

    return parse


def number(kind: type, name: str, low: float | None = None, open_low: bool = False) -> Callable[[str], Any]:
    """An argparse type: one ``kind`` value, finite and >= ``low`` (> with ``open_low``)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a {kind.__name__}, got {text!r}") from None
        check_number(name, value, low, open_low, error=argparse.ArgumentTypeError)
        return value

    return parse


def check_number(name: str, value: float, low: float | None, open_low: bool, error: type[Exception] = ValueError) -> None:
    """``error`` naming ``name`` unless ``value`` is finite and in range."""
    if not math.isfinite(value):
        raise error(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if open_low else value < low):
        raise error(f"{name} must be {'>' if open_low else '>='} {low:g}, got {value}")


def check_out(path: Path, flag: str = "--out") -> Path:
    """``ValueError`` unless ``path`` is non-empty and, where it exists, a folder (so is every
    existing parent)."""
    if not str(path).strip() or str(path) == ".":
        raise ValueError(f"{flag} must name a folder, got {str(path)!r}")
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            raise ValueError(f"{flag}: a component of {str(path)[:60]}... is longer than 255 bytes")
    for folder in (path, *path.parents):
        try:
            info = os.stat(folder)
        except FileNotFoundError:
            continue
        except OSError as error:  # NotADirectoryError: a file on the way
            raise ValueError(f"{flag} {path}: {error.strerror}") from None
        if not stat.S_ISDIR(info.st_mode):
            raise ValueError(f"{flag} {path}: {folder} is not a folder")
        break
    return path


class FolderLock:
    """An exclusive ``flock`` on a folder (created if missing) for as long as it is held."""

    def __init__(self, folder: Path, flag: str = "--out"):
        folder.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ValueError(f"{flag} {folder} is in use by another study: wait for it to end or choose another {flag}") from None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


def read_json(path: Path) -> Any:
    """A result file's JSON; ``ValueError`` naming ``path`` if it is not a regular file or not
    valid UTF-8 JSON (truncated, nested too deeply, ...)."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise ValueError(f"{path}: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{path} is not a valid result file ({type(error).__name__}): delete it to recompute it") from None


def run_cli(body: Callable[[], int]) -> int:
    """``body()``'s exit code, with every user-caused error printed as one line (exit 2) and
    Ctrl-C as one line (exit 130)."""
    try:
        return body()
    except KeyboardInterrupt:
        print("interrupted: finished cells are kept; rerun the same command to continue", file=sys.stderr)
        return 130
    except (OSError, ValueError, csv.Error) as error:
        print(f"error: {' '.join(str(error).split())}"[:2000], file=sys.stderr)
        return 2
    except (KeyError, TypeError, IndexError) as error:
        print(f"error: a result file is malformed ({type(error).__name__}: {error}): delete it to recompute it", file=sys.stderr)
        return 2
    except RecursionError:
        print("error: a file read is nested too deeply", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory: choose smaller sizes", file=sys.stderr)
        return 2
