"""What the demo's teacher tells a same-tokenizer student beyond its own samples, measured.

Same-tokenizer OPD can beat SFT on teacher samples at an equal budget (docs/concepts/judging.md) in two
ways only: its target at each position is the teacher's whole next-token distribution rather than
one sampled token, and it visits the student's own prefixes rather than the teacher's. This
script measures how much each is worth on a demo folder:

* **The teacher on its own samples** (the states SFT trains on): how many are its greedy
  response, its mean next-token entropy (nats/token) and the share of tokens where its top token
  has probability above 0.99. A teacher that is sure of every token gives the same target as a
  one-hot sample of itself.
* **The warmed-up control's rollouts** (the states OPD trains on; temperature and budget as in
  the demo): each rollout is split at its first token that is not the teacher's greedy choice
  (the *first divergence*). Up to and including it the prefix is the teacher's own path, the
  states SFT covers; after it the prefix holds a step the teacher would not take. Reported: the
  share of rollouts that diverge, how many of those still end at the right answer (what those
  later states can be worth to exact-answer accuracy), the teacher's entropy on the later states,
  and the share of the rollouts' summed reverse KL (full distribution, the control OPD loss) that
  lies after the first divergence.

Usage (from the repository root, after a demo run)::

    python research/demo_teacher_signal.py --demo-dir ctopd-demo [--samples 500]
        [--rollouts 512] [--json signal.json]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ctopd.core.byte_table import end_of_turn_ids
from ctopd.demo.settings import demo_settings
from ctopd.training.data import render_template
from ctopd.training.evaluate import answers_match, extract_answer
from ctopd.training.rollout import sample_responses


def next_token_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """``[len(response), V]`` float64 log-probabilities of each response position given the
    prompt and the response before it."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1]
    return logits.double().log_softmax(-1)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """``[T]`` entropy in nats of each row of ``[T, V]`` log-probabilities."""
    return -(logprobs.exp() * logprobs).sum(-1)


def teacher_on_samples(
    teacher, tokenizer, rows: list[dict], train: list[dict], *, max_new_tokens: int, batch: int
) -> dict:
    """Entropy and top probability of the teacher on its own samples (``rows`` of
    ``teacher_samples.jsonl``; ``index`` points into ``train``), and how many of them are its
    greedy response to the same prompt."""
    entropies, tops, right, greedy = [], [], 0, 0
    end_ids = end_of_turn_ids(tokenizer)
    records = [train[row["index"]] for row in rows]
    prompts = [
        tokenizer(render_template(tokenizer, record["messages"]), add_special_tokens=False)[
            "input_ids"
        ]
        for record in records
    ]
    for lo in range(0, len(rows), batch):
        greedy_responses = sample_responses(
            teacher,
            prompts[lo : lo + batch],
            end_ids=end_ids,
            pad_id=tokenizer.pad_token_id,
            temperature=0.0,
            max_new_tokens=max_new_tokens,
        )
        for row, record, prompt, best in zip(
            rows[lo : lo + batch], records[lo:], prompts[lo:], greedy_responses
        ):
            response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
            response += [end_ids[0]]
            logprobs = next_token_logprobs(teacher, prompt, response)
            entropies.append(entropy(logprobs))
            tops.append(logprobs.max(-1).values.exp())
            right += answers_match(
                extract_answer(row["response"]), extract_answer(record["answer"])
            )
            greedy += (
                tokenizer.decode(best, skip_special_tokens=True).strip() == row["response"].strip()
            )
    entropies, tops = torch.cat(entropies), torch.cat(tops)
    return {
        "samples": len(rows),
        "tokens": len(entropies),
        "right": right / len(rows),
        "greedy": greedy / len(rows),
        "entropy": entropies.mean().item(),
        "top_above_0.99": (tops > 0.99).double().mean().item(),
        "top_min": tops.min().item(),
    }


def control_rollouts(
    student,
    teacher,
    tokenizer,
    records: list[dict],
    *,
    temperature: float,
    max_new_tokens: int,
    batch: int,
    seed: int,
) -> dict:
    """First divergences of the student's sampled rollouts from the teacher's greedy choices,
    and where the full-distribution reverse KL of those rollouts lies (see the module doc)."""
    end_ids = end_of_turn_ids(tokenizer)
    prompts = [
        tokenizer(render_template(tokenizer, record["messages"]), add_special_tokens=False)[
            "input_ids"
        ]
        for record in records
    ]
    torch.manual_seed(seed)
    diverged = diverged_right = kept_right = 0
    kl_before = kl_after = 0.0
    later_entropy, later_tokens = 0.0, 0
    for lo in range(0, len(records), batch):
        responses = sample_responses(
            student,
            prompts[lo : lo + batch],
            end_ids=end_ids,
            pad_id=tokenizer.pad_token_id,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
        )
        for record, prompt, response in zip(records[lo : lo + batch], prompts[lo:], responses):
            teacher_lp = next_token_logprobs(teacher, prompt, response)
            student_lp = next_token_logprobs(student, prompt, response)
            kl = (student_lp.exp() * (student_lp - teacher_lp)).sum(-1)
            off = (teacher_lp.argmax(-1) != torch.tensor(response)).nonzero()
            text = tokenizer.decode(response, skip_special_tokens=True)
            right = answers_match(extract_answer(text), extract_answer(record["answer"]))
            if len(off) == 0:
                kept_right += right
                kl_before += kl.sum().item()
                continue
            first = off[0].item()
            diverged += 1
            diverged_right += right
            kl_before += kl[: first + 1].sum().item()
            kl_after += kl[first + 1 :].sum().item()
            later_entropy += entropy(teacher_lp[first + 1 :]).sum().item()
            later_tokens += len(response) - first - 1
    count = len(records)
    return {
        "rollouts": count,
        "diverged": diverged / count,
        "right_after_divergence": diverged_right / max(diverged, 1),
        "right_without_divergence": kept_right / max(count - diverged, 1),
        "kl_share_after_divergence": kl_after / max(kl_before + kl_after, 1e-12),
        "teacher_entropy_after_divergence": later_entropy / max(later_tokens, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", default="ctopd-demo", help="a folder `ctopd demo` wrote")
    parser.add_argument("--samples", type=int, default=500, help="teacher samples to score")
    parser.add_argument("--rollouts", type=int, default=512, help="control rollouts to sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder, settings = Path(args.demo_dir), demo_settings()
    for part in ("teacher", "control", "train.jsonl", "teacher_samples.jsonl"):
        if not (folder / part).exists():
            parser.error(f"{folder / part} is missing: run `ctopd demo --demo-dir {folder}` first")
    tokenizer = AutoTokenizer.from_pretrained(folder / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(folder / "teacher").eval()
    control = AutoModelForCausalLM.from_pretrained(folder / "control").eval()
    train = [json.loads(line) for line in (folder / "train.jsonl").open(encoding="utf-8")]
    with (folder / "teacher_samples.jsonl").open(encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(args.samples), handle)]
    prompts = random.Random(args.seed).sample(train, args.rollouts)
    figures = {
        "teacher_on_samples": teacher_on_samples(
            teacher,
            tokenizer,
            rows,
            train,
            max_new_tokens=settings.max_new_tokens,
            batch=settings.method_batch,
        ),
        "control_rollouts": control_rollouts(
            control,
            teacher,
            tokenizer,
            prompts,
            temperature=settings.temperature,
            max_new_tokens=settings.max_new_tokens,
            batch=settings.method_batch,
            seed=args.seed,
        ),
    }
    samples, rollouts = figures["teacher_on_samples"], figures["control_rollouts"]
    print("| measure | value |\n| --- | --- |")
    print(f"| teacher samples scored | {samples['samples']} ({samples['tokens']} tokens) |")
    print(f"| teacher samples with the right answer | {samples['right']:.3f} |")
    print(f"| of them, the teacher's greedy response to the prompt | {samples['greedy']:.3f} |")
    print(f"| teacher entropy on its samples (nats/token) | {samples['entropy']:.4f} |")
    print(
        f"| share of those tokens with top probability > 0.99 | {samples['top_above_0.99']:.4f} |"
    )
    print(f"| lowest top probability on them | {samples['top_min']:.3f} |")
    print(f"| control rollouts (temperature {settings.temperature}) | {rollouts['rollouts']} |")
    print(f"| share that leave the teacher's greedy path | {rollouts['diverged']:.3f} |")
    print(f"| of those, right answers | {rollouts['right_after_divergence']:.3f} |")
    print(f"| of the others, right answers | {rollouts['right_without_divergence']:.3f} |")
    print(
        f"| teacher entropy after the first divergence (nats/token) | "
        f"{rollouts['teacher_entropy_after_divergence']:.4f} |"
    )
    print(
        f"| share of the reverse KL after the first divergence | "
        f"{rollouts['kl_share_after_divergence']:.3f} |"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
