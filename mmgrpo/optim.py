"""The optimizer side of a run: the trainable weights, AdamW, the LR schedule, gradient clipping and
the EMA of the weights (used for the final evaluation)."""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch

from mmgrpo.config import ConfigError, OptimConfig
from mmgrpo.sharding import full_tensor, is_sharded


def trainable_weights(adapter: Any) -> dict[str, torch.nn.Parameter]:
    """The adapter's trainable_parameters() by name (a list gets its indices as names), requires_grad only."""
    params = adapter.trainable_parameters()
    if not isinstance(params, Mapping):
        params = {str(i): p for i, p in enumerate(params)}
    params = {k: p for k, p in params.items() if p.requires_grad}
    if not params:
        raise ConfigError(f"{type(adapter).__name__}.trainable_parameters() returned no trainable weights")
    return params


def build_optimizer(
    params: dict[str, torch.nn.Parameter], cfg: OptimConfig, total_updates: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, EMA | None]:
    """AdamW, its LR schedule over `total_updates` optimizer steps, and the EMA (None when disabled).

    The trainer passes optim.horizon x train.num_iterations: the schedule spans the run's horizon,
    which stays put when a resumed run extends train.max_steps.
    """
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_updates))
    ema = EMA(params, cfg.ema_decay, cfg.ema_every) if cfg.ema_decay else None
    return optimizer, scheduler, ema


def lr_factor(cfg: OptimConfig, total: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step i: linear warm-up, then constant, linear or cosine decay."""
    warmup, kind = cfg.warmup_steps, cfg.schedule

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = (i - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


def advance_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """One schedule step without an optimizer step (a training step that trained nothing)."""
    with warnings.catch_warnings():  # torch warns when the schedule moves before the optimizer ever did
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        scheduler.step()


def horizon_warning(cfg: OptimConfig, max_steps: int) -> str | None:
    """A warning when a decaying schedule ends before the run does: the steps after it train with lr 0."""
    if cfg.schedule == "constant" or cfg.horizon is None or max_steps <= cfg.horizon:
        return None
    return (
        f"optim.schedule={cfg.schedule} reaches lr 0 at step {cfg.horizon} (optim.horizon), so steps "
        f"{cfg.horizon + 1}-{max_steps} train with lr 0; --set optim.horizon={max_steps} stretches the schedule"
    )


def clip_gradients(params: dict[str, torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip the total gradient norm to max_norm (None: only measure it); returns the norm before clipping."""
    grads = [p for p in params.values() if p.grad is not None]
    if not grads:
        return 0.0
    if not any(is_sharded(p) for p in grads):
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm else math.inf))
    # sharded gradients (FSDP2): each process holds a slice; the norm of the whole is a collective
    sharded = [p.grad for p in grads if is_sharded(p)]
    replicated = [p.grad for p in grads if not is_sharded(p)]
    norms = [full_tensor(torch.nn.utils.get_total_norm(sharded)).float()]
    if replicated:
        norms.append(torch.nn.utils.get_total_norm(replicated).float().to(norms[0].device))
    total = torch.linalg.vector_norm(torch.stack(norms))  # [] as clip_grad_norm_ computes it
    if max_norm:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0).item()  # clip_grad_norm_'s coefficient
        for p in grads:
            p.grad.mul_(coef)
    return float(total)


class EMA:
    """Exponential moving average of the trainable weights, updated every `every` optimizer steps."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, every: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in (0, 1), got {decay}")
        self.decay, self.every, self.updates = decay, every, 0
        self.shadow = {k: p.detach().clone().float() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter], optimizer_step: int) -> None:
        if optimizer_step % self.every:
            return
        self.updates += 1
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Exchange the live weights and the averaged ones (call twice to undo)."""
        for k, p in params.items():
            live = p.detach().clone()
            p.copy_(self.shadow[k].to(p.dtype))
            self.shadow[k].copy_(live.float())


@contextmanager
def ema_weights(ema: EMA | None, params: dict[str, torch.nn.Parameter]) -> Iterator[None]:
    """Inside, the EMA weights are live; the trained ones are back on exit (no-op without EMA)."""
    if ema is None:
        yield
        return
    ema.swap(params)
    try:
        yield
    finally:
        ema.swap(params)
