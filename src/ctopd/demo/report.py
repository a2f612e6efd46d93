"""The demo's report: ``results.json``, a Markdown table and a PNG of the curves."""

from __future__ import annotations

import json
from pathlib import Path

LABELS = {"simct": "SimCT OPD", "dpca": "DPCA OPD", "shared_only": "shared-only OPD",
          "sft": "continued SFT"}
COLORS = {"simct": "tab:blue", "dpca": "tab:orange", "shared_only": "tab:green",
          "sft": "tab:gray"}


def write_results(out: Path, results: dict) -> Path:
    """``OUT/results.json``, indented."""
    path = Path(out) / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return path


def results_markdown(results: dict) -> str:
    """The results as a Markdown table (also readable as plain text)."""
    seeds = results["seeds"]
    accuracy = "accuracy (mean ± std)" if seeds > 1 else "accuracy"
    lines = [
        f"| method | held-out {accuracy} | per seed | coverage | coverage of aligned tokens "
        f"| KL (nats/token) | non-canonical samples | objective's own KL | seconds per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| teacher | {results['teacher_accuracy']:.3f} | | | | | | | "
        f"{results['teacher_seconds']:.0f} |",
        f"| student after warm-up | {results['student_start_accuracy']:.3f} | | | | "
        f"{results['student_start_kl']:.3f} | {_fmt(results.get('student_start_noncanonical'))} "
        f"| | {results['student_seconds']:.0f} |",
    ]
    for method, row in results["methods"].items():
        mean = f"{row['accuracy_mean']:.3f}"
        if seeds > 1:
            mean += f" ± {row['accuracy_std']:.3f}"
        per_seed = " ".join(f"{r['accuracy']:.3f}" for r in row["runs"])
        lines.append(f"| {LABELS.get(method, method)} | {mean} | {per_seed} | "
                     f"{_fmt(row['coverage'])} | {_fmt(row.get('aligned_coverage'))} | "
                     f"{_fmt(row['kl'])} | {_fmt(row.get('noncanonical'))} | "
                     f"{_fmt(row['train_kl'])} | "
                     f"{row['seconds']:.0f} |")
    settings = results["settings"]
    lines += [
        "",
        f"{seeds} seed(s); every method starts from the same warmed-up student and runs "
        f"{settings['method_steps']} steps x {settings['method_batch']} prompts. Accuracy: "
        f"greedy, exact final answer, {settings['num_test']} held-out problems. Coverage: share "
        "of the student's sampled tokens that get supervision over all steps (SFT trains on "
        "teacher text, so it has none); of aligned tokens: the same share among tokens outside "
        "unaligned chunks (bytes that differ, e.g. invalid UTF-8 the student sampled). KL: the student's reverse KL to the teacher per student token on "
        f"{settings['kl_prompts']} held-out prompts, measured the same way for every method; "
        "non-canonical samples: the share of those samples whose token ids differ from the "
        "student tokenizer's own encoding of their text; the objective's own KL is over its own "
        "supervision space and not comparable across methods.",
    ]
    return "\n".join(lines)


def plot_curves(results: dict, path: Path) -> Path:
    """Held-out accuracy and the objectives' KL over steps, mean over seeds (band: min-max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    start = results["student_start_accuracy"]
    for method, row in results["methods"].items():
        color, label = COLORS.get(method), LABELS.get(method, method)
        steps, values = _mean_curve(row["runs"], "step", "accuracy")
        if steps:
            steps, values = [0, *steps], [[start] * len(values[0]), *values]
            _band(left, steps, values, color, label)
        steps, values = _mean_curve(row["runs"], "train_kl_step", "train_kl")
        if steps:
            _band(right, steps, values, color, label)
    left.axhline(results["teacher_accuracy"], color="black", linestyle="--", linewidth=1,
                 label="teacher")
    left.set(xlabel="step", ylabel="held-out accuracy", title="accuracy")
    right.set(xlabel="step", ylabel="KL (objective's own estimate)",
              title="KL over the supervised tokens")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _mean_curve(runs: list[dict], step_key: str, value_key: str):
    """Steps every run logged and, per step, the runs' values."""
    curves = [dict(zip(r["curve"][step_key], r["curve"][value_key])) for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, [[c[s] for c in curves] for s in steps]


def _band(axis, steps, values, color, label) -> None:
    means = [sum(v) / len(v) for v in values]
    axis.plot(steps, means, color=color, label=label, marker="o" if len(steps) < 15 else None,
              markersize=3)
    if len(values[0]) > 1:
        axis.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                          color=color, alpha=0.15)


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"
