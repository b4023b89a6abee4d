"""Reward curves from a run's metrics.jsonl, as a PNG."""

from __future__ import annotations

from pathlib import Path


def plot_metrics(metrics_path: str | Path, out_path: str | Path, smooth: int = 5) -> Path:
    """Plot reward/mean and every reward/<name>/mean against step (raw and a running mean), plus loss."""
    import matplotlib

    from mmgrpo.rundir import read_metrics_file

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path, out_path = Path(metrics_path), Path(out_path)
    if not metrics_path.is_file():
        raise FileNotFoundError(f"no metrics file at '{metrics_path}': pass a run directory made by 'mmgrpo train'")
    rows = read_metrics_file(metrics_path)  # drops a torn last line; a bad line before it is a ConfigError
    keys = sorted({k for r in rows for k in r if k.startswith("reward/") and k.endswith("/mean")})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if not points:
            continue
        steps, values = zip(*points)
        line = top.plot(steps, values, alpha=0.3)[0]
        top.plot(steps, _running_mean(values, smooth), color=line.get_color(), label=key)
    top.set_ylabel("reward")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    losses = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    if losses:
        bottom.plot(*zip(*losses), color="gray")
    bottom.set_ylabel("loss")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.suptitle(metrics_path.parent.name)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def _running_mean(values: tuple[float, ...], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out
