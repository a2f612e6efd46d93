"""Time split of one on-policy step on tiny models, per objective.

    python benchmarks/step.py [--steps 8] [--objectives simct,dpca] [--json]

Setting: a byte-level BPE teacher and a SentencePiece student (locally trained, two families),
random tiny Llama models (``--hidden-size``, 2 layers), ``--batch-size`` prompts per step, one
sample each, ``--max-new-tokens`` sampled tokens, one CPU thread. Each objective runs
``ctopd.training.loop.train`` for ``--steps`` steps; the first step is a warm-up and is not
counted. The table is the mean seconds per step of each phase from ``metrics.jsonl`` and the
share of alignment + objective (``loss``) in the whole step, which the issue bounds at 10%.

The student forward that feeds the objective is its own column (``student_forward``): it is the
model's cost, not the objective's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

PHASES = ("rollout", "teacher", "alignment", "student_forward", "loss", "backward", "optimizer")


def build(folder: Path, hidden_size: int) -> dict[str, Path]:
    from ctopd.testing import tiny_causal_lm, train_byte_level_bpe, train_sentencepiece_bpe

    rows = []
    for i in range(64):
        a, b = 3 + (7 * i) % 90, 2 + (5 * i) % 60
        rows.append(
            {
                "prompt": f"Ann has {a} shells and finds {b} more. How many now?",
                "answer": f"Ann has {a} + {b} = {a + b} shells.\n#### {a + b}",
            }
        )
    corpus = [r["prompt"] for r in rows] + [r["answer"] for r in rows]
    paths = {}
    for name, tokenizer in (
        ("teacher", train_byte_level_bpe(corpus, 512)),
        ("student", train_sentencepiece_bpe(corpus, 400)),
    ):
        model = tiny_causal_lm(
            tokenizer,
            hidden_size=hidden_size,
            num_layers=2,
            num_heads=4,
            max_positions=512,
            seed=len(name),
        )
        paths[name] = folder / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    paths["prompts"] = folder / "prompts.jsonl"
    paths["prompts"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def run(objective: str, paths: dict[str, Path], out: Path, args) -> dict[str, float]:
    from ctopd.training.config import load_config
    from ctopd.training.loop import train

    config = load_config(
        [
            "--student",
            str(paths["student"]),
            "--teacher",
            str(paths["teacher"]),
            "--data",
            str(paths["prompts"]),
            "--objective",
            objective,
            "--output-dir",
            str(out),
            "--max-steps",
            str(args.steps),
            "--per-device-batch-size",
            str(args.batch_size),
            "--rollout.max-new-tokens",
            str(args.max_new_tokens),
            "--rollout.temperature",
            "1.0",
            "--optim.lr",
            "1e-4",
            "--progress",
            "false",
            "--log-every",
            str(10**6),
        ]
    )
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        train(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    mean = {p: sum(r[f"time_{p}"] for r in rows) / len(rows) for p in PHASES}
    mean["step"] = sum(r["time_step"] for r in rows) / len(rows)
    mean["tokens"] = sum(r["response_tokens"] for r in rows) / len(rows)
    mean["coverage"] = sum(r["coverage"] for r in rows) / len(rows)
    mean["align_plus_objective_share"] = (mean["alignment"] + mean["loss"]) / mean["step"]
    return mean


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--objectives", default="simct,dpca,shared_only,uld")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is a warm-up)")
    torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp), args.hidden_size)
        for objective in args.objectives.split(","):
            results[objective] = run(objective, paths, Path(tmp) / objective, args)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    columns = (*PHASES, "step")
    print(
        f"mean ms per step ({args.steps - 1} steps after warm-up, batch {args.batch_size}, "
        f"{args.max_new_tokens} new tokens, 1 CPU thread)"
    )
    print(f"{'objective':<12}" + "".join(f"{c:>16}" for c in columns) + f"{'align+obj':>11}")
    for objective, mean in results.items():
        print(
            f"{objective:<12}"
            + "".join(f"{1000 * mean[c]:>16.2f}" for c in columns)
            + f"{100 * mean['align_plus_objective_share']:>10.1f}%"
        )
    worst = max(m["align_plus_objective_share"] for m in results.values())
    print(f"largest alignment + objective share: {100 * worst:.1f}% (bound: 10%)")
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
