"""DPCA: chunk-level credit assignment from the teacher's realised-token log-probs
(docs/concepts/dpca.md).

Per aligned chunk, ``L_T = sum_j log q(t_j)`` and ``L_S = sum_i log π_old(s_i)``. Each student
token gets the target ``r_i = (L_T / L_S) log π_old(s_i)`` (so ``sum_i r_i = L_T``), or
``L_T / n`` for each of the ``n`` tokens when ``|L_S| < ε``, and the advantage
``A_i = clamp(r_i - log π_old(s_i), -C, C)``. For a 1:1 chunk that is the per-token OPD
advantage ``log q(t) - log π(s)``.

The loss is the clipped policy-gradient surrogate
``-min(ρ_i A_i, clip(ρ_i, 1 - clip_low, 1 + clip_high) A_i)`` with ``ρ_i = π_θ(s_i) / π_old(s_i)``
when rollout-time log-probs are given, and the one-update form ``-A_i log π_θ(s_i)`` when they are
not (``π_old`` is then the current policy, detached; both have the same gradient at ``ρ = 1``).
Summed over the tokens of aligned chunks and divided by the student response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ctopd.core.alignment import Alignment
from ctopd.core.shared_vocab import SharedVocab
from ctopd.objectives.checks import check_finite, check_options, check_student, check_teacher
from ctopd.objectives.metrics import batch_metrics, finish_metrics
from ctopd.objectives.plan import (
    ChunkPlan,
    RowSlice,
    build_plan,
    expand_ranges,
    flatten_chunks,
    range_sums,
    segment_sum,
)
from ctopd.objectives.scores import row_scores
from ctopd.objectives.sliced import compute_dtype, sliced_loss
from ctopd.objectives.student_head import StudentHidden
from ctopd.objectives.teacher import TeacherOutputs


def chunk_advantages(
    old_logprobs: Tensor,
    chunk: Tensor,
    teacher_sums: Tensor,
    *,
    advantage_clip: float = 10.0,
    epsilon: float = 1e-6,
) -> Tensor:
    """DPCA advantages of tokens grouped by chunk.

    Args:
        old_logprobs: float ``[S]``: ``log π_old(s_i)`` of each token (no gradient needed).
        chunk: int64 ``[S]``: each token's chunk in ``[0, K)``; every chunk has a token.
        teacher_sums: float ``[K]``: ``L_T`` of each chunk.
        advantage_clip: ``C``.
        epsilon: below this ``|L_S|`` the chunk's budget is spread evenly.

    Returns:
        float ``[S]`` advantages.
    """
    old_logprobs = old_logprobs.detach()
    count = teacher_sums.shape[0]
    student_sums = segment_sum(old_logprobs, chunk, count)[chunk]
    sizes = segment_sum(torch.ones_like(old_logprobs), chunk, count)[chunk]
    budget = teacher_sums.detach().to(old_logprobs.dtype)[chunk]
    even = student_sums.abs() < epsilon
    safe = torch.where(even, torch.ones_like(student_sums), student_sums)
    target = torch.where(even, budget / sizes, budget * old_logprobs / safe)
    return (target - old_logprobs).clamp(-advantage_clip, advantage_clip)


def dpca_advantages(
    student_old_logprobs: Tensor,
    teacher_token_logprobs: Tensor,
    alignments: list[Alignment],
    *,
    advantage_clip: float = 10.0,
    epsilon: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """DPCA advantages of a whole batch (for logging and tests).

    Args:
        student_old_logprobs: float ``[B, m]`` rollout-time ``log π_old(s_i)``.
        teacher_token_logprobs: float ``[B, n]`` ``log q(t_j)``.
        alignments: ``B`` alignments.

    Returns:
        ``(advantages, mask)``: float ``[B, m]`` (0 outside aligned chunks) and bool ``[B, m]``
        marking the tokens of aligned chunks.
    """
    dummy_ids = torch.zeros(
        student_old_logprobs.shape, dtype=torch.long, device=student_old_logprobs.device
    )
    flat = flatten_chunks(alignments, dummy_ids, None)
    kept = np.flatnonzero(flat.usable)
    owner, pos = expand_ranges(flat.student_start[kept], flat.student_end[kept])
    device = student_old_logprobs.device
    batch = torch.as_tensor(flat.batch[kept][owner], device=device)
    pos = torch.as_tensor(pos, device=device)
    teacher_sums = range_sums(
        teacher_token_logprobs.detach().to(device),
        flat.batch[kept],
        flat.teacher_start[kept],
        flat.teacher_end[kept],
    )
    values = chunk_advantages(
        student_old_logprobs[batch, pos],
        torch.as_tensor(owner, device=device),
        teacher_sums,
        advantage_clip=advantage_clip,
        epsilon=epsilon,
    )
    advantages = torch.zeros_like(student_old_logprobs)
    mask = torch.zeros(student_old_logprobs.shape, dtype=torch.bool, device=device)
    advantages[batch, pos] = values.to(advantages.dtype)
    mask[batch, pos] = True
    return advantages, mask


@dataclass(frozen=True)
class _DpcaSetup:
    plan: ChunkPlan
    teacher_sums: Tensor  # [K] L_T of each kept chunk
    old_logprobs: Tensor | None  # [B, m] rollout-time log-probs, or None for the one-update form
    advantage_clip: float
    epsilon: float
    clip_low: float
    clip_high: float


def dpca(
    *,
    student_logits: Tensor | StudentHidden,
    student_ids: Tensor,
    alignments: list[Alignment],
    shared_vocab: SharedVocab | None,
    teacher: TeacherOutputs | None,
    student_old_logprobs: Tensor | None = None,
    advantage_clip: float = 10.0,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    epsilon: float = 1e-6,
    slice_size: int = 256,
) -> tuple[Tensor, dict[str, float]]:
    """DPCA loss over the tokens of aligned chunks.

    Args:
        student_logits: float ``[B, m, V_S]``, row ``i`` predicts ``student_ids[:, i]``; dense,
            or as hidden states and output layer (:class:`~ctopd.objectives.student_head.
            StudentHidden`, projected one slice of rows at a time; see ``compute_objective``).
        student_ids: int ``[B, m]``.
        alignments: ``B`` alignments.
        shared_vocab: not used (DPCA needs no shared vocabulary).
        teacher: needs only ``token_logprobs``.
        student_old_logprobs: float ``[B, m]`` rollout-time log-probs; ``None`` = the current
            ones, detached (one update per rollout).
        advantage_clip: ``C`` in the advantage clamp.
        clip_low, clip_high: PPO ratio clip ``[1 - clip_low, 1 + clip_high]``.
        epsilon: ``|L_S|`` below which a chunk's budget is spread evenly.
        slice_size: student rows processed at once.

    Returns:
        ``(loss, metrics)``; metrics add ``advantage_mean`` and ``clip_fraction``.
    """
    check_options(
        advantage_clip=advantage_clip,
        clip_low=clip_low,
        clip_high=clip_high,
        epsilon=epsilon,
        slice_size=slice_size,
    )
    check_student(student_logits, student_ids, alignments)
    check_teacher(teacher, ["token_logprobs"], alignments, student_logits.shape[0], "dpca")
    if student_old_logprobs is not None:
        _check_old(student_old_logprobs, student_ids, alignments)
    flat = flatten_chunks(alignments, student_ids, None)
    plan = build_plan(flat, flat.usable, student_ids, all_tokens=True, slice_size=slice_size)
    dtype = compute_dtype(student_logits)
    kept = plan.index
    setup = _DpcaSetup(
        plan=plan,
        teacher_sums=range_sums(
            teacher.token_logprobs.detach().to(student_logits.device, dtype),
            flat.batch[kept],
            flat.teacher_start[kept],
            flat.teacher_end[kept],
        ),
        old_logprobs=None if student_old_logprobs is None else student_old_logprobs.detach(),
        advantage_clip=advantage_clip,
        epsilon=epsilon,
        clip_low=clip_low,
        clip_high=clip_high,
    )
    sums: dict[str, float] = {}
    loss = sliced_loss(
        student_logits,
        plan.slices,
        lambda rows, sl: _slice_loss(setup, rows, sl),
        sums,
        scale=1.0 / max(int(flat.student_lengths.sum()), 1),
    )
    supervised = int(flat.student_sizes[kept].sum())
    kl = (sums.get("student", 0.0) - float(setup.teacher_sums.sum())) / max(supervised, 1)
    return loss, finish_metrics(
        batch_metrics(flat, teacher.token_logprobs),
        loss=loss,
        kl=kl,
        supervised_tokens=supervised,
        advantage_mean=sums.get("advantage", 0.0) / max(supervised, 1),
        clip_fraction=sums.get("clipped", 0.0) / max(supervised, 1),
    )


def _check_old(old: Tensor, student_ids: Tensor, alignments: list[Alignment]) -> None:
    if tuple(old.shape) != tuple(student_ids.shape):
        raise ValueError(
            f"student_old_logprobs has shape {tuple(old.shape)}; expected "
            f"{tuple(student_ids.shape)} like student_ids"
        )
    check_finite("student_old_logprobs", old, [a.student_length for a in alignments])


def _slice_loss(
    setup: _DpcaSetup, rows: Tensor, row_slice: RowSlice
) -> tuple[Tensor, dict[str, Tensor]]:
    """Surrogate summed over one slice's tokens; rows ``[S, V_S]``."""
    _, logprobs = row_scores(rows, row_slice.ids)
    if setup.old_logprobs is None:
        old = logprobs.detach()
    else:
        old = setup.old_logprobs[row_slice.batch, row_slice.pos].to(rows.dtype)
    advantages = chunk_advantages(
        old,
        row_slice.chunk,
        setup.teacher_sums[row_slice.k0 : row_slice.k1],
        advantage_clip=setup.advantage_clip,
        epsilon=setup.epsilon,
    )
    clipped = torch.zeros((), dtype=rows.dtype, device=rows.device)
    if setup.old_logprobs is None:
        loss = -(advantages * logprobs).sum()
    else:
        ratio = torch.exp(logprobs - old)
        bounded = ratio.clamp(1.0 - setup.clip_low, 1.0 + setup.clip_high)
        loss = -torch.minimum(ratio * advantages, bounded * advantages).sum()
        clipped = (bounded != ratio).sum().to(rows.dtype)
    return loss, {
        "student": logprobs.detach().sum(),
        "advantage": advantages.sum(),
        "clipped": clipped,
    }
