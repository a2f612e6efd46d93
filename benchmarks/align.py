"""Alignment speed on real tokenizer pairs over GSM8K answers, side by side with a per-token
decode greedy aligner (the approach of public reference code) as the baseline.

    CTOPD_TOKENIZERS=../shared/tokenizers python benchmarks/align.py [--json] [--limit N]

Measures student tokens per second of ``TokenizerPair.align_batch`` (ids in, chunks out; the
tokenisation itself is not timed) on one core: all answers in one call with ids as int64
arrays (as the trainer holds them), the same with ids as Python lists, and in calls of 64
answers (a training step's batch, where the fixed cost per call shows); the baseline over the
same ids; and the share of student tokens each one covers with aligned chunks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ctopd import TokenizerPair, load_tokenizer

PAIRS = [("qwen2", "llama-spm"), ("qwen2", "phi-3"), ("gpt-2", "qwen2"), ("llama-spm", "gpt-2")]


def greedy_decode_align(teacher_tok, student_tok, teacher_ids, student_ids) -> int:
    """Baseline: decode every token on its own and walk two pointers, closing a chunk when the
    decoded strings on both sides are equal. Returns the student tokens inside closed chunks."""
    covered = 0
    i = j = 0
    t_text = s_text = ""
    s_start = 0
    while i < len(teacher_ids) or j < len(student_ids):
        if (len(t_text) <= len(s_text) and i < len(teacher_ids)) or j >= len(student_ids):
            t_text += teacher_tok.decode([teacher_ids[i]])
            i += 1
        else:
            s_text += student_tok.decode([student_ids[j]])
            j += 1
        if t_text == s_text and t_text:
            covered += j - s_start
            s_start, t_text, s_text = j, "", ""
    return covered


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run_pair(folder: Path, teacher: str, student: str, answers: list[str], baseline_n: int):
    pair = TokenizerPair(
        load_tokenizer(str(folder / teacher)), load_tokenizer(str(folder / student))
    )
    student_ids = pair.student_tokenizer(answers, add_special_tokens=False)["input_ids"]
    teacher_ids = pair.teacher_ids_for_batch(student_ids)
    tokens = sum(len(x) for x in student_ids)
    # The trainer holds ids as arrays/tensors; Python lists add a conversion, timed separately.
    t_arrays = [np.asarray(x, dtype=np.int64) for x in teacher_ids]
    s_arrays = [np.asarray(x, dtype=np.int64) for x in student_ids]
    seconds = best_seconds(lambda: pair.align_batch(t_arrays, s_arrays), 5)
    list_seconds = best_seconds(lambda: pair.align_batch(teacher_ids, student_ids), 3)

    def in_batches_of_64():
        for lo in range(0, len(t_arrays), 64):
            pair.align_batch(t_arrays[lo : lo + 64], s_arrays[lo : lo + 64])

    batch64_seconds = best_seconds(in_batches_of_64, 3)
    covered = sum(a.aligned_student_tokens for a in pair.align_batch(teacher_ids, student_ids))
    sub_t, sub_s = teacher_ids[:baseline_n], student_ids[:baseline_n]
    sub_tokens = sum(len(x) for x in sub_s)
    base_covered = 0
    start = time.perf_counter()
    for t_ids, s_ids in zip(sub_t, sub_s):
        base_covered += greedy_decode_align(
            pair.teacher_tokenizer, pair.student_tokenizer, t_ids, s_ids
        )
    base_seconds = time.perf_counter() - start
    return {
        "pair": f"{teacher} -> {student}",
        "sequences": len(answers),
        "student_tokens": tokens,
        "student_tokens_per_second": tokens / seconds,
        "from_lists_tokens_per_second": tokens / list_seconds,
        "batch64_tokens_per_second": tokens / batch64_seconds,
        "baseline_tokens_per_second": sub_tokens / base_seconds,
        "speedup": (tokens / seconds) / (sub_tokens / base_seconds),
        "coverage": covered / tokens,
        "baseline_coverage": base_covered / sub_tokens,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per pair")
    parser.add_argument("--limit", type=int, default=0, help="use the first N answers (0 = all)")
    parser.add_argument(
        "--baseline-limit", type=int, default=500, help="answers the (slow) baseline runs on"
    )
    args = parser.parse_args()
    folder = os.environ.get("CTOPD_TOKENIZERS")
    if not folder:
        print(
            "set CTOPD_TOKENIZERS to the shared tokenizers folder (../shared/tokenizers)",
            file=sys.stderr,
        )
        return 2
    folder = Path(folder)
    data = Path(os.environ.get("CTOPD_GSM8K", folder.parent / "data" / "gsm8k" / "train.jsonl"))
    answers = [json.loads(line)["answer"] for line in data.open(encoding="utf-8")]
    if args.limit:
        answers = answers[: args.limit]
    torch.set_num_threads(1)
    rows = [run_pair(folder, t, s, answers, args.baseline_limit) for t, s in PAIRS]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(
        f"{'pair':<22}{'student tok/s':>15}{'(from lists)':>14}{'(batches of 64)':>17}"
        f"{'baseline tok/s':>16}"
        f"{'speedup':>9}{'coverage':>10}{'baseline cov.':>15}"
    )
    for r in rows:
        print(
            f"{r['pair']:<22}{r['student_tokens_per_second']:>15,.0f}"
            f"{r['from_lists_tokens_per_second']:>14,.0f}"
            f"{r['batch64_tokens_per_second']:>17,.0f}"
            f"{r['baseline_tokens_per_second']:>16,.0f}{r['speedup']:>8.0f}x"
            f"{r['coverage']:>10.1%}{r['baseline_coverage']:>15.1%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
