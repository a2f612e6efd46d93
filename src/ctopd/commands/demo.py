"""``ctopd demo``: the built-in experiment (:mod:`ctopd.demo.run`). ``ctopd demo --quick`` checks
every stage in a minute or two; ``--methods simct,control_opd`` runs a subset; ``--force``
retrains the cached models. Sweeps, calibration and ablations: ``research/testbed.py``.
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
        "--force",
        action="store_true",
        help="rebuild the teacher, its samples and the students even when cached",
    )
    parser.add_argument(
        "--workers", type=int, help="processes side by side (default: CPU cores, at most 2)"
    )
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from ctopd.demo.run import parse_runs, run_demo

    try:
        methods = parse_runs(args.methods)
    except ValueError as err:
        print(f"error: --methods: {err}")
        return 2
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
    )
    return 0
