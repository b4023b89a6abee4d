"""A tiny masked LM built offline: a character tokenizer and a small BertForMaskedLM (bidirectional).

    path = build_tiny_mdlm("/tmp/mdlm")          # random weights, saved with its tokenizer
    AutoModelForMaskedLM.from_pretrained(path); AutoTokenizer.from_pretrained(path)

The tokenizer is a tokenizers WordLevel vocabulary with one token per character (the reasoning tasks'
alphabet by default) and four special tokens [PAD] [UNK] [MASK] [EOS], saved as a PreTrainedTokenizerFast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[MASK]", "[EOS]")


def char_tokenizer(alphabet: str) -> Any:
    """A PreTrainedTokenizerFast with one token per character of `alphabet` (others read as [UNK])."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))
    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   mask_token="[MASK]", eos_token="[EOS]")  # fmt: skip


def tiny_masked_lm(vocab_size: int, *, hidden: int = 128, layers: int = 4, heads: int = 4, max_length: int = 64,
                   seed: int = 0) -> Any:
    """A random BertForMaskedLM (no dropout, eval mode), deterministic in `seed`."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, max_position_embeddings=max_length, type_vocab_size=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return BertForMaskedLM(config).eval()


def build_tiny_mdlm(path: str | Path, alphabet: str | None = None, seed: int = 0, **model_kwargs: Any) -> Path:
    """Save a random tiny masked LM and its character tokenizer to `path`; returns the folder."""
    if alphabet is None:
        from mmgrpo.miniworld.reasoning import ALPHABET as alphabet
    tokenizer = char_tokenizer(alphabet)
    model = tiny_masked_lm(len(tokenizer), seed=seed, **model_kwargs)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
