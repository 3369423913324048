"""What every KL-gradient estimator's expected gradient and value equal, on- and off-policy.

``ESTIMATOR_INFO[name]`` is the one statement per estimator: the booleans and the named
quantities are checked by exact enumeration in ``tests/test_kl_expectations.py`` (every entry, every
claim), and the estimator table of docs/kl-estimators.md is ``markdown_table()``.

"On-policy": y ~ pi, ``behaviour_logprobs=None``. "Off-policy": y ~ mu, ``behaviour_logprobs`` =
log mu, default options. The sampler q is pi on-policy and mu off-policy. Gradient quantities
(``GRADIENT_QUANTITIES``) hold the state distribution fixed where they say "states from q".
"""

from __future__ import annotations

import re

from dataclasses import dataclass

GRADIENT_QUANTITIES: dict[str, str] = {
    "grad_kl": "grad KL(pi || pi_ref): unbiased",
    "direct": "E_q[sum_t grad KL_t(s_t)], states from q held fixed: the direct part of grad KL, equal to it at T = 1",
    "direct_pi": "E_pi[sum_t grad KL_t(s_t)], states from pi held fixed, whatever the sampler: equal to grad KL at T = 1",
    "zero": "0: no signal",
    "neg_grad_kl_mu_pi": "-grad KL(mu || pi), mu fixed: descending it pushes pi away from mu (0 when mu = pi)",
    "forward_direct": "E_q[sum_t grad KL(pi_ref(.|s_t) || pi(.|s_t))], states from q held fixed: grad of the forward KL(pi_ref || pi) at T = 1",
    "abs_direct": "E_q[sum_t grad sum_v |pi(v|s_t) - pi_ref(v|s_t)|], states from q held fixed: 2 x grad of the total variation at T = 1",
    "k2_mu": "grad E_mu[sum_t k2_t] with mu fixed, = E_mu[sum_t k1_t score_t]: the squared log-ratio under mu, not the KL",
    "grad_kl_minus_forward_direct": "grad KL - E_q[sum_t grad KL(pi_ref(.|s_t) || pi(.|s_t))]: biased by the forward-KL direct term",
}
"""The quantities an expected gradient can equal, by key (``EstimatorInfo.on_policy_gradient`` and
``.off_policy_gradient``); q is the sampling policy (pi on-policy, mu off-policy)."""


@dataclass(frozen=True)
class EstimatorInfo:
    """One estimator: its per-token term, how mu enters, and what its expectations equal.

    ``*_gradient`` name a key of ``GRADIENT_QUANTITIES`` that E_q[gradient] equals exactly, or
    None where it is biased with no simpler form (``on_policy``/``off_policy`` give the form).
    ``unbiased_*``: E_q[gradient] = grad KL(pi || pi_ref) for every length T.
    ``value_unbiased_*``: E_q[sum_t term_t] = KL(pi || pi_ref) for every T.

    Attributes:
        name: the estimator's name, a key of ``ESTIMATOR_INFO`` and an entry of ``ESTIMATORS``.
        term: the per-token loss term, as a formula in plain text.
        term_tex: the same term in TeX (the docs' estimator table renders it with KaTeX).
        behaviour: how the behaviour policy mu enters the term.
        uses_behaviour: whether the term reads ``behaviour_logprobs``.
        needs_logits: whether it needs ``logits`` and ``ref_logits`` (or ``kl``).
        unbiased_on_policy: E_pi[gradient] = grad KL(pi || pi_ref) for every length T.
        unbiased_off_policy: E_mu[gradient] = grad KL(pi || pi_ref) for every T, with mu != pi.
        on_policy_gradient: the key of ``GRADIENT_QUANTITIES`` that E_pi[gradient] equals, or None.
        off_policy_gradient: the key of ``GRADIENT_QUANTITIES`` that E_mu[gradient] equals, or None.
        on_policy: what E_pi[gradient] equals, in words.
        off_policy: what E_mu[gradient] equals, in words.
        value_unbiased_on_policy: E_pi[sum_t term_t] = KL(pi || pi_ref) for every T.
        value_unbiased_off_policy: E_mu[sum_t term_t] = KL(pi || pi_ref) for every T.
        used_by: which framework options compute it.
    """

    name: str
    term: str
    term_tex: str
    behaviour: str
    uses_behaviour: bool
    needs_logits: bool
    unbiased_on_policy: bool
    unbiased_off_policy: bool
    on_policy_gradient: str | None
    off_policy_gradient: str | None
    on_policy: str
    off_policy: str
    value_unbiased_on_policy: bool
    value_unbiased_off_policy: bool
    used_by: str


_IGNORES_MU = "ignored (importance='token'/'sequence' weights it)"
_MYOPIC = "direct part E_pi[sum_t grad KL_t(s_t)]: = grad KL at T = 1, biased for T > 1"
_MYOPIC_AT_MU = "direct part at mu's states, E_mu[sum_t grad KL_t(s_t)]: = grad KL at T = 1, biased for T > 1"
_K2_AT_MU = "grad of E_mu[sum_t k2_t] (mu fixed): biased even at T = 1"


def _info(name: str, term: str, term_tex: str, behaviour: str, on: str | None, off: str | None, on_text: str, off_text: str,
          values: tuple[bool, bool], used_by: str, needs_logits: bool = False) -> EstimatorInfo:
    return EstimatorInfo(
        name=name,
        term=term,
        term_tex=term_tex,
        behaviour=behaviour,
        uses_behaviour=behaviour != _IGNORES_MU,
        needs_logits=needs_logits,
        unbiased_on_policy=on == "grad_kl",
        unbiased_off_policy=off == "grad_kl",
        on_policy_gradient=on,
        off_policy_gradient=off,
        on_policy=on_text,
        off_policy=off_text,
        value_unbiased_on_policy=values[0],
        value_unbiased_off_policy=values[1],
        used_by=used_by,
    )


_ENTRIES = (
    _info("reinforce", "sg(k1_t) + score_t sg(sum_t' k1_t')", r"\mathrm{sg}(\mathrm{k1}_t) + \mathrm{score}_t\,\mathrm{sg}\big(\sum_{t'} \mathrm{k1}_{t'}\big)",
          _IGNORES_MU, "grad_kl", None,
          "grad KL (unbiased)",
          "biased: E_mu[(sum_t score_t)(sum_t k1_t)], no ratio pi/mu; importance='sequence' makes it unbiased",
          (True, False), "sequence-level k1 in the reward (TRL RLOOTrainer)"),
    _info("reinforce-future", "sg(k1_t) + score_t sg(sum_{t'>=t} k1_t')", r"\mathrm{sg}(\mathrm{k1}_t) + \mathrm{score}_t\,\mathrm{sg}\big(\sum_{t' \ge t} \mathrm{k1}_{t'}\big)",
          _IGNORES_MU, "grad_kl", None,
          "grad KL (unbiased); lower variance than reinforce in most problems measured, not all (docs/variance.md)",
          "biased: returns-to-go under mu without ratios",
          (True, False), "per-token k1 in the reward with returns-to-go (PPO with gamma = lambda = 1)"),
    _info("reinforce-future-is", "sg(W_t k1_t) + score_t sg(sum_{t'>=t} W_t' k1_t')", r"\mathrm{sg}(W_t\,\mathrm{k1}_t) + \mathrm{score}_t\,\mathrm{sg}\big(\sum_{t' \ge t} W_{t'}\,\mathrm{k1}_{t'}\big)",
          "prefix ratios W_t", "grad_kl", "grad_kl",
          "grad KL (unbiased); = reinforce-future",
          "grad KL (unbiased) for every mu",
          (True, True), "this library (per-decision importance sampling)"),
    _info("analytic", "KL_t", r"\mathrm{KL}_t",
          _IGNORES_MU, "direct", "direct",
          _MYOPIC, _MYOPIC_AT_MU,
          (True, False), "the seed project's analytic KL gradient", needs_logits=True),
    _info("analytic-is", "sg(W_{t-1}) KL_t", r"\mathrm{sg}(W_{t-1})\,\mathrm{KL}_t",
          "prefix ratios W_{t-1}", "direct_pi", "direct_pi",
          _MYOPIC + "; = analytic",
          "direct part at pi's states, E_pi[sum_t grad KL_t(s_t)], as on-policy: = grad KL at T = 1, biased for T > 1",
          (True, True), "PPOKL analytic_grad (the direct term; the future term goes through PPO's advantage)", needs_logits=True),
    _info("analytic-future", "KL_t + score_t sg(sum_{t'>t} KL_t')", r"\mathrm{KL}_t + \mathrm{score}_t\,\mathrm{sg}\big(\sum_{t' > t} \mathrm{KL}_{t'}\big)",
          _IGNORES_MU, "grad_kl", None,
          "grad KL (unbiased): Rao-Blackwellised (exact KL at every position)",
          "biased: direct terms at mu's states, score terms without ratios",
          (True, False), "Amini, Vieira & Cotterell 2025 (Rao-Blackwellised KL); PPOKL analytic reward + analytic_grad", needs_logits=True),
    _info("analytic-future-is", "sg(W_{t-1}) KL_t + score_t sg(sum_{t'>t} W_{t'-1} KL_t')", r"\mathrm{sg}(W_{t-1})\,\mathrm{KL}_t + \mathrm{score}_t\,\mathrm{sg}\big(\sum_{t' > t} W_{t'-1}\,\mathrm{KL}_{t'}\big)",
          "prefix ratios W_{t-1}", "grad_kl", "grad_kl",
          "grad KL (unbiased); = analytic-future",
          "grad KL (unbiased) for every mu",
          (True, True), "this library", needs_logits=True),
    _info("k1-loss", "k1_t", r"\mathrm{k1}_t",
          _IGNORES_MU, "zero", "neg_grad_kl_mu_pi",
          "0: no signal", "-grad KL(mu || pi): pushes pi away from mu, not towards pi_ref",
          (True, False), "verl kl_loss_type=k1; OpenRLHF use_kl_loss with kl_estimator=k1"),
    _info("k2-loss", "k2_t = (k1_t)^2 / 2", r"\mathrm{k2}_t = \tfrac{1}{2}\,\mathrm{k1}_t^2",
          _IGNORES_MU, "direct", "k2_mu",
          _MYOPIC, _K2_AT_MU,
          (False, False), "verl kl_loss_type=k2/mse; OpenRLHF use_kl_loss with kl_estimator=k2"),
    _info("k3-loss", "k3_t = pi_ref/pi - 1 - log(pi_ref/pi)", r"\mathrm{k3}_t = \frac{\pi_\mathrm{ref}}{\pi} - 1 - \log\frac{\pi_\mathrm{ref}}{\pi}",
          _IGNORES_MU, "forward_direct", None,
          "grad of the forward KL(pi_ref || pi) at T = 1 (direct part of it for T > 1), not the reverse KL",
          "biased: E_mu[sum_t (1 - pi_ref/pi)(y_t|s_t) score_t]",
          (True, False), "GRPO; TRL GRPOTrainer (beta > 0, no bias correction); verl low_var_kl/k3 (clamped); OpenRLHF k3 in the loss"),
    _info("abs-loss", "|k1_t|", r"\lvert \mathrm{k1}_t \rvert",
          _IGNORES_MU, "abs_direct", None,
          "2 x grad of the total variation |pi - pi_ref|_1 / 2 at T = 1 (direct part for T > 1), not the KL",
          "biased: E_mu[sum_t sign(k1_t) score_t]",
          (False, False), "verl kl_loss_type=abs"),
    _info("k1+", "value k1_t, gradient of k2_t", r"\text{value } \mathrm{k1}_t,\ \text{gradient of } \mathrm{k2}_t",
          _IGNORES_MU, "direct", "k2_mu",
          _MYOPIC + "; = k2-loss", _K2_AT_MU,
          (True, False), "verl kl_loss_type=k1+"),
    _info("k3+", "value k3_t, gradient of k2_t", r"\text{value } \mathrm{k3}_t,\ \text{gradient of } \mathrm{k2}_t",
          _IGNORES_MU, "direct", "k2_mu",
          _MYOPIC + "; = k2-loss", _K2_AT_MU,
          (True, False), "verl kl_loss_type=k3+"),
    _info("k3-ratio", "rho_t k3_t, rho_t differentiable", r"\rho_t\,\mathrm{k3}_t,\ \rho_t \text{ differentiable}",
          "token ratio rho_t (differentiable)", "direct", "direct",
          _MYOPIC + "; = k2-loss", _MYOPIC_AT_MU,
          (True, False), "DeepSeek-V3.2; TRL GRPOTrainer use_bias_correction_kl=True (importance_sampling_level='token')"),
    _info("k3+is", "value k3_t, gradient sg(rho_t) grad k2_t", r"\text{value } \mathrm{k3}_t,\ \text{gradient } \mathrm{sg}(\rho_t)\,\nabla \mathrm{k2}_t",
          "token ratio rho_t (detached)", "direct", "direct",
          _MYOPIC + "; = k2-loss", _MYOPIC_AT_MU,
          (True, False), "OpenRLHF unbiased_gradient (clamped w; k1/k2 change only the value)"),
    _info("k3-reward", "sg(k3_t) + score_t sg(sum_{t'>=t} k3_t')", r"\mathrm{sg}(\mathrm{k3}_t) + \mathrm{score}_t\,\mathrm{sg}\big(\sum_{t' \ge t} \mathrm{k3}_{t'}\big)",
          _IGNORES_MU, "grad_kl_minus_forward_direct", None,
          "biased: grad KL - E_pi[sum_t grad KL(pi_ref(.|s_t) || pi(.|s_t))] (k3's own-token term)",
          "biased: k3 returns-to-go under mu without ratios",
          (True, False), "k3 in the per-token reward (verl use_kl_in_reward with kl_penalty=low_var_kl; TRL PPO kl_estimator=k3)"),
)

ESTIMATOR_INFO: dict[str, EstimatorInfo] = {entry.name: entry for entry in _ENTRIES}
"""Each estimator's ``EstimatorInfo``: what its expected gradient and value equal on- and off-policy
(every claim proven by exact enumeration in the tests)."""


# The formulas of ``on_policy`` / ``off_policy`` in TeX, longest first (``tex_prose``).
_TEX_FRAGMENTS: tuple[tuple[str, str], ...] = (
    ("grad KL - E_pi[sum_t grad KL(pi_ref(.|s_t) || pi(.|s_t))]",
     r"\nabla \mathrm{KL} - \mathbb{E}_\pi\big[\sum_t \nabla \mathrm{KL}(\pi_\mathrm{ref}(\cdot \mid s_t) \,\Vert\, \pi(\cdot \mid s_t))\big]"),
    ("E_mu[(sum_t score_t)(sum_t k1_t)]", r"\mathbb{E}_\mu\big[(\sum_t \mathrm{score}_t)(\sum_t \mathrm{k1}_t)\big]"),
    ("E_mu[sum_t (1 - pi_ref/pi)(y_t|s_t) score_t]", r"\mathbb{E}_\mu\big[\sum_t (1 - \pi_\mathrm{ref}/\pi)(y_t \mid s_t)\,\mathrm{score}_t\big]"),
    ("E_mu[sum_t sign(k1_t) score_t]", r"\mathbb{E}_\mu\big[\sum_t \operatorname{sign}(\mathrm{k1}_t)\,\mathrm{score}_t\big]"),
    ("E_pi[sum_t grad KL_t(s_t)]", r"\mathbb{E}_\pi\big[\sum_t \nabla \mathrm{KL}_t(s_t)\big]"),
    ("E_mu[sum_t grad KL_t(s_t)]", r"\mathbb{E}_\mu\big[\sum_t \nabla \mathrm{KL}_t(s_t)\big]"),
    ("E_mu[sum_t k2_t]", r"\mathbb{E}_\mu\big[\sum_t \mathrm{k2}_t\big]"),
    ("-grad KL(mu || pi)", r"-\nabla \mathrm{KL}(\mu \,\Vert\, \pi)"),
    ("KL(pi_ref || pi)", r"\mathrm{KL}(\pi_\mathrm{ref} \,\Vert\, \pi)"),
    ("|pi - pi_ref|_1 / 2", r"\lVert \pi - \pi_\mathrm{ref} \rVert_1 / 2"),
    ("grad KL", r"\nabla \mathrm{KL}"),
    ("T = 1", "T = 1"),
    ("T > 1", "T > 1"),
    ("pi/mu", r"\pi/\mu"),
    ("pi_ref", r"\pi_\mathrm{ref}"),
)
_GREEK = re.compile(r"\b(pi|mu)\b")


def tex_prose(text: str) -> str:
    """``text`` (an ``on_policy`` / ``off_policy`` sentence) with its formulas as ``$TeX$``: each
    fragment of ``_TEX_FRAGMENTS``, then a lone pi or mu, replaced outside the maths already made.

    Args:
        text: a sentence in this module's plain-text notation.

    Returns:
        The sentence as Markdown with ``$...$`` maths (KaTeX on the docs site).
    """
    pieces = [(text, False)]  # (piece, is maths)
    for plain, tex in _TEX_FRAGMENTS:
        pieces = [part for piece, maths in pieces for part in ([(piece, True)] if maths else _split(piece, plain, tex))]
    return "".join(f"${piece}$" if maths else _GREEK.sub(lambda m: f"$\\{m[1]}$", piece) for piece, maths in pieces)


def _split(piece: str, plain: str, tex: str) -> list[tuple[str, bool]]:
    parts = piece.split(plain)
    out = [(parts[0], False)]
    for part in parts[1:]:
        out += [(tex, True), (part, False)]
    return [(text, maths) for text, maths in out if text]


def markdown_table() -> str:
    """The estimator table of docs/kl-estimators.md, generated from ``ESTIMATOR_INFO``."""
    rows = [
        r"| estimator | per-token term | $\mathbb{E}_{y \sim \pi}[\text{gradient}]$ | $\mathbb{E}_{y \sim \mu}[\text{gradient}]$ | used by |",
        "|---|---|---|---|---|",
    ]
    for info in ESTIMATOR_INFO.values():
        cells = (f"`{info.name}`", f"${info.term_tex}$", tex_prose(info.on_policy), tex_prose(info.off_policy), info.used_by)
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)
