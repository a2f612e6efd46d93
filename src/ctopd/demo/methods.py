"""One demo run (a method, a seed, from a warmed-up student) and the per-method summary. A run
saves a checkpoint every ``eval_every`` steps, measured afterwards in big batches and deleted; a
test run keeps its final model in ``runs/<run>-seed<k>/final/``.
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
    """One run of a :func:`method_job` from its warmed-up student (in a worker process): the
    final model's ``accuracy``, ``kl``, ``noncanonical`` on the job's split; ``coverage`` and
    ``train_kl`` (``None`` for SFT); ``extra_`` and ``extra_sampled_`` accuracy and outcomes on
    its ``outcomes_split`` (``None`` without one); ``seconds`` training, ``eval_seconds``
    measuring; and the ``curve`` per checkpoint (from step 0) and per training step."""
    from ctopd.demo.measure import coverage
    from ctopd.demo.stages import one_thread
    from ctopd.training.metrics import read_metrics

    one_thread()
    out, run_dir = Path(job["out"]), Path(job["run_dir"])
    kind, objective = RUN_SPECS[job["name"]]
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = train_run(job, out / kind, objective, run_dir)
    started = time.perf_counter()
    rows = read_metrics(run_dir)
    points, sampled = _measure(job, out / kind, run_dir)
    if job["split"] != "test":  # the demo's own runs keep their final model
        shutil.rmtree(run_dir / "final", ignore_errors=True)
    for checkpoint in run_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)
    extra = [p for p in points if "outcomes" in p]
    last = extra[-1]["outcomes"] if extra else None
    sft = objective == "sft"
    shares = (None,) * 3 if sft else coverage(rows)
    return {
        "name": job["name"],
        "student": kind,
        "method": objective,
        "seed": job["seed"],
        "lr": job["lr"],
        "steps": summary["steps"],
        **{key: points[-1][key] for key in ("accuracy", "kl", "noncanonical")},
        "extra_accuracy": None if last is None else _share(last),
        "extra_outcomes": last,
        "extra_sampled_accuracy": None if sampled is None else _share(sampled),
        "extra_sampled_outcomes": sampled,
        **dict(zip(("coverage", "aligned_coverage", "unaligned_share"), shares)),
        "train_kl": None if sft else summary["final_metrics"].get("kl"),
        "seconds": summary["seconds"],
        "eval_seconds": time.perf_counter() - started,
        "curve": {
            **{key: [p[key] for p in points] for key in ("step", "accuracy", "kl")},
            "train_kl_step": [r["step"] for r in rows if "kl" in r],
            "train_kl": [r["kl"] for r in rows if "kl" in r],
            "extra_step": [p["step"] for p in extra],
            "extra_accuracy": [_share(p["outcomes"]) for p in extra],
            "extra_outcomes": [p["outcomes"] for p in extra],
        },
    }


def train_run(job: dict, student_dir: Path, objective: str, run_dir: Path) -> dict:
    """Train a :func:`method_job` from ``student_dir`` into ``run_dir`` and return the training
    summary: OPD with ``objective``, or for ``sft`` continued SFT on its seed's slice of the
    teacher samples (the same texts for both students)."""
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
    # annealed warm-up every method lost accuracy as its rate grew, SFT included).
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


def _measure(job: dict, student_dir: Path, run_dir: Path) -> tuple[list[dict], str | None]:
    """Per checkpoint (with ``curve``, else the last): ``step``, ``accuracy``, ``kl``,
    ``noncanonical`` on the job's split and greedy ``outcomes`` on its ``outcomes_split``; on a
    test curve step 0 first (the start's stamped figures). And the final model's sampled
    outcomes (only the final's: per checkpoint would double the measuring time). The last
    responses are kept in ``run_dir/<split>_[sampled_]responses.jsonl``."""
    from ctopd.demo.measure import accuracy, outcomes, sequence_kl
    from ctopd.demo.stages import STAMP
    from ctopd.training.checkpoint import list_checkpoints

    settings, out, split = job["settings"], Path(job["out"]), job.get("outcomes_split")
    data, points = out / f"{job['split']}.jsonl", []
    if job["curve"] and job["split"] == "test":
        start = json.loads((student_dir / STAMP).read_text(encoding="utf-8"))["result"]
        points.append({"step": 0, **{k: start[k] for k in ("accuracy", "kl", "noncanonical")}})
    if split is not None and not getattr(settings, f"num_{split}"):
        split = None
    checkpoints = list_checkpoints(run_dir)
    checkpoints = checkpoints if job["curve"] else checkpoints[-1:]
    for checkpoint in checkpoints:
        model = checkpoint / "student"
        kl = sequence_kl(model, out / "teacher", data, settings)
        point = {"step": _step(checkpoint), "accuracy": accuracy(model, data, settings), **kl}
        if split is not None:
            last = checkpoint == checkpoints[-1]
            responses = run_dir / f"{split}_responses.jsonl" if last else None
            point["outcomes"] = outcomes(model, out / f"{split}.jsonl", settings, responses)
        points.append(point)
    if split is None or settings.sampled_temperature is None:
        return points, None
    responses = run_dir / f"{split}_sampled_responses.jsonl"
    model = checkpoints[-1] / "student"
    return points, outcomes(model, out / f"{split}.jsonl", settings, responses, sampled=True)


def gap_closed(accuracy: float | None, start: float | None, teacher: float | None) -> float | None:
    """``(accuracy - start) / (teacher - start)``: the share of the student → teacher gap a run
    closed (``None`` when a figure is missing or there is no gap)."""
    if None in (accuracy, start, teacher) or abs(teacher - start) < 1e-12:
        return None
    return (accuracy - start) / (teacher - start)


def summarize_method(
    runs: list[dict],
    *,
    start: float,
    teacher: float,
    extra_start: dict | None = None,
    extra_teacher: dict | None = None,
) -> dict:
    """One method over its seeds: means, the accuracy's std, ``gap_closed`` and each seed's run;
    the same on the extra test split, greedy (``extra_``) and sampled (``extra_sampled_``), gaps
    from the start's and the teacher's rows there (``extra_start``, ``extra_teacher``)."""
    runs = sorted(runs, key=lambda r: r["seed"])
    runs = [{**r, "gap_closed": gap_closed(r["accuracy"], start, teacher)} for r in runs]
    accuracies = [r["accuracy"] for r in runs]
    mean = statistics.fmean(accuracies)
    summary = {"accuracy": mean, "accuracy_mean": mean, "accuracy_std": _std(accuracies) or 0.0}
    summary["gap_closed"] = gap_closed(mean, start, teacher)
    for key, field in (("extra", "accuracy"), ("extra_sampled", "sampled_accuracy")):
        values = [r.get(f"{key}_accuracy") for r in runs]
        measured = None not in values
        extra_mean = statistics.fmean(values) if measured else None
        first, top = (extra_start or {}).get(field), (extra_teacher or {}).get(field)
        summary[f"{key}_accuracy_mean"] = extra_mean
        summary[f"{key}_accuracy_std"] = _std(values) if measured else None
        summary[f"{key}_gap_closed"] = gap_closed(extra_mean, first, top)
    for key in ("kl", "coverage", "aligned_coverage", "unaligned_share", "noncanonical"):
        summary[key] = _mean([r[key] for r in runs])
    return {
        **summary,
        "train_kl": _mean([r["train_kl"] for r in runs]),
        "seconds": statistics.fmean(r["seconds"] for r in runs),
        "eval_seconds": statistics.fmean(r["eval_seconds"] for r in runs),
        "steps": runs[0]["steps"],
        "lr": runs[0]["lr"],
        "runs": runs,
    }


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def _share(outcomes: str) -> float:
    """Accuracy of an outcome string (``1`` right, ``0`` wrong per problem)."""
    return outcomes.count("1") / max(len(outcomes), 1)


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
