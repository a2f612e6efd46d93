"""Real pretrained models, one pair, every method at an equal rollout budget.

    python examples/real_pair/fetch_models.py --cache models/real-pair   # once (~3 min)
    python benchmarks/real_pair.py --models models/real-pair                  # ~1.5 h, 2 cores
    python benchmarks/real_pair.py --models models/real-pair --quick          # smoke run, minutes
    python benchmarks/real_pair.py ... --json                                 # one JSON object

Teacher SmolLM2-135M-Instruct, student Gemma-3-270M (base) by default (``--direction``), on GSM8K
prompts from ``../shared/data/gsm8k/train.jsonl``: training prompts are the first rows, held-out
prompts the last ``--heldout`` rows (no question in both; checked). Each method trains from the
same start on the same prompts for the same number of steps (``--steps`` × ``--batch`` prompts,
one sample each):

* ``simct``, ``dpca``, ``shared_only``: ``ctopd train`` (on-policy; the student samples);
* ``sft``: ``ctopd sft --sft.source teacher`` (the teacher samples one response per prompt, the
  student is trained on its tokenisation of that text).

The measure is the held-out text-level reverse KL to the teacher, per student token: the student
samples a response ``y`` (temperature 1, the same sampling seed for every model) to each held-out
prompt; ``KL = Σ (log π(y) − log q(y)) / Σ |y|`` where ``log q(y)`` is the teacher's log-prob of the
same text under its own tokenisation and chat template (end of turn included). Both sides are
probabilities of the same text, so the figure compares methods whatever their supervision space.
Also per run: response length and end-of-turn rate of those samples, per-phase step time (from
``metrics.jsonl``) and peak RSS of the training process. The pair's coverage is measured on the
held-out reference answers and on the start student's own samples: the methods can only differ
where the vocabularies disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ctopd.training.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
GEMMA_TEMPLATE = REPO / "examples" / "real_pair" / "gemma3_chat_template.jinja"
MODELS = {
    "smollm2": ("smollm2-135m-instruct", None),
    "gemma3": ("gemma-3-270m", str(GEMMA_TEMPLATE)),
}
DIRECTIONS = {
    "smollm2-to-gemma3": ("smollm2", "gemma3"),
    "gemma3-to-smollm2": ("gemma3", "smollm2"),
}
PHASES = ("rollout", "teacher", "alignment", "student_forward", "loss", "backward", "optimizer")


def split_gsm8k(path: Path, folder: Path, *, train: int, heldout: int) -> tuple[Path, Path]:
    """Training prompts (the first ``train`` rows) and held-out prompts (the last ``heldout``)
    as JSONL files in ``folder``; raises when a question is in both."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    if train + heldout > len(rows):
        raise SystemExit(f"{path} has {len(rows)} rows; need {train} + {heldout}")
    train_rows, heldout_rows = rows[:train], rows[-heldout:]
    shared = {r["question"] for r in train_rows} & {r["question"] for r in heldout_rows}
    if shared:
        raise SystemExit(f"{len(shared)} questions are in both the training and held-out prompts")
    folder.mkdir(parents=True, exist_ok=True)
    files = folder / "train.jsonl", folder / "heldout.jsonl"
    for file, part in zip(files, (train_rows, heldout_rows)):
        file.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return files


def model_config(models: Path, which: str, **extra) -> ModelConfig:
    folder, template = MODELS[which]
    return ModelConfig(name_or_path=str(models / folder), chat_template=template, **extra)


def heldout_figures(
    student_config,
    teacher_config,
    heldout: Path,
    *,
    max_new_tokens: int,
    batch: int,
    seed: int = 1234,
) -> dict:
    """Text-level reverse KL to the teacher on the held-out prompts (see the module docstring),
    with the samples' length, end-of-turn rate and coverage, and the KL split by chunk kind.

    The minimal aligned chunks partition both tokenisations of a sample, so the sequence's
    ``log π(y) − log q(y)`` is the sum over its chunks of ``log π(chunk) − log q(chunk)``. The
    split puts each chunk in one of two kinds: a 1:1 chunk whose token is in the shared
    vocabulary (what exact shared-token matching supervises) or any other chunk (multi-token
    units, and 1:1 chunks of tokens outside ``V∩``: where SimCT and DPCA supervise and
    ``shared_only`` does not).

    Returns:
        ``kl`` (nats per student token), ``kl_shared`` and ``kl_other`` (the two kinds' parts of
        ``kl``, also per student token, so they add up to it), ``length`` (mean student tokens),
        ``ended`` (share of samples that ended their turn), ``shared_only_coverage`` and
        ``aligned_coverage`` (share of the samples' student tokens that exact shared-token
        matching / minimal aligned units supervise), ``samples``.
    """
    import numpy as np
    import torch

    from ctopd.core.coverage import coverage_counts
    from ctopd.core.pair import TokenizerPair
    from ctopd.training.config import DataConfig
    from ctopd.training.data import encode_prompts, load_examples
    from ctopd.training.models import load_causal_lm, load_model_tokenizer
    from ctopd.training.rollout import pad_responses, response_logits, sample_responses

    student_tokenizer = load_model_tokenizer(student_config, side="student")
    teacher_tokenizer = load_model_tokenizer(teacher_config, side="teacher")
    pair = TokenizerPair(teacher_tokenizer, student_tokenizer)
    student = load_causal_lm(student_config, side="student").eval()
    teacher = load_causal_lm(teacher_config, side="teacher").eval()
    examples = load_examples(DataConfig(path=str(heldout), prompt_field="question"))
    student_prompts = encode_prompts(student_tokenizer, examples, side="student")
    teacher_prompts = encode_prompts(teacher_tokenizer, examples, side="teacher")

    def token_logprobs(model, prompts, responses, pad_id, num_ids) -> list[np.ndarray]:
        """Each response's per-token log-probs (float64 ``[len]``) over the real ids."""
        logits = response_logits(model, prompts, responses, pad_id=pad_id, device="cpu")
        targets, _ = pad_responses(responses)
        logprobs = torch.log_softmax(logits[..., :num_ids].double(), -1)
        picked = logprobs.gather(-1, targets[..., None])[..., 0].numpy()
        return [picked[b, : len(r)] for b, r in enumerate(responses)]

    totals = {"kl": 0.0, "kl_shared": 0.0, "kl_other": 0.0}
    tokens, ended, counts = 0, 0, {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for lo in range(0, len(examples), batch):
            s_prompts, t_prompts = (
                student_prompts[lo : lo + batch],
                teacher_prompts[lo : lo + batch],
            )
            responses = sample_responses(
                student,
                s_prompts,
                end_ids=pair.student_table.end_ids.tolist(),
                pad_id=student_tokenizer.pad_token_id,
                max_new_tokens=max_new_tokens,
                temperature=1.0,
                num_ids=pair.student_table.vocab_size,
            )
            teacher_responses = pair.teacher_ids_for_batch(responses)
            alignments = pair.align_batch(teacher_responses, responses)
            student_lp = token_logprobs(
                student,
                s_prompts,
                responses,
                student_tokenizer.pad_token_id,
                pair.student_table.vocab_size,
            )
            teacher_lp = token_logprobs(
                teacher,
                t_prompts,
                teacher_responses,
                teacher_tokenizer.pad_token_id,
                pair.teacher_table.vocab_size,
            )
            for al, ids, s_lp, t_lp in zip(alignments, responses, student_lp, teacher_lp):
                s_cum, t_cum = (
                    np.concatenate([[0.0], np.cumsum(s_lp)]),
                    np.concatenate([[0.0], np.cumsum(t_lp)]),
                )
                a, b, c, d = al.chunks.T
                gap = (s_cum[d] - s_cum[c]) - (t_cum[b] - t_cum[a])  # [K] nats per chunk
                first = np.asarray(ids, dtype=np.int64)[np.minimum(c, len(ids) - 1)]
                shared = al.one_to_one & (pair.shared_vocab.student_id_to_class[first] >= 0)
                totals["kl"] += float(s_lp.sum() - t_lp.sum())
                totals["kl_shared"] += float(gap[shared].sum())
                totals["kl_other"] += float(s_lp.sum() - t_lp.sum() - gap[shared].sum())
            tokens += sum(len(r) for r in responses)
            ended += sum(pair.ended_turn(r) for r in responses)
            batch_counts = coverage_counts(alignments, responses, pair.shared_vocab)
            counts = {k: counts.get(k, 0) + v for k, v in batch_counts.items()}
    student_tokens = max(counts["student_tokens"], 1)
    return {
        **{k: v / max(tokens, 1) for k, v in totals.items()},
        "length": tokens / len(examples),
        "ended": ended / len(examples),
        "samples": len(examples),
        "shared_only_coverage": counts["shared_only_tokens"] / student_tokens,
        "aligned_coverage": counts["aligned_tokens"] / student_tokens,
    }


def greedy_quality(
    model_config: ModelConfig, heldout: Path, *, max_new_tokens: int, batch: int
) -> dict:
    """One model alone on the held-out prompts, greedy: GSM8K accuracy (final answer after
    ``####``, or the last number), share of responses that end their turn, mean length."""
    import torch

    from ctopd.core.byte_table import end_of_turn_ids
    from ctopd.training.config import DataConfig
    from ctopd.training.data import encode_prompts, load_examples
    from ctopd.training.evaluate import answers_match, extract_answer
    from ctopd.training.models import load_causal_lm, load_model_tokenizer
    from ctopd.training.rollout import count_token_ids, sample_responses

    tokenizer = load_model_tokenizer(model_config, side="model")
    model = load_causal_lm(model_config, side="model").eval()
    examples = load_examples(DataConfig(path=str(heldout), prompt_field="question"))
    prompts = encode_prompts(tokenizer, examples, side="model")
    end_ids = end_of_turn_ids(tokenizer)
    correct = ended = tokens = 0
    with torch.no_grad():
        for lo in range(0, len(examples), batch):
            responses = sample_responses(
                model,
                prompts[lo : lo + batch],
                end_ids=end_ids,
                pad_id=tokenizer.pad_token_id,
                max_new_tokens=max_new_tokens,
                temperature=0.0,
                num_ids=count_token_ids(tokenizer),
            )
            for example, ids in zip(examples[lo : lo + batch], responses):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                correct += answers_match(extract_answer(text), extract_answer(example.answer))
                ended += bool(ids) and ids[-1] in end_ids
                tokens += len(ids)
    count = len(examples)
    return {"accuracy": correct / count, "ended": ended / count, "length": tokens / count}


def reference_coverage(student_config, teacher_config, heldout: Path) -> dict:
    """Coverage of the held-out reference answers (each tokenizer's own encoding)."""
    from ctopd.commands.align import read_texts
    from ctopd.core.coverage import coverage_counts
    from ctopd.core.pair import TokenizerPair
    from ctopd.training.models import load_model_tokenizer

    pair = TokenizerPair(
        load_model_tokenizer(teacher_config, side="teacher"),
        load_model_tokenizer(student_config, side="student"),
    )
    texts = list(read_texts(heldout, "answer"))
    teacher_ids, student_ids = pair.encode_batch(texts)
    counts = coverage_counts(
        pair.align_batch(teacher_ids, student_ids, texts=texts), student_ids, pair.shared_vocab
    )
    return {
        "shared_only_coverage": counts["shared_only_tokens"] / counts["student_tokens"],
        "aligned_coverage": counts["aligned_tokens"] / counts["student_tokens"],
        "multi_token_chunks": counts["chunks_multi"],
        "chunks": counts["chunks_multi"] + counts["chunks_one_to_one"],
    }


def train_run(method: str, seed: int, args, paths: dict, output_dir: Path) -> dict:
    """One training run in its own process (``ctopd train`` or ``ctopd sft``); returns its
    per-phase mean step times, wall seconds and peak RSS."""
    student, teacher = (model_config(args.models, w) for w in DIRECTIONS[args.direction][::-1])
    command = [
        sys.executable,
        "-m",
        "ctopd",
        "sft" if method == "sft" else "train",
        "--student",
        student.name_or_path,
        "--teacher",
        teacher.name_or_path,
        "--data",
        str(paths["train"]),
        "--data.prompt-field",
        "question",
        "--data.shuffle",
        "false",
        "--max-steps",
        str(args.steps),
        "--per-device-batch-size",
        str(args.batch),
        "--seed",
        str(seed),
        "--rollout.max-new-tokens",
        str(args.max_new_tokens),
        "--rollout.temperature",
        "1.0",
        "--optim.lr",
        str(args.lr),
        "--optim.warmup-ratio",
        "0",
        "--optim.schedule",
        "constant",
        "--output-dir",
        str(output_dir),
        "--save-every",
        "0",
        "--progress",
        "false",
        "--log-every",
        "1",
        "--overwrite",
    ]  # a benchmark run again replaces its runs
    for side, config in (("", student), ("teacher-", teacher)):
        if config.chat_template:
            command += [f"--{side}chat-template", config.chat_template]
    command += ["--sft.source", "teacher"] if method == "sft" else ["--objective", method]
    started = time.perf_counter()
    log = (output_dir.parent / f"{output_dir.name}.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{method} seed {seed} failed; see {log.name}")
    for checkpoint in output_dir.glob("checkpoint-*"):  # ~4 GB each; final/ is what is measured
        shutil.rmtree(checkpoint)
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    phases = {p: statistics.mean(r.get(f"time_{p}", 0.0) for r in rows) for p in PHASES}
    return {
        "seconds": time.perf_counter() - started,
        "peak_rss_gb": usage.ru_maxrss / 2**20,
        "step_seconds": statistics.mean(r["time_step"] for r in rows),
        "phases": phases,
        "train_coverage": statistics.mean(r.get("coverage", 1.0) for r in rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        type=Path,
        default=Path("models/real-pair"),
        help="folder that examples/real_pair/fetch_models.py filled",
    )
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/gsm8k/train.jsonl")
    parser.add_argument("--direction", choices=DIRECTIONS, default="smollm2-to-gemma3")
    parser.add_argument("--methods", default="simct,dpca,shared_only,sft")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--heldout", type=int, default=64, help="held-out prompts")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument(
        "--quality-tokens",
        type=int,
        default=256,
        help="response budget of the greedy teacher/student comparison",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("runs/real-pair"))
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 steps, 8 held-out")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the trained models and training figures of an earlier run "
        "in --output-dir (same settings); measure them again",
    )
    parser.add_argument(
        "--report", type=Path, help="print the table of a finished run's result.json and stop"
    )
    args = parser.parse_args(argv)
    if args.report:
        result = json.loads(args.report.read_text(encoding="utf-8"))
        methods = list(dict.fromkeys(r["method"] for r in result["runs"]))
        print(format_table(result, methods))
        return 0
    if args.quick:
        args.seeds, args.steps, args.heldout, args.max_new_tokens = 1, 2, 8, 32
        args.quality_tokens = 32
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.models = args.models.resolve()
    out = args.output_dir.resolve()
    train_file, heldout_file = split_gsm8k(
        args.data, out / "data", heldout=args.heldout, train=args.steps * args.batch
    )
    paths = {"train": train_file, "heldout": heldout_file}
    teacher_name, student_name = DIRECTIONS[args.direction]
    student, teacher = (
        model_config(args.models, student_name),
        model_config(args.models, teacher_name),
    )
    measure = dict(max_new_tokens=args.max_new_tokens, batch=8)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print

    result = {
        "direction": args.direction,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    result["coverage_reference"] = reference_coverage(student, teacher, heldout_file)
    # Which model teaches: each one alone, greedy, on the held-out prompts.
    for role, config in (("teacher", teacher), ("student", student)):
        result[f"{role}_greedy"] = greedy_quality(
            config, heldout_file, batch=8, max_new_tokens=args.quality_tokens
        )
        say(
            f"{role} alone, greedy, {args.quality_tokens} tokens: "
            + ", ".join(f"{k} {v:.3f}" for k, v in result[f"{role}_greedy"].items())
        )
    start = heldout_figures(student, teacher, heldout_file, **measure)
    result["start"] = start
    result["kl_start"] = start["kl"]
    say(
        f"start: KL {start['kl']:.4f}, length {start['length']:.1f}, ended {start['ended']:.2f}, "
        f"coverage on samples {start['shared_only_coverage']:.3f} shared-only / "
        f"{start['aligned_coverage']:.3f} aligned"
    )
    runs = []
    # --reuse: the training figures of runs an earlier invocation finished (same folder).
    earlier = {}
    if args.reuse and (out / "result.json").is_file():
        keep = ("seconds", "peak_rss_gb", "step_seconds", "phases", "train_coverage")
        for run in json.loads((out / "result.json").read_text(encoding="utf-8"))["runs"]:
            earlier[run["method"], run["seed"]] = {k: run[k] for k in keep}
    for method in methods:
        for seed in range(args.seeds):
            run_dir = out / f"{method}-seed{seed}"
            info = earlier.get((method, seed))
            if info is None or not (run_dir / "final" / "config.json").is_file():
                info = train_run(method, seed, args, paths, run_dir)
            else:
                say(f"{method} seed {seed}: trained model reused (--reuse), measured again")
            figures = heldout_figures(
                ModelConfig(name_or_path=str(run_dir / "final")), teacher, heldout_file, **measure
            )
            runs.append({"method": method, "seed": seed, **info, **figures})
            say(
                f"{method} seed {seed}: KL {figures['kl']:.4f} (start {start['kl']:.4f}), "
                f"length {figures['length']:.1f}, ended {figures['ended']:.2f}, "
                f"step {info['step_seconds']:.1f} s, peak RSS {info['peak_rss_gb']:.2f} GB"
            )
    result["runs"] = runs
    for method in methods:
        kls = [r["kl"] for r in runs if r["method"] == method]
        result[f"kl_final_{method}"] = statistics.mean(kls)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result, methods))
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def format_table(result: dict, methods: list[str]) -> str:
    """The benchmark's two tables (held-out KL, then cost) and its coverage and quality lines."""
    start = result["start"]
    lines = [
        f"{role} alone (greedy, held-out): accuracy {q['accuracy']:.3f}, ended "
        f"{q['ended']:.2f}, length {q['length']:.0f} tokens"
        for role in ("teacher", "student")
        if (q := result.get(f"{role}_greedy"))
    ]
    lines += [
        "",
        f"Held-out text-level reverse KL to the teacher ({result['direction']}), nats "
        "per student token; 'shared' and 'other' split it by chunk kind (they add up):",
        "",
        "| method | KL per seed | KL mean | Δ vs start | shared | other | length | ended "
        "| samples' shared-only coverage |",
        "| --- " * 9 + "|",
    ]

    def row(name: str, runs: list[dict]) -> str:
        def mean(key: str) -> float:
            return (
                statistics.mean(r[key] for r in runs if key in r)
                if any(key in r for r in runs)
                else float("nan")
            )

        per_seed = " ".join(f"{r['kl']:.4f}" for r in runs)
        return (
            f"| {name} | {per_seed} | {mean('kl'):.4f} | {mean('kl') - start['kl']:+.4f} | "
            f"{mean('kl_shared'):.4f} | {mean('kl_other'):.4f} | {mean('length'):.1f} | "
            f"{mean('ended'):.2f} | {mean('shared_only_coverage'):.3f} |"
        )

    lines.append(row("start", [start]))
    lines += [row(m, [r for r in result["runs"] if r["method"] == m]) for m in methods]
    lines += [
        "",
        "Cost per optimiser step (mean seconds by phase) and the training process's peak RSS:",
        "",
        "| method | step s | " + " | ".join(PHASES) + " | run s | peak RSS GB |",
        "| --- " * (4 + len(PHASES)) + "|",
    ]
    for method in methods:
        runs = [r for r in result["runs"] if r["method"] == method]
        phases = " | ".join(f"{statistics.mean(r['phases'][p] for r in runs):.1f}" for p in PHASES)
        lines.append(
            f"| {method} | {statistics.mean(r['step_seconds'] for r in runs):.1f} | "
            f"{phases} | {statistics.mean(r['seconds'] for r in runs):.0f} | "
            f"{statistics.mean(r['peak_rss_gb'] for r in runs):.2f} |"
        )
    cov = result["coverage_reference"]
    lines += [
        "",
        f"Coverage of the held-out reference answers: shared-only "
        f"{cov['shared_only_coverage']:.3f}, minimal aligned units "
        f"{cov['aligned_coverage']:.3f} ({cov['multi_token_chunks']} multi-token "
        f"chunks of {cov['chunks']}); of the start student's samples: "
        f"{start['shared_only_coverage']:.3f} / {start['aligned_coverage']:.3f}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
