"""Flow-matching adapters over diffusers (SD3, FLUX, Wan: image and video).

- sde.py: all flow log-prob math (kernels "sde", "cps", "dance", "exact", "ode"; schedules).
- adapter.py: FlowAdapter, the GRPO policy that drives an unpatched diffusers pipeline.
- tiny.py: tiny random SD3 / FLUX / Wan pipelines built from config (tests, embedded defaults).

Heavy imports (diffusers, transformers, peft) happen inside functions.
"""

from mmgrpo.pipelines.flow.adapter import FlowAdapter

__all__ = ["FlowAdapter"]
