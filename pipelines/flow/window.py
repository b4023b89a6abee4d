"""Which steps of a flow rollout are SDE steps, which are trained, and which sigmas it visits.

Flow-GRPO-Fast / MixGRPO (ANCHORS.md section 1): the SDE runs only inside a window of a few
steps and the ODE (Euler) elsewhere; only window steps are stored and trained. Pure functions of
the options, the training step (0-based optimizer step) and the run seed, so every process of a
run, every dynamic-sampling round of a step and every sample() call of a step get the same plan:

    spec = WindowSpec(num_steps=10, window=2, mode="sliding", slide_every=1)
    plan = plan_window(spec, step=3, seed=0)
    plan.sde_steps == (3, 4); plan.trained == (3, 4); plan.stops == (0, 1, ..., 10)

Window modes: "fixed" starts at `start`; "random" at a start drawn uniformly from 0 .. max_start
(default num_steps // 2 - 1: the first half) by a torch.Generator seeded with window_seed(seed,
step), never by a process's sampling generator; "sliding" at start + step // slide_every, wrapping
after max_start (default num_steps - window). Without a window (window=None) every step is SDE.
timestep_fraction trains only the SDE steps among the first int(num_steps * fraction).
tail_steps: the ODE tail after the window takes tail_steps larger Euler steps (their stops evenly
spaced by index) instead of the schedule's own; evaluation rollouts use `ode_plan`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

WINDOW_MODES = ("fixed", "random", "sliding")


class WindowSpec(NamedTuple):
    """The window options of a sampler of num_steps steps (FlowOptions' names in brackets)."""

    num_steps: int
    window: int | None = None  # SDE steps per rollout; None: every step
    mode: str = "fixed"  # (window_mode) "fixed" | "random" | "sliding"
    start: int = 0  # (window_start) the fixed start, or where sliding begins
    max_start: int | None = None  # (window_max_start) the last start random / sliding may use
    slide_every: int = 25  # sliding: training steps per move of the window by one sampler step
    timestep_fraction: float = 1.0  # only SDE steps among the first int(num_steps * fraction) train
    tail_steps: int | None = None  # Euler steps of the ODE tail after the window; None: the schedule's


class WindowPlan(NamedTuple):
    """The steps of one rollout."""

    sde_steps: tuple[int, ...]  # steps that take the SDE kernel (ascending); the others are Euler
    trained: tuple[int, ...]  # SDE steps that are stored and trained (ascending, contiguous)
    stops: tuple[int, ...]  # sigma indices visited: step k goes from stops[k] to stops[k + 1]


def window_starts(spec: WindowSpec) -> list[int]:
    """Every step a window can start at ([0] without a window)."""
    T, W = spec.num_steps, spec.window
    if W is None:
        return [0]
    if spec.mode == "fixed":
        return [spec.start]
    default = max(T // 2 - 1, 0) if spec.mode == "random" else T - W
    top = min(default if spec.max_start is None else spec.max_start, T - W)
    return list(range(top + 1))


def window_steps(num_steps: int, window: int | None, start: int) -> tuple[int, ...]:
    """The SDE steps of a window starting at `start` (every step without a window)."""
    if window is None:
        return tuple(range(num_steps))
    return tuple(range(start, start + window))


def trained_steps(num_steps: int, sde_steps: tuple[int, ...], timestep_fraction: float) -> tuple[int, ...]:
    """The SDE steps among the first int(num_steps * timestep_fraction) (at least the first step)."""
    limit = max(int(num_steps * timestep_fraction + 1e-9), 1)
    return tuple(sorted(i for i in sde_steps if i < limit))


def tail_stops(num_steps: int, sde_steps: tuple[int, ...], tail_steps: int | None) -> tuple[int, ...]:
    """The sigma indices 0 .. num_steps a rollout visits: all of them, except that with tail_steps
    the ODE tail after the last SDE step keeps tail_steps + 1 of its indices, evenly spaced."""
    end = max(sde_steps) + 1 if sde_steps else num_steps  # the tail starts where the last SDE step ends
    if tail_steps is None or num_steps - end <= tail_steps:
        return tuple(range(num_steps + 1))
    tail = torch.linspace(end, num_steps, tail_steps + 1).round().long().tolist()  # [tail_steps + 1]
    return tuple(range(end)) + tuple(tail)


_MASK64 = (1 << 64) - 1


def splitmix64(z: int) -> int:
    """One SplitMix64 output for state z (Steele, Lea & Flood 2014): the state advanced by the golden
    gamma 0x9E3779B97F4A7C15, then two xor-shift-multiply rounds. Near inputs give unrelated outputs."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def window_seed(seed: int, step: int) -> int:
    """The seed of a random window's draw at training `step` of a run seeded `seed`:
    splitmix64(splitmix64(seed) ^ step), a 64-bit integer. The hash keeps it unrelated to the run's
    other generators (seeded from `seed` itself) and to neighbouring steps and seeds."""
    return splitmix64(splitmix64(seed & _MASK64) ^ (step & _MASK64))


def window_start(spec: WindowSpec, step: int, seed: int) -> int:
    """The first SDE step of every training rollout of training `step` (0 without a window)."""
    starts = window_starts(spec)
    if spec.window is None or spec.mode == "fixed":
        return starts[0]
    if spec.mode == "random":
        draw = torch.Generator().manual_seed(window_seed(seed, step))
        return starts[int(torch.randint(len(starts), (1,), generator=draw))]
    return starts[(spec.start + step // spec.slide_every) % len(starts)]  # sliding: wraps around


def plan_window(spec: WindowSpec, step: int, seed: int) -> WindowPlan:
    """The plan of the training rollouts of training `step` (0-based) in a run seeded `seed`."""
    sde = window_steps(spec.num_steps, spec.window, window_start(spec, step, seed))
    trained = trained_steps(spec.num_steps, sde, spec.timestep_fraction)
    return WindowPlan(sde, trained, tail_stops(spec.num_steps, sde, spec.tail_steps))


def ode_plan(num_steps: int) -> WindowPlan:
    """An all-ODE rollout (evaluation): every sigma visited, nothing trained."""
    return WindowPlan((), (), tuple(range(num_steps + 1)))


def check_window(spec: WindowSpec, *, trains: bool = True) -> None:
    """One readable ValueError for window options no rollout can follow.

    trains: False for the "ode" kernel, which trains no step (so no window needs a trained step).
    """
    T, W = spec.num_steps, spec.window
    if spec.mode not in WINDOW_MODES:
        raise ValueError(f"window_mode must be one of {', '.join(WINDOW_MODES)}, got {spec.mode!r}")
    if W is not None and not 1 <= W <= T:
        raise ValueError(f"window must be between 1 and num_steps={T}, got {W}")
    if spec.slide_every < 1:
        raise ValueError(f"slide_every must be >= 1, got {spec.slide_every}")
    if W is not None and spec.mode == "fixed" and spec.start + W > T:
        raise ValueError(f"window_start + window = {spec.start + W} exceeds num_steps={T}")
    if not 0.0 < spec.timestep_fraction <= 1.0:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {spec.timestep_fraction}")
    if trains and not all(trained_steps(T, window_steps(T, W, a), spec.timestep_fraction) for a in window_starts(spec)):
        raise ValueError("timestep_fraction and the SDE window leave some rollouts without a trained step: "
                         "widen the window, lower window_max_start or raise timestep_fraction")
    if spec.tail_steps is not None and spec.tail_steps < 1:
        raise ValueError(f"tail_steps must be >= 1 (or null for the schedule's own steps), got {spec.tail_steps}")
