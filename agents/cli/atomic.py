"""Atomic replacement of one file: ``atomic_write`` writes a temporary beside it, then renames it
over it, so that a crash at any moment leaves the previous complete version. Its temporaries are
named ``.NAME.tmp-XXXXXXXX[SUFFIX]`` (``is_temporary`` tells them from any other file)."""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

TEMPORARY_MARK = ".tmp-"  # in every temporary's name: .NAME.tmp-XXXXXXXX[SUFFIX]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMPORARY_MARK}", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_temporary(name: str, of: str) -> bool:
    """Whether ``name`` is a temporary ``atomic_write`` makes for the file ``of`` (mkstemp's 8
    characters between the mark and the suffix), and nothing else (a user's ``.metrics.csv.backup``)."""
    suffix = Path(of).suffix
    return re.fullmatch(re.escape(f".{of}{TEMPORARY_MARK}") + r"[a-z0-9_]{8}" + re.escape(suffix), name) is not None
