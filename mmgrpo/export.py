"""`mmgrpo export RUN_DIR --out FOLDER`: a run's trained model as one folder that from_pretrained loads.

    export_run("runs/sd3-...", "exported/")     # the latest checkpoint; sharded or not, one process
    SD3Transformer2DModel.from_pretrained("exported/")

The adapter is built as training built it (the run's config.yaml, or the `adapter` given), the
checkpoint's weights are loaded into it (assembled from every process's shards when the run was
sharded with FSDP2; the EMA weights with ema=True), and the trained module is written by its own
class's save_pretrained with LoRA merged (the LoRA adapter alone goes to FOLDER/lora as well).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmgrpo import checkpoint
from mmgrpo.config import ConfigError, load_config
from mmgrpo.protocols import Adapter
from mmgrpo.rundir import is_run


def export_run(run_dir: str | Path, out: str | Path, *, checkpoint_name: str | None = None, ema: bool = False,
               adapter: Adapter | None = None) -> list[Path]:
    """Write the trained model of `run_dir` into `out`; returns the folders written."""
    from mmgrpo.demo.policies import apply_weights, find_checkpoint
    from mmgrpo.setup import build_adapter

    run_dir, out = Path(run_dir), Path(out)
    if not is_run(run_dir):
        raise ConfigError(f"'{run_dir}' is not a run directory (it has no config.yaml and metrics.jsonl)")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out '{out}' is not empty: give a new or empty folder")
    folder = find_checkpoint(run_dir / "checkpoints", checkpoint_name)
    try:
        weights = checkpoint.read_trained_weights(folder, ema=ema)
    except checkpoint.CorruptCheckpoint as e:
        raise ConfigError(f"checkpoint {folder} is damaged: {e}") from None
    if adapter is None:
        cfg = load_config(run_dir / "config.yaml")
        torch.manual_seed(cfg.train.seed)  # as training does before building (the initial weights)
        adapter = build_adapter(cfg)
    if not hasattr(adapter, "export_pretrained"):
        raise ConfigError(f"{type(adapter).__name__} has no export_pretrained(folder): export its weights from "
                          f"{folder} yourself (checkpoint.read_trained_weights)")
    apply_weights(adapter, weights, folder)
    return adapter.export_pretrained(out)
