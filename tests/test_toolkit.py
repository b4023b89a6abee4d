"""The shared adapter toolkit: fine-tuning modes, the reference policy, dtype names, strict options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from mmgrpo.config import ConfigError
from mmgrpo.pipelines.toolkit import Finetuning, TunedAdapter, lora_targets, options_from, parse_dtype, prompt_text


class Tower(torch.nn.Module):
    """A 'vision tower' and a 'decoder', each with a q_proj, to test frozen prefixes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vision = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(4, 4)})
        self.decoder = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(4, 4), "out": torch.nn.Linear(4, 2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder["out"](self.decoder["q_proj"](self.vision["q_proj"](x)))


def _perturb_lora(tuning: Finetuning) -> None:
    with torch.no_grad():
        for name, p in tuning.trainable_parameters().items():
            if "lora_B" in name:
                p.add_(0.5)  # LoRA starts as the identity (B = 0): move it so the reference differs


def test_lora_targets_match_full_names_and_suffixes_outside_frozen_towers():
    model = Tower()
    assert lora_targets(model, ["q_proj"]) == ["decoder.q_proj", "vision.q_proj"]
    assert lora_targets(model, ["q_proj"], frozen_prefixes=["vision"]) == ["decoder.q_proj"]
    assert lora_targets(model, ["decoder.out"]) == ["decoder.out"]
    assert lora_targets(model, ["proj"]) == []  # a suffix is a whole name component, not a substring


def test_lora_trains_only_adapters_and_the_reference_disables_them():
    model = Tower()
    x = torch.randn(3, 4)
    base = model(x).detach()
    tuning = Finetuning(model, "lora", lora_rank=2, lora_alpha=4, lora_target_modules=["q_proj"], frozen_prefixes=["vision"])
    names = set(tuning.trainable_parameters())
    assert names == {"decoder.q_proj.lora_A.default.weight", "decoder.q_proj.lora_B.default.weight"}
    assert all(p.dtype == torch.float32 for p in tuning.trainable_parameters().values())
    _perturb_lora(tuning)
    trained = tuning.active(x)
    assert not torch.allclose(trained, base)
    before = {k: v.detach().clone() for k, v in tuning.trainable_parameters().items()}
    with tuning.reference() as ref:
        torch.testing.assert_close(ref(x), base)  # adapters off: exactly the base model
    torch.testing.assert_close(tuning.active(x), trained)  # and back on
    after = tuning.trainable_parameters()
    assert set(after) == names and all(torch.equal(before[k], after[k]) for k in names)


def test_full_finetuning_keeps_a_frozen_copy_and_skips_frozen_towers():
    model = Tower()
    x = torch.randn(3, 4)
    tuning = Finetuning(model, "full", frozen_prefixes=["vision"])
    assert set(tuning.trainable_parameters()) == {"decoder.q_proj.weight", "decoder.q_proj.bias",
                                                   "decoder.out.weight", "decoder.out.bias"}
    base = model(x).detach()
    with torch.no_grad():
        model.decoder["out"].bias.add_(1.0)  # a training step
    with tuning.reference() as ref:
        assert ref is not model and tuning.active is ref
        torch.testing.assert_close(ref(x), base)
    assert tuning.active is model
    assert all(p.requires_grad for p in tuning.trainable_parameters().values())


def test_full_finetuning_without_reference_says_how_to_get_one():
    tuning = Finetuning(Tower(), "full", keep_reference=False)
    with pytest.raises(RuntimeError, match="keep_reference=true"):
        with tuning.reference():
            pass
    assert tuning.active is tuning.model


def test_bad_modes_and_targets_are_one_clear_error():
    with pytest.raises(ValueError, match="finetune must be one of lora, full"):
        Finetuning(Tower(), "qlora")
    with pytest.raises(ValueError, match="lora_target_modules"):
        Finetuning(Tower(), "lora", lora_target_modules=["to_q"])


def test_tuned_adapter_delegates_to_the_tuning():
    class Adapter(TunedAdapter):
        def __init__(self) -> None:
            self.tuning = Finetuning(Tower(), "full")
            self.moved_to = None

        def _moved(self, device: torch.device) -> None:
            self.moved_to = device

    adapter = Adapter()
    assert adapter.trainable_parameters().keys() == adapter.tuning.trainable_parameters().keys()
    with adapter.reference() as inside:
        assert inside is adapter and adapter.tuning.active is not adapter.tuning.model
    assert adapter.to("cpu") is adapter and adapter.moved_to == torch.device("cpu")


def test_dtype_names():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    assert parse_dtype(None) is None and parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'bfloat'"):
        parse_dtype("bfloat")


def test_options_are_checked_like_config_keys():
    @dataclass
    class Options:
        kernel: Literal["sde", "ode"] = "sde"
        num_steps: int = 10

    assert options_from(Options, {"num_steps": 4}, "Flow") == Options(num_steps=4)
    with pytest.raises(ConfigError, match=r"unknown config key 'Flow.kernal' \(did you mean 'Flow.kernel'\?\)"):
        options_from(Options, {"kernal": "sde"}, "Flow")
    with pytest.raises(ConfigError, match="Flow.num_steps must be an integer"):
        options_from(Options, {"num_steps": "ten"}, "Flow")
    with pytest.raises(ConfigError, match="Flow.kernel = 'odee' is not one of"):
        options_from(Options, {"kernel": "odee"}, "Flow")


def test_prompt_text_is_strict():
    assert prompt_text("a red circle") == "a red circle"
    assert prompt_text({"prompt": "a red circle", "boxes": []}) == "a red circle"
    with pytest.raises(ValueError, match="prompt 3 is a dict without a 'prompt' string"):
        prompt_text({"text": "a red circle"}, 3)
    with pytest.raises(ValueError, match="prompt is a int"):
        prompt_text(42)
