"""paired_gain: the before/after comparison written to eval.json, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from mmgrpo.scoring import paired_gain


def test_closed_form():
    # diffs 1, 2, 3, 4: mean 2.5, sample sd sqrt(5/3), stderr sqrt(5/3) / 2; baseline mean 1
    out = paired_gain([1.0, 1.0, 1.0, 1.0], [2.0, 3.0, 4.0, 5.0])
    stderr = math.sqrt(5 / 3) / 2
    assert out["n"] == 4 and out["mean_diff"] == pytest.approx(2.5)
    assert out["stderr"] == pytest.approx(stderr)
    assert out["ci95"] == pytest.approx([2.5 - 1.96 * stderr, 2.5 + 1.96 * stderr])
    assert out["relative_ci95"] == pytest.approx(out["ci95"])  # divided by |mean before| = 1


def test_relative_interval_uses_the_baseline_mean():
    out = paired_gain([2.0, 2.0, 4.0, 4.0], [3.0, 3.0, 5.0, 5.0])  # every pair +1: no spread
    assert out["stderr"] == 0.0 and out["ci95"] == [1.0, 1.0]
    assert out["relative_ci95"] == pytest.approx([1 / 3, 1 / 3])


def test_unscored_pairs_are_dropped():
    out = paired_gain([1.0, None, 0.0, float("nan")], [2.0, 5.0, 1.0, 3.0])
    assert out["n"] == 2 and out["mean_diff"] == 1.0


def test_degenerate_inputs():
    assert paired_gain([], [])["mean_diff"] is None
    one = paired_gain([0.5], [0.7])
    assert one["mean_diff"] == pytest.approx(0.2) and one["ci95"] is None
    assert paired_gain([0.0, 0.0], [1.0, 0.0])["relative_ci95"] is None  # baseline 0: no relative scale
    with pytest.raises(ValueError, match="same prompts"):
        paired_gain([1.0], [1.0, 2.0])
