"""mmgrpo: group-relative policy optimization across modalities.

    import mmgrpo
    result = mmgrpo.train("toy", max_steps=50)                 # a shipped modality config
    result = mmgrpo.train(cfg, adapter=my_adapter, rewards={"mine": my_reward}, prompts=my_prompts)

`import mmgrpo` is light: torch and the trainer load on first use of the names below.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["train", "load_config", "Config", "ConfigError", "Rollout", "Adapter", "Reward", "StepScores"]

_LAZY = {
    "train": "mmgrpo.trainer",
    "RunResult": "mmgrpo.rundir",
    "load_config": "mmgrpo.config",
    "Config": "mmgrpo.config",
    "ConfigError": "mmgrpo.config",
    "Rollout": "mmgrpo.rollout",
    "Adapter": "mmgrpo.protocols",
    "Reward": "mmgrpo.protocols",
    "StepScores": "mmgrpo.protocols",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmgrpo' has no attribute {name!r}")
