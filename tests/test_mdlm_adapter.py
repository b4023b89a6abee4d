"""MaskedDiffusionAdapter (pipelines/mdlm/adapter.py) and the trainer's per-iteration rollout hook."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mmgrpo.config import ConfigError, LossConfig
from mmgrpo.pipelines.mdlm import MaskedDiffusionAdapter
from mmgrpo.pipelines.mdlm.tiny import build_tiny_mdlm, char_tokenizer, tiny_masked_lm
from mmgrpo.pipelines.toy import ToyAdapter, toy_prompts
from mmgrpo.trainer import accumulate_gradients, iteration_rollouts, train

PROMPTS = ["A:12+345=", "C:3,5,7>22=", "A:1+2="]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_mdlm(tmp_path_factory.mktemp("mdlm") / "model", hidden=32, layers=1, heads=2)


def _adapter(path, **kwargs):
    options = {"finetune": "full", "gen_length": 6, "block_length": 3, "steps": 4, **kwargs}
    return MaskedDiffusionAdapter(str(path), **options)


class RecordingToy(ToyAdapter):
    """The toy adapter with a for_iteration hook that tags each rollout with its iteration."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls, self.trained_on = [], []

    def for_iteration(self, rollout, iteration, generator):
        weights = torch.cat([p.detach().flatten() for p in self.trainable_parameters().values()])
        self.calls.append((iteration, weights.clone(), torch.is_grad_enabled()))
        tag = torch.full((len(rollout),), iteration)
        return replace(rollout, extras={**rollout.extras, "iteration": tag})

    def log_prob(self, rollout, steps=None):
        if torch.is_grad_enabled():
            self.trained_on.append(int(rollout.extras["iteration"][0]))
        return super().log_prob(rollout, steps)


def test_each_inner_iteration_trains_on_its_own_rollout_built_before_any_update(tmp_path):
    adapter = RecordingToy(max_len=4, hidden=16)
    prompts = toy_prompts(num_train=8, num_eval=0, max_len=4)["train"]
    config = {"modality": "toy", "rewards": [{"name": "sequence_match"}], "eval": {"num_prompts": 0},
              "train": {"max_steps": 2, "prompts_per_step": 2, "group_size": 2, "num_iterations": 3,
                        "micro_batch_size": 4}}  # fmt: skip
    train(config, adapter=adapter, prompts=prompts, out=tmp_path / "run", progress=False)
    assert [k for k, _, _ in adapter.calls] == [0, 1, 2, 0, 1, 2]
    assert not any(grad for _, _, grad in adapter.calls)  # under no_grad
    for step in (0, 3):  # the three rollouts of a step are built with the same, pre-update weights
        first = adapter.calls[step][1]
        assert all(torch.equal(adapter.calls[step + j][1], first) for j in (1, 2))
    assert not torch.equal(adapter.calls[0][1], adapter.calls[3][1])  # the weights did change in between
    assert adapter.trained_on == [0, 1, 2, 0, 1, 2]


def test_adapters_without_the_hook_train_every_iteration_on_the_rollout():
    rollout = object()
    assert iteration_rollouts(ToyAdapter(max_len=2), rollout, 3, torch.Generator()) == [rollout] * 3


def test_d1_iterations_have_their_own_prompt_mask_and_ratio_one(tiny_path):
    adapter = _adapter(tiny_path, estimator="d1", prompt_mask_prob=0.5)
    g = torch.Generator().manual_seed(0)
    rollout = adapter.sample(PROMPTS, 4, g)
    rollout.advantages = torch.linspace(-1, 1, len(rollout))
    rollouts = iteration_rollouts(adapter, rollout, 2, g)
    assert rollouts[0] is rollout
    masks = [torch.cat(r.extras["d1_prompt_mask"]) for r in rollouts]
    assert not torch.equal(masks[0], masks[1])
    assert not torch.allclose(rollouts[0].log_probs, rollouts[1].log_probs)
    for r in rollouts:  # on-policy: the ratio is exactly 1, nothing is clipped
        stats = accumulate_gradients(adapter, r, LossConfig(eps_low=0.2), micro_batch_size=5)
        assert stats["ratio/mean"] == pytest.approx(1.0, abs=1e-6) and stats["clip_frac"] == 0
    with torch.no_grad():
        assert torch.equal(adapter.log_prob(rollouts[1]).cpu(), rollouts[1].log_probs)


def test_elbo_keeps_its_masks_for_every_iteration_and_the_reference(tiny_path):
    adapter = _adapter(tiny_path, estimator="elbo", mc_samples=5)
    rollout = adapter.sample(PROMPTS, 2, torch.Generator().manual_seed(0))
    assert rollout.log_probs.shape == (6, 5) and rollout.mask.all()
    masks = rollout.extras["elbo_masks"]  # [6, 5, 6]
    assert masks.shape == (6, 5, 6) and masks.any(-1).all()
    assert iteration_rollouts(adapter, rollout, 3, torch.Generator()) == [rollout] * 3
    with torch.no_grad():
        one = adapter.log_prob(rollout, [3])  # one MC sample alone equals its column of all five
        assert torch.allclose(one[:, 0], adapter.log_prob(rollout)[:, 3], atol=1e-6)
    assert (rollout.log_probs <= 0).all()


@pytest.mark.parametrize("estimator", ["elbo", "bgpo"])
def test_antithetic_option_pairs_the_mc_samples(tiny_path, estimator):
    adapter = _adapter(tiny_path, estimator=estimator, mc_samples=4, antithetic=True)
    rollout = adapter.sample(PROMPTS, 2, torch.Generator().manual_seed(0))
    masks = rollout.extras["elbo_masks"]  # [6, 4, 6]
    assert torch.equal(masks[:, 0::2].sum(-1) + masks[:, 1::2].sum(-1), torch.full((6, 2), 7))  # k + (L + 1 - k)
    assert (masks[:, 0::2] | masks[:, 1::2]).all()
    stats = accumulate_gradients(adapter, replace(rollout, advantages=torch.linspace(-1, 1, 6)), LossConfig(),
                                 micro_batch_size=6)  # fmt: skip
    assert stats["ratio/mean"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="antithetic pairs the ELBO's MC samples: it needs estimator elbo or bgpo"):
        _adapter(tiny_path, estimator="d1", antithetic=True)


def test_samples_carry_text_tokens_and_unmasking_order(tiny_path):
    adapter = _adapter(tiny_path)
    rollout = adapter.sample(PROMPTS[:1], 3, torch.Generator().manual_seed(1))
    steps = rollout.extras["commit_step"]
    assert steps.shape == (3, 6) and steps[:, :3].max() < steps[:, 3:].min()  # block order
    tokenizer = adapter.tokenizer
    for sample, ids, row in zip(rollout.samples, rollout.extras["completion_ids"], steps):
        tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
        end = tokens.index("[EOS]") if "[EOS]" in tokens else len(tokens)
        assert sample["text"] == "".join(tokens[:end])
        assert sample["tokens"] == tokens[: end + 1] and sample["steps"] == row[: end + 1].tolist()
        assert sample["tokens_per_forward"] == 6 / 4  # 6 canvas tokens in 4 forwards
    again = adapter.sample(PROMPTS[:1], 3, torch.Generator().manual_seed(1))
    assert again.samples == rollout.samples and torch.equal(again.log_probs, rollout.log_probs)


def test_rows_of_a_batch_do_not_change_each_others_samples(tiny_path):
    """Rows with other prompt lengths run in their own forward: a prompt's rows are the same alone or mixed."""
    adapter = _adapter(tiny_path, temperature=0)
    mixed = adapter.sample(PROMPTS, 2, torch.Generator().manual_seed(0))
    alone = adapter.sample(PROMPTS[1:2], 2, torch.Generator().manual_seed(0))
    assert mixed.samples[2:4] == alone.samples
    assert torch.equal(mixed.extras["commit_step"][2:4], alone.extras["commit_step"])


def test_mask_and_special_tokens_are_never_sampled(tiny_path):
    adapter = _adapter(tiny_path, gen_length=12, block_length=12, steps=12)
    rollout = adapter.sample(PROMPTS, 4, torch.Generator().manual_seed(2))
    ids = rollout.extras["completion_ids"]
    for special in ("[MASK]", "[PAD]", "[UNK]"):
        assert not (ids == adapter.tokenizer.convert_tokens_to_ids(special)).any()


def test_shifted_logits_option_reads_position_i_minus_1(tiny_path):
    """A Dream-style model whose outputs are shifted by one gives the plain model's log-probs with shift_logits."""

    class Shifted(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, **kwargs):
            logits = self.inner(input_ids=input_ids).logits  # [n, L, V]
            return (torch.cat([logits[:, 1:], logits[:, -1:]], dim=1),)  # position i-1 holds token i's logits

    tokenizer = char_tokenizer("0123456789+-*,.:=>SAC")
    plain_model = tiny_masked_lm(len(tokenizer), hidden=32, layers=1, heads=2)
    plain = MaskedDiffusionAdapter(plain_model, tokenizer, finetune="full", gen_length=6, steps=3, keep_reference=False)
    shifted = MaskedDiffusionAdapter(Shifted(tiny_masked_lm(len(tokenizer), hidden=32, layers=1, heads=2)),
                                     tokenizer, finetune="full", gen_length=6, steps=3, shift_logits=True,
                                     keep_reference=False)  # fmt: skip
    a = plain.sample(PROMPTS, 2, torch.Generator().manual_seed(3))
    b = shifted.sample(PROMPTS, 2, torch.Generator().manual_seed(3))
    assert a.samples == b.samples and torch.allclose(a.log_probs, b.log_probs, atol=1e-6)
    unshifted = MaskedDiffusionAdapter(Shifted(tiny_masked_lm(len(tokenizer), hidden=32, layers=1, heads=2)),
                                       tokenizer, finetune="full", gen_length=6, steps=3, keep_reference=False)
    c = unshifted.sample(PROMPTS, 2, torch.Generator().manual_seed(3))
    assert not torch.allclose(a.log_probs, c.log_probs, atol=1e-3)


def test_lora_trains_only_adapter_weights(tiny_path):
    adapter = _adapter(tiny_path, finetune="lora", lora_rank=2)
    names = list(adapter.trainable_parameters())
    assert names and all("lora_" in n for n in names)
    with pytest.raises(ValueError, match="LoRA found no nn.Linear"):
        _adapter(tiny_path, finetune="lora", lora_target_modules=["nope"])


def test_bad_options_are_one_line(tiny_path, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'MaskedDiffusionAdapter.gen_length'"):
        _adapter(tiny_path, gen_lenght=8)
    with pytest.raises(ValueError, match="multiple of block_length"):
        _adapter(tiny_path, gen_length=8, block_length=3)
    with pytest.raises(ValueError, match="estimator = 'bgpo2' is not one of 'd1', 'elbo'"):
        _adapter(tiny_path, estimator="bgpo2")
    with pytest.raises(ConfigError, match="cannot load the model folder"):
        MaskedDiffusionAdapter(str(tmp_path))
    with pytest.raises(ValueError, match="needs its tokenizer"):
        MaskedDiffusionAdapter(tiny_masked_lm(10, hidden=32, layers=1, heads=2))


def test_bgpo_bound_has_the_exact_elbo_objectives_value_and_gradient_on_policy(tiny_path):
    """BGPO (one MC sample per backward) == the plain ELBO ratio exp(ELBO - ELBO_old) in one graph, on-policy."""
    exact = _adapter(tiny_path, estimator="elbo", mc_samples=4)
    bound = _adapter(tiny_path, estimator="bgpo", mc_samples=4)
    assert bound.scores_all_steps_at_once is False and exact.scores_all_steps_at_once is True
    a = exact.sample(PROMPTS, 4, torch.Generator().manual_seed(0))
    b = bound.sample(PROMPTS, 4, torch.Generator().manual_seed(0))
    assert torch.equal(a.extras["elbo_masks"], b.extras["elbo_masks"]) and a.samples == b.samples
    assert torch.equal(b.log_probs, torch.zeros_like(b.log_probs))  # the bound's old log-probs
    assert torch.allclose(b.extras["elbo_old"], a.log_probs)
    a.advantages = b.advantages = torch.linspace(-1.5, 1.0, len(a))  # both signs
    grads = []
    for adapter, rollout, cfg, chunk in ((exact, a, LossConfig(ratio="sequence", aggregation="grpo"), None),
                                         (bound, b, LossConfig(ratio="token", aggregation="grpo"), 1)):  # fmt: skip
        params = adapter.trainable_parameters()
        stats = accumulate_gradients(adapter, rollout, cfg, micro_batch_size=5, step_chunk=chunk)
        grads.append((stats["loss"], torch.cat([p.grad.flatten() for p in params.values()])))
        assert stats["ratio/mean"] == pytest.approx(1.0, abs=1e-6)
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    assert grads[0][1].abs().sum() > 0
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-7)


def test_bgpo_ratio_is_the_bound_term_off_policy():
    from mmgrpo.pipelines.mdlm.estimators import bgpo_log_ratio

    elbo, old = torch.tensor([[-3.0, -2.0]]), torch.tensor([[-3.5, -1.0]])
    up = bgpo_log_ratio(elbo, old, torch.tensor([True])).exp()  # 1 + D_j
    down = bgpo_log_ratio(elbo, old, torch.tensor([False])).exp()  # exp(D_j)
    assert torch.allclose(up, torch.tensor([[1.5, 1e-6]]))  # 1 + D floored
    assert torch.allclose(down, torch.exp(torch.tensor([[0.5, -1.0]])))


def test_trajectory_scores_each_steps_commits_on_the_canvas_the_sampler_saw(tiny_path):
    adapter = _adapter(tiny_path, estimator="trajectory", temperature=0.8, steps=6, block_length=6)
    rollout = adapter.sample(PROMPTS, 2, torch.Generator().manual_seed(4))
    assert rollout.log_probs.shape == (6, 6) and rollout.mask.all()  # 6 tokens in 6 steps: one per step
    # by hand for row 0, step 2: the canvas with the tokens of steps 0-1 shown, the token of step 2 scored
    extras = rollout.extras
    prompt, target, commit = extras["prompt_ids"][0], extras["completion_ids"][0], extras["commit_step"][0]
    canvas = torch.cat([prompt, torch.where(commit < 2, target, adapter.mask_id)])[None]
    with torch.no_grad():
        logp = (adapter.logits(canvas)[0, len(prompt):] / 0.8).log_softmax(-1)  # [Lc, V]
    position = int((commit == 2).nonzero())
    assert rollout.log_probs[0, 2].item() == pytest.approx(logp[position, target[position]].item(), abs=1e-5)
    merged = _adapter(tiny_path, estimator="trajectory", temperature=0.8, steps=6, block_length=6, shrinkage=4)
    two = merged.sample(PROMPTS, 2, torch.Generator().manual_seed(4))
    assert two.log_probs.shape == (6, 2) and two.samples == rollout.samples  # steps 0-3, then 4-5
    with pytest.raises(ValueError, match="temperature > 0 and threshold unset"):
        _adapter(tiny_path, estimator="trajectory", temperature=0)


def test_evaluation_rollouts_are_not_scored(tiny_path):
    adapter = _adapter(tiny_path, estimator="elbo", eval_temperature=0.0, eval_steps=6)
    rollout = adapter.sample(PROMPTS, 2, torch.Generator().manual_seed(0), evaluate=True)
    assert torch.equal(rollout.log_probs, torch.zeros_like(rollout.log_probs))
    assert rollout.extras["commit_step"].max() == 5  # the evaluation's own step count
