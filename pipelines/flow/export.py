"""Writing decoded flow samples to files: images to PNG, videos to MP4 (with a contact sheet), GIF or PNG."""

from __future__ import annotations

from pathlib import Path

import torch


def export_media(sample: torch.Tensor, path: str | Path, fps: int = 8) -> str:
    """Write an image [3, H, W] or a video [F, 3, H, W] (floats in [0, 1]) to `path`; returns the path written.

    Images go to PNG. Videos go to MP4 (diffusers' export_to_video) with a contact sheet beside it
    (PATH.png: the F frames in a row, for where video does not play); a path ending in .gif writes
    an animated GIF instead, one ending in .png the contact sheet alone. A path without a suffix
    gets .png (images) or .mp4 (videos).
    """
    import numpy as np
    from PIL import Image

    path = Path(path)
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
