"""FlowAdapter: GRPO's policy over flow-matching models, through their family (families.py).

Drives unpatched diffusers StableDiffusion3Pipeline, FluxPipeline (text-to-image) and WanPipeline
(text-to-video), and any model a registered family knows. The adapter owns the sampling loop,
so it records every trained transition; the step math is in `sde.py`, the window plan in
`window.py`, and everything model-specific (conditions, latents, sigmas, the velocity model,
decoding) in the family.

    for k in range(len(stops) - 1):          # stops: the plan's sigma indices (all T, or a thinned tail)
        v = model(x, sigma_i, condition)     # CFG: uncond + cond rows in ONE forward
        x = kernel step (SDE inside the window, Euler "ode" elsewhere)

What a Rollout holds (N = B*G rows, prompt-major; T decision steps; K trained steps):
- log_probs [N, T] fp32, the MEAN over latent dims of each step's log-density (sde.py);
  mask [N, T] True only on trained steps: SDE steps inside the window and among the first
  int(T * timestep_fraction). Other entries of log_probs are 0.
- extras (per row): "latents" [N, K+1, *D] fp32, the chain x_t0 ... x_t0+K through the
  trained steps (slot j is x_t of trained step j, slot j+1 its x_{t-1}); "sigmas" [N, K+1];
  "step_index" [N, K] long (which of the T columns slot j is); "sigma_max" [N] (the
  schedule's sigmas[1], for the "sde" kernel); "prompt_key" [N] long. Nothing is stored
  for ODE steps or untrained SDE steps, nor in evaluation rollouts.
- shared: "conditions" {prompt_key: {name: tensor [1, ...]}}, each prompt encoded once and
  shared by its group; "negative_condition" {name: tensor [1, ...]} when CFG is on.
- samples: what the family decodes: images float [3, H, W] in [0, 1], videos float
  [F, 3, H, W] in [0, 1] (with decode=False: the final latents [*D] fp32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from mmgrpo.config import ConfigError
from mmgrpo.pipelines.flow import sde
from mmgrpo.pipelines.flow.families import Conditions, family_for
from mmgrpo.pipelines.flow.options import DEFAULT_LORA_TARGETS, FlowOptions
from mmgrpo.pipelines.flow.window import WindowPlan, ode_plan, plan_window
from mmgrpo.pipelines.toolkit import (
    Finetuning,
    TunedAdapter,
    logs_kept_unless_failed,
    not_loadable,
    options_from,
    parse_dtype,
)
from mmgrpo.protocols import StepScores
from mmgrpo.rollout import Rollout

__all__ = ["DEFAULT_LORA_TARGETS", "FlowAdapter", "FlowOptions"]


def _cat(parts: list[Conditions]) -> Conditions:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # each [sum of rows, ...]


def _first_parameter(model: torch.nn.Module) -> torch.nn.Parameter:
    return next(model.parameters())


def _load_pipeline(path: str, torch_dtype: str | None) -> Any:
    """The model in a local folder (or hub id): a SpeechEnhancer folder (it holds speech.json; the speech
    family is imported only then) or a diffusers pipeline."""
    if (Path(path) / "speech.json").is_file():
        from mmgrpo.pipelines.speech import SpeechEnhancer  # registers the speech family

        return SpeechEnhancer.from_pretrained(path, torch_dtype=parse_dtype(torch_dtype))
    from diffusers import DiffusionPipeline

    try:
        with logs_kept_unless_failed("diffusers"):  # its "Couldn't connect to the Hub" lines
            return DiffusionPipeline.from_pretrained(path, dtype=parse_dtype(torch_dtype))
    except OSError as err:  # not cached and offline, no network, a typo, a folder without its files
        raise not_loadable(path, err, "path") from None


class FlowAdapter(TunedAdapter):
    """GRPO policy over a flow-matching model (SD3, FLUX, Wan 2.1, or a registered family).

    FlowAdapter(pipeline, **options) or FlowAdapter(path=..., **options): the options are
    FlowOptions (options.py), the same keys as `pipeline.kwargs` in YAML.
    """

    Options = FlowOptions
    scores_all_steps_at_once = False

    def __init__(self, pipeline: Any = None, **kwargs: Any) -> None:
        self.options = o = options_from(FlowOptions, kwargs, "FlowAdapter")
        if (pipeline is None) == (o.path is None):
            raise ValueError(
                "FlowAdapter needs exactly one of `pipeline` (a diffusers pipeline) or `path` (a local folder)"
            )
        if pipeline is None:
            pipeline = _load_pipeline(o.path, o.torch_dtype)
        self.pipe = pipeline
        self.family_name, family_cls = family_for(pipeline)
        self.family = family_cls(pipeline, o)
        if o.guidance_scale > 1.0 and not self.family.guidance:
            raise ValueError(f"the {self.family_name} family has no unconditional condition for CFG: "
                             f"set guidance_scale <= 1, got {o.guidance_scale}")
        if o.device is not None:
            self.family.to(o.device)

        self.kernel = o.kernel
        self.noise_level = sde.DEFAULT_NOISE_LEVEL[o.kernel] if o.noise_level is None else float(o.noise_level)
        self.guidance_scale = o.guidance_scale
        self.decode = o.decode
        self.finetune = o.finetune
        # the training step and run seed the SDE window derives from (begin_step); a training
        # sample() outside the trainer, with no begin_step call, plans as step 0 of seed 0
        self.window_step, self.window_seed = 0, 0

        for module in self.family.frozen_modules():
            module.requires_grad_(False)
        self.tuning = Finetuning(
            self.family.model, o.finetune, lora_rank=o.lora_rank, lora_alpha=o.lora_alpha,
            lora_target_modules=o.lora_target_modules,
        )
        if o.gradient_checkpointing:
            self.family.enable_gradient_checkpointing()
        self.device = _first_parameter(self.family.model).device
        self._negative: Conditions | None = None  # cached unconditional condition (CFG)
        self._next_prompt_key = 0

    def check_prompts(self, prompts: Sequence[Any]) -> None:
        """Before training: one ConfigError line for the first prompt the family cannot encode (for the
        text families: a prompt without text), then the family's own check_prompts, when it has one."""
        try:
            for index, prompt in enumerate(prompts):
                self.family.key(prompt, index)  # text families read the text here (prompt_text)
            if hasattr(self.family, "check_prompts"):
                self.family.check_prompts(prompts)
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None

    def _moved(self, device: torch.device) -> None:
        self.family.to(device)
        self.device = _first_parameter(self.family.model).device
        self._negative = None

    # ------------------------------------------------------------------ protocol

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
        T = self.options.eval_steps if evaluate else self.options.num_steps
        plan = ode_plan(T) if evaluate else self._plan()
        trained = [] if self.kernel == "ode" else list(plan.trained)
        sigmas = self._sigmas(T)  # [T+1] fp32 on cpu
        sigma_max = float(sigmas[1])  # "sde": the denominator's sigma at sigma = 1

        shared, prompt_key = self._encode(prompts, G)  # prompt_key [N]
        rows = self._row_conditions(shared, prompt_key, guided=False)  # each [N, ...]
        prior_mean, prior_std = self.family.prior(rows)  # y [N, *D] or None; s_max (sde.py: the shifted prior)
        prompt_prior_mean = None if prior_mean is None else prior_mean[::G]  # [B, *D] for the one-row-per-prompt steps
        # initial noise. Shared within a group, it makes every ODE step before the first SDE step
        # the same for the G rows of a prompt: those run once per prompt ([B, *D]) and x is expanded
        # to [N, *D] where the SDE noise first tells the rows apart (at T: after the loop).
        if self.options.same_noise_in_group:
            first_rows = {k: v[::G] for k, v in rows.items()}  # each [B, ...]
            x = self.family.init_latents(B, first_rows, generator, self.device).float()  # [B, *D]
            expand_at = min(plan.sde_steps, default=T)
            prompt_inputs = self._row_conditions(shared, prompt_key[::G])  # one row per prompt
        else:
            x = self.family.init_latents(n, rows, generator, self.device).float()  # [N, *D]
            expand_at = None
        inputs = self._row_conditions(shared, prompt_key)  # model inputs per row (CFG: [2N, ...])

        log_probs = torch.zeros(n, T, dtype=torch.float32, device=self.device)  # [N, T]
        mask = torch.zeros(n, T, dtype=torch.bool, device=self.device)  # [N, T]
        chain: list[torch.Tensor] = []  # x at each trained step, then the x after the last one
        stops = plan.stops  # step k goes from sigma index stops[k] to stops[k + 1]
        steps = range(len(stops) - 1)
        if self.options.progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="flow sampling", leave=False)
        for k in steps:
            i = stops[k]
            if i == expand_at:
                x = x.repeat_interleave(G, dim=0)  # [N, *D]
            s, s_next = sigmas[i], sigmas[stops[k + 1]]
            per_row = x.shape[0] == n  # False: one row per prompt before the shared noise splits
            v = self._velocity(x, s.expand(x.shape[0]).to(self.device), inputs if per_row else prompt_inputs)
            out = sde.flow_step(
                self.kernel if i in plan.sde_steps else "ode", x, v, s, s_next,
                noise_level=self.noise_level, sigma_max=sigma_max, generator=generator,
                prior_mean=prior_mean if per_row else prompt_prior_mean, prior_std=prior_std,
            )  # v, out.next_latents: [N or B, *D]
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
        outputs = self.family.decode(x, rows) if self.decode else x  # [N, ...] media, or latents [N, *D]
        return Rollout(
            group_id=torch.arange(B).repeat_interleave(G),
            prompts=[p for p in prompts for _ in range(G)],
            samples=list(outputs.cpu().unbind(0)),
            log_probs=log_probs,
            mask=mask,
            extras=extras,
            shared=shared if trained else {},
        )

    def log_prob(self, rollout: Rollout, steps: Sequence[int] | None = None) -> StepScores:
        """Re-score the recorded transitions `steps` (None = all T) under the current weights.

        One batched forward for all (row, step) pairs asked for. Returns StepScores with
        log_probs [n, S] fp32 (mean over latent dims), mean [n, S, *D], std [n, S, 1, ...] and
        step_size [n, S] fp32 (|sigma_next - sigma|). Steps a row did not store (ODE / untrained:
        mask False) get log-prob 0, mean 0, std 1, step size 1 and cost no forward.
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
        step_size = torch.ones(n, S, dtype=torch.float32, device=latents.device)  # [n, S]
        if rows.numel() == 0:
            return StepScores(log_probs, mean, std, step_size)
        x = latents[rows, slots]  # [m, *D]
        x_next = latents[rows, slots + 1]  # [m, *D]
        s, s_next = ex["sigmas"][rows, slots], ex["sigmas"][rows, slots + 1]  # [m], [m]
        row_conditions = self._row_conditions(rollout.shared, ex["prompt_key"][rows], guided=False)  # each [m, ...]
        inputs = self._row_conditions(rollout.shared, ex["prompt_key"][rows]) if self._cfg else row_conditions
        v = self._velocity(x, s, inputs)  # [m, *D]
        prior_mean, prior_std = self.family.prior(row_conditions)  # y [m, *D] or None; s_max: as in sampling
        out = sde.flow_step(
            self.kernel, x, v, s, s_next, noise_level=self.noise_level, sigma_max=ex["sigma_max"][rows],
            next_latents=x_next, prior_mean=prior_mean, prior_std=prior_std,
        )
        log_probs = log_probs.index_put((rows, cols), out.log_prob)  # [n, S]
        step_size = step_size.index_put((rows, cols), (s_next - s).abs().float())  # [n, S]
        if self.kernel == "cps":  # not a normalised Gaussian (std 0 at the last step): no closed-form KL
            return StepScores(log_probs, step_size=step_size)
        mean = mean.index_put((rows, cols), out.mean)  # [n, S, *D]
        std = std.index_put((rows, cols), out.std)  # [n, S, 1, ...]
        return StepScores(log_probs, mean, std, step_size)

    def activation_shape(self, prompts: Sequence[Any] = ()) -> Any:
        """One training forward of the velocity model for mmgrpo.memory: its sequence (the same for every
        prompt), width and depth, the trained steps of a row (one forward each) and 2 rows per sample under CFG;
        None for a family that does not know its sequence."""
        from mmgrpo.memory import ActivationShape

        config, tokens = getattr(self.family.model, "config", None), self.family.sequence_tokens()
        if tokens is None or not hasattr(config, "num_attention_heads"):
            return None
        layers = config.num_layers + getattr(config, "num_single_layers", 0)  # FLUX: double + single blocks
        return ActivationShape(
            tokens, config.num_attention_heads * config.attention_head_dim, config.num_attention_heads, layers,
            forwards=len(plan_window(self.options.window_spec(), 0, 0).trained), rows_per_sample=2 if self._cfg else 1,
            checkpointed=self.options.gradient_checkpointing,
        )  # fmt: skip

    def begin_step(self, step: int, seed: int) -> None:
        """Before the rollouts of training `step` (the trainer calls it on every process): the SDE window
        of every training sample() until the next call derives from (step, seed) alone (window.py)."""
        self.window_step, self.window_seed = int(step), int(seed)

    def export(self, sample: torch.Tensor, path: str | Path, fps: int = 8) -> str:
        """Write a sample to `path` through its family (images: PNG; videos: MP4 + contact sheet,
        .gif or .png; see export.py) and return the path written. With decode=False the sample
        is a latent, decoded here first."""
        if not self.decode:
            with torch.no_grad():
                sample = self.family.decode(sample[None].to(self.device))[0].cpu()  # [3, H, W] or [F, 3, H, W]
        return self.family.export(sample, path, fps)

    # ------------------------------------------------------------------ internals

    @property
    def _cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def _plan(self) -> WindowPlan:
        """The SDE window, trained steps and visited sigmas of the training rollouts of the current step."""
        return plan_window(self.options.window_spec(), self.window_step, self.window_seed)

    def _sigmas(self, num_steps: int) -> torch.Tensor:
        """The T+1 sigmas from 1 to 0 of a num_steps sampler, fp32 on cpu."""
        if self.options.schedule == "dance":
            return sde.dance_sigmas(num_steps, self.options.schedule_shift)  # [T+1]
        return self.family.sigmas(num_steps)  # [T+1]

    def _encode(self, prompts: Sequence[Any], G: int) -> tuple[dict[str, Any], torch.Tensor]:
        """Each distinct prompt encoded once: shared {"conditions": {key: {name: [1, ...]}}} (and the
        CFG "negative_condition"), and the prompt key of every row [N]."""
        ids = [self.family.key(p, i) for i, p in enumerate(prompts)]
        distinct = list(dict.fromkeys(ids))
        first = {k: ids.index(k) for k in distinct}
        encoded = self.family.encode([prompts[first[k]] for k in distinct], self.device)  # each [b, ...]
        keys = {k: self._next_prompt_key + j for j, k in enumerate(distinct)}
        self._next_prompt_key += len(distinct)
        table = {keys[k]: {name: t[j : j + 1] for name, t in encoded.items()} for j, k in enumerate(distinct)}
        prompt_key = torch.tensor([keys[k] for k in ids for _ in range(G)], device=self.device)  # [N]
        shared: dict[str, Any] = {"conditions": table}
        if self._cfg:
            if self._negative is None:
                self._negative = self.family.negative(self.device)
            shared["negative_condition"] = self._negative
        return shared, prompt_key

    def _row_conditions(self, shared: dict[str, Any], prompt_key: torch.Tensor, guided: bool | None = None) -> Conditions:
        """Per-row conditions [m, ...]; guided (default: CFG on): the unconditional rows first, [2m, ...]."""
        cond = _cat([shared["conditions"][int(k)] for k in prompt_key.tolist()])  # each [m, ...]
        if not (self._cfg if guided is None else guided):
            return cond
        m = prompt_key.shape[0]
        neg = {k: v.expand(m, *v.shape[1:]) for k, v in shared["negative_condition"].items()}  # each [m, ...]
        return _cat([neg, cond])  # each [2m, ...]

    def _velocity(self, x: torch.Tensor, sigma: torch.Tensor, inputs: Conditions) -> torch.Tensor:
        """v(x, sigma | condition) in fp32 [m, *D]; CFG: one forward over [uncond; cond] rows."""
        model = self.tuning.active  # the policy, or the reference inside reference()
        dtype = getattr(model, "dtype", None) or _first_parameter(model).dtype
        if self._cfg:
            both = self.family.forward(model, torch.cat([x, x]).to(dtype), torch.cat([sigma, sigma]), inputs)  # [2m, *D]
            v_u, v_c = both.float().chunk(2)  # [m, *D] each
            return v_u + self.guidance_scale * (v_c - v_u)  # [m, *D]
        return self.family.forward(model, x.to(dtype), sigma, inputs).float()  # [m, *D]
