"""Exact output-layer gradient statistics for the LM variance study, from running sums (no projection).

Per sequence i and estimator e, the output-layer gradient is G_i^e = sum_t delta_it^e h_it^T
([V, d]; ``studies.lm_variance``). With n i.i.d. sequences, S^e = sum_i G_i^e and
Q^e = sum_i |G_i^e|^2 (|G|^2 = sum_{t,t'} (h_t . h_t')(delta_t . delta_t'), no [V, d] tensor):

    E|g|^2         = Q / n                                        (exact per sequence)
    |E g|^2        = (|S|^2 - Q) / (n (n - 1))                    (unbiased: the i != j pairs)
    trace Cov[g]   = E|g|^2 - |E g|^2                             (unbiased)
    |E g^c - E g^r|^2 = (|S^c - S^r|^2 - sum_i |G_i^c - G_i^r|^2) / (n (n - 1))

where |G^c - G^r|^2 = |G^c|^2 + |G^r|^2 - 2 <G^c, G^r> per sequence, <G^c, G^r> =
sum_{t,t'} (h_t . h_t')(delta^c_t . delta^r_t'). Dense sums S are kept only for one estimator per
*class* of equal expected gradient (``classes``: ``ESTIMATOR_INFO``'s named expectation in the
regime, e.g. every unbiased estimator is in ``grad_kl``), so |E g|^2 is pooled over a class and
estimated from its lowest-variance member (``REPRESENTATIVES`` order), and every bias is against
``analytic-future``'s class (grad KL) alone. Memory: one float64 [V, d] per class (226 MB for
SmolLM2-135M).

Intervals: a paired bootstrap over sequences (the same resampled indices for every estimator)
of the ratio of two estimators' E|g|^2 - |E g|^2, with the pooled |E g|^2 held at its estimate:
it contains the sampling error of the second moments, which dominates the trace wherever the
SNR |E g|^2 / trace is small (at most about 1e-2 for the unbiased estimators on the LM), and no
projection error (there is no projection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kl_estimators import ESTIMATOR_INFO

# Class representatives, first present wins: the lowest-variance members measured (docs/variance.md).
REPRESENTATIVES = ("analytic-future", "analytic-future-is", "analytic", "analytic-is", "k2-loss")
REFERENCE_CLASS = "grad_kl"


def classes(labels: list[str], regime: str) -> dict[str, str]:
    """label -> class of equal expected gradient in ``regime`` ("on"/"off"): the
    ``ESTIMATOR_INFO`` quantity it equals (importance="sequence" forms: their on-policy one), or
    the label itself where none is named."""
    out = {}
    for label in labels:
        name, _, options = label.partition("[")
        info = ESTIMATOR_INFO[name]
        if "importance=sequence" in options and "weight_clip" not in options:
            key = info.on_policy_gradient
        elif options:
            key = None if regime == "off" else info.on_policy_gradient
        else:
            key = info.on_policy_gradient if regime == "on" else info.off_policy_gradient
        out[label] = key if key is not None else label
    return out


def pair_inner(delta_a: torch.Tensor, delta_b: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """[B] <G_a, G_b> = sum_{t,t'} (h_t . h_t')(delta_a,t . delta_b,t') per sequence, float64."""
    h = hidden.double()
    return ((delta_a.double() @ delta_b.double().transpose(1, 2)) * (h @ h.transpose(1, 2))).sum((1, 2))


@dataclass
class ExactSums:
    """Running sums of one (policy, regime) cell; ``add`` one chunk of sequences at a time."""

    labels: list[str]
    regime: str
    members: dict[str, str] = field(init=False)
    representative: dict[str, str] = field(init=False)
    n: int = 0
    norm_sq: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # per sequence |G^e|^2
    cross_ref: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # per sequence <G^rep(c), G^rep(ref)>
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # class -> S of its representative

    def __post_init__(self) -> None:
        self.members = classes(self.labels, self.regime)
        self.representative = {}
        for label in sorted(self.labels, key=lambda x: REPRESENTATIVES.index(x) if x in REPRESENTATIVES else len(REPRESENTATIVES)):
            self.representative.setdefault(self.members[label], label)
        if REFERENCE_CLASS not in self.representative:
            raise ValueError(f"no unbiased estimator among {self.labels}: the bias reference needs one")

    def add(self, deltas: dict[str, torch.Tensor], hidden: torch.Tensor) -> None:
        """One chunk: ``deltas[label]`` [B, T, V] (zero at masked positions), ``hidden`` [B, T, d]."""
        ref = deltas[self.representative[REFERENCE_CLASS]]
        for label in self.labels:
            self.norm_sq.setdefault(label, []).append(pair_inner(deltas[label], deltas[label], hidden))
        for cls, label in self.representative.items():
            g = torch.einsum("btv,btd->vd", deltas[label].double(), hidden.double())
            self.sums[cls] = self.sums[cls] + g if cls in self.sums else g
            self.cross_ref.setdefault(cls, []).append(pair_inner(deltas[label], ref, hidden))
        self.n += hidden.shape[0]

    def statistics(self, n_boot: int = 500, seed: int = 0) -> dict:
        """Per label: exact E|g|^2, pooled |E g|^2, trace, and its class's |bias|^2 against grad KL;
        per label, the paired-bootstrap 95 % interval of trace / trace of the reference representative."""
        if self.n < 2:
            raise ValueError("need at least 2 sequences")
        n = self.n
        norm = {k: torch.cat(v).numpy() for k, v in self.norm_sq.items()}
        cross = {k: torch.cat(v).numpy() for k, v in self.cross_ref.items()}
        ref_label = self.representative[REFERENCE_CLASS]
        ref_sum = self.sums[REFERENCE_CLASS]
        mean_sq, bias_sq = {}, {}
        for cls, label in self.representative.items():
            mean_sq[cls] = (float((self.sums[cls] ** 2).sum()) - norm[label].sum()) / (n * (n - 1))
            diff_sq = norm[label] + norm[ref_label] - 2 * cross[cls]
            bias_sq[cls] = (float(((self.sums[cls] - ref_sum) ** 2).sum()) - diff_sq.sum()) / (n * (n - 1))
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero reference trace gives nan ratios, not warnings
            return self._summary(n, norm, mean_sq, bias_sq, ref_label, n_boot, seed)

    def _summary(self, n: int, norm: dict, mean_sq: dict, bias_sq: dict, ref_label: str, n_boot: int, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, (n_boot, n))
        ref_trace_boot = norm[ref_label][idx].mean(1) - mean_sq[REFERENCE_CLASS]
        out = {}
        for label in self.labels:
            cls = self.members[label]
            trace = float(norm[label].mean()) - mean_sq[cls]
            ratio_boot = (norm[label][idx].mean(1) - mean_sq[cls]) / ref_trace_boot
            out[label] = {
                "class": cls,
                "second_moment": float(norm[label].mean()),
                "mean_sq": mean_sq[cls],
                "trace": trace,
                "bias_sq": bias_sq[cls],
                "trace_ratio_to_reference": trace / (float(norm[ref_label].mean()) - mean_sq[REFERENCE_CLASS]),
                "trace_ratio_ci": [float(np.nanquantile(ratio_boot, 0.025)), float(np.nanquantile(ratio_boot, 0.975))]
                if np.isfinite(ratio_boot).any() else [float("nan")] * 2,
            }
        return {"n_sequences": n, "reference": ref_label, "estimators": out}
