"""The framework map (``kl_estimators.frameworks``): every row names a test that exists and real estimators."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from kl_estimators import ESTIMATOR_INFO
from kl_estimators.frameworks import FRAMEWORK_OPTIONS, FRAMEWORK_VERSIONS, NOT_COVERED, markdown_table, not_covered_table

ROOT = Path(__file__).resolve().parents[1]


def _test_names(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("row", FRAMEWORK_OPTIONS, ids=lambda row: f"{row.framework}:{row.option[:40]}")
def test_row_names_an_existing_test(row):
    path, name = row.test.split("::")
    assert name.startswith("test_") and name in _test_names(ROOT / path)


@pytest.mark.parametrize("row", FRAMEWORK_OPTIONS, ids=lambda row: f"{row.framework}:{row.option[:40]}")
def test_row_estimators_exist(row):
    """Every backquote-free estimator name a row gives is a key of ESTIMATOR_INFO (or the row says 'none' / is an aggregation)."""
    if row.estimator.startswith(("none", "(")):
        return
    names = re.findall(r"[a-z0-9+-]+(?:-[a-z]+)*", row.estimator.split("(")[0].split(";")[0])
    named = [n for n in names if n in ESTIMATOR_INFO]
    assert named, row.estimator


def test_markdown_table_has_every_row():
    assert markdown_table().count("\n") == len(FRAMEWORK_OPTIONS) + 1


def test_not_covered_table_has_every_framework():
    assert not_covered_table().count("\n") == len(NOT_COVERED) + 1
    assert not set(NOT_COVERED) & set(FRAMEWORK_VERSIONS)


def test_every_framework_has_a_row():
    """Each versioned framework has rows (the docs' framework count is the map's)."""
    assert {row.framework for row in FRAMEWORK_OPTIONS} == set(FRAMEWORK_VERSIONS)
