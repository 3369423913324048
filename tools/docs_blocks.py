"""Generated blocks in the Markdown docs, so tables and examples that come from code cannot drift.

Two kinds of block, each between an opening and a closing HTML comment (invisible when rendered):

    <!-- generated: package.module:function -->
    ...the string that ``function()`` returns...
    <!-- end generated -->

    <!-- file: path/from/the/repo/root.py -->
    ```python
    ...the file, verbatim...
    ```
    <!-- end file -->

``python -m tools.docs_blocks`` rewrites every block in README.md and docs/**/*.md from its source;
``--check`` only reports the stale ones (exit 1). ``tests/test_docs_blocks.py`` runs the check.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Markers start a line; a block's body never crosses another marker, so an empty or unclosed block cannot swallow the next.
_BODY = r"((?:(?!<!-- (?:generated:|end generated|file:|end file))[\s\S])*?)"
GENERATED = re.compile(r"(?m)(^<!-- generated: ([\w.]+):(\w+) -->\n)" + _BODY + r"(<!-- end generated -->)")
FILE = re.compile(r"(?m)(^<!-- file: ([\w./-]+) -->\n```(\w*)\n)" + _BODY + r"(```\n<!-- end file -->)")
OPENINGS = re.compile(r"(?m)^<!-- (?:generated|file): ")


def markdown_files(root: Path | None = None) -> list[Path]:
    """README.md and every Markdown page under docs/."""
    root = root or ROOT
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def _generated(module: str, function: str) -> str:
    return getattr(importlib.import_module(module), function)()


def _file(path: str, root: Path) -> str:
    return (root / path).read_text()


def render(text: str, root: Path | None = None) -> str:
    """``text`` with every block replaced by what its source gives now."""
    root = root or ROOT
    blocks = len(GENERATED.findall(text)) + len(FILE.findall(text))
    if blocks != len(OPENINGS.findall(text)):
        raise ValueError("a generated or file block is not closed by its end marker")
    text = GENERATED.sub(lambda m: m[1] + _generated(m[2], m[3]) + "\n" + m[5], text)
    return FILE.sub(lambda m: m[1] + _file(m[2], root) + m[5], text)


def sources(text: str) -> Iterator[str]:
    """The source each block in ``text`` names (``module:function`` or a file path)."""
    for m in GENERATED.finditer(text):
        yield f"{m[2]}:{m[3]}"
    for m in FILE.finditer(text):
        yield m[2]


def stale(root: Path | None = None) -> list[Path]:
    """The Markdown files whose blocks differ from their sources."""
    root = root or ROOT
    return [path for path in markdown_files(root) if render(path.read_text(), root) != path.read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale files, change nothing")
    args = parser.parse_args(argv)
    outdated = stale()
    if args.check:
        for path in outdated:
            print(f"{path.relative_to(ROOT)}: stale; run python -m tools.docs_blocks", file=sys.stderr)
        return 1 if outdated else 0
    for path in outdated:
        path.write_text(render(path.read_text(), ROOT))
        print(f"rewrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
