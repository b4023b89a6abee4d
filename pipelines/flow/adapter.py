"""FlowAdapter: GRPO's policy over unpatched diffusers flow-matching pipelines.

Drives StableDiffusion3Pipeline and FluxPipeline (text-to-image) and WanPipeline
(text-to-video) through their own components: `encode_prompt`, `prepare_latents`, the
scheduler's sigmas (with its shift), the transformer and the VAE decode. The adapter owns
the sampling loop, so it records every trained transition; all step math is in `sde.py`.

    for i in range(T):                      # T = num_steps (evaluate: eval_steps)
        v = transformer(x, sigma_i, prompt)  # CFG: uncond + cond rows in ONE forward
        x = kernel step (SDE inside the window, Euler "ode" elsewhere; with tail_steps, fewer
                         and larger Euler steps after the window)

What a Rollout holds (N = B*G rows, prompt-major; T decision steps; K trained steps):
- log_probs [N, T] fp32, the MEAN over latent dims of each step's log-density (sde.py);
  mask [N, T] True only on trained steps: SDE steps inside the window and among the first
  int(T * timestep_fraction). Other entries of log_probs are 0.
- extras (per row): "latents" [N, K+1, *D] fp32, the chain x_t0 ... x_t0+K through the
  trained steps (slot j is x_t of trained step j, slot j+1 its x_{t-1}); "sigmas" [N, K+1];
  "step_index" [N, K] long (which of the T columns slot j is); "sigma_max" [N] (the
  schedule's sigmas[1], for the "sde" kernel); "prompt_key" [N] long. Nothing is stored
  for ODE steps or untrained SDE steps, nor in evaluation rollouts.
- shared: "prompt_embeds" {prompt_key: {name: tensor [1, ...]}}, each prompt encoded once
  and shared by its group; "negative_embeds" {name: tensor [1, ...]} when CFG is on.
- samples: images as float [3, H, W] in [0, 1]; videos as float [F, 3, H, W] in [0, 1]
  (with decode=False: the final latents [*D] fp32).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from mmgrpo.pipelines.flow import sde
from mmgrpo.protocols import StepScores
from mmgrpo.rollout import Rollout

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
WINDOW_MODES = ("fixed", "random", "sliding")


# ----------------------------------------------------------------------------- per-pipeline glue


class _Glue:
    """What differs between pipelines: text encoding, latent layout, transformer call, decode."""

    default_max_sequence_length = 256

    def __init__(self, pipe: Any, height: int | None, width: int | None, num_frames: int | None):
        self.pipe = pipe
        self.height = height or pipe.default_sample_size * pipe.vae_scale_factor
        self.width = width or pipe.default_sample_size * pipe.vae_scale_factor
        self.num_frames = num_frames

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.pipe.scheduler.config.num_train_timesteps  # [m]

    def scheduler_kwargs(self, num_steps: int) -> dict[str, Any]:
        return {}

    def _to_images(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents.to(vae.dtype) / vae.config.scaling_factor + shift  # [n, C, h, w]
        image = vae.decode(z, return_dict=False)[0]  # [n, 3, H, W] in [-1, 1]
        return self.pipe.image_processor.postprocess(image, output_type="pt").float()  # [n, 3, H, W] in [0, 1]


class _SD3(_Glue):
    def encode(self, texts: list[str], device: torch.device, max_len: int) -> dict[str, torch.Tensor]:
        pe, _, pooled, _ = self.pipe.encode_prompt(
            prompt=texts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=max_len,
        )
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}  # [b, L, D], [b, P]

    def init_latents(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        c = self.pipe.transformer.config.in_channels
        latents = self.pipe.prepare_latents(n, c, self.height, self.width, torch.float32, device, generator)
        return latents  # [n, C, h, w]

    def scheduler_kwargs(self, num_steps: int) -> dict[str, Any]:
        sch = self.pipe.scheduler
        if not sch.config.get("use_dynamic_shifting", False):
            return {}
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        p = self.pipe.transformer.config.patch_size
        f = self.pipe.vae_scale_factor
        seq_len = (self.height // f // p) * (self.width // f // p)
        cfg = sch.config
        return {"mu": calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                      cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))}

    def forward(self, model: Any, x: torch.Tensor, sigma: torch.Tensor, emb: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(
            hidden_states=x, timestep=self.timestep(sigma), encoder_hidden_states=emb["prompt_embeds"],
            pooled_projections=emb["pooled_prompt_embeds"], return_dict=False,
        )[0]  # [m, C, h, w]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._to_images(latents)  # [n, 3, H, W]


class _Flux(_Glue):
    default_max_sequence_length = 512

    def __init__(self, pipe: Any, height: int | None, width: int | None, num_frames: int | None,
                 distilled_guidance: float = 3.5):
        super().__init__(pipe, height, width, num_frames)
        self.distilled_guidance = distilled_guidance
        f = pipe.vae_scale_factor
        if self.height % (2 * f) or self.width % (2 * f):
            raise ValueError(f"FLUX needs height and width divisible by {2 * f}: got {self.height}x{self.width}")
        self.latent_h, self.latent_w = 2 * (self.height // (2 * f)), 2 * (self.width // (2 * f))

    def encode(self, texts: list[str], device: torch.device, max_len: int) -> dict[str, torch.Tensor]:
        pe, pooled, text_ids = self.pipe.encode_prompt(
            prompt=texts, prompt_2=None, device=device, num_images_per_prompt=1, max_sequence_length=max_len
        )
        ids = text_ids.unsqueeze(0).expand(len(texts), -1, -1)  # [b, L, 3] (the same for every prompt)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled, "text_ids": ids}

    def init_latents(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        c = self.pipe.transformer.config.in_channels // 4
        latents, _ = self.pipe.prepare_latents(n, c, self.height, self.width, torch.float32, device, generator)
        return latents  # [n, h*w/4, 4C] packed

    def scheduler_kwargs(self, num_steps: int) -> dict[str, Any]:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipe.scheduler.config
        seq_len = (self.latent_h // 2) * (self.latent_w // 2)
        kwargs: dict[str, Any] = {"sigmas": torch.linspace(1.0, 1.0 / num_steps, num_steps).tolist()}
        if cfg.get("use_dynamic_shifting", False):
            kwargs["mu"] = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256),
                                           cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                           cfg.get("max_shift", 1.15))
        return kwargs

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma  # [m] FLUX takes t / 1000 = sigma

    def forward(self, model: Any, x: torch.Tensor, sigma: torch.Tensor, emb: dict[str, torch.Tensor]) -> torch.Tensor:
        img_ids = self.pipe._prepare_latent_image_ids(1, self.latent_h // 2, self.latent_w // 2, x.device, x.dtype)
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), self.distilled_guidance, device=x.device, dtype=torch.float32)
        return model(
            hidden_states=x, timestep=self.timestep(sigma), guidance=guidance,
            pooled_projections=emb["pooled_prompt_embeds"], encoder_hidden_states=emb["prompt_embeds"],
            txt_ids=emb["text_ids"][0], img_ids=img_ids, return_dict=False,
        )[0]  # [m, h*w/4, 4C]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        unpacked = self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)
        return self._to_images(unpacked)  # [n, 3, H, W]


class _Wan(_Glue):
    default_max_sequence_length = 512

    def __init__(self, pipe: Any, height: int | None, width: int | None, num_frames: int | None):
        if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("expand_timesteps", False):
            raise ValueError("FlowAdapter supports single-transformer Wan 2.1 text-to-video pipelines only "
                             "(no transformer_2 / expand_timesteps)")
        self.pipe = pipe
        self.height, self.width = height or 480, width or 832
        self.num_frames = num_frames or 81
        ft, fs = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        if (self.num_frames - 1) % ft:
            raise ValueError(f"Wan needs num_frames - 1 divisible by {ft}: got num_frames={self.num_frames}")
        p = pipe.transformer.config.patch_size
        if self.height % (fs * p[1]) or self.width % (fs * p[2]):
            raise ValueError(f"Wan needs height and width divisible by {fs * p[1]}: got {self.height}x{self.width}")
        # Wan's VAE RMS-normalises over channels (dim 1) after its causal 3-D convolutions. With
        # channels-last conv weights the convolutions return channels-last activations, so that norm
        # reads contiguous memory: the decode is ~3x faster on CPU, with the same output to 1e-6.
        for module in pipe.vae.modules():
            if isinstance(module, torch.nn.Conv3d):
                module.to(memory_format=torch.channels_last_3d)

    def encode(self, texts: list[str], device: torch.device, max_len: int) -> dict[str, torch.Tensor]:
        pe, _ = self.pipe.encode_prompt(
            prompt=texts, do_classifier_free_guidance=False, num_videos_per_prompt=1, max_sequence_length=max_len,
            device=device, dtype=self.pipe.transformer.dtype,
        )
        return {"prompt_embeds": pe}  # [b, L, D]

    def init_latents(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        c = self.pipe.transformer.config.in_channels
        return self.pipe.prepare_latents(
            n, c, self.height, self.width, self.num_frames, torch.float32, device, generator
        )  # [n, C, f, h, w]

    def forward(self, model: Any, x: torch.Tensor, sigma: torch.Tensor, emb: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(
            hidden_states=x, timestep=self.timestep(sigma), encoder_hidden_states=emb["prompt_embeds"],
            return_dict=False,
        )[0]  # [m, C, f, h, w]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        c = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1).to(latents.device, vae.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1).to(latents.device, vae.dtype)
        z = (latents.to(vae.dtype) * std + mean).contiguous(memory_format=torch.channels_last_3d)  # [n, C, f, h, w]
        video = vae.decode(z, return_dict=False)[0]  # [n, 3, F, H, W]
        frames = self.pipe.video_processor.postprocess_video(video, output_type="pt")  # [n, F, 3, H, W]
        return frames.float().contiguous()


_GLUE = {"StableDiffusion3Pipeline": ("sd3", _SD3), "FluxPipeline": ("flux", _Flux), "WanPipeline": ("wan", _Wan)}


def _family(pipe: Any) -> tuple[str, type[_Glue]]:
    for cls in type(pipe).__mro__:
        if cls.__name__ in _GLUE:
            return _GLUE[cls.__name__]
    raise ValueError(
        f"FlowAdapter drives {', '.join(_GLUE)}; got {type(pipe).__name__}. Load one of those pipelines."
    )


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
        return prompt["prompt"]
    raise ValueError(f"FlowAdapter prompts must be strings or dicts with a 'prompt' string; got {prompt!r:.80}")


def _cat_embeds(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # each [sum b, ...]


# ----------------------------------------------------------------------------- the adapter


class FlowAdapter:
    """GRPO policy over a diffusers flow-matching pipeline (SD3, FLUX, Wan 2.1).

    Keyword arguments (as in YAML):
      pipeline / path / torch_dtype / device: a built pipeline object, or a local path for
          DiffusionPipeline.from_pretrained (torch_dtype "float32" | "bfloat16" | "float16").
      kernel ("sde" | "cps" | "dance" | "exact" | "ode") and noise_level (a or eta; None =
          sde.DEFAULT_NOISE_LEVEL[kernel]). See sde.py.
      num_steps (training rollouts) and eval_steps (sample(evaluate=True): all-ODE, nothing stored).
      schedule: "scheduler" (the pipeline scheduler's sigmas with its shift) or "dance"
          (linspace(1, 0, T+1) shifted by schedule_shift).
      timestep_fraction: only the first int(T * fraction) steps are trained (0.99 of 10 -> 9).
      window: SDE window size (None = SDE at every step), ODE elsewhere; window_mode "fixed"
          (start = window_start), "random" (start ~ U{0..window_max_start} from the sample
          generator; default max start T//2 - 1, the first half) or "sliding" (start =
          window_start + calls // slide_every, wrapping after window_max_start, default T - window).
      tail_steps: Euler steps for the ODE tail of a training rollout, from the end of its SDE
          window to sigma 0 (None = the schedule's own steps). Only window steps are trained, so
          the tail only has to carry the window's output to a sample the rewards can read; the
          tail's sigmas are tail_steps + 1 of the schedule's, evenly spaced by index (MixGRPO-Flash
          integrates this part coarsely too). Evaluation rollouts are not affected.
      guidance_scale: > 1 turns on CFG, uncond (negative_prompt) and cond rows batched in one
          forward; <= 1 off. distilled_guidance: FLUX guidance embedding where the model has one.
      same_noise_in_group: the G samples of a prompt start from the same initial latents; the
          ODE steps before the SDE window are then run once per prompt, not once per sample.
      finetune: "lora" (peft on lora_target_modules with lora_rank / lora_alpha; reference
          = adapter disabled) or "full" (all transformer weights; reference = a frozen copy).
      height, width, num_frames (Wan), max_sequence_length (None = the pipeline's default).
      decode: False makes samples the final latents [*D] instead of decoded media (latent-space
          rewards, fast tests). gradient_checkpointing, progress (a bar over sampling steps).
    """

    scores_all_steps_at_once = False

    def __init__(
        self,
        pipeline: Any = None,
        *,
        path: str | None = None,
        torch_dtype: str | None = None,
        device: str | torch.device | None = None,
        kernel: str = "sde",
        noise_level: float | None = None,
        num_steps: int = 10,
        eval_steps: int = 40,
        schedule: str = "scheduler",
        schedule_shift: float = 1.0,
        timestep_fraction: float = 1.0,
        window: int | None = None,
        window_mode: str = "fixed",
        window_start: int = 0,
        window_max_start: int | None = None,
        slide_every: int = 25,
        tail_steps: int | None = None,
        guidance_scale: float = 1.0,
        distilled_guidance: float = 3.5,
        negative_prompt: str = "",
        same_noise_in_group: bool = False,
        finetune: str = "lora",
        lora_rank: int = 32,
        lora_alpha: float = 64.0,
        lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        max_sequence_length: int | None = None,
        gradient_checkpointing: bool = False,
        decode: bool = True,
        progress: bool = False,
    ):
        if (pipeline is None) == (path is None):
            raise ValueError(
                "FlowAdapter needs exactly one of `pipeline` (a diffusers pipeline) or `path` (a local folder)"
            )
        if pipeline is None:
            from diffusers import DiffusionPipeline

            dtype = getattr(torch, torch_dtype) if torch_dtype else None
            pipeline = DiffusionPipeline.from_pretrained(path, dtype=dtype)
        self.pipe = pipeline
        self.family, glue_cls = _family(pipeline)
        if device is not None:
            self.pipe.to(device)
        self.device = self.pipe.transformer.device

        self.kernel = sde.check_kernel(kernel)
        self.noise_level = sde.DEFAULT_NOISE_LEVEL[kernel] if noise_level is None else float(noise_level)
        if num_steps < 1 or eval_steps < 1:
            raise ValueError(f"num_steps and eval_steps must be >= 1, got {num_steps} and {eval_steps}")
        self.num_steps, self.eval_steps = int(num_steps), int(eval_steps)
        if schedule not in ("scheduler", "dance"):
            raise ValueError(f"schedule must be 'scheduler' or 'dance', got {schedule!r}")
        self.schedule, self.schedule_shift = schedule, float(schedule_shift)
        if not 0.0 < timestep_fraction <= 1.0:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
        self.timestep_fraction = float(timestep_fraction)
        if window_mode not in WINDOW_MODES:
            raise ValueError(f"window_mode must be one of {', '.join(WINDOW_MODES)}, got {window_mode!r}")
        if window is not None and not 1 <= window <= num_steps:
            raise ValueError(f"window must be between 1 and num_steps={num_steps}, got {window}")
        self.window, self.window_mode, self.window_start = window, window_mode, int(window_start)
        self.window_max_start, self.slide_every = window_max_start, int(slide_every)
        if self.slide_every < 1:
            raise ValueError(f"slide_every must be >= 1, got {slide_every}")
        self.sample_calls = 0  # training sample() calls so far (drives the sliding window)
        if window is not None and window_mode == "fixed" and window_start + window > num_steps:
            raise ValueError(f"window_start + window = {window_start + window} exceeds num_steps={num_steps}")
        if kernel != "ode" and not all(self._trained_steps(self._window(a)) for a in self._window_starts()):
            raise ValueError("timestep_fraction and the SDE window leave some rollouts without a trained step: "
                             "widen the window, lower window_max_start or raise timestep_fraction")
        if tail_steps is not None and tail_steps < 1:
            raise ValueError(f"tail_steps must be >= 1 (or null for the schedule's own steps), got {tail_steps}")
        self.tail_steps = tail_steps
        self.guidance_scale, self.negative_prompt = float(guidance_scale), negative_prompt
        self.same_noise_in_group = bool(same_noise_in_group)

        extra = {"distilled_guidance": distilled_guidance} if self.family == "flux" else {}
        self.glue = glue_cls(pipeline, height, width, num_frames, **extra)
        self.max_sequence_length = max_sequence_length or self.glue.default_max_sequence_length
        self.decode, self.progress = bool(decode), progress

        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
            module = getattr(pipeline, name, None)
            if module is not None:
                module.requires_grad_(False)
        transformer = pipeline.transformer.eval()  # no dropout: re-scoring must match sampling
        if finetune == "lora":
            from peft import LoraConfig

            transformer.requires_grad_(False)
            transformer.add_adapter(
                LoraConfig(r=lora_rank, lora_alpha=lora_alpha, init_lora_weights=True,
                           target_modules=list(lora_target_modules))
            )
            for p in transformer.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # LoRA weights train in fp32 whatever the base dtype
            self._reference_model = None
        elif finetune == "full":
            transformer.requires_grad_(True)
            self._reference_model = copy.deepcopy(transformer).requires_grad_(False).eval()
        else:
            raise ValueError(f"finetune must be 'lora' or 'full', got {finetune!r}")
        self.finetune = finetune
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self._model = transformer  # the transformer that velocity() runs; reference() swaps it
        self._negative: dict[str, torch.Tensor] | None = None  # cached negative-prompt embeddings
        self._next_prompt_key = 0

    # ------------------------------------------------------------------ protocol

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.pipe.transformer.named_parameters() if p.requires_grad}

    @contextmanager
    def reference(self) -> Iterator["FlowAdapter"]:
        """The frozen reference policy: LoRA disabled, or the frozen copy for full fine-tuning.

        Trainable weights are not modified (and their requires_grad flags are restored)."""
        transformer = self.pipe.transformer
        if self.finetune == "full":
            self._model = self._reference_model
            try:
                yield self
            finally:
                self._model = transformer
            return
        flags = {n: p.requires_grad for n, p in transformer.named_parameters()}
        transformer.disable_adapters()
        try:
            yield self
        finally:
            transformer.enable_adapters()
            for n, p in transformer.named_parameters():
                p.requires_grad_(flags[n])

    def to(self, device: str | torch.device) -> "FlowAdapter":
        self.pipe.to(device)
        if self._reference_model is not None:
            self._reference_model.to(device)
        self.device = self.pipe.transformer.device
        self._negative = None
        return self

    @torch.no_grad()
    def sample(
        self, prompts: Sequence[Any], group_size: int, generator: torch.Generator, *, evaluate: bool = False
    ) -> Rollout:
        """G = group_size samples per prompt, rows prompt-major, with the records to re-score them."""
        if group_size < 1 or not prompts:
            raise ValueError(
                f"sample needs at least one prompt and group_size >= 1, got {len(prompts)} and {group_size}"
            )
        B, G = len(prompts), int(group_size)
        n = B * G
        T = self.eval_steps if evaluate else self.num_steps
        sde_steps = set() if evaluate else self._window_steps(generator)
        trained = [] if evaluate else self._trained_steps(sde_steps)
        if not evaluate:
            self.sample_calls += 1
        sigmas = self._sigmas(T)  # [T+1] fp32 on cpu
        sigma_max = float(sigmas[1])  # "sde": the denominator's sigma at sigma = 1

        # text: each distinct prompt encoded once, shared by its group
        texts = [_prompt_text(p) for p in prompts]
        distinct = list(dict.fromkeys(texts))
        encoded = self.glue.encode(distinct, self.device, self.max_sequence_length)
        keys = {t: self._next_prompt_key + i for i, t in enumerate(distinct)}
        self._next_prompt_key += len(distinct)
        prompt_embeds = {keys[t]: {k: v[i : i + 1] for k, v in encoded.items()} for i, t in enumerate(distinct)}
        prompt_key = torch.tensor([keys[t] for t in texts for _ in range(G)], device=self.device)  # [N]
        shared: dict[str, Any] = {"prompt_embeds": prompt_embeds}
        if self._cfg:
            shared["negative_embeds"] = self._negative_embeds()
        row_embeds = self._row_embeds(shared, prompt_key)

        # initial noise. Shared within a group, it makes every ODE step before the first SDE step
        # the same for the G rows of a prompt: those run once per prompt ([B, *D]) and x is expanded
        # to [N, *D] where the SDE noise first tells the rows apart (at T: after the loop).
        if self.same_noise_in_group:
            x = self.glue.init_latents(B, generator, self.device).float()  # [B, *D]
            expand_at = min(sde_steps, default=T)
            prompt_row_embeds = self._row_embeds(shared, prompt_key[::G])  # one row per prompt
        else:
            x = self.glue.init_latents(n, generator, self.device).float()  # [N, *D]
            expand_at = None

        log_probs = torch.zeros(n, T, dtype=torch.float32, device=self.device)  # [N, T]
        mask = torch.zeros(n, T, dtype=torch.bool, device=self.device)  # [N, T]
        chain: list[torch.Tensor] = []  # x at each trained step, then the x after the last one
        stops = self._stops(T, sde_steps)  # sigma indices visited: step k goes from stops[k] to stops[k + 1]
        steps = range(len(stops) - 1)
        if self.progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="flow sampling", leave=False)
        for k in steps:
            i = stops[k]
            if i == expand_at:
                x = x.repeat_interleave(G, dim=0)  # [N, *D]
            s, s_next = sigmas[i], sigmas[stops[k + 1]]
            emb = row_embeds if x.shape[0] == n else prompt_row_embeds
            v = self._velocity(x, s.expand(x.shape[0]).to(self.device), emb)  # [N or B, *D]
            out = sde.flow_step(
                self.kernel if i in sde_steps else "ode", x, v, s, s_next,
                noise_level=self.noise_level, sigma_max=sigma_max, generator=generator,
            )
            if i in trained:
                if not chain:
                    chain.append(x)
                chain.append(out.next_latents)
                log_probs[:, i] = out.log_prob
                mask[:, i] = True
            x = out.next_latents

        if x.shape[0] != n:  # all-ODE with shared noise: the G rows of a prompt are identical
            x = x.repeat_interleave(G, dim=0)  # [N, *D]

        extras: dict[str, Any] = {}
        if trained:
            K = len(trained)
            extras = {
                "latents": torch.stack(chain, dim=1),  # [N, K+1, *D]
                "sigmas": sigmas[trained[0] : trained[0] + K + 1].to(self.device).expand(n, -1).clone(),  # [N, K+1]
                "step_index": torch.tensor(trained, device=self.device).expand(n, -1).clone(),  # [N, K]
                "sigma_max": torch.full((n,), sigma_max, device=self.device),  # [N]
                "prompt_key": prompt_key,  # [N]
            }
        else:
            shared = {}
        outputs = self.glue.decode(x) if self.decode else x  # [N, 3, H, W], [N, F, 3, H, W] or [N, *D]
        return Rollout(
            group_id=torch.arange(B).repeat_interleave(G),
            prompts=[p for p in prompts for _ in range(G)],
            samples=list(outputs.cpu().unbind(0)),
            log_probs=log_probs,
            mask=mask,
            extras=extras,
            shared=shared,
        )

    def log_prob(self, rollout: Rollout, steps: Sequence[int] | None = None) -> StepScores:
        """Re-score the recorded transitions `steps` (None = all T) under the current weights.

        One batched forward for all (row, step) pairs asked for. Returns StepScores with
        log_probs [n, S] fp32 (mean over latent dims), mean [n, S, *D] and std [n, S, 1, ...].
        Steps a row did not store (ODE / untrained: mask False) get log-prob 0, mean 0, std 1
        and cost no forward.
        """
        n, T = len(rollout), rollout.num_steps
        steps = list(range(T)) if steps is None else [int(t) for t in steps]
        if any(t < 0 or t >= T for t in steps):
            raise ValueError(f"steps must lie in [0, {T}), got {steps}")
        S = len(steps)
        ex = rollout.extras
        if "latents" not in ex:
            return StepScores(torch.zeros(n, S, device=rollout.log_probs.device))
        latents = ex["latents"]  # [n, K+1, *D]
        D = latents.shape[2:]
        wanted = torch.tensor(steps, device=latents.device)  # [S]
        hit = ex["step_index"].unsqueeze(1) == wanted.view(1, S, 1)  # [n, S, K]
        rows, cols, slots = hit.nonzero(as_tuple=True)  # [m] each
        log_probs = torch.zeros(n, S, dtype=torch.float32, device=latents.device)  # [n, S]
        mean = torch.zeros(n, S, *D, dtype=torch.float32, device=latents.device)  # [n, S, *D]
        std = torch.ones(n, S, *([1] * len(D)), dtype=torch.float32, device=latents.device)  # [n, S, 1, ...]
        if rows.numel() == 0:
            return StepScores(log_probs, mean, std)
        x = latents[rows, slots]  # [m, *D]
        x_next = latents[rows, slots + 1]  # [m, *D]
        s, s_next = ex["sigmas"][rows, slots], ex["sigmas"][rows, slots + 1]  # [m], [m]
        emb = self._row_embeds(rollout.shared, ex["prompt_key"][rows])
        v = self._velocity(x, s, emb)  # [m, *D]
        out = sde.flow_step(
            self.kernel, x, v, s, s_next, noise_level=self.noise_level, sigma_max=ex["sigma_max"][rows],
            next_latents=x_next,
        )
        log_probs = log_probs.index_put((rows, cols), out.log_prob)  # [n, S]
        if self.kernel == "cps":  # not a normalised Gaussian (std 0 at the last step): no closed-form KL
            return StepScores(log_probs)
        mean = mean.index_put((rows, cols), out.mean)  # [n, S, *D]
        std = std.index_put((rows, cols), out.std)  # [n, S, 1, ...]
        return StepScores(log_probs, mean, std)

    def sampler_state(self) -> dict[str, int]:
        """What a checkpoint must keep beyond weights: the call count that drives the sliding window."""
        return {"sample_calls": self.sample_calls}

    def load_sampler_state(self, state: dict[str, int]) -> None:
        self.sample_calls = int(state["sample_calls"])

    def export(self, sample: torch.Tensor, path: str | Path, fps: int = 8) -> str:
        """Write a sample to `path` and return the path of the file written.

        Images [3, H, W] go to PNG. Videos [F, 3, H, W] go to MP4 (diffusers' export_to_video)
        with a contact sheet beside it (PATH.png: the F frames in a row, for where video does not
        play); a path ending in .gif writes an animated GIF instead, one ending in .png the
        contact sheet alone. A path without a suffix gets .png (images) or .mp4 (videos).
        With decode=False the sample is a latent, decoded here first.
        """
        import numpy as np
        from PIL import Image

        path = Path(path)
        if not self.decode:
            with torch.no_grad():
                sample = self.glue.decode(sample[None].to(self.device))[0].cpu()  # [3, H, W] or [F, 3, H, W]
        if sample.ndim not in (3, 4):
            raise ValueError(f"export needs an image [3, H, W] or a video [F, 3, H, W], got shape {tuple(sample.shape)}")
        pixels = (sample.detach().float().cpu().clamp(0, 1).movedim(-3, -1).numpy() * 255).round().astype(np.uint8)
        if sample.ndim == 3:  # pixels [H, W, 3]
            path = path if path.suffix else path.with_suffix(".png")
            Image.fromarray(pixels).save(path)
            return str(path)
        frames = [Image.fromarray(f) for f in pixels]  # F x [H, W, 3]
        path = path if path.suffix else path.with_suffix(".mp4")
        if path.suffix.lower() == ".gif":
            frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
            return str(path)
        sheet = path.with_suffix(".png")
        Image.fromarray(np.concatenate(list(pixels), axis=1)).save(sheet)  # [H, F*W, 3]
        if path == sheet:
            return str(sheet)
        from diffusers.utils import export_to_video

        return export_to_video(frames, str(path), fps=fps)

    # ------------------------------------------------------------------ internals

    @property
    def _cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def _negative_embeds(self) -> dict[str, torch.Tensor]:
        if self._negative is None:
            self._negative = self.glue.encode([self.negative_prompt], self.device, self.max_sequence_length)
        return self._negative

    def _row_embeds(self, shared: dict[str, Any], prompt_key: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row conditioning [m, ...]; with CFG the uncond rows first, then the cond rows."""
        table = shared["prompt_embeds"]
        cond = _cat_embeds([table[int(k)] for k in prompt_key.tolist()])  # each [m, ...]
        if not self._cfg:
            return cond
        m = prompt_key.shape[0]
        neg = {k: v.expand(m, *v.shape[1:]) for k, v in shared["negative_embeds"].items()}  # each [m, ...]
        return _cat_embeds([neg, cond])  # each [2m, ...]

    def _velocity(self, x: torch.Tensor, sigma: torch.Tensor, emb: dict[str, torch.Tensor]) -> torch.Tensor:
        """v(x, sigma | prompt) in fp32 [m, *D]; CFG: one forward over [uncond; cond] rows."""
        model = self._model
        dtype = model.dtype
        if self._cfg:
            both = self.glue.forward(model, torch.cat([x, x]).to(dtype), torch.cat([sigma, sigma]), emb)  # [2m, *D]
            v_u, v_c = both.float().chunk(2)  # [m, *D] each
            return v_u + self.guidance_scale * (v_c - v_u)  # [m, *D]
        return self.glue.forward(model, x.to(dtype), sigma, emb).float()  # [m, *D]

    def _sigmas(self, num_steps: int) -> torch.Tensor:
        """The T+1 sigmas from 1 to 0 of a num_steps sampler, fp32 on cpu."""
        if self.schedule == "dance":
            return sde.dance_sigmas(num_steps, self.schedule_shift)  # [T+1]
        from diffusers import FlowMatchEulerDiscreteScheduler

        sch = self.pipe.scheduler
        if not (isinstance(sch, FlowMatchEulerDiscreteScheduler) or sch.config.get("use_flow_sigmas", False)):
            raise ValueError(
                f"{type(sch).__name__} gives no flow-matching sigmas: use a FlowMatchEulerDiscreteScheduler "
                "(or use_flow_sigmas=True), or schedule='dance'"
            )
        sch = copy.deepcopy(sch)  # set_timesteps mutates; leave the pipeline's scheduler alone
        sch.set_timesteps(num_steps, device="cpu", **self.glue.scheduler_kwargs(num_steps))
        sigmas = sch.sigmas.detach().float().cpu()  # [T+1]
        if sigmas.shape != (num_steps + 1,) or float(sigmas[-1]) != 0.0:
            raise ValueError(f"{type(sch).__name__} gave {len(sigmas)} sigmas ending at {float(sigmas[-1])}; "
                             f"expected {num_steps + 1} ending at 0: use schedule='dance'")
        return sigmas

    def _stops(self, T: int, sde_steps: set[int]) -> list[int]:
        """The sigma indices a rollout visits, 0 .. T: every one, except that with tail_steps the
        ODE tail after the last SDE step keeps tail_steps + 1 of its indices, evenly spaced."""
        end = max(sde_steps) + 1 if sde_steps else T  # the tail starts where the last SDE step ends
        if self.tail_steps is None or T - end <= self.tail_steps:
            return list(range(T + 1))
        tail = torch.linspace(end, T, self.tail_steps + 1).round().long().tolist()  # [tail_steps + 1]
        return list(range(end)) + tail

    def _window_starts(self) -> list[int]:
        """Every window start this adapter can use ([0] without a window)."""
        T, W = self.num_steps, self.window
        if W is None:
            return [0]
        if self.window_mode == "fixed":
            return [self.window_start]
        default = max(T // 2 - 1, 0) if self.window_mode == "random" else T - W
        top = min(default if self.window_max_start is None else self.window_max_start, T - W)
        return list(range(top + 1))

    def _window(self, start: int) -> set[int]:
        """The SDE steps of a rollout whose window starts at `start` (all steps without a window)."""
        if self.window is None:
            return set(range(self.num_steps))
        return set(range(start, start + self.window))

    def _window_steps(self, generator: torch.Generator) -> set[int]:
        """The SDE steps of this training rollout (the rest are ODE)."""
        starts = self._window_starts()
        if self.window is None or self.window_mode == "fixed":
            start = starts[0]
        elif self.window_mode == "random":
            start = starts[int(torch.randint(0, len(starts), (1,), generator=generator, device=generator.device))]
        else:  # sliding: one step forward every slide_every training calls, wrapping around
            start = starts[(self.window_start + self.sample_calls // self.slide_every) % len(starts)]
        return self._window(start)

    def _trained_steps(self, sde_steps: set[int]) -> list[int]:
        """SDE steps among the first int(T * timestep_fraction), ascending (contiguous)."""
        if self.kernel == "ode":
            return []
        limit = max(int(self.num_steps * self.timestep_fraction + 1e-9), 1)
        return sorted(i for i in sde_steps if i < limit)
