"""The built site in headless Chromium (tools/site_check.py): a handful of pages (the home page, a
page with maths, the widest tables, an API page) are no wider than 1,280 px, have the navigation
and rendered maths, and queries typed into the search box list results. ``./dev.sh docs --check``
checks every page and takes screenshots. Skips, saying why, without Chromium or without KaTeX (npm ci --prefix tools/katex)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tools import site_check
from tools.docs_blocks import ROOT
from tools.mkdocs_hooks import katex_files

PAGES = ["", "fused-kl/", "frameworks/", "variance/", "api/agents/"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if site_check.browser() is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    if not katex_files(ROOT):
        pytest.skip("KaTeX not installed (npm ci --prefix tools/katex): the maths check needs it")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    return out


def test_pages_fit_1280px_with_navigation_maths_and_search(site):
    assert set(PAGES) <= set(site_check.pages(site))
    assert site_check.check(site, only=PAGES) == []


def test_the_check_reports_a_page_that_overflows(site, tmp_path):
    import shutil

    broken = tmp_path / "site"
    shutil.copytree(site, broken)
    page = broken / "fused-kl" / "index.html"
    page.write_text(page.read_text().replace("</body>", '<div style="width:3000px">wide</div></body>', 1))
    problems = site_check.check(broken, only=["fused-kl/"])
    assert any("wider than the 1280 px window" in p for p in problems), problems


def test_the_check_reports_a_search_without_results(site, monkeypatch):
    monkeypatch.setattr(site_check, "SEARCHES", ("qqqzzzxxx",))
    problems = site_check.check(site, only=[])
    assert problems == ["search: typing 'qqqzzzxxx' into the search box lists no result"], problems
