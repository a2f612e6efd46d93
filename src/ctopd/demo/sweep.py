"""``ctopd demo --sweep``: each run name's learning rate, chosen on the validation split.

For every run name (``simct``, ``dpca``, ``shared_only``, ``sft``, ``control_opd``,
``control_sft``) and every learning rate of its grid (``DemoSettings.sweep_lrs``): one run,
seed 0, ``sweep_steps`` steps from the same warmed-up student the demo uses, then greedy accuracy
and the common KL on ``validation.jsonl`` (disjoint from the training and test sets). The best
validation accuracy (ties: the lower KL) is chosen. ``sweep.json`` and ``sweep.md`` record every
run and the command that reproduces them; the chosen values are copied into
``DemoSettings.method_lrs`` by hand. The demo never reads the sweep, and nothing here looks at the
test set.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ctopd.demo.settings import RUNS, SIMCT_SPACES, demo_settings, settings_dict


def run_sweep(output_dir: str | Path = "ctopd-demo", *, quick: bool = False,
              methods: tuple[str, ...] = RUNS, force: bool = False, workers: int | None = None,
              matched: bool = True, log: Callable[[str], None] = print) -> dict:
    """Sweep the learning rates and write ``sweep.json`` and ``sweep.md`` into ``output_dir``.

    Args:
        output_dir: the demo folder (teacher, samples and students are built or reused).
        quick: the CI configuration.
        methods: the run names to sweep.
        force: rebuild the cached models first.
        workers: runs side by side (default: CPU cores, at most 2).
        matched: the matched start's students (the default), else the fixed warm-up's
            (:func:`ctopd.demo.settings.demo_settings`).
        log: where progress lines go.

    Returns:
        The ``sweep.json`` content: ``rows`` (``name``, ``lr``, ``accuracy``, ``kl``,
        ``seconds`` per run), ``best`` (run name → chosen lr), ``starts`` (per student, its
        validation accuracy and KL before any run), ``command``, ``steps``, ...
    """
    from ctopd.demo.measure import measure_model
    from ctopd.demo.methods import method_job, run_method
    from ctopd.demo.report import sweep_markdown
    from ctopd.demo.run import build_models, demo_pool, has_sft
    from ctopd.demo.settings import RUN_SPECS
    from ctopd.demo.stages import STUDENT_FOLDERS

    started = time.perf_counter()
    settings = demo_settings(quick=quick, matched=matched)
    out = Path(output_dir)
    with demo_pool(workers) as (pool, size):
        build_models(out, settings, seeds=1, sft=has_sft(methods), pool=pool, workers=size,
                     force=force, log=log)
        # Where each student starts on the validation split: the reference for every row.
        kinds = sorted({RUN_SPECS[name][0] for name in methods})
        starts = dict(zip(kinds, pool.map(measure_model, [
            dict(model=str(out / STUDENT_FOLDERS[kind]), teacher=str(out / "teacher"),
                 data=str(out / "validation.jsonl"), settings=settings) for kind in kinds])))
        for kind, start in starts.items():
            log(f"[demo] sweep: the warmed-up {kind} on validation.jsonl: accuracy "
                f"{start['accuracy']:.3f}, KL {start['kl']:.3f}")
        jobs = [method_job(name, 0, out, settings, lr=lr, steps=settings.sweep_steps,
                           split="validation", curve=False,
                           run_dir=out / "runs" / "sweep" / f"{name}-lr{lr:g}")
                for name in methods for lr in settings.sweep_grid(name)]
        log(f"[demo] sweep: {len(jobs)} runs ({', '.join(methods)}), "
            f"{settings.sweep_steps} steps x {settings.method_batch} prompts each, seed 0, "
            f"scored on validation.jsonl")
        rows = []
        for run in pool.map(run_method, jobs):
            rows.append({key: run[key] for key in ("name", "lr", "accuracy", "kl", "seconds")})
            log(f"[demo] sweep {run['name']:<11} lr {run['lr']:.0e}: validation accuracy "
                f"{run['accuracy']:.3f}, KL {run['kl']:.3f}")

    sweep = {
        "split": "validation", "num_validation": settings.num_validation, "seed": 0,
        "steps": settings.sweep_steps, "batch": settings.method_batch,
        "command": sweep_command(quick=quick, methods=methods, matched=matched),
        "commit": _commit(),
        "rows": rows, "best": choose(rows), "starts": starts, "quick": quick,
        "settings": settings_dict(settings), "seconds": time.perf_counter() - started,
    }
    (out / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n", encoding="utf-8")
    table = sweep_markdown(sweep)
    (out / "sweep.md").write_text(table + "\n", encoding="utf-8")
    log("\n" + table + "\n")
    for name, lr in sweep["best"].items():
        log(f"[demo] chosen lr for {name}: {lr:g}")
    log(f"[demo] wrote {out / 'sweep.json'} and {out / 'sweep.md'} in {sweep['seconds']:.0f} s; "
        "copy the chosen values into DemoSettings.method_lrs (src/ctopd/demo/settings.py)")
    return sweep


def run_ablation(output_dir: str | Path = "ctopd-demo", *, quick: bool = False,
                 force: bool = False, workers: int | None = None, matched: bool = True,
                 log: Callable[[str], None] = print) -> dict:
    """``ctopd demo --ablation``: SimCT's supervision spaces (:data:`SIMCT_SPACES`) side by side
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
    from ctopd.demo.report import ablation_markdown
    from ctopd.demo.run import build_models, demo_pool

    started = time.perf_counter()
    settings = demo_settings(quick=quick, matched=matched)
    out = Path(output_dir)
    with demo_pool(workers) as (pool, size):
        build_models(out, settings, seeds=1, sft=False, pool=pool, workers=size, force=force,
                     log=log)
        jobs, labels = [], []
        for index, (label, options) in enumerate(SIMCT_SPACES):
            for seed in range(settings.ablation_seeds):
                jobs.append(method_job("simct", seed, out, settings, split="validation",
                                       curve=False, objective_options=options,
                                       run_dir=out / "runs" / "ablation" / f"{index}-seed{seed}"))
                labels.append(label)
        log(f"[demo] ablation: {len(SIMCT_SPACES)} SimCT spaces x {settings.ablation_seeds} "
            f"seeds, {settings.method_steps} steps x {settings.method_batch} prompts at lr "
            f"{settings.lr('simct'):g}, scored on validation.jsonl")
        rows = []
        for label, run in zip(labels, pool.map(run_method, jobs)):
            rows.append({"space": label, **{k: run[k] for k in
                                            ("seed", "accuracy", "kl", "coverage", "seconds")}})
            log(f"[demo] ablation {label:<22} seed {run['seed']}: validation accuracy "
                f"{run['accuracy']:.3f}, KL {run['kl']:.3f}")
    from ctopd.demo.measure import accuracy

    start = accuracy(out / "student", out / "validation.jsonl", settings)
    spaces = {}
    for label, options in SIMCT_SPACES:
        mine = [r for r in rows if r["space"] == label]
        accuracies = [r["accuracy"] for r in mine]
        spaces[label] = {
            "options": options, "accuracy_mean": statistics.fmean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "kl": statistics.fmean(r["kl"] for r in mine),
            "coverage": statistics.fmean(r["coverage"] for r in mine)}
    ablation = {
        "split": "validation", "num_validation": settings.num_validation,
        "seeds": settings.ablation_seeds, "steps": settings.method_steps,
        "batch": settings.method_batch, "lr": settings.lr("simct"),
        "student_start_accuracy": start,
        "command": "ctopd demo --ablation" + (" --quick" if quick else "")
        + ("" if matched else " --fixed-warmup"),
        "commit": _commit(), "rows": rows, "spaces": spaces,
        "best": max(spaces, key=lambda k: (spaces[k]["accuracy_mean"], -spaces[k]["kl"])),
        "quick": quick, "seconds": time.perf_counter() - started,
    }
    (out / "ablation.json").write_text(json.dumps(ablation, indent=2) + "\n", encoding="utf-8")
    table = ablation_markdown(ablation)
    (out / "ablation.md").write_text(table + "\n", encoding="utf-8")
    log("\n" + table + "\n")
    log(f"[demo] wrote {out / 'ablation.json'} and {out / 'ablation.md'} in "
        f"{ablation['seconds']:.0f} s")
    return ablation


def choose(rows: list[dict]) -> dict[str, float]:
    """Per run name, the learning rate with the highest validation accuracy (ties: the lower
    KL, then the smaller rate)."""
    best: dict[str, dict] = {}
    for row in rows:
        key = (-row["accuracy"], row["kl"], row["lr"])
        if row["name"] not in best or key < best[row["name"]]["key"]:
            best[row["name"]] = {"key": key, "lr": row["lr"]}
    return {name: entry["lr"] for name, entry in best.items()}


def sweep_command(*, quick: bool, methods: tuple[str, ...], matched: bool = True) -> str:
    """The command line that reruns this sweep."""
    parts = ["ctopd demo --sweep"]
    if quick:
        parts.append("--quick")
    if not matched:
        parts.append("--fixed-warmup")
    if tuple(methods) != RUNS:
        parts.append("--methods " + ",".join(methods))
    return " ".join(parts)


def _commit() -> str | None:
    """The checkout's commit, when the package runs from a git checkout."""
    try:
        result = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10, cwd=Path(__file__).parent, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None
