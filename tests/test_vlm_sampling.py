"""VLMAdapter samples from log_softmax(logits / T) restricted to the top-p nucleus, checked against
an independent computation.

The on-policy ratio tests cannot see a wrong sampling distribution: sampling and re-scoring share
`sampling_logits`, so a missing temperature division or a disabled top-p filter changes both
sides alike and the ratio stays 1. Here the reference distribution is computed in the test from
the model's own logits (a plain transformers forward over the processor's inputs, then torch
sort / cumsum), and compared with (1) the log-probs sample() records and log_prob() re-scores,
and (2) the frequencies of many sampled first tokens, within Monte Carlo error.

The tiny random model's next-token distribution is nearly flat (logit std ~0.1), where a wrong
temperature would hardly show; its lm_head is scaled up so that the logits spread over about one
unit and T = 0.5, 1 and 2 give clearly different distributions (total variation 0.25-0.5).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from mmgrpo.pipelines.vlm import VLMAdapter  # noqa: E402
from mmgrpo.pipelines.vlm.tiny import build_tiny_vlm  # noqa: E402

QUESTION = "What is in the image?"
SHARPEN = 10.0  # lm_head scale: logit std ~0.1 -> ~1.1 (T=0.5, top_p=0.8: a nucleus of 28 tokens; T=2, 0.9: 244)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """(model, processor, image) with a peaked next-token distribution, and the reference logits [V] fp64."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "qwen2_vl", family="qwen2_vl")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(SHARPEN)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (28, 28, 3)).astype(np.uint8))
    # the reference forward: the processor's inputs for the chat, the model's plain full forward
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[chat], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].double()  # [V] of the first completion token
    assert logits.std() > 0.8  # peaked enough for temperature to matter
    return model, processor, image, logits


def nucleus_log_probs(logits: torch.Tensor, temperature: float, top_p: float, banned: list[int]) -> torch.Tensor:
    """log_softmax(logits / T) over the nucleus, -inf outside: [V] fp64.

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p. The visual
    placeholder tokens are never sampled (the adapter bans them), so they get no mass.
    """
    scaled = logits.double() / temperature  # [V]
    scaled[banned] = float("-inf")
    probs = scaled.softmax(-1)  # [V]
    ordered, order = probs.sort(descending=True)  # [V]
    size = min(int((ordered.cumsum(0) < top_p).sum()) + 1, len(probs))  # first prefix with mass >= top_p
    keep = order[:size]
    out = torch.full_like(scaled, float("-inf"))  # [V]
    out[keep] = scaled[keep].log_softmax(-1)
    return out


def adapter_for(vlm, temperature: float, top_p: float) -> VLMAdapter:
    model, processor, _, _ = vlm
    return VLMAdapter(model, processor, finetune="full", keep_reference=False, max_new_tokens=1,
                      temperature=temperature, top_p=top_p)  # fmt: skip


def banned_tokens(adapter: VLMAdapter) -> list[int]:
    return [t for t in (adapter.image_token_id, adapter.video_token_id) if t is not None]


@pytest.mark.parametrize("temperature, top_p", [(0.5, 0.8), (2.0, 0.9), (0.7, 1.0), (1.0, 0.6)])
def test_recorded_log_probs_are_the_tempered_nucleus(vlm, temperature, top_p):
    _, _, image, logits = vlm
    adapter = adapter_for(vlm, temperature, top_p)
    reference = nucleus_log_probs(logits, temperature, top_p, banned_tokens(adapter))  # [V]
    rollout = adapter.sample([{"prompt": QUESTION, "image": image}], 64, torch.Generator().manual_seed(0))
    tokens = rollout.extras["completion_ids"][:, 0]  # [64]
    assert torch.isfinite(reference[tokens]).all(), "a token outside the nucleus was sampled"
    expected = reference[tokens].float()  # [64]
    assert torch.allclose(rollout.log_probs[:, 0], expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        assert torch.allclose(adapter.log_prob(rollout)[:, 0], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature, top_p", [(0.5, 0.8), (2.0, 0.9)])
def test_sampled_frequencies_match_the_tempered_nucleus(vlm, temperature, top_p):
    """8000 first tokens (fixed seeds): every token's count within 5 binomial standard deviations
    of its reference probability, none outside the nucleus."""
    _, _, image, logits = vlm
    adapter = adapter_for(vlm, temperature, top_p)
    probs = nucleus_log_probs(logits, temperature, top_p, banned_tokens(adapter)).exp()  # [V]
    generator = torch.Generator().manual_seed(1)
    calls, rows = 8, 1000  # rows of one prompt per call (a KV cache of 1000 rows stays small)
    tokens = torch.cat([
        adapter.sample([{"prompt": QUESTION, "image": image}], rows, generator).extras["completion_ids"][:, 0]
        for _ in range(calls)
    ])  # fmt: skip
    n = calls * rows
    counts = torch.bincount(tokens, minlength=len(probs)).double()  # [V]
    outside = int(counts[probs == 0].sum())
    assert outside == 0, f"{outside} of {n} draws outside the nucleus"
    expected = n * probs  # [V]
    bound = 5 * torch.sqrt(n * probs * (1 - probs)) + 1  # [V]
    excess = (counts - expected).abs() - bound  # [V] > 0: outside the bound
    worst = int(excess.argmax())
    assert float(excess.max()) <= 0, (
        f"token {worst}: {int(counts[worst])} draws, expected {float(expected[worst]):.1f} +- {float(bound[worst]):.1f}"
    )
    # and a pooled check: chi-square over the tokens with expected count >= 5, others pooled
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().view(1)])
    wanted = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = wanted > 0
    chi2 = float(((observed[keep] - wanted[keep]) ** 2 / wanted[keep]).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), f"chi-square {chi2:.1f} with {dof} degrees of freedom"
