"""What a run owns in its directory (``--out``), recorded in the manifest ``--out/.ppokl-run.json``,
so that a run writes, replaces and deletes only what it created.

- A directory is a run's if it holds the manifest (or, written before the manifest existed, a
  checkpoint, or args.json and metrics.csv). A new run claims an absent or empty ``--out`` by writing the manifest
  first; a non-empty ``--out`` that is not a run is refused, and so is ``''`` (the current
  directory) or a path that cannot be a directory.
- The manifest lists the top-level run files the run created (``created``): a run file that is
  present but not listed (a user's ``metrics.csv`` in a run directory) is refused, never replaced.
- Every export records each file it wrote in ``policy/`` with its size and SHA-256 (``export``):
  the export is current only when every recorded file is present, a regular file and unchanged,
  and ``policy/`` holds nothing else; a file in ``policy/`` the export did not write is refused
  before it could be replaced with the folder.

Files in ``--out`` with other names (a user's notes) are never read, written or deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from agents.cli.atomic import atomic_write

MANIFEST = ".ppokl-run.json"
FORMAT = "ppokl-run/1"
# the top-level names a run writes (agents.run_dir); the lock and the manifest are its own too
RUN_NAMES = ("checkpoint.safetensors", "metrics.csv", "args.json", "policy", "sb3_logs", "curves.png")
_ALWAYS_OURS = (MANIFEST, ".lock")
FOLDERS = ("policy", "sb3_logs")


class OwnershipError(ValueError):
    """An ``--out`` that this run may not write into as it is."""


def check_out(value: str) -> Path:
    """``--out`` as a path, once it can be a run directory: not empty, no NUL byte, no component
    over the file system's name limit, not a file or a symlink to one; ``OwnershipError`` naming it."""
    if not value.strip():
        raise OwnershipError(f"--out {value!r} is empty: name a folder for the run")
    if "\0" in value:
        raise OwnershipError("--out contains a NUL byte")
    path = Path(value)
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            raise OwnershipError(f"--out {value[:60]}...: the component {part[:40]}... is longer than 255 bytes")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise OwnershipError(f"--out {value} is a symlink to nothing: remove it or name a folder") from None
        return path
    except OSError as error:
        raise OwnershipError(f"--out {value}: {error.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise OwnershipError(f"--out {value} is not a directory")
    return path


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The parsed manifest of ``out`` (None if absent); ``OwnershipError`` naming it if malformed."""
    path = out / MANIFEST
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        raise OwnershipError(f"{path} is not a regular file: remove it or choose another --out")
    if info.st_size > 1 << 20:
        raise OwnershipError(f"{path} is too large ({info.st_size} bytes) to be a run's manifest")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise OwnershipError(f"{path} is not valid JSON ({type(error).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise OwnershipError(f"{path} is not a run manifest of format {FORMAT!r}")
    created = data.get("created", [])
    if not isinstance(created, list) or not all(isinstance(n, str) and n in RUN_NAMES for n in created):
        raise OwnershipError(f"{path}: field 'created' must list run file names of {list(RUN_NAMES)}")
    export = data.get("export")
    if export is not None and not _valid_export(export):
        raise OwnershipError(f"{path}: field 'export' is malformed")
    return data


def _valid_export(export: Any) -> bool:
    if not isinstance(export, dict) or not isinstance(export.get("files"), dict):
        return False
    for name, entry in export["files"].items():
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            return False
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
            return False
    return all(isinstance(export.get(key), int) and not isinstance(export.get(key), bool) for key in ("iterations", "timesteps"))


def write_manifest(out: Path, data: dict[str, Any]) -> None:
    """Write the manifest atomically (a temporary beside it, renamed over it)."""
    atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True)))


def _legacy_run(out: Path) -> bool:
    """A run written before the manifest existed: its checkpoint (read and checked before anything
    is written), or its args.json and metrics.csv (stopped before its first checkpoint)."""
    return (out / "checkpoint.safetensors").is_file() or ((out / "args.json").is_file() and (out / "metrics.csv").is_file())


def is_run(out: Path) -> bool:
    """Whether ``out`` holds a run (its manifest, or a run from before manifests)."""
    return (out / MANIFEST).exists() or os.path.islink(out / MANIFEST) or _legacy_run(out)


def check_claimable(out: Path) -> None:
    """``OwnershipError`` unless ``out`` is absent, empty (a stale lock aside) or a run's directory
    whose run files are all its own. Changes nothing."""
    if not out.exists():
        return
    names = sorted(os.listdir(out))
    manifest = read_manifest(out)
    if manifest is None and not _legacy_run(out):
        foreign = [name for name in names if name not in _ALWAYS_OURS]
        if foreign:
            shown = ", ".join(repr(n) for n in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise OwnershipError(f"--out {out} is not empty and holds no run ({shown}): choose an empty or new folder")
        return
    created = set(manifest["created"]) if manifest is not None else set(RUN_NAMES)
    for name in RUN_NAMES:
        path = out / name
        if not os.path.lexists(path):
            continue
        if name not in created:
            raise OwnershipError(f"{path} was not written by the run in {out}: move it away (the run would replace it)")
        folder = name in FOLDERS
        if path.is_symlink() or path.is_dir() != folder:
            kind = "a folder" if folder else "a file"
            raise OwnershipError(f"{path} is not {kind} written by this run (a symlink, or {'a file' if folder else 'a folder'}): move it away")
    check_policy_owned(out, manifest)


def check_policy_owned(out: Path, manifest: dict[str, Any] | None) -> None:
    """``OwnershipError`` naming a file in ``policy/`` the last export did not write, or a
    ``policy`` that is not a real folder (a symlink), since the export replaces the folder."""
    policy = out / "policy"
    if not os.path.lexists(policy):
        return
    if policy.is_symlink() or not policy.is_dir():
        raise OwnershipError(f"{policy} is not a folder written by this run (a symlink or a file): move it away")
    export = (manifest or {}).get("export")
    if manifest is None:  # a run from before manifests: its export is what save_pretrained writes
        return
    recorded = set(export["files"]) if export else set()
    foreign = sorted(set(os.listdir(policy)) - recorded)
    if foreign:
        raise OwnershipError(
            f"{policy / foreign[0]} was not written by this run's export (the export replaces {policy}): move it out"
        )


def claim(out: Path) -> dict[str, Any]:
    """Record that the run in ``out`` owns its run files (after ``check_claimable``, under the
    lock): a new run's manifest lists every run name not present; an existing one is kept."""
    check_claimable(out)
    manifest = read_manifest(out)
    if manifest is None:
        manifest = {"format": FORMAT, "created": list(RUN_NAMES), "export": None}
        policy = out / "policy"
        if policy.is_dir() and not policy.is_symlink():  # a run from before manifests: its export is its own
            files = {p.name: {"size": -1, "sha256": ""} for p in policy.iterdir()}
            manifest["export"] = {"files": files, "iterations": -1, "timesteps": -1}  # owned, never current
        write_manifest(out, manifest)
    return manifest


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_folder(folder: Path) -> dict[str, dict[str, Any]]:
    """``{name: {size, sha256}}`` of every file of a freshly written export folder."""
    return {path.name: {"size": path.stat().st_size, "sha256": file_sha256(path)} for path in sorted(folder.iterdir()) if path.is_file()}


def record_export(out: Path, files: dict[str, dict[str, Any]], iterations: int, timesteps: int) -> None:
    """Record in the manifest what the export now in ``policy/`` holds."""
    manifest = read_manifest(out) or {"format": FORMAT, "created": list(RUN_NAMES)}
    manifest["export"] = {"files": files, "iterations": iterations, "timesteps": timesteps}
    write_manifest(out, manifest)


def export_is_current(out: Path, iterations: int, timesteps: int) -> bool:
    """Whether ``policy/`` is the complete export at these counts: every recorded file present,
    a regular file of its recorded size and SHA-256, and nothing else in the folder."""
    try:
        export = (read_manifest(out) or {}).get("export")
    except OwnershipError:
        return False
    policy = out / "policy"
    if not export or (export["iterations"], export["timesteps"]) != (iterations, timesteps):
        return False
    if policy.is_symlink() or not policy.is_dir() or set(os.listdir(policy)) != set(export["files"]):
        return False
    for name, entry in export["files"].items():
        path = policy / name
        try:
            info = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISREG(info.st_mode) or info.st_size != entry["size"] or file_sha256(path) != entry["sha256"]:
            return False
    return True
