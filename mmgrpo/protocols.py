"""The two interfaces a modality implements: an Adapter (the policy) and Rewards.

These are typing.Protocols: they carry no code, and any object with the right methods fits.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, NamedTuple, Protocol, Sequence, runtime_checkable

import torch

from mmgrpo.rollout import Rollout


class StepScores(NamedTuple):
    """What `Adapter.log_prob` may return instead of a bare tensor.

    For Gaussian decision steps (SDE samplers) the adapter can also return the mean and std of
    each step's transition, so the KL to the reference is computed in closed form, and the size
    |dt| of each step, which Flow-GRPO's KL scale (loss.kl_convention=flow_grpo) multiplies by.
    """

    log_probs: torch.Tensor  # [n, S] fp32, S = len(steps)
    mean: torch.Tensor | None = None  # [n, S, *D] mean of each step's Gaussian
    std: torch.Tensor | None = None  # broadcastable to mean: std of each step's Gaussian
    step_size: torch.Tensor | None = None  # [n, S] fp32: |sigma_next - sigma| of each Gaussian step


@runtime_checkable
class Adapter(Protocol):
    """A stochastic policy that makes T decisions per sample.

    - sample: draw `group_size` outputs for every prompt (rows prompt-major: all samples of
      prompt 0, then prompt 1, ...), recording per-step log-probs and what re-scoring needs.
      `evaluate=True` asks for the adapter's evaluation settings (for example more steps).
    - log_prob: re-score the recorded decisions `steps` (None = all T) under the CURRENT
      weights, with gradients. Returns [n, len(steps)] or StepScores.
    - trainable_parameters: the weights the optimizer updates, as {name: parameter}.
    - reference: a context manager inside which log_prob scores with the frozen reference
      policy (for example LoRA disabled); trainable weights are untouched.

    Optional: the trainer uses these when present (and works without them).
    - `to(device) -> Any`: move the models to the run's device (called once, before training).
    - `export(sample, path) -> str | Path`: write one sample to a file for the galleries (path has
      no suffix: the adapter picks one) and return the path written. Without it, samples are
      written inline into samples/<tag>.jsonl.
    - `scores_all_steps_at_once: bool` (attribute): True where one forward scores every step,
      which a sequence-level ratio (loss.ratio=sequence, GSPO) needs.
    - `sampler_state() -> Any` and `load_sampler_state(state) -> None`: sampler state beyond the
      trainer's RNG, JSON data; saved in every checkpoint
      (adapter.json) and handed back on resume, so a resumed run samples exactly as an uninterrupted one.
    - `begin_step(step, seed) -> None`: called on every process before the rollouts of training step
      `step` (0-based; every dynamic-sampling round of that step follows the same call), with the run's
      seed. Sampler choices that must agree across processes (the flow SDE window) derive from these two
      numbers, never from the per-process generator or a count of sample() calls.
    - `shard(mixed_precision) -> None`: shard the trained weights over the processes with FSDP2 (called at
      setup under an FSDP launch; pipelines.toolkit.TunedAdapter gives it). Sharded, every process must run
      the same forwards: samplers that stop early stop only when every process may (sharding.on_every_process).
    - `export_pretrained(folder) -> list[Path]`: write the trained model as a from_pretrained folder
      (`mmgrpo export`; TunedAdapter gives it, LoRA merged).
    - `check_prompts(prompts) -> None`: raise one readable ValueError / ConfigError (naming the
      prompt index, the field and the file) for a prompt the adapter cannot take: media that is
      missing or does not decode, a prompt without text. Called on the training and held-out
      prompts before the run directory is made, so a bad prompt never leaves a dead run behind.
    - `for_iteration(rollout, iteration, generator) -> Rollout`: the rollout inner iteration `iteration`
      (0 .. train.num_iterations - 1) trains on. The trainer calls it for every iteration right after
      sampling, under no_grad and before any update of the step (so old log-probs come from the sampling
      policy), with the run's generator; the result keeps rows, rewards, advantages and keep, and may
      change log_probs and extras (d1: a fresh prompt mask per iteration). Without it every iteration
      trains on the sampled rollout.
    - `Options` (class attribute): a dataclass of the constructor's config options. When the class
      has one, `pipeline.kwargs` is checked against it (unknown key: one line with the closest
      valid key) before the adapter is built.
    These are documented here rather than declared, so that isinstance(x, Adapter) stays true
    for an adapter without them.
    """

    def sample(
        self, prompts: Sequence[Any], group_size: int, generator: torch.Generator, *, evaluate: bool = False
    ) -> Rollout: ...

    def log_prob(self, rollout: Rollout, steps: Sequence[int] | None = None) -> torch.Tensor | StepScores: ...

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]: ...

    def reference(self) -> AbstractContextManager[Any]: ...


class Reward(Protocol):
    """A reward: scores N decoded samples.

    Called as `reward(samples, prompts, **meta)`, where prompts are the prompt items (one per
    row) and meta holds, for dict prompts, each other field as a list (so a reward can take
    `boxes=` or `answer=` directly; accept **kwargs for fields you do not use).
    Returns one float per sample (None or NaN: could not score, excluded from group statistics),
    or a dict of named lists holding the key "score" (the reward) and sub-scores for logging.
    """

    def __call__(self, samples: Sequence[Any], prompts: Sequence[Any], **meta: Any) -> Any: ...
