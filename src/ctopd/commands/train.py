"""``ctopd train``, ``ctopd sft``, ``ctopd eval`` and ``ctopd plot``: thin wrappers over
:mod:`ctopd.training`.

Examples:
    ctopd train --student S --teacher T --data prompts.jsonl --objective simct \\
        --max-steps 20 --output-dir runs/x
    ctopd train --config examples/qwen2.5-7b-to-gemma-2-2b-gsm8k.yaml --optim.lr 1e-6
    accelerate launch -m ctopd train --config run.yaml
    ctopd sft --student S --data answers.jsonl --output-dir runs/sft
    ctopd eval --model runs/x/final --data test.jsonl --output runs/x/eval.jsonl
    ctopd plot runs/x
"""

from __future__ import annotations

import argparse
import json
import sys

from ctopd.training.config import ConfigError, add_config_arguments, config_from_args


def add_parser(subparsers) -> None:
    """Register the four subcommands."""
    for name, func, text in (
        ("train", _train, "on-policy distillation of a teacher into a student"),
        ("sft", _sft, "the SFT baseline: cross-entropy on reference or teacher responses"),
    ):
        parser = subparsers.add_parser(name, help=text, description=text, allow_abbrev=False)
        add_config_arguments(parser)
        parser.set_defaults(func=func, takes_objective_flags=True)

    evaluate = subparsers.add_parser(
        "eval",
        help="answer accuracy on a JSONL test set",
        description="Greedy generation, final-answer extraction "
        "(####, \\boxed{}, last number), accuracy.",
    )
    evaluate.add_argument("--model", required=True, help="model folder or hub id")
    evaluate.add_argument("--data", required=True, help="JSONL with prompt/messages and answer")
    evaluate.add_argument("--tokenizer", default=None, help="tokenizer folder (default: model)")
    evaluate.add_argument("--output", default=None, help="per-example JSONL to write")
    evaluate.add_argument("--max-new-tokens", type=int, default=256)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--limit", type=int, default=None, help="first N examples only")
    evaluate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    evaluate.add_argument("--chat-template", default=None, help="template file or text")
    evaluate.add_argument("--dtype", default="auto")
    evaluate.add_argument("--prompt-field", default="prompt")
    evaluate.add_argument("--answer-field", default="answer")
    evaluate.set_defaults(func=_eval)

    plot = subparsers.add_parser("plot", help="PNG curves of a run's metrics.jsonl")
    plot.add_argument("run_dir", help="a run's output dir")
    plot.add_argument("--out", default=None, help="folder for the PNGs (default RUN_DIR/plots)")
    plot.set_defaults(func=_plot)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _train(args: argparse.Namespace) -> int:
    from ctopd.training.loop import train

    return _run(args, train)


def _sft(args: argparse.Namespace) -> int:
    from ctopd.training.sft import run_sft

    return _run(args, run_sft)


def _run(args: argparse.Namespace, run) -> int:
    """Build the config from ``args``, call ``run(config)``, print its summary; exit codes:
    2 for bad input (config, data, a missing file, a run folder that holds another run),
    1 for a non-finite loss / gradient norm / weight, a checkpoint that could not be written or
    a served teacher that failed (unreachable past its retries, or a reply that does not match
    the request), 143 / 130 after SIGTERM / SIGINT (a checkpoint of the last step is saved)."""
    from ctopd.training.data import DataError
    from ctopd.training.runtime import RunStopped
    from ctopd.training.teachers.local import TeacherServerError

    try:
        summary = run(config_from_args(args))
    except (ConfigError, DataError, FileNotFoundError) as err:
        return _fail(str(err))
    except RunStopped as err:  # raised alike on every rank: one line, from the main process
        if _is_main_process():
            print(str(err), file=sys.stderr)  # "ctopd train: stopped ..."
        return err.exit_code
    except TeacherServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _print_summary(summary)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ctopd.training.config import DataConfig
    from ctopd.training.data import DataError
    from ctopd.training.evaluate import evaluate

    try:
        result = evaluate(
            args.model,
            args.tokenizer,
            args.data,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            output_path=args.output,
            limit=args.limit,
            temperature=args.temperature,
            chat_template=args.chat_template,
            dtype=args.dtype,
            data_config=DataConfig(prompt_field=args.prompt_field, answer_field=args.answer_field),
        )
    except (ConfigError, DataError, FileNotFoundError) as err:
        return _fail(str(err))
    print(json.dumps(result, indent=2))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from ctopd.training.plot import plot_run

    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as err:  # ValueError: MetricsError, a bad line
        return _fail(str(err))
    for path in paths:
        print(path)
    return 0


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _print_summary(summary: dict) -> None:
    if not _is_main_process():
        return
    metrics = summary.get("final_metrics", {})
    shown = {k: round(metrics[k], 4) for k in ("loss", "kl", "coverage") if k in metrics}
    print(
        f"done: {summary['steps']} steps in {summary['seconds']:.1f}s; last steps {shown}; "
        f"student saved to {summary['output_dir']}/final"
    )
