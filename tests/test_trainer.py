"""The training loop end to end on small CPU runs: run directory, resume, Python API, dynamic sampling.

Tests that only read a finished run share the module's `small_run`; tests that change a run copy it first.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import mmgrpo
from mmgrpo.config import ConfigError
from mmgrpo.protocols import StepScores
from mmgrpo.rollout import Rollout
from mmgrpo.trainer import TIME_KEYS, accumulate_gradients, train

SMALL = [
    "train.max_steps=4",
    "train.prompts_per_step=4",
    "train.group_size=4",
    "train.checkpoint_every=2",
    "eval.num_prompts=4",
    "data.kwargs.num_train=32",
    "data.kwargs.num_eval=4",
]


def _without_time(metrics):
    return [{k: v for k, v in m.items() if k not in TIME_KEYS} for m in metrics]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """The SMALL toy run (4 steps, checkpoints at 2 and 4), trained once for the tests that read it."""
    out = tmp_path_factory.mktemp("small") / "run"
    return train("toy", out=out, overrides=SMALL, progress=False)


@pytest.fixture(scope="module")
def half_run(tmp_path_factory):
    """The SMALL run stopped after its checkpoint at step 2; copy it (`_copy`) before resuming it."""
    out = tmp_path_factory.mktemp("half") / "run"
    return train("toy", out=out, overrides=SMALL + ["train.max_steps=2"], progress=False)


def _copy(run, dest):
    shutil.copytree(run.out_dir, dest)
    return dest


def test_run_directory_layout(small_run):
    result, out = small_run, small_run.out_dir
    assert (out / "config.yaml").is_file()
    assert mmgrpo.load_config(out / "config.yaml").train.max_steps == 4
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    required = {"step", "reward/mean", "reward/sequence_match/mean", "reward/exact_match/mean", "loss", "kl",
                "clip_frac", "frac_zero_std", "grad_norm", "time/sample", "time/reward", "time/train"}
    assert required <= set(metrics[0])
    ev = json.loads((out / "eval.json").read_text())
    assert {"before", "after", "primary"} <= set(ev) and ev["primary"]["reward"] == "sequence_match"
    before, after = (ev[tag]["per_sample"]["sequence_match"] for tag in ("before", "after"))
    n = ev["before"]["num_samples"]
    assert len(before) == len(after) == n and sum(before) / n == pytest.approx(ev["before"]["reward/sequence_match/mean"])
    assert ev["primary"]["paired"]["n"] == n
    assert ev["primary"]["paired"]["mean_diff"] == pytest.approx(ev["primary"]["after"] - ev["primary"]["before"])
    assert (out / "samples" / "before.jsonl").is_file() and (out / "samples" / "after.jsonl").is_file()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_000002", "step_000004"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert (out / "rewards.png").stat().st_size > 1000
    assert result.metrics == metrics


def test_resume_continues_exactly(tmp_path, small_run, half_run):
    straight = small_run
    _copy(half_run, tmp_path / "b")
    # Step 3 runs in the first attempt, then the process dies before the next checkpoint.
    resumed = train(None, resume=tmp_path / "b", max_steps=4, progress=False)
    assert _without_time(resumed.metrics) == _without_time(straight.metrics)
    a = load_file(str(straight.out_dir / "checkpoints" / "step_000004" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step_000004" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_drops_metrics_after_the_checkpoint(tmp_path, half_run):
    _copy(half_run, tmp_path / "b")
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # a step logged by a run that then crashed
        f.write(json.dumps({"step": 3, "reward/mean": 0.0, "loss": 0.0}) + "\n")
    resumed = train(None, resume=tmp_path / "b", max_steps=3, progress=False)
    assert [m["step"] for m in resumed.metrics] == [1, 2, 3]
    assert "grad_norm" in resumed.metrics[-1]


def test_existing_run_directory_is_not_overwritten(small_run):
    before = (small_run.out_dir / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="--resume"):
        train("toy", out=small_run.out_dir, overrides=SMALL, progress=False)
    assert (small_run.out_dir / "metrics.jsonl").read_text() == before


def test_mistyped_adapter_option_stops_before_the_run_directory(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^unknown config key 'pipeline\.kwargs\.hiden' \(did you mean 'pipeline\.kwargs\.hidden'\?\)$"):
        train("toy", out=out, overrides=SMALL + ["pipeline.kwargs.hiden=8"], progress=False)
    with pytest.raises(ConfigError, match=r"pipeline\.kwargs\.hidden must be an integer"):
        train("toy", out=out, overrides=SMALL + ["pipeline.kwargs.hidden=wide"], progress=False)
    with pytest.raises(ConfigError, match=r"^pipeline\.kwargs: .*temperature must be > 0"):
        train("toy", out=out, overrides=SMALL + ["pipeline.kwargs.temperature=0"], progress=False)
    assert not out.exists()


ADAPTER_FILE = """
from dataclasses import dataclass


@dataclass
class WidthOptions:
    width: int = 4


class Optioned:
    Options = WidthOptions

    def __init__(self, **kwargs):
        raise AssertionError("constructed although pipeline.kwargs did not match Options")


class Buggy:  # no Options: a user adapter, built as before; its own TypeError must surface as is
    def __init__(self, width=4):
        len(width)
"""


def test_adapter_options_checked_first_and_constructor_errors_propagate(tmp_path):
    path = tmp_path / "adapters.py"
    path.write_text(textwrap.dedent(ADAPTER_FILE))
    with pytest.raises(ConfigError, match=r"did you mean 'pipeline\.kwargs\.width'"):
        train({"pipeline": {"name": f"{path}:Optioned", "kwargs": {"widht": 2}}}, out=tmp_path / "a", progress=False)
    with pytest.raises(TypeError, match="object of type 'int' has no len"):
        train({"pipeline": {"name": f"{path}:Buggy", "kwargs": {"width": 2}}}, out=tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- a user's own adapter and reward, defined here, through the Python API ----------------------


class ArmsAdapter:
    """A one-decision policy: choose one of 4 arms from learnable logits."""

    def __init__(self):
        self.logits = torch.nn.Parameter(torch.zeros(4))
        self.frozen = self.logits.detach().clone()
        self.use_ref = False

    def sample(self, prompts, group_size, generator, *, evaluate=False):
        rows = [p for p in prompts for _ in range(group_size)]
        logp = torch.log_softmax(self.logits.detach(), -1)
        arms = torch.multinomial(logp.exp(), len(rows), replacement=True, generator=generator)  # [N]
        return Rollout(
            group_id=torch.arange(len(prompts)).repeat_interleave(group_size),
            prompts=rows,
            samples=arms.tolist(),
            log_probs=logp[arms][:, None],
            mask=torch.ones(len(rows), 1, dtype=torch.bool),
            extras={"arms": arms},
        )

    def log_prob(self, rollout, steps=None):
        logits = self.frozen if self.use_ref else self.logits
        return torch.log_softmax(logits, -1)[rollout.extras["arms"]][:, None]

    def trainable_parameters(self):
        return {"logits": self.logits}

    @contextlib.contextmanager
    def reference(self):
        self.use_ref = True
        yield
        self.use_ref = False


class PreferredArm:
    """Reward 1 for the prompt's preferred arm; None (unscored) for arm 3."""

    def __call__(self, samples, prompts, preferred, **_):
        return [None if s == 3 else float(s == p) for s, p in zip(samples, preferred)]


def test_python_api_with_user_adapter_and_reward(tmp_path):
    adapter = ArmsAdapter()
    prompts = [{"prompt": f"p{i}", "preferred": 2} for i in range(4)]
    result = mmgrpo.train(
        {"train": {"max_steps": 30, "prompts_per_step": 4, "group_size": 8}, "optim": {"lr": 0.1},
         "loss": {"beta": 0.01}, "eval": {"num_prompts": 4, "samples_per_prompt": 16}},
        adapter=adapter,
        rewards={"preferred": PreferredArm()},
        prompts=prompts,
        eval_prompts=prompts,
        out=tmp_path / "run",
        progress=False,
    )
    probs = torch.softmax(adapter.logits.detach(), -1)
    assert probs[2] > 0.6, probs
    assert result.eval["after"]["reward/preferred/mean"] > result.eval["before"]["reward/preferred/mean"]
    assert all(m["kl"] is not None and m["kl"] >= 0 for m in result.metrics)
    assert any(m["reward/unscored"] > 0 for m in result.metrics)  # arm 3 rows were left unscored


def test_dynamic_sampling_keeps_only_informative_groups(tmp_path):
    def reward(samples, prompts, easy, **_):  # "easy" prompts score 1 whatever the arm: zero-std groups
        return [1.0 if e else float(s == 2) for s, e in zip(samples, easy)]

    prompts = [{"prompt": f"p{i}", "easy": i % 2 == 0} for i in range(8)]
    result = train(
        {"train": {"max_steps": 3, "prompts_per_step": 4, "group_size": 8, "dynamic_sampling": True,
                   "dynamic_sampling_max_rounds": 4}, "eval": {"num_prompts": 0}},
        adapter=ArmsAdapter(),
        rewards={"r": reward},
        prompts=prompts,
        out=tmp_path / "run",
        progress=False,
    )
    for m in result.metrics:
        assert m["frac_zero_std"] >= 0.25  # half the prompts are easy; each round shows some
        assert m["dynamic/kept_groups"] == 4 and m["dynamic/rounds"] >= 2
        assert m["rows"] == 4 * 8


def test_sequence_ratio_refused_for_stepwise_adapter(tmp_path):
    adapter = ArmsAdapter()  # has no scores_all_steps_at_once attribute
    with pytest.raises(ConfigError, match="GSPO"):
        train({"loss": {"ratio": "sequence"}}, adapter=adapter, rewards=[PreferredArm()],
              prompts=[{"prompt": "x", "preferred": 1}], out=tmp_path / "r", progress=False)


def test_reward_errors_are_clear(tmp_path):
    def wrong_length(samples, prompts, **_):
        return [1.0]

    with pytest.raises(ValueError, match="returned 1 scores for 8 samples"):
        train({"train": {"max_steps": 1, "prompts_per_step": 1}, "eval": {"num_prompts": 0}},
              adapter=ArmsAdapter(), rewards=[wrong_length], prompts=["a"], out=tmp_path / "r", progress=False)

    def no_kwargs(samples, prompts):
        return [1.0] * len(samples)

    with pytest.raises(ConfigError, match=r"\*\*kwargs"):
        train({"train": {"max_steps": 1, "prompts_per_step": 1}, "eval": {"num_prompts": 0}},
              adapter=ArmsAdapter(), rewards=[no_kwargs], prompts=[{"prompt": "a", "answer": 1}],
              out=tmp_path / "r2", progress=False)


def test_ema_weights_used_for_final_eval_and_restored(tmp_path):
    adapter = ArmsAdapter()
    prompts = [{"prompt": "p", "preferred": 1}]
    train({"train": {"max_steps": 5, "prompts_per_step": 1, "group_size": 8}, "optim": {"lr": 0.5, "ema_decay": 0.5},
           "eval": {"num_prompts": 1}},
          adapter=adapter, rewards=[PreferredArm()], prompts=prompts, eval_prompts=prompts, out=tmp_path / "r",
          progress=False)
    ema = load_file(str(tmp_path / "r" / "checkpoints" / "step_000005" / "ema.safetensors"))["logits"]
    live = load_file(str(tmp_path / "r" / "checkpoints" / "step_000005" / "trainable.safetensors"))["logits"]
    assert not torch.equal(ema, live)
    assert torch.equal(adapter.logits.detach(), live)  # the swap for eval was undone


def test_crash_mid_checkpoint_leaves_the_previous_one(tmp_path, small_run):
    from mmgrpo import checkpoint

    out = _copy(small_run, tmp_path / "run")
    root = out / "checkpoints"
    stage = checkpoint.staging_dir(root, 6)  # a write of step 6 that died half way
    stage.mkdir()
    (stage / "trainable.safetensors").write_bytes(b"truncated")
    (stage / "stale.bin").write_bytes(b"x")
    assert checkpoint.latest(root).name == "step_000004"
    result = train(None, resume=out, max_steps=6, progress=False)
    assert [m["step"] for m in result.metrics] == [1, 2, 3, 4, 5, 6]
    assert checkpoint.latest(root).name == "step_000006"
    assert not (root / "step_000006" / "stale.bin").exists()
    assert not stage.exists()
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000004", "step_000006"]  # keep_checkpoints=2


def test_two_runs_in_one_process_with_different_precision(tmp_path, small_run):
    one = small_run
    two = train("toy", out=tmp_path / "b", overrides=SMALL + ["train.max_steps=1", "train.mixed_precision=bf16"],
                progress=False)
    assert one.metrics[0]["ratio/mean"] == 1.0
    assert two.metrics[0]["ratio/mean"] == pytest.approx(1.0, abs=1e-2)  # bf16 sampling and scoring agree


def test_finish_without_per_sample_values_skips_the_interval(tmp_path):
    """A run resumed from a version that did not store per-sample rewards still finishes."""
    from types import SimpleNamespace

    from mmgrpo.rundir import RunDir

    run = RunDir(tmp_path, SimpleNamespace(is_main=True))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    run.write_eval("before", {"reward/r/mean": 0.5})
    run.write_eval("after", {"reward/r/mean": 0.6, "per_sample": {"r": [0.6, 0.6]}})
    run.finish("r")
    primary = json.loads((tmp_path / "eval.json").read_text())["primary"]
    assert primary["relative_gain"] == pytest.approx(0.2) and primary["paired"] is None


# ---- the closed-form KL conventions through accumulate_gradients, with hand-made StepScores ---------

G_NOISE = torch.tensor([0.7, 0.5])  # [S] noise scale g of each SDE step
DT = torch.tensor([0.04, 0.25])  # [S] |sigma_next - sigma|
GAP = 0.3  # policy mean - reference mean, on every latent dim


class GaussianSteps:
    """Two Gaussian decision steps whose mean is the reference's + a learnable shift (GAP); std = g sqrt(|dt|)."""

    def __init__(self, with_step_size=True):
        self.shift = torch.nn.Parameter(torch.tensor(GAP))
        self.with_step_size, self.use_ref = with_step_size, False

    def log_prob(self, rollout, steps=None):
        n, S = len(rollout), len(steps)
        shift = torch.zeros(()) if self.use_ref else self.shift
        mean = torch.zeros(n, S, 3) + shift  # [n, S, D]
        std = (G_NOISE * DT.sqrt())[steps][None, :, None]  # [1, S, 1]
        logp = rollout.log_probs[:, steps] + (shift - shift.detach())  # [n, S] on-policy, with a gradient
        step_size = DT[steps].expand(n, S) if self.with_step_size else None  # [n, S]
        return StepScores(logp, mean, std, step_size)

    def trainable_parameters(self):
        return {"shift": self.shift}

    @contextlib.contextmanager
    def reference(self):
        self.use_ref = True
        yield
        self.use_ref = False


def _gaussian_rollout(n=4):
    return Rollout(group_id=torch.zeros(n, dtype=torch.long), prompts=["p"] * n, samples=[0] * n,
                   log_probs=torch.zeros(n, 2), mask=torch.ones(n, 2, dtype=torch.bool),
                   advantages=torch.zeros(n))


@pytest.mark.parametrize("convention", ["exact", "flow_grpo"])
def test_kl_convention_reaches_the_loss(convention):
    from mmgrpo.config import LossConfig

    stats = accumulate_gradients(GaussianSteps(), _gaussian_rollout(), LossConfig(beta=0.1, kl_convention=convention),
                                 micro_batch_size=2, step_chunk=1)
    per_step = GAP**2 / (2 * G_NOISE**2 * DT) if convention == "exact" else GAP**2 / (2 * G_NOISE**2)  # [S]
    assert stats["kl"] == pytest.approx(per_step.mean().item(), rel=1e-5)  # every row and step is active


def test_flow_grpo_convention_without_step_sizes_is_one_clear_error():
    from mmgrpo.config import LossConfig

    with pytest.raises(ConfigError, match=r"loss\.kl_convention=flow_grpo .*GaussianSteps.* no Gaussian step sizes"):
        accumulate_gradients(GaussianSteps(with_step_size=False), _gaussian_rollout(),
                             LossConfig(beta=0.1, kl_convention="flow_grpo"), micro_batch_size=4)
