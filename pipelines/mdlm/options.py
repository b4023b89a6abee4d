"""MaskedDiffusionAdapter's options (plain values, so they can come from YAML `pipeline.kwargs`) and how the
model and tokenizer are loaded from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mmgrpo.pipelines.mdlm.sampler import REMASKING, block_schedule
from mmgrpo.pipelines.toolkit import not_loadable, parse_dtype

__all__ = ["ESTIMATORS", "LORA_TARGETS", "MDLMOptions", "load_model", "token_id"]

ESTIMATORS = ("d1", "elbo", "bgpo", "trajectory")
# LoRA targets: attention projections of BERT-style encoders and of LLaDA / Dream (whichever exist)
LORA_TARGETS = ("query", "key", "value", "q_proj", "k_proj", "v_proj")


@dataclass
class MDLMOptions:
    """MaskedDiffusionAdapter's options (plain values, so they can come from YAML `pipeline.kwargs`)."""

    model: Any = None  # a folder (or hub id), or a built module mapping input_ids -> logits
    tokenizer: Any = None  # tokenizer object or folder; default: the model's folder
    trust_remote_code: bool = False  # LLaDA / Dream: their modeling code ships with the checkpoint
    shift_logits: bool = False  # Dream: the logits at position i-1 predict token i
    chat_template: bool = False  # wrap each prompt as a user turn of the tokenizer's chat template (LLaDA-Instruct)
    mask_token_id: int | None = None  # default: the tokenizer's mask token
    eos_token_id: int | None = None  # default: the tokenizer's EOS token
    dtype: Any = None  # "float32" (default for a folder), "bfloat16", ... (or a torch.dtype)
    device: Any = None
    gen_length: int = 16  # completion tokens (the canvas' masked part)
    block_length: int | None = None  # semi-autoregressive blocks (default: one block)
    steps: int = 8  # sampler forwards over the whole completion
    temperature: float = 1.0  # 0: greedy
    remasking: str = "low_confidence"
    threshold: float | None = None  # confidence-threshold sampling: commit every token that passes it
    eval_steps: int | None = None
    eval_temperature: float | None = None
    estimator: Literal["d1", "elbo", "bgpo", "trajectory"] = "d1"
    prompt_mask_prob: float = 0.15  # d1: share of prompt tokens masked when scoring
    mc_samples: int = 4  # elbo / bgpo: Monte Carlo samples per row (= T)
    antithetic: bool = False  # elbo / bgpo: MC samples in pairs of levels k and L + 1 - k over one order
    shrinkage: int = 1  # trajectory: consecutive sampler steps merged into one decision
    learn_schedule: bool = False  # Co-GRPO: per-step temperature and unmask fraction drawn and trained (schedule.py)
    schedule_std: float = 0.3  # std of the schedule's Gaussian draws (log-temperature, fraction logit)
    schedule_lr_scale: float = 100.0  # the schedule's means move about lr * this per optimizer step
    finetune: Literal["lora", "full"] = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    keep_reference: bool = True  # full fine-tuning: keep a frozen copy for reference()

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {', '.join(REMASKING)}, got {self.remasking!r}")
        for name in ("temperature", "eval_temperature"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0 <= self.prompt_mask_prob < 1:
            raise ValueError(f"prompt_mask_prob must be in [0, 1), got {self.prompt_mask_prob}")
        if self.mc_samples < 1 or self.shrinkage < 1:
            raise ValueError(f"mc_samples and shrinkage must be >= 1, got {self.mc_samples}, {self.shrinkage}")
        if self.antithetic and self.estimator not in ("elbo", "bgpo"):
            raise ValueError(f"antithetic pairs the ELBO's MC samples: it needs estimator elbo or bgpo, "
                             f"got {self.estimator!r}")  # fmt: skip
        if self.estimator == "trajectory" and (self.threshold is not None or self.temperature == 0):
            raise ValueError("estimator 'trajectory' scores each sampler step at the sampling temperature: it needs "
                             "temperature > 0 and threshold unset (a fixed number of steps)")
        block_schedule(self.gen_length, self.block_length or self.gen_length, self.steps)  # a bad split fails here
        if self.learn_schedule and (self.estimator == "trajectory" or self.threshold is not None
                                    or self.temperature <= 0 or self.eval_steps not in (None, self.steps)):
            raise ValueError("learn_schedule draws each step's temperature and unmask fraction: it needs estimator "
                             "d1, elbo or bgpo, threshold unset, temperature > 0 and eval_steps unset or equal "
                             "to steps")  # fmt: skip
        if self.eval_steps is not None:
            block_schedule(self.gen_length, self.block_length or self.gen_length, self.eval_steps)
        parse_dtype(self.dtype)


def token_id(given: int | None, tokenizer: Any, option: str, name: str) -> int:
    """The id given as option `option`, else the tokenizer's `<name>_token_id` (one error line without either)."""
    value = given if given is not None else getattr(tokenizer, f"{name}_token_id", None)
    if value is None:
        raise ValueError(f"the tokenizer has no {name} token: pass {option}= (the id the model was trained with)")
    return int(value)


def load_model(options: MDLMOptions) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a folder or hub id (masked LM class, or remote code), or as given."""
    model, tokenizer = options.model, options.tokenizer
    if model is None:
        raise ValueError("MaskedDiffusionAdapter needs model=: a model folder (or hub id), or a built module")
    dtype = parse_dtype(options.dtype)
    if isinstance(model, (str, Path)):
        from transformers import AutoModel, AutoModelForMaskedLM

        source = str(model)
        cls = AutoModel if options.trust_remote_code else AutoModelForMaskedLM
        try:
            model = cls.from_pretrained(source, dtype=dtype or torch.float32,
                                        trust_remote_code=options.trust_remote_code)  # fmt: skip
        except (OSError, ValueError) as err:
            raise not_loadable(source, err, "model") from None
        tokenizer = source if tokenizer is None else tokenizer
    elif dtype is not None:
        model = model.to(dtype)
    if tokenizer is None:
        raise ValueError("a built model needs its tokenizer: MaskedDiffusionAdapter(model, tokenizer=...)")
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=options.trust_remote_code)
    return model, tokenizer
