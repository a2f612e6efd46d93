"""``ctopd demo``: the built-in experiment (see :mod:`ctopd.demo.run`).

Examples:
    ctopd demo                              # full run, 3 seeds, into ./ctopd-demo (matched start)
    ctopd demo --quick --seeds 1            # CI-sized, about a minute
    ctopd demo --methods simct,control_opd  # a subset of the runs
    ctopd demo --sweep                      # choose learning rates on the validation split
    ctopd demo --ablation                   # SimCT's supervision spaces on the validation split
    ctopd demo --calibrate                  # the budget at which same-tokenizer OPD beats SFT
    ctopd demo --calibrate --warmup-target 0.7 --output-dir ctopd-demo-0.7  # a later start
    ctopd demo --calibrate --task-order free --output-dir ctopd-demo-free  # steps in any order
    ctopd demo --force                      # retrain the cached teacher, samples and students
    ctopd demo --fixed-warmup --output-dir ctopd-demo-fixed  # both students warmed up 1,000 steps
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from ctopd.demo.settings import RUNS

    text = (
        "train a teacher and two students (one with another tokenizer, one with the "
        "teacher's) on a synthetic arithmetic task, then compare SimCT, DPCA, shared-only "
        "OPD and continued SFT against same-tokenizer OPD and SFT"
    )
    parser = subparsers.add_parser(
        "demo", help="the built-in cross-tokenizer OPD experiment", description=text
    )
    parser.add_argument(
        "--output-dir",
        default="ctopd-demo",
        help="folder for data, models, runs and the report (default: ctopd-demo)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny models and budgets: checks every stage in a minute or two",
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
        help="instead of the demo, sweep each run's learning rate on the "
        "validation split (writes sweep.json and sweep.md)",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="instead of the demo, compare SimCT's supervision spaces on the "
        "validation split (writes ablation.json and ablation.md)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="instead of the demo, find the budget (steps per run) at which "
        "the same-tokenizer control's OPD beats its continued SFT, on the "
        "extra validation split (writes calibration.json and "
        "calibration.md)",
    )
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--matched-start",
        action="store_true",
        help="the default: warm each student up until it reaches the same "
        "validation accuracy (0.45, checked every 100 steps, at most 2,000)",
    )
    start.add_argument(
        "--fixed-warmup",
        action="store_true",
        help="warm both students up 1,000 steps each instead (the earlier "
        "default); use its own --output-dir",
    )
    parser.add_argument(
        "--warmup-target",
        type=float,
        default=None,
        metavar="ACCURACY",
        help="matched start only: the validation accuracy at which each "
        "warm-up stops (default 0.45); the students are rebuilt for it, so "
        "give it its own --output-dir",
    )
    parser.add_argument(
        "--task-order",
        choices=("fixed", "free"),
        default="fixed",
        help="fixed (default): solutions work the steps in the story's order; "
        "free: steps that commute, each reference in a random order, so "
        "a problem has several right solutions (everything is rebuilt: "
        "give it its own --output-dir)",
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
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from ctopd.demo.run import parse_runs, run_demo
    from ctopd.demo.sweep import run_ablation, run_calibration, run_sweep

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
    if args.calibrate:
        if args.methods:
            print("error: --calibrate runs the same-tokenizer control only; drop --methods")
            return 2
        run_calibration(
            args.output_dir, quick=args.quick, force=args.force, workers=args.workers, **start
        )
        return 0
    if args.ablation:
        run_ablation(
            args.output_dir, quick=args.quick, force=args.force, workers=args.workers, **start
        )
        return 0
    if args.sweep:
        run_sweep(
            args.output_dir,
            quick=args.quick,
            methods=methods,
            force=args.force,
            workers=args.workers,
            **start,
        )
        return 0
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if seeds < 1:
        print("error: --seeds must be at least 1")
        return 2
    run_demo(
        args.output_dir,
        quick=args.quick,
        seeds=seeds,
        methods=methods,
        force=args.force,
        workers=args.workers,
        **start,
    )
    return 0
