"""The import rules of the layout, read from the code (``ast``: every import, at the top or inside a
function), and no import circle among our modules.

- ``kl_estimators`` imports torch and the standard library only (its ``integrations`` wrap other
  frameworks and may import them, but nothing else of ours);
- ``lmgym`` imports nothing of ours;
- the leaves ``agents.rollout.records``, ``agents.options``, ``agents.metrics`` and the checkpoint
  format ``agents.state.checkpoint`` import no other ``agents`` module;
- the rollout (``agents.rollout``) never imports the command line (``agents.cli``, ``agents.ppo_kl``);
- a study's report never imports a study's runner (a module run as ``python -m``);
- nothing but the tests imports ``tests``; the library and the studies import neither ``bench``
  nor ``tools``.
"""
from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("agents", "lmgym", "kl_estimators", "studies", "bench", "tools", "tests", "examples")
LIBRARY = ("agents", "lmgym", "kl_estimators", "studies")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of ours by dotted name."""
    found = {}
    for package in OURS:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


@cache
def imports(module: str) -> frozenset[str]:
    """The dotted names ``module`` imports; ``from a import b`` counts as ``a.b`` when that is a module."""
    path = modules()[module]
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules())
    return frozenset(names)


def ours(module: str) -> set[str]:
    """The modules of ours that ``module`` imports (a package import counts as its ``__init__``)."""
    return {name for name in imports(module) if name in modules()}


def top(name: str) -> str:
    return name.split(".")[0]


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_rules_see_the_tree():
    """A guard against a vacuous pass: the modules and the edges the rules are about exist."""
    assert {"agents.algorithm", "agents.rollout.records", "agents.cli.config", "lmgym.env", "kl_estimators.fused"} <= set(modules())
    assert "agents.rollout.records" in ours("agents.rollout.buffer")
    assert "agents.cli.config" in ours("agents.ppo_kl")


def test_kl_estimators_imports_torch_and_the_standard_library_only():
    for module in (m for m in modules() if in_package(m, "kl_estimators")):
        for name in imports(module):
            if top(name) in OURS:
                assert top(name) == "kl_estimators", f"{module} imports {name}"
            elif not in_package(module, "kl_estimators.integrations"):
                assert top(name) == "torch" or top(name) in sys.stdlib_module_names, f"{module} imports {name}"


@pytest.mark.parametrize("package", ["lmgym"])
def test_lmgym_imports_nothing_of_ours(package):
    for module in (m for m in modules() if in_package(m, package)):
        assert {top(name) for name in ours(module)} <= {package}, module


@pytest.mark.parametrize("leaf", ["agents.rollout.records", "agents.options", "agents.metrics", "agents.state.checkpoint"])
def test_leaves_import_no_other_agents_module(leaf):
    assert not [name for name in imports(leaf) if top(name) == "agents"], leaf


def test_the_rollout_never_imports_the_command_line():
    for module in (m for m in modules() if in_package(m, "agents.rollout")):
        cli = [name for name in ours(module) if in_package(name, "agents.cli") or name == "agents.ppo_kl"]
        assert not cli, f"{module} imports {cli}"


def runners() -> set[str]:
    """The studies' runners: modules with a ``__main__`` block that are not reports."""
    return {
        m for m, path in modules().items()
        if in_package(m, "studies") and not m.endswith("_report") and '__name__ == "__main__"' in path.read_text()
    }  # fmt: skip


def test_reports_never_import_runners():
    assert {"studies.lm", "studies.moments", "studies.lm_variance"} <= runners()
    for report in (m for m in modules() if in_package(m, "studies") and m.endswith("_report")):
        assert not ours(report) & runners(), f"{report} imports {ours(report) & runners()}"


def test_nothing_imports_bench_tools_or_tests():
    for module in modules():
        for name in ours(module):
            if top(name) == "tests":
                assert top(module) == "tests", f"{module} imports {name}"
            if top(name) in ("bench", "tools") and top(module) in LIBRARY:
                raise AssertionError(f"{module} imports {name}")


def test_no_test_file_imports_another_test_file():
    for module in (m for m in modules() if in_package(m, "tests")):
        tests = [name for name in imports(module) if name.rpartition(".")[2].startswith("test_")]
        assert not tests, f"{module} imports {tests}"


def test_no_import_circles():
    """Depth-first search over every import edge between our modules; a back edge is a circle."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for name in sorted(ours(module)):
            if state.get(name) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(name) :] + [name]))
            if name not in state:
                visit(name)
        path.pop()
        state[module] = 2

    for module in sorted(modules()):
        if module not in state:
            visit(module)
