"""Run configuration: YAML files mapped onto dataclasses with strict keys.

Every key is checked: an unknown or mistyped key raises ConfigError naming it and the closest
valid key. `--set a.b=c` overrides are applied to the raw YAML before checking (values are
parsed as YAML, so `--set train.group_size=4` gives an int and `--set advantage.clip=null` None).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration mistake the user can fix; the message is one line that says how."""


@dataclass
class PipelineConfig:
    name: str = "toy"  # built-in adapter name, package.module:Class, or path/to/file.py:Class
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the adapter's constructor


@dataclass
class RewardConfig:
    name: str = "sequence_match"  # built-in reward name, package.module:name, or path/to/file.py:name
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor (class) or bound (function) args


@dataclass
class DataConfig:
    source: str = "toy"  # built-in prompt set, a .jsonl/.json/.txt file, or package.module:function
    kwargs: dict[str, Any] = field(default_factory=dict)  # for built-in sets and functions
    eval_source: str | None = None  # held-out prompts; default: the set's own eval split or eval_fraction
    eval_fraction: float = 0.1  # share of a prompt file held out when no eval split is given


@dataclass
class AdvantageConfig:
    estimator: Literal["grpo", "median", "rank", "ngrpo"] = "grpo"
    scale: Literal["group", "batch", "none"] = "group"  # "none" is Dr.GRPO
    combine: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    eps: float = 1e-4
    clip: float | None = None  # clamp advantages to [-clip, clip]
    max_reward: float | None = None  # the virtual best sample of NGRPO


@dataclass
class LossConfig:
    ratio: Literal["token", "sequence"] = "token"  # "sequence" is GSPO
    eps_low: float = 0.2
    eps_high: float | None = None  # None: same as eps_low; 0.28 is DAPO's clip-higher
    aggregation: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    beta: float = 0.0  # KL-to-reference weight; 0 skips the reference forward entirely
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_closed_form: bool = True  # use the Gaussian closed form when the adapter returns mean/std
    # scale of that closed form: "exact" per-step Gaussian KL, or "flow_grpo" (exact x |dt|, the scale
    # Flow-GRPO's betas were tuned for); see losses.gaussian_kl
    kl_convention: Literal["exact", "flow_grpo"] = "exact"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float | None = 1.0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    ema_decay: float | None = None  # EMA of trainable weights (used for the final eval)
    ema_every: int = 1
    # training steps the LR schedule spans; null: train.max_steps at the start of the run. A run
    # writes the resolved value into its config.yaml, so extending max_steps on resume keeps the curve.
    horizon: int | None = None


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 100
    prompts_per_step: int = 8  # B, global over all processes
    group_size: int = 8  # G samples per prompt
    micro_batch_size: int = 64  # rows per forward/backward on one process
    step_chunk: int | None = None  # decision steps per backward (None: all steps at once)
    num_iterations: int = 1  # optimizer steps on each rollout (inner epochs, TRL's mu)
    dynamic_sampling: bool = False  # drop groups whose rewards all agree and refill
    dynamic_sampling_max_rounds: int = 4
    mixed_precision: Literal["no", "bf16"] = "no"
    cpu: bool = False  # force CPU even when a GPU is present
    num_threads: int | None = None  # torch CPU threads (1 is fastest for the tiny embedded models)
    checkpoint_every: int = 50  # steps; a final checkpoint is always written
    keep_checkpoints: int = 2
    gallery_every: int = 0  # steps between training galleries (0: only before/after)
    # trackers that mirror metrics.jsonl and the galleries' media: "tensorboard" (RUN_DIR/tensorboard/) and/or
    # "wandb" (offline under RUN_DIR/wandb/ unless WANDB_MODE says otherwise); pip install 'mmgrpo[track]'
    log_with: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    num_prompts: int = 16  # held-out prompts scored before and after training (0: no eval)
    samples_per_prompt: int = 1
    batch_size: int = 16  # prompts per sampling call during eval
    seed: int = 1234
    primary: str | None = None  # reward reported as the headline (default: the first reward)
    gallery: int = 8  # samples exported to samples/ before and after


@dataclass
class Config:
    modality: str = "custom"
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    data: DataConfig = field(default_factory=DataConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- building dataclasses strictly


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where} = {value!r} is not one of {', '.join(map(repr, args))}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0], f"{where}.{i}") for i, v in enumerate(value)] if args else value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with a suggestion.

    Missing keys without a default and ValueErrors of the dataclass's own checks (__post_init__)
    are ConfigErrors too, prefixed with `where`.
    """
    label = where or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must be a mapping of keys, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean '{_join(where, close[0])}'?)" if close else f" (valid keys: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{_join(where, key)}'{hint}")
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.init and f.name not in data:
            raise ConfigError(f"missing config key '{_join(where, f.name)}': it has no default, give it a value")
    kwargs = {k: _convert(v, hints[k], _join(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a range check in the dataclass's __post_init__: a user mistake too
        raise ConfigError(f"{label}: {e}") from None


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def validate(cfg: Config) -> None:
    """Checks across keys and ranges that the types alone do not express (run before anything is built)."""
    t = cfg.train
    for key in ("max_steps", "prompts_per_step", "group_size", "micro_batch_size", "num_iterations", "checkpoint_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be at least 1, got {getattr(t, key)}")
    if t.group_size < 2 and cfg.advantage.estimator != "ngrpo":
        raise ConfigError("train.group_size must be at least 2: group-relative advantages of one sample are 0")
    if cfg.loss.ratio == "sequence" and t.step_chunk:
        raise ConfigError("loss.ratio=sequence (GSPO) scores all steps at once: remove train.step_chunk")
    if t.num_threads is not None and t.num_threads < 1:
        raise ConfigError(f"train.num_threads must be at least 1 (or null for torch's default), got {t.num_threads}")
    if t.step_chunk is not None and t.step_chunk < 1:
        raise ConfigError(f"train.step_chunk must be at least 1 (or null for all steps), got {t.step_chunk}")
    if cfg.loss.eps_low <= 0 or (cfg.loss.eps_high is not None and cfg.loss.eps_high <= 0):
        raise ConfigError("loss.eps_low and loss.eps_high must be > 0")
    if cfg.loss.beta > 0 and cfg.loss.kl_convention == "flow_grpo" and not cfg.loss.kl_closed_form:
        raise ConfigError(
            "loss.kl_convention=flow_grpo scales the closed-form Gaussian KL: set loss.kl_closed_form=true "
            "or loss.kl_convention=exact"
        )
    _validate_ranges(cfg)
    _validate_run_keys(cfg)
    from mmgrpo.tracking import check_trackers  # tracking imports ConfigError from here

    check_trackers(t.log_with)


def _validate_run_keys(cfg: Config) -> None:
    """Reward weights a weighted sum can use, and the LR schedule's horizon."""
    for i, reward in enumerate(cfg.rewards):
        if not math.isfinite(reward.weight):
            raise ConfigError(f"rewards.{i}.weight must be a finite number, got {reward.weight}")
    if cfg.optim.horizon is not None and cfg.optim.horizon < 1:
        raise ConfigError(f"optim.horizon must be at least 1 (or null for train.max_steps), got {cfg.optim.horizon}")


def _validate_ranges(cfg: Config) -> None:
    """Values that would train on nothing, diverge at the first step or fail only at the final eval."""
    lr, betas = cfg.optim.lr, cfg.optim.betas
    if not (math.isfinite(lr) and lr >= 0):
        raise ConfigError(f"optim.lr must be a finite number >= 0, got {lr}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {betas} (Adam's default: [0.9, 0.999])")
    if not cfg.advantage.eps >= 0:
        raise ConfigError(f"advantage.eps must be >= 0, got {cfg.advantage.eps}")
    for where, value in (("train.dynamic_sampling_max_rounds", cfg.train.dynamic_sampling_max_rounds),
                         ("eval.batch_size", cfg.eval.batch_size),
                         ("eval.samples_per_prompt", cfg.eval.samples_per_prompt)):  # fmt: skip
        if value < 1:
            raise ConfigError(f"{where} must be at least 1, got {value}")
    if cfg.eval.num_prompts < 0:
        raise ConfigError(f"eval.num_prompts must be >= 0 (0: no eval), got {cfg.eval.num_prompts}")
    if cfg.advantage.estimator == "ngrpo" and cfg.advantage.max_reward is None:
        raise ConfigError(
            "advantage.estimator=ngrpo needs advantage.max_reward (the reward of its virtual best sample), "
            "e.g. --set advantage.max_reward=1.0"
        )
    if cfg.rewards and all(r.weight == 0 for r in cfg.rewards):
        raise ConfigError(
            f"every reward has weight 0 ({', '.join(r.name for r in cfg.rewards)}): there is nothing to train on; "
            "give the reward to maximise a weight, e.g. --set rewards.0.weight=1"
        )


# ---------------------------------------------------------------- overrides and files


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` (list items by index: `rewards.0.weight=2`) to raw YAML data."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r} needs the form key.path=value, e.g. train.max_steps=50")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        node = _child(node, key, ".".join(keys[: i + 1]), create=True)
    last = keys[-1]
    if isinstance(node, list):
        index = _index(node, last, path)
        node[index] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {path}: '{'.'.join(keys[:-1])}' is a value, not a section")


def _index(node: list, key: str, path: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"--set {path}: '{key}' is not an index of a list of {len(node)} items")
    return int(key)


def _child(node: Any, key: str, path: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, key, path)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {path}: parent is a value, not a section")
    if key not in node or node[key] is None:
        node[key] = {}
    return node[key]


def config_dir() -> Path:
    """The folder of the shipped YAML configs (mmgrpo.configs)."""
    return Path(str(resources.files("mmgrpo.configs")))


def available_modalities() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML config file; a missing, unreadable, empty or non-mapping file is one ConfigError."""
    path = Path(path)
    if not path.is_file():
        shipped = path.name in available_modalities()
        hint = f" (the shipped config of that name is --modality {path.name})" if shipped else ""
        raise ConfigError(f"config file {str(path)!r} does not exist{hint}")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text: save it as UTF-8") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    if not data and isinstance(data, (dict, type(None))):  # an empty run would silently train the defaults
        raise ConfigError(
            f"config file {str(path)!r} is empty: start from a shipped config (see `mmgrpo list`), "
            "e.g. copy configs/toy.yaml"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def modality_config_path(modality: str) -> Path:
    """The shipped config of a modality name (never a file of the user's: that is --config)."""
    names = available_modalities()
    if modality not in names:
        close = difflib.get_close_matches(modality, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        if Path(modality).suffix in (".yaml", ".yml"):
            hint = " (a YAML file of your own is --config FILE)"
        raise ConfigError(f"unknown modality '{modality}'{hint}; available: {', '.join(names)}")
    return config_dir() / f"{modality}.yaml"


def load_config(source: str | Path | dict | Config | None = None, overrides: list[str] = ()) -> Config:
    """A Config from a modality name, a YAML path, a dict or a Config, with `key=value` overrides.

    A Path always names a file; a string names a file when it ends in .yaml/.yml or exists, else a modality.
    """
    if isinstance(source, Config):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = source
    elif source is None:
        data = {}
    elif isinstance(source, Path) or str(source).endswith((".yaml", ".yml")) or Path(str(source)).is_file():
        data = read_yaml(source)
    else:
        data = read_yaml(modality_config_path(str(source)))
    data = _deepcopy(data)
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(Config, data)


def _deepcopy(data: Any) -> Any:
    return copy.deepcopy(data)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- what a resumed run may change

# How long a run goes on and what it writes, never what it computes: any other key changed on
# resume would make another run under the same name (and a config.yaml that no longer tells it).
RESUMABLE_KEYS = (
    "train.max_steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.gallery_every",
    "train.num_threads",
    "train.log_with",
    "eval.gallery",
    "optim.horizon",
)


def resolve_horizon(cfg: Config) -> Config:
    """cfg (in place) with optim.horizon set: as given, else train.max_steps."""
    if cfg.optim.horizon is None:
        cfg.optim.horizon = cfg.train.max_steps
    return cfg


def resume_config(saved: Config, overrides: list[str] = (), max_steps: int | None = None) -> Config:
    """The config a resumed run goes on with: its saved config plus the changes a run may take mid-way.

    `--set` overrides and `--max-steps` may change RESUMABLE_KEYS only; any other changed key is one
    ConfigError naming it. optim.horizon stays the saved one (for a config.yaml written before the key
    existed: its train.max_steps) unless an override sets it, so extending max_steps keeps the LR curve;
    setting optim.horizon on resume re-shapes the schedule from the resume point on, as asked.
    """
    saved = resolve_horizon(load_config(saved))
    wanted = load_config(saved, list(overrides))
    if max_steps is not None:
        wanted.train.max_steps = max_steps
    if wanted.optim.horizon is None:
        wanted.optim.horizon = saved.optim.horizon
    old, new = _flat(saved.to_dict()), _flat(wanted.to_dict())
    changed = [k for k in dict.fromkeys([*old, *new]) if old.get(k, _ABSENT) != new.get(k, _ABSENT)]
    refused = [k for k in changed if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)]
    if refused:
        raise ConfigError(
            f"--resume cannot change {', '.join(refused)} (the run would no longer be the one its checkpoints "
            f"and metrics record): start a new run with --out; on resume only {', '.join(RESUMABLE_KEYS)} may change"
        )
    return wanted


_ABSENT = object()


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.0.c": leaf} of nested dicts and lists (an empty dict or list is a leaf)."""
    if not isinstance(value, (dict, list)) or not value:
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value)
    out: dict[str, Any] = {}
    for key, child in items:
        out.update(_flat(child, _join(prefix, key)))
    return out
