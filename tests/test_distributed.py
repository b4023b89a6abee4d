"""Two CPU processes (gloo) make the same update as one process on the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmgrpo.advantages import compute_advantages

WORKER = Path(__file__).with_name("dist_worker.py")


def _run(out, processes, prompts_per_step, group_size):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    if processes == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(29500 + os.getpid() % 1000), str(WORKER)]
    done = subprocess.run(cmd + [str(out), str(prompts_per_step), str(group_size)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "weights.pt"), json.loads((out / "losses.json").read_text())


def _ranks(out):
    ranks = [json.loads((out / f"seeds_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2], "the launcher did not start 2 processes"
    assert set(ranks[0]["seeds"]).isdisjoint(ranks[1]["seeds"]), "both processes drew the same noise"
    return ranks


def test_two_processes_match_one(tmp_path):
    one_w, one_loss = _run(tmp_path / "one", 1, 4, 4)
    two_w, two_loss = _run(tmp_path / "two", 2, 4, 4)
    _ranks(tmp_path / "two")
    assert two_loss == pytest.approx(one_loss, rel=1e-5, abs=1e-7)
    for name in one_w:
        assert torch.allclose(one_w[name], two_w[name], atol=1e-6), name
    assert any(not torch.equal(one_w[n], torch.zeros_like(one_w[n])) for n in one_w)


def test_group_spanning_two_processes_uses_gathered_rewards(tmp_path):
    # 3 prompts x 4 samples over 2 processes: prompt 1's group is split 2 + 2.
    _run(tmp_path / "two", 2, 3, 4)
    first = [r["first_scored"] for r in _ranks(tmp_path / "two")]
    assert first[0]["group_id"] == [0, 0, 0, 0, 1, 1] and first[1]["group_id"] == [1, 1, 2, 2, 2, 2]
    groups = torch.tensor(first[0]["group_id"] + first[1]["group_id"])
    rewards = torch.tensor(first[0]["reward"] + first[1]["reward"])[:, None]
    expected = compute_advantages(rewards, groups, torch.ones(1)).advantages
    got = torch.tensor(first[0]["advantages"] + first[1]["advantages"])
    assert torch.allclose(got, expected, atol=1e-6)
    local_only = compute_advantages(torch.tensor(first[1]["reward"])[:, None], torch.tensor(first[1]["group_id"]), torch.ones(1))
    assert rewards[4:8].std() > 0 and not torch.allclose(got[6:], local_only.advantages)
