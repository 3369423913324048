"""The API reference (docs/api/*.md) documents what it shows: every object a page renders (``::: path``,
with the members its options list) has a docstring, and every parameter of a function, method or
constructor is described in its Google-style ``Args`` (or, for a dataclass, ``Attributes``) section.
Functions that return something say what in ``Returns``. Read with griffe, as mkdocstrings does."""

from __future__ import annotations

import re
from functools import cache

import griffe
import pytest

from tools.docs_blocks import ROOT

PAGES = sorted((ROOT / "docs" / "api").glob("*.md"))
_DIRECTIVE = re.compile(r"(?m)^::: ([\w.]+)\n((?:    .*\n)*)")
_SKIPPED = {"self", "cls"}


def directives() -> list[tuple[str, list[str] | bool | None, str]]:
    """(object path, its ``members`` option, page name) for every ``:::`` block of the API pages."""
    found = []
    for page in PAGES:
        for match in _DIRECTIVE.finditer(page.read_text()):
            members = re.search(r"members: (\[[^\]]*\]|false|true)", match[2])
            value = None
            if members:
                value = {"false": False, "true": True}.get(members[1])
                if value is None:
                    value = [name.strip() for name in members[1][1:-1].split(",") if name.strip()]
            found.append((match[1], value, page.name))
    return found


@cache
def _package(name: str):
    loader = griffe.GriffeLoader(search_paths=[str(ROOT)], docstring_parser=griffe.Parser.google)
    package = loader.load(name)
    loader.resolve_aliases(implicit=False, external=False)
    return package


def _object(path: str):
    top, _, rest = path.partition(".")
    obj = _package(top)
    return obj[rest] if rest else obj


def _sections(obj, kind: str) -> set[str]:
    names = set()
    if obj.docstring is not None:
        for section in obj.docstring.parsed:
            if section.kind.value == kind:
                names |= {item.name for item in section.value}
    return names


def _has_section(obj, kind: str) -> bool:
    return obj.docstring is not None and any(s.kind.value == kind for s in obj.docstring.parsed)


def _parameters(callable_obj) -> list[str]:
    return [p.name for p in callable_obj.parameters if p.name not in _SKIPPED and not p.name.startswith("_")
            and p.kind.value not in ("variadic positional", "variadic keyword")]


def problems(path: str, members) -> list[str]:
    """What the rendered object ``path`` lacks (empty when it is documented)."""
    obj = _object(path)
    found = []
    if obj.docstring is None or not obj.docstring.value.strip():
        return [f"{path}: no docstring"]
    if obj.is_function:
        documented = _sections(obj, "parameters")
        found += [f"{path}: parameter {name!r} not in Args" for name in _parameters(obj) if name not in documented]
        returns = obj.returns
        if returns is not None and str(returns) not in ("None", "NoReturn") and not obj.name.startswith("__") \
                and "property" not in obj.labels and not _has_section(obj, "returns"):
            found.append(f"{path}: no Returns")
    elif obj.is_class:
        init = obj.members.get("__init__")
        documented = _sections(obj, "parameters") | _sections(obj, "attributes")
        if init is not None and not init.is_alias:
            documented |= _sections(init, "parameters")
        found += [f"{path}: constructor argument {name!r} not in Args" for name in _parameters(obj)
                  if name not in documented]
        for name in members if isinstance(members, list) else []:
            found += problems(f"{path}.{name}", None)
    return found


def test_the_api_pages_render_public_objects_only():
    paths = [path for path, _, _ in directives()]
    assert len(paths) >= 30
    assert [p for p in paths if any(part.startswith("_") for part in p.split("."))] == []
    assert [p for p in paths if _object(p).is_module] == [], "a whole module on a page shows its internals"
    nav = (ROOT / "mkdocs.yml").read_text()
    assert all(f"api/{page.name}" in nav for page in PAGES)


@pytest.mark.parametrize("page", [p.name for p in PAGES])
def test_every_object_on_the_page_documents_its_parameters(page):
    missing = []
    for path, members, where in directives():
        if where == page:
            missing += problems(path, members)
    assert missing == []


def test_the_check_finds_an_undocumented_parameter(tmp_path, monkeypatch):
    (tmp_path / "toy.py").write_text(
        'def f(a, b):\n    """Add.\n\n    Args:\n        a: the first.\n\n    Returns:\n        a + b.\n    """\n'
        "    return a + b\n\n\n"
        'def g(a) -> int:\n    """No sections."""\n    return a\n\n\n'
        'class C:\n    """A class.\n\n    Args:\n        x: the x.\n    """\n\n'
        "    def __init__(self, x, y):\n        self.x = x\n"
    )
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    _package.cache_clear()
    try:
        assert problems("toy.f", None) == ["toy.f: parameter 'b' not in Args"]
        assert problems("toy.g", None) == ["toy.g: parameter 'a' not in Args", "toy.g: no Returns"]
        assert problems("toy.C", None) == ["toy.C: constructor argument 'y' not in Args"]
    finally:
        _package.cache_clear()
