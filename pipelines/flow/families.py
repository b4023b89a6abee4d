"""Model families of the flow sampler: what differs between SD3, FLUX and Wan (and next, speech).

The sampling loop (adapter.py) reaches a model only through its Family, so a new family joins
with `register_family` and no change to the loop. Per rollout the loop calls:

    cond = family.encode(prompts, device)                     # {name: [b, ...]}, one row per prompt
    x = family.init_latents(n, cond_rows, generator, device)  # [n, *D] fp32; cond_rows [n, ...]
    sigmas = family.sigmas(num_steps)                         # [T+1] fp32 from 1 to 0, on cpu
    v = family.forward(model, x, sigma, cond_rows)            # [m, *D]; model: policy or reference
    samples = family.decode(x, cond_rows)                     # [n, ...] decoded media

Conditions are opaque dicts of tensors with one row per prompt: the loop only indexes,
concatenates and expands them along dim 0, so a condition can be text embeddings, a noisy
waveform or a normalisation scale. `family.model` is the velocity model that trains;
`frozen_modules()` never train. CFG needs `guidance = True` and `negative(device)`.

Built-in families (FAMILIES, matched by pipeline class name in PIPELINE_FAMILIES):
"sd3" StableDiffusion3Pipeline, "flux" FluxPipeline (text-to-image), "wan" WanPipeline
(text-to-video). Heavy imports (diffusers) happen inside methods.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable

import torch

from mmgrpo.pipelines.flow.export import export_media
from mmgrpo.pipelines.toolkit import prompt_text

if TYPE_CHECKING:
    from mmgrpo.pipelines.flow.options import FlowOptions

Conditions = dict[str, torch.Tensor]  # {name: [rows, ...]}


class Family(ABC):
    """What the flow sampler needs from one kind of model. `pipeline`: the object the user gave
    (a diffusers pipeline, or any bundle of modules a family knows); `options`: FlowOptions."""

    guidance = False  # True: negative() gives the unconditional condition of CFG

    def __init__(self, pipeline: Any, options: "FlowOptions") -> None:
        self.pipeline = pipeline
        self.options = options

    @property
    @abstractmethod
    def model(self) -> torch.nn.Module:
        """The velocity model: the module that trains."""

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules that never train (encoders, decoders)."""
        return []

    def to(self, device: str | torch.device) -> None:
        """Move the frozen modules (the adapter's Finetuning moves the trained model)."""
        for module in self.frozen_modules():
            module.to(device)

    def sequence_tokens(self) -> int | None:
        """Tokens of one forward's self-attention sequence (latent patches + joint text), for the memory
        estimate (mmgrpo.memory); None where the family does not know."""
        return None

    def enable_gradient_checkpointing(self) -> None:
        if not hasattr(self.model, "enable_gradient_checkpointing"):
            raise ValueError(f"{type(self.model).__name__} has no enable_gradient_checkpointing(): "
                             "set gradient_checkpointing=false")
        self.model.enable_gradient_checkpointing()

    def key(self, prompt: Any, index: int) -> Hashable:
        """Prompts of a batch with equal keys share one encoded condition (default: none share)."""
        return index

    @abstractmethod
    def encode(self, prompts: list[Any], device: torch.device) -> Conditions:
        """The conditions of `prompts`, one row each: {name: [b, ...]}."""

    def negative(self, device: torch.device) -> Conditions:
        """The unconditional condition of CFG {name: [1, ...]} (families with guidance = True)."""
        raise ValueError(f"{type(self).__name__} has no unconditional condition: set guidance_scale <= 1")

    @abstractmethod
    def init_latents(self, n: int, conditions: Conditions, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """n initial latents [n, *D] fp32, row i for the condition row i of `conditions` [n, ...]."""

    def prior(self, conditions: Conditions) -> tuple[torch.Tensor | None, float]:
        """The prior N(y, s_max^2 I) that init_latents draws from, for the condition rows [n, ...]:
        (y [n, *D] fp32 on the latents' device, or None for 0; s_max). The SDE kernels need it for
        the score (sde.py); the sampler and log_prob ask with the same rows, so re-scoring sees the
        same y. Default: the standard prior N(0, I), (None, 1.0)."""
        return None, 1.0

    @abstractmethod
    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The num_steps + 1 sigmas of a sampler from 1 to 0, fp32 on cpu."""

    @abstractmethod
    def forward(self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        """The velocity model's output [m, *D] at latents x [m, *D] in the model's dtype, sigmas [m]."""

    @abstractmethod
    def decode(self, latents: torch.Tensor, conditions: Conditions | None = None) -> torch.Tensor:
        """Decoded samples [n, ...] from final latents [n, *D] (conditions [n, ...] where the family needs them)."""

    def export(self, sample: torch.Tensor, path: str | Path, fps: int = 8) -> str:
        """Write one decoded sample to `path`; returns the path written."""
        return export_media(sample, path, fps)


# ----------------------------------------------------------------------------- diffusers text-to-media


class DiffusersFamily(Family):
    """A diffusers text-to-image/video pipeline: text encoders, a transformer, a VAE, a flow scheduler."""

    guidance = True
    default_max_sequence_length = 256

    def __init__(self, pipeline: Any, options: "FlowOptions") -> None:
        super().__init__(pipeline, options)
        self.pipe = pipeline
        self.max_sequence_length = options.max_sequence_length or self.default_max_sequence_length

    @property
    def model(self) -> torch.nn.Module:
        return self.pipe.transformer

    def frozen_modules(self) -> list[torch.nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
        return [m for m in (getattr(self.pipe, name, None) for name in names) if m is not None]

    def to(self, device: str | torch.device) -> None:
        self.pipe.to(device)

    def key(self, prompt: Any, index: int) -> Hashable:
        return prompt_text(prompt, index)  # each distinct text is encoded once

    def encode(self, prompts: list[Any], device: torch.device) -> Conditions:
        return self.encode_texts([prompt_text(p, i) for i, p in enumerate(prompts)], device)

    def negative(self, device: torch.device) -> Conditions:
        return self.encode_texts([self.options.negative_prompt], device)

    @abstractmethod
    def encode_texts(self, texts: list[str], device: torch.device) -> Conditions:
        """The pipeline's own encode_prompt, one row per text."""

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.pipe.scheduler.config.num_train_timesteps  # [m]

    def scheduler_kwargs(self, num_steps: int) -> dict[str, Any]:
        return {}

    def sigmas(self, num_steps: int) -> torch.Tensor:
        from diffusers import FlowMatchEulerDiscreteScheduler

        sch = self.pipe.scheduler
        if not (isinstance(sch, FlowMatchEulerDiscreteScheduler) or sch.config.get("use_flow_sigmas", False)):
            raise ValueError(
                f"{type(sch).__name__} gives no flow-matching sigmas: use a FlowMatchEulerDiscreteScheduler "
                "(or use_flow_sigmas=True), or schedule='dance'"
            )
        sch = copy.deepcopy(sch)  # set_timesteps mutates; leave the pipeline's scheduler alone
        sch.set_timesteps(num_steps, device="cpu", **self.scheduler_kwargs(num_steps))
        sigmas = sch.sigmas.detach().float().cpu()  # [T+1]
        if sigmas.shape != (num_steps + 1,) or float(sigmas[-1]) != 0.0:
            raise ValueError(f"{type(sch).__name__} gave {len(sigmas)} sigmas ending at {float(sigmas[-1])}; "
                             f"expected {num_steps + 1} ending at 0: use schedule='dance'")
        return sigmas

    def _to_images(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents.to(vae.dtype) / vae.config.scaling_factor + shift  # [n, C, h, w]
        image = vae.decode(z, return_dict=False)[0]  # [n, 3, H, W] in [-1, 1]
        return self.pipe.image_processor.postprocess(image, output_type="pt").float()  # [n, 3, H, W] in [0, 1]


def _dynamic_shift(config: Any, seq_len: int, max_shift: float) -> float:
    """mu of the scheduler's resolution-dependent shift (diffusers' calculate_shift with its defaults)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", max_shift))


class SD3Family(DiffusersFamily):
    def __init__(self, pipeline: Any, options: "FlowOptions") -> None:
        super().__init__(pipeline, options)
        self.height = options.height or pipeline.default_sample_size * pipeline.vae_scale_factor
        self.width = options.width or pipeline.default_sample_size * pipeline.vae_scale_factor

    def encode_texts(self, texts: list[str], device: torch.device) -> Conditions:
        pe, _, pooled, _ = self.pipe.encode_prompt(
            prompt=texts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}  # [b, L, D], [b, P]

    def init_latents(self, n: int, conditions: Conditions, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        c = self.pipe.transformer.config.in_channels
        return self.pipe.prepare_latents(n, c, self.height, self.width, torch.float32, device, generator)  # [n, C, h, w]

    def sequence_tokens(self) -> int:
        p, f = self.pipe.transformer.config.patch_size, self.pipe.vae_scale_factor
        clip = getattr(self.pipe, "tokenizer_max_length", 77)  # without T5, diffusers pads with clip-length zeros
        t5 = self.max_sequence_length if getattr(self.pipe, "text_encoder_3", None) is not None else clip
        return (self.height // f // p) * (self.width // f // p) + clip + t5  # latent patches, then CLIP + T5 text

    def scheduler_kwargs(self, num_steps: int) -> dict[str, Any]:
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {}
        p, f = self.pipe.transformer.config.patch_size, self.pipe.vae_scale_factor
        return {"mu": _dynamic_shift(config, (self.height // f // p) * (self.width // f // p), 1.16)}

    def forward(self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        return model(
            hidden_states=x, timestep=self.timestep(sigma), encoder_hidden_states=conditions["prompt_embeds"],
            pooled_projections=conditions["pooled_prompt_embeds"], return_dict=False,
        )[0]  # [m, C, h, w]

    def decode(self, latents: torch.Tensor, conditions: Conditions | None = None) -> torch.Tensor:
        return self._to_images(latents)  # [n, 3, H, W]


class FluxFamily(DiffusersFamily):
    default_max_sequence_length = 512

    def __init__(self, pipeline: Any, options: "FlowOptions") -> None:
        super().__init__(pipeline, options)
        self.height = options.height or pipeline.default_sample_size * pipeline.vae_scale_factor
        self.width = options.width or pipeline.default_sample_size * pipeline.vae_scale_factor
        f = pipeline.vae_scale_factor
        if self.height % (2 * f) or self.width % (2 * f):
            raise ValueError(f"FLUX needs height and width divisible by {2 * f}: got {self.height}x{self.width}")
        self.latent_h, self.latent_w = 2 * (self.height // (2 * f)), 2 * (self.width // (2 * f))

    def encode_texts(self, texts: list[str], device: torch.device) -> Conditions:
        pe, pooled, text_ids = self.pipe.encode_prompt(
            prompt=texts, prompt_2=None, device=device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        ids = text_ids.unsqueeze(0).expand(len(texts), -1, -1)  # [b, L, 3] (the same for every prompt)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled, "text_ids": ids}

    def init_latents(self, n: int, conditions: Conditions, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        c = self.pipe.transformer.config.in_channels // 4
        latents, _ = self.pipe.prepare_latents(n, c, self.height, self.width, torch.float32, device, generator)
        return latents  # [n, h*w/4, 4C] packed

    def scheduler_kwargs(self, num_steps: int) -> dict[str, Any]:
        config = self.pipe.scheduler.config
        kwargs: dict[str, Any] = {"sigmas": torch.linspace(1.0, 1.0 / num_steps, num_steps).tolist()}
        if config.get("use_dynamic_shifting", False):
            kwargs["mu"] = _dynamic_shift(config, (self.latent_h // 2) * (self.latent_w // 2), 1.15)
        return kwargs

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma  # [m] FLUX takes t / 1000 = sigma

    def sequence_tokens(self) -> int:
        return (self.latent_h // 2) * (self.latent_w // 2) + self.max_sequence_length  # packed 2x2 patches + T5

    def forward(self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        img_ids = self.pipe._prepare_latent_image_ids(1, self.latent_h // 2, self.latent_w // 2, x.device, x.dtype)
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), self.options.distilled_guidance, device=x.device, dtype=torch.float32)
        return model(
            hidden_states=x, timestep=self.timestep(sigma), guidance=guidance,
            pooled_projections=conditions["pooled_prompt_embeds"], encoder_hidden_states=conditions["prompt_embeds"],
            txt_ids=conditions["text_ids"][0], img_ids=img_ids, return_dict=False,
        )[0]  # [m, h*w/4, 4C]

    def decode(self, latents: torch.Tensor, conditions: Conditions | None = None) -> torch.Tensor:
        unpacked = self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)
        return self._to_images(unpacked)  # [n, 3, H, W]


class WanFamily(DiffusersFamily):
    default_max_sequence_length = 512

    def __init__(self, pipeline: Any, options: "FlowOptions") -> None:
        if getattr(pipeline, "transformer_2", None) is not None or pipeline.config.get("expand_timesteps", False):
            raise ValueError("FlowAdapter supports single-transformer Wan 2.1 text-to-video pipelines only "
                             "(no transformer_2 / expand_timesteps)")
        super().__init__(pipeline, options)
        self.height, self.width = options.height or 480, options.width or 832
        self.num_frames = options.num_frames or 81
        ft, fs = pipeline.vae_scale_factor_temporal, pipeline.vae_scale_factor_spatial
        if (self.num_frames - 1) % ft:
            raise ValueError(f"Wan needs num_frames - 1 divisible by {ft}: got num_frames={self.num_frames}")
        p = pipeline.transformer.config.patch_size
        if self.height % (fs * p[1]) or self.width % (fs * p[2]):
            raise ValueError(f"Wan needs height and width divisible by {fs * p[1]}: got {self.height}x{self.width}")
        self._channels_last = False

    def sequence_tokens(self) -> int:  # the text enters by cross-attention, outside the sequence
        ft, fs = self.pipe.vae_scale_factor_temporal, self.pipe.vae_scale_factor_spatial
        p = self.pipe.transformer.config.patch_size
        return ((self.num_frames - 1) // ft + 1) // p[0] * (self.height // fs // p[1]) * (self.width // fs // p[2])

    def encode_texts(self, texts: list[str], device: torch.device) -> Conditions:
        pe, _ = self.pipe.encode_prompt(
            prompt=texts, do_classifier_free_guidance=False, num_videos_per_prompt=1,
            max_sequence_length=self.max_sequence_length, device=device, dtype=self.pipe.transformer.dtype,
        )
        return {"prompt_embeds": pe}  # [b, L, D]

    def init_latents(self, n: int, conditions: Conditions, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        c = self.pipe.transformer.config.in_channels
        return self.pipe.prepare_latents(
            n, c, self.height, self.width, self.num_frames, torch.float32, device, generator
        )  # [n, C, f, h, w]

    def forward(self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        return model(
            hidden_states=x, timestep=self.timestep(sigma), encoder_hidden_states=conditions["prompt_embeds"],
            return_dict=False,
        )[0]  # [m, C, f, h, w]

    def decode(self, latents: torch.Tensor, conditions: Conditions | None = None) -> torch.Tensor:
        vae = self.pipe.vae
        if not self._channels_last:
            # Wan's VAE RMS-normalises over channels (dim 1) after its causal 3-D convolutions. With
            # channels-last conv weights the convolutions return channels-last activations, so that norm
            # reads contiguous memory: the decode is ~3x faster on CPU, with the same output to 1e-6.
            for module in vae.modules():
                if isinstance(module, torch.nn.Conv3d):
                    module.to(memory_format=torch.channels_last_3d)
            self._channels_last = True
        c = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1).to(latents.device, vae.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1).to(latents.device, vae.dtype)
        z = (latents.to(vae.dtype) * std + mean).contiguous(memory_format=torch.channels_last_3d)  # [n, C, f, h, w]
        video = vae.decode(z, return_dict=False)[0]  # [n, 3, F, H, W]
        frames = self.pipe.video_processor.postprocess_video(video, output_type="pt")  # [n, F, 3, H, W]
        return frames.float().contiguous()


# ----------------------------------------------------------------------------- the registry

FAMILIES: dict[str, type[Family]] = {"sd3": SD3Family, "flux": FluxFamily, "wan": WanFamily}
PIPELINE_FAMILIES: dict[str, str] = {  # pipeline class name -> family name
    "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "WanPipeline": "wan",
}


def register_family(name: str, cls: type[Family], pipeline_class_names: list[str] | tuple[str, ...]) -> type[Family]:
    """Let FlowAdapter drive objects of the named classes (or their subclasses) with the family `cls`.

    FlowAdapter(pipeline=obj) then builds cls(obj, options). Returns cls.
    """
    if not (isinstance(cls, type) and issubclass(cls, Family)):
        raise TypeError(f"register_family needs a subclass of mmgrpo.pipelines.flow.families.Family, got {cls!r}")
    for class_name in pipeline_class_names:
        owner = PIPELINE_FAMILIES.get(class_name, name)
        if owner != name:
            raise ValueError(f"{class_name} is already driven by the flow family {owner!r}: choose other class names")
    FAMILIES[name] = cls
    for class_name in pipeline_class_names:
        PIPELINE_FAMILIES[class_name] = name
    return cls


def family_for(pipeline: Any) -> tuple[str, type[Family]]:
    """(name, Family class) of the object given as FlowAdapter's pipeline, by its class or a base class."""
    for cls in type(pipeline).__mro__:
        if cls.__name__ in PIPELINE_FAMILIES:
            name = PIPELINE_FAMILIES[cls.__name__]
            return name, FAMILIES[name]
    raise ValueError(
        f"FlowAdapter drives {', '.join(PIPELINE_FAMILIES)}; got {type(pipeline).__name__}. Load one of those "
        f"pipelines, or register_family(name, YourFamily, ['{type(pipeline).__name__}']) for your own model"
    )
