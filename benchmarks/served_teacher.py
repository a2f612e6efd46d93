"""A served teacher: step time in process vs served, and the objectives' error from top-k.

    python benchmarks/served_teacher.py [--part step|topk|all] [--steps 6] [--repeats 3] [--json]
    python benchmarks/served_teacher.py --part topk --teacher DEMO/teacher --student S \\
        --prompts DEMO/test.jsonl

**step** — tiny local models built like ``ctopd.demo`` builds them (a byte-level BPE teacher and
a SentencePiece student trained on arithmetic problems, random Llama weights, ``--teacher-hidden``
× 4 layers and ``--student-hidden`` × 2 layers), no downloads. ``ctopd.training.loop.train`` runs
``--steps`` steps of ``dpca`` and of ``simct`` (the first is a warm-up and is not counted) with the
teacher in process, then against ``ctopd serve-teacher`` started on 127.0.0.1 with the same
weights (``dpca``: realised tokens only, ``k=0``; ``simct``: ``top_k`` 20 and the whole
vocabulary), with the request overlapping the student's forward and without. Trainer and server use one CPU thread each (on one machine the served
teacher has a core of its own: the point of serving it). The table: mean seconds per step and
the seconds the loop spent waiting for the teacher (``time_teacher``).

**topk** — for the same student rollouts, each objective's loss and its gradient with respect to
the student's logits, computed from the teacher's full distribution and from what a server
returns for ``prompt_logprobs=k`` (the top k plus the realised token), rebuilt as
``ctopd.training.teachers.served`` rebuilds it (remainder spread evenly over the unreturned ids)
and, for comparison, with the top k renormalised (remainder dropped). Errors are relative:
``|loss_k - loss| / |loss|`` and ``‖grad_k - grad‖ / ‖grad‖``. Without ``--teacher`` it uses
the random tiny models of the step part (a near-uniform teacher: the worst case for top-k).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

PHASES = ("rollout", "alignment", "teacher", "student_forward", "loss", "backward", "optimizer")


def build(folder: Path, teacher_hidden: int, student_hidden: int) -> dict[str, Path]:
    """Tokenizers, random tiny models and a prompt file, as ``ctopd.demo`` makes them."""
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
    for name, tokenizer, hidden, layers in (
        ("teacher", train_byte_level_bpe(corpus, 512), teacher_hidden, 4),
        ("student", train_sentencepiece_bpe(corpus, 400), student_hidden, 2),
    ):
        model = tiny_causal_lm(
            tokenizer,
            hidden_size=hidden,
            num_layers=layers,
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


# --- step time -------------------------------------------------------------------------------


def start_server(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``ctopd serve-teacher`` on a free port, one thread; returns ``(process, url)``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "a") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "ctopd", "serve-teacher", "--model", str(model), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            text=True,
        )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
    match = re.search(r"on (http://\S+/v1)", lines.get(timeout=300))
    if not match:
        process.kill()
        raise RuntimeError(f"serve-teacher did not start; see {log}")
    return process, match.group(1)


def time_run(paths: dict[str, Path], out: Path, objective: str, extra: list[str], args) -> dict:
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
            *extra,
        ]
    )
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        train(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    mean = {p: sum(r[f"time_{p}"] for r in rows) / len(rows) for p in PHASES}
    mean["step"] = sum(r["time_step"] for r in rows) / len(rows)
    mean["loss"] = rows[-1]["loss"]
    return mean


def step_part(paths: dict[str, Path], tmp: Path, args) -> list[dict]:
    process, url = start_server(paths["teacher"], tmp / "server.log")
    results = []
    try:
        for objective in args.objectives.split(","):
            # dpca needs realised tokens only: the client asks for no top-k whatever top_k says.
            ks = (0,) if objective == "dpca" else (20, -1)
            settings = [("in process", [])]
            for k in ks:
                for overlap in ("true", "false"):
                    name = f"served, k={'V' if k < 0 else k}, overlap {overlap}"
                    settings.append(
                        (
                            name,
                            [
                                "--teacher-url",
                                url,
                                "--teacher-server.top-k",
                                str(k),
                                "--teacher-server.overlap",
                                overlap,
                            ],
                        )
                    )
            # Repeats go round the settings in turn, so a slow spell of a shared machine does
            # not land on one setting only; the median of the repeats is reported.
            runs: dict[str, list[dict]] = {name: [] for name, _ in settings}
            for repeat in range(args.repeats):
                for index, (name, extra) in enumerate(settings):
                    out = tmp / f"{objective}-{repeat}-{index}"
                    runs[name].append(time_run(paths, out, objective, extra, args))
            for name, measured in runs.items():
                results.append(
                    {
                        "objective": objective,
                        "setting": name,
                        **{key: statistics.median(m[key] for m in measured) for key in measured[0]},
                    }
                )
    finally:
        process.kill()
        process.wait()
    return results


# --- top-k error -----------------------------------------------------------------------------


def rollouts(teacher_dir: Path, student_dir: Path, prompts: Path, args):
    """Student samples and everything the objectives need, with the teacher's full log-probs."""
    from ctopd.core.pair import TokenizerPair
    from ctopd.training.config import DataConfig, ModelConfig
    from ctopd.training.data import encode_prompts, load_examples
    from ctopd.training.models import load_causal_lm, load_model_tokenizer
    from ctopd.training.rollout import pad_responses, response_logits, sample_responses

    sides = {}
    for side, folder in (("teacher", teacher_dir), ("student", student_dir)):
        config = ModelConfig(name_or_path=str(folder), dtype="float32")
        sides[side] = (load_model_tokenizer(config, side=side), load_causal_lm(config, side=side))
    (teacher_tokenizer, teacher), (student_tokenizer, student) = sides["teacher"], sides["student"]
    pair = TokenizerPair(teacher_tokenizer, student_tokenizer)
    examples = load_examples(DataConfig(path=str(prompts), limit=args.topk_prompts))
    student_prompts = encode_prompts(student_tokenizer, examples, side="student")
    teacher_prompts = encode_prompts(teacher_tokenizer, examples, side="teacher")
    torch.manual_seed(0)
    student_responses = sample_responses(
        student,
        student_prompts,
        end_ids=pair.student_table.end_ids.tolist(),
        pad_id=student_tokenizer.pad_token_id,
        max_new_tokens=args.topk_new_tokens,
        temperature=1.0,
    )
    teacher_responses = pair.teacher_ids_for_batch(student_responses)
    alignments = pair.align_batch(teacher_responses, student_responses)
    with torch.no_grad():
        teacher_logp = torch.log_softmax(
            response_logits(
                teacher,
                teacher_prompts,
                teacher_responses,
                pad_id=teacher_tokenizer.pad_token_id,
                device="cpu",
            ).float(),
            -1,
        )
    student_logits = response_logits(
        student,
        student_prompts,
        student_responses,
        pad_id=student_tokenizer.pad_token_id,
        device="cpu",
    ).detach()
    return dict(
        pair=pair,
        alignments=alignments,
        teacher_logp=teacher_logp,
        teacher_ids=pad_responses(teacher_responses, pad_id=-1)[0],
        student_ids=pad_responses(student_responses)[0],
        student_logits=student_logits,
        lengths=[len(t) for t in teacher_responses],
    )


def served_view(teacher_logp: torch.Tensor, teacher_ids: torch.Tensor, k: int, rule: str):
    """What a server returns for ``prompt_logprobs=k`` (top k + realised), rebuilt dense."""
    from ctopd.training.teachers.served import REMAINDER_FLOOR, dense_logprobs

    batch, width, vocab = teacher_logp.shape
    flat = teacher_logp.reshape(-1, vocab).double()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if k:
        keep.scatter_(1, flat.topk(min(k, vocab), dim=-1).indices, True)
    keep[torch.arange(len(flat)), teacher_ids.reshape(-1).clamp(min=0)] = True
    rows, ids = keep.nonzero(as_tuple=True)
    values = flat[rows, ids]
    caps = (
        flat.topk(k, dim=-1).values[:, -1]
        if 0 < k < vocab
        else torch.zeros(len(flat), dtype=flat.dtype)
    )
    if rule == "renormalised":  # the top k scaled to sum to 1, nothing left for the rest
        mass = torch.zeros(len(flat), dtype=torch.float64).index_add_(0, rows, values.exp())
        values = values - mass[rows].log()
        dense = torch.full_like(flat, math.log(REMAINDER_FLOOR / vocab)).float()
        dense[rows, ids] = values.float()
        return dense.view(batch, width, vocab)
    return dense_logprobs(
        rows, ids, values, rows_total=len(flat), vocab_size=vocab, caps=caps
    ).view(batch, width, vocab)


def objective_at(data: dict, objective: str, teacher_logp: torch.Tensor):
    """Loss and gradient wrt the student's logits; ``objective`` is a name, or ``name:divergence``
    (e.g. ``simct:forward_kl``). ``simct`` and ``shared_only`` run in their default space (text
    events, cells ``none``), as ``ctopd train`` runs them."""
    from ctopd.objectives import compute_objective, teacher_needs, teacher_outputs
    from ctopd.objectives.text_events import text_tables

    name, _, divergence = objective.partition(":")
    options = {"divergence": divergence} if divergence else {}
    pair = data["pair"]
    needs = teacher_needs(name, **options)
    tables = (
        text_tables(pair.teacher_table, pair.student_table, pair.shared_vocab)
        if "text_events" in needs
        else None
    )
    scores = teacher_outputs(
        teacher_logp,
        data["teacher_ids"],
        pair.shared_vocab,
        needs,
        alignments=data["alignments"],
        student_ids=data["student_ids"],
        text_tables=tables,
    )
    logits = data["student_logits"].clone().requires_grad_(True)
    loss, _ = compute_objective(
        name,
        student_logits=logits,
        student_ids=data["student_ids"],
        alignments=data["alignments"],
        shared_vocab=data["pair"].shared_vocab,
        teacher=scores,
        **options,
    )
    loss.backward()
    return loss.item(), logits.grad


def topk_part(teacher: Path, student: Path, prompts: Path, args) -> list[dict]:
    data = rollouts(teacher, student, prompts, args)
    vocab = data["teacher_logp"].shape[-1]
    mask = torch.arange(data["teacher_ids"].shape[1])[None] < torch.tensor(data["lengths"])[:, None]
    realised = data["teacher_logp"].gather(-1, data["teacher_ids"].clamp(min=0)[..., None])[..., 0]
    results = []
    for k in [int(k) for k in args.ks.split(",")] + [vocab]:
        # Mass of the top k at response positions: what the remainder rule does not have to
        # guess; and how often the realised token is among them.
        top = data["teacher_logp"].topk(min(k, vocab), dim=-1).values
        smallest = top[..., -1] if k else torch.full_like(realised, math.inf)
        row = {
            "k": k,
            "top_k_mass": top.exp().sum(-1)[mask].mean().item(),
            "realised_in_top_k": (realised >= smallest)[mask].float().mean().item(),
        }
        for name in args.topk_objectives.split(","):
            full_loss, full_grad = objective_at(data, name, data["teacher_logp"])
            for rule in ("even", "renormalised"):
                loss, grad = objective_at(
                    data, name, served_view(data["teacher_logp"], data["teacher_ids"], k, rule)
                )
                row[f"{name}/{rule}/loss"] = abs(loss - full_loss) / max(abs(full_loss), 1e-12)
                row[f"{name}/{rule}/grad"] = (
                    (grad - full_grad).norm() / full_grad.norm().clamp(min=1e-30)
                ).item()
        results.append(row)
    return results


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("step", "topk", "all"), default="all")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="step: runs per setting (median)")
    parser.add_argument("--objectives", default="dpca,simct")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--teacher-hidden", type=int, default=256)
    parser.add_argument("--student-hidden", type=int, default=128)
    parser.add_argument("--teacher", type=Path, default=None, help="topk: a trained teacher")
    parser.add_argument("--student", type=Path, default=None, help="topk: its student")
    parser.add_argument("--prompts", type=Path, default=None, help="topk: JSONL prompts")
    parser.add_argument("--ks", default="1,5,20,100")
    parser.add_argument(
        "--topk-objectives",
        default="dpca,simct,shared_only,simct:forward_kl",
        help="names, or name:divergence",
    )
    parser.add_argument("--topk-prompts", type=int, default=32)
    parser.add_argument("--topk-new-tokens", type=int, default=96)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    output = {}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        paths = build(tmp, args.teacher_hidden, args.student_hidden)
        if args.part in ("step", "all"):
            output["step"] = step_part(paths, tmp, args)
        if args.part in ("topk", "all"):
            output["topk"] = topk_part(
                args.teacher or paths["teacher"],
                args.student or paths["student"],
                args.prompts or paths["prompts"],
                args,
            )
    if args.json:
        print(json.dumps(output, indent=2))
        return 0
    if "step" in output:
        print(
            f"seconds per step (median of {args.repeats} runs of {args.steps - 1} steps after a "
            f"warm-up; batch {args.batch_size}, {args.max_new_tokens} new tokens, one thread "
            "for the trainer and one for the server)"
        )
        print(
            f"{'objective':<10}{'teacher':<34}{'step':>8}{'teacher':>9}{'student fwd':>12}"
            f"{'rollout':>9}"
        )
        for row in output["step"]:
            print(
                f"{row['objective']:<10}{row['setting']:<34}{row['step']:>8.3f}"
                f"{row['teacher']:>9.3f}{row['student_forward']:>12.3f}{row['rollout']:>9.3f}"
            )
    if "topk" in output:
        names = args.topk_objectives.split(",")
        print(
            "relative error against the full teacher distribution (loss | gradient), "
            "remainder spread evenly [renormalised top k]"
        )
        print(f"{'k':>6}{'top-k mass':>11}" + "".join(f"{n:>31}" for n in names))
        for row in output["topk"]:
            cells = "".join(
                f"{row[f'{n}/even/loss']:>10.1e} |{row[f'{n}/even/grad']:>8.1e} "
                f"[{row[f'{n}/renormalised/grad']:>8.1e}]"
                for n in names
            )
            print(f"{row['k']:>6}{row['top_k_mass']:>11.4f}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
