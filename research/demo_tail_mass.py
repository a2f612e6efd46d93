"""How much probability each model leaves off the teacher's greedy path: why sampled accuracy
separates on-policy distillation from SFT where greedy accuracy does not.

Greedy accuracy asks only whether a model's most likely token is right at each step. A model
sampled at temperature 1 takes a wrong token wherever it leaves probability on one, and a
response of 40-70 tokens multiplies those chances. The two objectives treat that leftover mass
differently. At a position where the teacher rules a token out (log-probability ``log p`` far
below 0) and the student gives it probability ``q``:

* continued SFT's cross-entropy on a teacher sample pushes that token's logit down with a
  gradient of ``q``;
* on-policy reverse KL, ``Σ q log(q/p)``, pushes it down with ``q (log q - log p - KL)``, about
  ``q log(1/p)``: ten times harder for ``q = 0.01`` against ``log p = -15``.

This script measures the consequence on finished models. On the teacher's greedy responses to
the first ``--problems`` problems of a split (the path the teacher would take), each model is
scored on the same text, spelled with its own tokenizer (its canonical encoding): its mean
probability off the path per token (``1 - q(y_t)``), the share of tokens where that exceeds
0.01 and 0.1, and the mean probability that one temperature-1 sample reproduces the teacher's
response token for token (``q(y)``; the end of turn is not counted). For a student with another
tokenizer than the teacher's, part of that off-path probability may sit on other spellings of the
same text (``1`` ``40`` for ``140``), which cost it nothing; the same-tokenizer rows have none.

``--temperatures``: each model's exact-answer accuracy on the same problems at each sampling
temperature (0: greedy; one response per problem, sampling seed 0). A lead that reverse KL earns
by leaving less probability on wrong tokens grows with the temperature; the table also shows at
what temperature an SFT model samples as well as an OPD one does at 1.

Usage (from the repository root)::

    python research/demo_tail_mass.py --demo-dir ctopd-demo [--problems 500]
        [--split extra_validation] [--model LABEL=PATH ...] [--temperatures 0,0.7,1]
        [--json tail.json]

Scored: the warmed-up students ``student/`` and ``control/`` of the demo folder (the starts),
then every final model a demo run kept (``runs/<run>-seed<k>/final/``), or only the
``from_pretrained`` folders given with ``--model``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ctopd.core.byte_table import end_of_turn_ids
from ctopd.training.data import render_template
from ctopd.training.evaluate import evaluate
from ctopd.training.rollout import sample_responses


def teacher_paths(
    teacher_dir: Path, records: list[dict], *, max_new_tokens: int, batch: int = 100
) -> list[str]:
    """The teacher's greedy response text to each record's prompt."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    end_ids = end_of_turn_ids(tokenizer)
    prompts = [
        tokenizer(render_template(tokenizer, r["messages"]), add_special_tokens=False)["input_ids"]
        for r in records
    ]
    texts = []
    with torch.no_grad():
        for lo in range(0, len(prompts), batch):
            for ids in sample_responses(
                model,
                prompts[lo : lo + batch],
                end_ids=end_ids,
                pad_id=tokenizer.pad_token_id,
                temperature=0.0,
                max_new_tokens=max_new_tokens,
            ):
                texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def tail_mass(model_dir: Path, records: list[dict], paths: list[str]) -> dict:
    """One model's probability off the teacher's path (see the module docstring).

    Returns:
        ``tokens`` (scored), ``off_path`` (mean ``1 - q(y_t)`` per token), ``above_0.01`` and
        ``above_0.1`` (shares of tokens whose off-path probability exceeds them),
        ``reproduce`` (mean over problems of ``q(y)``), ``mean_logprob`` (mean ``log q(y)``).
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    off, whole = [], []
    with torch.no_grad():
        for record, text in zip(records, paths):
            prompt = tokenizer(
                render_template(tokenizer, record["messages"]), add_special_tokens=False
            )["input_ids"]
            response = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + response])
            logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
            logprobs = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]
            off.append(1.0 - logprobs.exp())
            whole.append(float(logprobs.sum()))
    off_path = torch.cat(off)
    return {
        "tokens": len(off_path),
        "off_path": off_path.mean().item(),
        "above_0.01": (off_path > 0.01).double().mean().item(),
        "above_0.1": (off_path > 0.1).double().mean().item(),
        "reproduce": sum(math.exp(v) for v in whole) / len(whole),
        "mean_logprob": sum(whole) / len(whole),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, required=True)
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="a model folder to score (repeatable)",
    )
    parser.add_argument("--split", default="extra_validation")
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument(
        "--temperatures",
        default="",
        help="comma-separated sampling temperatures to score accuracy at",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()

    data = args.demo_dir / f"{args.split}.jsonl"
    if not data.is_file():
        parser.error(f"{data} not found: run ctopd demo --output-dir {args.demo_dir} first")
    models = {
        "cross-tokenizer start": args.demo_dir / "student",
        "same-tokenizer start": args.demo_dir / "control",
    }
    for item in args.model:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            parser.error(f"--model takes LABEL=PATH to a model folder; got {item!r}")
        models[label] = Path(path)
    if not args.model:
        kept = sorted((args.demo_dir / "runs").glob("*-seed*/final"))
        if not kept:
            parser.error(
                f"no kept final model under {args.demo_dir / 'runs'}: run ctopd demo "
                "(it keeps runs/<run>-seed<k>/final/), or name models with --model"
            )
        models.update({path.parent.name: path for path in kept})
    with data.open(encoding="utf-8") as handle:
        records = [json.loads(line) for _, line in zip(range(args.problems), handle)]
    paths = teacher_paths(args.demo_dir / "teacher", records, max_new_tokens=args.max_new_tokens)
    try:
        temperatures = [float(t) for t in args.temperatures.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--temperatures takes numbers separated by commas; got {args.temperatures!r}")
    rows = {label: tail_mass(path, records, paths) for label, path in models.items()}
    for label, path in models.items():
        rows[label]["accuracy"] = {
            f"{t:g}": evaluate(
                str(path),
                None,
                data,
                max_new_tokens=args.max_new_tokens,
                batch_size=200,
                temperature=t,
                seed=0,
                limit=args.problems,
            )["accuracy"]
            for t in temperatures
        }

    print(
        f"On the teacher's greedy responses to the first {len(records)} problems of "
        f"{args.split}.jsonl:\n"
    )
    print(
        "| model | tokens | off-path probability per token | tokens above 0.01 "
        "| tokens above 0.1 | P(sample = teacher's response) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for label, row in rows.items():
        print(
            f"| {label} | {row['tokens']} | {row['off_path']:.4f} | {row['above_0.01']:.3f} "
            f"| {row['above_0.1']:.3f} | {row['reproduce']:.3f} |"
        )
    if temperatures:
        print(
            f"\nExact-answer accuracy on the same {len(records)} problems by sampling "
            "temperature (0: greedy; one response per problem, seed 0):\n"
        )
        print("| model | " + " | ".join(f"T = {t:g}" for t in temperatures) + " |")
        print("| --- |" + " --- |" * len(temperatures))
        for label, row in rows.items():
            print(
                f"| {label} | "
                + " | ".join(f"{row['accuracy'][f'{t:g}']:.3f}" for t in temperatures)
                + " |"
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "problems": len(records),
                    "split": args.split,
                    "models": {k: str(v) for k, v in models.items()},
                    "rows": rows,
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )


if __name__ == "__main__":
    main()
