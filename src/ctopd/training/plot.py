"""``ctopd plot RUN_DIR``: PNG curves from ``RUN_DIR/metrics.jsonl``."""

from __future__ import annotations

from pathlib import Path

from ctopd.training.metrics import PHASES, read_metrics

CURVES = {
    "loss": "loss",
    "kl": "reverse-KL estimate",
    "coverage": "coverage (share of student tokens supervised)",
    "eval_accuracy": "evaluation accuracy",
    "response_length_mean": "response length (tokens)",
}


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per logged curve (loss, KL, coverage, eval accuracy, response length) and
    the mean time split of a step.

    Args:
        run_dir: folder with ``metrics.jsonl``.
        out_dir: where PNGs go (default ``RUN_DIR/plots``).

    Returns:
        The PNG paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key, title in CURVES.items():
        points = [
            (r["step"], r[key])
            for r in rows
            if isinstance(r.get(key), (int, float)) and "step" in r
        ]
        if not points:
            continue
        figure, axis = plt.subplots(figsize=(6, 3.5))
        steps, values = zip(*points)
        axis.plot(steps, values, marker="o" if len(points) < 30 else None)
        axis.set_xlabel("step")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        path = out / f"{key}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    seconds = {p: [r[f"time_{p}"] for r in rows if f"time_{p}" in r] for p in PHASES}
    seconds = {p: sum(v) / len(v) for p, v in seconds.items() if v}
    if seconds:
        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.barh(list(seconds), list(seconds.values()))
        axis.set_xlabel("seconds per step (mean)")
        axis.set_title("time split of a step")
        figure.tight_layout()
        path = out / "time_split.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written
