"""The ``ctopd demo`` experiment: cross-tokenizer OPD on a task a laptop can check, read against a
same-tokenizer control (ALGORITHMS §9).

Top to bottom, everything local and seeded:

1. **task** — arithmetic word problems with worked solutions (:mod:`ctopd.demo.task`), written as
   ``train.jsonl`` / ``validation.jsonl`` / ``test.jsonl`` / ``extra_test.jsonl`` in the
   trainer's data format (no question in two of them);
2. **tokenizers and teacher** — a Qwen2-style byte-level BPE with one token per digit (teacher)
   and a Llama-3-style BPE with digit groups of up to three (student), trained on the task's
   text. We chose Llama-3-style groups because they are the realistic multi-digit case
   (Qwen2.5 → Llama-3.2) and the mismatch falls where the answer is decided: on the numbers.
   A small Llama (the teacher) is trained from scratch on the reference solutions, saved in
   ``teacher/`` (:mod:`ctopd.demo.stages`);
3. **teacher samples** — drawn once, in big batches, and cached in ``teacher_samples.jsonl``;
   every SFT stage below trains on a slice of them (:mod:`ctopd.demo.samples`);
4. **students** — two of the same architecture and initialisation: ``student/`` with the
   digit-group tokenizer and its own header-style chat template (cross-tokenizer), ``control/``
   with the teacher's tokenizer and template (same-tokenizer control), warmed up alike on the
   same teacher samples, side by side, at a constant learning rate (the stable phase of a
   warmup-stable-decay schedule; each run below is its decay phase). By default each warm-up
   stops at its first checkpoint that reaches the same validation accuracy (the matched start,
   so that "gap closed" compares like with like); ``--fixed-warmup``: both train the same
   number of steps;
5. **methods** — equal budgets (steps × prompts per step), once per seed, two runs at a time
   (:mod:`ctopd.demo.methods`): from ``student/`` ``simct``, ``dpca`` and ``shared_only``
   on-policy distillation and continued SFT; from ``control/`` same-tokenizer ``opd`` and
   continued SFT. Each run's learning rate is its entry of ``DemoSettings.method_lrs``, chosen
   by ``ctopd demo --sweep`` on the validation split (:mod:`ctopd.demo.sweep`);
6. **report** — held-out accuracy, the share of the student → teacher gap closed, the common
   held-out KL, coverage and wall time per run in ``results.json``, a printed table,
   ``results.md`` and ``curves.png`` (:mod:`ctopd.demo.report`); and, on the extra test
   problems, every final model's and start's outcome per problem and the paired comparisons
   between runs with their intervals (:mod:`ctopd.demo.compare`): 200 test problems cannot
   tell two runs near 0.96 apart by 0.01.

Teacher, samples and students are cached: a second run with the same settings reuses them (a
stamp in each folder records the settings it was built with); ``force`` rebuilds.

Every process uses one torch thread, and the workers of one pool (spawned once) run the
sampling, the warm-ups and the methods: imports are paid once per worker, not once per run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path

from ctopd.demo.settings import (
    CONTROL_METHODS,
    CROSS_METHODS,
    FULL,
    QUICK,
    RUNS,
    DemoSettings,
    demo_settings,
    settings_dict,
)

# Kept for callers of the old single-module demo.
METHODS = CROSS_METHODS
__all__ = [
    "FULL",
    "QUICK",
    "METHODS",
    "RUNS",
    "DemoSettings",
    "parse_runs",
    "run_demo",
    "build_models",
]


def parse_runs(text: str | None) -> tuple[str, ...]:
    """The run names of ``--methods a,b,...`` (all of :data:`RUNS` when empty), in RUNS order.

    Raises:
        ValueError: an unknown name; the message lists the valid ones.
    """
    if not text:
        return RUNS
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        raise ValueError(
            f"unknown method {', '.join(unknown) or repr(text)}; choose from {', '.join(RUNS)}"
        )
    return tuple(n for n in RUNS if n in names)


def run_demo(
    output_dir: str | Path = "ctopd-demo",
    *,
    quick: bool = False,
    seeds: int = 3,
    methods: tuple[str, ...] = RUNS,
    force: bool = False,
    workers: int | None = None,
    matched: bool = True,
    warmup_target: float | None = None,
    task_order: str = "fixed",
    log: Callable[[str], None] = print,
) -> dict:
    """Run the whole experiment and write its report into ``output_dir``.

    Args:
        output_dir: folder for the data, models, runs and report (created).
        quick: the CI configuration (:data:`QUICK`), a minute instead of a quarter hour.
        seeds: runs per method (seeds ``0..seeds-1``); each starts from its warmed-up student.
        methods: run names to run (:data:`RUNS`, see :func:`parse_runs`).
        force: rebuild the teacher, its samples and the students even when cached ones match.
        workers: processes side by side (default: CPU cores, at most 2).
        matched: the matched start (:data:`ctopd.demo.settings.MATCHED`, the default): each
            student warmed up until it reaches the same validation accuracy; ``False``
            (``--fixed-warmup``): both warmed up ``warmup_steps`` steps.
        warmup_target: the matched start's validation accuracy target, when not the default
            (``--warmup-target``; the students are rebuilt for it).
        task_order: ``fixed`` (the story's order) or ``free`` (``--task-order``: steps that
            commute, :data:`ctopd.demo.settings.FREE_ORDER`).
        log: where progress lines go.

    Returns:
        The ``results.json`` content.
    """
    from ctopd.demo.methods import method_job, run_method
    from ctopd.demo.report import plot_curves, results_markdown, write_results

    started = time.perf_counter()
    settings = demo_settings(
        quick=quick, matched=matched, warmup_target=warmup_target, task_order=task_order
    )
    out = Path(output_dir)
    with demo_pool(workers) as (pool, size):
        base = build_models(
            out,
            settings,
            seeds=seeds,
            sft=has_sft(methods),
            pool=pool,
            workers=size,
            force=force,
            log=log,
        )
        base["extra_test"] = measure_extra_starts(out, settings, pool=pool, log=log)
        stage = time.perf_counter()
        jobs = [method_job(name, seed, out, settings) for seed in range(seeds) for name in methods]
        log(
            f"[demo] {len(jobs)} runs ({', '.join(methods)} x {seeds} seeds), "
            f"{settings.method_steps} steps x {settings.method_batch} prompts each, "
            f"{size} at a time"
        )
        runs = []
        for run in pool.map(run_method, jobs):
            log(
                f"[demo] {run['name']:<11} seed {run['seed']}: accuracy {run['accuracy']:.3f}, "
                f"coverage {_fmt(run['coverage'])}, KL {run['kl']:.3f}, "
                f"{run['seconds']:.0f} s + {run['eval_seconds']:.0f} s measuring"
            )
            runs.append(run)
        base["stages"]["methods"] = time.perf_counter() - stage
        _log_stage(log, "methods", base["stages"]["methods"])

    results = summarize(
        base, runs, settings, seeds=seeds, quick=quick, seconds=time.perf_counter() - started
    )
    write_results(out, results)
    plot_curves(results, out / "curves.png")
    table = results_markdown(results)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    log("\n" + table)
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in results["stages"].items())
    log(
        f"\n[demo] wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'curves.png'} "
        f"in {results['seconds']:.0f} s ({stages})"
    )
    return results


@contextmanager
def demo_pool(workers: int | None) -> Iterator[tuple[ProcessPoolExecutor, int]]:
    """The demo's worker processes (spawned: no state shared with this one) and their count."""
    import os

    from ctopd.demo.stages import one_thread

    one_thread()
    size = workers or max(1, min(2, os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=size, mp_context=get_context("spawn")) as pool:
        yield pool, size


def build_models(
    out: Path,
    settings: DemoSettings,
    *,
    seeds: int,
    sft: bool,
    pool,
    workers: int,
    force: bool,
    log: Callable[[str], None],
) -> dict:
    """Data, teacher, teacher samples and both warmed-up students, each reused when cached.

    Args:
        seeds: SFT seeds whose sample slices the pool must hold (when ``sft``).
        sft: whether an SFT run follows (it trains on teacher samples past the warm-up's).

    Returns:
        ``{"teacher": {"accuracy", "seconds", "rebuilt"}, "students": {"student": ...,
        "control": ...} (see :func:`ctopd.demo.stages.build_student`), "stages": seconds of
        the teacher, samples and students stages}``.
    """
    from ctopd.demo.samples import ensure_samples, samples_needed
    from ctopd.demo.stages import build_student, build_teacher, cached_student, prepare_data

    out.mkdir(parents=True, exist_ok=True)
    stages, started = {}, time.perf_counter()
    prepare_data(out, settings)
    teacher = build_teacher(out, settings, force=force, log=log)
    stages["teacher"] = _lap(log, "teacher", started)

    # A new teacher makes every sample and student stale, whatever the stamps say.
    stale = force or teacher["rebuilt"]
    students = {
        kind: None if stale else cached_student(out, settings, kind)
        for kind in ("student", "control")
    }
    missing = [kind for kind, result in students.items() if result is None]
    count = samples_needed(settings, seeds=seeds, warmup=bool(missing), sft=sft)
    started = time.perf_counter()
    ensure_samples(out, settings, count, pool=pool, workers=workers, force=stale, log=log)
    stages["samples"] = _lap(log, "samples", started)

    started = time.perf_counter()
    for kind, result in students.items():
        if result is not None:
            log(
                f"[demo] reusing the {_KIND[kind]} in {out / kind} "
                f"(accuracy {result['accuracy']:.3f})"
            )
    if missing:
        log(
            f"[demo] warming up the {' and the '.join(_KIND[k] for k in missing)} "
            f"({settings.student_layers} layers x {settings.student_hidden}, "
            f"{settings.warmup_steps} SFT steps x {settings.warmup_batch} teacher samples"
            + (
                f", each stopped at its first checkpoint with validation accuracy >= "
                f"{settings.warmup_target:g}"
                if settings.warmup_target is not None
                else ""
            )
            + ")"
        )
    jobs = [dict(kind=kind, out=str(out), settings=settings) for kind in missing]
    for result in pool.map(build_student, jobs):
        students[result["kind"]] = result
        log(
            f"[demo] {_KIND[result['kind']]} after {result['warmup_steps']} warm-up steps: "
            f"held-out accuracy {result['accuracy']:.3f}, KL {result['kl']:.3f} "
            f"({result['seconds']:.0f} s)"
        )
    stages["students"] = _lap(log, "students", started)
    return {"teacher": teacher, "students": students, "stages": stages}


def measure_extra_starts(
    out: Path,
    settings: DemoSettings,
    *,
    pool,
    log: Callable[[str], None],
    split: str = "extra_test",
    keys: tuple[str, ...] = ("teacher", "student", "control"),
) -> dict:
    """Outcomes of the teacher and both warmed-up students (``keys``) on ``<split>.jsonl`` (a
    string of 0/1 per problem each, :func:`ctopd.demo.measure.outcomes`) and their
    accuracies, greedy (``outcomes``, ``accuracy``) and, with
    ``DemoSettings.sampled_temperature``, sampled (``sampled_outcomes``,
    ``sampled_accuracy``); empty when the settings have no problems in that split."""
    from ctopd.demo.measure import measure_outcomes

    if not getattr(settings, f"num_{split}"):
        return {}
    modes = (False, True) if settings.sampled_temperature is not None else (False,)
    jobs = [
        dict(
            key=key,
            model=str(out / key),
            data=str(out / f"{split}.jsonl"),
            settings=settings,
            sampled=sampled,
        )
        for key in keys
        for sampled in modes
    ]
    extra: dict[str, dict] = {key: {} for key in keys}
    for r in pool.map(measure_outcomes, jobs):
        prefix = "sampled_" if r["sampled"] else ""
        extra[r["key"]][f"{prefix}accuracy"] = r["outcomes"].count("1") / len(r["outcomes"])
        extra[r["key"]][f"{prefix}outcomes"] = r["outcomes"]
    log(
        f"[demo] on {getattr(settings, f'num_{split}')} {split.replace('_', ' ')} problems: "
        + ", ".join(
            f"{_NAME[key]} {row['accuracy']:.3f}"
            + (f" (sampled {row['sampled_accuracy']:.3f})" if "sampled_accuracy" in row else "")
            for key, row in extra.items()
        )
    )
    return extra


_NAME = {
    "teacher": "teacher",
    "student": "cross-tokenizer student",
    "control": "same-tokenizer control",
}


def summarize(
    base: dict, runs: list[dict], settings: DemoSettings, *, seeds: int, quick: bool, seconds: float
) -> dict:
    """The ``results.json`` content: per method the mean over seeds and every seed's run;
    the same-tokenizer control's runs under ``controls``; the starts' outcomes on the extra
    test split under ``extra_test`` and the paired comparisons there under ``comparisons``
    (:func:`comparisons`)."""
    from ctopd.demo.methods import summarize_method

    teacher = base["teacher"]["accuracy"]
    student, control = base["students"]["student"], base["students"]["control"]
    extra = base.get("extra_test", {})

    def extra_of(key: str, field: str = "accuracy") -> float | None:
        return extra.get(key, {}).get(field)

    def of(name: str, start: float, kind: str) -> dict:
        return summarize_method(
            [r for r in runs if r["name"] == name],
            start=start,
            teacher=teacher,
            extra_start=extra_of(kind),
            extra_teacher=extra_of("teacher"),
            extra_sampled_start=extra_of(kind, "sampled_accuracy"),
            extra_sampled_teacher=extra_of("teacher", "sampled_accuracy"),
        )

    ran = {r["name"] for r in runs}
    methods = {
        name: of(name, student["accuracy"], "student") for name in CROSS_METHODS if name in ran
    }
    controls = {
        "student_start_accuracy": control["accuracy"],
        "student_start_kl": control["kl"],
        "student_start_noncanonical": control.get("noncanonical"),
        **{
            name.removeprefix("control_"): of(name, control["accuracy"], "control")
            for name in CONTROL_METHODS
            if name in ran
        },
    }
    return {
        "teacher_accuracy": teacher,
        "teacher_validation_accuracy": base["teacher"].get("validation_accuracy"),
        "teacher_rounds": base["teacher"].get("rounds", []),
        "student_start_accuracy": student["accuracy"],
        "student_start_kl": student["kl"],
        "student_start_noncanonical": student.get("noncanonical"),
        "warmup_steps": {
            kind: base["students"][kind].get("warmup_steps", settings.warmup_steps)
            for kind in ("student", "control")
        },
        "warmup_curves": {
            kind: base["students"][kind].get("warmup_curve", []) for kind in ("student", "control")
        },
        "methods": methods,
        "controls": controls,
        "extra_test": extra,
        "comparisons": comparisons(extra, runs),
        "seeds": seeds,
        "quick": quick,
        "settings": settings_dict(settings),
        "teacher_seconds": base["teacher"]["seconds"],
        "student_seconds": student["seconds"],
        "control_seconds": control["seconds"],
        "stages": base["stages"],
        "seconds": seconds,
    }


_KIND = {"student": "cross-tokenizer student", "control": "same-tokenizer control"}

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
    """Paired comparisons on the extra test split (:mod:`ctopd.demo.compare`): for each pair of
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
    from ctopd.demo.compare import difference, gap_fraction_ratio, outcome_matrix

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


def has_sft(names) -> bool:
    return any(name in ("sft", "control_sft") for name in names)


def _lap(log: Callable[[str], None], stage: str, started: float) -> float:
    seconds = time.perf_counter() - started
    _log_stage(log, stage, seconds)
    return seconds


def _log_stage(log: Callable[[str], None], stage: str, seconds: float) -> None:
    log(f"[demo] stage {stage}: {seconds:.0f} s")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
