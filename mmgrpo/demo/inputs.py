"""The prompt of one comparison, from what the page sent: a held-out item, typed text or an upload.

Everything a person can get wrong here (an empty prompt, an upload too large or not decodable, audio
in stereo) is an InputError whose message the page shows; the server goes on serving.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # an upload larger than this is refused before it is decoded
MAX_IMAGE_SIDE = 4096  # pixels
MAX_AUDIO_SECONDS = 60.0


class InputError(ValueError):
    """A problem with what the user gave the page: shown there as one line."""


def check_size(path: Path, limit: int = MAX_UPLOAD_BYTES) -> None:
    size = path.stat().st_size
    if size > limit:
        raise InputError(f"{path.name} is {size / 2**20:.1f} MB; uploads are limited to {limit / 2**20:.0f} MB")
    if size == 0:
        raise InputError(f"{path.name} is empty")


def read_image_upload(path: str | Path) -> np.ndarray:
    """An uploaded image as uint8 [H, W, 3]; InputError when it is too large or not an image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    check_size(path)
    try:
        with Image.open(path) as image:
            if max(image.size) > MAX_IMAGE_SIDE:
                raise InputError(f"{path.name} is {image.size[0]}x{image.size[1]} pixels; the limit is "
                                 f"{MAX_IMAGE_SIDE} on a side")
            return np.asarray(image.convert("RGB"))  # [H, W, 3]
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path.name} is not a readable image (PNG, JPEG, ...): {e}") from None


def read_audio_upload(path: str | Path, target_rate: int) -> tuple[np.ndarray, str | None]:
    """An uploaded WAV/FLAC as mono float32 [L] at target_rate, and a note when it was resampled.

    Stereo is refused (which channel holds the speech is the user's call); another rate is resampled
    with the resampler the speech family and metrics use, and the page says so.
    """
    import soundfile as sf

    path = Path(path)
    check_size(path)
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)  # [L, channels]
    except (RuntimeError, sf.LibsndfileError, TypeError, ValueError) as e:
        raise InputError(f"{path.name} is not a readable audio file (WAV or FLAC): {e}") from None
    if audio.shape[1] != 1:
        raise InputError(f"{path.name} has {audio.shape[1]} channels; the enhancer takes mono speech: "
                         "mix it down to one channel (e.g. sox in.wav -c 1 out.wav) and upload that")
    wave = audio[:, 0]
    if wave.size == 0 or not np.isfinite(wave).all():
        raise InputError(f"{path.name} holds no samples, or NaN/inf samples")
    if wave.size / rate > MAX_AUDIO_SECONDS:
        raise InputError(f"{path.name} lasts {wave.size / rate:.0f} s; the limit is {MAX_AUDIO_SECONDS:.0f} s")
    if rate == target_rate:
        return np.ascontiguousarray(wave), None
    from mmgrpo.rewards.speech import resample

    note = f"{path.name} was recorded at {rate} Hz; resampled to the model's {target_rate} Hz"
    return np.ascontiguousarray(resample(wave, rate, target_rate), dtype=np.float32), note


def crop_audio(wave: np.ndarray, limit: int | None, rate: int) -> tuple[np.ndarray, str | None]:
    """The first `limit` samples of a clip longer than the model takes (None: no limit), and a note saying so."""
    if limit is None or wave.size <= limit:
        return wave, None
    return wave[:limit], (f"the model takes clips of up to {limit / rate:.2f} s: the first {limit / rate:.2f} s of "
                          f"your {wave.size / rate:.1f} s were enhanced")


def join_notes(*notes: str | None) -> str | None:
    return "; ".join(n for n in notes if n) or None


def build_prompt(kind: str, picked: Any, text: str | None, upload: str | None,
                 sample_rate: int = 16000, max_samples: int | None = None) -> tuple[Any, str | None]:
    """(prompt item, note) for one comparison.

    kind: the view (views.VIEW_KINDS). picked: the held-out item chosen (or None). text: typed
    prompt (text, image, video, mdlm) or question (vlm); blank means "use the picked item", but text
    of spaces only is an empty prompt. upload: a file path (vlm: an image; audio: a WAV, cut to
    max_samples when the model takes no longer clips).
    """
    note = None
    typed = None if text is None or text == "" else text.strip()
    if typed == "":
        raise InputError("the prompt is empty: type a prompt, or clear the box to use the held-out prompt")
    if kind == "vlm" and upload:
        image = read_image_upload(upload)
        question = typed or (picked.get("prompt") if isinstance(picked, dict) else None)
        if not question:
            raise InputError("ask a question about your image (e.g. 'Where is the red circle?')")
        return {"prompt": question, "image": image, "image_size": [image.shape[1], image.shape[0]]}, note
    if kind == "audio" and upload:
        wave, resampled = read_audio_upload(upload, sample_rate)
        wave, cropped = crop_audio(wave, max_samples, sample_rate)
        unscored = "your recording has no clean reference, so rewards that compare with one (PESQ, ESTOI, SI-SDR) " \
                   "leave it unscored: listen to both"
        note = join_notes(resampled, cropped, unscored)
        return {"prompt": f"your file {Path(upload).name}", "noisy": wave, "sample_rate": sample_rate}, note
    if picked is None and typed is None:
        raise InputError("the prompt is empty: pick a held-out prompt or type one")
    if typed is None:
        return picked, note
    if kind in ("vlm", "audio"):  # the typed text is a question about the picked item's image
        if not isinstance(picked, dict):
            raise InputError("pick a held-out item (or upload your own) to go with the question")
        if typed == picked.get("prompt"):
            return picked, note
        # the ground truth answers the item's own question, not this one: IoU is then not scored
        return {k: v for k, v in picked.items() if k not in ("box", "boxes", "target")} | {"prompt": typed}, note
    return typed, note


def parse_seed(value: Any) -> int:
    """The seed from the page's number box: a whole number in [0, 2^63)."""
    try:
        seed = float(value)
    except (TypeError, ValueError):
        raise InputError(f"the seed must be a whole number, got {value!r}") from None
    if not math.isfinite(seed) or seed != int(seed) or not 0 <= seed < 2**63:
        raise InputError(f"the seed must be a whole number from 0 to 2^63 - 1, got {value!r}")
    return int(seed)
