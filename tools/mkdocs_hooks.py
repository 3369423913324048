"""MkDocs hooks (mkdocs.yml ``hooks:``): pages under docs/ link into the rest of the repository the
way they do on a code host, with paths relative to the page (``../results/lm/pareto_kl.png``,
``../tests/test_kl_expectations.py``), and the site still builds with ``--strict``:

- the studies' plots and tables under results/ (``*.png``, ``*.md``) join the site as they are,
  at the same paths (``results/...``), so no plot is copied into docs/ by hand;
- a link from a page to such a file is rewritten to the file's place in the site;
- a link to any other file or folder of the repository (source, tests, configs) keeps its text
  but loses its link on the site, which has no source browser;
- a link to a path that exists nowhere in the repository is reported as a warning, which fails
  ``mkdocs build --strict`` like any other broken link.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

log = logging.getLogger("mkdocs.hooks.repo_links")

SITE_FOLDERS = ("results",)  # repository folders whose plots and tables join the site
SITE_SUFFIXES = (".png", ".md")
# [text](target) or ![alt](target), target without spaces; the text may hold `code` but no brackets
LINK = re.compile(r"(!?\[[^\[\]]*\])\(([^()\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _root(config: MkDocsConfig) -> Path:
    return Path(config.config_file_path).resolve().parent


# KaTeX renders the maths offline: its dist from npm (tools/katex, pinned in package-lock.json, put
# there by ./dev.sh with `npm ci`) joins the site under assets/katex/; nothing comes from a CDN.
KATEX_DIST = Path("tools/katex/node_modules/katex/dist")
KATEX_FILES = ("katex.min.js", "katex.min.css", "contrib/auto-render.min.js")


def katex_files(root: Path) -> list[Path]:
    """The KaTeX files the site needs (script, style, auto-render, woff2 fonts), [] if not installed."""
    dist = root / KATEX_DIST
    if not all((dist / name).is_file() for name in KATEX_FILES):
        return []
    return [dist / name for name in KATEX_FILES] + sorted((dist / "fonts").glob("*.woff2"))


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the plots and tables of SITE_FOLDERS at their repository paths, and KaTeX under assets/katex/."""
    root = _root(config)
    for folder in SITE_FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            if path.suffix in SITE_SUFFIXES and path.is_file():
                files.append(File(path.relative_to(root).as_posix(), str(root), config.site_dir, config.use_directory_urls))
    found = katex_files(root)
    if not found:
        log.info("KaTeX is not installed (npm ci --prefix tools/katex): formulas show as TeX source")
    for path in found:
        dest = "assets/katex/" + path.relative_to(root / KATEX_DIST).as_posix()
        files.append(File.generated(config, dest, abs_src_path=str(path)))
    return files


def _repo_target(page: Page, target: str, docs: str) -> str | None:
    """The repository path a relative link of a docs/ page points to, when it leaves docs/."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("/", "#")):
        return None
    repo_path = posixpath.normpath(posixpath.join(docs, posixpath.dirname(page.file.src_uri), target))
    return None if repo_path == docs or repo_path.startswith(docs + "/") else repo_path


def _rewrite(match: re.Match, page: Page, files: Files, root: Path, docs: str) -> str:
    text, target = match[1], match[2]
    path, _, fragment = target.partition("#")
    repo_path = _repo_target(page, path, docs) if path else None
    if repo_path is None:
        return match[0]
    if files.get_file_from_path(repo_path) is not None:
        relative = posixpath.relpath(repo_path, posixpath.dirname(page.file.src_uri) or ".")
        return f"{text}({relative}{'#' + fragment if fragment else ''})"
    if (root / repo_path).exists() and not text.startswith("!"):
        return text[1:-1]
    log.warning("%s links to %s, which is not in the repository", page.file.src_uri, target)
    return match[0]


def _outside_fences(markdown: str, rewrite) -> str:
    """``rewrite`` applied to the text between fenced code blocks, the blocks left as they are."""
    parts, end = [], 0
    for fence in FENCE.finditer(markdown):
        parts += [rewrite(markdown[end:fence.start()]), fence[0]]
        end = fence.end()
    return "".join(parts + [rewrite(markdown[end:])])


WIDE_TABLE = re.compile(r"(?m)^\|(?:[^|\n]*(?<!\\)\|){8,}")  # a table row of 8 or more columns


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Rewrite the links of a docs/ page that leave docs/ (see the module docstring); a page with a
    table of 8 or more columns hides its table of contents, so the table gets the room."""
    if WIDE_TABLE.search(markdown):
        hidden = page.meta.setdefault("hide", [])
        if "toc" not in hidden:
            hidden.append("toc")
    root = _root(config)
    docs_dir = Path(config.docs_dir).resolve()
    if Path(page.file.abs_src_path).resolve().parent != docs_dir and docs_dir not in Path(page.file.abs_src_path).resolve().parents:
        return markdown  # a page from results/: its links stay as they are
    docs = docs_dir.relative_to(root).as_posix()
    return _outside_fences(markdown, lambda text: LINK.sub(lambda m: _rewrite(m, page, files, root, docs), text))
