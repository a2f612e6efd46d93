"""How noisy is each objective's gradient at the demo's batch? The gradient noise scale of
DPCA, OPD, SimCT, shared-only OPD and SFT on the demo's warmed-up students.

    python research/demo_gradient_noise.py --demo-dir ctopd-demo [--rollouts 512] [--json F]

With identical tokenizers DPCA's per-token advantage is ``log q(s) - log π(s)`` of the one token
the student sampled, and in expectation over that token its gradient is the gradient of the
per-position reverse KL, the gradient full-distribution ``opd`` computes exactly (one update per
rollout, no clamping). The two differ in variance only. This script measures that variance at
the point each method starts from.

For each warmed-up student (``student/``, ``control/``) it takes the first ``--rollouts`` pool
positions of the demo's teacher samples (training prompts), samples one response per prompt
(temperature and length as the methods' rollouts), and computes each objective's gradient on
every rollout alone (the loss as the trainer computes it, times the rollout's student response
tokens, so a batch's gradient is the sum over its rollouts divided by its tokens; SFT: the
cross-entropy summed over the student's tokenisation of the teacher's sample of that prompt).
With ``h_r`` the gradient of rollout ``r`` over the mean tokens per rollout, it reports:

* ``|G|²``: the squared norm of the expected gradient, estimated without bias from pairs
  ``r ≠ r'`` (``h_r · h_r'``);
* ``tr Σ``: the per-rollout variance (summed over parameters);
* ``B_noise = tr Σ / |G|²``: the gradient noise scale ("simple" noise scale of McCandlish et
  al., 2018, An empirical model of large-batch training). A batch of ``B`` rollouts has expected
  ``cos²`` with the expected gradient of about ``1 / (1 + B_noise / B)``; well below ``B_noise``
  a step is mostly noise, and a batch ``k`` times larger buys about ``k`` times the signal;
* ``cos`` at the demo's batch: ``(1 + B_noise / B)^(-1/2)``;
* the share of ``Σ_r |h_r|²`` that the top 1% of rollouts hold (a variance from a few
  outliers reads differently from one spread over every rollout);
* the cosine between the expected gradients of two objectives (from pairs ``r ≠ r'``), against
  DPCA's and SFT's: for the control DPCA against OPD should be about 1.

``--variants`` adds, for the cross-tokenizer student, two variants of DPCA that isolate its
two departures from a plain chunk-level policy gradient: DPCA without the advantage clamp
(``C`` = ∞), and chunk-level REINFORCE, where every student token of an aligned chunk gets the
chunk's whole ``L_T - L_S`` instead of DPCA's proportional share of it. Their expected-gradient
cosines with DPCA and SimCT say how much of the angle between DPCA and SimCT each departure
explains. It also reports the share of student tokens in aligned chunks that are not 1:1, in
aligned chunks of more than one student token (where alone the split acts), and at the clamp.

Expected figures describe the point of measurement (the start); during a run they change.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch


def chunk_reinforce_loss(
    logits: torch.Tensor, response: list[int], teacher_logprobs: torch.Tensor, alignment
) -> torch.Tensor:
    """Chunk-level REINFORCE for one rollout: ``-sum_i (L_T - L_S)_{chunk(i)} log π(s_i)`` over
    the student tokens of aligned chunks, per student response token (``logits`` ``[1, m, V]``,
    ``teacher_logprobs`` ``[n]``)."""
    logprobs = torch.log_softmax(logits[0], -1).gather(1, torch.tensor(response)[:, None])[:, 0]
    old = logprobs.detach()
    advantages = torch.zeros_like(old)
    used = torch.zeros(len(response), dtype=torch.bool)
    for (t0, t1, s0, s1), aligned in zip(alignment.chunks.tolist(), alignment.aligned.tolist()):
        if aligned:
            advantages[s0:s1] = teacher_logprobs[t0:t1].sum() - old[s0:s1].sum()
            used[s0:s1] = True
    return -(advantages * logprobs)[used].sum() / len(response)


def per_rollout_gradients(
    demo: Path, kind: str, rollouts: int, seed: int, variants: bool = False
) -> dict:
    """``{objective: (h [N, P] float32, tokens [N])}`` for one student, and with ``variants``
    (cross-tokenizer only) ``dpca_unclamped`` and ``chunk_reinforce`` too, plus a
    ``"_counts"`` entry: student tokens in aligned multi-token chunks, at the clamp, in all."""
    import torch.nn.functional as F

    from ctopd.core.pair import TokenizerPair
    from ctopd.objectives import compute_objective, teacher_needs, teacher_outputs
    from ctopd.objectives.dpca import dpca_advantages
    from ctopd.objectives.text_events import text_tables
    from ctopd.training.config import ModelConfig
    from ctopd.training.data import Example, encode_prompts
    from ctopd.training.models import load_causal_lm, load_model_tokenizer
    from ctopd.training.rollout import pad_responses, response_logits, sample_responses

    settings = _settings(demo)
    s_config = ModelConfig(name_or_path=str(demo / kind))
    t_config = ModelConfig(name_or_path=str(demo / "teacher"))
    s_tok = load_model_tokenizer(s_config, side="student")
    t_tok = load_model_tokenizer(t_config, side="teacher")
    pair = TokenizerPair(t_tok, s_tok)
    student = load_causal_lm(s_config, side="student")
    teacher = load_causal_lm(t_config, side="teacher").eval()
    train = (demo / "train.jsonl").read_text(encoding="utf-8").splitlines()
    with (demo / "teacher_samples.jsonl").open(encoding="utf-8") as handle:
        samples = [json.loads(line) for _, line in zip(range(rollouts), handle)]
    examples = []
    for sample in samples:
        row = json.loads(train[sample["index"]])
        examples.append(Example(messages=row["messages"], response=row.get("answer")))
    s_prompts = encode_prompts(s_tok, examples, side="student")
    t_prompts = encode_prompts(t_tok, examples, side="teacher")
    end_ids = pair.student_table.end_ids.tolist()
    torch.manual_seed(seed)
    with torch.no_grad():
        responses = []
        for start in range(0, len(s_prompts), 64):
            responses += sample_responses(
                student.eval(),
                s_prompts[start : start + 64],
                end_ids=end_ids,
                pad_id=s_tok.pad_token_id,
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
            )
    end_of_turn = next((i for i in end_ids if i != s_tok.eos_token_id), end_ids[0])
    sft_targets = [
        list(ids) + [end_of_turn]
        for ids in s_tok([s["response"] for s in samples], add_special_tokens=False)["input_ids"]
    ]

    objectives = ["dpca", "opd"] if pair.identical else ["dpca", "simct", "shared_only"]
    needs = frozenset().union(*(teacher_needs(name) for name in objectives))
    extra = ["dpca_unclamped", "chunk_reinforce"] if variants and not pair.identical else []
    counts = {"multi": 0, "split": 0, "clamped": 0, "tokens": 0}
    tables = text_tables(pair.teacher_table, pair.student_table, pair.shared_vocab)
    params = [p for p in student.parameters() if p.requires_grad]
    grads = {name: [] for name in objectives + extra + ["sft"]}
    tokens = {name: [] for name in objectives + extra + ["sft"]}
    student.train()
    for r, response in enumerate(responses):
        t_response = pair.teacher_ids_for_batch([response])
        alignments = pair.align_batch(t_response, [response])
        teacher_ids, _ = pad_responses(t_response, pad_id=-1)
        with torch.no_grad():
            t_logits = response_logits(
                teacher, t_prompts[r : r + 1], t_response, pad_id=t_tok.pad_token_id, device="cpu"
            ).float()
            teacher_out = teacher_outputs(
                t_logits,
                teacher_ids,
                pair.shared_vocab,
                needs,
                alignments=alignments,
                student_ids=[response],
                text_tables=tables,
            )
        student_ids, _ = pad_responses([response])
        for name in objectives:
            logits = response_logits(
                student, s_prompts[r : r + 1], [response], pad_id=s_tok.pad_token_id, device="cpu"
            ).float()
            loss, _ = compute_objective(
                name,
                student_logits=logits,
                student_ids=student_ids,
                alignments=alignments,
                shared_vocab=pair.shared_vocab,
                teacher=teacher_out,
            )
            grads[name].append(_flat_grad(loss * len(response), params))
            tokens[name].append(len(response))
        if extra:
            logits = response_logits(
                student, s_prompts[r : r + 1], [response], pad_id=s_tok.pad_token_id, device="cpu"
            ).float()
            loss, _ = compute_objective(
                "dpca",
                student_logits=logits,
                student_ids=student_ids,
                alignments=alignments,
                shared_vocab=pair.shared_vocab,
                teacher=teacher_out,
                advantage_clip=1e9,
            )
            grads["dpca_unclamped"].append(_flat_grad(loss * len(response), params))
            logits = response_logits(
                student, s_prompts[r : r + 1], [response], pad_id=s_tok.pad_token_id, device="cpu"
            ).float()
            loss = chunk_reinforce_loss(
                logits, response, teacher_out.token_logprobs[0], alignments[0]
            )
            grads["chunk_reinforce"].append(_flat_grad(loss * len(response), params))
            for name in extra:
                tokens[name].append(len(response))
            old = torch.log_softmax(logits[0].detach(), -1).gather(
                1, torch.tensor(response)[:, None]
            )[:, 0]
            advantages, mask = dpca_advantages(old[None], teacher_out.token_logprobs, alignments)
            chunks, aligned = alignments[0].chunks, alignments[0].aligned
            one_to_one = (chunks[:, 1] - chunks[:, 0] == 1) & (chunks[:, 3] - chunks[:, 2] == 1)
            sizes = chunks[:, 3] - chunks[:, 2]
            counts["multi"] += int(sizes[aligned & ~one_to_one].sum())
            counts["split"] += int(sizes[aligned & (sizes > 1)].sum())
            counts["clamped"] += int((advantages.abs() >= 10.0 - 1e-9)[mask].sum())
            counts["tokens"] += len(response)
        logits = response_logits(
            student,
            s_prompts[r : r + 1],
            sft_targets[r : r + 1],
            pad_id=s_tok.pad_token_id,
            device="cpu",
        ).float()
        target = torch.tensor(sft_targets[r])
        loss = F.cross_entropy(logits[0], target, reduction="sum")
        grads["sft"].append(_flat_grad(loss, params))
        tokens["sft"].append(len(sft_targets[r]))
    out = {}
    for name in grads:
        n = np.asarray(tokens[name], dtype=np.float64)
        out[name] = (np.stack(grads[name]) / n.mean()).astype(np.float32), n
    if extra:
        out["_counts"] = counts
    return out


def _flat_grad(loss: torch.Tensor, params: list) -> np.ndarray:
    found = torch.autograd.grad(loss, params, allow_unused=True)
    return (
        torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, p in zip(found, params)
            ]
        )
        .numpy()
        .astype(np.float32)
    )


def noise_figures(h: np.ndarray, batch: int) -> dict:
    """``|G|²``, ``tr Σ``, ``B_noise`` and the expected cosine at ``batch`` of per-rollout
    gradients ``h`` ``[N, P]``."""
    count = h.shape[0]
    total = h.astype(np.float64).sum(0)
    square_sum = float((h.astype(np.float64) ** 2).sum())
    signal = (float(total @ total) - square_sum) / (count * (count - 1))  # mean of h_r·h_r', r≠r'
    variance = square_sum / count - signal  # E|h|² - |G|²
    scale = variance / signal if signal > 0 else math.inf
    squares = np.sort((h.astype(np.float64) ** 2).sum(1))[::-1]
    top = squares[: max(1, count // 100)].sum() / squares.sum()
    return {
        "signal": signal,
        "variance": variance,
        "noise_scale": scale,
        "top_share": float(top),
        "cos_at_batch": (1 + scale / batch) ** -0.5 if signal > 0 else 0.0,
    }


def expected_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the expected gradients of two objectives over the same rollouts, each inner
    product estimated from pairs ``r ≠ r'``."""

    def pair_mean(x, y):
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        return (float(x64.sum(0) @ y64.sum(0)) - float((x64 * y64).sum())) / (len(x) * (len(x) - 1))

    aa, bb, ab = pair_mean(a, a), pair_mean(b, b), pair_mean(a, b)
    return ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else float("nan")


def measure(
    demo: Path, kind: str, rollouts: int, seed: int, batch: int, variants: bool = False
) -> dict:
    grads = per_rollout_gradients(demo, kind, rollouts, seed, variants)
    counts = grads.pop("_counts", None)
    rows = {}
    for name, (h, n) in grads.items():
        rows[name] = {**noise_figures(h, batch), "mean_tokens": float(n.mean())}
    pairs = {}
    against = ("dpca", "sft") + (("simct",) if "simct" in grads else ())
    for a in grads:
        for b in against:
            if a != b and f"{b}~{a}" not in pairs:
                pairs[f"{a}~{b}"] = expected_cosine(grads[a][0], grads[b][0])
    result = {
        "kind": kind,
        "rollouts": rollouts,
        "batch": batch,
        "objectives": rows,
        "expected_cosines": pairs,
    }
    if counts is not None:
        result["multi_token_share"] = counts["multi"] / max(counts["tokens"], 1)
        result["split_share"] = counts["split"] / max(counts["tokens"], 1)
        result["clamped_share"] = counts["clamped"] / max(counts["tokens"], 1)
    return result


def _settings(demo: Path):
    from ctopd.demo.settings import demo_settings

    path = demo / "results.json"
    if path.is_file():
        sys.path.insert(0, str(Path(__file__).parent))
        from demo_control_dpca import settings_from_results

        return settings_from_results(json.loads(path.read_text(encoding="utf-8"))["settings"])
    return demo_settings()


def print_table(results: list[dict]) -> None:
    names = {
        "dpca": "DPCA",
        "opd": "same-tokenizer OPD",
        "simct": "SimCT",
        "shared_only": "shared-only OPD",
        "sft": "continued SFT",
        "dpca_unclamped": "DPCA without the clamp",
        "chunk_reinforce": "chunk-level REINFORCE",
    }
    for r in results:
        title = "same-tokenizer control" if r["kind"] == "control" else "cross-tokenizer student"
        print(f"\n{title} at its start, {r['rollouts']} rollouts of training prompts:\n")
        print(
            f"| objective | tokens per rollout | ‖G‖² | tr Σ | B_noise (rollouts) "
            f"| cos at {r['batch']} prompts | top 1% of rollouts' share of Σ‖h‖² |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, row in r["objectives"].items():
            print(
                f"| {names[name]} | {row['mean_tokens']:.1f} | {row['signal']:.3g} "
                f"| {row['variance']:.3g} | {row['noise_scale']:.0f} "
                f"| {row['cos_at_batch']:.2f} | {row['top_share']:.2f} |"
            )
        cosines = ", ".join(
            f"{' vs '.join(names[n] for n in key.split('~'))} {value:.2f}"
            for key, value in r["expected_cosines"].items()
        )
        print(f"\ncosine between expected gradients: {cosines}")
        if "multi_token_share" in r:
            print(
                f"\nshare of student tokens in aligned chunks that are not 1:1: "
                f"{r['multi_token_share']:.3f}; in aligned chunks of more than one student "
                f"token (the only ones where DPCA's proportional split differs from "
                f"chunk-level REINFORCE): {r['split_share']:.4f}; DPCA advantages at the "
                f"clamp: {r['clamped_share']:.4f}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", default="ctopd-demo", type=Path)
    parser.add_argument("--rollouts", type=int, default=512)
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="prompts per step to read the cosine at (default: the demo's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--variants",
        action="store_true",
        help="add DPCA without its clamp and chunk-level REINFORCE for the cross-tokenizer student",
    )
    parser.add_argument(
        "--kinds",
        default="student,control",
        help="which students to measure (comma-separated: student, control)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    for name in ("teacher", "student", "control", "train.jsonl", "teacher_samples.jsonl"):
        if not (args.demo_dir / name).exists():
            print(
                f"error: {args.demo_dir / name} is missing; run `ctopd demo --output-dir "
                f"{args.demo_dir}` first",
                file=sys.stderr,
            )
            return 2
    if args.rollouts < 2:
        parser.error("--rollouts must be at least 2")
    torch.set_num_threads(2)
    batch = args.batch or _settings(args.demo_dir).method_batch
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - {"student", "control"}:
        parser.error(f"--kinds takes student and/or control; got {args.kinds!r}")
    results = [
        measure(args.demo_dir, kind, args.rollouts, args.seed, batch, args.variants)
        for kind in kinds
    ]
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
