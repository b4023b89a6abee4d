"""SpeechFamily: flow-matching speech enhancement (FlowMSE) as one more family of the flow sampler.

The sampling loop, kernels, SDE window, LoRA, reference and KL are FlowAdapter's (pipelines/flow);
this family only says what a speech enhancer's conditions, latents, sigmas, velocity call and
decoding are. FlowAdapter(pipeline=SpeechEnhancer(...)) or FlowAdapter(path=<a SpeechEnhancer
folder>) picks it (registered for the class name "SpeechEnhancer" when mmgrpo.pipelines.speech is
imported; the adapter imports it for a folder holding speech.json).

Prompts are dicts {"prompt": text, "noisy": float32 array [L] or a WAV/FLAC path, "sample_rate":
16000 (for arrays; a file says its own), ...}; other fields ("clean", ...) are the rewards'.

    encode:       noisy waveform / its peak -> y = compressed STFT [b, 2, 256, F]; "scale" [b] (the
                  peak), "length" [b] (samples). Clips of a batch are zero-padded to the longest
                  (or to options.num_frames STFT frames when set: use it when several sampling
                  calls of one step must share a shape, e.g. multi-process runs with uneven splits).
    init_latents: y + s_max z per row (z complex with E|z|^2 = 1 by default: model.SpeechEnhancer).
    prior:        (y, the prior's std per real channel): the SDE kernels' shifted prior (sde.py).
    sigmas:       FlowMSE's grid linspace(1, t_eps, N) and a last step to 0 (N + 1 values).
    forward:      v = velocity(x, y, t) (model.py's documented signature).
    decode:       iSTFT, times the row's peak, cropped to the row's length: [n, L] float32 (rows of
                  different lengths: a nested tensor whose rows unbind to [L_i]).
    export:       a 16-bit WAV and its spectrogram PNG beside it (PATH.wav, PATH.png).
No CFG (guidance False), nothing frozen (the velocity model is all there is).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmgrpo.pipelines.flow.families import Conditions, Family, register_family
from mmgrpo.pipelines.speech.model import SpeechEnhancer
from mmgrpo.pipelines.speech.stft import frames_for, latents_to_waveform, waveform_to_latents

if TYPE_CHECKING:
    from mmgrpo.pipelines.flow.options import FlowOptions


def load_waveform(value: Any, sample_rate: int | None, target_rate: int, where: str) -> np.ndarray:
    """A mono float32 waveform [L] at target_rate from an array / tensor / list (at `sample_rate`,
    default target_rate) or a WAV/FLAC path (at the file's rate). `where` names the item in errors."""
    if isinstance(value, (str, Path)):
        import soundfile as sf

        if not Path(value).is_file():
            raise ValueError(f"{where}: audio file {value} does not exist")
        try:
            audio, sample_rate = sf.read(str(value), dtype="float32", always_2d=True)  # [L, channels]
        except RuntimeError as err:
            raise ValueError(f"{where}: cannot read {value} as audio ({err})") from None
        if audio.shape[1] != 1:
            raise ValueError(f"{where}: {value} has {audio.shape[1]} channels; speech enhancement takes mono: "
                             "mix it down (e.g. average the channels) first")
        audio = audio[:, 0]
    elif isinstance(value, torch.Tensor):
        audio = value.detach().float().cpu().numpy()
    else:
        try:
            audio = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a waveform (array [L]) or a WAV/FLAC path, "
                             f"got {type(value).__name__}") from None
    if audio.ndim != 1:
        raise ValueError(f"{where}: expected a mono waveform [L], got shape {tuple(audio.shape)}: "
                         "mix stereo down to mono first")
    if audio.size == 0 or not np.isfinite(audio).all():
        raise ValueError(f"{where}: the waveform is empty or holds NaN/inf")
    rate = target_rate if sample_rate is None else int(sample_rate)
    if rate != target_rate:
        from mmgrpo.rewards.speech import resample  # the one resampler (torchaudio), as the metrics use

        audio = resample(audio, rate, target_rate)
    return np.ascontiguousarray(audio, dtype=np.float32)


class SpeechFamily(Family):
    """A SpeechEnhancer driven by the flow sampler (module docstring)."""

    guidance = False

    def __init__(self, pipeline: SpeechEnhancer, options: "FlowOptions") -> None:
        super().__init__(pipeline, options)
        self.enhancer = pipeline
        self.settings = pipeline.stft
        self.num_frames = options.num_frames
        m = self.settings.frame_multiple
        if self.num_frames is not None and (self.num_frames < m or self.num_frames % m):
            raise ValueError(f"the speech family needs num_frames (STFT frames per clip) to be a multiple of {m}, "
                             f"got {self.num_frames}")

    @property
    def model(self) -> torch.nn.Module:
        return self.enhancer.velocity

    def to(self, device: str | torch.device) -> None:
        self.enhancer.to(device)

    def check_prompts(self, prompts: list[Any]) -> None:
        """One ValueError naming the first prompt the family cannot read."""
        for index, prompt in enumerate(prompts):
            self._waveform(prompt, index)

    def _waveform(self, prompt: Any, index: int) -> np.ndarray:
        where = f"prompt {index}"
        if not isinstance(prompt, dict) or "noisy" not in prompt:
            raise ValueError(f"{where}: a speech prompt is a dict with 'noisy' (a waveform or a WAV/FLAC path), "
                             f"got {type(prompt).__name__}")
        wave = load_waveform(prompt["noisy"], prompt.get("sample_rate"), self.settings.sample_rate,
                             f"{where} field 'noisy'")
        if self.num_frames is not None and frames_for(wave.size, self.settings) > self.num_frames:
            raise ValueError(f"{where}: the clip ({wave.size} samples) needs more than num_frames={self.num_frames} "
                             "STFT frames: raise num_frames or leave it null (pad to the longest clip of a batch)")
        return wave

    def encode(self, prompts: list[Any], device: torch.device) -> Conditions:
        waves = [self._waveform(p, i) for i, p in enumerate(prompts)]
        lengths = [w.size for w in waves]
        frames = self.num_frames or max(frames_for(n, self.settings) for n in lengths)
        batch = torch.zeros(len(waves), max(lengths))  # [b, L]
        for i, w in enumerate(waves):
            batch[i, : w.size] = torch.from_numpy(w)
        peak = batch.abs().amax(dim=1)  # [b]
        scale = torch.where(peak > 0, peak, torch.ones_like(peak))  # a silent clip keeps scale 1
        y = waveform_to_latents(batch / scale[:, None], frames, self.settings)  # [b, 2, bins, frames]
        return {"y": y.to(device), "scale": scale.to(device), "length": torch.tensor(lengths, device=device)}

    def init_latents(self, n: int, conditions: Conditions, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        y = conditions["y"].float()  # [n, 2, bins, frames]
        z = torch.randn(y.shape, generator=generator, device=generator.device, dtype=torch.float32)
        return (y + self.enhancer.prior_std * z.to(y.device)).to(device)  # [n, 2, bins, frames]

    def prior(self, conditions: Conditions) -> tuple[torch.Tensor | None, float]:
        return conditions["y"].float(), self.enhancer.prior_std  # [n, 2, bins, frames], std per channel

    def sigmas(self, num_steps: int) -> torch.Tensor:
        grid = torch.linspace(1.0, self.enhancer.t_eps, num_steps, dtype=torch.float64)  # [N]
        return torch.cat([grid, grid.new_zeros(1)]).float()  # [N+1]

    def forward(self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        return model(x, conditions["y"].to(x.dtype), sigma.to(x.dtype))  # [m, 2, bins, frames]

    def decode(self, latents: torch.Tensor, conditions: Conditions | None = None) -> torch.Tensor:
        """Waveforms [n, L] float32; without conditions (a latent exported alone) the normalised,
        uncropped waveform."""
        wave = latents_to_waveform(latents, settings=self.settings)  # [n, padded]
        if conditions is None:
            return wave
        wave = wave * conditions["scale"].float().to(wave.device)[:, None]  # [n, padded]
        lengths = conditions["length"].tolist()
        if len(set(lengths)) == 1:
            return wave[:, : lengths[0]].contiguous()  # [n, L]
        with warnings.catch_warnings():  # "nested tensors are a prototype feature"
            warnings.simplefilter("ignore")
            return torch.nested.nested_tensor([w[:n] for w, n in zip(wave, lengths)])  # rows [L_i]

    def export(self, sample: torch.Tensor, path: str | Path, fps: int = 8) -> str:
        """PATH.wav (16-bit PCM, clipped to [-1, 1]) and PATH.png (its log-magnitude spectrogram)."""
        import soundfile as sf

        path = Path(path)
        path = path if path.suffix else path.with_suffix(".wav")
        wave = sample.detach().float().cpu().reshape(-1).clamp(-1.0, 1.0)  # [L]
        sf.write(str(path), wave.numpy(), self.settings.sample_rate, subtype="PCM_16")
        write_spectrogram(wave, path.with_suffix(".png"), self.settings.sample_rate)
        return str(path)


def write_spectrogram(wave: torch.Tensor, path: Path, sample_rate: int) -> None:
    """A log-magnitude spectrogram image of `wave` [L] (dB, 80 dB range) to `path`."""
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

    spec = torch.stft(wave, 510, 128, window=torch.hann_window(510), return_complex=True).abs()  # [256, frames]
    db = 20 * torch.log10(spec.clamp_min(1e-5))  # [256, frames]
    fig = Figure(figsize=(4, 2.4), dpi=100)
    ax = fig.subplots()
    ax.imshow(db.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=float(db.max()) - 80, vmax=float(db.max()),
              extent=(0, wave.numel() / sample_rate, 0, sample_rate / 2000))
    ax.set_xlabel("s")
    ax.set_ylabel("kHz")
    fig.tight_layout()
    fig.savefig(path)


register_family("speech", SpeechFamily, ["SpeechEnhancer"])
