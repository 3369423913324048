"""kl_estimators.integrations.source_patches against the installed verl 0.9.1 / OpenRLHF 0.11.2 files."""

from __future__ import annotations

import pytest

from kl_estimators.integrations.source_patches import PATCHES, main, patched_source
from tests.helpers.framework_source import FRAMEWORKS, installed_file


@pytest.mark.parametrize("framework", sorted(PATCHES))
@pytest.mark.parametrize("estimator", ("reinforce-future-is", "k3+is", "k3-loss"))
def test_patch_applies_and_compiles(framework, estimator):
    """The KL statement is in the installed file exactly once; the patched file compiles and calls ours."""
    source = installed_file(PATCHES[framework].file).read_text()
    patched = patched_source(framework, estimator, source)
    compile(patched, PATCHES[framework].file, "exec")
    assert f"per_token_kl_loss(\n" in patched and repr(estimator) in patched
    assert "from kl_estimators import per_token_kl_loss" in patched
    assert PATCHES[framework].old not in patched


@pytest.mark.parametrize("framework", sorted(PATCHES))
def test_patch_refuses(framework):
    source = installed_file(PATCHES[framework].file).read_text()
    with pytest.raises(ValueError, match="needs the vocabulary logits"):
        patched_source(framework, "analytic-future-is", source)
    with pytest.raises(ValueError, match="not there exactly once"):
        patched_source(framework, "reinforce-future-is", "import torch\n")


def test_cli(capsys, tmp_path):
    installed_file(PATCHES["verl"].file)
    assert main(["verl", "reinforce-future-is", str(FRAMEWORKS)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- verl/workers/utils/losses.py") and "+        kld = per_token_kl_loss(" in out
    assert main(["verl", "no-such-estimator", str(FRAMEWORKS)]) == 2
    assert main(["verl", "reinforce-future-is", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("source_patches:") == 2
