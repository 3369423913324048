"""kl_estimators and lmgym's masks under hostile parameters (issue 28, item 3): non-finite or
out-of-range parameters are a ValueError, rows without support give the documented value or
raise (never a silent NaN), and the top-k/top-p mask always keeps the top token, keeps every
token at p = 1 and is never empty."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kl_estimators
from kl_estimators import AdaptiveKLController, FixedKLController, LinearLogits, analytic, fused_kl, per_token_kl_loss
from lmgym.masks import top_k_top_p_mask



def _batch(seed: int = 0, b: int = 2, t: int = 3, v: int = 5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, requires_grad=True)
    ref_logits = torch.randn(b, t, v, generator=g)
    tokens = torch.randint(v, (b, t), generator=g)
    logprobs = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    ref_logprobs = ref_logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    behaviour = logprobs.detach() + torch.randn(b, t, generator=g)
    return logits, ref_logits, logprobs, ref_logprobs, behaviour, torch.ones(b, t, dtype=torch.bool)


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize("clip", [math.inf, 1e39, math.nan, -1.0, 0.0, (0.0, math.inf), (math.nan, 1.0), (2.0, 1.0), (0.0, 1e39), "2", True])
@pytest.mark.parametrize("estimator", ["k3-loss", "reinforce-future"])
def test_weight_clip_out_of_domain_is_a_value_error(estimator, clip):
    logits, ref_logits, logprobs, ref_logprobs, behaviour, mask = _batch()
    with pytest.raises(ValueError, match="weight_clip"):
        per_token_kl_loss(estimator, logprobs, ref_logprobs, mask, behaviour_logprobs=behaviour, importance="sequence" if estimator == "k3-loss" else None, weight_clip=clip)


@pytest.mark.parametrize("clip", [1e30, 3.0e38, (0.0, 3.0e38), 1e-30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_large_finite_weight_clip_gives_finite_weights(clip, dtype):
    from kl_estimators.weights import weight

    log_w = torch.tensor([-1e4, 0.0, 80.0, 1e4, math.inf], dtype=dtype)
    assert torch.isfinite(weight(log_w, clip, differentiable=False)).all()


def test_clipped_loss_is_finite_for_huge_log_ratios():
    logits, ref_logits, logprobs, ref_logprobs, behaviour, mask = _batch()
    out = per_token_kl_loss("k3-loss", logprobs, ref_logprobs, mask, behaviour_logprobs=behaviour * 100, importance="sequence", weight_clip=1e30)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("temperature", [math.inf, -math.inf, math.nan, 0.0, -1.0, True, "1"])
def test_temperature_out_of_domain_is_a_value_error(temperature):
    with pytest.raises(ValueError, match="temperature"):
        LinearLogits(torch.zeros(1, 1, 2), torch.zeros(3, 2), temperature=temperature)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, -1.0, True])
def test_fixed_controller_refuses_non_finite_or_negative(value):
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(value)


@pytest.mark.parametrize("name", ["init_kl_coef", "target", "horizon"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, -1.0, True])
def test_adaptive_controller_refuses_non_finite_or_out_of_range(name, value):
    kwargs = {"init_kl_coef": 0.1, "target": 6.0, "horizon": 10_000.0, name: value}
    with pytest.raises(ValueError, match=name):
        AdaptiveKLController(**kwargs)


@given(kl=st.floats(0, 1e6), n=st.integers(0, 10**6), horizon=st.floats(1e-3, 1e6))
@settings(max_examples=200, deadline=None)
def test_adaptive_controller_never_makes_beta_negative(kl, n, horizon):
    controller = AdaptiveKLController(0.1, 6.0, horizon)
    try:
        beta = controller.update(kl, n)
    except ValueError as error:
        assert "horizon" in str(error) and n >= 5 * horizon
        return
    assert beta >= 0 and math.isfinite(beta)


def test_target_kl_100_horizon_1_is_refused_not_a_negative_beta():
    controller = AdaptiveKLController(0.1, 100.0, 1)
    with pytest.raises(ValueError, match="horizon"):
        controller.update(0.0, 6)  # the example: beta would be -0.02


# ---------------------------------------------------------------- rows without support


def test_analytic_row_of_p_without_support_raises():
    p = torch.tensor([[0.0, 1.0], [-math.inf, -math.inf]])
    with pytest.raises(ValueError, match="no support"):
        analytic(p, torch.zeros(2, 2))


@pytest.mark.parametrize("chunk", [None, 1])
def test_analytic_row_of_q_without_support_is_inf_with_zero_gradient(chunk):
    p = torch.tensor([[0.0, 1.0], [0.5, 0.0]], requires_grad=True)
    q = torch.tensor([[0.0, 0.0], [-math.inf, -math.inf]])
    kl = analytic(p, q, chunk_size=chunk)
    assert math.isfinite(float(kl[0].detach())) and float(kl[1].detach()) == math.inf
    kl[0].backward()
    assert torch.isfinite(p.grad).all() and (p.grad[1] == 0).all()


def test_analytic_masked_empty_row_is_zero():
    p = torch.tensor([[0.0, 1.0], [-math.inf, -math.inf]])
    kl = analytic(p, p.clone(), mask=torch.tensor([True, False]))
    assert kl.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("which", ["policy", "reference"])
def test_fused_kl_with_no_support_raises(which):
    hidden, weight = torch.randn(1, 2, 3), torch.randn(4, 3)
    empty = torch.full((4,), -math.inf)
    with pytest.raises(ValueError, match="no support"):
        policy = LinearLogits(hidden, weight, empty if which == "policy" else None)
        reference = LinearLogits(hidden, weight, empty if which == "reference" else None)
        fused_kl(policy, reference)


@given(
    rows=st.lists(st.lists(st.one_of(st.floats(-30, 30), st.just(-math.inf)), min_size=3, max_size=3), min_size=1, max_size=4),
    ref=st.lists(st.lists(st.one_of(st.floats(-30, 30), st.just(-math.inf)), min_size=3, max_size=3), min_size=4, max_size=4),
)
@settings(max_examples=200, deadline=None)
def test_analytic_is_never_a_silent_nan(rows, ref):
    p = torch.tensor(rows, dtype=torch.float64)
    q = torch.tensor(ref[: len(rows)], dtype=torch.float64)
    try:
        kl = analytic(p, q)
    except ValueError as error:
        assert "no support" in str(error) and torch.isneginf(p).all(-1).any()
        return
    assert not torch.isnan(kl).any()
    assert (kl >= -1e-9).all()


# ---------------------------------------------------------------- the top-k/top-p mask


def test_tiny_top_p_keeps_the_top_token():
    logits = torch.randn(3, 50)
    keep = top_k_top_p_mask(logits, top_p=1e-46)
    assert keep.sum(-1).tolist() == [1, 1, 1]
    assert (keep.float().argmax(-1) == logits.argmax(-1)).all()


def test_top_p_one_keeps_every_token_of_peaked_logits():
    logits = torch.zeros(2, 50_000)
    logits[:, 0] = 40.0  # the tail's mass is below float32 resolution next to the peak
    assert top_k_top_p_mask(logits, top_p=1.0).all()


@given(
    logits=st.lists(st.floats(-100, 100), min_size=1, max_size=40),
    top_p=st.one_of(st.floats(5e-324, 1.0), st.just(1.0), st.just(5e-324)),
    top_k=st.one_of(st.none(), st.integers(1, 50)),
)
@settings(max_examples=300, deadline=None)
def test_mask_always_keeps_the_top_token_and_is_the_smallest_nucleus(logits, top_p, top_k):
    z = torch.tensor(logits)
    keep = top_k_top_p_mask(z, top_k=top_k, top_p=top_p)
    assert keep[int(torch.sort(z, descending=True, stable=True).indices[0])]
    if top_p == 1.0 and top_k is None:
        assert keep.all()
    if top_k is not None:
        assert int(keep.sum()) <= top_k
    if top_k is None:  # the kept mass reaches p (in float64), and dropping the least kept token falls below it
        probs = z.double().softmax(-1)
        assert float(probs[keep].sum()) >= top_p * (1 - 1e-12) or keep.all()


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_top_p_out_of_range_is_a_value_error(bad):
    with pytest.raises(ValueError, match="top_p"):
        top_k_top_p_mask(torch.zeros(3), top_p=bad)


def test_estimators_package_exports_the_controllers():
    assert kl_estimators.AdaptiveKLController is AdaptiveKLController


# ---------------------------------------------------------------- a grid of hostile batches

SHAPES = {"empty-batch": (0, 3, 5), "empty-time": (2, 0, 5), "one-token-vocab": (2, 3, 1), "plain": (2, 3, 5)}
BATCHES = ["plain", "all-masked", "huge-logits", "ref-masked-vocab", "far-off-policy", "bf16"]


def _hostile(shape_name: str, kind: str):
    b, t, v = SHAPES[shape_name]
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(b, t, v, generator=g) * (1e4 if kind == "huge-logits" else 1.0)
    ref_logits = torch.randn(b, t, v, generator=g)
    if kind == "ref-masked-vocab" and v > 1:
        ref_logits[..., 1:] = -math.inf  # pi_ref puts all its mass on token 0
    tokens = torch.zeros(b, t, dtype=torch.long)  # token 0: in every support
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    logits = logits.to(dtype).requires_grad_()
    logprobs = logits.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    ref_logprobs = ref_logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    behaviour = logprobs.detach() + (30.0 if kind == "far-off-policy" else 0.5)
    mask = torch.zeros(b, t, dtype=torch.bool) if kind == "all-masked" else torch.ones(b, t, dtype=torch.bool)
    return logits, ref_logits.to(dtype), logprobs, ref_logprobs, behaviour, mask


@pytest.mark.parametrize("kind", BATCHES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("estimator", kl_estimators.ESTIMATORS)
def test_every_estimator_on_hostile_batches_is_finite_or_refused(estimator, shape_name, kind):
    """The sequence loss and its gradient are finite, or the call is a ValueError; never NaN
    (+inf only where the documented KL is +inf: pi outside pi_ref's support)."""
    from kl_estimators import ESTIMATOR_INFO, sequence_kl_loss

    logits, ref_logits, logprobs, ref_logprobs, behaviour, mask = _hostile(shape_name, kind)
    info = ESTIMATOR_INFO[estimator]
    kwargs = {"behaviour_logprobs": behaviour} if info.uses_behaviour else {}
    if info.needs_logits:
        kwargs.update(logits=logits, ref_logits=ref_logits)
    if info.uses_behaviour or kind == "far-off-policy":
        kwargs["weight_clip"] = 10.0
    try:
        loss = sequence_kl_loss(estimator, logprobs, ref_logprobs, mask, **kwargs)
    except ValueError:
        return
    assert not torch.isnan(loss), (estimator, shape_name, kind)
    if torch.isfinite(loss) and loss.requires_grad:
        loss.backward()
        assert logits.grad is None or not torch.isnan(logits.grad).any()
