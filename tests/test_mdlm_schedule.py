"""Co-GRPO's learned sampling schedule (pipelines/mdlm/schedule.py) and the sampler's StepPlan path."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from test_mdlm_sampler import MASK, ToyMaskedLM

import mmgrpo.pipelines.mdlm.schedule as schedule_module
from mmgrpo.config import LossConfig
from mmgrpo.pipelines.mdlm import MaskedDiffusionAdapter
from mmgrpo.pipelines.mdlm.sampler import block_schedule, denoise
from mmgrpo.pipelines.mdlm.schedule import LearnedSchedule, StepPlan, initial_fractions
from mmgrpo.pipelines.mdlm.tiny import build_tiny_mdlm
from mmgrpo.trainer import accumulate_gradients, train

PROMPTS = ["A:12+345=", "C:3,5,7>22="]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_mdlm(tmp_path_factory.mktemp("mdlm") / "model", hidden=32, layers=1, heads=2)


@pytest.mark.parametrize("gen_length, block, steps", [(8, 4, 5), (8, 8, 3), (6, 3, 4), (8, 2, 4)])
def test_the_plan_at_its_start_is_the_plain_sampler(gen_length, block, steps):
    """Each row at the configured temperature and the starting fractions commits exactly block_schedule's counts."""
    model = ToyMaskedLM(2 + gen_length, seed=6)
    canvas = torch.cat([torch.tensor([[0, 1], [2, 2], [1, 0]]), torch.full((3, gen_length), MASK)], 1)
    fraction = initial_fractions(block_schedule(gen_length, block, steps)).expand(3, -1)  # [3, S]
    kwargs = {"block_length": block, "steps": steps, "temperature": 0.7}
    with torch.no_grad():
        plain = denoise(model, canvas, gen_length, MASK, torch.Generator().manual_seed(0), **kwargs)
        planned = denoise(model, canvas, gen_length, MASK, torch.Generator().manual_seed(0), **kwargs,
                          plan=StepPlan(torch.full((3, steps), 0.7), fraction))  # fmt: skip
    assert torch.equal(plain.canvas, planned.canvas) and torch.equal(plain.commit_step, planned.commit_step)
    assert planned.active.all() and planned.active.shape == (3, steps)


def test_each_row_commits_its_own_share_of_what_is_left():
    model = ToyMaskedLM(8, seed=7)
    canvas = torch.full((3, 8), MASK)
    fraction = torch.tensor([[1.0, 0.5, 0.3, 0.9], [0.0, 0.5, 0.6, 0.9], [0.4, 0.5, 0.26, 0.9]])  # [3, 4]
    with torch.no_grad():  # 2 blocks of 4 in 2 + 2 slots; slot 1 and 3 end their block
        done = denoise(model, canvas, 8, MASK, torch.Generator().manual_seed(1), block_length=4, steps=4,
                       plan=StepPlan(1.0, fraction))  # fmt: skip
    per_forward = [[row.count(s) for s in range(done.forwards)] for row in done.commit_step.tolist()]
    # row 0: all 4 at slot 0, its slot 1 idle; row 1: max(1, round(0)) = 1 then 3; row 2: round(1.6) = 2 then 2
    # block 1: round(0.3 * 4) = 1, round(0.6 * 4) = 2, round(0.26 * 4) = 1, then what is left
    assert per_forward == [[4, 0, 1, 3], [1, 3, 2, 2], [2, 2, 1, 3]]
    assert done.active.tolist() == [[True, False, True, True], [True] * 4, [True] * 4]
    assert done.row_forwards.tolist() == [3, 4, 4]
    with pytest.raises(ValueError, match="leave threshold unset"):
        denoise(model, canvas, 8, MASK, torch.Generator(), threshold=0.5, plan=StepPlan(1.0, fraction))


def test_log_prob_of_the_draws_is_the_gaussian_closed_form():
    plan = block_schedule(6, 3, 4)  # [[2, 1], [2, 1]]: slots 1 and 3 end their block
    schedule = LearnedSchedule(plan, temperature=0.8, std=0.25, scale=10.0)
    with torch.no_grad():
        schedule.log_temperature.copy_(torch.tensor([0.01, -0.02, 0.03, 0.0]))
        schedule.fraction_logit.copy_(torch.tensor([-0.05, 0.0, 0.02, 0.04]))
    log_t, logit_f = schedule.draw(5, torch.Generator().manual_seed(0))  # [5, 4] each
    active = torch.ones(5, 4, dtype=torch.bool)
    active[0, 3] = False
    mean_t = math.log(0.8) + 10 * torch.tensor([0.01, -0.02, 0.03, 0.0])
    mean_f = torch.logit(torch.tensor([2 / 3, 0.98, 2 / 3, 0.98])) + 10 * torch.tensor([-0.05, 0.0, 0.02, 0.04])

    def normal(x, m):
        return -((x - m) ** 2) / (2 * 0.25**2) - math.log(0.25 * math.sqrt(2 * math.pi))

    expected = normal(log_t, mean_t) + normal(logit_f, mean_f) * torch.tensor([1.0, 0.0, 1.0, 0.0])  # [5, 4]
    expected[0, 3] = 0.0
    got = schedule.log_prob(log_t, logit_f, active, [0, 1, 2, 3])
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(schedule.log_prob(log_t, logit_f, active, [2, 0]), expected[:, [2, 0]], atol=1e-5)
    with schedule.reference():  # the starting schedule, whatever the parameters
        start = schedule.log_prob(log_t, logit_f, active, [0])
    start_f = torch.logit(torch.tensor(2 / 3))
    assert torch.allclose(start[:, 0], normal(log_t[:, 0], math.log(0.8)) + normal(logit_f[:, 0], start_f), atol=1e-5)
    plan_at_draws = schedule.plan(log_t, logit_f)
    assert torch.allclose(plan_at_draws.temperature, log_t.exp()) and (plan_at_draws.fraction[:, [1, 3]] == 1).all()


def test_the_adapter_appends_one_schedule_step_per_sampler_step(tiny_path):
    adapter = MaskedDiffusionAdapter(str(tiny_path), finetune="full", gen_length=6, block_length=3, steps=4,
                                     learn_schedule=True)  # fmt: skip
    rollout = adapter.sample(PROMPTS, 3, torch.Generator().manual_seed(0))
    assert rollout.log_probs.shape == (6, 6 + 4)
    assert torch.equal(rollout.mask[:, 6:], rollout.extras["schedule_active"])
    assert [k for k in adapter.trainable_parameters() if k.startswith("schedule.")] == [
        "schedule.log_temperature", "schedule.fraction_logit"]  # fmt: skip
    sample = rollout.samples[0]
    assert len(sample["temperature"]) == 4 and sample["fraction"][1] == 1.0
    assert torch.allclose(torch.tensor(sample["temperature"]), rollout.extras["schedule_log_temperature"][0].exp())
    rollout.advantages = torch.linspace(-1, 1, 6)
    stats = accumulate_gradients(adapter, rollout, LossConfig(), micro_batch_size=6)
    assert stats["ratio/mean"] == pytest.approx(1.0, abs=1e-6)
    assert all(adapter.schedule.get_parameter(k).grad.abs().sum() > 0 for k in ("log_temperature", "fraction_logit"))
    evaluated = adapter.sample(PROMPTS, 1, torch.Generator().manual_seed(0), evaluate=True)
    assert evaluated.samples[0]["temperature"] == pytest.approx([1.0] * 4)  # the means: the configured start
    for bad in ({"estimator": "trajectory"}, {"threshold": 0.9}, {"temperature": 0}, {"eval_steps": 6}):
        with pytest.raises(ValueError, match="learn_schedule draws each step's temperature"):
            MaskedDiffusionAdapter(str(tiny_path), gen_length=6, block_length=3, steps=4, learn_schedule=True, **bad)


def test_a_reward_that_prefers_a_schedule_moves_the_schedule_toward_it(tiny_path, tmp_path):
    """A synthetic reward: cold sampling and many tokens per forward. GRPO through the schedule's decision steps
    lowers every temperature mean and raises the fractions that decide something (slots 0 and 2)."""
    adapter = MaskedDiffusionAdapter(str(tiny_path), finetune="full", gen_length=6, block_length=3, steps=4,
                                     learn_schedule=True, schedule_lr_scale=3.0, schedule_std=1.0)  # fmt: skip

    def cold_and_fast(samples, prompts, **_):
        return [s["tokens_per_forward"] - sum(s["temperature"]) / len(s["temperature"]) for s in samples]

    config = {"modality": "mdlm", "rewards": [{"name": "cold_and_fast"}], "eval": {"num_prompts": 0},
              "optim": {"lr": 3e-2}, "loss": {"beta": 0.0},
              "train": {"max_steps": 10, "prompts_per_step": 2, "group_size": 8, "checkpoint_every": 10}}  # fmt: skip
    train(config, adapter=adapter, rewards={"cold_and_fast": cold_and_fast}, prompts=PROMPTS, out=tmp_path / "run",
          progress=False)  # fmt: skip
    mean_t, mean_f = (m.detach().cpu() for m in adapter.schedule.means())
    start_t, start_f = adapter.schedule.start_log_temperature.cpu(), adapter.schedule.start_fraction_logit.cpu()
    assert (mean_t < start_t - 0.1).all() and (mean_t - start_t).mean() < -0.3, mean_t - start_t  # -0.19 to -0.82
    assert (mean_f[[0, 2]] > start_f[[0, 2]] + 0.2).all(), mean_f - start_f  # +0.72, +0.44
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step_000010" / "trainable.safetensors"))
    assert torch.equal(saved["schedule.log_temperature"], adapter.schedule.log_temperature.detach().cpu())


def test_doctests():
    assert doctest.testmod(schedule_module).failed == 0
