"""Vision reuse across a group: each prompt's vision features and M-RoPE positions, computed once
at sampling, serve every re-scoring of its G rows (EasyR1 caches by uid the same way).

Only for families whose forward takes precomputed vision features as `mm_encoder_outputs`
holding only `pooler_output` (one tensor per image / video), and only while the vision tower is
frozen (the features carry no gradient). Changes when transformers changes how a VLM accepts
precomputed features.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from mmgrpo.pipelines.vlm.inputs import PIXEL_KEYS, VISION_INPUTS

# Qwen3-VL also needs its deepstack features, so it, like any other model, re-encodes the pixels
# when re-scoring.
REUSE_VISION_FAMILIES = ("qwen2_vl", "qwen2_5_vl")

Features = dict[str, tuple[torch.Tensor, ...]]  # "image"/"video" -> encoder output per item, in order


@dataclass
class PromptReuse:
    """What re-scoring reuses from sampling for one prompt: its M-RoPE positions and vision features.

    Valid only while the prompt's tensors are the ones it was computed from (same objects, not
    modified in place): `matches` checks, and log_prob recomputes everything otherwise.
    """

    sources: dict[str, tuple[torch.Tensor, int]]  # prompt key -> (tensor, its version counter)
    positions: torch.Tensor  # [3, L] M-RoPE positions of the prompt's L tokens
    delta: int  # the text token after the prompt's L tokens sits at L + delta
    features: Features

    @staticmethod
    def sources_of(prompt: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
        return {k: (v, v._version) for k, v in prompt.items()}

    def matches(self, prompt: dict[str, torch.Tensor]) -> bool:
        return prompt.keys() == self.sources.keys() and all(
            prompt[k] is t and t._version == v for k, (t, v) in self.sources.items()
        )


def reuse_supported(model: Any, mrope: bool) -> bool:
    """Whether `model` can take precomputed vision features and M-RoPE positions (Qwen2-VL, Qwen2.5-VL)."""
    return (
        mrope
        and getattr(model.config, "model_type", None) in REUSE_VISION_FAMILIES
        and "mm_encoder_outputs" in inspect.signature(model.forward).parameters
    )


def vision_features(model: Any, batch: dict[str, torch.Tensor]) -> Features:
    """Vision-encoder outputs of every image / video in `batch`, one tensor per item in row order."""
    features = {}
    for kind, pixel_key, grid_key in VISION_INPUTS:
        if pixel_key in batch:
            encode = getattr(model, f"get_{kind}_features")
            with torch.no_grad():  # the tower is frozen: its outputs never carry gradients
                out = encode(batch[pixel_key], batch[grid_key], return_dict=True)
            features[kind] = tuple(out.pooler_output)
    return features


def with_features(batch: dict[str, torch.Tensor], features: Features) -> dict[str, Any]:
    """`batch` with its pixel inputs replaced by precomputed encoder outputs (`mm_encoder_outputs`)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    inputs: dict[str, Any] = {k: v for k, v in batch.items() if k not in PIXEL_KEYS}
    inputs["mm_encoder_outputs"] = {
        kind: BaseModelOutputWithPooling(pooler_output=items) for kind, items in features.items() if items
    }
    return inputs


def reuse_entries(
    encoded: list[dict[str, torch.Tensor]], positions: torch.Tensor, delta: torch.Tensor, features: Features
) -> list[PromptReuse]:
    """One PromptReuse per prompt of a sampling batch: its positions ([3, B, L], left-padded) and features."""
    L = positions.shape[-1]
    offsets = dict.fromkeys(features, 0)
    entries = []
    for b, prompt in enumerate(encoded):
        items = {}
        for kind, _, grid_key in VISION_INPUTS:
            if kind in features:
                count = prompt[grid_key].shape[0] if grid_key in prompt else 0
                items[kind] = features[kind][offsets[kind] : offsets[kind] + count]
                offsets[kind] += count
        length = prompt["input_ids"].shape[1]
        entries.append(PromptReuse(PromptReuse.sources_of(prompt), positions[:, b, L - length :].clone(),
                                   int(delta[b]), items))  # fmt: skip
    return entries


def reusable(
    table: dict[str, PromptReuse] | None, keys: list[str], prompts: list[dict[str, torch.Tensor]]
) -> list[PromptReuse] | None:
    """The entries of `keys` in `table`, or None when any is missing or its prompt tensors changed."""
    if not table:
        return None
    entries = [table.get(key) for key in keys]
    if any(e is None or not e.matches(p) for e, p in zip(entries, prompts)):
        return None
    return entries  # type: ignore[return-value]


def reused_positions(entries: list[PromptReuse], width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position_ids [3, U, width] of left-padded prompts and their deltas [U], from sampling.

    The values get_rope_index gives the prompts' tokens; padding gets 1, as there.
    """
    positions = torch.ones(3, len(entries), width, dtype=torch.long, device=device)  # [3, U, width]
    for r, entry in enumerate(entries):
        positions[:, r, width - entry.positions.shape[-1] :] = entry.positions.to(device)
    delta = torch.tensor([entry.delta for entry in entries], dtype=torch.long, device=device)  # [U]
    return positions, delta


def reused_batch(
    entries: list[PromptReuse], prompts: list[dict[str, torch.Tensor]], collate: Any, device: torch.device
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """The re-scoring prefill of `prompts` from their sampling entries: no rope index, no vision tower.

    collate: prompts -> left-padded batch. Returns (inputs with `mm_encoder_outputs`, positions
    [3, U, L], delta [U]).
    """
    batch = collate([{k: v for k, v in p.items() if k not in PIXEL_KEYS} for p in prompts])  # [U, L]
    positions, delta = reused_positions(entries, batch["input_ids"].shape[1], device)
    kinds = {kind for entry in entries for kind in entry.features}
    features = {k: tuple(x for e in entries for x in e.features.get(k, ())) for k in kinds}  # rows in order
    return with_features(batch, features), positions, delta
