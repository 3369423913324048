"""``studies.moments_instances`` and its report: the fixed-KL root, the slim moments, the committed
files, and the per-problem statistics' definitions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from studies.moments import Cell, problem
from studies.moments_exact import exact_moments
from studies.moments_instances import (
    beta_for_kl,
    compute,
    kl_optimum_ref,
    main,
    moments,
    points,
)
from studies.moments_instances_report import (
    RESULTS,
    crossover,
    groups,
    lowest,
    report_text,
    split,
)
from studies.tabular_model import make_instance


@pytest.mark.parametrize(("vocab", "length", "target"), [(3, 3, 1.0), (2, 3, 0.25), (3, 2, 2.0)])
def test_beta_for_kl_holds_the_kl(vocab, length, target):
    beta = beta_for_kl(vocab, length, seed=0, target=target)
    assert beta is not None
    assert kl_optimum_ref(make_instance(vocab, length, beta, 0)) == pytest.approx(target, rel=1e-8)


def test_beta_for_kl_refuses_an_unreachable_level():
    """KL(pi*_beta || pi_ref) < -log pi_ref(argmax r) for every beta: that level has no root."""
    instance = make_instance(3, 1, 1.0, 0)
    ref_logp = instance.ref_table.log_softmax(-1)[0]
    ceiling = float(-ref_logp[instance.reward.argmax()])
    assert beta_for_kl(3, 1, 0, ceiling * 1.01) is None
    assert beta_for_kl(3, 1, 0, ceiling * 0.9) is not None


@pytest.mark.parametrize(("estimator", "options", "staleness"), [
    ("analytic-future", {}, None), ("k3-loss", {}, None),
    ("analytic-future-is", {}, 1.0), ("reinforce-future-is", {"weight_clip": 1.5}, 0.7),
    ("reinforce", {"importance": "sequence", "weight_clip": 2.0}, 1.0),
])  # fmt: skip
def test_slim_moments_are_the_exact_moments(estimator, options, staleness):
    prob = problem(Cell("x", 3, 3, 0.3, 1, staleness=staleness))
    bias_sq, trace = moments(prob, estimator, options, prob.grad_kl())
    exact = exact_moments(prob, estimator, **options)
    assert bias_sq == pytest.approx(exact.bias_sq, rel=1e-9, abs=1e-15)
    assert trace == pytest.approx(exact.trace, rel=1e-9)


def test_committed_instance_reproduces():
    """seed 3's committed file is what the code computes now (to the stored 9 digits)."""
    committed = json.loads((RESULTS / "cells" / "seed3.json").read_text())
    fresh = [compute(point) for point in points(3)]
    assert [r["name"] for r in committed] == [r["name"] for r in fresh]
    for old, new in zip(committed, fresh):
        assert old["feasible"] == new["feasible"]
        if not new["feasible"]:
            continue
        assert old["unbiased"] == new["unbiased"]
        for name, values in new["estimators"].items():
            for a, b in zip(old["estimators"][name], values):
                assert a == pytest.approx(b, rel=1e-7, abs=1e-30), (new["name"], name)


def test_every_instance_of_the_study_is_committed():
    from studies.moments_instances import N_SEEDS

    files = sorted(p.name for p in (RESULTS / "cells").glob("seed*.json"))
    assert files == sorted(f"seed{s}.json" for s in range(N_SEEDS))
    assert all(len(v) >= 20 for k, v in groups().items() if not k[0].startswith("kl") or k[2] > 1)


def test_runner_resumes_and_refuses_bad_seeds(tmp_path: Path, capsys):
    assert main(["--out", str(tmp_path), "--seeds", "0"]) == 0
    path = tmp_path / "cells" / "seed0.json"
    stamp = path.stat().st_mtime_ns
    assert main(["--out", str(tmp_path), "--seeds", "0"]) == 0
    assert path.stat().st_mtime_ns == stamp
    assert (tmp_path / "table.md").is_file()
    with pytest.raises(SystemExit) as error:
        main(["--seeds", "zero"])
    assert error.value.code == 2


def test_lowest_breaks_ties_in_estimator_order_and_crossover_is_the_mse_crossing():
    assert lowest({"analytic-future-is": 1.0, "analytic-future": 1.0 + 1e-13, "reinforce": 2.0}) == "analytic-future"
    problem = {
        "unbiased": ["reinforce", "analytic-future"],
        "estimators": {"reinforce": [0.0, 2.0], "analytic-future": [0.0, 1.0], "analytic": [0.01, 0.2]},
    }
    n_star = crossover(problem, "analytic")
    assert n_star == pytest.approx(80.0)
    mse = lambda name, n: problem["estimators"][name][0] + problem["estimators"][name][1] / n
    assert mse("analytic", n_star * 0.99) < mse("analytic-future", n_star * 0.99)
    assert mse("analytic", n_star * 1.01) > mse("analytic-future", n_star * 1.01)


def test_degenerate_problems_are_flagged_not_kept():
    kept, flagged = split([{"grad_kl_sq": 1e-7}, {"grad_kl_sq": 0.1}])
    assert flagged == 1 and [p["grad_kl_sq"] for p in kept] == [0.1]
    assert not math.isnan(kept[0]["grad_kl_sq"])


def test_committed_report_is_the_report_of_the_committed_cells():
    assert (RESULTS / "table.md").read_text() == report_text(RESULTS)
