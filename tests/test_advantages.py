"""Advantage estimators against hand-computed values."""

import math

import pytest
import torch

from mmgrpo.advantages import (
    compute_advantages,
    decoupled_normalized,
    group_mean_std,
    median_baseline,
    ngrpo_calibrated,
    normalized,
    rank_to_normal,
    weighted_sum,
)

NAN = math.nan
EPS = 1e-4


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_group_mean_std_ignores_nan():
    x = t(1.0, 2.0, 3.0, NAN, 5.0, 5.0)
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    mean, std, count = group_mean_std(x, g)
    assert mean.tolist() == [2.0, 2.0, 2.0, 2.0, 5.0, 5.0]
    assert std[:4].tolist() == [1.0] * 4  # unbiased std of 1, 2, 3
    assert std[4:].tolist() == [0.0, 0.0]
    assert count.tolist() == [3, 3, 3, 3, 2, 2]


def test_grpo_group_scale_hand_computed():
    x = t(1.0, 2.0, 3.0, 0.0, 4.0)
    g = torch.tensor([0, 0, 0, 1, 1])
    adv = normalized(x, g, "group", EPS)
    # group 0: mean 2, std 1; group 1: mean 2, std sqrt(8) = 2.828427
    expected = [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), -2 / (math.sqrt(8) + EPS), 2 / (math.sqrt(8) + EPS)]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)


def test_batch_scale_uses_group_mean_and_batch_std():
    x = t(1.0, 2.0, 3.0, 0.0, 4.0)
    g = torch.tensor([0, 0, 0, 1, 1])
    batch_std = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0]).std().item()  # 1.5811
    adv = normalized(x, g, "batch", EPS)
    assert adv.tolist() == pytest.approx([(v - 2.0) / (batch_std + EPS) for v in [1, 2, 3, 0, 4]], rel=1e-6)


def test_dr_grpo_no_std():
    adv = normalized(t(1.0, 2.0, 6.0), torch.tensor([0, 0, 0]), "none")
    assert adv.tolist() == pytest.approx([-2.0, -1.0, 3.0])


def test_nan_rows_get_zero_and_are_excluded_from_stats():
    x = t(1.0, NAN, 3.0)
    adv = compute_advantages(x[:, None], torch.tensor([0, 0, 0]), t(1.0), eps=EPS)
    # statistics over {1, 3}: mean 2, std sqrt(2)
    s = math.sqrt(2) + EPS
    assert adv.advantages.tolist() == pytest.approx([-1 / s, 0.0, 1 / s], rel=1e-6)
    assert adv.valid.tolist() == [True, False, True]
    assert adv.keep.tolist() == [True, False, True]


def test_weighted_sum_partial_nan_and_all_nan():
    r = torch.tensor([[1.0, 2.0], [NAN, 2.0], [NAN, NAN]])
    total = weighted_sum(r, t(0.5, 2.0))
    assert total[:2].tolist() == [4.5, 4.0]
    assert math.isnan(total[2])


def test_zero_std_groups_reported():
    r = t(1.0, 1.0, 0.0, 1.0, 0.5, NAN)[:, None]
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    out = compute_advantages(r, g, t(1.0))
    assert out.zero_std.tolist() == [True, False, True]  # group 2 has one valid row
    assert out.advantages[:2].tolist() == [0.0, 0.0]


def test_median_baseline_pivot_excluded():
    x = t(0.0, 1.0, 5.0, 2.0, 2.0)  # group 0 of 3 (median 1), group 1 of 2 (lower median 2)
    g = torch.tensor([0, 0, 0, 1, 1])
    adv, keep = median_baseline(x, g, "none")
    assert adv.tolist() == [-1.0, 0.0, 4.0, 0.0, 0.0]
    assert keep.tolist() == [True, False, True, False, True]  # one pivot per group


def test_median_through_dispatcher_marks_keep():
    out = compute_advantages(t(0.0, 1.0, 5.0)[:, None], torch.tensor([0, 0, 0]), t(1.0), estimator="median", scale="none")
    assert out.keep.tolist() == [True, False, True]
    assert out.advantages.tolist() == [-1.0, 0.0, 4.0]


def test_rank_to_normal_quantiles_and_ties():
    adv = rank_to_normal(t(10.0, 30.0, 20.0), torch.tensor([0, 0, 0]))
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor([0.5 / 3, 1.5 / 3, 2.5 / 3])).tolist()
    assert adv.tolist() == pytest.approx([q[0], q[2], q[1]], abs=1e-6)
    tied = rank_to_normal(t(1.0, 1.0, 3.0), torch.tensor([0, 0, 0]))
    assert tied[0] == tied[1] == pytest.approx((q[0] + q[1]) / 2, abs=1e-6)
    assert rank_to_normal(t(2.0, 2.0), torch.tensor([0, 0])).tolist() == [0.0, 0.0]


def test_ngrpo_virtual_max_gives_signal_to_all_wrong_group():
    adv = ngrpo_calibrated(t(0.0, 0.0, 0.0), torch.tensor([0, 0, 0]), max_reward=1.0, eps=EPS)
    # augmented {0, 0, 0, 1}: mean 0.25, unbiased std 0.5
    assert adv.tolist() == pytest.approx([-0.25 / (0.5 + EPS)] * 3, rel=1e-6)
    plain = normalized(t(0.0, 0.0, 0.0), torch.tensor([0, 0, 0]))
    assert plain.tolist() == [0.0, 0.0, 0.0]


def test_gdpo_differs_from_sum_then_normalize():
    # Two rewards on very different scales: GDPO normalises each before summing.
    r = torch.tensor([[0.0, 0.0], [1.0, 100.0], [0.0, 200.0], [1.0, 300.0]])
    g = torch.tensor([0, 0, 0, 0])
    w = t(1.0, 1.0)
    gdpo = decoupled_normalized(r, g, w, EPS)
    a = normalized(r[:, 0], g, "group", EPS)
    b = normalized(r[:, 1], g, "group", EPS)
    s = a + b
    expected = (s - s.mean()) / (s.std() + EPS)
    assert gdpo.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    summed = compute_advantages(r, g, w).advantages
    assert not torch.allclose(summed, gdpo, atol=1e-2)
    via_dispatch = compute_advantages(r, g, w, combine="normalize_then_sum").advantages
    assert torch.allclose(via_dispatch, gdpo)


def test_clip():
    out = compute_advantages(t(0.0, 0.0, 0.0, 10.0)[:, None], torch.tensor([0] * 4), t(1.0), scale="none", clip=5.0)
    assert out.advantages.tolist() == [-2.5, -2.5, -2.5, 5.0]


def test_group_ids_need_not_be_contiguous_or_sorted():
    x = t(1.0, 10.0, 3.0, 30.0)
    g = torch.tensor([7, 2, 7, 2])
    adv = normalized(x, g, "none")
    assert adv.tolist() == [-1.0, -10.0, 1.0, 10.0]


def test_bad_names_raise():
    with pytest.raises(ValueError, match="estimator"):
        compute_advantages(t(1.0, 2.0)[:, None], torch.tensor([0, 0]), t(1.0), estimator="nope")
    with pytest.raises(ValueError, match="max_reward"):
        compute_advantages(t(1.0, 2.0)[:, None], torch.tensor([0, 0]), t(1.0), estimator="ngrpo")
