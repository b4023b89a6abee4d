"""What every adapter needs and none should copy: fine-tuning modes, the reference policy, device
moves, dtype names, prompt text and strictly checked constructor options.

    self.options = options_from(FlowOptions, kwargs, "FlowAdapter")   # typo -> one line, did-you-mean
    self.tuning = Finetuning(transformer, "lora", lora_rank=32, lora_alpha=64, lora_target_modules=[...])
    class FlowAdapter(TunedAdapter): ...   # trainable_parameters(), reference(), to() from self.tuning

Fine-tuning modes (`Finetuning`):
- "lora": peft LoRA layers on the nn.Linear layers named by `lora_target_modules` (a full module
  name, or its last components: "to_q", "to_out.0"), outside the frozen towers. The LoRA weights
  train in fp32 whatever the base dtype. The reference policy is the same module with its adapters
  disabled, so it costs no memory.
- "full": every weight outside the frozen towers trains; the reference is a frozen deep copy made
  before training (`keep_reference=False` skips the copy when no KL term needs it).
A module that already carries a peft adapter (a PeftModel) is trained as it is.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import torch

from mmgrpo.config import ConfigError, from_dict
from mmgrpo.data import prompt_text

__all__ = [
    "DTYPES", "Finetuning", "TunedAdapter", "logs_kept_unless_failed", "not_loadable", "options_from", "parse_dtype",
    "prompt_text",
]  # fmt: skip

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip
FINETUNE_MODES = ("lora", "full")

Options = TypeVar("Options")


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from its config name ("bfloat16", "bf16", ...); None and dtypes pass through."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}: use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[value]


def options_from(cls: type[Options], kwargs: dict[str, Any], owner: str) -> Options:
    """The options dataclass `cls` built from keyword arguments, checked like every config key.

    An unknown keyword raises mmgrpo.config.ConfigError naming it and the closest valid one
    ("unknown config key 'FlowAdapter.kernal' (did you mean 'FlowAdapter.kernel'?)"); a value of
    the wrong type is one line too.
    """
    return from_dict(cls, dict(kwargs), owner)


def not_loadable(source: str, err: BaseException, option: str) -> ConfigError:
    """One line for a checkpoint that cannot be loaded: a folder without its files, or a hub id neither in
    the local cache nor downloadable (offline, no network, a typo), saying how to point at a local folder.

    option: the pipeline.kwargs key that names the checkpoint ("model", "path").
    """
    reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)[:200]
    if Path(source).is_dir():
        return ConfigError(f"cannot load the model folder {source!r}: {reason}")
    return ConfigError(
        f"cannot load model {source!r}: it is not a local folder, and the Hugging Face hub could not provide it "
        f"({reason}); download it where there is a network, or point the config at a local folder: "
        f"--set pipeline.kwargs.{option}=/local/folder"
    )


@contextmanager
def logs_kept_unless_failed(logger_name: str) -> Iterator[None]:
    """Hold back what `logger_name` logs inside the block: shown when the block succeeds, dropped when it
    raises (a failed checkpoint load is then one error line, not the library's warnings before it)."""
    import logging

    logger = logging.getLogger(logger_name)
    held: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    handlers, propagate = logger.handlers[:], logger.propagate
    hold = Hold()
    logger.handlers, logger.propagate = [hold], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = handlers, propagate
    for record in held:  # reached only when the block succeeded
        logger.handle(record)


def lora_targets(model: torch.nn.Module, targets: Sequence[str], frozen_prefixes: Sequence[str] = ()) -> list[str]:
    """Full names of the nn.Linear layers of `model` that LoRA adapts (peft's name-suffix rule)."""

    def frozen(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in frozen_prefixes)

    def wanted(name: str) -> bool:
        return any(name == t or name.endswith("." + t) for t in targets)

    return sorted(
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and wanted(name) and not frozen(name)
    )  # fmt: skip


class Finetuning:
    """How one module is trained (LoRA or full), and its frozen reference policy.

    model: the module to train (a diffusers transformer, a transformers model, any nn.Module).
    frozen_prefixes: module names whose weights never train and get no LoRA (vision towers).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        finetune: str = "lora",
        *,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: Sequence[str] = (),
        frozen_prefixes: Sequence[str] = (),
        keep_reference: bool = True,
    ) -> None:
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {', '.join(FINETUNE_MODES)}, got {finetune!r}")
        self.finetune = finetune
        self._peft: Any = None  # the PeftModel wrapping `model` (LoRA)
        self._reference_copy: torch.nn.Module | None = None  # frozen weights (full fine-tuning)
        model.eval()  # no dropout: re-scoring must see the same function as sampling
        try:
            from peft import PeftModel
        except ImportError:
            PeftModel = None
        if PeftModel is not None and isinstance(model, PeftModel):  # an adapter the user already attached
            self._peft, self.model = model, model.get_base_model()
        elif finetune == "lora":
            self.model = model
            self._attach_lora(lora_rank, lora_alpha, lora_dropout, lora_target_modules, frozen_prefixes)
        else:
            self.model = model
            for name, param in model.named_parameters():
                param.requires_grad_(not any(name == p or name.startswith(p + ".") for p in frozen_prefixes))
            if keep_reference:  # costs one more copy of the weights
                self._reference_copy = copy.deepcopy(model).requires_grad_(False).eval()
        self.active = self.model
        self.sharded = False  # set by shard(): the weights are DTensors split over the processes

    def _attach_lora(self, rank: int, alpha: float, dropout: float, targets: Sequence[str], frozen: Sequence[str]):
        from peft import LoraConfig, get_peft_model

        names = lora_targets(self.model, targets, frozen)
        if not names:
            raise ValueError(
                f"LoRA found no nn.Linear layers named {sorted(targets)} in {type(self.model).__name__}"
                f"{' outside ' + ', '.join(frozen) if frozen else ''}: set lora_target_modules to layer names of "
                f"this model (e.g. to_q, q_proj)"
            )
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
        with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            self._peft = get_peft_model(self.model, config)  # injects LoRA layers into self.model in place
        for param in self.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # LoRA weights train in fp32 whatever the base dtype
        self.model.eval()

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The weights the optimizer updates: LoRA matrices, or every weight outside the frozen towers."""
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    @contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """Inside, `active` is the reference policy: adapters disabled, or the frozen copy.

        Trainable weights are not modified, and their requires_grad flags are restored after.
        """
        flags = {name: p.requires_grad for name, p in self.model.named_parameters()}
        try:
            if self._peft is not None:
                with self._peft.disable_adapter():
                    yield self.active
            elif self._reference_copy is not None:
                self.active = self._reference_copy
                yield self.active
            else:
                raise RuntimeError(
                    "no reference policy: full fine-tuning was built with keep_reference=False; set "
                    "keep_reference=true (or loss.beta=0, which never runs the reference)"
                )
        finally:
            self.active = self.model
            for name, p in self.model.named_parameters():
                p.requires_grad_(flags[name])

    def shard(self, mixed_precision: str = "no") -> None:
        """Shard the trained module, and the frozen reference copy of full fine-tuning, over the processes
        (FSDP2, mmgrpo.sharding.shard_module; in place, so the adapter's references stay valid)."""
        from mmgrpo.sharding import shard_module

        shard_module(self.model, mixed_precision)
        if self._reference_copy is not None:
            shard_module(self._reference_copy, mixed_precision)
        self.sharded = True

    def export_pretrained(self, folder: str | Path) -> list[Path]:
        """Write the trained model as one folder its own class loads with from_pretrained (diffusers or
        transformers; a plain module gets model.safetensors), LoRA merged into the weights; with LoRA the
        adapter alone goes to folder/lora too (peft's PeftModel.from_pretrained loads it on the base).
        Merging changes this module in place: export from a process that trains no further.
        Returns the folders written."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = [folder]
        model = self.model
        if self._peft is not None:
            self._peft.save_pretrained(str(folder / "lora"))
            written.append(folder / "lora")
            model = self._peft.merge_and_unload()
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(str(folder))
        else:
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        return written

    def to(self, device: str | torch.device) -> "Finetuning":
        self.model.to(device)
        if self._reference_copy is not None:
            self._reference_copy.to(device)
        return self


class TunedAdapter:
    """Adapter protocol methods over `self.tuning` (a Finetuning): the model, weights, reference, device."""

    tuning: Finetuning

    @property
    def model(self) -> torch.nn.Module:
        """The trained module (LoRA layers injected in place)."""
        return self.tuning.model

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return self.tuning.trainable_parameters()

    @contextmanager
    def reference(self) -> Iterator[Any]:
        """The frozen reference policy inside: log_prob scores with it; trainable weights are untouched."""
        with self.tuning.reference():
            yield self

    def shard(self, mixed_precision: str = "no") -> None:
        """Shard the tuned module over the processes (FSDP2; the trainer calls it under an FSDP launch)."""
        self.tuning.shard(mixed_precision)

    def export_pretrained(self, folder: str | Path) -> list[Path]:
        """The trained module as a from_pretrained folder (LoRA merged; see Finetuning.export_pretrained)."""
        return self.tuning.export_pretrained(folder)

    def to(self, device: str | torch.device) -> Any:
        self.tuning.to(device)
        self._moved(torch.device(device))
        return self

    def _moved(self, device: torch.device) -> None:
        """Called after `to(device)`: move or drop what the adapter caches beside the tuned module."""
