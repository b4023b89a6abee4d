"""Masked-diffusion LMs (LLaDA-style): the sampler, the log-prob estimators, the adapter, a tiny model builder.

Only the adapter needs transformers; the sampler and estimators are plain torch.
"""

from mmgrpo.pipelines.mdlm.adapter import MaskedDiffusionAdapter, MDLMOptions

__all__ = ["MaskedDiffusionAdapter", "MDLMOptions"]
