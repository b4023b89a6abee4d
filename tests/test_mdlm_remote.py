"""Remote-code masked-diffusion models (LLaDA, Dream ship their modeling file with the checkpoint).

No download: the test writes a tiny model folder whose modeling file it also writes (a config class and a
bidirectional model with q_proj/k_proj/v_proj, mapped through config.json's auto_map), then loads it
with configs/llada-8b.yaml, only the model path and the mask id changed, the way `mmgrpo train` does.
"""

from __future__ import annotations

import importlib.util
import json
import textwrap

import pytest
import torch

pytest.importorskip("transformers")

from mmgrpo.config import load_config  # noqa: E402
from mmgrpo.pipelines.mdlm.tiny import char_tokenizer  # noqa: E402
from mmgrpo.setup import build_adapter  # noqa: E402

MODELING = textwrap.dedent('''
    import torch
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import MaskedLMOutput


    class TinyDiffusionConfig(PretrainedConfig):
        model_type = "tiny_diffusion"

        def __init__(self, vocab_size=32, hidden_size=16, **kwargs):
            self.vocab_size = vocab_size
            self.hidden_size = hidden_size
            super().__init__(**kwargs)


    class TinyDiffusionModel(PreTrainedModel):
        config_class = TinyDiffusionConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
            self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
            self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
            self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
            self.head = nn.Linear(config.hidden_size, config.vocab_size)
            self.post_init()

        def _init_weights(self, module):
            pass

        def forward(self, input_ids, attention_mask=None, **kwargs):
            h = self.embed(input_ids)
            attention = torch.softmax(self.q_proj(h) @ self.k_proj(h).transpose(1, 2) / 4, dim=-1)  # no causal mask
            return MaskedLMOutput(logits=self.head(h + attention @ self.v_proj(h)))
''')


@pytest.fixture(scope="module")
def remote_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote") / "tiny-llada"
    folder.mkdir()
    (folder / "modeling_tiny_diffusion.py").write_text(MODELING)
    spec = importlib.util.spec_from_file_location("modeling_tiny_diffusion_local", folder / "modeling_tiny_diffusion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = char_tokenizer("0123456789+-*,.:=>SAC")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}>{% endif %}")  # fmt: skip
    torch.manual_seed(0)
    module.TinyDiffusionModel(module.TinyDiffusionConfig(vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_tiny_diffusion.TinyDiffusionConfig",
                          "AutoModel": "modeling_tiny_diffusion.TinyDiffusionModel"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder, tokenizer.mask_token_id


def _llada_config(folder, mask_id, *extra):
    return load_config("llada-8b", [f"pipeline.kwargs.model={folder}", f"pipeline.kwargs.mask_token_id={mask_id}",
                                    "pipeline.kwargs.gen_length=8", "pipeline.kwargs.block_length=4",
                                    "pipeline.kwargs.steps=4", "pipeline.kwargs.dtype=float32",
                                    "pipeline.kwargs.lora_rank=4", *extra])  # fmt: skip


def test_llada_config_loads_a_remote_code_model_and_trains_lora(remote_folder):
    folder, mask_id = remote_folder
    cfg = _llada_config(folder, mask_id)
    assert (cfg.loss.eps_low, cfg.loss.beta, cfg.train.num_iterations, cfg.train.group_size) == (0.5, 0.04, 12, 6)
    assert cfg.pipeline.kwargs["prompt_mask_prob"] == 0.15 and cfg.advantage.scale == "none"
    adapter = build_adapter(cfg)
    assert type(adapter.model).__name__ == "TinyDiffusionModel"  # the folder's own class, not a transformers one
    names = list(adapter.trainable_parameters())
    assert names and all("lora_" in n for n in names)
    assert adapter.encode("A:1+2=").tolist() == adapter.tokenizer("A:1+2=>", add_special_tokens=False)["input_ids"]
    rollout = adapter.sample(["A:1+2=", "C:3,5,7>22="], 3, torch.Generator().manual_seed(0))
    assert rollout.log_probs.shape == (6, 8)
    with torch.no_grad():
        assert torch.equal(adapter.log_prob(rollout).cpu(), rollout.log_probs)
        with adapter.reference():
            assert torch.allclose(adapter.log_prob(rollout).cpu(), rollout.log_probs, atol=1e-6)


def test_remote_code_needs_trust(remote_folder):
    folder, mask_id = remote_folder
    with pytest.raises(Exception, match="trust_remote_code|custom code"):
        build_adapter(_llada_config(folder, mask_id, "pipeline.kwargs.trust_remote_code=false"))
