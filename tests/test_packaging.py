"""The package as it would be published: the sdist and the wheel build offline from this checkout
(``python -m build --no-isolation``), their metadata is valid core metadata (the check
``twine check`` makes, through the same ``packaging`` parser), and they hold the three packages and
lmgym's data files but none of the repository's tests, results, benchmarks or studies. The version
lives in one place, ``kl_estimators.__version__``; the changelog and the citation file name it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

import kl_estimators

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kl_estimators", "lmgym", "agents"}
NOT_SHIPPED = {"tests", "results", "bench", "studies", "examples", "tools", "docs", "configs", "runs"}
VERSION = kl_estimators.__version__
BUILD_STATE = (".git", ".venv", "*.egg-info", "build", "dist", "site", "runs", "__pycache__", ".hypothesis", ".pytest_cache")


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """The sdist, and the wheel built from it (as ``python -m build`` does), in a fresh folder. The
    build runs on a copy of the checkout without its build state (an ``*.egg-info`` left by an
    earlier build adds that build's files to the next sdist), as a fresh clone would build."""
    pytest.importorskip("build")
    source = tmp_path_factory.mktemp("source") / "lmgym-kl"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*BUILD_STATE))
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"sdist": next(out.glob("*.tar.gz")), "wheel": next(out.glob("*.whl"))}


def _wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def _sdist_names(sdist: Path) -> list[str]:
    with tarfile.open(sdist) as archive:
        return [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]


def _validated_metadata(text: str):
    from packaging.metadata import Metadata

    return Metadata.from_email(text, validate=True)  # raises on any invalid or missing field


def test_the_version_lives_in_one_place():
    """pyproject.toml takes its version from kl_estimators.__version__; the changelog's newest entry
    and CITATION.cff name the same version."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kl_estimators.__version__"}
    newest = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert newest and newest[1] == VERSION
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert str(citation["version"]) == VERSION
    assert citation["license"] == pyproject["project"]["license"] == "Apache-2.0"
    assert citation["cff-version"] and citation["title"] and citation["authors"]


def test_wheel_metadata_is_valid_and_complete(dist):
    wheel = dist["wheel"]
    assert wheel.name == f"lmgym_kl-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        meta = _validated_metadata(archive.read(f"lmgym_kl-{VERSION}.dist-info/METADATA").decode())
        shipped_license = archive.read(f"lmgym_kl-{VERSION}.dist-info/licenses/LICENSE").decode()
    assert (meta.name, str(meta.version)) == ("lmgym-kl", VERSION)
    assert str(meta.license_expression) == "Apache-2.0" and meta.license_files == ["LICENSE"]
    assert shipped_license == (ROOT / "LICENSE").read_text()
    assert meta.summary and str(meta.requires_python) == ">=3.10"
    assert meta.description_content_type == "text/markdown"
    assert meta.description.strip() == (ROOT / "README.md").read_text().strip()
    assert [str(req) for req in meta.requires_dist if req.marker is None] == ["torch>=2.1"]
    assert {"env", "agents", "all", "test", "docs"} <= set(meta.provides_extra)


def test_sdist_metadata_is_valid(dist):
    with tarfile.open(dist["sdist"]) as archive:
        pkg_info = archive.extractfile(f"lmgym_kl-{VERSION}/PKG-INFO").read().decode()
    meta = _validated_metadata(pkg_info)
    assert (meta.name, str(meta.version), str(meta.license_expression)) == ("lmgym-kl", VERSION, "Apache-2.0")


def test_wheel_holds_the_packages_and_their_data_files_only(dist):
    names = _wheel_names(dist["wheel"])
    top = {name.split("/")[0] for name in names}
    assert top == PACKAGES | {f"lmgym_kl-{VERSION}.dist-info"}
    for package in PACKAGES:
        sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts}
        assert sources <= set(names), sources - set(names)
    data = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lmgym" / "data").glob("*.txt")}
    assert data and data <= set(names)
    assert not [name for name in names if name.endswith((".pyc", ".safetensors", ".json"))]


def test_sdist_holds_the_sources_and_the_project_files_but_not_the_repository(dist):
    names = set(_sdist_names(dist["sdist"]))
    assert {"pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "CITATION.cff", "PKG-INFO"} <= names
    assert {"lmgym/data/prompts.txt", "kl_estimators/__init__.py", "agents/ppo_kl.py"} <= names
    assert not {name.split("/")[0] for name in names} & NOT_SHIPPED
