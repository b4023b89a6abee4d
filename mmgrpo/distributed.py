"""How a global batch is split over processes, and the collective operations the trainer needs.

The global batch is B prompts x G samples, prompt-major; process r trains the contiguous rows
[r*N/W, (r+1)*N/W). When W does not divide B a group spans two processes: rewards are
gathered before advantages, so group statistics always see the whole group.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence

import torch

from mmgrpo.sharding import is_sharded


def local_runs(num_prompts: int, group_size: int, world_size: int, rank: int) -> list[tuple[int, int]]:
    """(prompt index, samples of it on this process) for each prompt this process samples.

    >>> local_runs(3, 2, 2, 0), local_runs(3, 2, 2, 1)
    ([(0, 2), (1, 1)], [(1, 1), (2, 2)])
    """
    total = num_prompts * group_size
    if total % world_size:
        raise ValueError(
            f"train.prompts_per_step * train.group_size = {num_prompts} * {group_size} = {total} rows "
            f"cannot be split evenly over {world_size} processes: make it a multiple of {world_size}"
        )
    per_rank = total // world_size
    rows = range(rank * per_rank, (rank + 1) * per_rank)
    runs: list[tuple[int, int]] = []
    for row in rows:
        prompt = row // group_size
        if runs and runs[-1][0] == prompt:
            runs[-1] = (prompt, runs[-1][1] + 1)
        else:
            runs.append((prompt, 1))
    return runs


def batched_runs(runs: Sequence[tuple[int, int]]) -> list[tuple[list[int], int]]:
    """Consecutive runs with the same count merged into one sampling call: ([prompts], count).

    >>> batched_runs([(0, 2), (1, 2), (2, 1)])
    [([0, 1], 2), ([2], 1)]
    """
    calls: list[tuple[list[int], int]] = []
    for prompt, count in runs:
        if calls and calls[-1][1] == count:
            calls[-1][0].append(prompt)
        else:
            calls.append(([prompt], count))
    return calls


class Collective:
    """Thin wrapper over an accelerate.Accelerator (or nothing, for one process)."""

    def __init__(self, accelerator: Any | None = None, mixed_precision: str = "no") -> None:
        self.accelerator = accelerator
        self.mixed_precision = mixed_precision
        self.world_size = accelerator.num_processes if accelerator else 1
        self.rank = accelerator.process_index if accelerator else 0
        self.is_main = self.rank == 0
        self.sharded = False  # weights sharded over the processes (FSDP2): they must run the same forwards

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate each process's tensor along dim 0, in rank order (equal shapes required)."""
        if self.world_size == 1:
            return tensor
        device = self.accelerator.device
        return self.accelerator.gather(tensor.to(device)).cpu()

    def sum(self, value: float) -> float:
        if self.world_size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum").item())

    def mean_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average the gradients over processes with one all-reduce of the flattened grads.

        Sharded weights (DTensors) are skipped: FSDP already averaged their gradients in backward."""
        if self.world_size == 1:
            return
        params = [p for p in params if not is_sharded(p)]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten().float() for g in grads])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n

    def autocast(self) -> Any:
        """Mixed-precision context of the run (sampling and scoring both use it, so ratios stay on-policy)."""
        if self.mixed_precision == "no":
            return nullcontext()
        device = self.accelerator.device if self.accelerator else torch.device("cpu")
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()
