"""The LM study's tables on docs/results.md, generated from its result files (results/lm/) by the
study's own report code (``studies.lm_report``), so the page cannot drift from the results.

Used through ``<!-- generated: tools.study_tables:lm_study_table -->`` and
``<!-- generated: tools.study_tables:lm_study_paired_table -->`` (see tools/docs_blocks.py).
"""

from __future__ import annotations

from pathlib import Path

from studies.lm_grid import VARIANTS
from studies.lm_report import aggregate, load_records, paired_table, table

RESULTS = Path(__file__).resolve().parents[1] / "results" / "lm"
LABELS = {name: variant.label for name, variant in VARIANTS.items()}


def lm_study_table() -> str:
    """Per variant and beta: mean ± standard error across seeds of every held-out metric."""
    records, reference = load_records(RESULTS)
    return table(aggregate(records, list(VARIANTS)), LABELS, reference).strip()


def lm_study_paired_table() -> str:
    """Each variant minus the first (the k1 baseline) at the same beta and seed."""
    records, _ = load_records(RESULTS)
    return paired_table(records, LABELS, list(VARIANTS), next(iter(VARIANTS))).strip()
