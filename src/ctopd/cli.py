"""The ``ctopd`` command line: a thin dispatcher over subcommand modules.

Each subcommand module exposes ``add_parser(subparsers)`` which registers its parser and sets
``func`` (a function ``args -> int`` exit code) as the default.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Subcommand modules, in the order `ctopd --help` lists them.
SUBCOMMAND_MODULES = [
    "ctopd.commands.align",
    "ctopd.commands.train",
    "ctopd.commands.serve_teacher",
    "ctopd.commands.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctopd", description="Cross-tokenizer on-policy distillation."
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # not written yet in this checkout
                continue
            raise
        module.add_parser(subparsers)
    return parser


def _version() -> str:
    from ctopd import __version__

    return f"ctopd {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # only `ctopd train|sft` take more: a user's objective's --objective.NAME flags
        if not getattr(args, "takes_objective_flags", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from ctopd.training.config import ConfigError, objective_flags

        try:
            args.objective_flags = objective_flags(extra)
        except ConfigError as err:
            parser.error(str(err))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        # Bad input (config, data, tokenizer pair): one clear line, no traceback. Set
        # CTOPD_DEBUG=1 to see where it came from.
        if os.environ.get("CTOPD_DEBUG"):
            raise
        print(f"ctopd {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
