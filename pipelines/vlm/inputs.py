"""Model inputs from prompt items: parsing, chat template + processor, placeholder checks, batching, positions.

Changes when prompts gain a field, a processor changes its outputs, or a model family places
its tokens differently; nothing here runs the language model.

Prompt items: a string, or a dict {"prompt": text, "image": x | "images": [x, ...],
"video": v | "videos": [v, ...], **ground-truth fields}; images are file paths, PIL images,
numpy uint8 HWC arrays or tensors; videos are file paths (read with decord) or frame arrays.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from mmgrpo.config import ConfigError
from mmgrpo.pipelines.toolkit import prompt_text
from mmgrpo.pipelines.vlm.media import Video, check_image, check_video, load_image, load_video

# Per-token processor outputs: padded and extended with the sequence, not concatenated per image.
PER_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
# Processor outputs a vision encoder reads: (placeholder kind, pixel key, grid key).
VISION_INPUTS = (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))
PIXEL_KEYS = tuple(pixel_key for _, pixel_key, _ in VISION_INPUTS)


@dataclass(frozen=True)
class VisionTokens:
    """The placeholder tokens a model's text carries for visual inputs, and how many features each grid gives."""

    image_token_id: int | None
    video_token_id: int | None
    merge_size: int | None  # spatial merge of the vision tower: features = patches / merge_size**2

    @classmethod
    def of(cls, config: Any) -> "VisionTokens":
        vision_config = getattr(config, "vision_config", None)
        return cls(
            image_token_id=getattr(config, "image_token_id", getattr(config, "image_token_index", None)),
            video_token_id=getattr(config, "video_token_id", getattr(config, "video_token_index", None)),
            merge_size=getattr(vision_config, "spatial_merge_size", None),
        )

    @property
    def placeholders(self) -> list[int]:
        """Token ids never sampled: at re-scoring they would be read as visual slots."""
        return [t for t in (self.image_token_id, self.video_token_id) if t is not None]

    def check(self, input_ids: torch.Tensor, vision: dict[str, torch.Tensor], label: str) -> None:
        """Placeholder tokens in `input_ids` [L] must match the features the vision inputs give."""
        checks = (("image", self.image_token_id, "image_grid_thw", "pixel_values"),
                  ("video", self.video_token_id, "video_grid_thw", "pixel_values_videos"))  # fmt: skip
        for what, token_id, grid_key, pixel_key in checks:
            if token_id is None:
                continue
            n_tokens = int((input_ids == token_id).sum())
            grid = vision.get(grid_key)
            if grid is None or self.merge_size is None:
                if n_tokens and pixel_key not in vision:
                    raise ValueError(f"{label}: {n_tokens} {what} tokens in the text but no {what} inputs (pixels)")
                continue
            n_patches = int(grid.prod(-1).sum())
            n_features = n_patches // self.merge_size**2
            if n_tokens != n_features:
                raise ValueError(
                    f"{label}: {what} features and {what} tokens do not match: {n_tokens} {what} tokens in the "
                    f"text, {n_features} features from {grid_key} {grid.tolist()} (merge size {self.merge_size}). "
                    f"Keep every {what} placeholder the processor inserted (no prompt truncation; one chat-template "
                    f"placeholder per {what})"
                )
            pixels = vision.get(pixel_key)
            if pixels is not None and pixels.shape[0] != n_patches:
                raise ValueError(
                    f"{label}: {pixel_key} has {pixels.shape[0]} patch rows but {grid_key} {grid.tolist()} "
                    f"needs {n_patches}: pixel values and grids must come from the same processor call"
                )


class PromptEncoder:
    """Turns one prompt item into processor outputs (batch 1): chat template, tokens, pixel values, grids.

    processor: a transformers processor (a VLM) or a tokenizer (a text-only causal LM).
    video_options: keyword arguments of `load_video` (fps, nframes, max_pixels, min_frames, max_frames).
    """

    def __init__(
        self,
        processor: Any,
        tokens: VisionTokens,
        *,
        system_prompt: str | None,
        image_max_pixels: int | None,
        video_options: dict[str, Any],
        model_name: str,
    ) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.is_vlm = hasattr(processor, "image_processor") or hasattr(processor, "video_processor")
        self.tokens = tokens
        self.system_prompt = system_prompt
        self.image_max_pixels = image_max_pixels
        self.video_options = video_options
        self.model_name = model_name

    def parse(self, item: Any, index: int) -> tuple[str, list, list[Video]]:
        """(text, images, videos) of one prompt item."""
        text = prompt_text(item, index)
        if isinstance(item, str):
            return text, [], []

        def many(one: str, several: str) -> list:
            values = list(item.get(several) or [])
            if item.get(one) is not None:
                values.insert(0, item[one])
            return values

        images = [load_image(x, self.image_max_pixels) for x in many("image", "images")]
        videos = [load_video(v, **self.video_options) for v in many("video", "videos")]
        if (images or videos) and not self.is_vlm:
            raise ValueError(
                f"prompt {index} has images or videos but the model is text-only "
                f"({self.model_name}): use a vision-language model or drop those fields"
            )
        return text, images, videos

    def check(self, prompts: Sequence[Any]) -> None:
        """One ConfigError line for the first prompt whose text or media cannot be used, naming its index,
        field and file: texts, image files that decode, video files that open with frames (each file once)."""
        checked: set[tuple[str, str]] = set()
        for index, item in enumerate(prompts):
            try:
                prompt_text(item, index)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            if isinstance(item, str):
                continue
            try:
                fields = media_fields(item)
            except ValueError as err:
                raise ConfigError(f"prompt {index}, {err}") from None
            for field, kind, source in fields:
                if not self.is_vlm:
                    raise ConfigError(
                        f"prompt {index}, field '{field}': the model is text-only ({self.model_name}): "
                        "use a vision-language model or drop that field"
                    )
                key = (kind, str(source)) if isinstance(source, (str, Path)) else None
                if key in checked:
                    continue
                try:
                    (check_image if kind == "image" else check_video)(source)
                except ValueError as err:
                    raise ConfigError(f"prompt {index}, field '{field}': {err}") from None
                if key is not None:
                    checked.add(key)

    def encode(self, item: Any, index: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Processor outputs (batch 1) of one prompt on `device`, placeholders checked against the vision inputs."""
        text, images, videos = self.parse(item, index)
        if self.is_vlm:
            inputs = self._vlm_inputs(text, images, videos, index)
        elif getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": text}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            chat = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = self.tokenizer([chat], return_tensors="pt", add_special_tokens=False)
        else:
            inputs = self.tokenizer([text], return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        self.tokens.check(inputs["input_ids"][0], inputs, f"prompt {index}")
        return inputs

    def _vlm_inputs(self, text: str, images: list, videos: list[Video], index: int) -> Any:
        content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
        messages = [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        chat = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        kwargs: dict[str, Any] = {}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = [v.frames for v in videos]
            kwargs["video_metadata"] = [
                {"total_num_frames": len(v), "fps": v.fps, "frames_indices": list(range(len(v)))} for v in videos
            ]
        try:
            return self.processor(text=[chat], return_tensors="pt", **kwargs)
        except ValueError as err:  # e.g. placeholders without images: say which prompt
            raise ValueError(f"prompt {index}: {err}") from err


def media_fields(item: dict) -> list[tuple[str, str, Any]]:
    """(field as the user wrote it, "image" | "video", value) of every image and video of a dict prompt.

    "images" / "videos" must be lists (or arrays of them): a single path there is a ValueError naming the field.
    """
    found = []
    for kind in ("image", "video"):
        if item.get(kind) is not None:
            found.append((kind, kind, item[kind]))
        several = item.get(kind + "s")
        if several is None:
            continue
        if isinstance(several, (str, Path, dict)) or not hasattr(several, "__len__"):
            raise ValueError(f"field '{kind}s' must be a list of {kind}s, got {type(several).__name__} "
                             f"{str(several)[:40]!r} (one {kind}: use '{kind}')")  # fmt: skip
        found += [(f"{kind}s[{i}]", kind, value) for i, value in enumerate(several)]
    return found


def collate(prompts: list[dict[str, torch.Tensor]], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One batch of prompts (each batch 1), left-padded to a common length; vision inputs in row order.

    Per-token keys are padded (input_ids with `pad_token_id`, the others with 0); every other
    tensor (pixel values, grids, ...) is concatenated along dim 0.
    """
    width = max(p["input_ids"].shape[1] for p in prompts)
    per_token = [k for k in PER_TOKEN_KEYS if k in prompts[0]]
    columns: dict[str, list[torch.Tensor]] = {k: [] for k in per_token}
    others: dict[str, list[torch.Tensor]] = {}
    for prompt in prompts:
        pad = width - prompt["input_ids"].shape[1]
        for key in per_token:
            fill = pad_token_id if key == "input_ids" else 0
            left = torch.full((pad,), fill, dtype=prompt[key].dtype, device=device)  # [pad]
            columns[key].append(torch.cat([left, prompt[key][0].to(device)]))  # [width]
        for key, value in prompt.items():
            if key not in per_token:
                others.setdefault(key, []).append(value.to(device))
    batch = {k: torch.stack(v) for k, v in columns.items()}  # each [R, width]
    batch.update({k: torch.cat(v) for k, v in others.items()})  # vision inputs, rows in order
    return batch


class Positions:
    """position_ids of prompts and of new text tokens: M-RoPE from the model's own `get_rope_index`
    (Qwen2-VL family, [3, R, L]) when it has one, else 1D positions [R, L] that skip left padding."""

    def __init__(self, model: Any, is_vlm: bool) -> None:
        self._rope_index = None
        self._rope_index_args: set[str] = set()
        for owner in (model, getattr(model, "model", None)):
            if is_vlm and owner is not None and callable(getattr(owner, "get_rope_index", None)):
                self._rope_index = owner.get_rope_index
                self._rope_index_args = set(inspect.signature(owner.get_rope_index).parameters)
                break

    @property
    def mrope(self) -> bool:
        return self._rope_index is not None

    def of_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids for `batch` ([3, R, L] for M-RoPE, else [R, L]) and per row the offset
        delta [R] such that the text token after the row's n valid tokens sits at n + delta."""
        mask = batch["attention_mask"]  # [R, L]
        if self._rope_index is not None:
            kwargs = {k: v for k, v in batch.items() if k in self._rope_index_args and k != "input_ids"}
            positions, delta = self._rope_index(batch["input_ids"], **kwargs)  # [3, R, L], [R, 1]
            return positions, delta.view(-1)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [R, L]
        return positions, torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)

    def of_text(self, position: torch.Tensor) -> torch.Tensor:
        """position_ids ([R, k], or [3, R, k] for M-RoPE) of new text tokens from their positions [R] or [R, k]."""
        position = position.view(position.shape[0], -1)  # [R, k]
        return position.unsqueeze(0).expand(3, -1, -1) if self._rope_index is not None else position
