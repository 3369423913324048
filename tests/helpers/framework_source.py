"""Load single functions from verl's and OpenRLHF's installed source files, without importing the package.

verl 0.9.1 and OpenRLHF 0.11.2 cannot be imported on a CPU machine without their heavy dependencies
(``import verl`` pulls in Ray; ``openrlhf.models`` imports DeepSpeed and flash-attn), so dev.sh
installs them with ``--no-deps --target .venv/frameworks`` (off sys.path: their wheels also ship a
top-level ``tests`` package). The tests read the installed file, and execute the named top-level
definitions (functions, classes, constants) from it verbatim with torch in scope: the framework's own
code at the locked version, nothing stubbed or rewritten.
"""

from __future__ import annotations

import ast
import math
import os
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import pytest
import torch

FRAMEWORKS = Path(os.environ.get("KL_FRAMEWORKS_DIR", Path(__file__).resolve().parents[1] / ".venv" / "frameworks"))


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
