"""Forward+backward time and peak memory of the SimCT objective on CPU, against shared-only OPD
and a per-chunk-loop SimCT written here as the baseline.

    CTOPD_TOKENIZERS=../shared/tokenizers python benchmarks/objectives.py [--json]

Setting: a Qwen2-sized teacher vocabulary (151,936) and a 32,000 student vocabulary at 1,024
student response tokens. With ``CTOPD_TOKENIZERS`` set, the pair is the real qwen2 -> llama-spm
pair (its shared vocabulary, 26k classes) and the response is GSM8K answers (``CTOPD_GSM8K``,
default ``<tokenizers>/../data/gsm8k/train.jsonl``) tokenised by the student; otherwise a
synthetic shared vocabulary and alignment with the same sizes and a similar share of multi-token
chunks. Logits are random (the cost does not depend on their values).

Timed: ``compute_objective(...)`` + ``loss.backward()`` on precomputed teacher outputs (the
teacher's own pass, ``teacher_outputs``, is timed separately), best of ``--repeats`` rounds after
a warm-up call, one thread, with glibc keeping freed memory for reuse (see
:func:`keep_freed_memory`). The naive loop runs once (it takes minutes), in the memory-measuring
mode below. Peak memory: the rise of the process's peak resident set size over one forward+backward, with
the kernel's peak counter reset before it (Linux ``/proc/self/clear_refs``) and glibc told to
return large blocks on free; it includes the ``[tokens, V_S]`` gradient of the logits, which
every method allocates.

Two loop baselines: ``loop`` is SimCT as a per-chunk loop written the usual way; ``loop_unbind``
is the same loop with the rows split once up front (see :func:`loop_simct`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from ctopd.core.alignment import Alignment
from ctopd.core.shared_vocab import SharedVocab
from ctopd.objectives import TeacherOutputs, compute_objective, teacher_needs, teacher_outputs
from ctopd.objectives.text_events import text_tables

TEACHER_VOCAB = 151_936
STUDENT_VOCAB = 32_000


def loop_simct(
    student_logits, student_ids, alignments, shared_vocab, teacher, *, unbind: bool = False
):
    """Baseline: SimCT (reverse KL, τ = 1) written as a per-chunk Python loop over plain autograd.

    The same math as ``compute_objective("simct")``: per aligned chunk, the student's class
    log-probabilities at its first position (log-sum-exp over member ids), plus the unit column
    for multi-token chunks, against the teacher's; summed and divided by the student tokens.

    As usually written, each chunk indexes its row of the ``[m, V]`` log-softmax, and autograd
    gives every such index a dense ``[m, V]`` gradient that is then summed: that, not the Python
    loop itself, is most of its cost. ``unbind=True`` splits the rows once first (one dense
    gradient in all), a per-chunk loop written with that in mind.
    """
    members = torch.as_tensor(shared_vocab.student_member_ids)  # [R, C]
    present = members >= 0
    safe_members = members.clamp(min=0)
    total = student_logits.new_zeros(())
    for b, alignment in enumerate(alignments):
        logp = torch.log_softmax(student_logits[b], dim=-1)
        rows = logp.unbind(0) if unbind else logp
        for k in range(alignment.num_chunks):
            if not alignment.aligned[k]:
                continue
            ts, te, ss, se = (int(x) for x in alignment.chunks[k])
            by_rank = rows[ss][safe_members].masked_fill(~present, float("-inf"))
            s_scores = torch.logsumexp(by_rank, dim=0)
            t_scores = teacher.class_logprobs[b, ts]
            if te - ts > 1 or se - ss > 1:
                ids = student_ids[b, ss:se]
                s_unit = torch.stack([rows[i][ids[i - ss]] for i in range(ss, se)]).mean()
                t_unit = teacher.token_logprobs[b, ts:te].mean()
                s_scores = torch.cat([s_scores, s_unit.reshape(1)])
                t_scores = torch.cat([t_scores, t_unit.reshape(1)])
            p_s = torch.log_softmax(s_scores, dim=0)
            p_t = torch.log_softmax(t_scores, dim=0)
            total = total + (p_s.exp() * (p_s - p_t)).sum()
    return total / sum(a.student_length for a in alignments)


def real_setup(folder: Path, tokens: int):
    """Student ids, teacher ids, alignments and shared vocabulary of the qwen2 -> llama-spm pair
    over GSM8K answers, cut to ``tokens`` student tokens (the last one the end id)."""
    from ctopd import TokenizerPair

    pair = TokenizerPair.from_pretrained(str(folder / "qwen2"), str(folder / "llama-spm"))
    data = Path(os.environ.get("CTOPD_GSM8K", folder.parent / "data" / "gsm8k" / "train.jsonl"))
    if data.exists():
        answers = [json.loads(line)["answer"] for line in data.open(encoding="utf-8")][:200]
    else:
        answers = ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"] * 200
    ids = pair.student_tokenizer("\n\n".join(answers), add_special_tokens=False)["input_ids"]
    student_ids = ids[: tokens - 1] + [int(pair.student_table.end_ids[0])]
    teacher_ids = pair.teacher_ids_for(student_ids)
    return student_ids, teacher_ids, pair.align(teacher_ids, student_ids), pair.shared_vocab, pair


def synthetic_setup(tokens: int, seed: int = 0):
    """A random shared vocabulary (26k classes) and an alignment with ~6% multi-token chunks."""
    rng = np.random.default_rng(seed)
    classes = 26_000
    s_ids = rng.permutation(STUDENT_VOCAB - 1)[:classes]
    t_ids = rng.permutation(TEACHER_VOCAB - 1)[:classes]
    s_members = np.concatenate([s_ids, [STUDENT_VOCAB - 1]])[None]
    t_members = np.concatenate([t_ids, [TEACHER_VOCAB - 1]])[None]
    s_to_class = np.full(STUDENT_VOCAB, -1, np.int64)
    s_to_class[s_members[0]] = np.arange(classes + 1)
    t_to_class = np.full(TEACHER_VOCAB, -1, np.int64)
    t_to_class[t_members[0]] = np.arange(classes + 1)
    vocab = SharedVocab(
        [b"x%d" % i for i in range(classes)] + [b""], t_members, s_members, t_to_class, s_to_class
    )
    sizes = []
    while sum(s for _, s in sizes) < tokens:
        sizes.append(
            (int(rng.integers(1, 3)), int(rng.integers(2, 4))) if rng.random() < 0.06 else (1, 1)
        )
    t = np.cumsum([0] + [a for a, _ in sizes])
    s = np.minimum(np.cumsum([0] + [b for _, b in sizes]), tokens)
    chunks = np.stack([t[:-1], t[1:], s[:-1], s[1:]], 1).astype(np.int64)
    chunks = chunks[chunks[:, 3] > chunks[:, 2]]
    alignment = Alignment(
        chunks, np.ones(len(chunks), bool), np.zeros(len(chunks), bool), int(chunks[-1, 1]), tokens
    )
    student_ids = s_ids[rng.integers(0, classes, tokens)].tolist()
    teacher_ids = rng.integers(0, TEACHER_VOCAB, alignment.teacher_length).tolist()
    return student_ids, teacher_ids, alignment, vocab, None


def rss_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024


def use_mmap_for_large_blocks() -> None:
    """Make glibc serve every block over 1 MiB with its own mmap, returned to the system on
    free, so that the resident set size follows the live tensors (by default glibc raises this
    threshold as blocks are freed and then keeps freed memory for reuse)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def keep_freed_memory() -> None:
    """Make glibc keep freed blocks for reuse, as PyTorch's CUDA caching allocator does. By
    default every block over 32 MiB is returned to the kernel on free and page-faulted in again
    on the next allocation, which on a virtual machine made the timings vary twofold."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB from the heap
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: do not give the heap top back
    except (OSError, AttributeError):  # not glibc
        pass


def release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_mb(fn, student_logits) -> float:
    """Rise of the peak resident set size while ``fn`` runs, in MiB (the logits' old gradient
    is dropped first, so that freeing it inside ``fn`` does not hide new memory)."""
    student_logits.grad = None
    release_memory()
    Path("/proc/self/clear_refs").write_text("5")  # reset the kernel's peak counter (VmHWM)
    before = rss_mb("VmRSS")
    fn()
    return rss_mb("VmHWM") - before


def best_seconds_interleaved(methods: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each method over ``repeats`` rounds that run every method once."""
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def make_methods(student_logits, student_ids, alignments, vocab, teacher, text_teacher):
    def step(name, space="paper"):
        def run():
            student_logits.grad = None
            loss, _ = compute_objective(
                name,
                student_logits=student_logits,
                student_ids=student_ids,
                alignments=alignments,
                shared_vocab=vocab,
                teacher=text_teacher if space == "text" else teacher,
                space=space,
            )
            loss.backward()

        return run

    def loop(unbind):
        def run():
            student_logits.grad = None
            loop_simct(
                student_logits, student_ids, alignments, vocab, teacher, unbind=unbind
            ).backward()

        return run

    methods = {"shared_only": step("shared_only"), "simct": step("simct")}
    if text_teacher is not None:  # needs real byte tables
        methods.update(
            simct_text=step("simct", "text"), shared_only_text=step("shared_only", "text")
        )
    methods.update(loop_unbind=loop(True), loop=loop(False))
    return methods


def measure(args) -> dict:
    folder = os.environ.get("CTOPD_TOKENIZERS")
    if folder:
        s_ids, t_ids, alignment, vocab, pair = real_setup(Path(folder), args.tokens)
    else:
        s_ids, t_ids, alignment, vocab, pair = synthetic_setup(args.tokens)
    gen = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(1, len(t_ids), TEACHER_VOCAB, generator=gen)
    start = time.perf_counter()
    teacher = teacher_outputs(
        teacher_logits, torch.tensor([t_ids]), vocab, teacher_needs("simct", space="paper")
    )
    teacher_seconds = time.perf_counter() - start
    text_teacher, text_teacher_seconds = None, None
    if pair is not None:
        tables = text_tables(pair.teacher_table, pair.student_table, vocab)  # built once a pair
        start = time.perf_counter()
        text_teacher = teacher_outputs(
            teacher_logits,
            torch.tensor([t_ids]),
            vocab,
            teacher_needs("simct"),
            alignments=[alignment],
            student_ids=[s_ids],
            text_tables=tables,
        )
        text_teacher_seconds = time.perf_counter() - start
    del teacher_logits
    teacher = TeacherOutputs(
        token_logprobs=teacher.token_logprobs, class_logprobs=teacher.class_logprobs
    )
    student_logits = torch.randn(1, len(s_ids), STUDENT_VOCAB, generator=gen).requires_grad_()
    methods = make_methods(
        student_logits, torch.tensor([s_ids]), [alignment], vocab, teacher, text_teacher
    )
    out = {
        "pair": "qwen2 -> llama-spm" if folder else "synthetic",
        "student_tokens": len(s_ids),
        "teacher_tokens": len(t_ids),
        "classes": vocab.size,
        "chunks_one_to_one": int(alignment.one_to_one.sum()),
        "chunks_multi": int((alignment.aligned & ~alignment.one_to_one).sum()),
        "teacher_outputs_seconds": teacher_seconds,
        "teacher_text_events_seconds": text_teacher_seconds,
        "threads": torch.get_num_threads(),
    }
    fast = [name for name in methods if name != "loop"]
    keep_freed_memory()
    for name in fast:
        methods[name]()  # warm-up
    # Rounds that run every method once, best per method: a busy machine slows all alike.
    for name, seconds in best_seconds_interleaved(
        {n: methods[n] for n in fast}, args.repeats
    ).items():
        out[f"{name}_seconds"] = seconds
    # Memory after timing: the allocator setting that makes RSS exact also slows allocation.
    use_mmap_for_large_blocks()
    for name in fast:  # twice each, the smaller: the first call after the switch pays extra
        out[f"{name}_peak_mb"] = min(peak_mb(methods[name], student_logits) for _ in range(2))
    if not args.skip_loop:  # the slow loop runs once, timed and measured together
        start = time.perf_counter()
        out["loop_peak_mb"] = peak_mb(methods["loop"], student_logits)
        out["loop_seconds"] = time.perf_counter() - start
    return out


def print_table(r: dict) -> None:
    print(
        f"pair {r['pair']}: {r['student_tokens']} student / {r['teacher_tokens']} teacher "
        f"tokens, {r['classes']} classes, {r['chunks_one_to_one']} 1:1 + {r['chunks_multi']} "
        f"multi-token chunks, {r['threads']} threads"
    )
    print(
        f"teacher_outputs (151,936-vocab log-softmax, class log-sum-exp): "
        f"{r['teacher_outputs_seconds']:.2f} s"
    )
    print(
        f"{'method':<14}{'fwd+bwd s':>11}{'peak MiB':>10}{'time vs shared':>16}"
        f"{'mem vs shared':>15}"
    )
    if r.get("teacher_text_events_seconds") is not None:
        print(f"teacher_outputs with text events: {r['teacher_text_events_seconds']:.2f} s")
    for name in ("shared_only", "simct", "simct_text", "shared_only_text", "loop_unbind", "loop"):
        if f"{name}_seconds" not in r:
            continue
        t, m = r[f"{name}_seconds"], r[f"{name}_peak_mb"]
        print(
            f"{name:<14}{t:>11.3f}{m:>10.0f}{t / r['shared_only_seconds']:>15.2f}x"
            f"{m / r['shared_only_peak_mb']:>14.2f}x"
        )
    if "loop_seconds" in r:
        print(
            f"simct is {r['loop_seconds'] / r['simct_seconds']:.0f}x faster than the loop, "
            f"{r['loop_unbind_seconds'] / r['simct_seconds']:.1f}x than the unbind loop"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--tokens", type=int, default=1024, help="student response tokens")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (best is kept)")
    parser.add_argument("--skip-loop", action="store_true", help="skip the slow baseline")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1, as in benchmarks/align.py: on a shared "
        "machine every multi-threaded op can wait at a barrier)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
