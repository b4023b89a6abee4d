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
    each step's transition, so the KL to the reference is computed in closed form.
    """

    log_probs: torch.Tensor  # [n, S] fp32, S = len(steps)
    mean: torch.Tensor | None = None  # [n, S, *D] mean of each step's Gaussian
    std: torch.Tensor | None = None  # broadcastable to mean: std of each step's Gaussian


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

    Optional methods the trainer uses when present: `to(device)`, `export(sample, path)`
    (writes one sample to a file; returns the path written), `scores_all_steps_at_once`
    (bool attribute: True where one forward scores every step, which a sequence-level ratio needs).
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
