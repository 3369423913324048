"""The exact LM statistics' table (studies.lm_variance_exact_report) from ExactSums records."""
from __future__ import annotations

import json

import torch

import studies.lm_variance as lmv
from studies.lm_variance_exact import ExactSums
from studies.lm_variance_exact_report import crossover, exact_table, load_cells
from studies.moments_grid import label


def write_cell(folder, policy: str, regime: str, behaviour: str | None, seed: int) -> dict:
    """An ExactSums record over random per-sequence blocks, as lm_variance_exact_run writes it."""
    labels = [label(e, o) for e, o in lmv.runs_for(regime)]
    sums = ExactSums(labels, regime)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        hidden = torch.randn(4, 3, 5, generator=gen)
        sums.add({name: torch.randn(4, 3, 7, generator=gen) for name in labels}, hidden)
    record = {"policy": policy, "regime": regime, "behaviour": behaviour, **sums.statistics(n_boot=50),
              "kl_pi_ref": 1.5, "kl_mu_pi": 0.0 if regime == "on" else 0.05, "seconds": 1.0}
    suffix = "" if regime == "on" else f"-{behaviour}"
    (folder / f"{policy}-{regime}{suffix}.json").write_text(json.dumps(record))
    return record


def test_exact_table_has_one_row_per_cell_against_the_regimes_reference(tmp_path):
    assert "No cell" in exact_table(tmp_path)
    off = write_cell(tmp_path, "k1-b0.1", "off", "behaviour-5", 1)
    on = write_cell(tmp_path, "k1-b0.1", "on", None, 0)
    cells = load_cells(tmp_path)
    assert [c["regime"] for c in cells] == ["on", "off"]
    assert on["reference"] == "analytic-future" and off["reference"] == "analytic-future-is"
    table = exact_table(tmp_path).splitlines()
    rows = [row for row in table if row.startswith("| k1-b0.1")]
    assert len(rows) == 2 and "off (behaviour-5)" in rows[1] and "`analytic-future-is`" in rows[1]
    ratio = on["estimators"]["reinforce"]["trace_ratio_to_reference"]
    assert f"{ratio:.3g} [" in rows[0]
    analytic, reference = on["estimators"]["analytic"], on["estimators"]["analytic-future"]
    expected = (reference["trace"] - analytic["trace"]) / analytic["bias_sq"] if analytic["bias_sq"] > 0 else float("inf")
    assert crossover(on) == expected


def test_findings_state_their_scope_and_count_cells_from_the_records(tmp_path):
    from studies.lm_variance_exact_report import _span, findings

    assert "No cell" in findings(tmp_path)
    cells = [write_cell(tmp_path, "k1-b0.1", "on", None, 0), write_cell(tmp_path, "k1-b0.1-seed1", "on", None, 1),
             write_cell(tmp_path, "k1-b0.1", "off", "behaviour-5", 2)]
    text = findings(tmp_path)
    assert "3 cells (2 on-policy, 1 off-policy), 2 policies, training seeds 0, 1; 12 sequences per cell" in text
    lowest = sum(all(v["trace_ratio_to_reference"] >= 1 for k, v in c["estimators"].items()
                     if v["class"] == "grad_kl" and k != c["reference"]) for c in cells)
    assert f"in {lowest} of 3 cells" in text
    positive = sum(c["estimators"]["analytic"]["bias_sq"] > 0 for c in cells)
    assert f"positive in {positive} of 3 cells" in text
    assert _span([3012.0, 3390.0], 2) == "3,000-3,400" and _span([0.5, 0.5]) == "0.5"


def test_recommendation_table_picks_the_lowest_trace_unbiased_and_the_lowest_mse_per_batch(tmp_path):
    from studies.lm_variance_exact_report import BATCH_SIZES, recommendation_table

    assert "No cell" in recommendation_table(tmp_path)
    cell = write_cell(tmp_path, "k1-b0.1", "on", None, 3)
    est = cell["estimators"]
    unbiased = sorted((v["trace"], k) for k, v in est.items() if v["class"] == "grad_kl")[0][1]
    row = next(line for line in recommendation_table(tmp_path).splitlines() if line.startswith("| k1-b0.1 on"))
    columns = [c.strip() for c in row.strip("|").split("|")]
    assert columns[3].startswith(f"`{unbiased}` (")
    for column, n in zip(columns[4:4 + len(BATCH_SIZES)], BATCH_SIZES):
        mse = {k: max(v["bias_sq"], 0.0) + v["trace"] / n for k, v in est.items()}
        assert mse[column.strip("`")] == min(mse.values())
    assert len(columns) == 5 + len(BATCH_SIZES)


def test_scope_line_spans_each_cells_seconds_per_thread_count(tmp_path):
    from studies.lm_variance_exact_report import findings

    one = write_cell(tmp_path, "k1-b0.1", "on", None, 0)  # a record from before --threads: one thread
    two = {**write_cell(tmp_path, "k1-b0.3", "on", None, 1), "threads": 2, "seconds": 300.0}
    (tmp_path / "k1-b0.3-on.json").write_text(json.dumps(two))
    assert "threads" not in one
    assert "1 s on one CPU thread; 300 s on 2 CPU threads per cell" in findings(tmp_path)
