"""Every Python block of README.md and docs/ runs as written (tools/docs_snippets.py): the complete and
continued ones run offline on the embedded defaults, one fresh interpreter per page, and any
exception (a NameError from a missing import or an undefined input included) fails the test."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tools import docs_snippets
from tools.docs_blocks import ROOT

SNIPPETS = docs_snippets.all_snippets()
PAGES = sorted({s.path for s in SNIPPETS if s.kind in ("complete", "continued")})
# Pages whose blocks load the embedded SmolLM2-135M (slow): marked smoke, like the other tests that load it.
_EMBEDDED = ("gym.make", "PPOKL", "KLGRPOTrainer", "embedded_model_dir")


def _run(page: list[docs_snippets.Snippet], cwd, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-c", docs_snippets.runner_source(page)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _page_param(path):
    code = "".join(s.code for s in SNIPPETS if s.path == path)
    marks = [pytest.mark.smoke] if any(name in code for name in _EMBEDDED) else []
    return pytest.param(path, id=str(path.relative_to(ROOT)), marks=marks)


@pytest.mark.parametrize("path", [_page_param(p) for p in PAGES])
def test_every_complete_block_of_the_page_runs_as_written(path, tmp_path):
    page = [s for s in SNIPPETS if s.path == path]
    result = _run(page, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]


def test_the_docs_have_runnable_blocks_and_few_fragments():
    kinds = [s.kind for s in SNIPPETS]
    assert kinds.count("complete") >= 8
    fragments = [s.where for s in SNIPPETS if s.kind == "fragment"]
    assert len(fragments) <= 3, fragments


def test_every_file_block_names_a_file_that_a_test_runs():
    tests = "".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    for snippet in SNIPPETS:
        if snippet.kind == "file":
            listed = [p for p in docs_snippets.FILE.findall(snippet.path.read_text())]
            assert listed and all(p[1].rsplit("/", 1)[-1] in tests for p in listed), snippet.where


def test_a_block_with_an_undefined_name_fails_and_a_continued_block_shares_the_namespace(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n```\n\ntext\n<!-- continues -->\n```python\nassert x == 1\n```\n"
                    "<!-- fragment: uses the reader's model -->\n```python\nmodel.train()\n```\n"
                    "```python\nprint(x)\n```\n")
    found = docs_snippets.snippets(page)
    assert [s.kind for s in found] == ["complete", "continued", "fragment", "complete"]
    assert [s.line for s in found] == [2, 8, 12, 15]
    ok, name_error = found[:2], found
    assert _run(ok, tmp_path, timeout=60).returncode == 0
    result = _run(name_error, tmp_path, timeout=60)
    assert result.returncode == 1 and "NameError" in result.stderr and "page.md:15" in result.stderr


def test_a_continued_block_needs_a_block_before_it(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- continues -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="no complete block before it"):
        docs_snippets.snippets(page)
