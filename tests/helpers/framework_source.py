"""Load single functions, or blocks of statements, from the source-only frameworks' installed files.

verl, OpenRLHF, SkyRL, AReaL, Unsloth Zoo, Liger-Kernel and oat cannot be installed whole next to the
locked set (``import verl`` pulls in Ray, ``openrlhf.models`` DeepSpeed and flash-attn; the others pin
other torch / transformers / trl versions or need triton), so dev.sh installs them with
``--no-deps --target .venv/frameworks`` (off sys.path: some wheels also ship a top-level ``tests``
package). The tests read the installed file and execute the named top-level definitions (functions,
classes, constants) or the quoted statements from it verbatim with torch in scope: the framework's own
code at the locked version, nothing stubbed or rewritten. A module that imports with torch alone
(Liger-Kernel's chunked losses) is imported from there with ``import_installed``.
"""

from __future__ import annotations

import ast
import importlib
import math
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import pytest
import torch

FRAMEWORKS = Path(os.environ.get("KL_FRAMEWORKS_DIR", Path(__file__).resolve().parents[2] / ".venv" / "frameworks"))


def installed_file(relative: str) -> Path:
    """The installed file (skip the test when the framework is not installed there)."""
    path = FRAMEWORKS / relative
    if not path.is_file():
        pytest.skip(f"{relative} not installed under {FRAMEWORKS} (./dev.sh setup installs it)")
    return path


def installed_version(package: str) -> str:
    """The version of ``package`` installed under FRAMEWORKS, from its dist-info folder name."""
    found = sorted(FRAMEWORKS.glob(f"{package}-*.dist-info"))
    if not found:
        pytest.skip(f"{package} not installed under {FRAMEWORKS}")
    return found[0].name[len(package) + 1 : -len(".dist-info")]


def load(relative: str, names: tuple[str, ...], namespace: dict[str, Any] | None = None) -> dict[str, Any]:
    """Execute the top-level definitions ``names`` of the installed file; return the namespace."""
    tree = ast.parse(installed_file(relative).read_text())
    wanted = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
            wanted.append(node)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) in names for t in node.targets):
            wanted.append(node)
    found = {getattr(n, "name", None) or n.targets[0].id for n in wanted}
    missing = set(names) - found
    assert not missing, f"{relative} no longer defines {sorted(missing)}: the framework map is stale"
    scope = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional, "math": math, "Optional": Optional,
             "Tuple": Tuple, "Union": Union, "Any": Any, **(namespace or {})}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(FRAMEWORKS / relative), "exec"), scope)
    return scope


def run_block(relative: str, first: str, lines: int, namespace: dict[str, Any]) -> dict[str, Any]:
    """Execute ``lines`` consecutive source lines of the installed file, verbatim (dedented), in
    ``namespace`` with torch in scope; return the namespace. The block starts where the file's lines,
    stripped, read ``first`` (one line, or several joined by newlines where one is not unique)."""
    source = installed_file(relative).read_text().splitlines()
    head = first.split("\n")
    starts = [i for i in range(len(source)) if [line.strip() for line in source[i : i + len(head)]] == head]
    assert len(starts) == 1, f"{relative}: {first!r} found {len(starts)} times: the framework map is stale"
    block = textwrap.dedent("\n".join(source[starts[0] : starts[0] + lines]))
    scope = {"torch": torch, "math": math, **namespace}
    exec(compile(block, str(FRAMEWORKS / relative), "exec"), scope)
    return scope


def import_installed(module: str):
    """Import ``module`` from FRAMEWORKS (for a package that imports with torch alone); FRAMEWORKS is on
    sys.path only during the import (its top-level ``tests`` would shadow this project's)."""
    top = module.split(".")[0]
    if not (FRAMEWORKS / top).is_dir():
        pytest.skip(f"{top} not installed under {FRAMEWORKS} (./dev.sh setup installs it)")
    sys.path.append(str(FRAMEWORKS))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(FRAMEWORKS))
