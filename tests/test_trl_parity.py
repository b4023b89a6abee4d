"""Parity with TRL: mmgrpo's GRPO losses equal TRL GRPOTrainer's on identical inputs, and the
VLMAdapter's per-token log-probs (and their gradients) equal TRL's on the same model. The last
test (slow: `pytest -m slow`) smoke-runs the benchmark `python -m mmgrpo.bench.vlm_vs_trl --quick` (~30 s).

Loss parity:

Both sides get the SAME per-token log-probs (a leaf tensor we differentiate), old log-probs,
advantages, completion masks and (beta > 0) reference log-probs:

- mmgrpo: `trainer.accumulate_gradients`, the trainer's own loop (aggregation_weights over the
  optimizer step, then per micro-batch policy_loss + beta * kl_penalty(k3), summed and backed),
  with a stub adapter whose `log_prob` returns rows of the leaf (and the reference log-probs
  inside `reference()`).
- TRL: `GRPOTrainer._compute_loss` on a trainer built around a tiny Qwen2 causal LM. The test
  subclass replaces only `_get_per_token_logps_and_entropies` (the model forward) so that it
  returns rows of the same leaf; the loss math that follows is TRL's own, untouched. The
  generation batch of N rows is split into K = gradient_accumulation_steps micro-batches of
  per_device_train_batch_size rows, as TRL's `_prepare_inputs` does, and the K returned
  losses are summed (GRPOTrainer sets `loss_is_scaled_for_ga = True`, so transformers' Trainer
  backpropagates each micro-batch loss as returned and gradients add up).

Mapping of TRL's normalisers onto mmgrpo's (one optimizer step, one process):
  grpo    TRL: per micro-batch mean_rows(sum_t m*l / sum_t m) / K. With K equal micro-batches of
          N/K rows the sum over them is mean over all N rows = mmgrpo grpo (weight m / len / N).
  bnpo    TRL: per micro-batch (sum m*l / sum m) / K = mmgrpo bnpo with micro_batch_size = N/K
          (mean over micro-batches of each one's token mean).
  dr_grpo TRL: per micro-batch sum m*l / (rows * max_completion_length) / K = sum m*l / (N * T):
          mmgrpo dr_grpo with T = the rollout's step budget = TRL's max_completion_length.
  dapo    TRL: sum m*l / (num_items_in_batch / num_processes * K / steps_per_generation);
          steps_per_generation defaults to K and num_items_in_batch counts the active tokens of
          the whole generation batch, so = sum m*l / (active tokens) = mmgrpo dapo.
  GSPO    importance_sampling_level="sequence" <-> loss.ratio="sequence": both use
          exp(masked mean of the row's log-ratios), TRL as [B, 1], mmgrpo broadcast to [B, T].
  clip    TRL epsilon / epsilon_high <-> mmgrpo eps_low / eps_high.
  KL      TRL beta with k3 (exp(ref - logp) - (ref - logp) - 1) <-> mmgrpo beta, kl_estimator k3,
          with TRL's use_bias_correction_kl=False: its default (True, DeepSeek-V3.2) multiplies the
          per-token KL by the (differentiable) importance ratio, which mmgrpo does not do
          (test_trl_default_bias_corrected_kl_differs pins that difference).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

from mmgrpo.config import LossConfig  # noqa: E402
from mmgrpo.rollout import Rollout  # noqa: E402
from mmgrpo.trainer import accumulate_gradients  # noqa: E402

N, T, G, K = 8, 6, 4, 2  # rows (2 prompts x G), completion budget, group size, accumulation steps
EPS_LOW, EPS_HIGH = 0.2, 0.28  # DAPO clip-higher
BETA = 0.04


def make_inputs(seed: int = 5) -> dict[str, torch.Tensor]:
    """Log-probs that clip on both sides, mixed-sign advantages, ragged masks (one empty row)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3 - 0.05  # [N, T]
    logp = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.3  # ratios around 1, many clipped
    ref = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.2
    lengths = torch.tensor([6, 3, 1, 5, 6, 0, 2, 4])  # row 5 has no active token
    mask = torch.arange(T)[None, :] < lengths[:, None]  # [N, T] bool
    advantages = torch.tensor([1.2, -0.7, 0.4, -0.9, -1.1, 0.8, 0.3, -0.5], dtype=torch.float64)  # [N]
    return {
        "logp": logp.float(),
        "old": old.float(),
        "ref": ref.float(),
        "mask": mask,
        "advantages": advantages.float(),
    }


# ------------------------------------------------------------------------------- mmgrpo side


class GivenLogProbs:
    """Stub adapter: log_prob returns rows of a fixed tensor; inside reference(), the ref log-probs."""

    scores_all_steps_at_once = True

    def __init__(self, logp: torch.Tensor, ref: torch.Tensor) -> None:
        self.logp, self.ref, self._in_reference = logp, ref, False

    @contextmanager
    def reference(self):
        self._in_reference = True
        try:
            yield
        finally:
            self._in_reference = False

    def log_prob(self, rollout: Rollout, steps) -> torch.Tensor:
        rows = rollout.extras["row"]  # [m] rows of the full batch
        source = self.ref if self._in_reference else self.logp
        return source[rows][:, list(steps)]  # [m, S]


def mmgrpo_loss(inputs: dict, *, aggregation: str, ratio: str, beta: float) -> tuple[float, torch.Tensor]:
    logp = inputs["logp"].clone().requires_grad_(True)  # [N, T] leaf
    rollout = Rollout(
        group_id=torch.arange(N) // G,
        prompts=["p"] * N,
        samples=["s"] * N,
        log_probs=inputs["old"],
        mask=inputs["mask"],
        extras={"row": torch.arange(N)},
    )
    rollout.advantages = inputs["advantages"]
    cfg = LossConfig(ratio=ratio, eps_low=EPS_LOW, eps_high=EPS_HIGH, aggregation=aggregation, beta=beta,
                     kl_estimator="k3")
    stats = accumulate_gradients(GivenLogProbs(logp, inputs["ref"]), rollout, cfg, micro_batch_size=N // K)
    return stats["loss"], logp.grad


# ------------------------------------------------------------------------------- TRL side


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from mmgrpo.pipelines.vlm.tiny import build_tiny_text_lm

    return build_tiny_text_lm(tmp_path_factory.mktemp("parity") / "lm", num_layers=1)


def trl_trainer(path, tmp_path, *, loss_type: str, level: str, beta: float, **overrides):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    class GivenLogProbsTrainer(GRPOTrainer):
        """Test-only: the per-token log-probs are the rows of a given tensor, not a model forward."""

        given: torch.Tensor  # [N, T]
        rows: torch.Tensor  # [m] rows of the current micro-batch

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
            logps = self.given[self.rows]  # [m, T]
            return logps, torch.zeros_like(logps.detach()), None

    config = dict(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=N // K,
        gradient_accumulation_steps=K,  # steps_per_generation defaults to K: one generation batch of N rows
        num_generations=G,
        max_completion_length=T,
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=beta,
        epsilon=EPS_LOW,
        epsilon_high=EPS_HIGH,
        use_bias_correction_kl=False,  # TRL >= 1.x default multiplies the KL by the ratio; mmgrpo's k3 is plain
        activation_checkpointing=False,  # (GRPOConfig defaults it on; irrelevant here, silences a warning)
        use_cpu=True,
        bf16=False,
        report_to="none",
    )
    args = GRPOConfig(**{**config, **overrides})
    trainer = GivenLogProbsTrainer(
        model=str(path),
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a red circle", "a blue square"] * 4}),
        processing_class=AutoTokenizer.from_pretrained(path),
    )
    assert trainer.args.steps_per_generation == K
    trainer.model.train()  # _compute_loss normalises for accumulation only in train mode
    trainer.current_gradient_accumulation_steps = K  # what transformers' training loop sets per optimizer step
    return trainer


def trl_loss(trainer, inputs: dict) -> tuple[float, torch.Tensor]:
    logp = inputs["logp"].clone().requires_grad_(True)  # [N, T] leaf
    trainer.given = logp
    mask = inputs["mask"].long()
    num_items_in_batch = mask.sum()  # active tokens of the whole generation batch (one process)
    total = 0.0
    m = N // K
    for k in range(K):  # the K micro-batches of one optimizer step
        rows = torch.arange(k * m, (k + 1) * m)
        trainer.rows = rows
        batch = {
            "prompt_ids": torch.ones(m, 3, dtype=torch.long),  # unused: the forward is replaced
            "prompt_mask": torch.ones(m, 3, dtype=torch.long),
            "completion_ids": torch.ones(m, T, dtype=torch.long),
            "completion_mask": mask[rows],
            "advantages": inputs["advantages"][rows],
            "old_per_token_logps": inputs["old"][rows],
            "num_items_in_batch": num_items_in_batch,
        }
        if trainer.beta != 0.0:
            batch["ref_per_token_logps"] = inputs["ref"][rows]
        loss = trainer._compute_loss(trainer.model, batch)
        loss.backward()
        total += loss.item()
    return total, logp.grad


# ------------------------------------------------------------------------------- the cases

CASES = [
    ("grpo", "token"),
    ("bnpo", "token"),
    ("dr_grpo", "token"),
    ("dapo", "token"),
    ("grpo", "sequence"),  # GSPO
]


def test_inputs_exercise_both_clips():
    """The shared inputs clip on both sides with both advantage signs (else parity would be weak)."""
    x = make_inputs()
    ratio = torch.exp(x["logp"] - x["old"])[x["mask"]]
    adv = x["advantages"][:, None].expand(N, T)[x["mask"]]
    assert ((ratio > 1 + EPS_HIGH) & (adv > 0)).any() and ((ratio < 1 - EPS_LOW) & (adv < 0)).any()
    assert ((ratio > 1 + EPS_LOW) & (ratio < 1 + EPS_HIGH) & (adv > 0)).any()  # eps_high != eps_low matters
    m = x["mask"]
    seq = torch.exp(((x["logp"] - x["old"]) * m).sum(-1) / m.sum(-1).clamp(min=1))  # [N] GSPO ratios
    a = x["advantages"]
    assert (m.any(-1) & (((seq > 1 + EPS_HIGH) & (a > 0)) | ((seq < 1 - EPS_LOW) & (a < 0)))).any()
    assert (m.any(-1) & (seq > 1 + EPS_LOW) & (seq < 1 + EPS_HIGH)).any()
    assert not x["mask"][5].any()  # an empty row


@pytest.mark.parametrize("beta", [0.0, BETA], ids=["beta0", "beta-k3"])
@pytest.mark.parametrize("loss_type, level", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_loss_and_gradient_match_trl(tiny_lm, tmp_path, loss_type, level, beta):
    inputs = make_inputs()
    ours, our_grad = mmgrpo_loss(inputs, aggregation=loss_type, ratio=level, beta=beta)
    trainer = trl_trainer(tiny_lm, tmp_path, loss_type=loss_type, level=level, beta=beta)
    theirs, their_grad = trl_loss(trainer, inputs)

    assert abs(ours - theirs) <= 1e-6 * max(1.0, abs(theirs)), (ours, theirs)  # fp32 sums: ~1e-8 seen
    assert our_grad is not None and their_grad is not None and their_grad.abs().sum() > 0
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-6)
    assert (our_grad[~inputs["mask"]] == 0).all()  # padding gets no gradient


def test_parity_is_sensitive_to_the_normaliser(tiny_lm, tmp_path):
    """A wrong mapping is caught: TRL dr_grpo with max_completion_length != T differs from mmgrpo."""
    inputs = make_inputs()
    ours, _ = mmgrpo_loss(inputs, aggregation="dr_grpo", ratio="token", beta=0.0)
    trainer = trl_trainer(tiny_lm, tmp_path, loss_type="dr_grpo", level="token", beta=0.0, max_completion_length=T + 2)
    theirs, _ = trl_loss(trainer, inputs)
    assert abs(ours - theirs) > 1e-3 * abs(ours)


def test_trl_default_bias_corrected_kl_differs(tiny_lm, tmp_path):
    """TRL's default use_bias_correction_kl=True weights the KL by the ratio: not mmgrpo's plain k3.

    Pins why the parity cases switch it off; if TRL changes this default, revisit the mapping.
    """
    from trl import GRPOConfig

    assert GRPOConfig.__dataclass_fields__["use_bias_correction_kl"].default is True
    inputs = make_inputs()
    ours, our_grad = mmgrpo_loss(inputs, aggregation="dapo", ratio="token", beta=BETA)
    trainer = trl_trainer(tiny_lm, tmp_path, loss_type="dapo", level="token", beta=BETA, use_bias_correction_kl=True)
    theirs, their_grad = trl_loss(trainer, inputs)
    assert (our_grad - their_grad).abs().max() > 1e-4


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft asks transformers 5
def test_adapter_log_probs_and_gradients_match_trl(tiny_lm, tmp_path):
    """VLMAdapter.log_prob (each prompt once, completions on its KV cache) equals TRL's per-token
    log-probs (one full forward per row, fused LM head) on the same LoRA model: values and gradients.

    The adapter wraps the trainer's own PeftModel, so both score with the same weights. TRL feeds no
    position_ids (positions shift with left padding; RoPE makes that a rounding-level difference),
    hence ~1e-5 rather than bit-level agreement.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from mmgrpo.pipelines.vlm import VLMAdapter

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    args = GRPOConfig(output_dir=str(tmp_path / "trl-lora"), per_device_train_batch_size=6, num_generations=3,
                      max_completion_length=T, use_cpu=True, bf16=False, report_to="none",
                      activation_checkpointing=False)
    trainer = GRPOTrainer(model=str(tiny_lm), reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_dict({"prompt": ["a"] * 6}),
                          processing_class=AutoTokenizer.from_pretrained(tiny_lm), peft_config=lora)
    with torch.no_grad():  # LoRA B starts at 0: make it non-zero so every LoRA weight gets a gradient
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    adapter = VLMAdapter(trainer.model, AutoTokenizer.from_pretrained(tiny_lm), max_new_tokens=T,
                         eos_token_id=list(range(250, 320)))  # some rows end early
    prompts = ["What colour is it?", "How many shapes are there? Describe the scene."]  # different lengths
    rollout = adapter.sample(prompts, 3, torch.Generator().manual_seed(0))
    mask = rollout.mask  # [n, T]
    assert (~mask).any() and mask.all(-1).any()  # ragged completions

    # TRL's inputs: left-padded prompts, right-padded completions, as _generate_and_score_completions builds them
    pad = adapter.pad_token_id
    prompt_ids = [rollout.shared["prompt_inputs"][k]["input_ids"][0] for k in rollout.extras["prompt_key"]]
    width = max(len(ids) for ids in prompt_ids)
    prompt_batch = torch.stack([torch.cat([torch.full((width - len(ids),), pad), ids]) for ids in prompt_ids])
    prompt_mask = (torch.arange(width)[None, :] >= width - torch.tensor([len(i) for i in prompt_ids])[:, None]).long()
    input_ids = torch.cat([prompt_batch, rollout.extras["completion_ids"]], 1)
    attention_mask = torch.cat([prompt_mask, mask.long()], 1)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1)) * mask  # [n, T]

    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params)
    theirs, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, T)
    (theirs * weights).sum().backward()
    their_grads = {n: p.grad.clone() for n, p in params.items()}
    trainer.model.zero_grad(set_to_none=True)
    ours = adapter.log_prob(rollout)
    (ours * weights).sum().backward()

    torch.testing.assert_close(ours[mask], theirs[mask], rtol=0, atol=2e-5)
    torch.testing.assert_close(ours[mask], rollout.log_probs[mask], rtol=0, atol=2e-6)  # on-policy
    for name, grad in their_grads.items():
        torch.testing.assert_close(params[name].grad, grad, rtol=1e-4, atol=1e-5, msg=name)
    assert max(g.abs().max() for g in their_grads.values()) > 1e-3


@pytest.mark.slow  # ~20 s on two cores: trains both trainers; run with -m slow
def test_benchmark_quick_mode_runs_both_trainers(tmp_path):
    """`python -m mmgrpo.bench.vlm_vs_trl --quick` (~30 s): both trainers train and are measured."""
    from mmgrpo.bench.vlm_vs_trl import main

    table = main(["--quick", "--workdir", str(tmp_path), "--json", str(tmp_path / "bench.json")])
    text = table["text"]
    for trainer in ("mmgrpo", "trl"):
        entry = text[trainer]
        assert "error" not in entry, entry.get("error")
        assert entry["runs"] == 1 and entry["s_per_step"] > 0 and entry["peak_rss_mib"] > 100
        assert entry["chars"] > 0  # completions were sampled and scored
    assert set(text["ratio"]) == {"s_per_step", "cpu_s_per_step", "peak_rss"}
    assert (tmp_path / "bench.json").is_file()
