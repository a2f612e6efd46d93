"""The teacher's samples, drawn once (in large batches: several times faster per sample on a
CPU) into ``OUT/teacher_samples.jsonl`` and shared by every SFT stage as slices: the warm-up takes
positions ``[0, W)``, ``W = warmup_steps * warmup_batch``; continued SFT of seed ``s``
``[W + s B, W + (s + 1) B)``, ``B = slice_steps() * method_batch``. Both students train on the
same texts, no sample twice. Position ``p`` holds a sample for training prompt ``order[p]``
(:func:`pool_order`); each batch has its own seed, so more seeds extend the cache.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

from ctopd.demo.settings import DemoSettings
from ctopd.demo.stages import read_stamp, write_stamp

SAMPLES = "teacher_samples.jsonl"
SAMPLES_STAMP = "teacher_samples.json"


def warmup_slice(settings: DemoSettings) -> tuple[int, int]:
    """``(start, count)`` of the warm-up's samples in the pool."""
    return 0, settings.warmup_steps * settings.warmup_batch


def sft_slice(settings: DemoSettings, seed: int, *, steps: int | None = None) -> tuple[int, int]:
    """``(start, count)`` of the samples of a continued-SFT run with ``seed`` (``steps``: shorter
    runs take the head of its ``slice_steps()``-batch slice)."""
    budget = settings.slice_steps() * settings.method_batch
    count = (steps if steps is not None else settings.method_steps) * settings.method_batch
    return settings.warmup_steps * settings.warmup_batch + seed * budget, count


def samples_needed(settings: DemoSettings, *, seeds: int, warmup: bool, sft: bool) -> int:
    """Pool size: the warm-up slice when a student is built, the SFT slices of ``seeds`` seeds
    when an SFT run is asked for."""
    if sft:
        start, count = sft_slice(settings, seeds - 1, steps=settings.slice_steps())
        return start + count
    return warmup_slice(settings)[1] if warmup else 0


def pool_order(num_prompts: int, count: int, *, seed: int) -> list[int]:
    """The training prompt of each of the pool's first ``count`` positions: seeded permutations
    of ``range(num_prompts)`` one after another."""
    order: list[int] = []
    rounds = 0
    while len(order) < count:
        order += random.Random(seed * 1_000_003 + rounds).sample(range(num_prompts), num_prompts)
        rounds += 1
    return order[:count]


def ensure_samples(
    out: Path,
    settings: DemoSettings,
    count: int,
    *,
    pool,
    workers: int,
    force: bool,
    log: Callable[[str], None],
) -> int:
    """Make ``OUT/teacher_samples.jsonl`` hold at least ``count`` samples (returns how many it
    holds): reuse a cached pool of the same settings, extend it, or sample it anew (``force``),
    in ``workers`` jobs on ``pool``."""
    started = time.perf_counter()
    stamp, path, size = settings.samples_stamp(), out / SAMPLES, settings.sample_batch
    cached = None if force or not path.is_file() else read_stamp(out, stamp, SAMPLES_STAMP)
    have = 0 if cached is None else min(cached["count"], path.read_text("utf-8").count("\n"))
    if have >= count:
        if count:
            log(f"[demo] reusing {have} teacher samples in {path}")
        return have
    have -= have % size  # whole batches only: a batch's samples depend on the whole batch
    kept = path.read_text(encoding="utf-8").splitlines(keepends=True)[:have] if have else []
    batches = list(range(have // size, math.ceil(count / size)))
    log(
        f"[demo] sampling the teacher: {len(batches) * size} samples of training prompts "
        f"({len(batches)} batches of {size}, temperature {settings.temperature}, "
        f"{workers} at a time)"
    )
    groups = [batches[i::workers] for i in range(workers) if batches[i::workers]]
    jobs = [dict(out=str(out), settings=settings, batches=group) for group in groups]
    rows = sorted(
        (row for part in pool.map(sample_batches, jobs) for row in part),
        key=lambda r: r["position"],
    )
    path.write_text("".join(kept) + "".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    total, seconds = have + len(rows), time.perf_counter() - started
    write_stamp(out, stamp, {"count": total}, SAMPLES_STAMP)
    log(f"[demo] {total} teacher samples in {path} ({seconds:.0f} s)")
    return total


def sample_batches(job: dict) -> list[dict]:
    """Sample the teacher on the pool batches ``job["batches"]`` (in a worker process): one row
    per sample, ``position`` in the pool, ``index`` of its training prompt, ``response`` text."""
    import torch

    from ctopd.core.byte_table import end_of_turn_ids
    from ctopd.demo.stages import one_thread
    from ctopd.training.config import DataConfig, ModelConfig
    from ctopd.training.data import encode_prompts, load_examples
    from ctopd.training.models import freeze, load_causal_lm, load_model_tokenizer
    from ctopd.training.rollout import sample_responses

    one_thread()
    out, settings = Path(job["out"]), job["settings"]
    size = settings.sample_batch
    folder = ModelConfig(name_or_path=str(out / "teacher"))
    tokenizer = load_model_tokenizer(folder, side="teacher")
    teacher = freeze(load_causal_lm(folder, side="teacher"))
    examples = load_examples(DataConfig(path=str(out / "train.jsonl")))
    order = pool_order(len(examples), (max(job["batches"]) + 1) * size, seed=settings.task_seed)
    end_ids = end_of_turn_ids(tokenizer)
    rows = []
    for batch in job["batches"]:
        positions = range(batch * size, (batch + 1) * size)
        prompts = encode_prompts(tokenizer, [examples[order[p]] for p in positions], side="teacher")
        torch.manual_seed(settings.task_seed * 100_003 + batch)
        responses = sample_responses(
            teacher,
            prompts,
            end_ids=end_ids,
            pad_id=tokenizer.pad_token_id,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
        )
        for p, response in zip(positions, responses):
            text = tokenizer.decode(response, skip_special_tokens=True)
            rows.append({"position": p, "index": order[p], "response": text})
    return rows


def write_sft_data(out: Path, target: Path, start: int, count: int) -> Path:
    """Pool positions ``[start, start + count)`` as SFT data: each row is its training prompt's
    row (``messages``, the reference ``answer``) plus the teacher's sample as ``response``
    (what ``sft.source=data`` trains on, ``sft.response_field``)."""
    train = (out / "train.jsonl").read_text(encoding="utf-8").splitlines()
    with (out / SAMPLES).open(encoding="utf-8") as handle:
        samples = [json.loads(line) for _, line in zip(range(start + count), handle)][start:]
    if len(samples) < count:
        raise RuntimeError(
            f"{out / SAMPLES} holds {start + len(samples)} samples; "
            f"positions up to {start + count} were asked for"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as handle:
        for sample in samples:
            row = json.loads(train[sample["index"]])
            handle.write(json.dumps({**row, "response": sample["response"]}) + "\n")
    return target
