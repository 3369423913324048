"""Truncated sampling under TRL 1.16 (top_k / top_p / min_p), decided by exact enumeration.

TRL samples from the truncated policy pi^M (pi renormalised on the kept tokens M(s)) but scores the
untruncated pi: its policy, old and reference log-probs are all log_softmax(logits / T) (checked
below on the installed trainer). For the KL term this is off-policy with a behaviour of smaller
support, and its old log-probs are pi's, not the sampler's, so no importance weight corrects it.
Enumerated exactly (float64, tabular policies, mask = the top-k / top-p of pi itself): every
estimator's expected gradient then equals neither grad KL(pi || pi_ref) nor grad KL(pi^M || pi_ref)
(the KL of the truncated sampler, which PPOKL follows by re-applying its masks:
tests/test_masked_kl.py). TRL keeps no mask to re-apply, so KLGRPOTrainer refuses truncated
sampling in one line (``trl_checks.check_sampler``).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kl_estimators import ESTIMATOR_INFO
from lmgym.masks import top_k_top_p_mask
from tests.helpers.tabular import make_tabular
from tests.helpers.masked_tabular import framework_estimate, framework_model, masked_kl_gradient


@pytest.mark.parametrize("estimator", tuple(ESTIMATOR_INFO))
def test_no_estimator_is_right_under_trls_truncated_sampling(estimator):
    """Tokens from pi^M, every log-prob from the untruncated pi (mu = sg(pi), TRL's old log-probs):
    a counterexample against both gradients for every estimator (V = 3, T = 2, 3 seeds, top-k 2 and top-p 0.7)."""
    gaps_truncated, gaps_full = [], []
    for seed, (top_k, top_p) in itertools.product(range(3), ((2, None), (None, 0.7))):
        tab = make_tabular(vocab=3, length=2, seed=seed)
        allowed = top_k_top_p_mask(tab.table.detach(), top_k, top_p)
        if allowed.all():
            continue
        gradient = framework_estimate(framework_model(tab, allowed), estimator)
        assert torch.isfinite(gradient).all()
        gaps_truncated.append(float((gradient - masked_kl_gradient(tab, allowed)).abs().max()))
        gaps_full.append(float((gradient - tab.grad(tab.reverse_kl())).abs().max()))
    assert min(len(gaps_truncated), len(gaps_full)) > 0
    assert max(gaps_truncated) > 1e-2 and max(gaps_full) > 1e-2


def test_trl_samples_truncated_but_scores_untruncated(tiny_lm_path, tiny_tokenizer, tmp_path):
    """GRPOTrainer(top_k=2): every generated token is among the 2 most likely of softmax(logits / T),
    while TRL's log-probs of those tokens are the untruncated log_softmax(logits / T)."""
    pytest.importorskip("trl")
    from trl import GRPOTrainer

    from tests.helpers.trl_setup import build

    trainer = build(GRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path, top_k=2, temperature=0.8)
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in ("this movie was", "the plot") * 2])
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, attention_mask=attention).logits[:, -T - 1 : -1].float() / trainer.temperature
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, T)
    mask = inputs["completion_mask"].bool()
    tokens = inputs["completion_ids"].unsqueeze(-1)
    in_top_2 = (logits.topk(2, -1).indices == tokens).any(-1)
    assert bool(in_top_2[mask].all())
    untruncated = logits.log_softmax(-1).gather(-1, tokens).squeeze(-1)
    torch.testing.assert_close(logps[mask], untruncated[mask], rtol=0, atol=1e-5)
    truncated = logits.masked_fill(logits < logits.topk(2, -1).values[..., -1:], float("-inf")).log_softmax(-1)
    assert float((truncated.gather(-1, tokens).squeeze(-1) - untruncated)[mask].abs().max()) > 1e-2
