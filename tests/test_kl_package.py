"""The kl_estimators package: public API and its torch-only dependency footprint (declared in
pyproject.toml and observed at import)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import kl_estimators

ROOT = Path(__file__).resolve().parents[1]


def test_public_api():
    assert set(kl_estimators.__all__) == {
        "ESTIMATORS", "ESTIMATOR_INFO", "GRADIENT_QUANTITIES", "AdaptiveKLController", "EstimatorInfo",
        "FixedKLController", "FusedKL", "LinearLogits", "analytic", "fused_kl", "k1", "k2", "k3",
        "per_token_kl_loss", "sequence_kl_loss",
    }
    assert all(hasattr(kl_estimators, name) for name in kl_estimators.__all__)
    assert kl_estimators.ESTIMATORS == (
        "reinforce", "reinforce-future", "reinforce-future-is", "analytic", "analytic-is", "analytic-future",
        "analytic-future-is", "k1-loss", "k2-loss", "k3-loss", "abs-loss", "k1+", "k3+", "k3-ratio", "k3+is",
        "k3-reward",
    )
    assert tuple(kl_estimators.ESTIMATOR_INFO) == kl_estimators.ESTIMATORS


def test_base_install_requires_torch_only():
    """``pip install .`` brings torch and nothing else; the env and the agents are extras."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [re.split(r"[<>=!~ ;\[]", req)[0] for req in project["dependencies"]] == ["torch"]
    extras = project["optional-dependencies"]
    assert {"env", "agents", "all", "test"} <= set(extras)
    assert not any(req.startswith("torch") for reqs in extras.values() for req in reqs)


def test_imports_nothing_beyond_torch_and_the_standard_library():
    """Modules that ``import kl_estimators`` adds to those ``import torch`` already loaded (torch
    itself pulls in numpy and tqdm when they are installed) are all from the standard library."""
    code = (
        "import sys, torch; before = set(sys.modules); import kl_estimators; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before} - {'kl_estimators'}; "
        "print(sorted(new - set(sys.stdlib_module_names)))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_import_without_numpy_prints_no_warning():
    """``pip install .`` brings torch without numpy; ``import torch`` then warns "Failed to initialize
    NumPy". ``import kl_estimators`` (before torch) must print nothing, and still work."""
    code = (
        "import importlib.abc, sys\n"
        "class NoNumpy(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'numpy':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoNumpy())\n"
        "import kl_estimators, torch\n"
        "assert 'numpy' not in sys.modules\n"
        "print(float(kl_estimators.analytic(torch.zeros(1, 3), torch.zeros(1, 3))[0]))\n"
    )
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0.0" and result.stderr == ""


_STATED_COUNT = re.compile(r"\b(\d+) (?:gradient )?estimators\b")
_COUNT_FILES = ["README.md", "docs/index.md", "docs/kl-estimators.md", "docs/api/kl_estimators.md",
                "docs/getting-started.md", "kl_estimators/gradients.py", "tools/install_table.py"]


def test_every_stated_estimator_count_is_the_real_one():
    """"the 16 gradient estimators" is written in several places; each says len(ESTIMATORS), so a
    new estimator fails here until the text follows (CHANGELOG.md is history and keeps its count)."""
    stated = {(name, int(m[1])) for name in _COUNT_FILES for m in _STATED_COUNT.finditer((ROOT / name).read_text())}
    assert {name for name, _ in stated} >= {"README.md", "kl_estimators/gradients.py"}, "the pattern is stale"
    assert {(name, n) for name, n in stated if n != len(kl_estimators.ESTIMATORS)} == set()
