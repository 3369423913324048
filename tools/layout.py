"""The repository's layout as Markdown, generated from the tree: one row per package and module of
ours with the first sentence of its docstring, so the layout in docs/contributing.md cannot go stale.

Used in docs/contributing.md through ``<!-- generated: tools.layout:layout -->`` (see
tools/docs_blocks.py); the modules are read with ``ast`` (nothing is imported).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kl_estimators", "lmgym", "agents", "studies", "bench", "tools", "examples", "tests/helpers")


def first_sentence(path: Path) -> str:
    """The first sentence of ``path``'s module docstring, on one line (empty if it has none)."""
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    paragraph = " ".join(docstring.split("\n\n")[0].split())
    match = re.match(r"(.+?\.)(\s+[A-Z(`]|$)", paragraph)
    return (match.group(1) if match else paragraph).replace("|", "\\|")


def _rows(folder: Path) -> list[str]:
    rows = []
    for path in sorted(folder.glob("*.py"), key=lambda p: (p.name != "__init__.py", p.name)):
        name = f"`{folder.relative_to(ROOT)}/`" if path.name == "__init__.py" else f"`{path.relative_to(ROOT)}`"
        rows.append(f"| {name} | {first_sentence(path)} |")
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").is_file()):
        rows.extend(_rows(sub))
    return rows


def layout() -> str:
    """A Markdown table of every package and module under ``PACKAGES``, in tree order."""
    rows = ["| path | what it is (its docstring's first sentence) |", "|---|---|"]
    for package in PACKAGES:
        rows.extend(_rows(ROOT / package))
    return "\n".join(rows)
