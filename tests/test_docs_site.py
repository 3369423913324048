"""The documentation site builds with ``mkdocs build --strict`` (a broken link, anchor or API
reference fails it), and tools/mkdocs_hooks.py brings results/ into the site and keeps links into
the rest of the repository from breaking it. Skipped where the docs extra is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("mkdocs")


def _build(project: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=project, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def test_the_site_builds_strictly_with_every_page(tmp_path):
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    result = _build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-4000:]
    site = tmp_path / "site"
    pages = {page: (site / page / "index.html").read_text() for page in
             ("getting-started", "kl-estimators", "frameworks", "ppokl", "results", "api/kl_estimators", "api/agents")}
    assert "analytic-future-is" in pages["kl-estimators"] and "TinyLM" in pages["kl-estimators"]  # table, example
    assert "--analytic-grad" in pages["ppokl"] and "--lora-rank" in pages["ppokl"]  # the generated CLI reference
    assert "per_token_kl_loss" in pages["api/kl_estimators"] and "PPOKL" in pages["api/agents"]
    assert (site / "results" / "lm" / "pareto_kl.png").is_file() and 'src="lm/pareto_kl.png"' in pages["results"]  # results/ page, results/lm/ plot
    assert "fonts.googleapis.com" not in (site / "index.html").read_text()  # offline: no CDN fonts


def _tiny_project(root: Path, page: str) -> Path:
    """A site of one page whose repository has results/plot.png and src/code.py beside docs/."""
    (root / "docs").mkdir(parents=True)
    (root / "results").mkdir()
    (root / "results" / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / "src").mkdir()
    (root / "src" / "code.py").write_text("x = 1\n")
    (root / "docs" / "index.md").write_text(page)
    (root / "mkdocs.yml").write_text(f"site_name: tiny\nhooks:\n  - {ROOT / 'tools' / 'mkdocs_hooks.py'}\n")
    return root


def test_links_into_the_repository_become_site_files_or_plain_text(tmp_path):
    page = "# Tiny\n\n![a plot](../results/plot.png) and [the code](../src/code.py).\n"
    project = _tiny_project(tmp_path / "repo", page)
    result = _build(project, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-4000:]
    html = (tmp_path / "site" / "index.html").read_text()
    assert 'src="results/plot.png"' in html and (tmp_path / "site" / "results" / "plot.png").is_file()
    assert "the code" in html and "code.py" not in html


def test_a_link_to_a_path_missing_from_the_repository_fails_the_strict_build(tmp_path):
    project = _tiny_project(tmp_path / "repo", "# Tiny\n\n[gone](../src/missing.py)\n")
    result = _build(project, tmp_path / "site")
    assert result.returncode != 0 and "missing.py" in result.stderr
