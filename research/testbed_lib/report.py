"""The testbed's tables beyond ``ctopd demo``'s: the paired comparisons between runs on the extra
test split (:func:`comparisons`, :func:`comparisons_markdown`) and the sweep's, the
calibration's and the ablation's tables."""

from __future__ import annotations

from ctopd.demo.report import LABELS

# The paired comparisons the report makes (run names), where both ran: each cross-tokenizer
# on-policy method against continued SFT and shared-only OPD (the baselines it must beat), SimCT
# against DPCA, and the control's OPD against its SFT.
COMPARISONS = (
    ("simct", "sft"),
    ("dpca", "sft"),
    ("simct", "shared_only"),
    ("dpca", "shared_only"),
    ("simct", "dpca"),
    ("control_opd", "control_sft"),
)


def comparisons(extra: dict, runs: list[dict]) -> list[dict]:
    """Paired comparisons on the extra test split (:mod:`testbed_lib.compare`): for each pair of
    :data:`COMPARISONS` that ran, the difference of mean greedy accuracy with its 95% interval
    at every step both measured; and, at the last step, for each cross-tokenizer run, the share
    of its gap closed as a fraction of the same-tokenizer OPD's (the starts and the teacher
    resampled with it). Then the same two kinds at the last step for the sampled accuracy,
    where the runs and the starts have sampled outcomes.

    Returns:
        rows of ``kind`` (``difference`` or ``gap_fraction``), ``metric`` (``greedy`` or
        ``sampled``), ``a``, ``b`` (run names), ``step``, ``value``, ``low``, ``high``,
        ``above_zero``, ``problems``, ``draws``; empty without extra test outcomes.
    """
    by_step: dict[str, dict[int, list[str]]] = {}
    sampled: dict[str, dict[int, list[str]]] = {}
    for run in sorted(runs, key=lambda r: r["seed"]):
        curve = run.get("curve", {})
        for step, text in zip(curve.get("extra_step", []), curve.get("extra_outcomes", [])):
            by_step.setdefault(run["name"], {}).setdefault(step, []).append(text)
        if run.get("extra_sampled_outcomes") and curve.get("extra_step"):
            sampled.setdefault(run["name"], {}).setdefault(max(curve["extra_step"]), []).append(
                run["extra_sampled_outcomes"]
            )
    if not extra or not by_step:
        return []
    rows = _comparison_rows(by_step, {k: row["outcomes"] for k, row in extra.items()}, "greedy")
    if sampled and all("sampled_outcomes" in row for row in extra.values()):
        rows += _comparison_rows(
            sampled, {k: row["sampled_outcomes"] for k, row in extra.items()}, "sampled"
        )
    return rows


def _comparison_rows(
    by_step: dict[str, dict[int, list[str]]], starts: dict[str, str], metric: str
) -> list[dict]:
    """:func:`comparisons`' rows for one metric: ``by_step`` maps a run name to its seeds'
    outcome strings at each step, ``starts`` the teacher's and the students' to theirs."""
    from .compare import difference, gap_fraction_ratio, outcome_matrix

    matrix = {
        name: {step: outcome_matrix(texts) for step, texts in steps.items()}
        for name, steps in by_step.items()
    }
    start = {key: outcome_matrix([text]) for key, text in starts.items()}
    rows = []
    for a, b in COMPARISONS:
        if a in matrix and b in matrix:
            for step in sorted(set(matrix[a]) & set(matrix[b])):
                rows.append(
                    {
                        "kind": "difference",
                        "metric": metric,
                        "a": a,
                        "b": b,
                        "step": step,
                        **difference(matrix[a][step], matrix[b][step]),
                    }
                )
    if "control_opd" in matrix:
        control_step = max(matrix["control_opd"])
        for name in ("simct", "dpca", "shared_only", "sft"):
            if name in matrix:
                step = max(matrix[name])
                rows.append(
                    {
                        "kind": "gap_fraction",
                        "metric": metric,
                        "a": name,
                        "b": "control_opd",
                        "step": step,
                        **gap_fraction_ratio(
                            matrix[name][step],
                            start["student"],
                            matrix["control_opd"][control_step],
                            start["control"],
                            start["teacher"],
                        ),
                    }
                )
    return rows


def comparisons_markdown(results: dict) -> str:
    """The paired comparisons of ``results["comparisons"]`` at the last step, with their
    intervals, then the greedy differences by step."""
    extra, settings = results["extra_test"], results["settings"]
    sampled = "sampled_accuracy" in extra.get("teacher", {})
    temperature = settings.get("sampled_temperature")
    lines = []
    final = max(row["step"] for row in results["comparisons"])
    lines += [
        f"At the end (step {final}):",
        "",
        "| comparison | value | 95% interval | resamples above 0 |",
        "| --- | --- | --- | --- |",
    ]
    for row in results["comparisons"]:
        if row["step"] != final:
            continue
        a, b = LABELS.get(row["a"], row["a"]), LABELS.get(row["b"], row["b"])
        metric = row.get("metric", "greedy")
        if row["kind"] == "difference":
            label = f"{a} − {b} ({'sampled ' if metric == 'sampled' else ''}accuracy)"
            value, low, high = (
                None if row[k] is None else f"{row[k]:+.3f}" for k in ("value", "low", "high")
            )
        else:
            label = f"{a}: gap closed / {b}'s" + (" (sampled)" if metric == "sampled" else "")
            value, low, high = (
                None if row[k] is None else f"{row[k]:.2f}" for k in ("value", "low", "high")
            )
        interval = "–" if low is None else f"[{low}, {high}]"
        lines.append(f"| {label} | {value or '–'} | {interval} | {_fmt(row['above_zero'])} |")
    lines += ["", *_differences_by_step(results["comparisons"])]
    draws = results["comparisons"][0]["draws"]
    lines += [
        "",
        f"Intervals: 95%, {draws} bootstrap resamples of the problems (one draw for "
        "every run, so differences are paired) plus each method's seed-to-seed spread "
        "(research/testbed_lib/compare.py); resamples above 0: the share of resamples in which the "
        "value is positive.",
    ]
    if sampled:
        lines[-1] += (
            f" Accuracy: greedy. Sampled accuracy: one response per problem at "
            f"temperature {temperature:g}, the same sampling seed for every model; it "
            "also counts the probability a model leaves on wrong tokens, which "
            "on-policy reverse KL penalises and SFT barely does "
            "(ctopd.demo.measure.outcomes)."
        )
    return "\n".join(lines)


def _differences_by_step(rows: list[dict]) -> list[str]:
    """The accuracy differences at every measured step: one line per comparison, one column
    per step, each cell the difference and its interval."""
    rows = [r for r in rows if r.get("metric", "greedy") == "greedy"]
    steps = sorted({r["step"] for r in rows if r["kind"] == "difference"})
    pairs = list(dict.fromkeys((r["a"], r["b"]) for r in rows if r["kind"] == "difference"))
    if len(steps) < 2:
        return []
    cell = {(r["a"], r["b"], r["step"]): r for r in rows if r["kind"] == "difference"}
    lines = [
        "Accuracy differences by step:",
        "",
        "| comparison | " + " | ".join(f"step {s}" for s in steps) + " |",
        "| --- |" + " --- |" * len(steps),
    ]
    for a, b in pairs:
        cells = []
        for step in steps:
            row = cell.get((a, b, step))
            cells.append(
                ""
                if row is None or row["value"] is None
                else f"{row['value']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"
            )
        lines.append(f"| {LABELS.get(a, a)} − {LABELS.get(b, b)} | " + " | ".join(cells) + " |")
    return lines


def sweep_markdown(sweep: dict) -> str:
    """The sweep as a Markdown table: one row per run name and learning rate, the chosen one
    in bold, then the command that reproduces it."""
    extra = any(row.get("extra_accuracy") is not None for row in sweep["rows"])
    count = sweep.get("num_extra_validation")
    lines = [
        "| method | lr | validation accuracy | "
        + (f"extra validation accuracy ({count} problems) | " if extra else "")
        + "validation KL (nats/token) | seconds | chosen |",
        "| --- | --- | --- | " + ("--- | " if extra else "") + "--- | --- | --- |",
    ]
    for kind, start in sweep.get("starts", {}).items():
        label = "same-tokenizer control" if kind == "control" else "cross-tokenizer student"
        lines.append(
            f"| {label} after warm-up (start) | | {start['accuracy']:.3f} "
            + ("| " if extra else "")
            + f"| {start['kl']:.3f} | | |"
        )
    for row in sweep["rows"]:
        chosen = sweep["best"][row["name"]] == row["lr"]
        cells = [f"{row['accuracy']:.3f}"]
        if extra:
            cells.append(
                "-" if row.get("extra_accuracy") is None else f"{row['extra_accuracy']:.3f}"
            )
        if chosen:
            cells[-1] = f"**{cells[-1]}**"
        lines.append(
            f"| {LABELS.get(row['name'], row['name'])} | {row['lr']:.0e} | "
            + " | ".join(cells)
            + f" | {row['kl']:.3f} | {row['seconds']:.0f} | {'yes' if chosen else ''} |"
        )
    commit = f" at commit `{sweep['commit']}`" if sweep.get("commit") else ""
    scored = (
        f"accuracy (greedy, exact final answer) and KL on the {sweep['num_validation']} "
        f"validation problems and accuracy on the {count} extra validation problems, "
        "disjoint from the training and test sets. Chosen: the highest extra validation "
        "accuracy"
        if extra
        else f"accuracy (greedy, exact final answer) and KL on the {sweep['num_validation']} "
        "validation problems, disjoint from the training and test sets. Chosen: the "
        "highest validation accuracy"
    )
    lines += [
        "",
        f"One seed, {sweep['steps']} steps x {sweep['batch']} prompts per run from the "
        f"warmed-up students; {scored} (ties: the lower KL). Reproduce with "
        f"`{sweep['command']}`{commit}.",
    ]
    return "\n".join(lines)


def calibration_markdown(calibration: dict) -> str:
    """The budget calibration as a Markdown table: one row per budget (the control's OPD and
    SFT, mean ± std and per seed, and OPD − SFT with its 95% interval), the chosen one in bold,
    then what it was scored on and the command that reproduces it."""
    lines = _calibration_table(calibration, "", calibration["best"])
    starts = calibration.get("starts", {})
    commit = f" at commit `{calibration['commit']}`" if calibration.get("commit") else ""
    lrs = ", ".join(f"{LABELS.get(k, k)} {v:.0e}" for k, v in calibration.get("lrs", {}).items())
    lines += [
        "",
        f"The same-tokenizer control only, {calibration['seeds']} seeds per budget, "
        f"{calibration['batch']} prompts per step ({lrs}), each run's rate decayed to 0 over "
        f"its budget; greedy exact-answer accuracy on the {calibration['num_extra_validation']} "
        "extra validation problems, disjoint from the training, validation and test sets"
        + (
            f" (the warmed-up control scores {starts['control']:.3f}, the teacher "
            f"{starts['teacher']:.3f})"
            if starts
            else ""
        )
        + ". Chosen: the budget whose paired interval has the highest lower end (ties: the "
        f"longer one); {_verdict(calibration['separates'])}.",
    ]
    if calibration.get("best_sampled") is not None:
        starts = calibration.get("sampled_starts", {})
        lines += [
            "",
            f"Sampled accuracy (one response per problem at temperature "
            f"{calibration['sampled_temperature']:g}, the same sampling seed for every "
            "model), the same runs:",
            "",
            *_calibration_table(calibration, "sampled_", calibration["best_sampled"]),
            "",
            "The warmed-up control scores "
            f"{starts.get('control', float('nan')):.3f} sampled, the teacher "
            f"{starts.get('teacher', float('nan')):.3f}; chosen as above; "
            f"{_verdict(calibration['separates_sampled'])}.",
        ]
    lines += ["", f"Reproduce with `{calibration['command']}`{commit}."]
    return "\n".join(lines)


def _calibration_table(calibration: dict, prefix: str, best: int) -> list[str]:
    """The calibration's rows for one accuracy (``prefix``: ``""`` greedy, ``"sampled_"``)."""
    lines = [
        "| steps | same-tokenizer OPD | per seed | same-tokenizer SFT | per seed "
        "| OPD − SFT [95% interval] | chosen |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for steps, entry in calibration["budgets"].items():
        opd, sft = entry[prefix + "opd"], entry[prefix + "sft"]
        diff = entry[prefix + "difference"]
        chosen = int(steps) == best
        gap = f"{diff['value']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]"
        lines.append(
            f"| {steps} | {opd['mean']:.3f} ± {opd['std']:.3f} "
            f"| {' '.join(f'{a:.3f}' for a in opd['seeds'])} "
            f"| {sft['mean']:.3f} ± {sft['std']:.3f} "
            f"| {' '.join(f'{a:.3f}' for a in sft['seeds'])} "
            f"| {f'**{gap}**' if chosen else gap} | {'yes' if chosen else ''} |"
        )
    return lines


def _verdict(separates: bool) -> str:
    return (
        "its interval lies above zero"
        if separates
        else "**no budget's interval lies above zero: this testbed cannot rank an on-policy "
        "method above SFT**"
    )


def ablation_markdown(ablation: dict) -> str:
    """SimCT's supervision spaces on the validation split: one row per space (mean ± std over
    seeds, per seed, KL, coverage), the best in bold, then the command that reproduces it."""
    lines = [
        "| SimCT space | validation accuracy (mean ± std) | per seed | validation KL "
        "(nats/token) | coverage |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, space in ablation["spaces"].items():
        mean = f"{space['accuracy_mean']:.3f} ± {space['accuracy_std']:.3f}"
        if label == ablation["best"]:
            mean = f"**{mean}**"
        seeds = " ".join(f"{r['accuracy']:.3f}" for r in ablation["rows"] if r["space"] == label)
        lines.append(
            f"| {label} | {mean} | {seeds} | {space['kl']:.3f} | {space['coverage']:.3f} |"
        )
    commit = f" at commit `{ablation['commit']}`" if ablation.get("commit") else ""
    lines += [
        "",
        f"{ablation['seeds']} seed(s), {ablation['steps']} steps x {ablation['batch']} prompts "
        f"per run from the warmed-up cross-tokenizer student (validation accuracy "
        f"{ablation['student_start_accuracy']:.3f} before training), lr "
        f"{ablation['lr']:g}; {ablation['num_validation']} validation problems. Reproduce with "
        f"`{ablation['command']}`{commit}.",
    ]
    return "\n".join(lines)


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"
