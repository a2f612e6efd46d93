"""``ctopd demo``: the built-in experiment (see :mod:`ctopd.demo.run`).

Examples:
    ctopd demo                      # full run, 3 seeds, into ./ctopd-demo
    ctopd demo --quick --seeds 1    # CI-sized, a couple of minutes
    ctopd demo --force              # retrain the cached teacher and student
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    text = ("train a teacher and a student with different tokenizers on a synthetic arithmetic "
            "task, then compare SimCT, DPCA, shared-only OPD and continued SFT")
    parser = subparsers.add_parser("demo", help="the built-in cross-tokenizer OPD experiment",
                                   description=text)
    parser.add_argument("--output-dir", default="ctopd-demo",
                        help="folder for data, models, runs and the report (default: ctopd-demo)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and budgets: checks every stage in a few minutes")
    parser.add_argument("--seeds", type=int, default=None,
                        help="runs per method (default: 3, or 1 with --quick)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild the teacher and the student even when cached")
    parser.add_argument("--workers", type=int, default=None,
                        help="method runs side by side (default: CPU cores, at most 2)")
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from ctopd.demo.run import run_demo

    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if seeds < 1:
        print("error: --seeds must be at least 1")
        return 2
    run_demo(args.output_dir, quick=args.quick, seeds=seeds, force=args.force,
             workers=args.workers)
    return 0
