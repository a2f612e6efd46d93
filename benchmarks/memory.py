"""Peak memory and time per phase of one ``ctopd train`` step at real vocabulary widths,
before and after a change, side by side in one run.

    python benchmarks/memory.py [--quick] [--lengths 512,2048,4096]
        [--objectives simct,dpca,shared_only,uld,opd] [--before 0ead4c7] [--json] [--device cpu]

Setting: random tiny models (2 layers, hidden 64) on real tokenizers. The teacher is a Qwen2 model
on ``$CTOPD_TOKENIZERS/qwen2`` (151,936 output rows); the student a Llama model on the Gemma-3
tokenizer at ``$CTOPD_REAL_MODELS/gemma-3-270m`` (262,144 rows) with the Gemma chat template of
``examples/real_pair``; ``opd`` (identical tokenizers) trains a Llama student on the qwen2
tokenizer instead. Each cell is one ``ctopd train`` step (``ctopd.training.loop.train``, one
prompt, one sample, ``rollout.temperature`` 1, one CPU thread) in its own subprocess; its peak
RSS is the subprocess's own ``ru_maxrss`` (on a GPU, ``torch.cuda.max_memory_allocated``), its
phases the step's row of ``metrics.jsonl``.

Forcing the response length: the student's end-of-turn ids are never sampled, so every response
is exactly ``rollout.max_new_tokens`` = L tokens (no ``min_new_tokens``, which generate would
apply as a processor, and which ctopd refuses to leak into the policy anyway). One residual
dimension carries a constant 1 from every embedding and no layer writes to it (that row of each
``o_proj`` and ``down_proj`` is zero), so after the final RMSNorm it is positive at every
position; the end ids' output rows are -1000 on that dimension and 0 elsewhere, so their logits
are below -1000 and float32 softmax gives them probability exactly 0. Each cell checks that its
response has L tokens and did not end its turn.

"Before" is ``git archive REF src`` unpacked in a temporary folder and run with ``PYTHONPATH``
pointing at it; "after" is this tree's ``src``. Cells run one at a time, never in parallel: on
the dense path (``0ead4c7``) a 2,048-token step peaks at 10.4 GB and a 4,096-token one needs
about 20 GB (``docs/memory.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "alignment", "teacher", "student_forward", "loss", "backward")
OBJECTIVES = ("simct", "dpca", "shared_only", "uld", "opd")
END_LOGIT_WEIGHT = -1000.0  # the end ids' output rows on the constant dimension


def tokenizer_paths() -> dict[str, Path]:
    """The real tokenizer folders; a one-line error when one is missing."""
    shared = Path(os.environ.get("CTOPD_TOKENIZERS", ROOT.parent / "shared" / "tokenizers"))
    models = Path(os.environ.get("CTOPD_REAL_MODELS", ROOT / "models" / "real-pair"))
    paths = {"qwen2": shared / "qwen2", "gemma3": models / "gemma-3-270m"}
    for name, path in paths.items():
        if not (path / "tokenizer.json").is_file():
            sys.exit(
                f"memory.py: no {name} tokenizer at {path} (set CTOPD_TOKENIZERS / _REAL_MODELS)"
            )
    return paths


def copy_tokenizer(source: Path, folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


def never_ending(model, end_ids: list[int]) -> None:
    """Make ``end_ids`` unsampleable (see the module docstring): dimension 0 of the residual
    stream is 1 from every embedding and untouched by the layers; end rows read -1000 on it."""
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0].zero_()
            layer.mlp.down_proj.weight[0].zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight[end_ids] = 0.0
        model.lm_head.weight[end_ids, 0] = END_LOGIT_WEIGHT


def build(folder: Path, max_positions: int) -> dict[str, Path]:
    """Save the teacher, the two students and the prompts under ``folder``; uses only
    ``transformers`` and this tree's ``ctopd`` (to read each student's end ids)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from ctopd.core.byte_table import end_of_turn_ids
    from ctopd.training.config import ModelConfig
    from ctopd.training.models import load_model_tokenizer

    tokenizers = tokenizer_paths()
    template = ROOT / "examples" / "real_pair" / "gemma3_chat_template.jinja"
    shape = dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    paths = {"template": template}
    torch.manual_seed(0)
    paths["teacher"] = folder / "teacher"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=151_936, **shape)).save_pretrained(paths["teacher"])
    copy_tokenizer(tokenizers["qwen2"], paths["teacher"])
    for name, source, rows, chat in (
        ("student", tokenizers["gemma3"], 262_144, template),
        ("student_same", tokenizers["qwen2"], 151_936, None),
    ):
        paths[name] = folder / name
        paths[name].mkdir()
        copy_tokenizer(source, paths[name])
        tokenizer = load_model_tokenizer(
            ModelConfig(str(paths[name]), chat_template=str(chat) if chat else None),
            side="student",
        )
        model = LlamaForCausalLM(LlamaConfig(vocab_size=rows, **shape))
        never_ending(model, end_of_turn_ids(tokenizer))
        model.save_pretrained(paths[name])
    rows = [
        {"prompt": f"Ann has {a} shells and finds {b} more. How many now?", "answer": str(a + b)}
        for a, b in ((3, 4), (12, 9), (25, 17), (8, 30))
    ]
    paths["prompts"] = folder / "prompts.jsonl"
    paths["prompts"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def cell_arguments(objective: str, length: int, paths: dict[str, Path], out: Path) -> list[str]:
    """``ctopd train`` flags of one cell (flags both trees accept)."""
    student = paths["student_same" if objective == "opd" else "student"]
    arguments = ["--student", str(student), "--teacher", str(paths["teacher"])]
    if objective != "opd":
        arguments += ["--student-chat-template", str(paths["template"])]
    return arguments + [
        "--data",
        str(paths["prompts"]),
        "--objective",
        objective,
        "--output-dir",
        str(out),
        "--max-steps",
        "1",
        "--per-device-batch-size",
        "1",
        "--rollout.max-new-tokens",
        str(length),
        "--rollout.temperature",
        "1.0",
        "--optim.lr",
        "1e-4",
        "--progress",
        "false",
        "--save-every",
        "0",
    ]


def run_cell(arguments: list[str]) -> dict:
    """In the cell's subprocess: one training step; its phases, tokens and peak memory."""
    import contextlib
    import resource

    import torch

    torch.set_num_threads(1)
    from ctopd.training.config import load_config
    from ctopd.training.loop import train

    config = load_config(arguments)
    with contextlib.redirect_stdout(sys.stderr):
        train(config)
    row = json.loads((Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()[-1])
    result = {p: row.get(f"time_{p}", 0.0) for p in PHASES}
    result.update(
        response_tokens=row["response_tokens"],
        teacher_tokens=row["teacher_tokens"],
        ended_responses=row["ended_responses"],
        coverage=row.get("coverage"),
        supervised_tokens=row.get("supervised_tokens"),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    if torch.cuda.is_available():
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return result


def measure(source: Path, arguments: list[str], device: str, timeout: float) -> dict:
    """One cell in a fresh interpreter importing ``ctopd`` from ``source`` (a ``src`` folder)."""
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, str(Path(__file__).resolve()), "--cell", json.dumps(arguments)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"error": f"exit {done.returncode}: {tail}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - start
    return result


def unpack(ref: str, folder: Path) -> Path:
    """``src`` of ``ref`` (``git archive``) under ``folder``; no worktree, no git state changed."""
    archive = folder / "before.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "before", filter="data")
    return folder / "before" / "src"


def gigabytes(result: dict, key: str) -> str:
    return f"{result[key] / 1e9:.2f}" if key in result else "-"


def print_table(results: list[dict], memory_key: str) -> None:
    """One row per cell: before / after / ratio of peak memory and of each phase's seconds."""
    print(f"peak memory ({memory_key}, GB) and seconds per phase; ratio = after / before")
    head = ["objective", "L", "tree", "peak GB", *PHASES, "tokens S/T"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for cell in results:
        for tree in ("before", "after"):
            r = cell.get(tree)
            if r is None:
                continue
            label = [cell["objective"], str(cell["length"]), tree]
            if "error" in r:
                print("| " + " | ".join(label + [r["error"][:120]]) + " |")
                continue
            tokens = f"{r['response_tokens']:.0f} / {r['teacher_tokens']:.0f}"
            times = [f"{r[p]:.2f}" for p in PHASES]
            print("| " + " | ".join(label + [gigabytes(r, memory_key), *times, tokens]) + " |")
        before, after = cell.get("before"), cell.get("after")
        if before and after and "error" not in before and "error" not in after:
            ratios = [f"{after[p] / before[p]:.2f}x" if before[p] > 0 else "-" for p in PHASES]
            memory = f"{after[memory_key] / before[memory_key]:.2f}x"
            print("| " + " | ".join(["", "", "ratio", memory, *ratios, ""]) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="512,2048,4096", help="response tokens per cell")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--quick", action="store_true", help="512 tokens, simct and dpca only")
    parser.add_argument("--before", default="0ead4c7", help="git ref of 'before' ('' = none)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per cell")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell here
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return 0
    lengths = [512] if args.quick else [int(n) for n in args.lengths.split(",")]
    objectives = ["simct", "dpca"] if args.quick else args.objectives.split(",")
    unknown = sorted(set(objectives) - set(OBJECTIVES))
    if unknown or any(n < 1 for n in lengths):
        parser.error(f"objectives are {', '.join(OBJECTIVES)}; lengths positive ({unknown})")
    sys.path.insert(0, str(ROOT / "src"))
    import transformers

    transformers.utils.logging.disable_progress_bar()
    memory_key = "peak_gpu_bytes" if args.device == "cuda" else "peak_rss_bytes"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = build(folder, max_positions=4 * max(lengths) + 1024)
        trees = {"after": ROOT / "src"}
        if args.before:
            trees = {"before": unpack(args.before, folder), **trees}
        for length in lengths:
            for objective in objectives:
                cell = {"objective": objective, "length": length}
                for tree, source in trees.items():
                    out = folder / f"{tree}-{objective}-{length}"
                    arguments = cell_arguments(objective, length, paths, out)
                    cell[tree] = measure(source, arguments, args.device, args.timeout)
                    shutil.rmtree(out, ignore_errors=True)
                    print(f"{objective} L={length} {tree}: {cell[tree]}", file=sys.stderr)
                results.append(cell)
    for cell in results:
        for tree in ("before", "after"):
            r = cell.get(tree, {})
            if (
                "error" not in r
                and r
                and (r["response_tokens"] != cell["length"] or r["ended_responses"])
            ):
                print(
                    f"warning: {cell['objective']} {tree}: response not forced to L",
                    file=sys.stderr,
                )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results, memory_key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
