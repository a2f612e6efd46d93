"""The testbed's studies: ``research/testbed.py --sweep`` (each run name's learning rate, chosen
on the validation split, :func:`run_sweep`), ``--ablation`` (SimCT's supervision spaces,
:func:`run_ablation`) and ``--calibrate`` (the methods' budget, chosen on the extra validation
split by the same-tokenizer control alone, :func:`run_calibration`).

For every run name (``simct``, ``dpca``, ``shared_only``, ``sft``, ``control_opd``,
``control_sft``) and every learning rate of its grid (``StudySettings.sweep_lrs``): one run,
seed 0, ``sweep_steps`` steps from the same warmed-up student the demo uses, then greedy accuracy
and the common KL on ``validation.jsonl`` and greedy accuracy on ``extra_validation.jsonl`` (both
disjoint from the training and test sets). The best extra validation accuracy is chosen (ties:
the lower KL): two rates 0.005 apart on 200 problems differ by one problem, on 2,000 by ten.
``sweep.json`` and ``sweep.md`` record every run and the command that reproduces them; the
chosen values are copied into ``DemoSettings.method_lrs`` (``src/ctopd/demo/settings.py``) by
hand. The demo never reads the
sweep, and nothing here looks at the test set.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ctopd.demo.settings import RUN_SPECS, RUNS, settings_dict

from .settings import SIMCT_SPACES, pick_settings


def run_sweep(
    output_dir: str | Path = "ctopd-demo",
    *,
    quick: bool = False,
    methods: tuple[str, ...] = RUNS,
    force: bool = False,
    workers: int | None = None,
    matched: bool = True,
    warmup_target: float | None = None,
    task_order: str = "fixed",
    log: Callable[[str], None] = print,
) -> dict:
    """Sweep the learning rates and write ``sweep.json`` and ``sweep.md`` into ``output_dir``.

    Args:
        output_dir: the demo folder (teacher, samples and students are built or reused).
        quick: the CI configuration.
        methods: the run names to sweep.
        force: rebuild the cached models first.
        workers: runs side by side (default: CPU cores, at most 2).
        matched: the matched start's students (the default), else the fixed warm-up's
            (:func:`testbed_lib.settings.pick_settings`).
        warmup_target: the matched start's target, when not the default
            (``--warmup-target``).
        task_order: the task's order of steps (``--task-order``, ``fixed`` or ``free``).
        log: where progress lines go.

    Returns:
        The ``sweep.json`` content: ``rows`` (``name``, ``lr``, ``accuracy`` and ``kl`` on
        the validation split, ``extra_accuracy`` on the extra validation split, ``seconds``
        per run), ``best`` (run name → chosen lr), ``starts`` (per student, its
        validation accuracy and KL before any run), ``command``, ``steps``, ...
    """
    from ctopd.demo.methods import method_job, run_method
    from ctopd.demo.run import build_models, demo_pool, has_sft

    from .report import sweep_markdown

    started = time.perf_counter()
    settings = pick_settings(
        quick=quick, matched=matched, warmup_target=warmup_target, task_order=task_order
    )
    out = Path(output_dir)
    with demo_pool(workers) as (pool, size):
        build_models(
            out,
            settings,
            seeds=1,
            sft=has_sft(methods),
            pool=pool,
            workers=size,
            force=force,
            log=log,
        )
        # Where each student starts on the validation split: the reference for every row.
        kinds = sorted({RUN_SPECS[name][0] for name in methods})
        starts = dict(
            zip(
                kinds,
                pool.map(
                    measure_model,
                    [
                        dict(
                            model=str(out / kind),
                            teacher=str(out / "teacher"),
                            data=str(out / "validation.jsonl"),
                            settings=settings,
                        )
                        for kind in kinds
                    ],
                ),
            )
        )
        for kind, start in starts.items():
            log(
                f"[demo] sweep: the warmed-up {kind} on validation.jsonl: accuracy "
                f"{start['accuracy']:.3f}, KL {start['kl']:.3f}"
            )
        extra = "extra_validation" if settings.num_extra_validation else None
        jobs = [
            method_job(
                name,
                0,
                out,
                settings,
                lr=lr,
                steps=settings.sweep_steps,
                split="validation",
                curve=False,
                outcomes_split=extra,
                run_dir=out / "runs" / "sweep" / f"{name}-lr{lr:g}",
            )
            for name in methods
            for lr in settings.sweep_grid(name)
        ]
        log(
            f"[demo] sweep: {len(jobs)} runs ({', '.join(methods)}), "
            f"{settings.sweep_steps} steps x {settings.method_batch} prompts each, seed 0, "
            f"scored on validation.jsonl"
        )
        rows = []
        for run in pool.map(run_method, jobs):
            rows.append(
                {
                    key: run[key]
                    for key in ("name", "lr", "accuracy", "extra_accuracy", "kl", "seconds")
                }
            )
            log(
                f"[demo] sweep {run['name']:<11} lr {run['lr']:.0e}: validation accuracy "
                f"{run['accuracy']:.3f}"
                + (
                    f", extra validation {run['extra_accuracy']:.3f}"
                    if run["extra_accuracy"] is not None
                    else ""
                )
                + f", KL {run['kl']:.3f}"
            )

    sweep = {
        "split": "validation",
        "num_validation": settings.num_validation,
        "num_extra_validation": settings.num_extra_validation,
        "seed": 0,
        "steps": settings.sweep_steps,
        "batch": settings.method_batch,
        "command": rerun_command(
            "--sweep",
            quick=quick,
            methods=methods,
            matched=matched,
            warmup_target=warmup_target,
            task_order=task_order,
        ),
        "commit": _commit(),
        "rows": rows,
        "best": choose(rows),
        "starts": starts,
        "quick": quick,
        "settings": settings_dict(settings),
        "seconds": time.perf_counter() - started,
    }
    (out / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n", encoding="utf-8")
    table = sweep_markdown(sweep)
    (out / "sweep.md").write_text(table + "\n", encoding="utf-8")
    log("\n" + table + "\n")
    for name, lr in sweep["best"].items():
        log(f"[demo] chosen lr for {name}: {lr:g}")
    log(
        f"[demo] wrote {out / 'sweep.json'} and {out / 'sweep.md'} in {sweep['seconds']:.0f} s; "
        "copy the chosen values into DemoSettings.method_lrs (src/ctopd/demo/settings.py)"
    )
    return sweep


def run_ablation(
    output_dir: str | Path = "ctopd-demo",
    *,
    quick: bool = False,
    force: bool = False,
    workers: int | None = None,
    matched: bool = True,
    warmup_target: float | None = None,
    task_order: str = "fixed",
    log: Callable[[str], None] = print,
) -> dict:
    """``--ablation``: SimCT's supervision spaces (:data:`SIMCT_SPACES`) side by side
    on the validation split; writes ``ablation.json`` and ``ablation.md`` into ``output_dir``.

    Each space: ``ablation_seeds`` seeds of ``method_steps`` steps from the warmed-up
    cross-tokenizer student at simct's learning rate (``DemoSettings.method_lrs``), then greedy
    accuracy and the common KL on ``validation.jsonl``. The space with the best mean validation
    accuracy is what the evidence picks for the default; nothing here looks at the test set.

    Returns:
        The ``ablation.json`` content: ``rows`` (``space``, ``seed``, ``accuracy``, ``kl``,
        ``coverage``, ``seconds``), ``spaces`` (per label: the options and the means), ``best``.
    """
    import statistics

    from ctopd.demo.methods import method_job, run_method
    from ctopd.demo.run import build_models, demo_pool

    from .report import ablation_markdown

    started = time.perf_counter()
    settings = pick_settings(
        quick=quick, matched=matched, warmup_target=warmup_target, task_order=task_order
    )
    out = Path(output_dir)
    with demo_pool(workers) as (pool, size):
        build_models(
            out, settings, seeds=1, sft=False, pool=pool, workers=size, force=force, log=log
        )
        jobs, labels = [], []
        for index, (label, options) in enumerate(SIMCT_SPACES):
            for seed in range(settings.ablation_seeds):
                jobs.append(
                    method_job(
                        "simct",
                        seed,
                        out,
                        settings,
                        split="validation",
                        curve=False,
                        objective_options=options,
                        run_dir=out / "runs" / "ablation" / f"{index}-seed{seed}",
                    )
                )
                labels.append(label)
        log(
            f"[demo] ablation: {len(SIMCT_SPACES)} SimCT spaces x {settings.ablation_seeds} "
            f"seeds, {settings.method_steps} steps x {settings.method_batch} prompts at lr "
            f"{settings.lr('simct'):g}, scored on validation.jsonl"
        )
        rows = []
        for label, run in zip(labels, pool.map(run_method, jobs)):
            rows.append(
                {
                    "space": label,
                    **{k: run[k] for k in ("seed", "accuracy", "kl", "coverage", "seconds")},
                }
            )
            log(
                f"[demo] ablation {label:<22} seed {run['seed']}: validation accuracy "
                f"{run['accuracy']:.3f}, KL {run['kl']:.3f}"
            )
    from ctopd.demo.measure import accuracy

    start = accuracy(out / "student", out / "validation.jsonl", settings)
    spaces = {}
    for label, options in SIMCT_SPACES:
        mine = [r for r in rows if r["space"] == label]
        accuracies = [r["accuracy"] for r in mine]
        spaces[label] = {
            "options": options,
            "accuracy_mean": statistics.fmean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "kl": statistics.fmean(r["kl"] for r in mine),
            "coverage": statistics.fmean(r["coverage"] for r in mine),
        }
    ablation = {
        "split": "validation",
        "num_validation": settings.num_validation,
        "seeds": settings.ablation_seeds,
        "steps": settings.method_steps,
        "batch": settings.method_batch,
        "lr": settings.lr("simct"),
        "student_start_accuracy": start,
        "command": rerun_command(
            "--ablation",
            quick=quick,
            matched=matched,
            warmup_target=warmup_target,
            task_order=task_order,
        ),
        "commit": _commit(),
        "rows": rows,
        "spaces": spaces,
        "best": max(spaces, key=lambda k: (spaces[k]["accuracy_mean"], -spaces[k]["kl"])),
        "quick": quick,
        "seconds": time.perf_counter() - started,
    }
    (out / "ablation.json").write_text(json.dumps(ablation, indent=2) + "\n", encoding="utf-8")
    table = ablation_markdown(ablation)
    (out / "ablation.md").write_text(table + "\n", encoding="utf-8")
    log("\n" + table + "\n")
    log(
        f"[demo] wrote {out / 'ablation.json'} and {out / 'ablation.md'} in "
        f"{ablation['seconds']:.0f} s"
    )
    return ablation


def run_calibration(
    output_dir: str | Path = "ctopd-demo",
    *,
    quick: bool = False,
    force: bool = False,
    workers: int | None = None,
    matched: bool = True,
    warmup_target: float | None = None,
    task_order: str = "fixed",
    log: Callable[[str], None] = print,
) -> dict:
    """``--calibrate``: the budget (steps per run) at which the same-tokenizer
    control's OPD most surely beats its continued SFT; writes ``calibration.json`` and
    ``calibration.md`` into ``output_dir``.

    docs/concepts/judging.md: a testbed where same-tokenizer OPD does not beat continued SFT at an equal
    budget cannot judge cross-tokenizer methods. Whether it does depends on the budget: given
    enough steps both reach the teacher's ceiling and differ by nothing. So for each budget of
    ``StudySettings.calibration_steps``, ``control_opd`` and ``control_sft`` run
    ``calibration_seeds`` seeds each (``method_batch`` prompts per step, their ``method_lrs``,
    the rate decayed to 0 over the budget as in the demo), and every final model is scored
    problem by problem on ``extra_validation.jsonl``, greedy and (with
    ``DemoSettings.sampled_temperature``) by one sampled response per problem. Per budget:
    OPD − SFT with its paired 95% interval (:func:`testbed_lib.compare.difference`), for each
    of the two accuracies. Chosen: the budget whose interval's lower
    end is highest (ties: the longer budget). Only the control is looked at, never a
    cross-tokenizer method and never the test splits; the chosen budget is copied into
    ``DemoSettings.method_steps`` by hand, and the demo never reads this file.

    Returns:
        The ``calibration.json`` content: ``rows`` (``name``, ``steps``, ``seed``,
        ``accuracy`` and ``sampled_accuracy`` on the extra validation split,
        ``validation_accuracy`` on the 200 validation problems, ``kl``, ``seconds``),
        ``budgets`` (per step count: ``opd`` and ``sft`` mean and std, ``difference``; the
        same for sampled accuracy as ``sampled_opd``, ``sampled_sft``,
        ``sampled_difference``), ``best`` (a step count, by greedy accuracy), ``separates``
        (whether the best budget's interval lies above zero), ``best_sampled`` and
        ``separates_sampled`` (the same by sampled accuracy; ``None`` without it),
        ``starts`` and ``sampled_starts`` (the control's and the teacher's extra validation
        accuracies), ``command``, ...
    """
    import statistics

    from ctopd.demo.methods import method_job, run_method
    from ctopd.demo.run import build_models, demo_pool, measure_extra_starts
    from ctopd.demo.settings import CONTROL_METHODS

    from .compare import difference, outcome_matrix
    from .report import calibration_markdown

    started = time.perf_counter()
    settings = pick_settings(
        quick=quick, matched=matched, warmup_target=warmup_target, task_order=task_order
    )
    out = Path(output_dir)
    seeds = settings.calibration_seeds
    with demo_pool(workers) as (pool, size):
        build_models(
            out, settings, seeds=seeds, sft=True, pool=pool, workers=size, force=force, log=log
        )
        found = measure_extra_starts(
            out, settings, pool=pool, log=log, split="extra_validation", keys=("teacher", "control")
        )
        starts = {key: row["accuracy"] for key, row in found.items()}
        sampled_starts = {
            key: row["sampled_accuracy"] for key, row in found.items() if "sampled_accuracy" in row
        }
        jobs = [
            method_job(
                name,
                seed,
                out,
                settings,
                steps=steps,
                split="validation",
                curve=False,
                outcomes_split="extra_validation",
                run_dir=out / "runs" / "calibration" / f"{name}-{steps}-seed{seed}",
            )
            for steps in settings.calibration_steps
            for name in CONTROL_METHODS
            for seed in range(seeds)
        ]
        log(
            f"[demo] calibration: {len(jobs)} runs ({', '.join(CONTROL_METHODS)} x {seeds} "
            f"seeds x budgets of {', '.join(map(str, settings.calibration_steps))} steps of "
            f"{settings.method_batch} prompts), scored on extra_validation.jsonl"
        )
        rows, outcomes, sampled = [], {}, {}
        for job, run in zip(jobs, pool.map(run_method, jobs)):
            rows.append(
                {
                    "name": run["name"],
                    "steps": job["steps"],
                    "seed": run["seed"],
                    "lr": run["lr"],
                    "accuracy": run["extra_accuracy"],
                    "sampled_accuracy": run["extra_sampled_accuracy"],
                    "validation_accuracy": run["accuracy"],
                    "kl": run["kl"],
                    "seconds": run["seconds"],
                }
            )
            outcomes.setdefault((run["name"], job["steps"]), []).append(run["extra_outcomes"])
            if run["extra_sampled_outcomes"] is not None:
                sampled.setdefault((run["name"], job["steps"]), []).append(
                    run["extra_sampled_outcomes"]
                )
            log(
                f"[demo] calibration {run['name']:<11} {job['steps']:>4} steps seed "
                f"{run['seed']}: extra validation accuracy {run['extra_accuracy']:.3f}"
                + (
                    ""
                    if run["extra_sampled_accuracy"] is None
                    else f" (sampled {run['extra_sampled_accuracy']:.3f})"
                )
            )

    budgets = {}
    for steps in settings.calibration_steps:
        entry = {}
        for prefix, field in (("", "accuracy"), ("sampled_", "sampled_accuracy")):
            if prefix and not sampled:
                continue
            for name in CONTROL_METHODS:
                accuracies = [r[field] for r in rows if r["name"] == name and r["steps"] == steps]
                entry[prefix + name.removeprefix("control_")] = {
                    "mean": statistics.fmean(accuracies),
                    "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                    "seeds": accuracies,
                }
            found = sampled if prefix else outcomes
            entry[prefix + "difference"] = difference(
                outcome_matrix(found[("control_opd", steps)]),
                outcome_matrix(found[("control_sft", steps)]),
            )
        budgets[str(steps)] = entry
    best = choose_budget(budgets)
    separates = budgets[str(best)]["difference"]["low"] > 0
    best_sampled = choose_budget(budgets, "sampled_difference") if sampled else None
    separates_sampled = (
        None
        if best_sampled is None
        else budgets[str(best_sampled)]["sampled_difference"]["low"] > 0
    )
    calibration = {
        "split": "extra_validation",
        "num_extra_validation": settings.num_extra_validation,
        "seeds": seeds,
        "batch": settings.method_batch,
        "steps": list(settings.calibration_steps),
        "lrs": {name: settings.lr(name) for name in CONTROL_METHODS},
        "command": rerun_command(
            "--calibrate",
            quick=quick,
            matched=matched,
            warmup_target=warmup_target,
            task_order=task_order,
        ),
        "commit": _commit(),
        "starts": starts,
        "sampled_starts": sampled_starts,
        "rows": rows,
        "budgets": budgets,
        "best": best,
        "separates": separates,
        "best_sampled": best_sampled,
        "separates_sampled": separates_sampled,
        "sampled_temperature": settings.sampled_temperature if sampled else None,
        "quick": quick,
        "settings": settings_dict(settings),
        "seconds": time.perf_counter() - started,
    }
    (out / "calibration.json").write_text(
        json.dumps(calibration, indent=2) + "\n", encoding="utf-8"
    )
    table = calibration_markdown(calibration)
    (out / "calibration.md").write_text(table + "\n", encoding="utf-8")
    log("\n" + table + "\n")
    if separates:
        log(
            f"[demo] chosen budget: {best} steps; copy it into DemoSettings.method_steps "
            "(src/ctopd/demo/settings.py)"
        )
    else:
        log(
            f"[demo] no budget separates the control: at its best ({best} steps) OPD - SFT's "
            "interval reaches zero, so this testbed cannot rank an on-policy method above SFT "
            "(docs/concepts/judging.md); change the task or the budgets before judging"
        )
    if separates_sampled is not None:
        log(
            f"[demo] by sampled accuracy: at {best_sampled} steps OPD - SFT is "
            f"{budgets[str(best_sampled)]['sampled_difference']['value']:+.3f}, its interval "
            + ("above zero" if separates_sampled else "reaching zero")
        )
    log(
        f"[demo] wrote {out / 'calibration.json'} and {out / 'calibration.md'} in "
        f"{calibration['seconds']:.0f} s"
    )
    return calibration


def choose_budget(budgets: dict[str, dict], key: str = "difference") -> int:
    """The step count (keys of ``budgets``, as strings) whose OPD − SFT interval (``key``:
    ``difference`` for greedy accuracy, ``sampled_difference`` for sampled) has the highest
    lower end; ties: the longer budget."""
    return max(
        (int(steps) for steps in budgets),
        key=lambda steps: (budgets[str(steps)][key]["low"], steps),
    )


def choose(rows: list[dict]) -> dict[str, float]:
    """Per run name, the learning rate with the highest extra validation accuracy (the
    validation accuracy where a row has none; ties: the lower KL, then the smaller rate)."""
    best: dict[str, dict] = {}
    for row in rows:
        score = row.get("extra_accuracy")
        key = (-(row["accuracy"] if score is None else score), row["kl"], row["lr"])
        if row["name"] not in best or key < best[row["name"]]["key"]:
            best[row["name"]] = {"key": key, "lr": row["lr"]}
    return {name: entry["lr"] for name, entry in best.items()}


def rerun_command(
    flag: str,
    *,
    quick: bool,
    matched: bool = True,
    methods: tuple[str, ...] = RUNS,
    warmup_target: float | None = None,
    task_order: str = "fixed",
    seeds: int | None = None,
) -> str:
    """The command line that reruns a testbed run (``flag``: ``--sweep``, ``--ablation``,
    ``--calibrate`` or ``""`` for the demo's runs, whose ``seeds`` it names when not the
    default) with these options."""
    parts = [f"python research/testbed.py {flag}".rstrip()]
    if quick:
        parts.append("--quick")
    if seeds is not None and seeds != (1 if quick else 3):
        parts.append(f"--seeds {seeds}")
    if not matched:
        parts.append("--fixed-warmup")
    if warmup_target is not None:
        parts.append(f"--warmup-target {warmup_target:g}")
    if task_order != "fixed":
        parts.append(f"--task-order {task_order}")
    if tuple(methods) != RUNS:
        parts.append("--methods " + ",".join(methods))
    return " ".join(parts)


def _commit() -> str | None:
    """The checkout's commit, when the package runs from a git checkout."""
    try:
        result = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def measure_model(job: dict) -> dict:
    """Accuracy, KL and non-canonical share of one model folder on one split (runs in a worker
    process). ``job``: ``model`` (folder), ``teacher`` (folder), ``data`` (a JSONL split) and
    ``settings``."""
    from ctopd.demo.measure import accuracy, sequence_kl
    from ctopd.demo.stages import one_thread

    one_thread()
    model, data, settings = Path(job["model"]), Path(job["data"]), job["settings"]
    return {
        "accuracy": accuracy(model, data, settings),
        **sequence_kl(model, Path(job["teacher"]), data, settings),
    }
