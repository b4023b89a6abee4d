"""Flow-matching adapters (SD3, FLUX, Wan over diffusers: image and video; more families by registration).

- sde.py: all flow log-prob math (kernels "sde", "cps", "dance", "exact", "ode"; schedules).
- window.py: the SDE window plan (which steps are SDE, trained, visited), pure functions.
- families.py: what differs per model family (conditions, latents, sigmas, velocity model,
  decode) and the public registry (FAMILIES, register_family, family_for).
- options.py: FlowOptions, the adapter's constructor options (`pipeline.kwargs`).
- adapter.py: FlowAdapter, the GRPO policy: the sampling loop and log_prob.
- export.py: writing images and videos to files.
- tiny.py: tiny random SD3 / FLUX / Wan pipelines built from config (tests, embedded defaults).

Heavy imports (diffusers, transformers, peft) happen inside functions.
"""

from mmgrpo.pipelines.flow.adapter import FlowAdapter
from mmgrpo.pipelines.flow.families import FAMILIES, Family, family_for, register_family
from mmgrpo.pipelines.flow.options import FlowOptions

__all__ = ["FAMILIES", "Family", "FlowAdapter", "FlowOptions", "family_for", "register_family"]
