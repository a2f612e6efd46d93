"""Why DPCA does what it does on the demo: advantages on correct vs wrong samples, per-chunk
``L_T - L_S``, and gradient norms against the other objectives, for both demo students.

    python research/dpca_diagnostics.py --demo-dir ctopd-demo [--prompts 64] [--json]

Reads a finished ``ctopd demo`` folder (``teacher/``, ``student/``, ``control/``,
``validation.jsonl``). For each warmed-up student: it samples one response per validation
prompt (temperature 1, seed 0, as the methods' rollouts do), lets the teacher score the same
text, aligns the two and computes, without training:

* each sample's correctness (its final answer against the reference);
* DPCA's per-token advantages (``chunk_advantages``: the teacher's chunk log-probability ``L_T``
  spread over the student's tokens in proportion to their share of ``L_S``, minus the
  student's own log-prob, clamped to ``±C``), summarised over the tokens of correct and of wrong
  samples: mean, share below -1, share clamped at ``-C``;
* per aligned chunk ``L_T - L_S`` (nats): quantiles, on correct and wrong samples;
* the norm of the gradient each objective puts on the student's parameters for this batch
  (``dpca``; ``simct`` and ``shared_only`` for the cross-tokenizer student; ``opd`` for the
  same-tokenizer control), each loss as the trainer computes it (per student response token).

With identical tokenizers every chunk is one token on each side and DPCA's advantage is the
per-token OPD advantage ``log q(t) - log π(t)`` (also a unit test:
``tests/objectives/test_dpca.py``); the script checks it on the control's batch and prints the
largest difference.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch


def diagnose(demo: Path, kind: str, prompts: int, max_new_tokens: int) -> dict:
    """The figures above for one student (``kind``: ``student`` or ``control``)."""
    from ctopd.core.pair import TokenizerPair
    from ctopd.objectives import compute_objective, teacher_needs, teacher_outputs
    from ctopd.objectives.dpca import dpca_advantages
    from ctopd.objectives.text_events import text_tables
    from ctopd.training.config import DataConfig, ModelConfig
    from ctopd.training.data import encode_prompts, load_examples
    from ctopd.training.evaluate import extract_answer
    from ctopd.training.models import load_causal_lm, load_model_tokenizer
    from ctopd.training.rollout import pad_responses, response_logits, sample_responses

    s_config, t_config = (
        ModelConfig(name_or_path=str(demo / kind)),
        ModelConfig(name_or_path=str(demo / "teacher")),
    )
    s_tok = load_model_tokenizer(s_config, side="student")
    t_tok = load_model_tokenizer(t_config, side="teacher")
    pair = TokenizerPair(t_tok, s_tok)
    student = load_causal_lm(s_config, side="student")
    teacher = load_causal_lm(t_config, side="teacher").eval()
    examples = load_examples(DataConfig(path=str(demo / "validation.jsonl"), limit=prompts))
    s_prompts = encode_prompts(s_tok, examples, side="student")
    t_prompts = encode_prompts(t_tok, examples, side="teacher")
    torch.manual_seed(0)
    with torch.no_grad():
        responses = sample_responses(
            student.eval(),
            s_prompts,
            end_ids=pair.student_table.end_ids.tolist(),
            pad_id=s_tok.pad_token_id,
            max_new_tokens=max_new_tokens,
            temperature=1.0,
        )
    t_responses = pair.teacher_ids_for_batch(responses)
    alignments = pair.align_batch(t_responses, responses)
    correct = np.array(
        [
            extract_answer(pair.student_text(r)) == extract_answer(e.response)
            for r, e in zip(responses, examples)
        ]
    )
    student_ids, lengths = pad_responses(responses, pad_id=-1)
    teacher_ids, _ = pad_responses(t_responses, pad_id=-1)
    with torch.no_grad():
        t_logits = response_logits(
            teacher, t_prompts, t_responses, pad_id=t_tok.pad_token_id, device="cpu"
        ).float()
        tables = text_tables(pair.teacher_table, pair.student_table, pair.shared_vocab)
        needs = teacher_needs("simct") | teacher_needs("opd") | teacher_needs("dpca")
        teacher_out = teacher_outputs(
            t_logits,
            teacher_ids,
            pair.shared_vocab,
            needs,
            alignments=alignments,
            student_ids=responses,
            text_tables=tables,
        )
        s_logits = response_logits(
            student, s_prompts, responses, pad_id=s_tok.pad_token_id, device="cpu"
        ).float()
        old = torch.log_softmax(s_logits, -1).gather(-1, student_ids.clamp(min=0)[..., None])[
            ..., 0
        ]
    old = old.masked_fill(student_ids < 0, 0.0)
    advantages, mask = dpca_advantages(old, teacher_out.token_logprobs, alignments)

    out = {
        "kind": kind,
        "samples": len(responses),
        "correct_samples": int(correct.sum()),
        "identical_tokenizers": pair.identical,
        "student_tokens": int(lengths.sum()),
    }
    for label, rows in (("correct", correct), ("wrong", ~correct)):
        token_mask = mask & torch.as_tensor(rows)[:, None]
        values = advantages[token_mask]
        out[f"advantage_{label}"] = _summary(values, clip=10.0)
        gaps = _chunk_gaps(alignments, teacher_out.token_logprobs, old, np.flatnonzero(rows))
        out[f"chunk_gap_{label}"] = _quantiles(gaps)
    if pair.identical:
        opd_advantage = (teacher_out.token_logprobs - old).clamp(-10, 10)
        out["identical_max_abs_diff"] = float((advantages - opd_advantage)[mask].abs().max())

    objectives = ["dpca", "opd"] if pair.identical else ["dpca", "simct", "shared_only"]
    norms = {}
    for name in objectives:
        student.zero_grad(set_to_none=True)
        logits = response_logits(
            student.train(), s_prompts, responses, pad_id=s_tok.pad_token_id, device="cpu"
        ).float()
        options = {"student_old_logprobs": old} if name == "dpca" else {}
        loss, _ = compute_objective(
            name,
            student_logits=logits,
            student_ids=student_ids,
            alignments=alignments,
            shared_vocab=pair.shared_vocab,
            teacher=teacher_out,
            **options,
        )
        loss.backward()
        norms[name] = math.sqrt(
            sum(float(p.grad.pow(2).sum()) for p in student.parameters() if p.grad is not None)
        )
    out["grad_norm"] = norms
    return out


def _chunk_gaps(alignments, teacher_logprobs, student_logprobs, rows) -> np.ndarray:
    """``L_T - L_S`` of every aligned chunk of the given responses (nats)."""
    gaps = []
    for b in rows:
        alignment = alignments[b]
        for (ts, te, ss, se), aligned in zip(alignment.chunks, alignment.aligned):
            if aligned and te > ts and se > ss:
                gaps.append(
                    float(teacher_logprobs[b, ts:te].sum() - student_logprobs[b, ss:se].sum())
                )
    return np.asarray(gaps)


def _summary(values: torch.Tensor, *, clip: float) -> dict:
    if values.numel() == 0:
        return {"tokens": 0}
    return {
        "tokens": int(values.numel()),
        "mean": float(values.mean()),
        "below_minus_1": float((values < -1).float().mean()),
        "clamped_low": float((values <= -clip + 1e-9).float().mean()),
        "above_plus_1": float((values > 1).float().mean()),
    }


def _quantiles(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"chunks": 0}
    q = np.quantile(values, [0.05, 0.5, 0.95])
    return {
        "chunks": int(values.size),
        "mean": float(values.mean()),
        "p5": float(q[0]),
        "median": float(q[1]),
        "p95": float(q[2]),
    }


def print_table(results: list[dict]) -> None:
    for r in results:
        title = "same-tokenizer control" if r["kind"] == "control" else "cross-tokenizer student"
        print(
            f"\n{title}: {r['samples']} samples of validation prompts, {r['correct_samples']} "
            f"correct, {r['student_tokens']} student tokens"
        )
        print(
            f"{'samples':<9}{'tokens':>8}{'adv mean':>10}{'adv < -1':>10}{'clamped':>9}"
            f"{'adv > 1':>9}{'chunks':>8}{'gap p5':>9}{'median':>8}{'p95':>8}"
        )
        for label in ("correct", "wrong"):
            a, g = r[f"advantage_{label}"], r[f"chunk_gap_{label}"]
            if not a.get("tokens"):
                print(f"{label:<9}{0:>8}")
                continue
            print(
                f"{label:<9}{a['tokens']:>8}{a['mean']:>10.3f}{a['below_minus_1']:>10.3f}"
                f"{a['clamped_low']:>9.3f}{a['above_plus_1']:>9.3f}{g['chunks']:>8}"
                f"{g['p5']:>9.2f}{g['median']:>8.2f}{g['p95']:>8.2f}"
            )
        norms = ", ".join(f"{k} {v:.3f}" for k, v in r["grad_norm"].items())
        print(f"gradient norm on the student's parameters: {norms}")
        if "identical_max_abs_diff" in r:
            print(
                "identical tokenizers: DPCA advantage vs per-token OPD advantage, largest "
                f"difference {r['identical_max_abs_diff']:.2e}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", default="ctopd-demo", type=Path)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for name in ("teacher", "student", "control", "validation.jsonl"):
        if not (args.demo_dir / name).exists():
            print(
                f"error: {args.demo_dir / name} is missing; run `ctopd demo --output-dir "
                f"{args.demo_dir}` first",
                file=sys.stderr,
            )
            return 2
    torch.set_num_threads(1)
    results = [
        diagnose(args.demo_dir, kind, args.prompts, args.max_new_tokens)
        for kind in ("student", "control")
    ]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
