"""Check the built documentation site in a real headless browser (Chromium, Debian's package).

    python -m tools.site_check [--site site] [--screenshots DIR]

For every page of the built site (served over HTTP from a copy, as ``mkdocs serve`` would), Chromium
loads it at 1,280 px and a small script injected into the copy reports what the page shows:

- **no horizontal overflow**: the document is no wider than the 1,280 px window;
- **navigation**: the page has the site's navigation, and every internal link of the navigation
  answers (HTTP 200);
- **maths**: every formula (``.arithmatex``) was rendered by KaTeX (holds a ``.katex`` element);
- **search**: the site's own search worker (Material's) starts in the browser with the site's
  ``search_index.json`` (what fails when the site is opened from disk), and the index holds the
  pages' text.

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
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 1280
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
MARKER = "__SITE_CHECK__"
# Injected before </body>: after the page settles, write what it shows into a <pre> of its own.
PROBE = """<script>
function searchReady(query) {  // Material's own search worker, fed the site's index: does it start?
  const config = JSON.parse(document.getElementById("__config").textContent);
  const base = new URL(config.base + "/", location.href);
  let waiting = true;
  return fetch(new URL("search/search_index.json", base)).then(r => r.json()).then(index => new Promise(finish => {
    const done = (ready) => { waiting = false; finish(ready); };
    const worker = new Worker(new URL(config.search, base));
    worker.onmessage = (event) => { if (event.data.type === 1) done(true); };  // 1: the index is built
    worker.onerror = () => done(false);
    worker.postMessage({type: 0, data: index});  // 0: set up with the index
    const hold = () => waiting && fetch("/__wait?" + Math.random()).then(hold);  // holds virtual time meanwhile
    hold();
  })).catch(() => false);
}
window.addEventListener("load", () => setTimeout(() => {
  const maths = [...document.querySelectorAll(".arithmatex")];
  const query = new URLSearchParams(location.search).get("check-search");
  const report = {
    width: document.documentElement.scrollWidth,
    nav: [...document.querySelectorAll(".md-nav--primary a.md-nav__link[href]")].map(a => a.getAttribute("href")),
    maths: maths.length,
    rendered: maths.filter(m => m.querySelector(".katex")).length,
  };
  (query ? searchReady(query) : Promise.resolve(null)).then(ready => {
    report.search_ready = ready;
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
    """Serves the site; ``/__wait`` answers after 3 s: a pending request holds Chromium's virtual
    time, so that the search worker (which runs in real time) can answer before the DOM is dumped."""

    def do_GET(self):  # noqa: N802 (the base class's name)
        if self.path.startswith("/__wait"):
            time.sleep(3)
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
                nav_links |= {urllib.request.urljoin(base + path, href).split("#")[0] for href in report["nav"]}
                if screenshots is not None:
                    screenshots.mkdir(parents=True, exist_ok=True)
                    name = (path.strip("/").replace("/", "-") or "index") + ".png"
                    _chromium(binary, f"--screenshot={screenshots / name}", base + path)
            problems += [f"navigation link {url} answers {code}" for url in sorted(nav_links)
                         if url.startswith(base) for code in [_status(url)] if code != 200]
            search = _report(binary, base + "?check-search=1")
            if search is None or search["search_ready"] is not True:
                problems.append("search: the site's search worker did not start with its index")
            index = json.loads((copy / "search" / "search_index.json").read_text())["docs"]
            if not any("estimator" in doc["text"].lower() for doc in index):
                problems.append("search: the index holds no page that mentions 'estimator'")
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
