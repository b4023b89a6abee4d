"""Policy losses, KL estimators and aggregation modes against closed forms and worked examples."""

import math

import pytest
import torch

from mmgrpo.losses import aggregation_weights, gaussian_kl, kl_penalty, policy_loss


def _loss(log_ratio, adv, eps_low=0.2, eps_high=0.2, level="token", mask=None):
    logp = torch.tensor(log_ratio, dtype=torch.float32, requires_grad=True)
    old = torch.zeros_like(logp)
    mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask
    terms = policy_loss(logp, old, torch.tensor(adv), mask, eps_low=eps_low, eps_high=eps_high, level=level)
    return logp, terms


def test_clipped_surrogate_values_and_gradients():
    logp, terms = _loss([[math.log(1.5)], [math.log(1.5)], [math.log(0.5)], [math.log(0.5)]], [1.0, -1.0, 1.0, -1.0])
    # A>0, r=1.5: min(1.5, 1.2) -> 1.2, clipped; A<0, r=1.5: min(-1.5, -1.2) -> -1.5, not clipped
    # A>0, r=0.5: min(0.5, 0.8) -> 0.5 not clipped; A<0, r=0.5: min(-0.5, -0.8) -> -0.8 clipped
    assert terms.loss.squeeze(-1).tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8], rel=1e-6)
    assert terms.clipped.squeeze(-1).tolist() == [True, False, False, True]
    terms.loss.sum().backward()
    # d(-r*A)/dlogp = -r*A where unclipped, 0 where clipped
    assert logp.grad.squeeze(-1).tolist() == pytest.approx([0.0, 1.5, -0.5, 0.0], rel=1e-6)


def test_clip_higher_asymmetric():
    _, terms = _loss([[math.log(1.25)], [math.log(0.75)]], [1.0, -1.0], eps_low=0.2, eps_high=0.28)
    assert terms.loss.squeeze(-1).tolist() == pytest.approx([-1.25, 0.8], rel=1e-6)
    assert terms.clipped.squeeze(-1).tolist() == [False, True]


def test_on_policy_ratio_is_one_and_gradient_is_minus_advantage():
    logp, terms = _loss([[0.0, 0.0]], [2.0])
    assert terms.ratio.tolist() == [[1.0, 1.0]]
    terms.loss.sum().backward()
    assert logp.grad.tolist() == [[-2.0, -2.0]]


def test_gspo_sequence_ratio_is_masked_mean():
    mask = torch.tensor([[True, True, False]])
    logp, terms = _loss([[0.1, 0.3, 5.0]], [1.0], eps_low=1.0, eps_high=1.0, level="sequence", mask=mask)
    assert terms.ratio[0, :2].tolist() == pytest.approx([math.exp(0.2)] * 2, rel=1e-6)
    (terms.loss * mask).sum().backward()
    # loss per token = -exp(s) with s = (l0 + l1) / 2: each of the 2 tokens contributes -exp(s)/2 per logp
    g = -math.exp(0.2) * 2 / 2
    assert logp.grad[0].tolist() == pytest.approx([g, g, 0.0], rel=1e-6)


def test_kl_estimators_values():
    logp = torch.tensor([[math.log(0.4)]])
    ref = torch.tensor([[math.log(0.2)]])
    d = math.log(0.2) - math.log(0.4)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(-d)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * d * d)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(d) - d - 1)


def test_k1_and_k3_are_unbiased_for_categorical_kl():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum()
    for est in ("k1", "k3"):
        per_outcome = kl_penalty(p.log()[None], q.log()[None], est)[0]
        assert (p * per_outcome).sum().item() == pytest.approx(exact.item(), rel=1e-5)
    assert (kl_penalty(p.log()[None], q.log()[None], "k3") >= 0).all()


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 3, 4, 5, generator=g)
    ref = torch.randn(2, 3, 4, 5, generator=g)
    std = torch.rand(1, 3, 1, 1, generator=g) + 0.1
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std.expand_as(mean)), torch.distributions.Normal(ref, std.expand_as(ref))
    ).flatten(2).mean(-1)
    assert torch.allclose(gaussian_kl(mean, ref, std), expected, atol=1e-6)


def _sde_steps():
    """Two rows, 2 SDE steps of known mean gap d (per dim), noise scale g and |dt|: std = g sqrt(|dt|)."""
    d = torch.tensor([[0.3, -0.2], [0.1, 0.4]])  # [n, S] mean gap, the same on every dim
    g = torch.tensor([0.7, 0.5])  # [S]
    dt = torch.tensor([0.04, 0.25])  # [S] |sigma_next - sigma|
    ref = torch.zeros(2, 2, 3, 4)  # [n, S, *D]
    mean = ref + d[:, :, None, None]  # [n, S, *D]
    std = (g * dt.sqrt())[None, :, None, None]  # [1, S, 1, 1]
    return mean, ref, std, d, g, dt.expand(2, 2)


def test_gaussian_kl_exact_convention_divides_by_the_step_variance():
    mean, ref, std, d, g, dt = _sde_steps()
    expected = d**2 / (2 * g**2 * dt)  # mean((mu - mu_ref)^2) / (2 g^2 |dt|), FlowSE-GRPO's form
    torch.testing.assert_close(gaussian_kl(mean, ref, std), expected)
    torch.testing.assert_close(gaussian_kl(mean, ref, std, convention="exact", step_size=dt), expected)


def test_gaussian_kl_flow_grpo_convention_divides_by_g_squared():
    mean, ref, std, d, g, dt = _sde_steps()
    expected = d**2 / (2 * g**2)  # Flow-GRPO: ||mu - mu_ref||^2 / (2 std_dev_t^2) with std_dev_t = g
    torch.testing.assert_close(gaussian_kl(mean, ref, std, convention="flow_grpo", step_size=dt), expected)


def test_kl_conventions_differ_by_one_over_dt():
    mean, ref, std, _, _, dt = _sde_steps()
    exact = gaussian_kl(mean, ref, std, convention="exact")
    flow = gaussian_kl(mean, ref, std, convention="flow_grpo", step_size=dt)
    torch.testing.assert_close(exact / flow, 1 / dt)  # 25x at |dt| = 0.04, 4x at 0.25
    assert (exact / flow)[0, 0].item() == pytest.approx(25.0, rel=1e-5)


def test_flow_grpo_convention_needs_step_sizes():
    mean, ref, std, *_ = _sde_steps()
    with pytest.raises(ValueError, match="step_size"):
        gaussian_kl(mean, ref, std, convention="flow_grpo")
    with pytest.raises(ValueError, match="unknown KL convention"):
        gaussian_kl(mean, ref, std, convention="flowgrpo")


# Worked example: 2 rows, T = 3, row 0 has 2 active steps, row 1 has 1.
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
LOSS = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])


def _agg(mode, micro_batch=(0, 0), world_size=1, rows=2, steps=3.0):
    w = aggregation_weights(
        MASK, mode, micro_batch=torch.tensor(micro_batch), num_rows_global=rows, num_steps_global=steps, world_size=world_size
    )
    return (w * LOSS).sum().item()


def test_aggregations_equal_their_formulas():
    assert _agg("grpo") == pytest.approx(((1 + 2) / 2 + 3 / 1) / 2)  # 2.25
    assert _agg("bnpo") == pytest.approx((1 + 2 + 3) / 3)  # 2
    assert _agg("dr_grpo") == pytest.approx((1 + 2 + 3) / (2 * 3))  # 1
    assert _agg("dapo") == pytest.approx((1 + 2 + 3) / 3)  # 2


def test_bnpo_depends_on_micro_batches_dapo_does_not():
    assert _agg("bnpo", micro_batch=(0, 1)) == pytest.approx((3 / 2 + 3 / 1) / 2)  # 2.25
    assert _agg("dapo", micro_batch=(0, 1)) == pytest.approx(2.0)
    assert _agg("grpo", micro_batch=(0, 1)) == pytest.approx(2.25)


def test_dapo_global_normaliser_over_ranks():
    # This rank holds 3 of 10 active steps of the whole step on 2 ranks; gradients are averaged
    # over ranks afterwards, so the rank's loss is scaled by world_size.
    assert _agg("dapo", world_size=2, steps=10.0) == pytest.approx(6 * 2 / 10)
    assert _agg("grpo", world_size=2, rows=4) == pytest.approx((1.5 + 3) * 2 / 4)


def test_unknown_modes_raise():
    with pytest.raises(ValueError, match="aggregation"):
        _agg("mean")
    with pytest.raises(ValueError, match="KL"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")
