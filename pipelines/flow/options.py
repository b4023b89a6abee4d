"""FlowOptions: the constructor options of FlowAdapter (`pipeline.kwargs` in YAML), checked on creation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mmgrpo.pipelines.flow import sde
from mmgrpo.pipelines.flow.window import WindowSpec, check_window

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass
class FlowOptions:
    """Options of the flow sampler, its fine-tuning and its model family.

    path / torch_dtype / device: a local folder for DiffusionPipeline.from_pretrained (when no
        pipeline object is given), its dtype ("float32" | "bfloat16" | "float16"), and a device.
    kernel ("sde" | "cps" | "dance" | "exact" | "ode") and noise_level (a or eta; None =
        sde.DEFAULT_NOISE_LEVEL[kernel]). See sde.py.
    num_steps (training rollouts) and eval_steps (sample(evaluate=True): all-ODE, nothing stored).
    schedule: "scheduler" (the family's sigmas, e.g. the pipeline scheduler's with its shift) or
        "dance" (linspace(1, 0, T+1) shifted by schedule_shift).
    timestep_fraction: only the first int(T * fraction) steps are trained (0.99 of 10 -> 9).
    window: SDE window size (None = SDE at every step), ODE elsewhere; window_mode "fixed"
        (start = window_start), "random" (start ~ U{0..window_max_start}, default max start
        T//2 - 1, the first half, drawn once per training step from the step and the run seed) or
        "sliding" (start = window_start + step // slide_every, slide_every training steps per move,
        wrapping after window_max_start, default T - window). Every process and every sample()
        call of a training step (dynamic-sampling rounds included) uses the same window; see window.py.
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
        = adapter disabled) or "full" (all weights of the velocity model; reference = a frozen copy).
    height, width, num_frames (Wan), max_sequence_length (None = the family's default).
    decode: False makes samples the final latents [*D] instead of decoded media (latent-space
        rewards, fast tests). gradient_checkpointing, progress (a bar over sampling steps).
    """

    path: str | None = None
    torch_dtype: str | None = None
    device: Any = None  # str | torch.device
    kernel: Literal["sde", "cps", "dance", "exact", "ode"] = "sde"
    noise_level: float | None = None
    num_steps: int = 10
    eval_steps: int = 40
    schedule: Literal["scheduler", "dance"] = "scheduler"
    schedule_shift: float = 1.0
    timestep_fraction: float = 1.0
    window: int | None = None
    window_mode: Literal["fixed", "random", "sliding"] = "fixed"
    window_start: int = 0
    window_max_start: int | None = None
    slide_every: int = 25
    tail_steps: int | None = None
    guidance_scale: float = 1.0
    distilled_guidance: float = 3.5
    negative_prompt: str = ""
    same_noise_in_group: bool = False
    finetune: Literal["lora", "full"] = "lora"
    lora_rank: int = 32
    lora_alpha: float = 64.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    max_sequence_length: int | None = None
    gradient_checkpointing: bool = False
    decode: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        sde.check_kernel(self.kernel)
        if self.schedule not in ("scheduler", "dance"):
            raise ValueError(f"schedule must be 'scheduler' or 'dance', got {self.schedule!r}")
        if self.num_steps < 1 or self.eval_steps < 1:
            raise ValueError(f"num_steps and eval_steps must be >= 1, got {self.num_steps} and {self.eval_steps}")
        check_window(self.window_spec(), trains=self.kernel != "ode")

    def window_spec(self) -> WindowSpec:
        """The SDE window of training rollouts (window.py)."""
        return WindowSpec(
            self.num_steps, self.window, self.window_mode, self.window_start, self.window_max_start,
            self.slide_every, self.timestep_fraction, self.tail_steps,
        )
