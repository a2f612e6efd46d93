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

from ctopd.demo.settings import FULL, QUICK, RUNS, settings_dict


def run_sweep(output_dir: str | Path = "ctopd-demo", *, quick: bool = False,
              methods: tuple[str, ...] = RUNS, force: bool = False, workers: int | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Sweep the learning rates and write ``sweep.json`` and ``sweep.md`` into ``output_dir``.

    Args:
        output_dir: the demo folder (teacher, samples and students are built or reused).
        quick: the CI configuration.
        methods: the run names to sweep.
        force: rebuild the cached models first.
        workers: runs side by side (default: CPU cores, at most 2).
        log: where progress lines go.

    Returns:
        The ``sweep.json`` content: ``rows`` (``name``, ``lr``, ``accuracy``, ``kl``,
        ``seconds`` per run), ``best`` (run name → chosen lr), ``command``, ``steps``, ...
    """
    from ctopd.demo.methods import method_job, run_method
    from ctopd.demo.report import sweep_markdown
    from ctopd.demo.run import build_models, demo_pool, has_sft

    started = time.perf_counter()
    settings = QUICK if quick else FULL
    out = Path(output_dir)
    with demo_pool(workers) as (pool, size):
        build_models(out, settings, seeds=1, sft=has_sft(methods), pool=pool, workers=size,
                     force=force, log=log)
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
        "command": sweep_command(quick=quick, methods=methods), "commit": _commit(),
        "rows": rows, "best": choose(rows), "quick": quick,
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


def choose(rows: list[dict]) -> dict[str, float]:
    """Per run name, the learning rate with the highest validation accuracy (ties: the lower
    KL, then the smaller rate)."""
    best: dict[str, dict] = {}
    for row in rows:
        key = (-row["accuracy"], row["kl"], row["lr"])
        if row["name"] not in best or key < best[row["name"]]["key"]:
            best[row["name"]] = {"key": key, "lr": row["lr"]}
    return {name: entry["lr"] for name, entry in best.items()}


def sweep_command(*, quick: bool, methods: tuple[str, ...]) -> str:
    """The command line that reruns this sweep."""
    parts = ["ctopd demo --sweep"]
    if quick:
        parts.append("--quick")
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
