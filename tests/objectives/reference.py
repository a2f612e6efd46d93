"""Slow, obviously correct per-chunk versions of the objectives, and random test batches.

Everything here loops over sequences, chunks, tokens and classes in Python and uses plain
autograd, so that the fast sliced implementations can be checked against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ctopd.core.alignment import Alignment
from ctopd.core.shared_vocab import SharedVocab
from ctopd.objectives import TeacherOutputs

# ---------------------------------------------------------------------------------------------
# Random batches


def make_shared_vocab(
    student_members: list[list[int]],
    teacher_members: list[list[int]],
    student_vocab: int,
    teacher_vocab: int,
) -> SharedVocab:
    """A SharedVocab from explicit member lists (the last class is the end class)."""

    def matrix(members):
        ranks = max(len(m) for m in members)
        out = np.full((ranks, len(members)), -1, dtype=np.int64)
        for c, ids in enumerate(members):
            out[: len(ids), c] = ids
        return out

    def to_class(members, vocab):
        out = np.full(vocab, -1, dtype=np.int64)
        for c, ids in enumerate(members):
            out[ids] = c
        return out

    return SharedVocab(
        class_bytes=[f"c{c}".encode() for c in range(len(student_members) - 1)] + [b""],
        teacher_member_ids=matrix(teacher_members),
        student_member_ids=matrix(student_members),
        teacher_id_to_class=to_class(teacher_members, teacher_vocab),
        student_id_to_class=to_class(student_members, student_vocab),
    )


def random_shared_vocab(
    rng: np.random.Generator, student_vocab: int = 13, teacher_vocab: int = 17, classes: int = 6
) -> SharedVocab:
    """Random classes: some with two members on a side, some ids shared by none; end last."""
    s_perm, t_perm = rng.permutation(student_vocab), rng.permutation(teacher_vocab)
    s_members, t_members, s_next, t_next = [], [], 0, 0
    for _ in range(classes):
        s_count, t_count = 1 + int(rng.random() < 0.3), 1 + int(rng.random() < 0.3)
        s_members.append(s_perm[s_next : s_next + s_count].tolist())
        t_members.append(t_perm[t_next : t_next + t_count].tolist())
        s_next, t_next = s_next + s_count, t_next + t_count
    s_members[-1] = s_members[-1][:1]  # the end class: one student end id
    return make_shared_vocab(s_members, t_members, student_vocab, teacher_vocab)


@dataclass
class Batch:
    student_logits: torch.Tensor
    student_ids: torch.Tensor
    alignments: list[Alignment]
    shared_vocab: SharedVocab
    teacher_logits: torch.Tensor
    teacher_ids: torch.Tensor


def _random_chunks(rng, shared_vocab, ended: bool):
    """Chunk sizes, aligned flags and the student ids of one sequence."""
    shared_ids = shared_vocab.student_member_ids[0, :-1]
    end_id = int(shared_vocab.student_member_ids[0, -1])
    rows, aligned, student_ids = [], [], []
    for _ in range(int(rng.integers(0, 7))):
        kind = rng.random()
        if kind < 0.5:
            sizes, ok = (1, 1), True
        elif kind < 0.85:
            sizes, ok = (int(rng.integers(1, 4)), int(rng.integers(1, 4))), True
            if sizes == (1, 1):
                sizes = (1, 2)
        else:
            sizes, ok = (int(rng.integers(0, 3)), int(rng.integers(1, 3))), False
        rows.append(sizes)
        aligned.append(ok)
        for _ in range(sizes[1]):
            pick_shared = sizes == (1, 1) and rng.random() < 0.8
            student_ids.append(
                int(rng.choice(shared_ids))
                if pick_shared
                else int(rng.integers(0, len(shared_vocab.student_id_to_class)))
            )
    if ended:
        rows.append((1, 1))
        aligned.append(True)
        student_ids.append(end_id)
    return rows, aligned, student_ids


def random_alignment(rng, shared_vocab) -> tuple[Alignment, list[int]]:
    ended = rng.random() < 0.5
    sizes, aligned, student_ids = _random_chunks(rng, shared_vocab, ended)
    t = np.cumsum([0] + [s[0] for s in sizes])
    s = np.cumsum([0] + [s[1] for s in sizes])
    chunks = np.stack([t[:-1], t[1:], s[:-1], s[1:]], axis=1).astype(np.int64).reshape(-1, 4)
    is_end = np.zeros(len(sizes), dtype=bool)
    if ended:
        is_end[-1] = True
    alignment = Alignment(
        chunks=chunks,
        aligned=np.asarray(aligned, dtype=bool),
        is_end=is_end,
        teacher_length=int(t[-1]),
        student_length=int(s[-1]),
    )
    return alignment, student_ids


def random_batch(
    seed: int,
    *,
    batch: int = 3,
    student_vocab: int = 13,
    teacher_vocab: int = 17,
    classes: int = 6,
    dtype=torch.float64,
    scale: float = 2.0,
) -> Batch:
    """A random batch with padding, float64 logits and a random shared vocabulary."""
    rng = np.random.default_rng(seed)
    shared_vocab = random_shared_vocab(rng, student_vocab, teacher_vocab, classes)
    pairs = [random_alignment(rng, shared_vocab) for _ in range(batch)]
    alignments = [a for a, _ in pairs]
    m = max([a.student_length for a in alignments] + [0]) + 2
    n = max([a.teacher_length for a in alignments] + [0]) + 1
    student_ids = torch.full((batch, m), 10**6, dtype=torch.long)  # padding: arbitrary
    teacher_ids = torch.full((batch, n), -1, dtype=torch.long)
    for b, (a, ids) in enumerate(pairs):
        student_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        teacher_ids[b, : a.teacher_length] = torch.as_tensor(
            rng.integers(0, teacher_vocab, a.teacher_length)
        )
    gen = torch.Generator().manual_seed(seed)
    return Batch(
        student_logits=(
            scale * torch.randn(batch, m, student_vocab, generator=gen, dtype=dtype)
        ).requires_grad_(),
        student_ids=student_ids,
        alignments=alignments,
        shared_vocab=shared_vocab,
        teacher_logits=scale * torch.randn(batch, n, teacher_vocab, generator=gen, dtype=dtype),
        teacher_ids=teacher_ids,
    )


# ---------------------------------------------------------------------------------------------
# Reference objectives


def ref_divergence(p_s: torch.Tensor, p_t: torch.Tensor, kind: str, beta: float = 0.5):
    """Divergence of two probability vectors, written from the definitions."""
    if kind == "reverse_kl":
        return sum(p_s[i] * (torch.log(p_s[i]) - torch.log(p_t[i])) for i in range(len(p_s)))
    if kind == "forward_kl":
        return sum(p_t[i] * (torch.log(p_t[i]) - torch.log(p_s[i])) for i in range(len(p_s)))
    if kind == "jsd":
        m = [beta * p_t[i] + (1 - beta) * p_s[i] for i in range(len(p_s))]
        kl_t = sum(p_t[i] * torch.log(p_t[i] / m[i]) for i in range(len(p_s)))
        kl_s = sum(p_s[i] * torch.log(p_s[i] / m[i]) for i in range(len(p_s)))
        return beta * kl_t + (1 - beta) * kl_s
    if kind == "tv":
        return 0.5 * sum(torch.abs(p_s[i] - p_t[i]) for i in range(len(p_s)))
    raise ValueError(kind)


def ref_class_logprobs(logp: torch.Tensor, member_ids: np.ndarray) -> torch.Tensor:
    """log of the summed probability of each class's ids, one class at a time."""
    out = []
    for c in range(member_ids.shape[1]):
        ids = [int(i) for i in member_ids[:, c] if i >= 0]
        out.append(torch.log(sum(torch.exp(logp[i]) for i in ids)))
    return torch.stack(out)


def ref_chunk_objective(
    mode,
    student_logits,
    student_ids,
    alignments,
    shared_vocab,
    teacher,
    *,
    divergence="reverse_kl",
    beta=0.5,
    temperature=1.0,
    weight_by_tokens=False,
):
    """``simct`` / ``shared_only`` / ``opd`` by loops; returns the loss tensor."""
    total = student_logits.sum() * 0.0
    student_tokens = sum(a.student_length for a in alignments)
    for b, a in enumerate(alignments):
        logp = torch.log_softmax(student_logits[b], dim=-1)
        for k, (ts, te, ss, se) in enumerate(a.chunks.tolist()):
            if not a.aligned[k] or te == ts or se == ss:
                continue
            one = te - ts == 1 and se - ss == 1
            if a.is_end[k]:
                cls = shared_vocab.end_class
            elif mode != "opd":
                cls = int(shared_vocab.student_id_to_class[int(student_ids[b, ss])])
            if mode in ("shared_only", "opd") and not one:
                continue
            if mode == "shared_only" and cls < 0:
                continue
            if mode == "opd":
                s_scores, t_scores = logp[ss], teacher.full_logprobs[b, ts]
            else:
                s_scores = ref_class_logprobs(logp[ss], shared_vocab.student_member_ids)
                t_scores = teacher.class_logprobs[b, ts]
            if mode == "simct" and (not one or (cls < 0 and not a.is_end[k])):
                s_unit = sum(logp[i, int(student_ids[b, i])] for i in range(ss, se)) / (se - ss)
                t_unit = sum(teacher.token_logprobs[b, j] for j in range(ts, te)) / (te - ts)
                s_scores = torch.cat([s_scores, s_unit.reshape(1)])
                t_scores = torch.cat([t_scores, t_unit.reshape(1)])
            p_s = torch.softmax(s_scores / temperature, dim=0)
            p_t = torch.softmax(t_scores / temperature, dim=0)
            weight = (se - ss) if weight_by_tokens else 1
            total = total + weight * ref_divergence(p_s, p_t, divergence, beta)
    return total / max(student_tokens, 1)


def ref_dpca(
    student_logits,
    student_ids,
    alignments,
    teacher,
    old=None,
    *,
    advantage_clip=10.0,
    clip_low=0.2,
    clip_high=0.28,
    epsilon=1e-6,
):
    """DPCA by loops; returns ``(loss, advantages as {(b, i): A})``."""
    total = student_logits.sum() * 0.0
    advantages = {}
    for b, a in enumerate(alignments):
        logp = torch.log_softmax(student_logits[b], dim=-1)
        for k, (ts, te, ss, se) in enumerate(a.chunks.tolist()):
            if not a.aligned[k] or te == ts or se == ss:
                continue
            current = [logp[i, int(student_ids[b, i])] for i in range(ss, se)]
            old_lp = [
                float(old[b, i]) if old is not None else current[i - ss].item()
                for i in range(ss, se)
            ]
            l_t = sum(float(teacher.token_logprobs[b, j]) for j in range(ts, te))
            l_s = sum(old_lp)
            for offset, i in enumerate(range(ss, se)):
                if abs(l_s) < epsilon:
                    r = l_t / (se - ss)
                else:
                    r = l_t / l_s * old_lp[offset]
                adv = min(max(r - old_lp[offset], -advantage_clip), advantage_clip)
                advantages[(b, i)] = adv
                if old is None:
                    total = total - adv * current[offset]
                else:
                    ratio = torch.exp(current[offset] - old_lp[offset])
                    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
                    total = total - torch.minimum(ratio * adv, clipped * adv)
    student_tokens = sum(a.student_length for a in alignments)
    return total / max(student_tokens, 1), advantages


def ref_sft(student_logits, student_ids, alignments):
    total = student_logits.sum() * 0.0
    for b, a in enumerate(alignments):
        logp = torch.log_softmax(student_logits[b], dim=-1)
        for i in range(a.student_length):
            total = total - logp[i, int(student_ids[b, i])]
    return total / max(sum(a.student_length for a in alignments), 1)


def ref_uld(student_logits, alignments, teacher, top_k):
    total = student_logits.sum() * 0.0
    for b, a in enumerate(alignments):
        for k, (ts, te, ss, se) in enumerate(a.chunks.tolist()):
            if not a.aligned[k] or te == ts or se == ss:
                continue
            p = torch.sort(torch.softmax(student_logits[b, ss], dim=0), descending=True).values
            q = teacher.topk_probs[b, ts]
            total = total + sum(torch.abs(p[i] - q[i]) for i in range(top_k))
    return total / max(sum(a.student_length for a in alignments), 1)


def full_teacher(batch: Batch, top_k: int = 5) -> TeacherOutputs:
    """All teacher fields computed directly (no slicing), float64."""
    logp = torch.log_softmax(batch.teacher_logits, dim=-1)
    ids = batch.teacher_ids.clamp(min=0)
    token = logp.gather(-1, ids[..., None])[..., 0].masked_fill(batch.teacher_ids < 0, 0.0)
    members = batch.shared_vocab.teacher_member_ids
    classes = torch.stack(
        [
            torch.logsumexp(logp[..., [int(i) for i in members[:, c] if i >= 0]], dim=-1)
            for c in range(members.shape[1])
        ],
        dim=-1,
    )
    topk = torch.sort(logp.exp(), dim=-1, descending=True).values[..., :top_k]
    return TeacherOutputs(
        token_logprobs=token, class_logprobs=classes, full_logprobs=logp, topk_probs=topk
    )


LN2 = math.log(2.0)
