"""The invariants every adapter must pass (DESIGN.md). New adapters join by adding a line to CASES."""

from __future__ import annotations

import pytest
import torch

from contract_cases import CASES
from mmgrpo.config import LossConfig
from mmgrpo.scoring import score_rollout
from mmgrpo.advantages import compute_advantages
from mmgrpo.trainer import accumulate_gradients, train

NAMES = sorted(CASES)


def _rollout(case, group_size, seed=0):
    return case.adapter.sample(case.prompts[:2], group_size, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("group_size", [1, 4])
def test_on_policy_ratio_is_one(name, group_size):
    case = CASES[name]()
    rollout = _rollout(case, group_size)
    n = len(rollout)
    for micro in (1, n):
        for start in range(0, n, micro):
            rows = list(range(start, min(start + micro, n)))
            with torch.no_grad():
                scores = case.adapter.log_prob(rollout.select(rows))
            logp = scores.log_probs if hasattr(scores, "log_probs") else scores
            mask = rollout.mask[rows]
            deviation = (torch.exp(logp.float().cpu() - rollout.log_probs[rows]) - 1).abs()[mask]
            assert mask.any()
            assert deviation.max().item() < 1e-6, f"{name}: on-policy ratio off by {deviation.max().item():.2e}"


def _grads(case, rollout, loss_cfg, micro, chunk):
    params = case.adapter.trainable_parameters()
    for p in params.values():
        p.grad = None
    stats = accumulate_gradients(case.adapter, rollout, loss_cfg, micro_batch_size=micro, step_chunk=chunk)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params.values()])
    return stats["loss"], flat


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
def test_loss_and_gradient_invariant_to_micro_batching(name, aggregation):
    case = CASES[name]()
    rollout = _rollout(case, 4)
    components, _ = score_rollout({"r": case.reward}, rollout.samples, rollout.prompts)
    rollout.advantages = compute_advantages(components, rollout.group_id, torch.ones(1)).advantages
    if rollout.advantages.abs().sum() == 0:  # the test needs a non-zero gradient
        rollout.advantages = torch.linspace(-1, 1, len(rollout))
    # Off-policy old log-probs so that clipping is active in some steps.
    rollout.log_probs = rollout.log_probs + 0.3 * torch.randn(rollout.log_probs.shape, generator=torch.Generator().manual_seed(1))
    loss_cfg = LossConfig(aggregation=aggregation, beta=0.05, eps_low=0.2, eps_high=0.28)
    n, T = rollout.log_probs.shape
    ref_loss, ref_grad = _grads(case, rollout, loss_cfg, micro=n, chunk=None)
    assert ref_grad.abs().sum() > 0
    for micro, chunk in [(1, None), (3, None), (n, 1), (2, max(1, T // 2))]:
        loss, grad = _grads(case, rollout, loss_cfg, micro, chunk)
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-7), (micro, chunk)
        assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7), (micro, chunk, (grad - ref_grad).abs().max())


@pytest.mark.parametrize("name", NAMES)
def test_reference_is_frozen_and_leaves_weights_untouched(name):
    case = CASES[name]()
    rollout = _rollout(case, 2)
    with torch.no_grad():
        policy_before = _logp(case.adapter.log_prob(rollout))
        with case.adapter.reference():
            reference_before = _logp(case.adapter.log_prob(rollout))
    assert torch.allclose(policy_before, reference_before, atol=1e-6)  # untrained policy == reference
    params = case.adapter.trainable_parameters()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.5 * torch.randn(p.shape, generator=g).to(p))
    snapshot = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        with case.adapter.reference():
            reference_after = _logp(case.adapter.log_prob(rollout))
        policy_after = _logp(case.adapter.log_prob(rollout))
    for k, p in case.adapter.trainable_parameters().items():
        assert torch.equal(p.detach(), snapshot[k]), f"reference() changed {k}"
    assert torch.allclose(reference_after, reference_before, atol=1e-6)
    assert not torch.allclose(policy_after, policy_before, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_a_few_steps_raise_the_reward(name, tmp_path):
    case = CASES[name]()
    config = {
        "modality": name,
        "rewards": [{"name": "reward"}],
        "eval": {"num_prompts": len(case.prompts), "samples_per_prompt": 4, "seed": 0},
        **case.train,
    }
    result = train(
        config,
        adapter=case.adapter,
        rewards={"reward": case.reward},
        prompts=case.prompts,
        eval_prompts=case.prompts,
        out=tmp_path / "run",
        progress=False,
    )
    before = result.eval["before"]["reward/reward/mean"]
    after = result.eval["after"]["reward/reward/mean"]
    assert after > before + 0.05, f"{name}: reward {before:.3f} -> {after:.3f}"


def _logp(scores):
    return (scores.log_probs if hasattr(scores, "log_probs") else scores).float().cpu()
