"""DPCA with identical tokenizers: is its deficit against SFT its estimator or its chunks? And
does a larger batch close it?

With identical tokenizers every DPCA chunk is one token, so nothing cross-tokenizer is left:
DPCA's per-chunk credit becomes the realised-token estimator of reverse KL (the teacher's and
the student's log-probability of the token the student sampled), against the full-distribution
reverse KL of same-tokenizer ``opd``. This script trains DPCA from the demo's warmed-up control
(the demo's budget and schedule; each learning rate of ``--lrs``, ``--seeds`` seeds), scores
each final model greedy and sampled on the extra test problems exactly as the demo does
(:func:`ctopd.demo.measure.outcomes`), and compares it, paired and with the demo's intervals
(:mod:`testbed_lib.compare`), with the control's OPD and SFT runs of the demo's
``results.json``.

``--batch`` trains with that many prompts per step instead of the demo's (same steps, so
``batch / method_batch`` times the rollouts): the test of whether DPCA's deficit is the noise
of its gradient (``research/demo_gradient_noise.py``). ``--student student`` trains the
cross-tokenizer student's DPCA instead and compares it with the demo's ``simct``, ``dpca`` and
continued SFT.

``--objective simct``, ``opd`` or ``sft`` trains that method instead of DPCA (the
cross-tokenizer student's ``simct``, the control's same-tokenizer ``opd``, or continued SFT on
the teacher samples; with ``--batch`` each SFT seed takes ``batch × steps`` samples of the
pool, drawn first if the pool is shorter), so that the methods can be compared at a batch
other than the demo's.

``--sweep`` chooses the learning rate first, as ``python research/testbed.py --sweep`` does but at this
script's batch: seed 0, ``sweep_steps`` steps at each rate of ``--lrs``, greedy accuracy on the
2,000 extra validation problems (sampled accuracy printed beside it; ties: the lower rate). The
test runs then use the chosen rate only. A rate chosen at the demo's batch, where a DPCA step
is mostly noise, need not suit a batch four times larger.

``--compare A.json B.json ...`` trains nothing: it reads runs this script saved with
``--json`` (one rate each) and prints their paired differences, row minus column, greedy and
sampled, e.g. the three methods at 128 prompts per step against one another. With
``--demo-dir`` and a control ``opd`` file among them, it also prints the fraction of its gap
each cross-tokenizer run closes as a fraction of the one the control's OPD closes (docs/concepts/judging.md), from the starts and the teacher of the demo's ``results.json``.

Usage (from the repository root, after ``ctopd demo --output-dir ctopd-demo``)::

    python research/demo_control_dpca.py --demo-dir ctopd-demo [--lrs 3e-4,1e-3]
        [--seeds 3] [--batch 128] [--student control|student] [--objective dpca|simct|opd|sft]
        [--sweep] [--json control_dpca.json]
    python research/demo_control_dpca.py --compare simct.json dpca.json sft.json
        [--demo-dir ctopd-demo]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from testbed_lib.compare import difference, outcome_matrix
from testbed_lib.settings import StudySettings as DemoSettings


def settings_from_results(values: dict) -> DemoSettings:
    """The :class:`DemoSettings` a ``results.json`` was written with (JSON lists back to
    tuples; fields this version does not know are dropped)."""

    def tuples(value):
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value

    known = {field.name for field in dataclasses.fields(DemoSettings)}
    return DemoSettings(**{k: tuples(v) for k, v in values.items() if k in known})


def train_and_score(job: dict) -> dict:
    """One run (``job["objective"]``, DPCA by default) from ``control/`` or ``student/`` (runs
    in a worker process)."""
    from ctopd.demo.measure import outcomes
    from ctopd.demo.methods import method_job, train_run
    from ctopd.demo.stages import one_thread

    one_thread()
    out, settings = Path(job["out"]), job["settings"]
    kind, split = job["student"], job.get("split", "test")
    objective = job.get("objective", "dpca")
    folder = f"{kind}_{objective}" + ("" if split == "test" else "_sweep")
    run_dir = (
        out / "runs" / folder / f"lr{job['lr']:g}-batch{settings.method_batch}-seed{job['seed']}"
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    name = "control_opd" if kind == "control" else "dpca"
    steps = settings.method_steps if split == "test" else settings.sweep_steps
    run = method_job(
        name,
        job["seed"],
        out,
        settings,
        lr=job["lr"],
        run_dir=run_dir,
        steps=steps,
        split=split,
        curve=False,
    )
    train_run(run, out / kind, objective, run_dir)
    data = out / f"extra_{split}.jsonl"
    scores = {
        "lr": job["lr"],
        "seed": job["seed"],
        "greedy": outcomes(run_dir / "final", data, settings),
        "sampled": outcomes(run_dir / "final", data, settings, sampled=True),
    }
    return scores


METHOD_NAMES = {"dpca": "DPCA", "simct": "SimCT", "sft": "continued SFT", "opd": "OPD"}


def share(text: str) -> float:
    return text.count("1") / len(text)


def compare_saved(paths: list[Path], demo_dir: Path | None = None) -> None:
    """Print the paired differences (row − column) of runs saved with ``--json``, and with
    ``demo_dir`` the gap fractions against a control OPD run among them."""
    kinds = {"control": "same-tokenizer ", "student": ""}
    runs = []
    for path in paths:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["runs"] if isinstance(data, dict) else data
        if len(entries) != 1:
            raise SystemExit(
                f"error: {path} holds {len(entries)} rates; --compare takes files "
                f"of one rate each (rerun with one --lrs value)"
            )
        entry = entries[0]
        label = (
            f"{kinds[entry.get('student', 'student')]}"
            f"{METHOD_NAMES[entry.get('objective', 'dpca')]} "
            f"({entry['batch']} prompts, lr {entry['lr']:.0e})"
        )
        runs.append((label, entry))
    for metric in ("greedy", "sampled"):
        print(
            f"\n{metric.capitalize()} accuracy, row − column [95%], paired over seeds and "
            f"problems:\n"
        )
        print("| run | accuracy | " + " | ".join(f"− {label}" for label, _ in runs) + " |")
        print("|" + " --- |" * (2 + len(runs)))
        for label, entry in runs:
            mine = outcome_matrix([r[metric] for r in entry["seeds"]])
            cells = []
            for _, other in runs:
                if other is entry:
                    cells.append("")
                    continue
                found = difference(mine, outcome_matrix([r[metric] for r in other["seeds"]]))
                cells.append(f"{found['value']:+.3f} [{found['low']:+.3f}, {found['high']:+.3f}]")
            print(f"| {label} | {entry[metric]:.3f} | " + " | ".join(cells) + " |")
    control = [
        entry
        for _, entry in runs
        if entry.get("student") == "control" and entry.get("objective") == "opd"
    ]
    if demo_dir is None or not control:
        return
    from testbed_lib.compare import gap_fraction_ratio

    extra = json.loads((demo_dir / "results.json").read_text(encoding="utf-8"))["extra_test"]
    field = {"greedy": "outcomes", "sampled": "sampled_outcomes"}
    print("\nGap closed as a fraction of the control OPD's (its own gap, same batch) [95%]:\n")
    print("| run | greedy | sampled |")
    print("| --- | --- | --- |")
    for label, entry in runs:
        if entry.get("student", "student") != "student":
            continue
        cells = []
        for metric in ("greedy", "sampled"):

            def start(kind, metric=metric):
                return outcome_matrix([extra[kind][field[metric]]])

            found = gap_fraction_ratio(
                outcome_matrix([r[metric] for r in entry["seeds"]]),
                start("student"),
                outcome_matrix([r[metric] for r in control[0]["seeds"]]),
                start("control"),
                start("teacher"),
            )
            cells.append(f"{found['value']:.2f} [{found['low']:.2f}, {found['high']:.2f}]")
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        help="print the paired differences of runs saved with --json, and exit",
    )
    parser.add_argument("--demo-dir", type=Path)
    parser.add_argument("--lrs", default="3e-4,1e-3")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="prompts per step (default: the demo's method_batch)",
    )
    parser.add_argument(
        "--student",
        choices=("control", "student"),
        default="control",
        help="train the same-tokenizer control (default) or the cross-tokenizer student",
    )
    parser.add_argument(
        "--objective",
        choices=("dpca", "simct", "opd", "sft"),
        default="dpca",
        help="the method to train (simct: the cross-tokenizer student only; "
        "opd: the same-tokenizer control only)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="choose the rate among --lrs on the extra validation problems "
        "first (seed 0, the demo's sweep_steps), then test that rate only",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.compare:
        missing = [str(path) for path in args.compare if not path.is_file()]
        if missing:
            parser.error(f"--compare: no such file: {', '.join(missing)}")
        compare_saved(args.compare, args.demo_dir)
        return
    if args.demo_dir is None:
        parser.error("--demo-dir is required (the folder of a finished ctopd demo)")
    results_path = args.demo_dir / "results.json"
    if not results_path.is_file():
        parser.error(f"{results_path} not found: run ctopd demo --output-dir {args.demo_dir}")
    results = json.loads(results_path.read_text(encoding="utf-8"))
    settings = settings_from_results(results["settings"])
    if args.batch is not None:
        if args.batch < 1:
            parser.error(f"--batch must be a positive number of prompts; got {args.batch}")
        settings = dataclasses.replace(settings, method_batch=args.batch)
    if args.objective == "simct" and args.student == "control":
        parser.error(
            "--objective simct trains the cross-tokenizer student: add "
            "--student student (the control's full-distribution method is the demo's "
            "same-tokenizer OPD)"
        )
    if args.objective == "opd" and args.student == "student":
        parser.error(
            "--objective opd needs identical tokenizers: it trains the control "
            "(--student control); the cross-tokenizer student's counterpart is simct"
        )
    if args.student == "control":
        controls = {
            f"same-tokenizer {name.upper()}": results["controls"][name]["runs"]
            for name in ("opd", "sft")
        }
    else:
        labels = {"simct": "SimCT", "dpca": "DPCA", "sft": "continued SFT"}
        controls = {f"{label}": results["methods"][name]["runs"] for name, label in labels.items()}
    if any(run.get("extra_sampled_outcomes") is None for runs in controls.values() for run in runs):
        parser.error("the demo's results.json has no sampled outcomes: rerun ctopd demo")
    try:
        lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--lrs takes numbers separated by commas; got {args.lrs!r}")
    sweep = None
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        if args.objective == "sft":
            from ctopd.demo.samples import ensure_samples, samples_needed

            needed = samples_needed(settings, seeds=args.seeds, warmup=False, sft=True)
            ensure_samples(
                args.demo_dir, settings, needed, pool=pool, workers=2, force=False, log=print
            )
        if args.sweep:
            sweep = list(
                pool.map(
                    train_and_score,
                    [
                        {
                            "out": str(args.demo_dir),
                            "settings": settings,
                            "lr": lr,
                            "seed": 0,
                            "student": args.student,
                            "split": "validation",
                            "objective": args.objective,
                        }
                        for lr in lrs
                    ],
                )
            )
            print(
                f"Learning rate sweep at {settings.method_batch} prompts per step (seed 0, "
                f"{settings.sweep_steps} steps, 2,000 extra validation problems):\n"
            )
            print("| lr | greedy accuracy | sampled accuracy | chosen |")
            print("| --- | --- | --- | --- |")
            best = max(sweep, key=lambda r: (share(r["greedy"]), -r["lr"]))
            for r in sweep:
                print(
                    f"| {r['lr']:.0e} | {share(r['greedy']):.3f} | {share(r['sampled']):.3f} "
                    f"| {'yes' if r is best else ''} |"
                )
            print()
            lrs = [best["lr"]]
        jobs = [
            {
                "out": str(args.demo_dir),
                "settings": settings,
                "lr": lr,
                "seed": seed,
                "student": args.student,
                "objective": args.objective,
            }
            for lr in lrs
            for seed in range(args.seeds)
        ]
        rows = list(pool.map(train_and_score, jobs))

    field = {"greedy": "extra_outcomes", "sampled": "extra_sampled_outcomes"}
    who = (
        "Same-tokenizer runs from the demo's control"
        if args.student == "control"
        else "Runs from the demo's cross-tokenizer student"
    )
    demo_batch = results["settings"]["method_batch"]
    label = METHOD_NAMES[args.objective]
    if args.student == "control":
        label = f"same-tokenizer {label}"
    print(
        f"{who}, 2,000 extra test problems ({settings.method_steps} steps; the demo's runs "
        f"at {demo_batch} prompts per step, {label} here at {settings.method_batch}):\n"
    )
    heads = [
        f"− {name.split()[-1]}, {metric} [95%]"
        for metric in ("greedy", "sampled")
        for name in controls
    ]
    print(
        "| run | prompts per step | lr | greedy accuracy | sampled accuracy | "
        + " | ".join(heads)
        + " |"
    )
    print("|" + " --- |" * (5 + len(heads)))
    for name, runs in controls.items():
        print(
            f"| {name} (the demo's) | {demo_batch} | {runs[0]['lr']:.0e} | "
            f"{sum(share(r['extra_outcomes']) for r in runs) / len(runs):.3f} | "
            f"{sum(share(r['extra_sampled_outcomes']) for r in runs) / len(runs):.3f} "
            + "| " * len(heads)
            + "|"
        )
    summary = []
    for lr in lrs:
        mine = [r for r in rows if r["lr"] == lr]
        cells = []
        entry = {
            "lr": lr,
            "batch": settings.method_batch,
            "student": args.student,
            "objective": args.objective,
            "seeds": mine,
        }
        for metric in ("greedy", "sampled"):
            dpca = outcome_matrix([r[metric] for r in mine])
            for name, runs in controls.items():
                found = difference(dpca, outcome_matrix([r[field[metric]] for r in runs]))
                entry[f"{metric}_minus_{name}"] = found
                cells.append(f"{found['value']:+.3f} [{found['low']:+.3f}, {found['high']:+.3f}]")
        greedy = sum(share(r["greedy"]) for r in mine) / len(mine)
        sampled = sum(share(r["sampled"]) for r in mine) / len(mine)
        print(
            f"| {label} | {settings.method_batch} | {lr:.0e} | {greedy:.3f} | {sampled:.3f} | "
            + " | ".join(cells)
            + " |"
        )
        summary.append({**entry, "greedy": greedy, "sampled": sampled})
    if args.json:
        if sweep is not None:
            summary = {
                "sweep": [
                    {"lr": r["lr"], "greedy": share(r["greedy"]), "sampled": share(r["sampled"])}
                    for r in sweep
                ],
                "runs": summary,
            }
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
