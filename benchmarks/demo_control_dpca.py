"""DPCA with identical tokenizers: is its deficit against SFT its estimator or its chunks?

With identical tokenizers every DPCA chunk is one token, so nothing cross-tokenizer is left:
DPCA's per-chunk credit becomes the realised-token estimator of reverse KL (the teacher's and
the student's log-probability of the token the student sampled), against the full-distribution
reverse KL of same-tokenizer ``opd``. This script trains DPCA from the demo's warmed-up control
(the demo's budget, batch and schedule; each learning rate of ``--lrs``, ``--seeds`` seeds),
scores each final model greedy and sampled on the extra test problems exactly as the demo does
(:func:`ctopd.demo.measure.outcomes`), and compares it, paired and with the demo's intervals
(:mod:`ctopd.demo.compare`), with the control's OPD and SFT runs of the demo's
``results.json``.

Usage (from the repository root, after ``ctopd demo --output-dir ctopd-demo``)::

    python benchmarks/demo_control_dpca.py --demo-dir ctopd-demo [--lrs 3e-4,1e-3]
        [--seeds 3] [--json control_dpca.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from ctopd.demo.compare import difference, outcome_matrix
from ctopd.demo.settings import DemoSettings


def settings_from_results(values: dict) -> DemoSettings:
    """The :class:`DemoSettings` a ``results.json`` was written with (JSON lists back to
    tuples; fields this version does not know are dropped)."""
    def tuples(value):
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value

    known = {field.name for field in dataclasses.fields(DemoSettings)}
    return DemoSettings(**{k: tuples(v) for k, v in values.items() if k in known})


def train_and_score(job: dict) -> dict:
    """One same-tokenizer DPCA run from ``control/`` (runs in a worker process)."""
    from ctopd.demo.measure import outcomes
    from ctopd.demo.methods import _train, method_job
    from ctopd.demo.stages import one_thread

    one_thread()
    out, settings = Path(job["out"]), job["settings"]
    run_dir = out / "runs" / "control_dpca" / f"lr{job['lr']:g}-seed{job['seed']}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run = method_job("control_opd", job["seed"], out, settings, lr=job["lr"], run_dir=run_dir,
                     curve=False)
    _train(run, out / "control", "dpca", run_dir)
    data = out / "extra_test.jsonl"
    return {"lr": job["lr"], "seed": job["seed"],
            "greedy": outcomes(run_dir / "final", data, settings),
            "sampled": outcomes(run_dir / "final", data, settings, sampled=True)}


def share(text: str) -> float:
    return text.count("1") / len(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, required=True)
    parser.add_argument("--lrs", default="3e-4,1e-3")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results_path = args.demo_dir / "results.json"
    if not results_path.is_file():
        parser.error(f"{results_path} not found: run ctopd demo --output-dir {args.demo_dir}")
    results = json.loads(results_path.read_text(encoding="utf-8"))
    settings = settings_from_results(results["settings"])
    controls = {name: [run for run in results["controls"][name]["runs"]]
                for name in ("opd", "sft")}
    if any(run.get("extra_sampled_outcomes") is None for runs in controls.values()
           for run in runs):
        parser.error("the demo's results.json has no sampled outcomes: rerun ctopd demo")
    try:
        lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--lrs takes numbers separated by commas; got {args.lrs!r}")
    jobs = [{"out": str(args.demo_dir), "settings": settings, "lr": lr, "seed": seed}
            for lr in lrs for seed in range(args.seeds)]
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        rows = list(pool.map(train_and_score, jobs))

    field = {"greedy": "extra_outcomes", "sampled": "extra_sampled_outcomes"}
    print("Same-tokenizer runs from the demo's control, 2,000 extra test problems "
          f"({settings.method_steps} steps x {settings.method_batch} prompts):\n")
    print("| run | lr | greedy accuracy | sampled accuracy | − OPD, greedy [95%] "
          "| − SFT, greedy [95%] | − OPD, sampled [95%] | − SFT, sampled [95%] |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in ("opd", "sft"):
        runs = controls[name]
        print(f"| same-tokenizer {name.upper()} (the demo's) | {runs[0]['lr']:.0e} | "
              f"{sum(share(r['extra_outcomes']) for r in runs) / len(runs):.3f} | "
              f"{sum(share(r['extra_sampled_outcomes']) for r in runs) / len(runs):.3f} "
              "| | | | |")
    summary = []
    for lr in lrs:
        mine = [r for r in rows if r["lr"] == lr]
        cells, entry = [], {"lr": lr, "seeds": mine}
        for metric in ("greedy", "sampled"):
            dpca = outcome_matrix([r[metric] for r in mine])
            for name in ("opd", "sft"):
                other = outcome_matrix([r[field[metric]] for r in controls[name]])
                found = difference(dpca, other)
                entry[f"{metric}_minus_{name}"] = found
                cells.append(f"{found['value']:+.3f} [{found['low']:+.3f}, {found['high']:+.3f}]")
        greedy = sum(share(r["greedy"]) for r in mine) / len(mine)
        sampled = sum(share(r["sampled"]) for r in mine) / len(mine)
        print(f"| same-tokenizer DPCA | {lr:.0e} | {greedy:.3f} | {sampled:.3f} | "
              + " | ".join(cells) + " |")
        summary.append({**entry, "greedy": greedy, "sampled": sampled})
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
