"""The Python blocks of README.md and docs/**/*.md, so that a test can run every complete one as written.

A ```` ```python ```` block is one of:

- **complete**: it runs on its own, copied verbatim into a fresh interpreter (the default);
- **continued**: preceded by ``<!-- continues -->``, it runs after the complete block before it, in
  the same namespace (the page says so in words, e.g. "continuing the example above");
- **fragment**: preceded by ``<!-- fragment: why -->``, it shows lines that need the reader's own
  objects (the page says which); it is never run;
- **file**: the body of a ``<!-- file: path -->`` block (tools/docs_blocks.py), a verbatim copy of a
  file that its own test runs.

``python -m tools.docs_snippets`` lists them; ``tests/test_docs_snippets.py`` runs the complete and
continued ones offline (one subprocess per page, in a temporary folder) and fails on any exception,
a ``NameError`` included.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
from pathlib import Path

from tools.docs_blocks import FILE, ROOT, markdown_files

KINDS = ("complete", "continued", "fragment", "file")
_BLOCK = re.compile(r"(?m)^( *)```python[^\n]*\n([\s\S]*?)^\1```[ \t]*$")  # also indented (admonitions)
_MARKER = re.compile(r"<!-- (continues|fragment: [^>]*[^ >]) -->\s*$")


@dataclasses.dataclass(frozen=True)
class Snippet:
    """One ```` ```python ```` block of a Markdown page."""

    path: Path  # the page
    line: int  # the line of the block's first code line, 1-based
    kind: str  # one of KINDS
    code: str

    @property
    def where(self) -> str:
        """``page:line``, relative to the repository root."""
        return f"{_shown(self.path)}:{self.line}"


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def snippets(path: Path) -> list[Snippet]:
    """Every Python block of the page ``path``, in page order, with its kind.

    Raises:
        ValueError: a ``<!-- continues -->`` block has no complete block before it on its page.
    """
    text = path.read_text()
    files = [(m.start(), m.end()) for m in FILE.finditer(text)]
    found: list[Snippet] = []
    for match in _BLOCK.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        if any(start <= match.start() < end for start, end in files):
            kind = "file"
        elif marker is None:
            kind = "complete"
        else:
            kind = "continued" if marker[1] == "continues" else "fragment"
        line = text.count("\n", 0, match.start(2)) + 1
        if kind == "continued" and not any(s.kind in ("complete", "continued") for s in found):
            raise ValueError(f"{_shown(path)}:{line}: <!-- continues --> with no complete block before it")
        found.append(Snippet(path, line, kind, textwrap.dedent(match[2])))
    return found


def all_snippets(root: Path | None = None) -> list[Snippet]:
    """The Python blocks of README.md and every page under docs/."""
    return [snippet for path in markdown_files(root) for snippet in snippets(path)]


def runner_source(page: list[Snippet]) -> str:
    """A script that runs a page's complete and continued blocks in order and reports each one's time.

    A complete block starts a fresh namespace; a continued block runs in the previous block's.
    The script exits non-zero at the first block that raises, naming it (``page:line``).
    """
    blocks = [(s.where, s.kind, s.code) for s in page if s.kind in ("complete", "continued")]
    return (
        "import sys, time, traceback\n"
        f"blocks = {blocks!r}\n"
        "namespace = {}\n"
        "for where, kind, code in blocks:\n"
        "    if kind == 'complete':\n"
        "        namespace = {'__name__': '__main__'}\n"
        "    start = time.perf_counter()\n"
        "    try:\n"
        "        exec(compile(code, where, 'exec'), namespace)\n"
        "    except BaseException:\n"
        "        print(f'FAILED {where}', file=sys.stderr)\n"
        "        traceback.print_exc()\n"
        "        sys.exit(1)\n"
        "    print(f'ran {where} in {time.perf_counter() - start:.1f} s', file=sys.stderr)\n"
    )


def main() -> int:
    for snippet in all_snippets():
        print(f"{snippet.where}: {snippet.kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
