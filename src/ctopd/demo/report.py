"""The demo's report: ``results.json``, a Markdown table and a PNG of the curves (both students)."""

from __future__ import annotations

import json
from pathlib import Path

LABELS = {
    "simct": "SimCT OPD",
    "dpca": "DPCA OPD",
    "shared_only": "shared-only OPD",
    "sft": "continued SFT",
    "control_opd": "same-tokenizer OPD",
    "control_sft": "same-tokenizer continued SFT",
}
COLORS = dict(simct="tab:blue", dpca="tab:orange", shared_only="tab:green", sft="tab:gray")
COLORS.update(control_opd="tab:red", control_sft="tab:gray")
COLUMNS = ("method", "lr", "held-out accuracy", "per seed", "gap closed")
COLUMNS += ("held-out KL (nats/token)", "coverage", "coverage of aligned tokens")
COLUMNS += ("non-canonical samples", "seconds per run")


def write_results(out: Path, results: dict) -> Path:
    """``OUT/results.json``, indented."""
    path = Path(out) / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return path


def results_markdown(results: dict) -> str:
    """The results as a Markdown table (also readable as plain text): the teacher, the
    cross-tokenizer student's methods, then the same-tokenizer control's."""
    seeds, settings = results["seeds"], results["settings"]
    accuracy = "held-out accuracy (mean ± std)" if seeds > 1 else "held-out accuracy"
    header = [accuracy if c == "held-out accuracy" else c for c in COLUMNS]
    teacher = [f"{results['teacher_accuracy']:.3f}"] + [""] * 6
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(COLUMNS)]
    lines.append(_row("teacher", "", *teacher, seconds=results["teacher_seconds"]))
    starts = {"student": results, "control": results["controls"]}
    for kind, label, methods in _sections(results):
        lines.append(_start_row(label, starts[kind], results.get(f"{kind}_seconds")))
        lines += [_method_row(LABELS[name], row, seeds) for name, row in methods.items()]
    lines += [
        "",
        f"{seeds} seed(s); every method starts from its warmed-up student (cross-tokenizer: "
        "the student's digit-group tokenizer; same-tokenizer control: the teacher's tokenizer, "
        f"same architecture, warm-up and teacher samples) and runs {settings['method_steps']} "
        f"steps x {settings['method_batch']} prompts at its lr. Accuracy: greedy, exact final "
        f"answer, {settings['num_test']} held-out problems. Gap closed: (accuracy - start) / "
        "(teacher - start), the start being that student's after warm-up. Held-out KL: the "
        "student's reverse KL to the teacher per student token on "
        f"{settings['kl_prompts']} held-out prompts, log π(y) - log q(y) of the same sampled "
        "text, measured the same way for every method and both students. Coverage: share of "
        "the student's sampled tokens that get supervision over all steps (SFT trains on "
        "teacher text, so it has none); of aligned tokens: the same share among tokens outside "
        "unaligned chunks. Non-canonical samples: the share of the KL samples whose token ids "
        "differ from the student tokenizer's own encoding of their text.",
    ]
    if results.get("extra_test") and any(methods for _, _, methods in _sections(results)):
        lines += ["", extra_markdown(results)]
    if settings.get("warmup_target") is not None:
        steps = results.get("warmup_steps", {})
        lines.append(
            f"\nMatched start: each student's warm-up stopped at its first checkpoint (every "
            f"{settings['warmup_check_every']} steps, up to {settings['warmup_steps']}) with "
            f"validation accuracy >= {settings['warmup_target']:g}: the cross-tokenizer student "
            f"after {steps.get('student')} steps, the control after {steps.get('control')}."
        )
    return "\n".join(lines)


def extra_markdown(results: dict) -> str:
    """The final models and the starts on the extra test split: accuracy and gap closed per
    run, greedy and (where measured) sampled."""
    extra, settings = results["extra_test"], results["settings"]
    sampled = "sampled_accuracy" in extra.get("teacher", {})
    temperature = settings.get("sampled_temperature")
    header = "| run | accuracy (mean ± std over seeds) | gap closed |"
    if sampled:
        header += f" sampled accuracy (T = {temperature:g}) | gap closed (sampled) |"
    lines = [
        f"On {settings['num_extra_test']} more held-out problems (the final models):",
        "",
        header,
        "|" + " --- |" * header.count(" | ") + " --- |",
    ]
    rows = [("teacher", extra["teacher"])]
    for kind, label, methods in _sections(results):
        rows += [(label, extra[kind]), *((LABELS[name], row) for name, row in methods.items())]
    for label, row in rows:
        if "outcomes" in row:  # a single model: the teacher or a start
            cells = [f"{row['accuracy']:.3f}", ""]
            if sampled:
                cells += [_fmt(row.get("sampled_accuracy")), ""]
        elif row.get("extra_accuracy_mean") is not None:
            cells = [_mean_std(row, "extra_accuracy"), _fmt(row.get("extra_gap_closed"))]
            if sampled:
                cells += [
                    _mean_std(row, "extra_sampled_accuracy"),
                    _fmt(row.get("extra_sampled_gap_closed")),
                ]
        else:
            continue
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if sampled:
        lines += [
            "",
            f"Accuracy: greedy. Sampled accuracy: one response per problem at temperature "
            f"{temperature:g}, the same sampling seed for every model; it also counts the "
            "probability a model leaves on wrong tokens (ctopd.demo.measure.outcomes). Paired "
            "comparisons with intervals: research/testbed.py.",
        ]
    return "\n".join(lines)


def _sections(results: dict) -> tuple:
    """Per warmed-up student (``student``, then ``control``): its kind, its start's label and
    its method entries by run name (:data:`LABELS`), the control's start figures left out."""
    controls = {k: v for k, v in results["controls"].items() if isinstance(v, dict)}
    return (
        ("student", "student after warm-up", results["methods"]),
        (
            "control",
            "same-tokenizer control after warm-up",
            {f"control_{name}": row for name, row in controls.items()},
        ),
    )


def _mean_std(row: dict, key: str) -> str:
    """``mean ± std`` of a method's ``<key>_mean`` and ``<key>_std`` (``–`` when absent)."""
    if row.get(f"{key}_mean") is None:
        return "–"
    std = row.get(f"{key}_std")
    return f"{row[f'{key}_mean']:.3f}" + ("" if std is None else f" ± {std:.3f}")


def _row(label: str, *cells: str, seconds: float | None) -> str:
    """A table row: ``label``, the eight cells between, and the seconds (blank for ``None``)."""
    return "| " + " | ".join([label, *cells, "" if seconds is None else f"{seconds:.0f}"]) + " |"


def _start_row(label: str, row: dict, seconds) -> str:
    """A warmed-up student's row, from the ``student_start_*`` figures of ``row``."""
    accuracy, kl = row["student_start_accuracy"], row["student_start_kl"]
    noncanonical = _fmt(row.get("student_start_noncanonical"))
    cells = ("", f"{accuracy:.3f}", "", "", f"{kl:.3f}", "", "", noncanonical)
    return _row(label, *cells, seconds=seconds)


def _method_row(label: str, row: dict, seeds: int) -> str:
    mean = f"{row['accuracy_mean']:.3f}"
    if seeds > 1:
        mean += f" ± {row['accuracy_std']:.3f}"
    per_seed = " ".join(f"{r['accuracy']:.3f}" for r in row["runs"])
    cells = [_fmt(row[k]) for k in ("gap_closed", "kl", "coverage")]
    cells += [_fmt(row.get("aligned_coverage")), _fmt(row["noncanonical"])]
    return _row(label, f"{row['lr']:.0e}", mean, per_seed, *cells, seconds=row["seconds"])


def plot_curves(results: dict, path: Path) -> Path:
    """For each student (rows): held-out accuracy and the common held-out KL over steps, mean
    over seeds (band: min-max), the warmed-up student at step 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    titles = {"student": "cross-tokenizer student", "control": "same-tokenizer control"}
    for (kind, _, methods), (left, right) in zip(_sections(results), axes):
        for name, row in methods.items():
            for axis, key in ((left, "accuracy"), (right, "kl")):
                steps, values = _mean_curve(row["runs"], key)
                if steps:
                    _band(axis, steps, values, COLORS[name], LABELS[name])
        left.axhline(
            results["teacher_accuracy"], color="black", linestyle="--", linewidth=1, label="teacher"
        )
        left.set(ylabel="held-out accuracy", title=f"{titles[kind]}: accuracy")
        right.set(ylabel="held-out KL (nats / student token)", title=f"{titles[kind]}: common KL")
    for axis in axes.flat:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    for axis in axes[1]:
        axis.set_xlabel("step")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _mean_curve(runs: list[dict], key: str):
    """Steps every run measured and, per step, the runs' values."""
    curves = [dict(zip(r["curve"]["step"], r["curve"][key])) for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, [[c[s] for c in curves] for s in steps]


def _band(axis, steps, values, color, label) -> None:
    means = [sum(v) / len(v) for v in values]
    axis.plot(
        steps,
        means,
        color=color,
        label=label,
        marker="o" if len(steps) < 15 else None,
        markersize=3,
    )
    if len(values[0]) > 1:
        axis.fill_between(
            steps, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.15
        )


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"
