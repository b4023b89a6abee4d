"""What a hostile but realistic user does to a run, and the one clear line (or the quiet recovery) each gets.

Rewards: unscored rows, weight-0 rewards, non-finite and huge scores, rewards that raise or
return the wrong thing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmgrpo.advantages import compute_advantages, weighted_sum
from mmgrpo.scoring import RewardError, as_scores, score_rollout

GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


# ------------------------------------------------------------------------------- reward values


def test_weight_zero_rewards_do_not_score_rows_the_weighted_ones_could_not():
    headline = [1.0, 0.0, None, 1.0, 0.0, 1.0, 1.0, None]
    logged = [0.5] * 8  # a weight-0 reward that scores everything
    rewards = torch.tensor([[math.nan if h is None else h, lg] for h, lg in zip(headline, logged)], dtype=torch.float64)
    weights = torch.tensor([1.0, 0.0])
    total = weighted_sum(rewards, weights)
    assert torch.isnan(total[[2, 7]]).all() and not torch.isnan(total[[0, 1, 3, 4, 5, 6]]).any()
    adv = compute_advantages(rewards, GROUPS, weights)
    assert adv.advantages[2] == 0 and adv.advantages[7] == 0  # unscored: no push either way
    assert not adv.keep[2] and not adv.keep[7] and int((~adv.valid).sum()) == 2
    alone = compute_advantages(rewards[:, :1], GROUPS, weights[:1])  # the same as without the logged reward
    torch.testing.assert_close(adv.advantages, alone.advantages)


def test_huge_scores_keep_a_gradient_signal():
    rewards = torch.tensor([[1e30], [2e30], [3e30], [4e30], [1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
    adv = compute_advantages(rewards, GROUPS, torch.ones(1))
    assert torch.isfinite(adv.advantages).all() and adv.advantages.dtype == torch.float32
    torch.testing.assert_close(adv.advantages[:4], adv.advantages[4:], atol=1e-3, rtol=0)  # scale-free (eps aside)
    assert adv.advantages[:4].abs().min() > 0.3


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, None])
def test_non_finite_scores_are_unscored(bad):
    scores = as_scores([1.0, bad, 0.5], 3, "r")
    assert scores.dtype == torch.float64 and torch.isnan(scores[1]) and scores[0] == 1.0 and scores[2] == 0.5


def test_scores_accept_lists_tuples_and_1d_tensors_and_arrays():
    for value in ([1, 0.5], (True, 0.0), torch.tensor([1.0, 0.5]), np.array([1.0, 0.5]), [np.float32(1), None]):
        assert as_scores(value, 2, "r").shape == (2,)


@pytest.mark.parametrize(
    "value, message",
    [
        (0.5, r"returned a float \(0.5\), not a list of 2 scores"),
        ("0.5", r"returned a str \(.0.5.\), not a list of 2 scores"),
        ([0.5], "returned 1 scores for 2 samples"),
        (["0.5", 1.0], "returned '0.5' for sample 0: scores must be numbers"),
        (torch.ones(2, 1), r"returned a Tensor of shape \[2, 1\]: return one score per sample \(shape \[2\]\)"),
        (np.float64(0.5), r"returned a float64 of shape \[\]"),
        ({"a": 1}, "returned a dict"),
    ],
)
def test_wrong_reward_returns_are_one_line(value, message):
    with pytest.raises(RewardError, match=message) as info:
        as_scores(value, 2, "r")
    assert "\n" not in str(info.value) and "reward 'r'" in str(info.value)


def test_a_reward_that_raises_is_named_with_its_exception():
    def broken(samples, prompts, **_):
        raise KeyError("boxes")

    with pytest.raises(RewardError, match=r"^reward 'broken' raised KeyError: 'boxes'$") as info:
        score_rollout({"broken": broken}, ["a", "b"], ["p", "q"])
    assert isinstance(info.value.__cause__, KeyError)  # the full traceback stays reachable (--debug)


def test_dict_rewards_are_checked_per_sub_score():
    def sub_scores(samples, prompts, **_):
        return {"score": [1.0, 0.0], "colour": [1.0, math.inf]}

    components, subs = score_rollout({"scene": sub_scores}, ["a", "b"], ["p", "q"])
    assert components.shape == (2, 1) and torch.isnan(subs["scene/colour"][1])
    with pytest.raises(RewardError, match="without the key 'score'"):
        score_rollout({"scene": lambda s, p, **_: {"colour": [1.0, 1.0]}}, ["a", "b"], ["p", "q"])


# ------------------------------------------------------------------------------- prompt files


def test_prompt_files_that_are_not_utf8_or_not_json_are_one_line(tmp_path):
    from mmgrpo.config import ConfigError
    from mmgrpo.data import read_prompt_file

    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("a caf\xe9 on a table\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xe9 at offset 5\): save it as UTF-8"):
        read_prompt_file(latin1)
    broken = tmp_path / "prompts.json"
    broken.write_text('[{"prompt": "a"},')
    with pytest.raises(ConfigError, match=r"prompts.json' is not JSON: .* \(line 1, column 18\)"):
        read_prompt_file(broken)


def test_a_huge_bad_prompt_is_not_echoed_whole():
    from mmgrpo.pipelines.toy import ToyAdapter

    with pytest.raises(ValueError) as info:
        ToyAdapter(max_len=4).sample(["z" * 5_000_000], 2, torch.Generator().manual_seed(0))
    assert len(str(info.value)) < 300 and "5000000 characters" in str(info.value)


# ------------------------------------------------------------------------------- a reward that fails mid-run


def test_a_reward_failing_mid_run_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    from mmgrpo import cli

    monkeypatch.chdir(tmp_path)
    reward = tmp_path / "flaky.py"
    reward.write_text(
        "import os\n"
        "calls = 0\n"
        "def flaky(samples, prompts, **_):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    if calls == 4 and os.environ.get('FLAKY_BREAKS'):\n"  # the before-eval, steps 1 and 2, then step 3
        "        raise ConnectionError('scoring server went away')\n"
        "    return [float(len(s)) for s in samples]\n"
    )
    monkeypatch.setenv("FLAKY_BREAKS", "1")
    argv = ["train", "--modality", "toy", "--out", "run", "--no-progress", "--set", "rewards=[{name: flaky.py:flaky}]",
            "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2", "--set", "train.prompts_per_step=4",
            "--set", "train.group_size=4", "--set", "eval.num_prompts=2", "--set", "eval.primary=flaky"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "mmgrpo: error: reward 'flaky' raised ConnectionError: scoring server went away; "
        "the checkpoint of step 2 is intact: mmgrpo train --resume run continues from it"
    ]
    monkeypatch.delenv("FLAKY_BREAKS")
    assert cli.main(["train", "--resume", "run", "--no-progress"]) == 0
    assert "finished step 4" in capsys.readouterr().out
