"""The cross-tokenizer testbed of ``ctopd demo``, with everything the demo leaves out: other
starts and tasks, the paired statistics, and the studies that chose the demo's settings.

Without a study flag it runs the demo's experiment (:func:`ctopd.demo.run.run_demo`) in the
configuration the flags pick and adds the paired comparisons between runs on the extra test
split, with bootstrap intervals (``comparisons`` in ``results.json``, their tables in
``results.md``; :mod:`testbed_lib.compare`). ``results/demo/results.md`` is this command's.

Examples (from the repository root):
    python research/testbed.py                     # the demo + paired comparisons, 3 seeds
    python research/testbed.py --quick             # CI-sized, a minute or two
    python research/testbed.py --sweep             # choose learning rates on the validation split
    python research/testbed.py --ablation          # SimCT's supervision spaces on validation
    python research/testbed.py --calibrate         # the budget at which same-tokenizer OPD beats SFT
    python research/testbed.py --calibrate --warmup-target 0.7 --output-dir ctopd-demo-0.7
    python research/testbed.py --calibrate --task-order free --output-dir ctopd-demo-free
    python research/testbed.py --fixed-warmup --output-dir ctopd-demo-fixed  # 1,000-step warm-ups
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from testbed_lib.settings import RUNS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output-dir",
        default="ctopd-demo",
        help="folder for data, models, runs and the report (default: ctopd-demo)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny models and budgets: every stage in minutes"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="runs per method (default: 3, or 1 with --quick)"
    )
    parser.add_argument(
        "--methods", default=None, help=f"comma-separated runs (default: all of {','.join(RUNS)})"
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="instead of the demo, sweep each run's learning rate on the validation split "
        "(writes sweep.json and sweep.md)",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="instead of the demo, compare SimCT's supervision spaces on the validation split "
        "(writes ablation.json and ablation.md)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="instead of the demo, find the budget (steps per run) at which the same-tokenizer "
        "control's OPD beats its continued SFT, on the extra validation split (writes "
        "calibration.json and calibration.md)",
    )
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--matched-start",
        action="store_true",
        help="the default: warm each student up until it reaches the same validation accuracy "
        "(0.45, checked every 100 steps, at most 2,000)",
    )
    start.add_argument(
        "--fixed-warmup",
        action="store_true",
        help="warm both students up 1,000 steps each instead; use its own --output-dir",
    )
    parser.add_argument(
        "--warmup-target",
        type=float,
        default=None,
        metavar="ACCURACY",
        help="matched start only: the validation accuracy at which each warm-up stops "
        "(default 0.45); the students are rebuilt for it, so give it its own --output-dir",
    )
    parser.add_argument(
        "--task-order",
        choices=("fixed", "free"),
        default="fixed",
        help="fixed (default): solutions work the steps in the story's order; free: steps that "
        "commute, each reference in a random order (everything is rebuilt: give it its own "
        "--output-dir)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="rebuild the teacher, its samples and the students even when cached",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes side by side (default: CPU cores, at most 2)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from testbed_lib.studies import run_ablation, run_calibration, run_sweep

    from ctopd.demo.run import parse_runs

    args = build_parser().parse_args(argv)
    try:
        methods = parse_runs(args.methods)
    except ValueError as err:
        print(f"error: --methods: {err}")
        return 2
    if sum((args.sweep, args.ablation, args.calibrate)) > 1:
        print("error: --sweep, --ablation and --calibrate are separate runs; choose one")
        return 2
    if args.warmup_target is not None and args.fixed_warmup:
        print(
            "error: --warmup-target sets where the matched start stops; the fixed warm-up "
            "has no target: drop --fixed-warmup or --warmup-target"
        )
        return 2
    if args.warmup_target is not None and not 0.0 <= args.warmup_target <= 1.0:
        print(
            f"error: --warmup-target must be a validation accuracy in [0, 1]; got "
            f"{args.warmup_target:g}"
        )
        return 2
    start = {
        "matched": not args.fixed_warmup,
        "warmup_target": args.warmup_target,
        "task_order": args.task_order,
    }
    common = {"quick": args.quick, "force": args.force, "workers": args.workers, **start}
    if args.calibrate:
        if args.methods:
            print("error: --calibrate runs the same-tokenizer control only; drop --methods")
            return 2
        run_calibration(args.output_dir, **common)
    elif args.ablation:
        run_ablation(args.output_dir, **common)
    elif args.sweep:
        run_sweep(args.output_dir, methods=methods, **common)
    else:
        seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
        if seeds < 1:
            print("error: --seeds must be at least 1")
            return 2
        run_testbed(args.output_dir, seeds=seeds, methods=methods, **common)
    return 0


def run_testbed(
    output_dir: str | Path,
    *,
    quick: bool,
    seeds: int,
    methods: tuple[str, ...],
    force: bool,
    workers: int | None,
    matched: bool,
    warmup_target: float | None,
    task_order: str,
    log=print,
) -> dict:
    """The demo's experiment in the configuration asked for (:func:`pick_settings`), then
    the paired comparisons on the extra test split added to ``results.json`` and
    ``results.md``.

    Returns:
        The ``results.json`` content, with ``comparisons`` and ``command``.
    """
    from testbed_lib.report import comparisons, comparisons_markdown
    from testbed_lib.settings import pick_settings
    from testbed_lib.studies import rerun_command

    from ctopd.demo.report import write_results
    from ctopd.demo.run import run_demo

    settings = pick_settings(
        quick=quick, matched=matched, warmup_target=warmup_target, task_order=task_order
    )
    results = run_demo(
        output_dir,
        quick=quick,
        settings=settings,
        seeds=seeds,
        methods=methods,
        force=force,
        workers=workers,
        log=log,
    )
    runs = [
        run
        for row in [*results["methods"].values(), *results["controls"].values()]
        if isinstance(row, dict)
        for run in row["runs"]
    ]
    results["comparisons"] = comparisons(results["extra_test"], runs)
    results["command"] = rerun_command(
        "",
        quick=quick,
        matched=matched,
        methods=methods,
        warmup_target=warmup_target,
        task_order=task_order,
        seeds=seeds,
    )
    out = Path(output_dir)
    write_results(out, results)
    if results["comparisons"]:
        table = comparisons_markdown(results)
        report = out / "results.md"
        report.write_text(report.read_text(encoding="utf-8") + "\n" + table + "\n", "utf-8")
        log("\n" + table)
    log(
        f"[testbed] added {len(results['comparisons'])} paired comparisons to {out / 'results.json'}"
    )
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


if __name__ == "__main__":
    sys.exit(main())
