"""The compressed complex STFT of SGMSE+ / FlowMSE and its exact inverse, as pure functions.

16 kHz mono waveforms, n_fft 510 (256 frequency bins), hop 128, periodic Hann window,
center=True. Each bin z is compressed to c = beta |z|^alpha e^{i angle z} (beta 0.15,
alpha 0.5: quiet bins count as much as loud ones), and the latents are its real and imaginary
parts as two channels: [n, 2, 256, frames].

Frames: a waveform of L samples is zero-padded to (frames - 1) * hop samples, with frames the
smallest multiple of FRAME_MULTIPLE (the UNet halves the frame axis 4 times) such that nothing
is cut; `latents_to_waveform(..., length=L)` crops back. The inverse is exact up to float32
rounding (periodic Hann at hop 128 of 510 satisfies the overlap-add condition).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

SAMPLE_RATE = 16000
FRAME_MULTIPLE = 16


@dataclass(frozen=True)
class STFTSettings:
    """What a speech enhancer's latents mean (saved in speech.json)."""

    sample_rate: int = SAMPLE_RATE
    n_fft: int = 510
    hop: int = 128
    alpha: float = 0.5  # magnitude exponent
    beta: float = 0.15  # magnitude factor
    frame_multiple: int = FRAME_MULTIPLE

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_STFT = STFTSettings()


def frames_for(length: int, settings: STFTSettings = DEFAULT_STFT) -> int:
    """The padded frame count of a waveform of `length` samples: a multiple of frame_multiple
    with (frames - 1) * hop >= length."""
    needed = -(-max(int(length), 1) // settings.hop) + 1  # ceil(L / hop) + 1 frames cover L samples
    m = settings.frame_multiple
    return -(-needed // m) * m


def padded_length(frames: int, settings: STFTSettings = DEFAULT_STFT) -> int:
    """Samples of a waveform whose centred STFT has exactly `frames` frames."""
    return (frames - 1) * settings.hop


def _window(settings: STFTSettings, device: torch.device) -> torch.Tensor:
    return torch.hann_window(settings.n_fft, periodic=True, device=device)  # [n_fft]


def compress(z: torch.Tensor, settings: STFTSettings = DEFAULT_STFT) -> torch.Tensor:
    """c = beta |z|^alpha e^{i angle z} (complex, same shape)."""
    return torch.polar(settings.beta * z.abs() ** settings.alpha, z.angle())


def decompress(c: torch.Tensor, settings: STFTSettings = DEFAULT_STFT) -> torch.Tensor:
    """The inverse of `compress`: |z| = (|c| / beta)^(1/alpha), same angle (complex, same shape)."""
    return torch.polar((c.abs() / settings.beta) ** (1.0 / settings.alpha), c.angle())


def waveform_to_latents(wave: torch.Tensor, frames: int | None = None,
                        settings: STFTSettings = DEFAULT_STFT) -> torch.Tensor:
    """Waveforms [n, L] float -> latents [n, 2, bins, frames] fp32 (real, imag of the compressed STFT).

    frames: the padded frame count (None: frames_for(L)); the waveform is zero-padded to
    padded_length(frames) samples, which must not be shorter than L.
    """
    wave = wave.float()  # [n, L]
    frames = frames_for(wave.shape[-1], settings) if frames is None else int(frames)
    target = padded_length(frames, settings)
    if target < wave.shape[-1]:
        raise ValueError(f"{frames} STFT frames hold {target} samples, fewer than the clip's {wave.shape[-1]}")
    wave = torch.nn.functional.pad(wave, (0, target - wave.shape[-1]))  # [n, target]
    z = torch.stft(wave, settings.n_fft, settings.hop, window=_window(settings, wave.device), center=True,
                   return_complex=True)  # [n, bins, frames] complex
    c = compress(z, settings)  # [n, bins, frames] complex
    return torch.stack([c.real, c.imag], dim=1)  # [n, 2, bins, frames]


def latents_to_waveform(latents: torch.Tensor, length: int | None = None,
                        settings: STFTSettings = DEFAULT_STFT) -> torch.Tensor:
    """Latents [n, 2, bins, frames] -> waveforms [n, length] fp32 (length None: the padded length)."""
    latents = latents.float()
    c = torch.complex(latents[:, 0], latents[:, 1])  # [n, bins, frames]
    z = decompress(c, settings)  # [n, bins, frames]
    padded = padded_length(latents.shape[-1], settings)
    wave = torch.istft(z, settings.n_fft, settings.hop, window=_window(settings, latents.device), center=True,
                       length=padded)  # [n, padded]
    return wave if length is None else wave[:, :length]  # [n, length]
