"""Images and videos for VLM prompts: load from files or arrays, cap the pixels, sample frames.

- `load_image(source, max_pixels=None) -> PIL.Image` accepts a file path, a PIL image, a numpy
  array (uint8 HW / HWC, or float in [0, 1]) or a torch tensor (CHW or HWC, uint8 or float);
  `image_size(source)` is its (width, height) without decoding a file.
- `load_video(source, fps=2.0, nframes=None, max_pixels=None) -> Video` reads a file with
  decord, sampling frames uniformly at `fps` (clamped to [min_frames, max_frames]) or exactly
  `nframes`; each frame is resized to at most `max_pixels` pixels. Frames already in memory
  (an array [F, H, W, 3], a tensor, or a list of images) are taken as sampled at `fps`.

Errors a user can cause name the file and say what to do. `check_image` / `check_video` find
them before training, cheaply (an image is decoded, a video file only opened), as one-line
ValueErrors.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Video:
    """Sampled frames of one video and their rate (what a video processor needs for time positions)."""

    frames: np.ndarray  # [F, H, W, 3] uint8
    fps: float  # frames per second of `frames` as sampled (not the file's native rate)
    source: str | None = None  # the file it came from, if any

    def __len__(self) -> int:
        return self.frames.shape[0]


def _cap_pixels(image, max_pixels: int | None):
    """Resize a PIL image (aspect ratio kept) so that width*height <= max_pixels; never upscales."""
    if max_pixels is None:
        return image
    w, h = image.size
    if w * h <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (w * h))
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    from PIL import Image

    return image.resize(size, Image.Resampling.BICUBIC)


def _array_to_uint8_hwc(array: np.ndarray, what: str) -> np.ndarray:
    """A numpy image as uint8 [H, W, 3]: accepts HW, HWC (C = 1, 3, 4), uint8 or float in [0, 1]."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"{what}: expected an image array [H, W], [H, W, 1|3|4], got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{what}: image arrays must be uint8 or float in [0, 1], got {array.dtype}")
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def _channels_first(shape: tuple[int, ...]) -> bool:
    """Whether a torch image tensor of `shape` is CHW (else HWC or HW)."""
    return len(shape) == 3 and shape[0] in (1, 3, 4) and shape[2] not in (1, 3, 4)


def _tensor_to_numpy_hwc(tensor) -> np.ndarray:
    """A torch image tensor (CHW or HWC) as a numpy HWC array of the same dtype family."""
    array = tensor.detach().cpu()
    if _channels_first(tuple(array.shape)):
        array = array.permute(1, 2, 0)
    return array.float().numpy() if array.is_floating_point() else array.numpy()


def load_image(source: Any, max_pixels: int | None = None):
    """One RGB PIL image from a path, PIL image, numpy array or torch tensor, capped at max_pixels."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {str(path)!r} (check the prompt's 'image' path)")
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {str(path)!r}: {err}; use a PNG/JPEG file or pass the pixels") from err
    elif isinstance(source, Image.Image):
        image = source.convert("RGB")
    elif isinstance(source, np.ndarray):
        image = Image.fromarray(_array_to_uint8_hwc(source, "image"))
    elif type(source).__module__.startswith("torch"):
        image = Image.fromarray(_array_to_uint8_hwc(_tensor_to_numpy_hwc(source), "image tensor"))
    else:
        raise TypeError(
            f"unsupported image type {type(source).__name__}: use a file path, PIL image, numpy or torch array"
        )
    return _cap_pixels(image, max_pixels)


def image_size(source: Any) -> tuple[int, int] | None:
    """(width, height) of an image as `load_image` reads it (before any max_pixels cap), or None.

    A file's header alone is read. None: not an image source, or a file that is missing or not an image.
    """
    from PIL import Image

    if isinstance(source, (str, Path)):
        try:
            with Image.open(source) as opened:
                return opened.size
        except OSError:  # missing, unreadable, or not an image (PIL's UnidentifiedImageError)
            return None
    if isinstance(source, Image.Image):
        return source.size
    if isinstance(source, np.ndarray) or type(source).__module__.startswith("torch"):
        shape = tuple(source.shape)
        if not isinstance(source, np.ndarray) and _channels_first(shape):
            shape = shape[1:]  # CHW tensor
        if len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3, 4)):
            return int(shape[1]), int(shape[0])
    return None


def frame_indices(total: int, native_fps: float, fps: float | None, nframes: int | None,
                  min_frames: int, max_frames: int) -> np.ndarray:
    """Uniformly spaced frame indices: exactly `nframes`, or duration*fps clamped to [min, max] and to `total`.

    >>> frame_indices(40, 20.0, 2.0, None, 2, 16).tolist()
    [0, 13, 26, 39]
    """
    if nframes is not None:
        n = int(nframes)
    else:
        if fps is None or fps <= 0:
            raise ValueError(f"video sampling needs fps > 0 or nframes, got fps={fps}")
        n = round(total / native_fps * fps)
        n = min(max(n, min_frames), max_frames)
    n = max(1, min(n, total))
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def load_video(
    source: Any,
    fps: float | None = 2.0,
    nframes: int | None = None,
    max_pixels: int | None = None,
    min_frames: int = 2,
    max_frames: int = 16,
) -> Video:
    """Frames of one video: from a file (decord) or from frames already in memory.

    A file is sampled at `fps` frames per second (the count clamped to [min_frames, max_frames])
    or at exactly `nframes` frames, uniformly over its length. Each frame is resized so that
    width*height <= max_pixels (aspect ratio kept, never upscaled).
    """
    from PIL import Image

    if isinstance(source, Video):
        frames, rate, name = source.frames, source.fps, source.source
    elif isinstance(source, (str, Path)):
        frames, rate = _read_video_file(Path(source), fps, nframes, min_frames, max_frames)
        name = str(source)
    else:
        if type(source).__module__.startswith("torch"):
            source = source.detach().cpu()
            if source.ndim == 4 and source.shape[1] in (1, 3, 4) and source.shape[3] not in (1, 3, 4):
                source = source.permute(0, 2, 3, 1)  # [F, C, H, W] -> [F, H, W, C]
            source = source.float().numpy() if source.is_floating_point() else source.numpy()
        if isinstance(source, np.ndarray):
            if source.ndim != 4:
                raise ValueError(f"video frames must be an array [F, H, W, 3], got shape {tuple(source.shape)}")
            source = list(source)
        if not isinstance(source, (list, tuple)) or not source:
            raise TypeError(
                f"unsupported video type {type(source).__name__}: "
                "use a file path, an array [F, H, W, 3] or a list of images"
            )
        frames = np.stack([np.asarray(load_image(frame)) for frame in source])
        rate, name = float(fps or 2.0), None
    if max_pixels is not None and frames.shape[1] * frames.shape[2] > max_pixels:
        frames = np.stack([np.asarray(_cap_pixels(Image.fromarray(f), max_pixels)) for f in frames])
    return Video(frames=np.ascontiguousarray(frames), fps=float(rate), source=name)


def _read_video_file(path: Path, fps, nframes, min_frames, max_frames) -> tuple[np.ndarray, float]:
    """Sampled frames [F, H, W, 3] uint8 of a video file and their rate, read with decord."""
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {str(path)!r} (check the prompt's 'video' path)")
    try:
        import decord
    except ImportError as err:
        raise ImportError("reading video files needs decord: pip install 'mmgrpo[vlm]'") from err
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        total = len(reader)
        native_fps = float(reader.get_avg_fps()) or 1.0
        if total == 0:
            raise ValueError("no frames")
        index = frame_indices(total, native_fps, fps, nframes, min_frames, max_frames)
        frames = reader.get_batch(index.tolist()).asnumpy()
    except Exception as err:  # decord raises its own DECORDError (and RuntimeError) types
        raise ValueError(
            f"cannot read video {str(path)!r}: {err}; use a video file decord can open (mp4, avi, webm)"
        ) from err
    duration = total / native_fps
    rate = len(index) / duration if duration > 0 else float(fps or 1.0)
    return frames, rate


# ------------------------------------------------------------------------------- checks before training

MEDIA_TYPES = "a file path (or, from Python, a PIL image, a numpy or torch array)"


def check_image(source: Any) -> None:
    """Raise one ValueError line when `source` cannot become an image (missing, undecodable, wrong type).

    A file is decoded, JPEGs in draft mode (a fraction of a full decode); in-memory images are converted.
    """
    from PIL import Image

    if isinstance(source, (str, Path)):
        path = _existing_file(source, "image")
        try:
            with Image.open(path) as opened:
                opened.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale, still reads every block
                opened.load()
        except Exception as err:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ...
            raise ValueError(f"cannot read image {str(path)!r}: {_first_line(err)}; use a PNG/JPEG file") from None
        return
    if not isinstance(source, Image.Image) and not isinstance(source, np.ndarray) and not _is_tensor(source):
        raise ValueError(f"{_shown(source)} is {_a(type(source).__name__)}, not an image: give {MEDIA_TYPES}")
    try:
        load_image(source)
    except (TypeError, ValueError) as err:
        raise ValueError(_first_line(err)) from None


def check_video(source: Any) -> None:
    """Raise one ValueError line when `source` cannot become a video: a file must open and have frames."""
    if isinstance(source, (str, Path)):
        path = _existing_file(source, "video")
        if path.stat().st_size == 0:
            raise ValueError(f"video file {str(path)!r} is empty (0 bytes)")
        try:
            import decord
        except ImportError:
            raise ValueError("reading video files needs decord: pip install 'mmgrpo[vlm]'") from None
        try:
            with _quiet_native_stderr():  # ffmpeg and decord log to fd 2 before raising
                frames = len(decord.VideoReader(str(path), num_threads=1))
        except Exception:
            raise ValueError(
                f"cannot open video {str(path)!r}: not a video decord can read (mp4, avi, webm) or a truncated file"
            ) from None
        if frames == 0:
            raise ValueError(f"video file {str(path)!r} has no frames")
        return
    if isinstance(source, Video):
        return
    if not isinstance(source, (np.ndarray, list, tuple)) and not _is_tensor(source):
        raise ValueError(f"{_shown(source)} is {_a(type(source).__name__)}, not a video: give {MEDIA_TYPES}")
    try:
        load_video(source)
    except (TypeError, ValueError) as err:
        raise ValueError(_first_line(err)) from None


def _existing_file(source: str | Path, kind: str) -> Path:
    path = Path(source)
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative paths start at the working directory {os.getcwd()})"
        raise ValueError(f"{kind} file {str(path)!r} does not exist{where}")
    return path


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:40]}..."


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence what native libraries write to file descriptor 2 (Python's own stderr is untouched)."""
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 to redirect
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
