"""The velocity model of flow-matching speech enhancement, and the SpeechEnhancer container.

A velocity model is any torch.nn.Module with

    forward(x: Tensor [n, 2, F, T], y: Tensor [n, 2, F, T], t: Tensor [n]) -> v: Tensor [n, 2, F, T]

x: the current latents (real and imaginary channels of the compressed STFT, stft.py), y: the
noisy input's latents (the condition), t: the flow time in [0, 1] (1 = the prior y + s_max z,
0 = clean speech), v: the velocity dx/dt of the FlowMSE path x_t = (1-t) x0 + t (y + s_max z),
i.e. an estimate of E[y + s_max z - x0 | x_t, y]. F = 256 frequency bins, T frames (a multiple
of 16). A user's own FlowMSE-style network plugs in by following this signature (wrap it if its
own forward differs, e.g. if it predicts the score or x0 or takes t scaled otherwise) and
giving the class `save_pretrained(folder)` and `from_pretrained(folder)` if it should be saved
in a SpeechEnhancer folder.

The built-in one, SpeechVelocity, wraps a diffusers UNet2DModel: channels [Re x, Im x, Re y,
Im y] in, [Re v, Im v] out, the timestep t * 999 through the UNet's own sinusoidal embedding.
With patch p > 1 each p x p block of bins x frames becomes channels first (pixel_unshuffle:
4 p^2 channels in, 2 p^2 out) and is put back after, so the convolutions run on an F/p x T/p
grid: that is what makes the embedded model trainable on two CPU cores. prediction "velocity":
the UNet's output is v; "x0" (the embedded model): the UNet corrects the best linear estimate of
the clean latents, x0_hat = y + skip(t) (x - y) + scale(t) unet(...) (`x0_coefficients`), and
v = (x - x0_hat) / t (t >= t_eps > 0 on FlowMSE's grid). An untrained "x0" model already returns
a slightly smoothed input instead of noise, so a short CPU training starts from the noisy input.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmgrpo.pipelines.speech.stft import DEFAULT_STFT, STFTSettings

S_MAX = 0.487  # FlowMSE's prior std
T_EPS = 0.03  # FlowMSE's last sigma before the final step to 0
SPEECH_JSON = "speech.json"
VELOCITY_JSON = "speech_velocity.json"
TIMESTEP_SCALE = 999.0
PREDICTIONS = ("velocity", "x0")
SIGMA_DATA = 0.07  # rms of clean - noisy latents of the mini-world speech set (the "x0" skip)


def x0_coefficients(t: torch.Tensor, sigma_data: float, prior_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(skip, scale) of x0_hat = y + skip (x - y) + scale F at time t (any shape, same out).

    With x0 - y ~ N(0, sigma_data^2) and x - y = (1-t)(x0 - y) + t prior_std z, the linear estimate
    of x0 - y from x - y has gain skip = (1-t) d / ((1-t)^2 d + t^2 p) (d = sigma_data^2, p = prior_std^2)
    and error std scale = t sqrt(d p / ((1-t)^2 d + t^2 p)): the network corrects that estimate in
    units of its error (EDM-style preconditioning). skip -> 1 and scale -> 0 as t -> 0 (x0_hat = x).
    """
    d, p = sigma_data**2, prior_std**2
    denominator = (1 - t) ** 2 * d + t**2 * p
    return (1 - t) * d / denominator, t * torch.sqrt(d * p / denominator)


class SpeechVelocity(torch.nn.Module):
    """v(x, y, t) through a diffusers UNet2DModel (in_channels 4 p^2, out_channels 2 p^2)."""

    def __init__(self, unet: torch.nn.Module, patch: int = 1, prediction: str = "velocity",
                 sigma_data: float = SIGMA_DATA, prior_std: float = S_MAX / math.sqrt(2.0)) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"SpeechVelocity prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        if unet.config.in_channels != 4 * patch * patch or unet.config.out_channels != 2 * patch * patch:
            raise ValueError(f"a SpeechVelocity with patch {patch} needs a UNet with {4 * patch * patch} input and "
                             f"{2 * patch * patch} output channels, got {unet.config.in_channels} and "
                             f"{unet.config.out_channels}")
        self.unet = unet
        self.patch = int(patch)
        self.prediction = prediction
        self.sigma_data = float(sigma_data)
        self.prior_std = float(prior_std)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y.to(x.dtype)], dim=1)  # [n, 4, F, T]
        if self.patch > 1:
            h = F.pixel_unshuffle(h, self.patch)  # [n, 4 p^2, F/p, T/p]
        out = self.unet(h, t.to(x.dtype) * TIMESTEP_SCALE, return_dict=False)[0]  # [n, 2 p^2, F/p, T/p]
        if self.patch > 1:
            out = F.pixel_shuffle(out, self.patch)  # [n, 2, F, T]
        if self.prediction == "velocity":
            return out
        skip, scale = x0_coefficients(t.to(x.dtype).view(-1, 1, 1, 1), self.sigma_data, self.prior_std)  # [n, 1, 1, 1]
        y = y.to(x.dtype)
        x0_hat = y + skip * (x - y) + scale * out  # [n, 2, F, T]
        return (x - x0_hat) / t.to(x.dtype).view(-1, 1, 1, 1)  # [n, 2, F, T] v = (x - x0_hat) / t on the path

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def save_pretrained(self, folder: str | Path) -> None:
        """The UNet with its own save_pretrained (config.json + safetensors) and the patch beside it."""
        folder = Path(folder)
        self.unet.save_pretrained(folder)
        settings = {"patch": self.patch, "prediction": self.prediction, "sigma_data": self.sigma_data,
                    "prior_std": self.prior_std}
        (folder / VELOCITY_JSON).write_text(json.dumps(settings) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype | None = None) -> "SpeechVelocity":
        from diffusers import UNet2DModel

        folder = Path(folder)
        settings = json.loads((folder / VELOCITY_JSON).read_text()) if (folder / VELOCITY_JSON).is_file() else {}
        unet = UNet2DModel.from_pretrained(folder, torch_dtype=torch_dtype)
        return cls(unet, **settings)


def tiny_unet(seed: int = 0, widths: tuple[int, ...] = (32, 64, 96), patch: int = 4, head_width: int = 16,
              groups: int = 8, prediction: str = "x0", sigma_data: float = SIGMA_DATA,
              prior_std: float = S_MAX / math.sqrt(2.0)) -> SpeechVelocity:
    """A small random SpeechVelocity: a UNet2DModel with len(widths) levels (ResNet blocks, one per
    level down and two up; self-attention on the coarsest level and in the mid block: the LoRA
    targets to_q/to_k/to_v/to_out.0). The defaults are the embedded model's (about 6 MB in fp32)."""
    from diffusers import UNet2DModel

    levels = len(widths)
    torch.manual_seed(seed)  # diffusers initialises with the global generator
    unet = UNet2DModel(
        sample_size=None, in_channels=4 * patch * patch, out_channels=2 * patch * patch,
        block_out_channels=tuple(widths), layers_per_block=1, norm_num_groups=groups,
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        attention_head_dim=head_width, add_attention=True,
    )
    return SpeechVelocity(unet, patch=patch, prediction=prediction, sigma_data=sigma_data, prior_std=prior_std)


def _import_class(spec: str) -> type:
    module, _, name = spec.rpartition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"{SPEECH_JSON} names the velocity class {spec!r}, which cannot be imported: install its "
                         "package or fix 'velocity.class' (package.module:Name)") from None


class SpeechEnhancer:
    """A flow-matching speech enhancer: the velocity model, the prior std s_max and the STFT.

    FlowAdapter(pipeline=SpeechEnhancer(...)) or FlowAdapter(path=<a folder with speech.json>)
    drives it with the speech family (family.py). complex_noise: the prior noise z is complex
    with E|z|^2 = 1 as in FlowMSE (real and imaginary parts of variance 1/2), so each real
    latent channel has prior std s_max / sqrt(2) (`prior_std`); False: std s_max per channel.
    A folder holds speech.json (these settings and the velocity class) and velocity/ (the
    velocity model's own save_pretrained).
    """

    def __init__(self, velocity: torch.nn.Module, s_max: float = S_MAX, *, complex_noise: bool = True,
                 t_eps: float = T_EPS, stft: STFTSettings = DEFAULT_STFT, info: dict[str, Any] | None = None) -> None:
        if not callable(velocity):
            raise TypeError(f"SpeechEnhancer needs a velocity module forward(x, y, t) -> v, got {type(velocity).__name__}")
        if not s_max > 0 or not 0 < t_eps < 1:
            raise ValueError(f"SpeechEnhancer needs s_max > 0 and 0 < t_eps < 1, got {s_max} and {t_eps}")
        self.velocity = velocity
        self.s_max = float(s_max)
        self.complex_noise = bool(complex_noise)
        self.t_eps = float(t_eps)
        self.stft = stft
        self.info = dict(info or {})  # free-form (how it was built), saved in speech.json

    @property
    def prior_std(self) -> float:
        """The prior's std per real latent channel."""
        return self.s_max / math.sqrt(2.0) if self.complex_noise else self.s_max

    def to(self, device: str | torch.device) -> "SpeechEnhancer":
        self.velocity.to(device)
        return self

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not hasattr(self.velocity, "save_pretrained"):
            raise TypeError(f"{type(self.velocity).__name__} has no save_pretrained(folder): give it one (and "
                            "from_pretrained) to save it in a SpeechEnhancer folder")
        self.velocity.save_pretrained(folder / "velocity")
        cls = type(self.velocity)
        settings = {
            "format": "mmgrpo-speech-enhancer", "s_max": self.s_max, "complex_noise": self.complex_noise,
            "t_eps": self.t_eps, "stft": self.stft.to_dict(),
            "velocity": {"class": f"{cls.__module__}:{cls.__qualname__}", "folder": "velocity"}, "info": self.info,
        }
        (folder / SPEECH_JSON).write_text(json.dumps(settings, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype | None = None) -> "SpeechEnhancer":
        folder = Path(folder)
        if not (folder / SPEECH_JSON).is_file():
            raise FileNotFoundError(f"{folder} has no {SPEECH_JSON}: it is not a SpeechEnhancer folder "
                                    "(SpeechEnhancer.save_pretrained writes one)")
        settings = json.loads((folder / SPEECH_JSON).read_text())
        spec = settings.get("velocity", {})
        velocity_cls = _import_class(spec.get("class", f"{__name__}:SpeechVelocity"))
        velocity = velocity_cls.from_pretrained(folder / spec.get("folder", "velocity"), torch_dtype=torch_dtype)
        return cls(velocity, settings.get("s_max", S_MAX), complex_noise=settings.get("complex_noise", True),
                   t_eps=settings.get("t_eps", T_EPS), stft=STFTSettings(**settings.get("stft", {})),
                   info=settings.get("info"))
