"""Model sharding with FSDP2: torch's `fully_shard`, configured and wrapped the accelerate way.

    accelerate launch --config_file configs/accelerate/fsdp2.yaml -m mmgrpo.cli train --config sd3.yaml

`accelerate launch` turns the config file into FSDP_* variables; accelerate's FullyShardedDataParallelPlugin
reads them, and its transformer wrap policy picks the blocks to shard (fsdp_transformer_layer_cls_to_wrap, or
the model's own `_no_split_modules`). `shard_module` then calls torch's `fully_shard` on each such block and on
the module itself, as accelerate's FSDP2 preparation does. Why not `accelerator.prepare(model, optimizer)`:
accelerate enables FSDP only on accelerators (a multi-CPU launch silently runs DDP) and wants to own the
optimizer; calling the same pieces here keeps ONE code path, tested with 2 CPU processes and run on GPUs.

What is sharded: the trained module of the adapter (`Finetuning.model`, LoRA layers included) and, for full
fine-tuning, its frozen reference copy. Frozen towers beside it (text encoders, VAEs) stay replicated.
After sharding, parameters are DTensors: FSDP all-gathers each block's weights for its forward and
reduce-scatters (averages) its gradients in backward, so every process must run the same sequence of
forwards; the trainer and the adapters keep their call counts equal across processes (see trainer.py).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Iterable

import torch

from mmgrpo.config import ConfigError

__all__ = ["fsdp_requested", "shard_module", "is_sharded", "full_tensor", "local_bytes", "on_every_process"]


def fsdp_requested() -> bool:
    """True when the launcher asked for FSDP (accelerate launch with an FSDP config sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_plugin() -> Any:
    """accelerate's FSDP plugin built from the FSDP_* variables of the launch; FSDP version 2 only."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # a fresh one per module: it records the wrap classes it found
    if plugin.fsdp_version != 2:
        raise ConfigError(
            f"the accelerate config asks for FSDP version {plugin.fsdp_version}; mmgrpo shards with FSDP2: set "
            "fsdp_version: 2 in its fsdp_config (configs/accelerate/fsdp2.yaml)"
        )
    return plugin


def shard_module(module: torch.nn.Module, mixed_precision: str = "no") -> torch.nn.Module:
    """Shard `module` in place: each block the wrap policy selects, then the module itself (its leftovers).

    mixed_precision "bf16": blocks compute with bf16 weights and reduce gradients in fp32.
    Returns the same module object (fully_shard changes its class in place), so every reference
    the adapter holds to it stays valid.
    """
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(module, FSDPModule):
        return module
    plugin = fsdp_plugin()
    try:
        plugin.set_auto_wrap_policy(module)
    except ValueError as e:  # a class name of fsdp_transformer_layer_cls_to_wrap this model does not have
        raise ConfigError(f"{e} ({type(module).__name__}): fix fsdp_transformer_layer_cls_to_wrap in the "
                          "accelerate config, or leave it out to use the model's _no_split_modules") from None
    if plugin.activation_checkpointing:
        _enable_checkpointing(module)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, module)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision == "bf16" \
        else MixedPrecisionPolicy()
    kwargs = {"reshard_after_forward": bool(plugin.reshard_after_forward), "mp_policy": mp}
    if policy is not None:
        refs = Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))
        for block in _bottom_up(module):
            if block is module or not policy(block) or isinstance(block, FSDPModule):
                continue
            inside = Counter(id(p) for _, p in block.named_parameters(remove_duplicate=False))
            if any(refs[i] > n for i, n in inside.items()):
                continue  # a weight tied outside the block (input embeddings = output head): left to the root
            fully_shard(block, **kwargs)
    fully_shard(module, mp_policy=mp)  # the root keeps its leftovers gathered between forward and backward
    return module


def _bottom_up(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Every submodule, children before their parents (nested blocks are sharded first)."""
    order: list[torch.nn.Module] = []

    def visit(m: torch.nn.Module) -> None:
        for child in m.children():
            visit(child)
        order.append(m)

    visit(module)
    return order


def _enable_checkpointing(module: torch.nn.Module) -> None:
    """fsdp_activation_checkpointing: the model's own gradient checkpointing (diffusers or transformers)."""
    if hasattr(module, "enable_gradient_checkpointing"):  # diffusers models
        module.enable_gradient_checkpointing()
    elif hasattr(module, "gradient_checkpointing_enable"):  # transformers models
        module.gradient_checkpointing_enable()
    else:
        raise ConfigError(
            f"fsdp_activation_checkpointing is on, but {type(module).__name__} has no gradient checkpointing of its "
            "own: set fsdp_activation_checkpointing: false in the accelerate config"
        )


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (a parameter, gradient or optimizer state of a sharded module)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process for a DTensor (a collective), else itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this process holds for `tensors` (its shard of each DTensor)."""
    total = 0
    for t in tensors:
        local = t.to_local() if is_sharded(t) else t
        total += local.numel() * local.element_size()
    return total


def on_every_process(flag: bool | torch.Tensor, synced: bool, *, any_: bool = False) -> bool:
    """`flag` AND-ed (any_=True: OR-ed) over every process when synced (a collective), else `flag` itself.

    With sharded weights a sampler that stops early (every row ended, nothing left to unmask) must go on
    until every process may stop: each must run as many forwards as the others (transformers' synced_gpus)."""
    value = torch.as_tensor(flag).float().reshape(1)  # [1]
    if synced:
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.MAX if any_ else dist.ReduceOp.MIN)
    return bool(value.item())
