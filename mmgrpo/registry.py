"""Explicit tables of built-in adapters, rewards and prompt sets, and name resolution.

A name in YAML resolves as: a built-in name from these tables, `package.module:Name`, or
`path/to/file.py:Name`. Built-ins are import strings, so nothing heavy is imported until used.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from mmgrpo.config import ConfigError

ADAPTERS: dict[str, str] = {
    "toy": "mmgrpo.pipelines.toy:ToyAdapter",
    "vlm": "mmgrpo.pipelines.vlm:VLMAdapter",
    "flow": "mmgrpo.pipelines.flow.adapter:FlowAdapter",
    "mdlm": "mmgrpo.pipelines.mdlm:MaskedDiffusionAdapter",
}

REWARDS: dict[str, str] = {
    "sequence_match": "mmgrpo.rewards.sequence:sequence_match",
    "exact_match": "mmgrpo.rewards.sequence:exact_match",
    "scene": "mmgrpo.rewards.scene:SceneReward",
    "iou": "mmgrpo.rewards.iou:IoUReward",
    "format": "mmgrpo.rewards.format:FormatReward",
    "accuracy": "mmgrpo.rewards.accuracy:AccuracyReward",
    "clip_score": "mmgrpo.rewards.clip_score:CLIPScore",
    "pesq": "mmgrpo.rewards.speech:PESQ",
    "estoi": "mmgrpo.rewards.speech:ESTOI",
    "si_sdr": "mmgrpo.rewards.speech:SISDR",
    "dnsmos": "mmgrpo.rewards.speech:DNSMOS",
    "speech_quality": "mmgrpo.rewards.speech:SpeechQuality",
    "reasoning_accuracy": "mmgrpo.rewards.reasoning:reasoning_accuracy",
    "reasoning_format": "mmgrpo.rewards.reasoning:reasoning_format",
    "sudoku_cells": "mmgrpo.rewards.reasoning:sudoku_cells",
    "tokens_per_forward": "mmgrpo.rewards.reasoning:tokens_per_forward",
}

DATASETS: dict[str, str] = {
    "toy": "mmgrpo.pipelines.toy:toy_prompts",
    "miniworld": "mmgrpo.miniworld.scenes:train_and_heldout",
    "miniworld_vlm": "mmgrpo.miniworld.scenes:vlm_prompts",
    "speech": "mmgrpo.miniworld.speech:speech_prompts",
    "reasoning": "mmgrpo.miniworld.reasoning:reasoning_prompts",
}

ESTIMATORS = {
    "grpo": "(r - group mean) / (std + eps); scale group | batch | none (Dr.GRPO)",
    "median": "MC-GRPO: baseline = group median, the pivot row is excluded",
    "rank": "G2RPO: ranks mapped to standard-normal quantiles",
    "ngrpo": "NGRPO: statistics include a virtual best sample (advantage.max_reward)",
    "normalize_then_sum": "GDPO (advantage.combine): per-reward group normalisation, then batch",
}

LOSSES = {
    "token": "per-step ratio, clipped at [1 - eps_low, 1 + eps_high]",
    "sequence": "GSPO: one ratio per row, exp(mean log-ratio)",
    "grpo": "aggregation: mean over rows of each row's step mean",
    "bnpo": "aggregation: step mean over each micro-batch",
    "dr_grpo": "aggregation: sum / (rows * T)",
    "dapo": "aggregation: sum / active steps of the whole optimizer step (all ranks)",
    "k1 | k2 | k3": "KL estimators; closed-form Gaussian KL when the adapter returns mean/std",
}


# The pip extra that brings each built-in's optional dependencies.
EXTRAS = {
    "vlm": "vlm",
    "flow": "video",
    "mdlm": "mdlm",
    "scene": "image",
    "clip_score": "image",
    "iou": "vlm",
    "pesq": "audio",
    "estoi": "audio",
    "si_sdr": "audio",
    "dnsmos": "audio",
    "speech_quality": "audio",
}


def missing_dependency(kind: str, name: str, error: ModuleNotFoundError) -> ConfigError:
    """One readable error for an optional package that is not installed."""
    extra = EXTRAS.get(name, "dev")
    return ConfigError(
        f"{kind} '{name}' needs the package '{error.name}', which is not installed: pip install 'mmgrpo[{extra}]'"
    )


ASSET_PREFIX = "asset:"


def expand_assets(value: Any) -> Any:
    """Replace every string "asset:NAME[/sub/path]" (in nested dicts/lists) by the embedded asset's path.

    Shipped configs name the embedded tiny models this way (e.g. `model: asset:vlm`), so they work
    wherever mmgrpo is installed.
    """
    if isinstance(value, str) and value.startswith(ASSET_PREFIX):
        from mmgrpo.assets import asset_path

        name, _, rest = value[len(ASSET_PREFIX) :].partition("/")
        try:
            path = asset_path(name)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        return str(path / rest) if rest else str(path)
    if isinstance(value, dict):
        return {k: expand_assets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_assets(v) for v in value]
    return value


def resolve(spec: str, table: dict[str, str], kind: str) -> Any:
    """The object named by `spec`: a key of `table`, `module:attr` or `file.py:attr`."""
    target = table.get(spec, spec)
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        close = difflib.get_close_matches(spec, list(table), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"unknown {kind} '{spec}'{hint}: use a built-in ({', '.join(sorted(table))}), "
            f"package.module:Name or path/to/file.py:Name"
        )
    if module_name.endswith(".py") or "/" in module_name:
        module = _load_file(Path(module_name), kind)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise ConfigError(f"{kind} '{spec}': cannot import module '{module_name}' ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{kind} '{spec}': module '{module_name}' has no attribute '{attr}'") from None


def _load_file(path: Path, kind: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{kind} file '{path}' does not exist")
    name = f"mmgrpo_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
