"""References to the README from the docs, the configs and the code name what the README still holds.

The README is a short front door (tests/test_docs_blocks.py); tables and sections that moved to the
docs site must be referred to there. A reference like "the README's estimator table" or a docs
page linking to ../README.md for content fails here, so new stale references cannot creep in.
"""

from __future__ import annotations

import re

from tools.docs_blocks import ROOT

FILES = sorted(
    [*(ROOT / "docs").rglob("*.md"), *(ROOT / "configs").glob("*.yaml"), *(ROOT / "examples").glob("*.py")]
    + [p for folder in ("kl_estimators", "lmgym", "agents", "studies", "bench", "tools") for p in (ROOT / folder).rglob("*.py")]
)
STALE = re.compile(r"README's|the README\b(?!\.md)|\(\.\./README\.md\)|README\.md#", re.IGNORECASE)


def test_no_file_refers_to_content_of_the_readme():
    hits = [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m[0]!r}"
            for path in FILES for text in [path.read_text()] for m in STALE.finditer(text)]
    assert hits == []


def test_the_pattern_catches_the_old_references():
    for stale in ["the README's estimator table", 'see the README\'s "main job" section',
                  "The [estimator table](../README.md) says", "[x](../README.md#the-agent)"]:
        assert STALE.search(stale), stale
    for fine in ["policy/README.md, the model card", "README.md and every Markdown page"]:
        assert not STALE.search(fine), fine


_CODE_REFERENCE = re.compile(r"`((?:agents|lmgym|kl_estimators|studies)/[\w/]+\.py):(\w+)(?:\.(\w+))?`")


def code_references(text: str) -> list[tuple[str, str, str | None]]:
    """Every ```path.py:name``` or ```path.py:Class.method``` written in ``text``."""
    return [(m[1], m[2], m[3]) for m in _CODE_REFERENCE.finditer(text)]


def test_the_walkthrough_names_functions_that_exist():
    """docs/contributing.md's "One iteration, file by file" points at `file.py:function`: each
    file exists and defines that name (a move or a rename fails here)."""
    references = code_references((ROOT / "docs" / "contributing.md").read_text())
    assert len(references) >= 10
    missing = []
    for path, name, member in references:
        source = (ROOT / path).read_text() if (ROOT / path).is_file() else ""
        if not re.search(rf"^(?:class|def) {name}\b", source, re.MULTILINE):
            missing.append(f"{path}:{name}")
        elif member and not re.search(rf"^    def {member}\b", source, re.MULTILINE):
            missing.append(f"{path}:{name}.{member}")
    assert missing == []


def test_a_renamed_function_is_caught():
    assert code_references("see `agents/rollout/sampling.py:sample_episodes` and `agents/algorithm.py:PPOKL.train`") == [
        ("agents/rollout/sampling.py", "sample_episodes", None), ("agents/algorithm.py", "PPOKL", "train")]
