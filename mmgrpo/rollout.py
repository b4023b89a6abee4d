"""The rollout: everything sampled in one step, and what is needed to score it again.

Shapes use N = B*G rows (B prompts, G samples per prompt) and T decision steps
(tokens for text, SDE steps for flow models, estimator slots for masked-diffusion LMs).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass
class Rollout:
    """One batch of sampled outputs with the per-step records needed to re-score them.

    Fields are grouped by who fills them: the adapter (sampling), the trainer (scores).

    extras holds adapter-owned tensors (or lists) whose first dimension is N: they are sliced
    with the rows. shared holds adapter-owned objects that are NOT per row (for example one
    prompt embedding per prompt, indexed through an extras entry); they are never sliced.
    """

    # --- filled by the adapter at sampling time ---
    group_id: torch.Tensor  # [N] long: rows with the same id were sampled from the same prompt
    prompts: list[Any]  # len N: the prompt item each row was sampled from
    samples: list[Any]  # len N: decoded outputs (text, images, audio, ...) for rewards and galleries
    log_probs: torch.Tensor  # [N, T] fp32 log-prob of each recorded decision at sampling time
    mask: torch.Tensor  # [N, T] bool: which decisions count (padding and frozen steps do not)
    extras: dict[str, Any] = field(default_factory=dict)  # per-row re-scoring data, first dim N
    shared: dict[str, Any] = field(default_factory=dict)  # not per row, never sliced

    # --- filled by the trainer ---
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N] fp32, NaN = unscored
    advantages: torch.Tensor | None = None  # [N] fp32
    keep: torch.Tensor | None = None  # [N] bool: rows that take part in the loss (pivots excluded)

    def __post_init__(self) -> None:
        n = self.group_id.shape[0]
        if self.log_probs.ndim != 2 or self.log_probs.shape[0] != n:
            raise ValueError(f"Rollout.log_probs must be [N={n}, T], got {tuple(self.log_probs.shape)}")
        if self.mask.shape != self.log_probs.shape:
            raise ValueError(
                f"Rollout.mask {tuple(self.mask.shape)} must match log_probs {tuple(self.log_probs.shape)}"
            )
        if len(self.prompts) != n or len(self.samples) != n:
            raise ValueError(
                f"Rollout needs one prompt and one sample per row: N={n}, "
                f"prompts={len(self.prompts)}, samples={len(self.samples)}"
            )
        for key, value in self.extras.items():
            if len(value) != n:
                raise ValueError(f"Rollout.extras[{key!r}] has first dim {len(value)}, expected N={n}")

    def __len__(self) -> int:
        return self.group_id.shape[0]

    @property
    def num_steps(self) -> int:
        """T, the number of recorded decision steps per row."""
        return self.log_probs.shape[1]

    def select(self, index: torch.Tensor | slice | list[int]) -> "Rollout":
        """The rows `index` (a slice, a list of ints or a long tensor), with `shared` kept whole."""
        if isinstance(index, slice):
            rows = list(range(len(self)))[index]
        elif isinstance(index, torch.Tensor):
            rows = index.tolist()
        else:
            rows = list(index)
        idx = torch.tensor(rows, dtype=torch.long)

        def take(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value[idx.to(value.device)]
            return [value[i] for i in rows]

        return replace(
            self,
            group_id=take(self.group_id),
            prompts=take(self.prompts),
            samples=take(self.samples),
            log_probs=take(self.log_probs),
            mask=take(self.mask),
            extras={k: take(v) for k, v in self.extras.items()},
            shared=self.shared,
            rewards={k: take(v) for k, v in self.rewards.items()},
            advantages=None if self.advantages is None else take(self.advantages),
            keep=None if self.keep is None else take(self.keep),
        )

    @staticmethod
    def concat(rollouts: list["Rollout"]) -> "Rollout":
        """Rows of several rollouts of the same adapter, in order (used by dynamic sampling).

        `shared` objects must be dicts keyed by something the extras refer to, or identical;
        the first rollout's shared entries win for duplicate keys.
        """
        if len(rollouts) == 1:
            return rollouts[0]
        first = rollouts[0]
        widths = {r.num_steps for r in rollouts}
        if len(widths) != 1:
            raise ValueError(f"cannot concatenate rollouts with different step counts {sorted(widths)}")

        def cat(values: list[Any]) -> Any:
            if isinstance(values[0], torch.Tensor):
                return torch.cat(values)
            return [v for vs in values for v in vs]

        shared: dict[str, Any] = {}
        for r in rollouts:
            for key, value in r.shared.items():
                if isinstance(value, dict) and isinstance(shared.get(key), dict):
                    shared[key] = {**value, **shared[key]}
                else:
                    shared.setdefault(key, value)
        return Rollout(
            group_id=cat([r.group_id for r in rollouts]),
            prompts=cat([r.prompts for r in rollouts]),
            samples=cat([r.samples for r in rollouts]),
            log_probs=cat([r.log_probs for r in rollouts]),
            mask=cat([r.mask for r in rollouts]),
            extras={k: cat([r.extras[k] for r in rollouts]) for k in first.extras},
            shared=shared,
            rewards={k: cat([r.rewards[k] for r in rollouts]) for k in first.rewards},
            advantages=None if first.advantages is None else cat([r.advantages for r in rollouts]),
            keep=None if first.keep is None else cat([r.keep for r in rollouts]),
        )
