"""The masked-diffusion sampler and estimators (pipelines/mdlm/sampler.py, estimators.py) against exact values.

A toy bidirectional model over a vocabulary of 3 tokens plus [MASK] and a completion of 3 tokens is small
enough to enumerate: the exact probability of every completion under the random-order sampler (one token
per step), and the exact mean of the ELBO estimator over every mask.
"""

from __future__ import annotations

import doctest
import itertools
import math

import pytest
import torch

import mmgrpo.pipelines.mdlm.sampler as sampler_module
from mmgrpo.pipelines.mdlm.estimators import (
    antithetic_pair_masks,
    completion_mask,
    d1_canvas,
    draw_antithetic_elbo_masks,
    draw_elbo_masks,
    elbo_canvas,
    elbo_terms,
    token_log_probs,
)
from mmgrpo.pipelines.mdlm.sampler import block_schedule, denoise, transfer_counts

V, MASK, L = 3, 3, 3  # real tokens 0..2, the mask id 3, completion length 3


class ToyMaskedLM(torch.nn.Module):
    """Bidirectional: every position's logits depend on the whole canvas (one-hot, an MLP)."""

    def __init__(self, length: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.length = length
        self.w1 = torch.nn.Parameter(torch.randn(length * (V + 1), 16, generator=g, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(torch.randn(16, length * (V + 1), generator=g, dtype=torch.float64))

    def forward(self, canvas: torch.Tensor) -> torch.Tensor:  # [n, L] -> [n, L, V + 1]
        x = torch.nn.functional.one_hot(canvas, V + 1).double().flatten(1)  # [n, L * (V + 1)]
        logits = (torch.tanh(x @ self.w1) @ self.w2).view(-1, self.length, V + 1)
        return logits.masked_fill(torch.arange(V + 1) == MASK, -torch.inf)  # [MASK] is never predicted


def _exact_log_p(model: ToyMaskedLM, x: tuple[int, ...]) -> tuple[float, float]:
    """(log p(x) under the random-order sampler, E over orders of log p_order(x)) by enumeration."""
    per_order = []
    for order in itertools.permutations(range(L)):
        canvas = torch.full((1, L), MASK)
        logp = 0.0
        for pos in order:
            logp += model(canvas).log_softmax(-1)[0, pos, x[pos]].item()
            canvas[0, pos] = x[pos]
        per_order.append(logp)
    return math.log(sum(math.exp(v) for v in per_order) / len(per_order)), sum(per_order) / len(per_order)


def _exact_elbo_mean(model: ToyMaskedLM, x: tuple[int, ...]) -> float:
    """The elbo estimator's expectation: every mask weighted by P(k) P(subset | k) = 1/L * 1/C(L, k)."""
    masks = torch.tensor([[bool(b >> i & 1) for i in range(L)] for b in range(1, 2**L)])  # [M, L] non-empty
    target = torch.tensor([x])  # [1, L]
    canvas = elbo_canvas(torch.zeros(1, 0, dtype=torch.long), target, masks[None], MASK)  # [M, L]
    with torch.no_grad():
        logp = token_log_probs(model(canvas), target.expand(len(masks), -1))  # [M, L]
    terms = elbo_terms(logp[None], masks[None])[0]  # [M]
    k = masks.sum(-1)
    weights = torch.tensor([1 / (L * math.comb(L, int(kk))) for kk in k], dtype=torch.float64)
    return float((weights * terms.double()).sum())


def test_the_elbo_mean_is_the_order_average_and_below_log_p():
    model = ToyMaskedLM(L)
    total = 0.0
    for x in itertools.product(range(V), repeat=L):
        log_p, order_mean = _exact_log_p(model, x)
        elbo = _exact_elbo_mean(model, x)
        assert elbo == pytest.approx(order_mean, abs=1e-5)  # E_k (L/k) sum_masked = E_order log p_order
        assert elbo <= log_p + 1e-9  # Jensen
        total += math.exp(log_p)
    assert total == pytest.approx(1.0, abs=1e-9)  # p is a distribution over the V^L completions


def test_elbo_estimator_is_unbiased():
    model = ToyMaskedLM(L, seed=1)
    x = (2, 0, 1)
    masks = draw_elbo_masks(1, 20000, L, torch.Generator().manual_seed(0))  # [1, K, L]
    target = torch.tensor([x])
    with torch.no_grad():
        canvas = elbo_canvas(torch.zeros(1, 0, dtype=torch.long), target, masks, MASK)  # [K, L]
        logp = token_log_probs(model(canvas), target.expand(masks.shape[1], -1))  # [K, L]
    terms = elbo_terms(logp[None], masks)[0]  # [K]
    stderr = terms.std().item() / math.sqrt(len(terms))
    assert abs(terms.mean().item() - _exact_elbo_mean(model, x)) < 4 * stderr
    k = masks.sum(-1)[0]
    assert k.min() == 1 and k.max() == L  # k ~ U{1..L}
    assert torch.bincount(k)[1:].float().div(len(k)).sub(1 / L).abs().max() < 0.02


def _antithetic_pair_terms(model: ToyMaskedLM, x: tuple[int, ...]) -> torch.Tensor:
    """ELBO terms [M, 2] of every antithetic pair: each level k with each order of the positions (equally likely)."""
    orders = list(itertools.permutations(range(L)))
    k = torch.tensor([[kk] for kk in range(1, L + 1) for _ in orders])  # [M, 1]
    ranks = torch.tensor([list(order) for _ in range(1, L + 1) for order in orders])  # [M, L]
    masks = antithetic_pair_masks(k, ranks).flatten(0, 1)  # [2M, L]
    target = torch.tensor([x])
    canvas = elbo_canvas(torch.zeros(1, 0, dtype=torch.long), target, masks[None], MASK)  # [2M, L]
    with torch.no_grad():
        logp = token_log_probs(model(canvas), target.expand(len(masks), -1))  # [2M, L]
    return elbo_terms(logp[None], masks[None])[0].view(-1, 2).double()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_antithetic_pairs_keep_the_elbo_mean_and_lower_its_variance(seed):
    """By enumeration: each half of a pair has the plain estimator's mean, and the pair's mean varies less than the
    mean of two independent plain samples (summed over every completion of the toy; 0.56-0.78x at seeds 0-2)."""
    model = ToyMaskedLM(L, seed=seed)
    antithetic, plain = 0.0, 0.0
    for x in itertools.product(range(V), repeat=L):
        pairs = _antithetic_pair_terms(model, x)  # [M, 2]
        exact = _exact_elbo_mean(model, x)
        assert pairs[:, 0].mean().item() == pytest.approx(exact, abs=1e-9)
        assert pairs[:, 1].mean().item() == pytest.approx(exact, abs=1e-9)
        antithetic += pairs.mean(1).var(unbiased=False).item()
        plain += pairs[:, 0].var(unbiased=False).item() / 2  # two independent samples
    assert antithetic < 0.8 * plain


def test_antithetic_draws_pair_complementary_levels_with_the_plain_marginals():
    n, K = 12000, 5
    masks = draw_antithetic_elbo_masks(n, K, L, torch.Generator().manual_seed(0))  # [n, K, L]
    assert masks.shape == (n, K, L)
    first, second = masks[:, 0::2][:, :2], masks[:, 1::2]  # [n, 2, L] each
    assert torch.equal(first.sum(-1) + second.sum(-1), torch.full((n, 2), L + 1))  # levels k and L + 1 - k
    assert (first | second).all() and ((first & second).sum(-1) == 1).all()  # they cover the answer, share one
    for j in range(K):  # every sample alone: each non-empty mask with probability 1 / (L * C(L, k))
        codes = (masks[:, j].long() * 2 ** torch.arange(L)).sum(-1)  # [n]
        freq = torch.bincount(codes, minlength=2**L).double() / n
        assert freq[0] == 0
        for code in range(1, 2**L):
            p = 1 / (L * math.comb(L, bin(code).count("1")))
            assert abs(freq[code].item() - p) < 4 * math.sqrt(p * (1 - p) / n), (j, code)


def test_sampler_draws_from_the_exact_distribution():
    """Random remasking, one token per step, temperature 1: completion frequencies match p(x) by enumeration."""
    model = ToyMaskedLM(L, seed=2)
    n = 6000
    with torch.no_grad():
        done = denoise(model, torch.full((n, L), MASK), L, MASK, torch.Generator().manual_seed(0),
                       steps=L, remasking="random")  # fmt: skip
    counts: dict[tuple[int, ...], int] = {}
    for row in done.canvas.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    for x in itertools.product(range(V), repeat=L):
        p = math.exp(_exact_log_p(model, x)[0])
        observed = counts.get(x, 0) / n
        assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (x, observed, p)


def test_schedule_keeps_the_remainder():
    assert transfer_counts(4, 3) == [2, 1, 1]
    assert block_schedule(8, 4, 5) == [[2, 1, 1], [2, 2]]
    for gen_length, block in [(8, 2), (12, 4), (16, 16), (10, 5)]:
        for steps in range(gen_length // block, 2 * gen_length):
            schedule = block_schedule(gen_length, block, steps)
            assert sum(map(sum, schedule)) == gen_length and sum(map(len, schedule)) == steps
            assert all(sum(c) == block for c in schedule)
            assert all(max(c) - min(c) <= 1 and c == sorted(c, reverse=True) for c in schedule)
    with pytest.raises(ValueError, match="multiple of block_length"):
        block_schedule(8, 3, 4)
    with pytest.raises(ValueError, match="fewer than"):
        block_schedule(8, 2, 3)


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "margin", "entropy"])
def test_committed_tokens_never_change_and_blocks_go_in_order(remasking):
    model = ToyMaskedLM(2 + 8, seed=3)
    prompt = torch.tensor([[0, 1], [2, 2], [1, 0]])
    canvas = torch.cat([prompt, torch.full((3, 8), MASK)], 1)  # [3, 10]
    seen: list[torch.Tensor] = []

    def forward(c: torch.Tensor) -> torch.Tensor:
        seen.append(c.clone())
        return model(c)

    with torch.no_grad():
        done = denoise(forward, canvas, 8, MASK, torch.Generator().manual_seed(1), block_length=4, steps=5,
                       remasking=remasking)  # fmt: skip
    assert done.forwards == len(seen) == 5
    assert torch.equal(done.canvas[:, :2], prompt) and not (done.canvas == MASK).any()
    for before, after in zip(seen, seen[1:] + [done.canvas]):
        committed = before != MASK
        assert torch.equal(after[committed], before[committed])  # never remasked
    step = done.commit_step  # [3, 8]
    assert step[:, :4].max() < step[:, 4:].min()  # block 0 finishes before block 1 starts
    for row in step.tolist():  # 5 steps over 2 blocks of 4: 2, 1, 1 then 2, 2
        assert [row.count(s) for s in range(5)] == [2, 1, 1, 2, 2]
    again = denoise(model, canvas, 8, MASK, torch.Generator().manual_seed(1), block_length=4, steps=5,
                    remasking=remasking)  # fmt: skip
    assert torch.equal(again.canvas, done.canvas) and torch.equal(again.commit_step, done.commit_step)


def test_confidence_threshold_unmasks_several_tokens_per_forward():
    model = ToyMaskedLM(8, seed=4)
    canvas = torch.full((4, 8), MASK)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        eager = denoise(model, canvas, 8, MASK, g, block_length=4, threshold=0.0)  # everything passes
        strict = denoise(model, canvas, 8, MASK, g, block_length=4, threshold=1.1)  # nothing passes: one a step
    assert eager.forwards == 2 and not (eager.canvas == MASK).any()
    assert strict.forwards == 8 and not (strict.canvas == MASK).any()
    assert eager.row_forwards.tolist() == [2] * 4 and strict.row_forwards.tolist() == [8] * 4
    half = torch.cat([torch.full((1, 8), MASK), torch.cat([torch.zeros(1, 4, dtype=torch.long),
                                                           torch.full((1, 4), MASK)], 1)])  # row 1: block 0 given
    with torch.no_grad():
        done = denoise(model, half, 8, MASK, g, block_length=4, threshold=1.1)
    assert done.forwards == 8 and done.row_forwards.tolist() == [8, 4]  # a row's own cost


def test_greedy_sampling_ignores_the_generator():
    model = ToyMaskedLM(4, seed=5)
    canvas = torch.full((2, 4), MASK)
    a = denoise(model, canvas, 4, MASK, torch.Generator().manual_seed(0), temperature=0)
    b = denoise(model, canvas, 4, MASK, torch.Generator().manual_seed(9), temperature=0)
    assert torch.equal(a.canvas, b.canvas)


def test_completion_mask_and_d1_canvas():
    completion = torch.tensor([[5, 3, 9, 3], [5, 6, 7, 8], [3, 3, 3, 3]])
    assert completion_mask(completion, 3).tolist() == [[True, True, False, False], [True] * 4,
                                                       [True, False, False, False]]  # fmt: skip
    prompt = torch.tensor([[1, 2, 4]])
    canvas = d1_canvas(prompt, torch.tensor([[False, True, False]]), 2, MASK)
    assert canvas.tolist() == [[1, MASK, 4, MASK, MASK]]


def test_doctests():
    assert doctest.testmod(sampler_module).failed == 0
