"""What limits SimCT on the demo: measured, not assumed (issue 11's open question).

SimCT's default space (text events, ``cells: none``) resolves where the text leaves a chunk
only to the byte *offset*: "the number is not 150 after its first digit", not "it is 14·". This
script measures whether that coarseness is what keeps ``simct`` below continued SFT on the demo's
cross-tokenizer student, with a brute-force reference of the same events at two resolutions:

* ``offset``: SimCT's default space (checked here against ``ctopd.objectives.simct`` on the
  same batch);
* ``byte``: each leaving offset split by the byte the text leaves with, wherever both models
  can tell it: bytes that an off-path token ending at that offset could be followed by (its
  *follow set*: no vocabulary token starts with its bytes plus that byte), and at a chunk's
  first byte those that either side's previous token excludes, stay lumped.

Parts (all on the demo's cached folder, ``--demo-dir``):

1. ``visible``: on each warmed-up student's own samples (temperature 1, validation prompts),
   the divergence per student token the two resolutions see, and their ratio, for the
   cross-tokenizer student and the same-tokenizer control;
2. ``boundary``: the teacher's mass, at a chunk's first position, on bytes the student's previous
   token excludes (a student that ended a number where the teacher would go on);
3. ``--train``: validation runs of ``method_steps`` steps from the warmed-up students, the
   demo's way (``ctopd.demo.methods.run_method``): the control with plain OPD, with the offset
   space as if its tokenizers differed, and with DPCA; the cross student with SimCT, the byte
   space and continued SFT. The reference spaces train through
   :func:`ctopd.objectives.registry.register_objective`;
4. ``--agreement``: both reference spaces on the agreement construction of the tests
   (``tests/objectives``: two canonical models that give every text the same probability,
   docs/concepts/simct.md), next to ``simct`` and the sampled-path floor; run from the repository root;
5. ``--twin``: the ceiling of on-policy distillation *for this student's tokenizer*: a teacher
   of the demo teacher's size and recipe trained on the student's digit-group tokenizer
   (``twin_teacher/``, cached), then same-tokenizer OPD (full next-token distributions, nothing
   lost to alignment) from it to the same warmed-up cross-tokenizer student;
6. ``--closer``: the cross-tokenizer student warmed up :data:`CLOSER_STEPS` steps longer
   (``student_closer/``, cached), then SimCT, DPCA, continued SFT and the twin's OPD from it:
   whether the methods' order depends on how far from the teacher the student starts.

The reference costs ``O(positions x vocabulary)`` Python-side work per step: fine for the demo's
512/600-token vocabularies, not for real ones.

Usage::

    python research/simct_limits.py --demo-dir ctopd-demo [--prompts 64] [--train]
        [--agreement] [--twin] [--closer] [--seeds 0 1 2] [--steps N] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESOLUTIONS = ("offset", "byte")


class VocabBytes:
    """One tokenizer's tokens as a padded byte matrix, with their follow sets.

    Attributes:
        matrix: int16 ``[V, L]``: token bytes, 256 beyond each token's end.
        length: int64 ``[V]``: bytes per token (0 for special tokens).
        special, end: bool ``[V]``: special tokens; those that end the turn.
        follow: bool ``[V, 256]``: byte ``x`` may follow token ``v`` in a canonical
            tokenisation (no token starts with ``bytes(v) + x``, so the tokenizer would not have
            merged it): an approximation that ignores merges reached only through longer text.
    """

    def __init__(self, table):
        vocab = table.vocab_size
        self.special = np.asarray(table.special, dtype=bool).copy()
        self.end = np.zeros(vocab, dtype=bool)
        self.end[np.asarray(table.end_ids, dtype=np.int64)] = True
        self.tokens = [None if self.special[v] else table.token_bytes(v) for v in range(vocab)]
        self.length = np.array([0 if b is None else len(b) for b in self.tokens], dtype=np.int64)
        self.matrix = np.full((vocab, max(int(self.length.max()), 1)), 256, dtype=np.int16)
        for v, data in enumerate(self.tokens):
            if data:
                self.matrix[v, : len(data)] = np.frombuffer(data, dtype=np.uint8)
        extended = {data[:n] for data in self.tokens if data for n in range(2, len(data) + 1)}
        self.follow = np.ones((vocab, 256), dtype=bool)
        for v, data in enumerate(self.tokens):
            if data:
                for byte in range(256):
                    if data + bytes([byte]) in extended:
                        self.follow[v, byte] = False


# Event ids within a chunk: 0 is E_U; leaving at offset m is 1 + m * 258 + (0 lumped, 1 the end,
# 2 + byte).
_STRIDE = 258


def _classify(vocab: VocabBytes, rest: bytes, offset: int, token: int, last: bool, first: bool):
    """Every token at one on-path position: kind (0 starts with the chunk's remaining bytes,
    1 leaves it at a known byte, 2 is a proper prefix of it (what follows is unknown), 3 the end
    at the chunk's first position, 4 another special token, -1 the path's own next token),
    the offset where it leaves and the byte."""
    size = vocab.length.size
    if rest:
        width = min(len(rest), vocab.matrix.shape[1])
        target = np.frombuffer(rest, dtype=np.uint8).astype(np.int16)[:width]
        common = np.cumprod(vocab.matrix[:, :width] == target[None, :], axis=1).sum(axis=1)
    else:
        common = np.zeros(size, dtype=np.int64)
    kind = np.where(common >= len(rest), 0, np.where(common >= vocab.length, 2, 1))
    if not rest:  # the end chunk: every other token leaves at its first byte
        kind[:] = 1
    kind = np.where(vocab.special, np.where(vocab.end & first, 3, 4), kind)
    where = offset + np.where(vocab.special, 0, common)
    byte = vocab.matrix[np.arange(size), np.minimum(common, vocab.matrix.shape[1] - 1)]
    byte = np.where(kind == 1, byte, -1)
    if not last:
        kind[token] = -1
    return kind, where, byte


def chunk_events(sides, chunk: bytes, resolution: str, previous, is_end: bool):
    """Event ids of every token at every on-path position of one chunk, both sides.

    Args:
        sides: ``[(VocabBytes, [(token, byte offset), ...]), ...]``, teacher then student.
        chunk: the chunk's bytes (empty for the end chunk).
        resolution: ``offset`` or ``byte``.
        previous: each side's token before the chunk (``None`` at the response's start).
        is_end: the end-of-turn chunk (its events: the end, or the first byte of anything else).

    Returns:
        ``(ids, width)``: per side a list of int64 ``[V]`` arrays (``-1``: not an event), and
        the number of event ids the chunk uses.
    """
    classified = [
        [
            _classify(vocab, chunk[offset:], offset, token, i == len(rows) - 1, i == 0)
            for i, (token, offset) in enumerate(rows)
        ]
        for vocab, rows in sides
    ]
    size = len(chunk)
    blocked = np.zeros((size + 1, 256), dtype=bool)
    if resolution == "byte":
        for (vocab, _), rows in zip(sides, classified):
            for kind, where, _ in rows:
                for token in np.flatnonzero(kind == 2):
                    blocked[where[token]] |= vocab.follow[token]
        for (vocab, _), token in zip(sides, previous):
            if token is not None and not vocab.special[token]:
                blocked[0] |= ~vocab.follow[token]
    ids = []
    for rows in classified:
        side_ids = []
        for kind, where, byte in rows:
            event = np.full(kind.shape, -1, dtype=np.int64)
            base = 1 + where * _STRIDE
            event[kind == 0] = 0
            lumped = (kind == 2) | (kind == 4) | (kind == 1)
            event[lumped] = base[lumped]
            event[kind == 3] = base[kind == 3] + 1
            if resolution == "byte":
                known = (kind == 1) & ~blocked[np.minimum(where, size), np.maximum(byte, 0)]
                event[known] = base[known] + 2 + byte[known]
            if is_end:
                event[kind == 3] = 0
            side_ids.append(event)
        ids.append(side_ids)
    return ids, 1 + (size + 1) * _STRIDE


def reference_objective(pair, resolution: str):
    """SimCT's text events by brute force, at ``resolution``, as a registry objective.

    Reverse KL of the two event distributions per aligned chunk (the end chunk included), the
    sum divided by the student's response tokens, like ``simct``. The teacher's full
    log-softmax (``full_logprobs``) is read; its response ids are the pair's tokenisation of the
    student's text, as in the training loop.
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {resolution!r}; valid: {', '.join(RESOLUTIONS)}")
    if pair.teacher_table.dummy_prefix or pair.student_table.dummy_prefix:
        raise ValueError(
            "the brute-force reference does not map a dummy-prefix tokenizer's "
            "first response token (use a pair without one)"
        )
    vocabs = (VocabBytes(pair.teacher_table), VocabBytes(pair.student_table))

    def objective(
        *, student_logits, student_ids, alignments, shared_vocab, teacher, student_old_logprobs=None
    ):
        batch = student_logits.shape[0]
        student = [student_ids[b, : alignments[b].student_length].tolist() for b in range(batch)]
        teacher_tokens = pair.teacher_ids_for_batch(student)
        rows = ([], [])  # per side: (sequence, position, event ids, first row of its chunk)
        total, chunks, multi, supervised = 0, 0, 0, 0
        for b, alignment in enumerate(alignments):
            for k, (t0, t1, s0, s1) in enumerate(alignment.chunks):
                if not alignment.aligned[k] or t1 == t0 or s1 == s0:
                    continue
                spans = (teacher_tokens[b][t0:t1], student[b][s0:s1])
                is_end = bool(alignment.is_end[k])
                if is_end:
                    if not all(vocab.end[s].all() for vocab, s in zip(vocabs, spans)):
                        continue
                    chunk = b""
                elif any(vocab.special[s].any() for vocab, s in zip(vocabs, spans)):
                    continue
                else:
                    chunk = b"".join(vocabs[0].tokens[v] for v in spans[0])
                sides = []
                for vocab, span in zip(vocabs, spans):
                    offsets = np.cumsum([0] + [int(vocab.length[v]) for v in span])[:-1]
                    sides.append((vocab, list(zip(span, offsets.tolist()))))
                previous = (
                    teacher_tokens[b][t0 - 1] if t0 else None,
                    student[b][s0 - 1] if s0 else None,
                )
                ids, width = chunk_events(sides, chunk, resolution, previous, is_end)
                for side, start in ((0, t0), (1, s0)):
                    for i, event in enumerate(ids[side]):
                        rows[side].append(
                            (b, start + i, np.where(event >= 0, event + total, -1), i == 0)
                        )
                total += width
                chunks += 1
                multi += (t1 - t0 > 1) or (s1 - s0 > 1)
                supervised += s1 - s0
        tokens = sum(a.student_length for a in alignments)
        if not total:
            zero = student_logits.sum() * 0.0
            return zero, {
                "loss": 0.0,
                "kl": 0.0,
                "coverage": 0.0,
                "supervised_tokens": 0.0,
                "student_tokens": float(tokens),
                "chunks_one_to_one": 0.0,
                "chunks_multi": 0.0,
                "unaligned_share": 0.0,
                "teacher_logprob_mean": float(teacher.token_logprobs.mean()),
            }
        padded = torch.zeros(batch, max(len(t) for t in teacher_tokens), dtype=torch.long)
        for b, ids_b in enumerate(teacher_tokens):
            padded[b, : len(ids_b)] = torch.as_tensor(ids_b, dtype=torch.long)
        student_events = _events(
            rows[1], torch.log_softmax(student_logits.double(), -1), student_ids.long(), total
        )
        with torch.no_grad():
            teacher_events = _events(rows[0], teacher.full_logprobs.double(), padded, total)
        present = student_events > 0
        terms = torch.where(
            present,
            student_events
            * (student_events.clamp_min(1e-30).log() - teacher_events.clamp_min(1e-30).log()),
            torch.zeros_like(student_events),
        )
        loss = terms.sum() / max(tokens, 1)
        metrics = {
            "loss": float(loss),
            "kl": float(loss),
            "coverage": supervised / max(tokens, 1),
            "supervised_tokens": float(supervised),
            "student_tokens": float(tokens),
            "chunks_one_to_one": float(chunks - multi),
            "chunks_multi": float(multi),
            "unaligned_share": 0.0,
            "teacher_logprob_mean": float(teacher.token_logprobs.mean()),
        }
        return loss.to(student_logits.dtype), metrics

    return objective


def _events(rows, logprobs, ids, total):
    """float64 ``[total]``: each event's joint probability (path prefix x off-path mass)."""
    sequence = torch.as_tensor([r[0] for r in rows])
    position = torch.as_tensor([r[1] for r in rows])
    events = torch.as_tensor(np.stack([r[2] for r in rows]))
    first = torch.as_tensor([r[3] for r in rows])
    row_logprobs = logprobs[sequence, position]
    realised = row_logprobs.gather(1, ids[sequence, position].unsqueeze(1)).squeeze(1)
    exclusive = torch.cumsum(realised, 0) - realised
    index = torch.arange(len(rows))
    chunk_start = torch.cummax(torch.where(first, index, torch.zeros_like(index)), 0).values
    weight = (exclusive - exclusive[chunk_start]).exp()
    keep = events >= 0
    out = torch.zeros(total, dtype=torch.float64)
    out.index_add_(0, events[keep], (row_logprobs.exp() * weight[:, None])[keep])
    return out


def _load(demo: Path, student: str):
    from ctopd.core.pair import TokenizerPair
    from ctopd.training.config import ModelConfig
    from ctopd.training.models import load_causal_lm, load_model_tokenizer

    configs = (
        ModelConfig(name_or_path=str(demo / "teacher")),
        ModelConfig(name_or_path=str(demo / student)),
    )
    tokenizers = (
        load_model_tokenizer(configs[0], side="teacher"),
        load_model_tokenizer(configs[1], side="student"),
    )
    models = (
        load_causal_lm(configs[0], side="teacher").eval(),
        load_causal_lm(configs[1], side="student").eval(),
    )
    return TokenizerPair(*tokenizers), tokenizers, models


def visible(demo: Path, student: str, prompts: int) -> dict:
    """Divergence per student token each resolution sees on the student's own samples, the
    teacher's mass on bytes the student's previous token excludes, and (cross pair) the
    reference's offset loss next to ``simct``'s on the same batch."""
    from ctopd.objectives.registry import compute_objective, teacher_needs
    from ctopd.objectives.teacher import teacher_outputs
    from ctopd.objectives.text_events import text_tables
    from ctopd.training.config import DataConfig
    from ctopd.training.data import encode_prompts, load_examples
    from ctopd.training.rollout import pad_responses, response_logits, sample_responses

    pair, (t_tok, s_tok), (teacher, model) = _load(demo, student)
    examples = load_examples(DataConfig(path=str(demo / "validation.jsonl"), limit=prompts))
    s_prompts = encode_prompts(s_tok, examples, side="student")
    t_prompts = encode_prompts(t_tok, examples, side="teacher")
    objectives = {r: reference_objective(pair, r) for r in RESOLUTIONS}
    sums = {r: {"one_to_one": 0.0, "multi": 0.0} for r in RESOLUTIONS}
    simct_loss, tokens, excluded, starts = 0.0, 0, 0.0, 0
    vocabs = (VocabBytes(pair.teacher_table), VocabBytes(pair.student_table))
    first_byte = [np.where(v.length > 0, v.matrix[:, 0], 0) for v in vocabs]
    torch.manual_seed(0)
    for lo in range(0, len(examples), 32):
        sp, tp = s_prompts[lo : lo + 32], t_prompts[lo : lo + 32]
        with torch.no_grad():
            responses = sample_responses(
                model,
                sp,
                end_ids=pair.student_table.end_ids.tolist(),
                pad_id=s_tok.pad_token_id,
                max_new_tokens=96,
            )
            teacher_responses = pair.teacher_ids_for_batch(responses)
            alignments = pair.align_batch(teacher_responses, responses)
            t_logits = response_logits(
                teacher, tp, teacher_responses, pad_id=t_tok.pad_token_id, device="cpu"
            )
            s_logits = response_logits(
                model, sp, responses, pad_id=s_tok.pad_token_id, device="cpu"
            )
        t_ids, _ = pad_responses(teacher_responses, pad_id=-1)
        s_ids, _ = pad_responses(responses)
        tables = text_tables(pair.teacher_table, pair.student_table, pair.shared_vocab)
        outputs = teacher_outputs(
            t_logits,
            t_ids,
            pair.shared_vocab,
            teacher_needs("simct") | {"full_logprobs"},
            alignments=alignments,
            student_ids=responses,
            text_tables=tables,
        )
        count = sum(len(r) for r in responses)
        tokens += count
        if not pair.identical:
            loss, _ = compute_objective(
                "simct",
                student_logits=s_logits,
                student_ids=s_ids,
                alignments=alignments,
                shared_vocab=pair.shared_vocab,
                teacher=outputs,
            )
            simct_loss += float(loss) * count
        for resolution, objective in objectives.items():
            for kind in ("one_to_one", "multi"):
                keep = [a.one_to_one if kind == "one_to_one" else ~a.one_to_one for a in alignments]
                masked = [_only(a, k) for a, k in zip(alignments, keep)]
                loss, _ = objective(
                    student_logits=s_logits,
                    student_ids=s_ids,
                    alignments=masked,
                    shared_vocab=pair.shared_vocab,
                    teacher=outputs,
                )
                sums[resolution][kind] += float(loss) * count
        for b, alignment in enumerate(alignments):
            for k, (t0, _, s0, _) in enumerate(alignment.chunks):
                if k == 0 or not alignment.aligned[k] or not t0 or not s0:
                    continue
                previous = responses[b][s0 - 1]
                if vocabs[1].special[previous]:
                    continue
                ruled_out = ~vocabs[1].follow[previous][first_byte[0]] & (vocabs[0].length > 0)
                excluded += float(
                    torch.softmax(t_logits[b, t0].double(), -1)[torch.as_tensor(ruled_out)].sum()
                )
                starts += 1
    out = {
        "student": student,
        "identical": pair.identical,
        "prompts": len(examples),
        "student_tokens": tokens,
        "boundary_teacher_mass_excluded": excluded / max(starts, 1),
    }
    for resolution in RESOLUTIONS:
        for kind in ("one_to_one", "multi"):
            out[f"{resolution}_{kind}"] = sums[resolution][kind] / max(tokens, 1)
        out[resolution] = out[f"{resolution}_one_to_one"] + out[f"{resolution}_multi"]
    out["offset_over_byte"] = out["offset"] / out["byte"] if out["byte"] else None
    if not pair.identical:
        out["simct"] = simct_loss / max(tokens, 1)
    return out


def _only(alignment, keep):
    """The alignment with only the chunks ``keep`` marked aligned (the others get no loss)."""
    import dataclasses

    return dataclasses.replace(alignment, aligned=alignment.aligned & keep)


RUNS = (  # (label, student folder, objective, lr method whose rate it uses)
    ("control: OPD", "control", "opd", "control_opd"),
    (
        "control: offset events (as if tokenizers differed)",
        "control",
        "reference_offset",
        "control_opd",
    ),
    ("control: DPCA", "control", "dpca", "dpca"),
    ("cross: SimCT (offset events)", "student", "simct", "simct"),
    ("cross: byte events", "student", "reference_byte", "simct"),
    ("cross: continued SFT", "student", "sft", "sft"),
)


def train_runs(demo: Path, seeds: list[int], *, steps: int | None = None, log=print) -> list[dict]:
    """The validation runs of :data:`RUNS`, one process, one after another (``steps``: the
    demo's ``method_steps`` unless given)."""
    from testbed_lib.settings import FIXED_WARMUP

    from ctopd.demo import settings as demo_settings
    from ctopd.demo.methods import method_job, run_method
    from ctopd.objectives.registry import register_objective

    pairs = {}
    for folder in ("control", "student"):
        pairs[folder] = _load(demo, folder)[0]
    rows = []
    for label, folder, objective, rate_of in RUNS:
        name = f"limits_{folder}_{objective}"
        if objective.startswith("reference_"):
            register_objective(
                objective,
                reference_objective(pairs[folder], objective.split("_")[1]),
                {"token_logprobs", "full_logprobs"},
            )
        demo_settings.RUN_SPECS[name] = (folder, objective)
        for seed in seeds:
            settings = FIXED_WARMUP
            job = method_job(
                name,
                seed,
                demo,
                settings,
                lr=settings.lr(rate_of),
                split="validation",
                curve=False,
                steps=steps,
                run_dir=demo / "runs" / "limits" / f"{name}-seed{seed}",
            )
            started = time.perf_counter()
            run = run_method(job)
            rows.append(
                {
                    "label": label,
                    "objective": objective,
                    "seed": seed,
                    "lr": job["lr"],
                    "accuracy": run["accuracy"],
                    "kl": run["kl"],
                    "seconds": time.perf_counter() - started,
                }
            )
            log(
                f"{label:<52} seed {seed}: validation accuracy {run['accuracy']:.3f}, "
                f"KL {run['kl']:.3f}"
            )
    return rows


def agreement() -> list[dict]:
    """Loss at agreement of ``simct`` and both reference spaces, per tokenizer pair of the
    invariant tests (the dummy-prefix pair left out: the reference does not map it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ctopd.core.pair import TokenizerPair
    from ctopd.objectives.registry import teacher_needs
    from ctopd.objectives.teacher import teacher_outputs
    from ctopd.objectives.text_events import text_tables
    from ctopd.testing import train_byte_level_bpe, train_digit_group_bpe
    from tests.objectives.agreement import agreement_batch, markov_texts
    from tests.objectives.test_text_events import agreement_losses, sampled_path_floor

    distribution = markov_texts("ab 12", max_length=6, seed=3)
    corpus = distribution.sample(3000, seed=1)
    tokenizers = {
        "digits": train_byte_level_bpe(corpus, 290, split_digits=True),
        "groups": train_digit_group_bpe(corpus, 290),
        "bytes": train_byte_level_bpe(corpus, 290, split_digits=False),
    }
    texts = [t for t in distribution.sample(400, seed=2) if not t.startswith(" ")][:48]
    rows = []
    for teacher_name, student_name in (
        ("digits", "groups"),
        ("digits", "bytes"),
        ("groups", "digits"),
    ):
        pair = TokenizerPair(tokenizers[teacher_name], tokenizers[student_name])
        batch = agreement_batch(pair, distribution, texts)
        tables = text_tables(pair.teacher_table, pair.student_table, pair.shared_vocab)
        teacher = teacher_outputs(
            batch.teacher_logits,
            batch.teacher_ids,
            pair.shared_vocab,
            teacher_needs("simct") | {"full_logprobs"},
            alignments=batch.alignments,
            student_ids=batch.student_responses,
            text_tables=tables,
        )
        row = {
            "pair": f"{teacher_name} -> {student_name}",
            "floor": sampled_path_floor(batch),
            "simct": agreement_losses(pair, batch, space="text")["simct"][0],
        }
        for resolution in RESOLUTIONS:
            loss, _ = reference_objective(pair, resolution)(
                student_logits=batch.student_logits.detach(),
                student_ids=batch.student_ids,
                alignments=batch.alignments,
                shared_vocab=pair.shared_vocab,
                teacher=teacher,
            )
            row[resolution] = float(loss)
        rows.append(row)
    return rows


def build_twin(demo: Path, log=print) -> dict:
    """The twin teacher in ``demo/twin_teacher`` (reused when its stamp matches): the demo
    teacher's architecture, initialisation seed, steps, batch and rate, on the student's
    tokenizer and chat template. Returns ``{"accuracy" (validation), "seconds"}``."""
    import shutil

    from testbed_lib.settings import FIXED_WARMUP
    from transformers import AutoTokenizer

    from ctopd.demo.measure import accuracy
    from ctopd.demo.stages import read_stamp, replace_folder, save_model, stage_config, write_stamp
    from ctopd.testing import tiny_causal_lm
    from ctopd.training.sft import run_sft

    folder = demo / "twin_teacher"
    stamp = {**FIXED_WARMUP.teacher_stamp(), "tokenizer": "student"}
    cached = read_stamp(folder, stamp)
    if cached is not None:
        return cached
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(demo / "student"))
    work = demo / "runs" / "limits" / "twin-teacher"
    model = tiny_causal_lm(
        tokenizer,
        hidden_size=FIXED_WARMUP.teacher_hidden,
        num_layers=FIXED_WARMUP.teacher_layers,
        num_heads=FIXED_WARMUP.teacher_heads,
        max_positions=512,
        seed=FIXED_WARMUP.task_seed,
    )
    save_model(model, tokenizer, work / "init")
    log(
        f"training the twin teacher ({FIXED_WARMUP.teacher_steps} steps) on the student's tokenizer"
    )
    config = stage_config(
        FIXED_WARMUP,
        work / "run",
        data=demo / "train.jsonl",
        student=work / "init",
        teacher=None,
        steps=FIXED_WARMUP.teacher_steps,
        batch=FIXED_WARMUP.teacher_batch,
        lr=FIXED_WARMUP.teacher_lr,
        seed=FIXED_WARMUP.task_seed,
        schedule="cosine",
        warmup_ratio=0.03,
    )
    config.sft.source, config.sft.response_field = "data", "answer"
    run_sft(config)
    replace_folder(work / "run" / "final", folder)
    shutil.rmtree(work, ignore_errors=True)
    result = {
        "accuracy": accuracy(folder, demo / "validation.jsonl", FIXED_WARMUP),
        "seconds": time.perf_counter() - started,
    }
    write_stamp(folder, stamp, result)
    return result


def _view(demo: Path, name: str, *, teacher: str, student: str) -> Path:
    """A demo folder of links whose ``teacher/`` and ``student/`` are other folders of
    ``demo`` (the demo's runs read ``out / "teacher"`` and ``out / "student"``)."""
    view = demo / "runs" / "limits" / name
    view.mkdir(parents=True, exist_ok=True)
    links = {
        "teacher": teacher,
        "student": student,
        **{
            n: n
            for n in (
                "train.jsonl",
                "validation.jsonl",
                "teacher_samples.jsonl",
                "teacher_samples.json",
            )
        },
    }
    for link, target in links.items():
        path = view / link
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to((demo / target).resolve())
    return view


def _runs_from(
    view: Path, runs: list[tuple[str, str, str]], seeds: list[int], steps: int | None, log
) -> list[dict]:
    """``(label, objective, lr method)`` runs from ``view``'s student, on validation."""
    from testbed_lib.settings import FIXED_WARMUP

    from ctopd.demo import settings as demo_settings
    from ctopd.demo.methods import method_job, run_method

    settings, rows = FIXED_WARMUP, []
    for label, objective, rate_of in runs:
        name = f"limits_{view.name}_{objective}"
        demo_settings.RUN_SPECS[name] = ("student", objective)
        for seed in seeds:
            job = method_job(
                name,
                seed,
                view,
                settings,
                lr=settings.lr(rate_of),
                split="validation",
                curve=False,
                steps=steps,
                run_dir=view / "runs" / f"{objective}-seed{seed}",
            )
            started = time.perf_counter()
            run = run_method(job)
            rows.append(
                {
                    "label": label,
                    "objective": objective,
                    "seed": seed,
                    "lr": job["lr"],
                    "accuracy": run["accuracy"],
                    "kl": run["kl"],
                    "seconds": time.perf_counter() - started,
                }
            )
            log(f"{label:<52} seed {seed}: validation accuracy {run['accuracy']:.3f}")
    return rows


def twin_runs(
    demo: Path, seeds: list[int], *, steps: int | None = None, log=print
) -> tuple[dict, list[dict]]:
    """Same-tokenizer OPD from the twin teacher to the warmed-up cross-tokenizer student, on
    validation, at the same-tokenizer OPD rate the demo's sweep chose."""
    twin = build_twin(demo, log=log)
    view = _view(demo, "twin-view", teacher="twin_teacher", student="student")
    return twin, _runs_from(
        view,
        [("cross: OPD from a teacher on its own tokenizer (twin)", "opd", "control_opd")],
        seeds,
        steps,
        log,
    )


CLOSER_STEPS = 1000


def build_closer(demo: Path, log=print) -> dict:
    """``demo/student_closer``: the warmed-up cross-tokenizer student after
    :data:`CLOSER_STEPS` more SFT steps at the warm-up's batch and constant rate, on the
    reference solutions (the teacher, at 1.000, writes the same texts). Reused when stamped.
    Returns ``{"accuracy" (validation), "seconds"}``."""
    import shutil

    from testbed_lib.settings import FIXED_WARMUP

    from ctopd.demo.measure import accuracy
    from ctopd.demo.stages import read_stamp, replace_folder, stage_config, write_stamp
    from ctopd.training.sft import run_sft

    folder = demo / "student_closer"
    stamp = {**FIXED_WARMUP.student_stamp("student"), "extra_steps": CLOSER_STEPS}
    cached = read_stamp(folder, stamp)
    if cached is not None:
        return cached
    started = time.perf_counter()
    work = demo / "runs" / "limits" / "closer-warmup"
    log(f"warming the cross-tokenizer student up for {CLOSER_STEPS} more steps")
    config = stage_config(
        FIXED_WARMUP,
        work,
        data=demo / "train.jsonl",
        student=demo / "student",
        teacher=None,
        steps=CLOSER_STEPS,
        batch=FIXED_WARMUP.warmup_batch,
        lr=FIXED_WARMUP.warmup_lr,
        seed=FIXED_WARMUP.task_seed + 7,
        schedule="constant",
        warmup_ratio=0.0,
    )
    config.sft.source, config.sft.response_field = "data", "answer"
    run_sft(config)
    replace_folder(work / "final", folder)
    shutil.rmtree(work, ignore_errors=True)
    result = {
        "accuracy": accuracy(folder, demo / "validation.jsonl", FIXED_WARMUP),
        "seconds": time.perf_counter() - started,
    }
    write_stamp(folder, stamp, result)
    return result


def closer_runs(
    demo: Path, seeds: list[int], *, steps: int | None = None, log=print
) -> tuple[dict, list[dict]]:
    """The cross-tokenizer methods, continued SFT and (when the twin teacher is built) the
    twin's OPD from :func:`build_closer`'s student, on validation, at the demo's rates."""
    closer = build_closer(demo, log=log)
    view = _view(demo, "closer-view", teacher="teacher", student="student_closer")
    rows = _runs_from(
        view,
        [
            ("closer start: SimCT", "simct", "simct"),
            ("closer start: DPCA", "dpca", "dpca"),
            ("closer start: continued SFT", "sft", "sft"),
        ],
        seeds,
        steps,
        log,
    )
    if (demo / "twin_teacher").is_dir():
        view = _view(demo, "closer-twin-view", teacher="twin_teacher", student="student_closer")
        rows += _runs_from(
            view,
            [("closer start: OPD from the twin teacher", "opd", "control_opd")],
            seeds,
            steps,
            log,
        )
    return closer, rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=Path("ctopd-demo"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--train", action="store_true", help="also the validation runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per run (default: the demo's method_steps)"
    )
    parser.add_argument(
        "--agreement",
        action="store_true",
        help="also the reference spaces at agreement (run from the repo root)",
    )
    parser.add_argument(
        "--twin",
        action="store_true",
        help="also train the twin teacher and run OPD from it (about 6 min)",
    )
    parser.add_argument(
        "--closer",
        action="store_true",
        help=f"also the runs from a student warmed up {CLOSER_STEPS} steps longer",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    for name in ("teacher", "student", "control", "validation.jsonl"):
        if not (args.demo_dir / name).exists():
            sys.exit(
                f"{args.demo_dir / name} is missing: run `python research/testbed.py --fixed-warmup "
                f"--output-dir {args.demo_dir}` first (it caches the models this script reads)"
            )
    from ctopd.demo.stages import one_thread

    one_thread()
    result = {"visible": [visible(args.demo_dir, s, args.prompts) for s in ("student", "control")]}
    if args.train:
        result["runs"] = train_runs(
            args.demo_dir,
            args.seeds,
            steps=args.steps,
            log=(lambda s: None) if args.json else print,
        )
    if args.agreement:
        result["agreement"] = agreement()
    if args.twin:
        result["twin_teacher"], twin = twin_runs(
            args.demo_dir,
            args.seeds,
            steps=args.steps,
            log=(lambda s: None) if args.json else print,
        )
        result.setdefault("runs", []).extend(twin)
    if args.closer:
        result["closer_student"], closer = closer_runs(
            args.demo_dir,
            args.seeds,
            steps=args.steps,
            log=(lambda s: None) if args.json else print,
        )
        result.setdefault("runs", []).extend(closer)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("\nDivergence each resolution sees (nats per student token, the student's samples):")
    print(
        "| student | 1:1 chunks offset / byte | multi-token offset / byte | all offset / byte "
        "| offset/byte | teacher mass the student's boundary excludes |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for v in result["visible"]:
        name = "same-tokenizer control" if v["identical"] else "cross-tokenizer student"
        print(
            f"| {name} | {v['offset_one_to_one']:.3f} / {v['byte_one_to_one']:.3f} | "
            f"{v['offset_multi']:.3f} / {v['byte_multi']:.3f} | {v['offset']:.3f} / "
            f"{v['byte']:.3f} | {v['offset_over_byte']:.2f} | "
            f"{v['boundary_teacher_mass_excluded']:.1e} |"
        )
    cross = result["visible"][0]
    print(
        f"\nreference offset space {cross['offset']:.5f} vs ctopd simct {cross['simct']:.5f} "
        "nats/token on the same batches"
    )
    if "agreement" in result:
        print(
            "\nAt agreement (nats per student token; two models that give every text the same "
            "probability):"
        )
        print("| pair | sampled-path floor | simct | reference offset | reference byte |")
        print("| --- | --- | --- | --- | --- |")
        for row in result["agreement"]:
            print(
                f"| {row['pair']} | {row['floor']:.4f} | {row['simct']:.4f} | "
                f"{row['offset']:.4f} | {row['byte']:.4f} |"
            )
    if "twin_teacher" in result:
        print(
            f"\ntwin teacher (student's tokenizer): validation accuracy "
            f"{result['twin_teacher']['accuracy']:.3f}"
        )
    if "closer_student" in result:
        print(
            f"closer start (cross-tokenizer student, {CLOSER_STEPS} more warm-up steps): "
            f"validation accuracy {result['closer_student']['accuracy']:.3f}"
        )
    if result.get("runs"):
        print("\n| run | lr | validation accuracy (mean ± std) | per seed | KL |")
        print("| --- | --- | --- | --- | --- |")
        for label in dict.fromkeys(r["label"] for r in result["runs"]):
            mine = [r for r in result["runs"] if r["label"] == label]
            acc = [r["accuracy"] for r in mine]
            std = statistics.stdev(acc) if len(acc) > 1 else 0.0
            print(
                f"| {label} | {mine[0]['lr']:g} | {statistics.fmean(acc):.3f} ± {std:.3f} | "
                f"{' '.join(f'{a:.3f}' for a in acc)} | "
                f"{statistics.fmean(r['kl'] for r in mine):.3f} |"
            )


if __name__ == "__main__":
    main()
