"""The checkpoint format module knows nothing of the algorithm: ``agents.state.checkpoint`` imports no
other ``agents`` module (it used to import ``PPOKL``, which imports it back)."""
from __future__ import annotations

import ast
from pathlib import Path

import agents.state.checkpoint


def test_checkpoint_format_imports_nothing_from_agents():
    tree = ast.parse(Path(agents.state.checkpoint.__file__).read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name and name.split(".")[0] == "agents"]
