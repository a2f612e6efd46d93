"""The ``ctopd demo`` experiment: cross-tokenizer OPD on a task a laptop can check, read against a
same-tokenizer control. Local, seeded, and cached where it can be (a stamp in each folder records
the settings it was built with; ``force`` rebuilds). Stages: the task's splits (:mod:`.task`);
two tokenizers and a teacher trained from scratch (:mod:`.stages`); teacher samples, drawn once
(:mod:`.samples`); ``student/`` (its own tokenizer) and ``control/`` (the teacher's), warmed up
alike; equal-budget runs per seed (:mod:`.methods`); the report (:mod:`.report`).

One pool of spawned worker processes (one torch thread each) runs the sampling, the warm-ups
and the methods, so imports are paid once per worker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path

from ctopd.demo.settings import CONTROL_METHODS, CROSS_METHODS, RUNS, DemoSettings, settings_dict

_KIND = {"student": "cross-tokenizer student", "control": "same-tokenizer control"}
_NAME = {"teacher": "teacher", **_KIND}


def parse_runs(text: str | None) -> tuple[str, ...]:
    """The run names of ``--methods a,b,...`` (all of :data:`RUNS` when empty), in RUNS order;
    ``ValueError`` listing the valid ones for an unknown name."""
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
    output_dir: str | Path,
    *,
    quick: bool = False,
    settings: DemoSettings | None = None,
    seeds: int = 3,
    methods: tuple[str, ...] = RUNS,
    force: bool = False,
    workers: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the whole experiment, write its report into ``output_dir`` (created) and return the
    ``results.json`` content: ``methods`` x ``seeds`` runs (seeds ``0..seeds-1``) with
    ``settings`` (default: :data:`~ctopd.demo.settings.FULL`, or ``QUICK`` with ``quick``), on
    ``workers`` processes (default: CPU cores, at most 2); ``force`` rebuilds cached models."""
    from ctopd.demo.methods import method_job, run_method
    from ctopd.demo.report import plot_curves, results_markdown, write_results
    from ctopd.demo.settings import demo_settings

    started, out = time.perf_counter(), Path(output_dir)
    settings = settings or demo_settings(quick=quick)
    with demo_pool(workers) as (pool, size):
        sft = has_sft(methods)
        base = build_models(
            out, settings, seeds=seeds, sft=sft, pool=pool, workers=size, force=force, log=log
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
        base["stages"]["methods"] = _lap(log, "methods", stage)

    seconds = time.perf_counter() - started
    results = summarize(base, runs, settings, seeds=seeds, quick=quick, seconds=seconds)
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
    """Data, teacher, teacher samples (for ``seeds`` SFT seeds when ``sft``) and both
    warmed-up students, each reused when cached: ``{"teacher": ..., "students": {"student",
    "control"}, "stages": seconds per stage}``."""
    from ctopd.demo.samples import ensure_samples, samples_needed
    from ctopd.demo.stages import build_student, build_teacher, cached_student, prepare_data

    out.mkdir(parents=True, exist_ok=True)
    stages, started = {}, time.perf_counter()
    prepare_data(out, settings)
    teacher = build_teacher(out, settings, force=force, log=log)
    stages["teacher"] = _lap(log, "teacher", started)
    # A new teacher makes every sample and student stale, whatever the stamps say.
    stale = force or teacher["rebuilt"]
    students = {k: None if stale else cached_student(out, settings, k) for k in _KIND}
    missing = [kind for kind, result in students.items() if result is None]
    count = samples_needed(settings, seeds=seeds, warmup=bool(missing), sft=sft)
    started = time.perf_counter()
    ensure_samples(out, settings, count, pool=pool, workers=workers, force=stale, log=log)
    stages["samples"] = _lap(log, "samples", started)

    started = time.perf_counter()
    for kind, result in ((k, r) for k, r in students.items() if r is not None):
        log(f"[demo] reusing the {_KIND[kind]} in {out / kind} (accuracy {result['accuracy']:.3f})")
    if missing:
        target = settings.warmup_target
        stop = (
            ""
            if target is None
            else f", each stopped at its first checkpoint with validation accuracy >= {target:g}"
        )
        log(
            f"[demo] warming up the {' and the '.join(_KIND[k] for k in missing)} "
            f"({settings.student_layers} layers x {settings.student_hidden}, "
            f"{settings.warmup_steps} SFT steps x {settings.warmup_batch} teacher samples{stop})"
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
    """Per model folder in ``keys``: its ``outcomes`` on ``<split>.jsonl``
    (:func:`ctopd.demo.measure.outcomes`) and ``accuracy``, and with ``sampled_temperature``
    their ``sampled_`` twins; empty when the split has no problems."""
    from ctopd.demo.measure import measure_outcomes

    count = getattr(settings, f"num_{split}")
    if not count:
        return {}
    modes = (False, True) if settings.sampled_temperature is not None else (False,)
    data = str(out / f"{split}.jsonl")
    jobs = [
        dict(key=key, model=str(out / key), data=data, settings=settings, sampled=sampled)
        for key in keys
        for sampled in modes
    ]
    extra: dict[str, dict] = {key: {} for key in keys}
    for r in pool.map(measure_outcomes, jobs):
        prefix = "sampled_" if r["sampled"] else ""
        extra[r["key"]][f"{prefix}accuracy"] = r["outcomes"].count("1") / len(r["outcomes"])
        extra[r["key"]][f"{prefix}outcomes"] = r["outcomes"]
    log(
        f"[demo] on {count} {split.replace('_', ' ')} problems: "
        + ", ".join(
            f"{_NAME[key]} {row['accuracy']:.3f}"
            + (f" (sampled {row['sampled_accuracy']:.3f})" if "sampled_accuracy" in row else "")
            for key, row in extra.items()
        )
    )
    return extra


def summarize(
    base: dict, runs: list[dict], settings: DemoSettings, *, seeds: int, quick: bool, seconds: float
) -> dict:
    """The ``results.json`` content: per method its summary over seeds (the control's under
    ``controls``), the starts' outcomes on the extra test split under ``extra_test``."""
    from ctopd.demo.methods import summarize_method

    teacher = base["teacher"]
    student, control = base["students"]["student"], base["students"]["control"]
    extra = base.get("extra_test", {})

    def of(name: str, start: dict, kind: str) -> dict:
        return summarize_method(
            [r for r in runs if r["name"] == name],
            start=start["accuracy"],
            teacher=teacher["accuracy"],
            extra_start=extra.get(kind),
            extra_teacher=extra.get("teacher"),
        )

    ran = {r["name"] for r in runs}
    controls = {
        "student_start_accuracy": control["accuracy"],
        "student_start_kl": control["kl"],
        "student_start_noncanonical": control.get("noncanonical"),
    }
    for name in (n for n in CONTROL_METHODS if n in ran):
        controls[name.removeprefix("control_")] = of(name, control, "control")
    return {
        "teacher_accuracy": teacher["accuracy"],
        "teacher_validation_accuracy": teacher.get("validation_accuracy"),
        "teacher_rounds": teacher.get("rounds", []),
        "student_start_accuracy": student["accuracy"],
        "student_start_kl": student["kl"],
        "student_start_noncanonical": student.get("noncanonical"),
        "warmup_steps": {k: base["students"][k].get("warmup_steps") for k in _KIND},
        "warmup_curves": {k: base["students"][k].get("warmup_curve", []) for k in _KIND},
        "methods": {n: of(n, student, "student") for n in CROSS_METHODS if n in ran},
        "controls": controls,
        "extra_test": extra,
        "seeds": seeds,
        "quick": quick,
        "settings": settings_dict(settings),
        "teacher_seconds": teacher["seconds"],
        "student_seconds": student["seconds"],
        "control_seconds": control["seconds"],
        "stages": base["stages"],
        "seconds": seconds,
    }


def has_sft(names) -> bool:
    return any(name in ("sft", "control_sft") for name in names)


def _lap(log: Callable[[str], None], stage: str, started: float) -> float:
    seconds = time.perf_counter() - started
    log(f"[demo] stage {stage}: {seconds:.0f} s")
    return seconds


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
