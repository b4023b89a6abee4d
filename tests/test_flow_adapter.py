"""FlowAdapter over tiny random SD3 / FLUX / Wan pipelines (pipelines/flow/tiny.py)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmgrpo.pipelines.flow import sde
from mmgrpo.pipelines.flow.adapter import FlowAdapter
from mmgrpo.pipelines.flow.tiny import TEXT_LEN, tiny_pipeline
from mmgrpo.pipelines.flow.window import plan_window, tail_stops
from mmgrpo.protocols import Adapter, StepScores
from mmgrpo.rollout import Rollout

FAMILIES = ["sd3", "flux", "wan"]
SIZE = {
    "sd3": dict(height=16, width=16),
    "flux": dict(height=16, width=16),
    "wan": dict(height=16, width=16, num_frames=5),
}
PROMPTS = ["a red circle", {"prompt": "a blue square left of a green triangle", "color": "blue"}]


def make(family: str, adapter_class: type = FlowAdapter, **kwargs) -> FlowAdapter:
    kw = dict(num_steps=4, eval_steps=3, max_sequence_length=TEXT_LEN, lora_rank=4, lora_alpha=8, **SIZE[family])
    kw.update(kwargs)
    return adapter_class(tiny_pipeline(family), **kw)


def perturb_lora(adapter: FlowAdapter, seed: int = 0, scale: float = 0.5) -> None:
    """Give the (zero-initialised) LoRA B matrices non-zero values, so LoRA changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.trainable_parameters().items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def ratio_dev(new: torch.Tensor, old: torch.Tensor) -> float:
    return (torch.exp(new - old) - 1).abs().max().item()


def count_forward(module: torch.nn.Module):
    """Count the forward calls of `module` and the batch size of each (keyword or positional input)."""
    calls: list[int] = []

    def hook(mod, args, kwargs):
        first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        calls.append(first.shape[0])

    return calls, module.register_forward_pre_hook(hook, with_kwargs=True)


# --------------------------------------------------------------------------- on-policy


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("group_size", [1, 4])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_on_policy_ratio_is_one(family, group_size, guidance_scale):
    adapter = make(family, guidance_scale=guidance_scale)
    perturb_lora(adapter)  # LoRA on and non-zero
    assert isinstance(adapter, Adapter)
    rollout = adapter.sample(PROMPTS, group_size, torch.Generator().manual_seed(1))
    n, T = len(rollout), rollout.num_steps
    assert (n, T) == (2 * group_size, 4) and rollout.mask.all()
    scores = adapter.log_prob(rollout)
    assert isinstance(scores, StepScores) and scores.log_probs.dtype == torch.float32
    assert ratio_dev(scores.log_probs, rollout.log_probs) < 1e-6
    for row in range(n):  # micro-batch 1
        one = rollout.select([row])
        assert ratio_dev(adapter.log_prob(one).log_probs, one.log_probs) < 1e-6
    for t in range(T):  # one step per chunk
        assert ratio_dev(adapter.log_prob(rollout, [t]).log_probs, rollout.log_probs[:, [t]]) < 1e-6
    assert scores.mean.shape == (n, T, *rollout.extras["latents"].shape[2:])
    assert scores.std.shape == (n, T) + (1,) * (scores.mean.ndim - 2)


@pytest.mark.parametrize("kernel", ["cps", "dance", "exact"])
def test_on_policy_ratio_other_kernels(kernel):
    adapter = make("sd3", kernel=kernel)
    perturb_lora(adapter)
    rollout = adapter.sample(PROMPTS, 2, torch.Generator().manual_seed(2))
    assert ratio_dev(adapter.log_prob(rollout).log_probs, rollout.log_probs) < 1e-6


def test_log_prob_has_gradients_on_trainable_weights_only():
    adapter = make("sd3")
    perturb_lora(adapter)
    rollout = adapter.sample(PROMPTS, 2, torch.Generator().manual_seed(3))
    adapter.log_prob(rollout, [1, 2]).log_probs.sum().backward()
    params = adapter.trainable_parameters()
    assert params and all("lora_" in name for name in params)
    assert all(p.grad is not None for p in params.values())
    # SD3's last block discards its context stream, so only its context query gets no gradient
    assert all(p.grad.abs().sum() > 0 for n, p in params.items() if "add_q_proj" not in n)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        assert all(p.grad is None and not p.requires_grad for p in getattr(adapter.pipe, name).parameters())


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_disables_lora_and_leaves_weights_untouched(family):
    adapter = make(family)
    rollout = adapter.sample(PROMPTS, 2, torch.Generator().manual_seed(4))
    # LoRA B starts at zero: the policy IS the reference
    with adapter.reference():
        ref0 = adapter.log_prob(rollout).log_probs
    assert ratio_dev(adapter.log_prob(rollout).log_probs, ref0) < 1e-6

    perturb_lora(adapter)
    before = {n: p.detach().clone() for n, p in adapter.trainable_parameters().items()}
    policy = adapter.log_prob(rollout)
    with adapter.reference():
        ref = adapter.log_prob(rollout)
    after = adapter.trainable_parameters()
    assert set(after) == set(before)
    assert all(torch.equal(after[n], before[n]) and after[n].requires_grad for n in before)
    torch.testing.assert_close(ref.log_probs, ref0)  # the reference ignores the LoRA weights
    assert (ref.log_probs - policy.log_probs).abs().max() > 1e-4
    assert torch.equal(adapter.log_prob(rollout).log_probs, policy.log_probs)  # LoRA back on


def test_full_finetune_reference_is_a_frozen_copy():
    adapter = make("sd3", finetune="full")
    params = adapter.trainable_parameters()
    assert params and not any("lora" in n for n in params)
    rollout = adapter.sample(PROMPTS, 2, torch.Generator().manual_seed(5))
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    before = {n: p.detach().clone() for n, p in params.items()}
    moved = adapter.log_prob(rollout).log_probs
    with adapter.reference():
        ref = adapter.log_prob(rollout).log_probs
    assert ratio_dev(ref, rollout.log_probs) < 1e-6  # the frozen copy is the sampling policy
    assert (moved - rollout.log_probs).abs().max() > 1e-4
    assert all(torch.equal(p, before[n]) for n, p in adapter.trainable_parameters().items())


# --------------------------------------------------------------------------- CFG


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_is_one_batched_forward_and_the_guidance_formula(family):
    adapter = make(family, guidance_scale=2.0)
    perturb_lora(adapter)
    calls, handle = count_forward(adapter.pipe.transformer)
    rollout = adapter.sample(PROMPTS, 2, torch.Generator().manual_seed(6))
    assert calls == [8] * 4  # one forward per step over [uncond; cond] = 2 x N rows
    calls.clear()
    adapter.log_prob(rollout, [0, 1])
    assert calls == [16]  # 2 steps x N rows x (uncond, cond), in one forward
    handle.remove()
    assert "negative_condition" in rollout.shared

    # the mean is affine in v = v_u + w (v_c - v_u), and w = 1 (CFG off) is the cond branch alone
    means = {}
    for w in (1.0, 2.0, 3.0):
        adapter.guidance_scale = w
        means[w] = adapter.log_prob(rollout, [1]).mean.detach()
    gap = (means[2.0] - means[1.0]).abs().max()
    assert gap > 1e-4  # the uncond branch (negative prompt) differs from the cond one
    torch.testing.assert_close(means[3.0] - means[2.0], means[2.0] - means[1.0], rtol=1e-4, atol=1e-5)

    off = make(family, guidance_scale=1.0)
    perturb_lora(off)
    calls, handle = count_forward(off.pipe.transformer)
    plain = off.sample(PROMPTS, 2, torch.Generator().manual_seed(6))
    handle.remove()
    assert calls == [4] * 4 and "negative_condition" not in plain.shared
    assert not torch.allclose(plain.samples[0], rollout.samples[0])


# --------------------------------------------------------------------------- windows and masks


def test_fixed_window_masks_and_stores_only_trained_steps():
    adapter = make("sd3", num_steps=5, window=2, window_start=1)
    rollout = adapter.sample(PROMPTS, 2, torch.Generator().manual_seed(7))
    expected = torch.tensor([False, True, True, False, False])
    assert torch.equal(rollout.mask, expected.expand(4, -1))
    assert torch.all(rollout.log_probs[:, ~expected] == 0) and torch.all(rollout.log_probs[:, expected] != 0)
    ex = rollout.extras
    assert ex["latents"].shape[:2] == (4, 3) and ex["step_index"].tolist() == [[1, 2]] * 4
    # a step outside the window costs no forward and scores 0
    calls, handle = count_forward(adapter.pipe.transformer)
    out = adapter.log_prob(rollout, [0, 4])
    handle.remove()
    assert calls == [] and torch.all(out.log_probs == 0)
    assert ratio_dev(adapter.log_prob(rollout, [2, 1]).log_probs, rollout.log_probs[:, [2, 1]]) < 1e-6

    # step 0 is an ODE (Euler) step: x_1 = x_0 + v(x_0, s_0) (s_1 - s_0), x_0 the initial noise
    sigmas = adapter._sigmas(5)
    x0 = adapter.family.init_latents(4, {}, torch.Generator().manual_seed(7), adapter.device)
    with torch.no_grad():
        emb = adapter._row_conditions(rollout.shared, ex["prompt_key"])
        v = adapter._velocity(x0, sigmas[0].expand(4), emb)
    torch.testing.assert_close(ex["latents"][:, 0], x0 + v * (sigmas[1] - sigmas[0]))


@pytest.mark.parametrize("same_noise", [False, True])
def test_tail_steps_thin_the_ode_tail_only(same_noise):
    """tail_steps = 2 after a window at steps 1-2 of 8: sigma indices 0 1 2 3, then 3 -> 6 -> 8 (two
    Euler steps for the five-step tail; 5.5 rounds to 6). The window's transitions and log-probs are
    those of the full schedule; the sample is one Euler step from x at index 3 to sigma 6, one more to 0."""
    kw = dict(num_steps=8, window=2, window_start=1, same_noise_in_group=same_noise)
    thin, full = make("wan", tail_steps=2, **kw), make("wan", **kw)
    full.pipe.transformer.load_state_dict(thin.pipe.transformer.state_dict())
    assert tail_stops(8, (1, 2), 2) == (0, 1, 2, 3, 6, 8) and tail_stops(8, (), 2) == tuple(range(9))
    assert tail_stops(8, (5, 6), 2) == tuple(range(9))  # a tail of 1 step is not thinned

    calls, handle = count_forward(thin.pipe.transformer)
    a = thin.sample(PROMPTS, 2, torch.Generator().manual_seed(5))
    handle.remove()
    assert len(calls) == 5  # 3 steps up to the tail + 2 tail steps (the full schedule takes 8)
    b = full.sample(PROMPTS, 2, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.extras["latents"], b.extras["latents"])  # the same window transitions
    torch.testing.assert_close(a.log_probs, b.log_probs)
    assert torch.equal(a.mask, b.mask) and ratio_dev(thin.log_prob(a).log_probs, a.log_probs) < 1e-6
    assert not torch.allclose(torch.stack(a.samples), torch.stack(b.samples))

    sigmas = thin._sigmas(8)
    thin.decode = False
    x = thin.sample(PROMPTS, 2, torch.Generator().manual_seed(5)).extras["latents"][:, -1]  # x at index 3
    emb = thin._row_conditions(a.shared, a.extras["prompt_key"])
    with torch.no_grad():
        for i, j in ((3, 6), (6, 8)):
            x = x + thin._velocity(x, sigmas[i].expand(x.shape[0]), emb) * (sigmas[j] - sigmas[i])
    torch.testing.assert_close(torch.stack(thin.sample(PROMPTS, 2, torch.Generator().manual_seed(5)).samples), x)

    ev_thin = make("wan", tail_steps=2, **kw).sample(PROMPTS, 1, torch.Generator().manual_seed(6), evaluate=True)
    ev_full = make("wan", **kw).sample(PROMPTS, 1, torch.Generator().manual_seed(6), evaluate=True)
    torch.testing.assert_close(torch.stack(ev_thin.samples), torch.stack(ev_full.samples))  # evaluation: all steps
    with pytest.raises(ValueError, match="tail_steps"):
        make("wan", tail_steps=0)


def test_timestep_fraction_trains_the_first_steps():
    adapter = make("flux", num_steps=10, timestep_fraction=0.99)  # Flow-GRPO: 10 steps -> 9 trained
    rollout = adapter.sample(PROMPTS[:1], 2, torch.Generator().manual_seed(8))
    assert rollout.mask.sum(1).tolist() == [9, 9] and not rollout.mask[:, 9].any()
    assert rollout.extras["latents"].shape[1] == 10
    assert ratio_dev(adapter.log_prob(rollout).log_probs, rollout.log_probs) < 1e-6


def _window(rollout: Rollout) -> list[int]:
    """The trained (SDE) steps of a rollout's first row."""
    return rollout.mask[0].nonzero().flatten().tolist()


def test_random_and_sliding_windows_follow_the_training_step_and_seed():
    adapter = make("wan", num_steps=8, window=2, window_mode="random")
    spec = adapter.options.window_spec()
    starts = []
    for step in range(6):
        adapter.begin_step(step, 11)
        # two sample() calls of one step (dynamic-sampling rounds), with other generators: one window
        first, second = (adapter.sample(PROMPTS[:1], 1, torch.Generator().manual_seed(step + k)) for k in (0, 50))
        assert _window(first) == _window(second) == list(plan_window(spec, step, 11).trained)
        assert len(_window(first)) == 2 and _window(first)[1] == _window(first)[0] + 1
        starts.append(_window(first)[0])
    assert set(starts) <= {0, 1, 2, 3} and len(set(starts)) > 1  # random starts in the first half, varying by step

    fresh = make("wan", num_steps=8, window=2, window_mode="random")  # no begin_step: step 0 of seed 0
    assert _window(fresh.sample(PROMPTS[:1], 1, torch.Generator().manual_seed(3))) == list(
        plan_window(spec, 0, 0).trained)

    sliding = make("sd3", num_steps=4, window=2, window_mode="sliding", slide_every=2)
    seen = []
    for step in range(8):
        sliding.begin_step(step, 0)
        seen.append(_window(sliding.sample(PROMPTS[:1], 1, torch.Generator().manual_seed(0)))[0])
        sliding.sample(PROMPTS[:1], 1, torch.Generator().manual_seed(0), evaluate=True)  # evaluation moves nothing
    assert seen == [0, 0, 1, 1, 2, 2, 0, 0]
    assert not hasattr(sliding, "sampler_state")  # nothing beyond (step, seed): a checkpoint keeps no window state


def test_schedules_match_closed_form():
    n = 4
    shift = lambda u: 3 * u / (1 + 2 * u)  # noqa: E731  (tiny SD3's FlowMatchEuler shift=3)
    # FlowMatchEulerDiscreteScheduler: linspace(sigma_max, sigma_min, N) of its (already shifted)
    # training sigmas 1 .. shift(1/1000), shifted, then a final 0
    s = torch.linspace(1.0, shift(1.0 / 1000), n, dtype=torch.float64)
    expected = torch.cat([shift(s), torch.zeros(1, dtype=torch.float64)])
    rollout = make("sd3").sample(PROMPTS[:1], 1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(rollout.extras["sigmas"][0].double(), expected, rtol=1e-6, atol=1e-6)
    dance = make("sd3", schedule="dance", schedule_shift=3.0, kernel="dance")
    rollout = dance.sample(PROMPTS[:1], 1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(rollout.extras["sigmas"][0], sde.dance_sigmas(4, 3.0))


# --------------------------------------------------------------------------- noise and prompts


@pytest.mark.parametrize("same", [True, False])
def test_same_noise_in_group(same):
    adapter = make("flux", same_noise_in_group=same)
    rollout = adapter.sample(PROMPTS, 3, torch.Generator().manual_seed(9))
    x0 = rollout.extras["latents"][:, 0]  # [N, *D]: step 0 is trained, so slot 0 is the initial noise
    for g in range(2):
        rows = x0[3 * g : 3 * g + 3]
        assert all(torch.equal(rows[0], r) for r in rows[1:]) == same
    assert not torch.equal(x0[0], x0[3])  # different prompts, different noise
    assert not torch.equal(rollout.samples[0], rollout.samples[1])  # the SDE still spreads the group


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_noise_runs_the_ode_prefix_once_per_prompt(family):
    """With one x_T per group, ODE steps before the SDE window run on B rows, not B*G; the
    rollout equals the one from B*G rows that start from the same repeated noise."""
    kw = dict(num_steps=4, window=2, window_start=2, guidance_scale=2.0)
    shared = make(family, same_noise_in_group=True, **kw)
    per_row = make(family, same_noise_in_group=False, **kw)
    per_row.pipe.transformer.load_state_dict(shared.pipe.transformer.state_dict())
    draw = per_row.family.init_latents  # draw B latents, as the shared path does, then repeat them
    per_row.family.init_latents = lambda n, cond, gen, dev: draw(n // 3, cond, gen, dev).repeat_interleave(3, dim=0)

    calls, handle = count_forward(shared.pipe.transformer)
    a = shared.sample(PROMPTS, 3, torch.Generator().manual_seed(13))
    handle.remove()
    assert calls == [2 * 2, 2 * 2, 2 * 6, 2 * 6]  # (uncond + cond) x rows: 2 prompts, then 6 samples
    b = per_row.sample(PROMPTS, 3, torch.Generator().manual_seed(13))
    torch.testing.assert_close(a.extras["latents"], b.extras["latents"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.stack(a.samples), torch.stack(b.samples), rtol=1e-4, atol=1e-5)
    assert ratio_dev(shared.log_prob(a).log_probs, a.log_probs) < 1e-6

    # all-ODE evaluation with shared noise: one row per prompt throughout, G identical samples
    calls, handle = count_forward(shared.pipe.transformer)
    ev = shared.sample(PROMPTS, 3, torch.Generator().manual_seed(14), evaluate=True)
    handle.remove()
    assert calls == [2 * 2] * shared.options.eval_steps and len(ev.samples) == 6
    assert torch.equal(ev.samples[0], ev.samples[2]) and not torch.equal(ev.samples[0], ev.samples[3])


@pytest.mark.parametrize("family", FAMILIES)
def test_each_prompt_is_encoded_once(family):
    adapter = make(family, guidance_scale=2.0)
    encoders = [getattr(adapter.pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if getattr(adapter.pipe, n, None) is not None]
    counters = [count_forward(e) for e in encoders]
    prompts = ["a red circle", "a blue square", "a red circle"]
    rollout = adapter.sample(prompts, 4, torch.Generator().manual_seed(10))
    # 2 distinct prompts in one batch + the negative prompt (cached after the first call)
    assert all(sum(calls) == 3 for calls, _ in counters)
    assert len(rollout.shared["conditions"]) == 2
    keys = rollout.extras["prompt_key"]
    assert keys[0] == keys[8] and keys[0] != keys[4]
    for calls, _ in counters:
        calls.clear()
    adapter.log_prob(rollout)
    adapter.sample(prompts[:1], 2, torch.Generator().manual_seed(11))
    assert all(sum(calls) == 1 for calls, _ in counters)  # log_prob encodes nothing; negative cached
    for _, handle in counters:
        handle.remove()


# --------------------------------------------------------------------------- rollout shape and I/O


@pytest.mark.parametrize("family", FAMILIES)
def test_rollout_layout_samples_and_evaluation(family, tmp_path):
    adapter = make(family)
    rollout = adapter.sample(PROMPTS, 2, torch.Generator().manual_seed(12))
    assert rollout.group_id.tolist() == [0, 0, 1, 1]
    assert rollout.prompts == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    shape = (5, 3, 16, 16) if family == "wan" else (3, 16, 16)
    for x in rollout.samples:
        assert x.shape == shape and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    path = adapter.export(rollout.samples[0], tmp_path / "a")  # the suffix is added
    assert path.endswith(".mp4" if family == "wan" else ".png") and os.path.getsize(path) > 0
    if family == "wan":
        check_video_exports(adapter, rollout.samples[0], tmp_path)

    # rows of two rollouts concatenated still re-score (shared prompt tables merge by key)
    other = adapter.sample(PROMPTS[:1], 2, torch.Generator().manual_seed(13))
    both = Rollout.concat([rollout, other])
    assert ratio_dev(adapter.log_prob(both).log_probs, both.log_probs) < 1e-6

    ev = adapter.sample(PROMPTS, 2, torch.Generator().manual_seed(14), evaluate=True)
    assert ev.num_steps == 3 and not ev.mask.any() and ev.extras == {} and torch.all(ev.log_probs == 0)
    assert torch.all(adapter.log_prob(ev).log_probs == 0)
    # evaluation is deterministic given the initial noise (ODE everywhere)
    ev2 = adapter.sample(PROMPTS, 2, torch.Generator().manual_seed(14), evaluate=True)
    assert all(torch.equal(a, b) for a, b in zip(ev.samples, ev2.samples))


def check_video_exports(adapter, clip, tmp_path):
    """Beside the MP4 a contact sheet (the frames in a row); .gif and .png paths pick those formats."""
    from PIL import Image

    F, _, H, W = clip.shape
    expected = (clip.clamp(0, 1).permute(2, 0, 3, 1).reshape(H, F * W, 3) * 255).round().to(torch.uint8).numpy()
    sheet = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"))  # written with a.mp4
    assert sheet.shape == (H, F * W, 3) and np.array_equal(sheet, expected)
    assert adapter.export(clip, tmp_path / "only.png").endswith("only.png") and not (tmp_path / "only.mp4").exists()
    gif = Image.open(adapter.export(clip, tmp_path / "b.gif"))
    assert gif.format == "GIF" and gif.n_frames == F and gif.size == (W, H)


def test_decode_false_gives_latent_samples_and_export_decodes(tmp_path):
    adapter = make("sd3", decode=False)
    rollout = adapter.sample(PROMPTS, 2, torch.Generator().manual_seed(15))
    decoded = make("sd3").sample(PROMPTS, 2, torch.Generator().manual_seed(15))
    assert rollout.samples[0].shape == (4, 16, 16)  # [C, h, w] latents (1-level tiny VAE: h = H)
    with torch.no_grad():
        again = adapter.family.decode(torch.stack(rollout.samples))  # [N, 3, H, W]
    assert all(torch.equal(a, b) for a, b in zip(again, decoded.samples))
    path = adapter.export(rollout.samples[0], tmp_path / "z")
    assert path.endswith(".png") and os.path.getsize(path) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipelines_are_reproducible_and_round_trip_through_a_path(family, tmp_path):
    pipe = tiny_pipeline(family, seed=3)
    pipe.save_pretrained(tmp_path)
    runs = [
        FlowAdapter(p, num_steps=2, max_sequence_length=TEXT_LEN, **SIZE[family]).sample(
            PROMPTS, 1, torch.Generator().manual_seed(0)
        )
        for p in (pipe, tiny_pipeline(family, seed=3))
    ]
    runs.append(FlowAdapter(path=str(tmp_path), num_steps=2, max_sequence_length=TEXT_LEN, **SIZE[family]).sample(
        PROMPTS, 1, torch.Generator().manual_seed(0)
    ))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0].samples, other.samples))
        assert torch.equal(runs[0].log_probs, other.log_probs)
    different = FlowAdapter(tiny_pipeline(family, seed=4), num_steps=2, max_sequence_length=TEXT_LEN, **SIZE[family])
    changed = different.sample(PROMPTS, 1, torch.Generator().manual_seed(0))
    assert not torch.equal(changed.samples[0], runs[0].samples[0])


def test_readable_errors():
    with pytest.raises(ValueError, match="exactly one of"):
        FlowAdapter()
    with pytest.raises(ValueError, match="FlowAdapter drives"):
        FlowAdapter(object())
    with pytest.raises(ValueError, match="window"):
        make("sd3", window=5)
    with pytest.raises(ValueError, match="no trained step|without a trained step"):
        make("sd3", num_steps=10, window=2, window_start=8, timestep_fraction=0.5)
    with pytest.raises(ValueError, match="'prompt'"):
        make("sd3").sample([{"text": "x"}], 1, torch.Generator())
    with pytest.raises(ValueError, match="num_frames"):
        make("wan", num_frames=4)


class _OlderFlowAdapter(FlowAdapter):
    """The flow adapter as it was before the window followed the training step: it saved its
    training sample() count in every checkpoint (adapter.json)."""

    def sampler_state(self):
        return {"sample_calls": 7}


def _window_run(adapter_class, out, max_steps, resume=None):
    from mmgrpo.trainer import train

    torch.manual_seed(0)  # peft draws the LoRA A matrices from the global generator
    adapter = make("sd3", adapter_class, decode=False, window=2, window_mode="sliding", slide_every=1)
    config = {"train": {"max_steps": max_steps, "prompts_per_step": 2, "group_size": 2, "checkpoint_every": 1,
                        "cpu": True, "num_threads": 1},
              "optim": {"lr": 3e-2}, "eval": {"num_prompts": 0}}
    latent_mean = {"latent_mean": lambda samples, prompts, **_: [float(x.mean()) for x in samples]}
    if resume is not None:
        return train(None, resume=resume, adapter=adapter, rewards=latent_mean, prompts=PROMPTS,
                     max_steps=max_steps, progress=False)
    return train(config, adapter=adapter, rewards=latent_mean, prompts=PROMPTS, out=out, progress=False)


def test_checkpoint_of_an_older_version_with_window_state_resumes_exactly(tmp_path):
    straight = _window_run(_OlderFlowAdapter, tmp_path / "a", 2)
    _window_run(_OlderFlowAdapter, tmp_path / "b", 1)
    ckpt = tmp_path / "b" / "checkpoints" / "step_000001"
    assert json.loads((ckpt / "adapter.json").read_text()) == {"sample_calls": 7}  # the older format
    resumed = _window_run(FlowAdapter, None, 2, resume=tmp_path / "b")
    last = lambda r: {k: v for k, v in r.metrics[-1].items() if not k.startswith("time/")}  # noqa: E731
    assert last(resumed) == last(straight)  # step 2 (window at step 1) as in the uninterrupted run
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step_000002" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step_000002" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- step sizes, options, device


def test_step_size_is_the_sigma_gap_of_each_stored_step():
    adapter = make("sd3", num_steps=5, window=2, window_start=1)
    rollout = adapter.sample(PROMPTS, 2, torch.Generator().manual_seed(7))
    sigmas = adapter._sigmas(5)
    scores = adapter.log_prob(rollout, [0, 1, 2, 4])
    assert scores.step_size.dtype == torch.float32 and scores.step_size.shape == (4, 4)
    expected = torch.tensor([1.0, sigmas[1] - sigmas[2], sigmas[2] - sigmas[3], 1.0])  # 1 where nothing is stored
    torch.testing.assert_close(scores.step_size, expected.expand(4, -1))
    cps = make("sd3", kernel="cps")
    scores = cps.log_prob(cps.sample(PROMPTS, 1, torch.Generator().manual_seed(0)), [3])
    torch.testing.assert_close(scores.step_size, (cps._sigmas(4)[3] - cps._sigmas(4)[4]).expand(2, 1))


def test_options_are_checked_like_config_keys():
    from mmgrpo.config import ConfigError
    from mmgrpo.pipelines.flow import FlowOptions

    assert FlowAdapter.Options is FlowOptions
    with pytest.raises(ConfigError, match="did you mean 'FlowAdapter.kernel'"):
        make("sd3", kernal="sde")
    with pytest.raises(ConfigError, match="FlowAdapter.num_steps must be an integer"):
        make("sd3", num_steps="4")
    with pytest.raises(ConfigError, match="window_mode"):
        make("sd3", window=2, window_mode="slide")


def test_to_moves_the_pipeline_and_drops_the_cached_negative_condition():
    adapter = make("sd3", guidance_scale=2.0)
    adapter.sample(PROMPTS[:1], 1, torch.Generator().manual_seed(0))
    assert adapter._negative is not None
    assert adapter.to("cpu") is adapter and adapter._negative is None and adapter.device == torch.device("cpu")


# --------------------------------------------------------------------------- export (export.py)


def test_export_media_writes_images_gifs_and_contact_sheets(tmp_path):
    from PIL import Image

    from mmgrpo.pipelines.flow.export import export_media

    image = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0))
    path = export_media(image, tmp_path / "img")
    assert path.endswith("img.png")
    expected = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # [H, W, 3]
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), expected)

    clip = torch.rand(3, 3, 4, 5, generator=torch.Generator().manual_seed(1))  # [F, 3, H, W]
    sheet = export_media(clip, tmp_path / "sheet.png")
    expected = (clip.permute(2, 0, 3, 1).reshape(4, 15, 3) * 255).round().to(torch.uint8).numpy()  # [H, F*W, 3]
    assert np.array_equal(np.asarray(Image.open(sheet).convert("RGB")), expected)
    gif = Image.open(export_media(clip, tmp_path / "clip.gif", fps=4))
    assert gif.n_frames == 3 and gif.size == (5, 4) and gif.info["duration"] == 250
    with pytest.raises(ValueError, match="image \\[3, H, W\\] or a video"):
        export_media(torch.zeros(4, 5), tmp_path / "flat")


# --------------------------------------------------------------------------- the family registry (families.py)


class SignalNet(torch.nn.Module):
    """A velocity model that is not a diffusers model: v(x, sigma | y) for 1-D signals [m, D]."""

    def __init__(self, dim: int, hidden: int = 16):
        super().__init__()
        self.inp = torch.nn.Linear(2 * dim + 1, hidden)
        self.out = torch.nn.Linear(hidden, dim)

    def forward(self, x, sigma, y):
        return self.out(torch.tanh(self.inp(torch.cat([x, y, sigma[:, None].to(x.dtype)], dim=1))))  # [m, D]


class SignalBundle:
    """What a user hands FlowAdapter instead of a pipeline: here just the velocity model."""

    def __init__(self, dim: int = 6, seed: int = 0):
        torch.manual_seed(seed)
        self.model = SignalNet(dim)


S_MAX = 0.5


def signal_family():
    from mmgrpo.pipelines.flow.families import Family

    class Signal(Family):
        """Speech-enhancement-like: the condition is a noisy signal y (not text), the initial latents
        are y + S_MAX z per row, and decoding rescales each row by its own condition's scale."""

        @property
        def model(self):
            return self.pipeline.model

        def encode(self, prompts, device):
            y = torch.tensor([p["noisy"] for p in prompts], dtype=torch.float32, device=device)  # [b, D]
            return {"y": y, "scale": y.abs().amax(dim=1, keepdim=True)}  # [b, D], [b, 1]

        def init_latents(self, n, conditions, generator, device):
            y = conditions["y"]  # [n, D]
            assert y.shape[0] == n
            return y + S_MAX * torch.randn(y.shape, generator=generator, device=generator.device).to(device)

        def sigmas(self, num_steps):
            return torch.linspace(1.0, 0.0, num_steps + 1)  # [T+1]

        def forward(self, model, x, sigma, conditions):
            return model(x, sigma, conditions["y"])  # [m, D]

        def decode(self, latents, conditions=None):
            return latents * conditions["scale"]  # [n, D]: needs each row's side information

    return Signal


SIGNALS = [{"noisy": [0.5, -1.0, 2.0, 0.0, 1.0, -0.5]}, {"noisy": [3.0, 1.0, -1.0, 0.5, 0.0, 2.0]}]


@pytest.fixture
def signal(monkeypatch):
    """The Signal family registered for SignalBundle; the registry is restored after the test."""
    from mmgrpo.pipelines.flow import families

    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))
    monkeypatch.setattr(families, "PIPELINE_FAMILIES", dict(families.PIPELINE_FAMILIES))
    cls = signal_family()
    assert families.register_family("signal", cls, ["SignalBundle"]) is cls
    return cls


def make_signal(**kwargs) -> FlowAdapter:
    kw = dict(num_steps=4, eval_steps=3, lora_rank=2, lora_alpha=4, lora_target_modules=["inp", "out"])
    kw.update(kwargs)
    return FlowAdapter(SignalBundle(), **kw)


@pytest.mark.parametrize("same_noise", [False, True])
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_a_registered_non_text_family_samples_and_rescores_through_the_same_loop(signal, same_noise, finetune):
    adapter = make_signal(same_noise_in_group=same_noise, finetune=finetune, window=2, window_start=0)
    assert isinstance(adapter.family, signal) and adapter.family_name == "signal"
    perturb_lora(adapter)
    rollout = adapter.sample(SIGNALS, 3, torch.Generator().manual_seed(5))
    assert len(rollout) == 6 and rollout.mask[:, :2].all() and not rollout.mask[:, 2:].any()
    assert ratio_dev(adapter.log_prob(rollout).log_probs, rollout.log_probs) < 1e-6
    assert ratio_dev(adapter.log_prob(rollout.select([4])).log_probs, rollout.log_probs[[4]]) < 1e-6

    # the initial latents come from each row's condition: y + S_MAX z, z shared by a group with same_noise
    y = torch.tensor([s["noisy"] for s in SIGNALS]).repeat_interleave(3, dim=0)  # [N, D]
    z = torch.randn((2 if same_noise else 6, 6), generator=torch.Generator().manual_seed(5))
    z = z.repeat_interleave(3, dim=0) if same_noise else z  # [N, D]
    torch.testing.assert_close(rollout.extras["latents"][:, 0], y + S_MAX * z)

    # decoding used each row's own side information (the scale of its condition); LoRA B = 0 and the
    # full copies start from the same seed, so these two fresh adapters are the same policy
    kw = dict(same_noise_in_group=same_noise, finetune=finetune, window=2)
    decoded = torch.stack(make_signal(**kw).sample(SIGNALS, 3, torch.Generator().manual_seed(5)).samples)
    latents = torch.stack(make_signal(decode=False, **kw).sample(SIGNALS, 3, torch.Generator().manual_seed(5)).samples)
    torch.testing.assert_close(decoded, latents * y.abs().amax(dim=1, keepdim=True))  # [N, D]

    if finetune == "full":  # move the trained weights away from the frozen copy
        with torch.no_grad():
            for p in adapter.trainable_parameters().values():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    with adapter.reference():  # LoRA off / the frozen copy: the policy before training
        ref = adapter.log_prob(rollout).log_probs
    assert (ref[:, :2] - adapter.log_prob(rollout).log_probs[:, :2]).abs().max() > 1e-4


def test_family_registry_errors(signal):
    from mmgrpo.pipelines.flow.families import register_family

    with pytest.raises(ValueError, match="no unconditional condition"):
        make_signal(guidance_scale=2.0)
    with pytest.raises(ValueError, match="already driven by the flow family 'sd3'"):
        register_family("mine", signal, ["StableDiffusion3Pipeline"])
    with pytest.raises(TypeError, match="subclass of"):
        register_family("mine", dict, ["Mine"])
    with pytest.raises(ValueError, match=r"register_family\(name, YourFamily, \['object'\]\)"):
        FlowAdapter(object())
