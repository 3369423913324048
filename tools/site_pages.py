"""The site's changelog and citation pages, generated from CHANGELOG.md and CITATION.cff so that the
site and the repository files say the same thing.

Used through ``<!-- generated: tools.site_pages:changelog -->`` (docs/changelog.md) and
``<!-- generated: tools.site_pages:bibtex -->`` (docs/citation.md); see tools/docs_blocks.py.
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def changelog() -> str:
    """CHANGELOG.md without its title (the page has its own), headings one level down."""
    lines = (ROOT / "CHANGELOG.md").read_text().strip().splitlines()
    body = lines[1:] if lines and lines[0].startswith("# ") else lines
    return "\n".join(body).strip()


def bibtex() -> str:
    """A BibTeX ``@software`` entry built from CITATION.cff, in a fenced block."""
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    authors = " and ".join(("{" + a["name"] + "}") if a.get("name") else f"{a['family-names']}, {a['given-names']}" for a in cff["authors"])
    fields = {"title": cff["title"], "author": authors, "version": cff["version"],
              "license": cff["license"], "url": cff.get("repository-code", "")}
    if cff.get("date-released"):
        fields["year"] = str(cff["date-released"])[:4]
    body = ",\n".join(f"  {key} = {{{value}}}" for key, value in fields.items() if value)
    return f"```bibtex\n@software{{lmgym_kl,\n{body}\n}}\n```"
