"""FSDP2 with two CPU processes (torchrun, gloo): the same update as one process, exact resume after a kill,
a consolidated export that one process loads, and sharded checkpoints that refuse what they cannot do.

Each adapter trains 2 steps on 2 prompts x 4 samples (LoRA for the flow families, full fine-tuning with a
sharded reference for the others; KL, gradient clipping and EMA on), with sampling noise drawn per prompt
so one process and two see the same global batch (tests/fsdp_worker.py). Tolerance, fp32: the two runs'
weights differ by under 2e-3 of the norm of the update they made (measured: 2e-7 to 1.5e-6 for most
adapters; 4e-4 for the speech UNet, whose GroupNorm-heavy gradients include entries near zero that Adam's
first steps amplify to +-lr whatever their rounding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmgrpo.checkpoint import CorruptCheckpoint, check_shards, read_trained_weights
from mmgrpo.config import ConfigError

WORKER = Path(__file__).with_name("fsdp_worker.py")
CASES = ["toy", "toy-dynamic", "flow-sd3", "flow-wan", "vlm-qwen2", "flow-speech", "mdlm-d1", "mdlm-d1-mixed", "mdlm-bgpo",
         "mdlm-d1-schedule"]  # mixed: one process scores one prompt length, the other two; dynamic: padding rows
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}


def run_worker(out: Path, cases: list[str], processes: int, *extra: str, expect_rc: int = 0) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    if processes == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        env.update(FSDP_ENV)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(29600 + os.getpid() % 1000), str(WORKER)]
    done = subprocess.run(cmd + [str(out), ",".join(cases), *extra], env=env, capture_output=True, text=True,
                          timeout=600)
    if expect_rc == 0:
        assert done.returncode == 0, done.stderr[-4000:]
    else:
        assert done.returncode != 0, "the run was meant to be killed"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    run_worker(root / "one", CASES, 1)
    run_worker(root / "two", CASES, 2)
    return root


def _sharded_on_both(run: Path) -> None:
    ranks = [json.loads((run / f"world_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2], "the launcher did not start 2 processes"
    assert all(r["sharded"] for r in ranks), "the weights were not sharded"


@pytest.mark.parametrize("case", CASES)
def test_two_sharded_processes_make_the_update_of_one(runs, case):
    one, two = runs / "one" / case, runs / "two" / case
    _sharded_on_both(two)
    init = torch.load(runs / "one" / f"{case}.init.pt")
    w1, w2 = torch.load(one / "weights.pt"), torch.load(two / "weights.pt")
    assert set(w1) == set(w2) == set(init)
    update = torch.cat([(w1[k] - init[k]).flatten() for k in w1])
    diff = torch.cat([(w1[k] - w2[k]).flatten() for k in w1])
    assert update.norm() > 1e-3, "the run did not train: the comparison would prove nothing"
    assert diff.norm() <= 2e-3 * update.norm(), f"{diff.norm():.3e} vs update {update.norm():.3e}"
    losses1, losses2 = (json.loads((d / "losses.json").read_text()) for d in (one, two))
    assert losses2 == pytest.approx(losses1, rel=1e-3, abs=1e-5)
    assert (two / "checkpoints" / "step_000002" / "sharded").is_dir()
    if case == "toy-dynamic":  # one process kept fewer rows than the other and trained on padding
        metrics = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
        assert sum(m["padding_rows"] for m in metrics) > 0


def test_resume_after_a_kill_is_exact_under_fsdp2(tmp_path):
    cases = ["flow-sd3"]  # LoRA on a sharded transformer, sharded EMA and Adam state, the window of step 3
    run_worker(tmp_path / "whole", cases, 2, "--steps", "3")
    # rank 0 dies inside step 3's reward (after the checkpoint of step 2), then the run resumes
    run_worker(tmp_path / "cut", cases, 2, "--steps", "3", "--die-at-step", "3", expect_rc=17)
    for case in cases:
        assert not (tmp_path / "cut" / case / "checkpoints" / "step_000003").exists()
    run_worker(tmp_path / "cut", cases, 2, "--steps", "3", "--resume")
    for case in cases:
        whole, cut = (torch.load(tmp_path / d / case / "weights.pt") for d in ("whole", "cut"))
        for name in whole:
            assert torch.equal(whole[name], cut[name]), (case, name)
        assert json.loads((tmp_path / "cut" / case / "losses.json").read_text())[-1] == pytest.approx(
            json.loads((tmp_path / "whole" / case / "losses.json").read_text())[-1], rel=1e-6, abs=1e-9)


def _score(adapter, rollout, steps=None) -> torch.Tensor:
    out = adapter.log_prob(rollout, steps)
    return (out.log_probs if hasattr(out, "log_probs") else out).detach()


def _exported_adapter(case: str, folder: Path):
    """A fresh adapter of `case` whose model is the exported folder, loaded by its own class in this process
    (flow-sd3: the merged transformer under a fresh LoRA, which adds nothing before training)."""
    if case == "flow-sd3":
        from diffusers import SD3Transformer2DModel

        from mmgrpo.pipelines.flow.adapter import FlowAdapter
        from mmgrpo.pipelines.flow.tiny import TEXT_LEN, tiny_pipeline

        pipe = tiny_pipeline("sd3")
        pipe.transformer = SD3Transformer2DModel.from_pretrained(str(folder))
        return FlowAdapter(pipe, num_steps=4, eval_steps=4, max_sequence_length=TEXT_LEN, lora_rank=4, lora_alpha=8,
                           decode=False, height=16, width=16)
    from mmgrpo.pipelines.mdlm import MaskedDiffusionAdapter

    return MaskedDiffusionAdapter(str(folder), finetune="full", gen_length=6, block_length=3, steps=4, estimator="d1",
                                  mc_samples=3)


@pytest.mark.parametrize("case", ["flow-sd3", "mdlm-d1"])  # LoRA merged into a diffusers model; full FT, transformers
def test_export_loads_in_one_process_and_reproduces_the_log_probs(runs, tmp_path, case):
    from contract_cases import CASES as BUILD
    from mmgrpo.export import export_run

    run = runs / "two" / case
    trained, prompts = BUILD[case]().adapter, BUILD[case]().prompts
    weights = read_trained_weights(run / "checkpoints" / "step_000002")  # assembled from both processes' shards
    with torch.no_grad():
        for name, p in trained.trainable_parameters().items():
            p.copy_(weights[name])
    rollout = trained.sample(prompts[:1], 2, torch.Generator().manual_seed(0))
    expected = _score(trained, rollout)

    folders = export_run(run, tmp_path / case, adapter=BUILD[case]().adapter)
    assert folders[0] == tmp_path / case and (tmp_path / case / "lora").is_dir() == (case == "flow-sd3")
    exported = _exported_adapter(case, tmp_path / case)
    assert torch.allclose(_score(exported, rollout), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, _score(BUILD[case]().adapter, rollout), atol=1e-4), \
        "the trained weights score like the initial ones: the check would prove nothing"


def test_a_sharded_checkpoint_refuses_another_process_count(runs):
    from contract_cases import CASES as BUILD
    from mmgrpo.trainer import train

    case = BUILD["toy"]()
    with pytest.raises(ConfigError, match="written by 2 processes; resume with the same number"):
        train(resume=runs / "two" / "toy", adapter=case.adapter, rewards={"r": case.reward}, prompts=case.prompts,
              progress=False)


def test_a_missing_shard_is_named(runs, tmp_path):
    import shutil

    step = tmp_path / "step_000002"
    shutil.copytree(runs / "two" / "toy" / "checkpoints" / "step_000002", step)
    shards = sorted((step / "sharded").glob("*.safetensors"))
    assert len(shards) == 2  # one file per process
    state = json.loads((step / "trainer.json").read_text())
    assert set(check_shards(step / "sharded", state["optimizer"]["tensors"], state["has_ema"])[0]) == set(
        read_trained_weights(step))
    shards[1].unlink()
    with pytest.raises(CorruptCheckpoint, match="a shard file is missing"):
        read_trained_weights(step)
    shards[0].write_bytes(b"not safetensors")
    with pytest.raises(CorruptCheckpoint, match="not a readable safetensors file"):
        check_shards(step / "sharded", state["optimizer"]["tensors"], state["has_ema"])


def test_a_deepspeed_launch_is_refused_in_one_line(monkeypatch, tmp_path):
    from contract_cases import CASES as BUILD
    from mmgrpo.trainer import train

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    case = BUILD["toy"]()
    with pytest.raises(ConfigError, match="DeepSpeed launches are not supported.*fsdp2.yaml"):
        train({"eval": {"num_prompts": 0}}, adapter=case.adapter, rewards={"r": case.reward}, prompts=case.prompts,
              out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written
