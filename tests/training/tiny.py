"""Tiny local assets for the training tests: a byte-level BPE teacher and a SentencePiece student
(two tokenizer families, two chat templates), random tiny Llama models, and prompt files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ctopd.testing import tiny_causal_lm, train_byte_level_bpe, train_sentencepiece_bpe

WORDS = ["apples", "pears", "boxes", "coins", "birds", "cards"]


def problems(count: int = 40) -> list[dict]:
    """Short arithmetic word problems with GSM8K-style answers."""
    rows = []
    for i in range(count):
        a, b = 3 + (7 * i) % 40, 2 + (5 * i) % 30
        word = WORDS[i % len(WORDS)]
        rows.append(
            {
                "prompt": f"Sam has {a} {word} and gets {b} more. How many {word} now?",
                "answer": f"Sam has {a} + {b} = {a + b} {word}.\n#### {a + b}",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_assets(folder: Path) -> dict[str, Path]:
    """Save teacher, student (and a same-tokenizer teacher for OPD) models and data files.

    Returns:
        Paths: ``teacher``, ``student``, ``student_twin`` (another model on the student's
        tokenizer), ``prompts`` (JSONL, ``prompt`` + ``answer``), ``chat`` (JSONL with
        ``messages``), ``eval`` (JSONL test set).
    """
    torch.manual_seed(0)
    rows = problems(40)
    corpus = (
        [r["prompt"] for r in rows]
        + [r["answer"] for r in rows]
        + ["user model assistant system", "The answer is 12. Hello there!"]
    )
    teacher_tokenizer = train_byte_level_bpe(corpus, 320)
    student_tokenizer = train_sentencepiece_bpe(corpus, 240)
    paths = {}
    for name, tokenizer, seed in (
        ("teacher", teacher_tokenizer, 1),
        ("student", student_tokenizer, 2),
        ("student_twin", student_tokenizer, 3),
    ):
        model = tiny_causal_lm(
            tokenizer, hidden_size=32, num_layers=2, num_heads=4, max_positions=256, seed=seed
        )
        paths[name] = folder / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    paths["prompts"] = write_jsonl(folder / "prompts.jsonl", rows)
    chat = [
        {"messages": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
        for r in rows[:12]
    ]
    paths["chat"] = write_jsonl(folder / "chat.jsonl", chat)
    paths["eval"] = write_jsonl(folder / "eval.jsonl", rows[:6])
    return paths


def tiny_args(paths: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    """Command-line flags of a fast tiny run (add ``--objective`` etc. in ``extra``)."""
    return [
        "--student",
        str(paths["student"]),
        "--teacher",
        str(paths["teacher"]),
        "--data",
        str(paths["prompts"]),
        "--output-dir",
        str(output_dir),
        "--max-steps",
        "2",
        "--per-device-batch-size",
        "4",
        "--rollout.max-new-tokens",
        "12",
        "--rollout.temperature",
        "1.0",
        "--optim.lr",
        "1e-3",
        "--progress",
        "false",
        *extra,
    ]


SRC = Path(__file__).resolve().parents[2] / "src"


def subprocess_env() -> dict[str, str]:
    """Environment for a ``python -m ctopd`` child: this checkout's ``src`` on the path, one
    thread (the test machine is shared; thread contention slows tiny models 20x)."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The saved final student's tensors."""
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))
