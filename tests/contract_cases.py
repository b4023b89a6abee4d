"""Adapters that join the shared contract test: one factory per adapter, one line in CASES.

A factory returns a ContractCase: a fresh adapter, a few prompts, and a reward that the
untrained adapter can move within a few optimizer steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class ContractCase:
    adapter: Any
    prompts: list[Any]
    reward: Callable
    train: dict[str, Any] = field(default_factory=dict)  # config overrides for the reward-goes-up test


def toy_case() -> ContractCase:
    from mmgrpo.pipelines.toy import ToyAdapter, toy_prompts
    from mmgrpo.rewards.sequence import sequence_match

    prompts = toy_prompts(num_train=8, num_eval=0, max_len=4, seed=3)["train"]
    return ContractCase(
        adapter=ToyAdapter(max_len=4, hidden=16, init_seed=0),
        prompts=prompts,
        reward=sequence_match,
        train={"optim": {"lr": 1e-2}, "train": {"max_steps": 15, "prompts_per_step": 8, "group_size": 8}},
    )


_TINY_VLM: dict[str, Any] = {}


def vlm_case() -> ContractCase:
    """Tiny random Qwen2-VL, fully fine-tuned; the reward counts the letter "e", which it can learn to emit."""
    import tempfile

    import numpy as np

    from mmgrpo.pipelines.vlm import VLMAdapter
    from mmgrpo.pipelines.vlm.tiny import build_tiny_vlm

    if "path" not in _TINY_VLM:
        _TINY_VLM["path"] = build_tiny_vlm(tempfile.mkdtemp(prefix="mmgrpo-contract-") + "/qwen2_vl")
    rng = np.random.RandomState(0)
    prompts = [
        {"prompt": f"Describe image {i}.", "image": rng.randint(0, 256, (28, 28, 3)).astype(np.uint8)} for i in range(2)
    ]

    def letter_e(samples, prompts, **_):
        return [s.count("e") / max(len(s), 1) for s in samples]

    adapter = VLMAdapter(_TINY_VLM["path"], max_new_tokens=6, finetune="full")
    return ContractCase(
        adapter=adapter,
        prompts=prompts,
        reward=letter_e,
        train={"optim": {"lr": 1e-2}, "train": {"max_steps": 10, "prompts_per_step": 2, "group_size": 8}},
    )


def _flow_case(family: str) -> ContractCase:
    """Tiny random diffusers pipeline with LoRA. Samples are final latents (decode=False): a tiny
    random VAE barely responds to latent changes, so the reward reads the latent mean."""
    from mmgrpo.pipelines.flow.adapter import FlowAdapter
    from mmgrpo.pipelines.flow.tiny import TEXT_LEN, tiny_pipeline

    extra = {"num_frames": 5} if family == "wan" else {}
    adapter = FlowAdapter(
        tiny_pipeline(family), num_steps=4, eval_steps=4, max_sequence_length=TEXT_LEN, lora_rank=4, lora_alpha=8,
        decode=False, height=16, width=16, **extra,
    )

    def latent_mean(samples, prompts, **_):
        return [float(s.mean()) for s in samples]

    return ContractCase(
        adapter=adapter,
        prompts=["a red circle", "a blue square left of a green triangle"],
        reward=latent_mean,
        train={"optim": {"lr": 3e-2}, "train": {"max_steps": 10, "prompts_per_step": 2, "group_size": 8}},
    )


def speech_case() -> ContractCase:
    """Tiny random speech enhancer (the speech family on the flow sampler; a plain velocity UNet, whose output
    a few steps can move, unlike the "x0" one that starts by returning its input), fully fine-tuned, SDE on
    2 of 4 steps, 0.25-s clips. The reward is the output's RMS relative to the noisy input's, which the untrained
    model can move (a stand-in for the speech metrics: the enhancer's samples are real waveforms)."""
    import numpy as np

    from mmgrpo.pipelines.flow.adapter import FlowAdapter
    from mmgrpo.pipelines.speech import SpeechEnhancer, tiny_unet

    rng = np.random.default_rng(0)
    t = np.arange(4000) / 16000
    prompts = []
    for i, freq in enumerate((220.0, 330.0)):
        clean = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        noisy = (clean + 0.1 * rng.standard_normal(t.size)).astype(np.float32)
        prompts.append({"prompt": f"tone {i} + white noise", "noisy": noisy, "clean": clean, "sample_rate": 16000})
    adapter = FlowAdapter(
        SpeechEnhancer(tiny_unet(0, widths=(8, 16), patch=4, prediction="velocity")),
        kernel="sde", num_steps=4, eval_steps=4, window=2, finetune="full",
    )

    def relative_rms(samples, prompts, **_):
        return [float(s.pow(2).mean().sqrt()) / float(np.sqrt(np.mean(p["noisy"] ** 2))) for s, p in zip(samples, prompts)]

    return ContractCase(
        adapter=adapter,
        prompts=prompts,
        reward=relative_rms,
        train={"optim": {"lr": 3e-3}, "train": {"max_steps": 10, "prompts_per_step": 2, "group_size": 8}},
    )


_TINY_MDLM: dict[str, Any] = {}


def mdlm_case(estimator: str, **options: Any) -> ContractCase:
    """Tiny random BertForMaskedLM with a character tokenizer, fully fine-tuned, sampled by the masked-diffusion
    sampler; the reward is the share of the digit "1" in the completion, which a few steps can raise.
    options: more adapter options (the learned Co-GRPO schedule)."""
    import tempfile

    from mmgrpo.pipelines.mdlm import MaskedDiffusionAdapter
    from mmgrpo.pipelines.mdlm.tiny import build_tiny_mdlm

    if "path" not in _TINY_MDLM:
        _TINY_MDLM["path"] = build_tiny_mdlm(tempfile.mkdtemp(prefix="mmgrpo-contract-") + "/mdlm", hidden=32,
                                             layers=1, heads=2)  # fmt: skip
    adapter = MaskedDiffusionAdapter(_TINY_MDLM["path"], finetune="full", gen_length=6, block_length=3, steps=4,
                                     estimator=estimator, mc_samples=3, **options)  # fmt: skip

    def share_of_ones(samples, prompts, **_):
        return [s["tokens"].count("1") / 6 for s in samples]

    return ContractCase(
        adapter=adapter,
        prompts=["A:12+345=", "C:3,5,7>22="],  # prompts of two lengths: two forwards per call
        reward=share_of_ones,
        train={"optim": {"lr": 1e-2}, "train": {"max_steps": 10, "prompts_per_step": 2, "group_size": 8}},
    )


CASES: dict[str, Callable[[], ContractCase]] = {
    "flow-sd3": lambda: _flow_case("sd3"),
    "flow-speech": speech_case,
    "flow-wan": lambda: _flow_case("wan"),
    "mdlm-d1": lambda: mdlm_case("d1"),
    "mdlm-d1-schedule": lambda: mdlm_case("d1", learn_schedule=True, schedule_lr_scale=1.0),
    "mdlm-bgpo": lambda: mdlm_case("bgpo"),
    "mdlm-elbo": lambda: mdlm_case("elbo"),
    "mdlm-trajectory": lambda: mdlm_case("trajectory"),
    "toy": toy_case,
    "vlm-qwen2": vlm_case,
}
