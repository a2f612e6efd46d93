"""Baselines for an honest comparison (docs/concepts/baselines.md): SFT on the given ids and ULD.

* ``sft``: cross-entropy on ``student_ids`` over every student response token (use it on the
  student's tokenisation of *teacher* samples). Chunks play no part in the loss; they only give
  the ``kl`` estimate when a teacher is passed.
* ``uld``: Universal Logit Distillation (Boizard et al. 2024): the L1 distance between the
  student's and the teacher's probabilities sorted in decreasing order (top ``k`` of each), at
  the first position of every aligned chunk (the two distributions that predict the chunk after
  the same prefix). Only that position of a chunk is supervised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ctopd.core.alignment import Alignment
from ctopd.core.shared_vocab import SharedVocab
from ctopd.objectives.checks import check_options, check_student, check_teacher
from ctopd.objectives.metrics import batch_metrics, finish_metrics
from ctopd.objectives.plan import ChunkPlan, RowSlice, build_plan, flatten_chunks, range_sums
from ctopd.objectives.scores import row_scores
from ctopd.objectives.sliced import compute_dtype, sliced_loss
from ctopd.objectives.student_head import StudentHidden
from ctopd.objectives.teacher import TeacherOutputs


def sft(
    *,
    student_logits: Tensor | StudentHidden,
    student_ids: Tensor,
    alignments: list[Alignment],
    shared_vocab: SharedVocab | None = None,
    teacher: TeacherOutputs | None = None,
    student_old_logprobs: Tensor | None = None,
    slice_size: int = 256,
) -> tuple[Tensor, dict[str, float]]:
    """Mean negative log-likelihood of ``student_ids`` over all student response tokens.

    Args:
        student_logits: float ``[B, m, V_S]``, row ``i`` predicts ``student_ids[:, i]``; dense,
            or as hidden states and output layer (:class:`~ctopd.objectives.student_head.
            StudentHidden`, projected one slice of rows at a time; see ``compute_objective``).
        student_ids: int ``[B, m]``.
        alignments: ``B`` alignments; they give the response lengths (and the ``kl`` estimate).
        shared_vocab, student_old_logprobs: not used.
        teacher: optional; when given, ``kl`` is ``mean(log π(s) - log q)`` over aligned chunks.
        slice_size: student rows processed at once.

    Returns:
        ``(loss, metrics)``.
    """
    check_options(slice_size=slice_size)
    check_student(student_logits, student_ids, alignments)
    flat = flatten_chunks(alignments, student_ids, None)
    # Every chunk with a student token, all its tokens: that is every response token.
    plan = build_plan(
        flat, flat.student_sizes > 0, student_ids, all_tokens=True, slice_size=slice_size
    )
    aligned = torch.as_tensor(flat.usable[plan.index], device=student_logits.device)
    sums: dict[str, float] = {}
    student_tokens = int(flat.student_lengths.sum())
    loss = sliced_loss(
        student_logits,
        plan.slices,
        lambda rows, sl: _sft_slice(aligned, rows, sl),
        sums,
        scale=1.0 / max(student_tokens, 1),
    )
    token_logprobs = None
    if teacher is not None:
        check_teacher(teacher, ["token_logprobs"], alignments, student_logits.shape[0], "sft")
        token_logprobs = teacher.token_logprobs
    kl = _per_token_kl(
        flat, token_logprobs, sums.get("aligned_student", 0.0), compute_dtype(student_logits)
    )
    return loss, finish_metrics(
        batch_metrics(flat, token_logprobs), loss=loss, kl=kl, supervised_tokens=student_tokens
    )


def mean_token_nll(
    student_logits: Tensor | StudentHidden, target_ids: Tensor, *, slice_size: int = 256
) -> Tensor:
    """Mean negative log-likelihood of ``target_ids``: ``F.cross_entropy`` with
    ``ignore_index`` for every negative id, one slice of rows at a time.

    Args:
        student_logits: float ``[B, m, V]`` logits or the same as hidden states and output layer
            (:class:`~ctopd.objectives.student_head.StudentHidden`; no ``[B, m, V]`` tensor is
            then made).
        target_ids: int ``[B, m]``; row ``i`` of the logits predicts ``target_ids[:, i]``;
            negative ids (``-100``) carry no loss.
        slice_size: rows projected at once.

    Returns:
        A 0-dim tensor (float32, or float64 for float64 inputs) connected to the student's
        tensors; NaN when no id is supervised, as ``F.cross_entropy`` gives.
    """
    check_options(slice_size=slice_size)
    if tuple(target_ids.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(
            f"target_ids has shape {tuple(target_ids.shape)} but the student's logits have "
            f"{tuple(student_logits.shape)}"
        )
    batch, pos = torch.nonzero(target_ids >= 0, as_tuple=True)
    ids = target_ids[batch, pos]
    if ids.numel() and int(ids.max()) >= student_logits.shape[-1]:
        raise ValueError(f"target_ids holds an id >= {student_logits.shape[-1]} (the vocabulary)")
    slices = [
        RowSlice(
            batch[start : start + slice_size],
            pos[start : start + slice_size],
            ids[start : start + slice_size],
            torch.arange(min(slice_size, len(ids) - start), device=ids.device),
            start,
            min(start + slice_size, len(ids)),
        )
        for start in range(0, len(ids), slice_size)
    ]

    def slice_loss(rows: Tensor, row_slice: RowSlice):
        _, logprobs = row_scores(rows, row_slice.ids)
        return -logprobs.sum(), {}

    scale = 1.0 / len(ids) if len(ids) else float("nan")
    return sliced_loss(student_logits, slices, slice_loss, {}, scale=scale)


def _sft_slice(aligned: Tensor, rows: Tensor, row_slice: RowSlice):
    _, logprobs = row_scores(rows, row_slice.ids)
    in_aligned = aligned[row_slice.k0 : row_slice.k1][row_slice.chunk]
    return -logprobs.sum(), {"aligned_student": logprobs.detach()[in_aligned].sum()}


def _per_token_kl(
    flat, teacher_token_logprobs: Tensor | None, student_sum: float, dtype: torch.dtype
) -> float:
    """``(sum log π(s) - sum log q(t)) / student tokens`` over aligned chunks; 0.0 without a
    teacher."""
    usable = np.flatnonzero(flat.usable)
    tokens = int(flat.student_sizes[usable].sum())
    if teacher_token_logprobs is None or tokens == 0:
        return 0.0
    teacher_sum = range_sums(
        teacher_token_logprobs.detach().to(dtype),
        flat.batch[usable],
        flat.teacher_start[usable],
        flat.teacher_end[usable],
    ).sum()
    return (student_sum - float(teacher_sum)) / tokens


@dataclass(frozen=True)
class _UldSetup:
    plan: ChunkPlan
    teacher_topk: Tensor  # [B, n, k_T]
    top_k: int
    one_to_one: Tensor  # bool [K]


def uld(
    *,
    student_logits: Tensor | StudentHidden,
    student_ids: Tensor,
    alignments: list[Alignment],
    shared_vocab: SharedVocab | None,
    teacher: TeacherOutputs | None,
    student_old_logprobs: Tensor | None = None,
    top_k: int | None = None,
    slice_size: int = 256,
) -> tuple[Tensor, dict[str, float]]:
    """Sorted-probability L1 distance at the first position of every aligned chunk.

    Args:
        student_logits: float ``[B, m, V_S]``, dense or a
            :class:`~ctopd.objectives.student_head.StudentHidden`.
        student_ids: int ``[B, m]``.
        alignments: ``B`` alignments.
        shared_vocab, student_old_logprobs: not used.
        teacher: needs ``token_logprobs`` and ``topk_probs`` ``[B, n, k_T]``.
        top_k: probabilities compared per position (default ``k_T``; capped at ``V_S``).
        slice_size: student rows processed at once.

    Returns:
        ``(loss, metrics)``; ``kl`` is the per-token estimate over aligned 1:1 chunks.

    Raises:
        ValueError: ``top_k`` exceeds what the teacher provided.
    """
    check_options(top_k=top_k, slice_size=slice_size)
    check_student(student_logits, student_ids, alignments)
    check_teacher(
        teacher, ["token_logprobs", "topk_probs"], alignments, student_logits.shape[0], "uld"
    )
    provided = teacher.topk_probs.shape[-1]
    k = provided if top_k is None else top_k
    if k > provided:
        raise ValueError(
            f"uld top_k={k} but teacher.topk_probs holds only {provided} "
            "probabilities per position; raise teacher_outputs(top_k=...)"
        )
    flat = flatten_chunks(alignments, student_ids, None)
    plan = build_plan(flat, flat.usable, student_ids, all_tokens=False, slice_size=slice_size)
    setup = _UldSetup(
        plan=plan,
        teacher_topk=teacher.topk_probs.detach().to(student_logits.device),
        top_k=min(k, student_logits.shape[-1]),
        one_to_one=torch.as_tensor(flat.one_to_one[plan.index], device=student_logits.device),
    )
    sums: dict[str, float] = {}
    loss = sliced_loss(
        student_logits,
        plan.slices,
        lambda rows, sl: _uld_slice(setup, rows, sl),
        sums,
        scale=1.0 / max(int(flat.student_lengths.sum()), 1),
    )
    one_to_one = int(flat.one_to_one.sum())
    device = teacher.token_logprobs.device
    teacher_sum = float(
        teacher.token_logprobs[
            torch.as_tensor(flat.batch[flat.one_to_one], device=device),
            torch.as_tensor(flat.teacher_start[flat.one_to_one], device=device),
        ].sum()
    )
    kl = (sums.get("one_to_one_student", 0.0) - teacher_sum) / one_to_one if one_to_one else 0.0
    return loss, finish_metrics(
        batch_metrics(flat, teacher.token_logprobs),
        loss=loss,
        kl=kl,
        supervised_tokens=plan.index.size,
    )


def _uld_slice(setup: _UldSetup, rows: Tensor, row_slice: RowSlice):
    k0, k1 = row_slice.k0, row_slice.k1
    probs = torch.softmax(rows, dim=-1)
    student_top = probs.topk(setup.top_k, dim=-1).values
    teacher_top = setup.teacher_topk[setup.plan.batch[k0:k1], setup.plan.teacher_start[k0:k1]]
    teacher_top = teacher_top[:, : setup.top_k].to(rows.dtype)
    loss = (student_top - teacher_top).abs().sum()
    with torch.no_grad():  # for the kl metric only
        first = rows.detach()[setup.one_to_one[k0:k1]]
        ids = row_slice.ids[setup.one_to_one[k0:k1]]
        student = (first.gather(1, ids[:, None])[:, 0] - torch.logsumexp(first, dim=-1)).sum()
    return loss, {"one_to_one_student": student}
