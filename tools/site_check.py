"""Check the built documentation site in a real headless browser (Chromium, Debian's package).

    python -m tools.site_check [--site site] [--screenshots DIR]

For every page of the built site (served over HTTP from a copy, as ``mkdocs serve`` would), Chromium
loads it at 1,280 px and a small script injected into the copy reports what the page shows:

- **no horizontal overflow**: the document is no wider than the 1,280 px window;
- **navigation**: the page has the site's navigation, and every internal link of the navigation
  answers (HTTP 200);
- **maths**: every formula (``.arithmatex``) was rendered by KaTeX (holds a ``.katex`` element, and
  no ``.katex-error``);
- **tables**: no table is wider than the content column (Material would scroll it in its wrapper,
  hiding the right-hand columns);
- **search**: each query of ``SEARCHES``, typed into the site's search box on the home page, lists
  at least one result (Material's search worker, fed the site's ``search_index.json``: what fails
  when the site is opened from disk).

``--screenshots DIR`` writes a 1,280 px screenshot of each page there. Exit 0 when every check
passes, 1 otherwise (one line per problem), 2 when no browser is installed.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 1280
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
MARKER = "__SITE_CHECK__"
SEARCHES = ("analytic", "KLGRPOTrainer")  # typed into the search box; each must list a result
# Injected before </body>: after the page settles, write what it shows into a <pre> of its own.
PROBE = """<script>
function searchResults(query) {  // type the query into Material's search box; the titles it lists
  const box = document.querySelector("[data-md-component=search-query]");
  if (!box) return Promise.resolve(null);
  box.focus();
  box.value = query;
  box.dispatchEvent(new KeyboardEvent("keyup", {key: query.slice(-1)}));  // what Material listens to
  const titles = () => [...document.querySelectorAll(".md-search-result__item h1, .md-search-result__item h2")]
    .map(h => h.textContent.trim());
  // Each pending /__wait holds Chromium's virtual time while the worker (in real time) builds the index
  // and answers; poll after each until results are listed, for at most 40 rounds.
  const poll = (round) => titles().length || round >= 40 ? Promise.resolve(titles())
    : fetch("/__wait?" + Math.random()).then(() => poll(round + 1));
  return poll(0);
}
window.addEventListener("load", () => setTimeout(() => {
  const maths = [...document.querySelectorAll(".arithmatex")];
  const query = new URLSearchParams(location.search).get("check-search");
  const report = {
    width: document.documentElement.scrollWidth,
    nav: [...document.querySelectorAll(".md-nav--primary a.md-nav__link[href]")].map(a => a.getAttribute("href")),
    maths: maths.length,
    rendered: maths.filter(m => m.querySelector(".katex")).length,
    maths_errors: document.querySelectorAll(".katex-error").length,
    // tables wider than the content column: Material's wrapper scrolls them, so the page does not
    // overflow, but their right-hand columns are hidden until scrolled
    clipped_tables: [...document.querySelectorAll(".md-typeset__scrollwrap")]
      .filter(wrap => wrap.scrollWidth > wrap.clientWidth + 1)
      .map(wrap => `${wrap.scrollWidth - wrap.clientWidth} px (${(wrap.querySelector("th") || {}).textContent})`),
  };
  (query ? searchResults(query) : Promise.resolve(null)).then(results => {
    report.search_results = results;
    const pre = document.createElement("pre");
    pre.id = "site-check";
    const marker = "__SITE_" + "CHECK__";  // split, so that the script's own text never matches
    pre.textContent = marker + JSON.stringify(report) + marker;
    document.body.appendChild(pre);
  });
}, 1000));
</script>"""


def browser() -> str | None:
    """The path of an installed Chromium, or None."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def pages(site: Path) -> list[str]:
    """The site's pages as URL paths ("" for the home page), excluding the 404 page."""
    found = []
    for html in sorted(site.rglob("index.html")):
        relative = html.parent.relative_to(site).as_posix()
        found.append("" if relative == "." else relative + "/")
    return found


def _chromium(binary: str, *args: str, timeout: int = 60) -> str:
    command = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--window-size={WIDTH},900", "--virtual-time-budget=8000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout).stdout


def _serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = _QuietServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # the browser closing a connection early is no problem
        pass


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site; ``/__wait`` answers after 0.5 s: a pending request holds Chromium's virtual
    time, so that the search worker (which runs in real time) can answer before the DOM is dumped."""

    def do_GET(self):  # noqa: N802 (the base class's name)
        if self.path.startswith("/__wait"):
            time.sleep(0.5)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except OSError as error:
        return getattr(error, "code", 0) or 0


def check(site: Path, screenshots: Path | None = None, binary: str | None = None,
          only: list[str] | None = None) -> list[str]:
    """The problems found on the built ``site`` (empty when every check passes).

    Args:
        site: the built site's folder.
        screenshots: a folder for one 1,280 px screenshot per page, or None.
        binary: the browser to use; None finds Chromium.
        only: check these pages only (URL paths as ``pages`` gives them), or None for all.

    Returns:
        One line per problem.

    Raises:
        FileNotFoundError: no browser is installed.
    """
    binary = binary or browser()
    if binary is None:
        raise FileNotFoundError("no Chromium found: apt-get install chromium")
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "site"
        shutil.copytree(site, copy)
        for html in copy.rglob("*.html"):
            text = html.read_text()
            html.write_text(text.replace("</body>", PROBE + "</body>", 1))
        server, base = _serve(copy)
        try:
            nav_links: set[str] = set()
            for path in [p for p in pages(copy) if only is None or p in only]:
                report = _report(binary, base + path)
                if report is None:
                    problems.append(f"/{path}: the page did not finish loading")
                    continue
                if report["width"] > WIDTH:
                    problems.append(f"/{path}: {report['width']} px wide, wider than the {WIDTH} px window")
                if len(report["nav"]) < 10:
                    problems.append(f"/{path}: no site navigation ({len(report['nav'])} links)")
                if report["rendered"] < report["maths"]:
                    problems.append(f"/{path}: {report['maths'] - report['rendered']} of {report['maths']} formulas not rendered by KaTeX")
                if report["maths_errors"]:
                    problems.append(f"/{path}: {report['maths_errors']} formulas KaTeX could not parse")
                if report["clipped_tables"]:
                    problems.append(f"/{path}: {len(report['clipped_tables'])} tables wider than the page's content column: {'; '.join(report['clipped_tables'])}")
                nav_links |= {urllib.request.urljoin(base + path, href).split("#")[0] for href in report["nav"]}
                if screenshots is not None:
                    screenshots.mkdir(parents=True, exist_ok=True)
                    name = (path.strip("/").replace("/", "-") or "index") + ".png"
                    _chromium(binary, f"--screenshot={screenshots / name}", base + path)
            problems += [f"navigation link {url} answers {code}" for url in sorted(nav_links)
                         if url.startswith(base) for code in [_status(url)] if code != 200]
            for query in SEARCHES:
                search = _report(binary, base + "?check-search=" + urllib.parse.quote(query))
                if search is None or not search["search_results"]:
                    problems.append(f"search: typing {query!r} into the search box lists no result")
        finally:
            server.shutdown()
    return problems


def _report(binary: str, url: str) -> dict | None:
    dom = _chromium(binary, "--dump-dom", url)
    found = re.search(re.escape(MARKER) + r"(.*?)" + re.escape(MARKER), dom)
    return json.loads(found[1]) if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, default=ROOT / "site", help="the built site (mkdocs build)")
    parser.add_argument("--screenshots", type=Path, default=None, help="write a 1,280 px screenshot per page here")
    args = parser.parse_args(argv)
    if browser() is None:
        print("site_check: no Chromium installed (apt-get install chromium): nothing checked", file=sys.stderr)
        return 2
    if not (args.site / "index.html").is_file():
        print(f"site_check: {args.site} holds no built site: run ./dev.sh docs first", file=sys.stderr)
        return 2
    problems = check(args.site, args.screenshots)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"site_check: {len(pages(args.site))} pages, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
