"""Prompt sets (train / held-out) and the resumable order in which training visits them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from mmgrpo.config import ConfigError, DataConfig
from mmgrpo.registry import DATASETS, resolve


def load_prompts(cfg: DataConfig, seed: int) -> tuple[list[Any], list[Any]]:
    """(train prompts, held-out prompts) for a data config.

    A built-in set or `module:function` returns {"train": [...], "eval": [...]} (or a list, split
    by eval_fraction). A .jsonl file holds one JSON object per line with a "prompt" key (other
    keys are ground truth for the rewards); a .json file a list of them; a .txt file one prompt
    per line.
    """
    train = _read_source(cfg.source, cfg.kwargs)
    if isinstance(train, dict):
        if "train" not in train:
            raise ConfigError(f"prompt set '{cfg.source}' returned a dict without a 'train' list")
        train, held_out = list(train["train"]), list(train.get("eval") or [])
    else:
        held_out = []
    if cfg.eval_source is not None:
        held_out = _read_source(cfg.eval_source, cfg.kwargs)
        held_out = held_out["eval"] if isinstance(held_out, dict) else held_out
    elif not held_out and cfg.eval_fraction > 0:
        train, held_out = split_held_out(train, cfg.eval_fraction, seed)
    if not train:
        raise ConfigError(f"prompt set '{cfg.source}' has no training prompts")
    return train, list(held_out)


def split_held_out(prompts: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Deterministic split: a seeded shuffle, the last `fraction` held out (at least 1 if >1 prompt)."""
    n = len(prompts)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = min(n - 1, max(1, round(n * fraction))) if n > 1 else 0
    return [prompts[i] for i in order[: n - k]], [prompts[i] for i in order[n - k :]]


def _read_source(source: str, kwargs: dict[str, Any]) -> Any:
    path = Path(source)
    if source not in DATASETS and path.suffix in (".jsonl", ".json", ".txt"):
        return read_prompt_file(path)
    return resolve(source, DATASETS, "prompt set")(**kwargs)


def read_prompt_file(path: Path) -> list[Any]:
    if not path.is_file():
        raise ConfigError(f"prompt file '{path}' does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"prompt file '{path}' is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): save it as UTF-8"
        ) from None
    if path.suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"prompt file '{path}' is not JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
        if not isinstance(items, list):
            raise ConfigError(f"prompt file '{path}' must hold a JSON list of prompts")
    else:
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"prompt file '{path}' line {number} is not JSON: {e.msg}") from None
    for number, item in enumerate(items, 1):
        if isinstance(item, dict) and "prompt" not in item:
            raise ConfigError(f"prompt file '{path}' item {number} has no 'prompt' key")
    return items


def prompt_meta(prompts: Sequence[Any]) -> dict[str, list[Any]]:
    """For dict prompts: every field except "prompt" as a list over rows (None where absent)."""
    keys: list[str] = []
    for p in prompts:
        if isinstance(p, dict):
            keys += [k for k in p if k != "prompt" and k not in keys]
    return {k: [p.get(k) if isinstance(p, dict) else None for p in prompts] for k in keys}


def prompt_text(prompt: Any, index: int | None = None) -> str:
    """The text of a prompt item: a string, or a dict's "prompt" string.

    Anything else is one ValueError naming the item (`index`: its position in the batch), never a
    silent str() of a dict or a number that a text encoder would read as a caption.
    """
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
        return prompt["prompt"]
    where = "prompt" if index is None else f"prompt {index}"
    raise ValueError(
        f"{where} is a {type(prompt).__name__} without a 'prompt' string ({prompt!r:.60}): "
        "give a string or a dict with a 'prompt' string"
    )


class PromptOrder:
    """Visits prompt indices in a fresh seeded permutation every epoch; its state resumes exactly."""

    def __init__(self, num_prompts: int, seed: int) -> None:
        self.num_prompts = num_prompts
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.num_prompts, generator=g).tolist()

    def take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            perm = self._permutation()
            chunk = perm[self.position : self.position + count - len(out)]
            out += chunk
            self.position += len(chunk)
            if self.position >= self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_prompts": self.num_prompts, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_prompts"] != self.num_prompts:
            raise ConfigError(
                f"cannot resume: the checkpoint saw {state['num_prompts']} training prompts, "
                f"the data config now gives {self.num_prompts}"
            )
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
