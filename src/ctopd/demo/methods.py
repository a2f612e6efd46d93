"""One demo run (a method, a seed, from a warmed-up student) and the per-method summary.

A run trains ``steps`` steps of ``method_batch`` prompts (a short ramp, then cosine decay to 0)
and saves a checkpoint every ``eval_every`` steps; afterwards every checkpoint is measured in big
batches (greedy accuracy and the common KL, :mod:`ctopd.demo.measure`) and deleted. A run
measured on the test split keeps its final model in ``runs/<run>-seed<k>/final/``; others (on
the validation split, as research runs them) keep only their numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import time
from pathlib import Path

from ctopd.demo.settings import RUN_SPECS, DemoSettings


def method_job(
    name: str,
    seed: int,
    out: Path,
    settings: DemoSettings,
    *,
    lr: float | None = None,
    steps: int | None = None,
    split: str = "test",
    curve: bool = True,
    run_dir: Path | None = None,
    objective_options: dict | None = None,
    outcomes_split: str | None = None,
) -> dict:
    """The job :func:`run_method` runs: the demo's defaults unless overridden (``split``: the
    data measured, ``test`` or ``validation``; ``curve``: measure every checkpoint or the final
    one; ``objective_options``: ``objective`` config fields, e.g. ``space``; ``outcomes_split``:
    the split scored problem by problem, by default ``extra_test`` for test runs)."""
    if outcomes_split is None and split == "test":
        outcomes_split = "extra_test"
    return dict(
        name=name,
        seed=seed,
        out=str(out),
        settings=settings,
        lr=settings.lr(name) if lr is None else lr,
        steps=settings.method_steps if steps is None else steps,
        split=split,
        curve=curve,
        run_dir=str(run_dir or out / "runs" / f"{name}-seed{seed}"),
        objective_options=dict(objective_options or {}),
        outcomes_split=outcomes_split,
    )


def run_method(job: dict) -> dict:
    """One run from its warmed-up student (runs in a worker process).

    Returns:
        ``name``, ``student`` (``student`` or ``control``), ``method`` (the objective or
        ``sft``), ``seed``, ``lr``, ``steps``; ``accuracy``, ``kl``, ``noncanonical`` of the
        final model on the job's ``split``; ``coverage``, ``aligned_coverage``,
        ``unaligned_share`` (:func:`ctopd.demo.measure.coverage`) and ``train_kl`` (the
        objective's own), ``None`` for SFT; ``seconds`` (training) and ``eval_seconds``;
        ``extra_accuracy``, ``extra_outcomes`` and their ``extra_sampled_`` twins on the
        job's ``outcomes_split`` (responses kept in ``run_dir/<split>_responses.jsonl`` and
        ``<split>_sampled_responses.jsonl``), ``None`` without one; ``curve``: ``step``,
        ``accuracy``, ``kl`` from step 0, ``extra_step``, ``extra_accuracy``,
        ``extra_outcomes`` per checkpoint, ``train_kl_step``, ``train_kl`` per step.
    """
    from ctopd.demo.measure import coverage
    from ctopd.demo.stages import STUDENT_FOLDERS, one_thread
    from ctopd.training.metrics import read_metrics

    one_thread()
    out, run_dir = Path(job["out"]), Path(job["run_dir"])
    kind, objective = RUN_SPECS[job["name"]]
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = train_run(job, out / STUDENT_FOLDERS[kind], objective, run_dir)
    started = time.perf_counter()
    rows = read_metrics(run_dir)
    points = _measure(job, out / STUDENT_FOLDERS[kind], run_dir)
    extra = _measure_extra(job, run_dir)
    sampled = _measure_extra_sampled(job, run_dir)
    if job["split"] != "test":  # the demo's own runs keep their final model
        shutil.rmtree(run_dir / "final", ignore_errors=True)
    for checkpoint in run_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)
    final = points[-1]
    sft = objective == "sft"
    shares = (None,) * 3 if sft else coverage(rows)
    return {
        "name": job["name"],
        "student": kind,
        "method": objective,
        "seed": job["seed"],
        "lr": job["lr"],
        "steps": summary["steps"],
        "accuracy": final["accuracy"],
        "kl": final["kl"],
        "noncanonical": final["noncanonical"],
        "extra_accuracy": _share(extra[max(extra)]) if extra else None,
        "extra_outcomes": extra[max(extra)] if extra else None,
        "extra_sampled_accuracy": None if sampled is None else _share(sampled),
        "extra_sampled_outcomes": sampled,
        "coverage": shares[0],
        "aligned_coverage": shares[1],
        "unaligned_share": shares[2],
        "train_kl": None if sft else summary["final_metrics"].get("kl"),
        "seconds": summary["seconds"],
        "eval_seconds": time.perf_counter() - started,
        "curve": {
            "step": [p["step"] for p in points],
            "accuracy": [p["accuracy"] for p in points],
            "kl": [p["kl"] for p in points],
            "train_kl_step": [r["step"] for r in rows if "kl" in r],
            "train_kl": [r["kl"] for r in rows if "kl" in r],
            "extra_step": sorted(extra),
            "extra_accuracy": [_share(extra[step]) for step in sorted(extra)],
            "extra_outcomes": [extra[step] for step in sorted(extra)],
        },
    }


def train_run(job: dict, student_dir: Path, objective: str, run_dir: Path) -> dict:
    """Train one run of :func:`method_job`'s ``job`` from ``student_dir`` into ``run_dir``:
    on-policy distillation with ``objective`` (``train``) or, for ``sft``, continued SFT on its
    seed's slice of the teacher samples (``run_sft``, the same texts for both students).

    Returns:
        The training summary (``steps``, ``seconds``, ``final_metrics``, ...)."""
    from ctopd.demo.samples import sft_slice, write_sft_data
    from ctopd.demo.stages import stage_config
    from ctopd.training.loop import train
    from ctopd.training.sft import run_sft

    settings, out, steps = job["settings"], Path(job["out"]), job["steps"]
    every = settings.eval_every if job["curve"] else steps
    data = out / "train.jsonl"
    if objective == "sft":
        data = write_sft_data(
            out, run_dir / "data.jsonl", *sft_slice(settings, job["seed"], steps=steps)
        )
    # A short ramp, then cosine decay to 0: each run is the decay phase of a warmup-stable-decay
    # schedule whose stable phase is the students' constant-rate warm-up (measured: from an
    # annealed, cosine warm-up every method lost accuracy as its rate grew, SFT included). A
    # checkpoint at every measuring point, all kept until they are measured.
    config = stage_config(
        settings,
        run_dir,
        data=data,
        student=student_dir,
        teacher=out / "teacher",
        steps=steps,
        batch=settings.method_batch,
        lr=job["lr"],
        seed=job["seed"],
        schedule="cosine",
        warmup_ratio=settings.method_warmup_ratio,
        save_every=every,
        keep_checkpoints=math.ceil(steps / every) + 1,
    )
    if objective == "sft":
        config.sft.source, config.sft.response_field = "data", "response"
        return run_sft(config)
    # Checked like a config file's values (dataclasses.replace runs __post_init__).
    config.objective = dataclasses.replace(
        config.objective, name=objective, **job.get("objective_options", {})
    )
    return train(config)


def _measure(job: dict, student_dir: Path, run_dir: Path) -> list[dict]:
    """Accuracy, KL and non-canonical share at step 0 (the warmed-up student's stamped figures,
    measured the same way when it was built) and at every checkpoint, on the job's split."""
    from ctopd.demo.measure import accuracy, sequence_kl
    from ctopd.demo.stages import STAMP
    from ctopd.training.checkpoint import list_checkpoints

    settings, out = job["settings"], Path(job["out"])
    data = out / f"{job['split']}.jsonl"
    points = []
    if job["curve"] and job["split"] == "test":
        start = json.loads((student_dir / STAMP).read_text(encoding="utf-8"))["result"]
        points.append(
            {
                "step": 0,
                "accuracy": start["accuracy"],
                "kl": start["kl"],
                "noncanonical": start["noncanonical"],
            }
        )
    checkpoints = list_checkpoints(run_dir) if job["curve"] else list_checkpoints(run_dir)[-1:]
    for checkpoint in checkpoints:
        model = checkpoint / "student"
        samples = sequence_kl(model, out / "teacher", data, settings)
        points.append(
            {
                "step": int(checkpoint.name.split("-")[-1]),
                "accuracy": accuracy(model, data, settings),
                **samples,
            }
        )
    return points


def _measure_extra(job: dict, run_dir: Path) -> dict[int, str]:
    """Outcomes on the job's ``outcomes_split`` (``extra_test.jsonl`` for test runs,
    ``extra_validation.jsonl`` for the calibration) by step: of every checkpoint when the job
    measures a curve, else of the final one; the final checkpoint's responses are kept in
    ``run_dir/<split>_responses.jsonl``. Empty without such a split (the sweep and the
    ablation read the validation split alone) or when the settings hold no problems for it."""
    from ctopd.demo.measure import outcomes
    from ctopd.training.checkpoint import list_checkpoints

    settings, out, split = job["settings"], Path(job["out"]), job.get("outcomes_split")
    if split is None or not getattr(settings, f"num_{split}"):
        return {}
    checkpoints = list_checkpoints(run_dir)
    if not job["curve"]:
        checkpoints = checkpoints[-1:]
    return {
        int(c.name.split("-")[-1]): outcomes(
            c / "student",
            out / f"{split}.jsonl",
            settings,
            responses_path=run_dir / f"{split}_responses.jsonl" if c == checkpoints[-1] else None,
        )
        for c in checkpoints
    }


def _measure_extra_sampled(job: dict, run_dir: Path) -> str | None:
    """Sampled outcomes of the final checkpoint on the job's ``outcomes_split``
    (:func:`ctopd.demo.measure.outcomes` with ``sampled=True``); ``None`` without the split or
    without ``DemoSettings.sampled_temperature``. Only the final model: a sampled score per
    checkpoint would double the demo's measuring time."""
    from ctopd.demo.measure import outcomes
    from ctopd.training.checkpoint import list_checkpoints

    settings, out, split = job["settings"], Path(job["out"]), job.get("outcomes_split")
    if (
        split is None
        or not getattr(settings, f"num_{split}")
        or settings.sampled_temperature is None
    ):
        return None
    final = list_checkpoints(run_dir)[-1]
    return outcomes(
        final / "student",
        out / f"{split}.jsonl",
        settings,
        responses_path=run_dir / f"{split}_sampled_responses.jsonl",
        sampled=True,
    )


def gap_closed(accuracy: float | None, start: float, teacher: float) -> float | None:
    """``(accuracy - start) / (teacher - start)``: the share of the student → teacher gap a run
    closed (``None`` when there is no gap)."""
    if accuracy is None or abs(teacher - start) < 1e-12:
        return None
    return (accuracy - start) / (teacher - start)


def summarize_method(
    runs: list[dict],
    *,
    start: float,
    teacher: float,
    extra_start: float | None = None,
    extra_teacher: float | None = None,
    extra_sampled_start: float | None = None,
    extra_sampled_teacher: float | None = None,
) -> dict:
    """One method over its seeds: means (and the accuracy's std), ``gap_closed`` and each
    seed's run (with its own ``gap_closed``); the same on the extra test split
    (``extra_accuracy_mean``, ``extra_accuracy_std``, ``extra_gap_closed`` from the start's and
    the teacher's extra accuracies) and for its sampled accuracy there
    (``extra_sampled_accuracy_mean``, ``..._std``, ``extra_sampled_gap_closed``), ``None``
    where it was not measured."""
    runs = sorted(runs, key=lambda r: r["seed"])
    runs = [{**r, "gap_closed": gap_closed(r["accuracy"], start, teacher)} for r in runs]
    accuracies = [r["accuracy"] for r in runs]
    mean = statistics.fmean(accuracies)
    extra = [r.get("extra_accuracy") for r in runs]
    extra_mean = statistics.fmean(extra) if extra and None not in extra else None
    sampled = [r.get("extra_sampled_accuracy") for r in runs]
    sampled_mean = statistics.fmean(sampled) if sampled and None not in sampled else None
    return {
        "accuracy": mean,
        "accuracy_mean": mean,
        "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "gap_closed": gap_closed(mean, start, teacher),
        "extra_accuracy_mean": extra_mean,
        "extra_accuracy_std": (
            statistics.stdev(extra) if extra_mean is not None and len(extra) > 1 else None
        ),
        "extra_gap_closed": (
            None
            if extra_mean is None or extra_start is None
            else gap_closed(extra_mean, extra_start, extra_teacher)
        ),
        "extra_sampled_accuracy_mean": sampled_mean,
        "extra_sampled_accuracy_std": (
            statistics.stdev(sampled) if sampled_mean is not None and len(sampled) > 1 else None
        ),
        "extra_sampled_gap_closed": (
            None
            if sampled_mean is None or extra_sampled_start is None
            else gap_closed(sampled_mean, extra_sampled_start, extra_sampled_teacher)
        ),
        "kl": _mean([r["kl"] for r in runs]),
        "coverage": _mean([r["coverage"] for r in runs]),
        "aligned_coverage": _mean([r["aligned_coverage"] for r in runs]),
        "unaligned_share": _mean([r["unaligned_share"] for r in runs]),
        "noncanonical": _mean([r["noncanonical"] for r in runs]),
        "train_kl": _mean([r["train_kl"] for r in runs]),
        "seconds": statistics.fmean(r["seconds"] for r in runs),
        "eval_seconds": statistics.fmean(r["eval_seconds"] for r in runs),
        "steps": runs[0]["steps"],
        "lr": runs[0]["lr"],
        "runs": runs,
    }


def _share(outcomes: str) -> float:
    """Accuracy of an outcome string (``1`` right, ``0`` wrong per problem)."""
    return outcomes.count("1") / max(len(outcomes), 1)


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
