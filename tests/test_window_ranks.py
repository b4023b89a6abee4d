"""Two CPU processes (torchrun, gloo) use the same flow SDE window at every training step, for fixed, random
and sliding windows with dynamic sampling on (issue 19): the window follows the training step and the run
seed, never a process's sampling generator or its count of sample() calls."""

import json
import os
import subprocess
import sys
from pathlib import Path

from mmgrpo.pipelines.flow.window import WindowSpec, window_start

WORKER = Path(__file__).with_name("window_worker.py")
SEED = 3  # the run seed: its random starts at training steps 0, 1, 2 are 2, 0, 2


def test_window_positions_are_identical_across_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(WORKER.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(30500 + os.getpid() % 1000), str(WORKER), str(tmp_path), str(SEED)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"window_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2], "the launcher did not start 2 processes"

    for mode in ("fixed", "random", "sliding"):
        calls = [r["calls"][mode] for r in ranks]
        assert calls[0] == calls[1], f"{mode}: the processes sampled with different windows"
        starts = {}  # training step -> the window start of every sample() call of that step
        for call in calls[0]:
            starts.setdefault(call["step"], set()).add(call["sde_steps"][0])
            assert call["sde_steps"] == [call["sde_steps"][0], call["sde_steps"][0] + 1]
        assert sorted(starts) == [0, 1, 2]
        # dynamic sampling dropped the "red" groups and sampled again: some step made several sample() calls
        assert max(sum(c["step"] == t for c in calls[0]) for t in range(3)) > 1, f"{mode}: one round per step"
        assert all(len(s) == 1 for s in starts.values()), f"{mode}: one step's sample() calls differ: {starts}"
        per_step = [starts[t].pop() for t in range(3)]
        if mode == "fixed":
            assert per_step == [1, 1, 1]
        elif mode == "sliding":
            assert per_step == [0, 1, 2]  # slide_every 1: one sampler step further per training step
        else:
            assert per_step == [window_start(WindowSpec(6, 2, "random"), t, SEED) for t in range(3)]
            assert len(set(per_step)) > 1  # random starts vary over steps
