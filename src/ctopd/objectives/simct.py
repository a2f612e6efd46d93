"""SimCT and its two special cases, shared-vocabulary-only OPD and same-tokenizer OPD
(docs/concepts/simct.md, docs/concepts/baselines.md).

For each kept chunk ``k`` the teacher's distribution at its first position ``a_k`` and the
student's at ``c_k`` are compared over the supervision space ``Ω_k``:

* ``Ω_k = V∩ ∪ {u_k}`` when the chunk has a *unit* column ``u_k`` (its bytes), scored by the
  mean log-probability of the unit's own tokens on each side;
* ``Ω_k = V∩`` otherwise.

Scores ``ℓ`` are log-probabilities (class log-sum-exp over member ids), ``P_k = softmax(ℓ / τ)``
over ``Ω_k``, and the loss is ``sum_k w_k D(P_S,k || P_T,k) / (student response tokens)`` with the
teacher side constant. ``w_k = 1``, or the chunk's student token count with
``weight_by_tokens``. The student's gradient flows through its first-position distribution and,
for unit chunks, through every token of the unit.

Which chunks are kept and which get a unit column:

* ``simct``: every aligned chunk. Multi-token chunks get the unit column; so does a 1:1 chunk
  whose student token is not a shared class (odd tokenizers), so that its realised token is in
  ``Ω_k`` instead of being dropped.
* ``shared_only``: aligned 1:1 chunks whose student token is a shared class; no unit column.
* ``opd`` (identical tokenizers): aligned 1:1 chunks over the full vocabulary, the teacher's
  ``full_logprobs`` row against the student's full log-softmax. Pass the student's own ids as the
  teacher ids so that every chunk is 1:1.

When exactly one tokenizer adds a dummy-prefix space, the class labels of the two models'
first-position distributions do not match (``SharedVocab.first_position_mislabelled``), so
``simct`` and ``shared_only`` leave each response's first chunk out: one chunk per response
gets no loss rather than a wrong target.

Choices written down here: a unit column is an extra entry even if its bytes happen to equal a
shared class (as in the paper); the unit and the class of the unit's first token overlap in
meaning, which the paper accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ctopd.core.alignment import Alignment
from ctopd.core.shared_vocab import SharedVocab
from ctopd.objectives.checks import check_options, check_student, check_teacher
from ctopd.objectives.classes import ClassMembers, class_members
from ctopd.objectives.divergences import divergence as divergence_of
from ctopd.objectives.metrics import batch_metrics, finish_metrics
from ctopd.objectives.omega import omega_divergence
from ctopd.objectives.plan import (
    ChunkPlan,
    FlatChunks,
    RowSlice,
    build_plan,
    flatten_chunks,
    range_sums,
    segment_sum,
)
from ctopd.objectives.scores import row_scores
from ctopd.objectives.sliced import compute_dtype, sliced_loss
from ctopd.objectives.student_head import StudentHidden
from ctopd.objectives.teacher import TeacherOutputs
from ctopd.objectives.text_events import (
    CELLS,
    build_event_plan,
    chunk_slices,
    event_scores,
    head_order,
    side_rows_in,
)


@dataclass(frozen=True)
class _DistributionSetup:
    """What the per-slice loss of a chunk-distribution objective reads."""

    plan: ChunkPlan
    teacher_rows: Tensor  # [B, n, C] teacher log-probs over the classes (or the full vocab)
    members: ClassMembers | None  # student class members; None = identity (full vocabulary)
    has_unit: Tensor | None  # bool [K]; None when no kept chunk has a unit column
    teacher_unit: Tensor | None  # [K] mean teacher log-prob of each unit
    weights: Tensor  # [K]
    kind: str
    beta: float
    temperature: float


def simct(
    *,
    student_logits: Tensor | StudentHidden,
    student_ids: Tensor,
    alignments: list[Alignment],
    shared_vocab: SharedVocab,
    teacher: TeacherOutputs | None,
    student_old_logprobs: Tensor | None = None,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    weight_by_tokens: bool = False,
    slice_size: int = 256,
    space: str = "text",
    cells: str = "none",
) -> tuple[Tensor, dict[str, float]]:
    """SimCT over every aligned chunk, in the supervision space ``space``.

    ``space="text"`` (default): the text events and cells of
    :mod:`ctopd.objectives.text_events`, which partition each model's probability into events
    that mean the same text to both (zero loss when the models agree on the text).
    ``space="paper"``: the paper's ``V∩`` plus one unit column per multi-token chunk, scored by
    the unit's mean log-probability (biased, docs/concepts/simct.md; kept for comparison).

    Args:
        student_logits: float ``[B, m, V_S]``, row ``i`` predicts ``student_ids[:, i]``; dense,
            or as hidden states and output layer (:class:`~ctopd.objectives.student_head.
            StudentHidden`, projected one slice of rows at a time; see ``compute_objective``).
        student_ids: int ``[B, m]``; padding beyond ``alignment.student_length`` is ignored.
        alignments: ``B`` alignments of the teacher's and the student's response tokens.
        shared_vocab: the pair's shared classes.
        teacher: needs ``token_logprobs`` and ``class_logprobs``.
        student_old_logprobs: unused (accepted so every objective takes the same arguments).
        divergence: ``"reverse_kl"`` (default), ``"forward_kl"``, ``"jsd"`` or ``"tv"``.
        beta: JSD mixture weight of the teacher.
        temperature: ``τ`` in ``softmax(ℓ / τ)``, both sides.
        weight_by_tokens: weight each chunk by its student token count.
        slice_size: student rows processed at once.
        space: ``"text"`` or ``"paper"`` (see above); ``"text"`` needs
            ``teacher.text_events``, ``"paper"`` ``teacher.class_logprobs``.
        cells: with ``space="text"``, which shared classes are whole-token cells at a chunk's
            first position (:func:`~ctopd.objectives.text_events.cell_eligible`): ``"none"``
            (default: only the end; chosen by the agreement invariant, see the module
            docstring), ``"boundary"`` or ``"all"``. Identical tokenizers always use every
            class. Must match the rule the teacher's ``text_events`` were built with.

    Returns:
        ``(loss, metrics)``: a 0-dim loss connected to ``student_logits`` and the metrics.
    """
    _check_space(space)
    if space == "text":
        flat = _prepare_text(
            student_logits,
            student_ids,
            alignments,
            shared_vocab,
            teacher,
            "simct",
            divergence,
            beta,
            temperature,
            weight_by_tokens,
            slice_size,
            cells,
        )
        return text_objective(
            student_logits,
            student_ids,
            flat,
            teacher,
            flat.usable,
            kind=divergence,
            beta=beta,
            temperature=temperature,
            weight_by_tokens=weight_by_tokens,
            slice_size=slice_size,
        )
    flat = _prepare(
        student_logits,
        student_ids,
        alignments,
        shared_vocab,
        teacher,
        "simct",
        divergence,
        beta,
        temperature,
        weight_by_tokens,
        slice_size,
    )
    keep = flat.usable & ~_mislabelled(flat, shared_vocab)
    unit = keep & ~flat.is_end & (~flat.one_to_one | (flat.student_class < 0))
    return _distribution_objective(
        student_logits,
        student_ids,
        flat,
        teacher,
        keep,
        unit,
        teacher.class_logprobs,
        class_members(shared_vocab.student_member_ids, student_logits.device),
        divergence,
        beta,
        temperature,
        weight_by_tokens,
        slice_size,
    )


def shared_only(
    *,
    student_logits: Tensor | StudentHidden,
    student_ids: Tensor,
    alignments: list[Alignment],
    shared_vocab: SharedVocab,
    teacher: TeacherOutputs | None,
    student_old_logprobs: Tensor | None = None,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    weight_by_tokens: bool = False,
    slice_size: int = 256,
    space: str = "text",
    cells: str = "none",
) -> tuple[Tensor, dict[str, float]]:
    """Shared-vocabulary-only OPD: aligned 1:1 chunks whose token is a shared class; every
    other position is discarded. With ``space="text"`` (default) those chunks are compared over
    the same text events and cells as :func:`simct` (so a shared class is compared only where
    it means the same text to both models); with ``space="paper"`` over ``V∩`` renormalised.
    Arguments and returns as :func:`simct`."""
    _check_space(space)
    if space == "text":
        flat = _prepare_text(
            student_logits,
            student_ids,
            alignments,
            shared_vocab,
            teacher,
            "shared_only",
            divergence,
            beta,
            temperature,
            weight_by_tokens,
            slice_size,
            cells,
        )
        keep = flat.one_to_one & (flat.student_class >= 0)
        return text_objective(
            student_logits,
            student_ids,
            flat,
            teacher,
            keep,
            kind=divergence,
            beta=beta,
            temperature=temperature,
            weight_by_tokens=weight_by_tokens,
            slice_size=slice_size,
        )
    flat = _prepare(
        student_logits,
        student_ids,
        alignments,
        shared_vocab,
        teacher,
        "shared_only",
        divergence,
        beta,
        temperature,
        weight_by_tokens,
        slice_size,
    )
    keep = flat.one_to_one & (flat.student_class >= 0) & ~_mislabelled(flat, shared_vocab)
    return _distribution_objective(
        student_logits,
        student_ids,
        flat,
        teacher,
        keep,
        np.zeros_like(keep),
        teacher.class_logprobs,
        class_members(shared_vocab.student_member_ids, student_logits.device),
        divergence,
        beta,
        temperature,
        weight_by_tokens,
        slice_size,
    )


def opd(
    *,
    student_logits: Tensor | StudentHidden,
    student_ids: Tensor,
    alignments: list[Alignment],
    shared_vocab: SharedVocab | None,
    teacher: TeacherOutputs | None,
    student_old_logprobs: Tensor | None = None,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    slice_size: int = 256,
) -> tuple[Tensor, dict[str, float]]:
    """Same-tokenizer OPD: full-vocabulary divergence at every aligned 1:1 chunk.

    Needs ``teacher.full_logprobs`` ``[B, n, V]`` with the student's vocabulary size ``V``: a
    dense tensor or :class:`~ctopd.objectives.teacher.TeacherLogprobRows` (rows made one slice
    at a time, never ``[B, n, V]``).
    Other arguments as :func:`simct`; ``shared_vocab`` is not used.

    Raises:
        ValueError: the teacher's vocabulary size differs from the student's.
    """
    flat = _prepare(
        student_logits,
        student_ids,
        alignments,
        None,
        teacher,
        "opd",
        divergence,
        beta,
        temperature,
        False,
        slice_size,
    )
    teacher_vocab, student_vocab = teacher.full_logprobs.shape[-1], student_logits.shape[-1]
    if teacher_vocab != student_vocab:
        raise ValueError(
            f"opd needs identical tokenizers, but teacher.full_logprobs has {teacher_vocab} "
            f"columns and student_logits {student_vocab}; use simct or shared_only"
        )
    keep = flat.one_to_one
    return _distribution_objective(
        student_logits,
        student_ids,
        flat,
        teacher,
        keep,
        np.zeros_like(keep),
        teacher.full_logprobs,
        None,
        divergence,
        beta,
        temperature,
        False,
        slice_size,
    )


SPACES = ("text", "paper")


def _check_space(space: str) -> None:
    if space not in SPACES:
        raise ValueError(f"unknown supervision space {space!r}; valid: {', '.join(SPACES)}")


def _prepare_text(
    student_logits,
    student_ids,
    alignments,
    shared_vocab,
    teacher,
    name,
    kind,
    beta,
    temperature,
    weight_by_tokens,
    slice_size,
    cells,
) -> FlatChunks:
    """Validate the arguments of a text-event objective and flatten the chunks."""
    check_options(
        divergence=kind,
        beta=beta,
        temperature=temperature,
        weight_by_tokens=weight_by_tokens,
        slice_size=slice_size,
    )
    check_student(student_logits, student_ids, alignments)
    check_teacher(teacher, ["token_logprobs"], alignments, student_logits.shape[0], name)
    events = teacher.text_events
    if events is None:
        raise ValueError(
            f"objective {name!r} with space='text' needs teacher.text_events; compute it with "
            f"teacher_outputs(..., needs=teacher_needs({name!r}), alignments=..., "
            "student_ids=..., text_tables=...)"
        )
    if not torch.isfinite(events.scores).all():
        raise ValueError("teacher.text_events.scores holds NaN or inf")
    if events.tables.shared_vocab is not shared_vocab:
        raise ValueError(f"{name}: teacher.text_events were built for another shared vocabulary")
    if cells not in CELLS:
        raise ValueError(f"unknown cells rule {cells!r}; valid: {', '.join(CELLS)}")
    if events.tables.cells != cells and not events.tables.identical:
        raise ValueError(
            f"{name}: cells={cells!r} but the teacher's text_events were built with "
            f"cells={events.tables.cells!r}; build text_tables(..., cells={cells!r})"
        )
    largest = int(shared_vocab.student_member_ids.max())
    if largest >= student_logits.shape[-1]:
        raise ValueError(
            f"the shared vocabulary uses student id {largest} but student_logits has only "
            f"{student_logits.shape[-1]} columns; was the pair built from another student "
            "tokenizer?"
        )
    return flatten_chunks(alignments, student_ids, shared_vocab)


def _mislabelled(flat: FlatChunks, shared_vocab: SharedVocab) -> np.ndarray:
    """bool ``[K]``: chunks whose first-position distributions carry mismatched class labels
    (see ``SharedVocab.first_position_mislabelled``); they get no loss."""
    if shared_vocab.first_position_mislabelled:
        return flat.first_in_response
    return np.zeros_like(flat.is_end)


def _prepare(
    student_logits,
    student_ids,
    alignments,
    shared_vocab,
    teacher,
    name,
    kind,
    beta,
    temperature,
    weight_by_tokens,
    slice_size,
) -> FlatChunks:
    """Validate the arguments and flatten the chunks."""
    check_options(
        divergence=kind,
        beta=beta,
        temperature=temperature,
        weight_by_tokens=weight_by_tokens,
        slice_size=slice_size,
    )
    check_student(student_logits, student_ids, alignments)
    field = "full_logprobs" if name == "opd" else "class_logprobs"
    check_teacher(teacher, ["token_logprobs", field], alignments, student_logits.shape[0], name)
    if shared_vocab is not None:
        _check_shared_vocab(shared_vocab, teacher.class_logprobs, student_logits.shape[-1])
    return flatten_chunks(alignments, student_ids, shared_vocab)


def _check_shared_vocab(shared_vocab: SharedVocab, teacher_classes: Tensor, vocab: int) -> None:
    if teacher_classes.shape[-1] != shared_vocab.size:
        raise ValueError(
            f"teacher.class_logprobs has {teacher_classes.shape[-1]} classes but the shared "
            f"vocabulary has {shared_vocab.size}; compute it with the same SharedVocab"
        )
    largest = int(shared_vocab.student_member_ids.max())
    if largest >= vocab:
        raise ValueError(
            f"the shared vocabulary uses student id {largest} but student_logits has only "
            f"{vocab} columns; was the pair built from another student tokenizer?"
        )


def _distribution_objective(
    student_logits,
    student_ids,
    flat,
    teacher,
    keep,
    unit,
    teacher_rows,
    members,
    kind,
    beta,
    temperature,
    weight_by_tokens,
    slice_size,
) -> tuple[Tensor, dict[str, float]]:
    """Shared body of simct / shared_only / opd once the chunks are chosen."""
    plan = build_plan(flat, keep, student_ids, all_tokens=bool(unit.any()), slice_size=slice_size)
    device, dtype = student_logits.device, compute_dtype(student_logits)
    has_unit = teacher_unit = None
    if unit[plan.index].any():
        kept = plan.index
        has_unit = torch.as_tensor(unit[kept], device=device)
        sums = range_sums(
            teacher.token_logprobs.detach().to(device, dtype),
            flat.batch[kept],
            flat.teacher_start[kept],
            flat.teacher_end[kept],
        )
        teacher_unit = sums / torch.as_tensor(flat.teacher_sizes[kept], device=device)
    sizes = plan.student_sizes.to(dtype)
    setup = _DistributionSetup(
        plan=plan,
        teacher_rows=teacher_rows.detach().to(device),
        members=members,
        has_unit=has_unit,
        teacher_unit=teacher_unit,
        weights=sizes if weight_by_tokens else torch.ones_like(sizes),
        kind=kind,
        beta=beta,
        temperature=temperature,
    )
    sums: dict[str, float] = {}
    student_tokens = int(flat.student_lengths.sum())
    loss = sliced_loss(
        student_logits,
        plan.slices,
        lambda rows, sl: _slice_loss(setup, rows, sl),
        sums,
        scale=1.0 / max(student_tokens, 1),
    )
    kept_chunks = plan.index.size
    return loss, finish_metrics(
        batch_metrics(flat, teacher.token_logprobs),
        loss=loss,
        kl=sums.get("kl", 0.0) / kept_chunks if kept_chunks else 0.0,
        supervised_tokens=int(flat.student_sizes[plan.index].sum()),
        chunks_supervised=kept_chunks,
    )


def _slice_loss(
    setup: _DistributionSetup, rows: Tensor, row_slice: RowSlice
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted divergence summed over one slice's chunks; rows ``[S, V_S]``."""
    k0, k1, count = row_slice.k0, row_slice.k1, row_slice.num_chunks
    student_scores, token_logprobs = row_scores(rows, row_slice.ids, count, setup.members)
    plan = setup.plan
    teacher_scores = setup.teacher_rows[plan.batch[k0:k1], plan.teacher_start[k0:k1]]
    teacher_scores = teacher_scores.to(student_scores.dtype)
    student_unit = teacher_unit = has_unit = None
    if setup.has_unit is not None:
        counts = plan.student_sizes[k0:k1].to(rows.dtype)
        student_unit = segment_sum(token_logprobs, row_slice.chunk, count) / counts
        teacher_unit, has_unit = setup.teacher_unit[k0:k1], setup.has_unit[k0:k1]
    per_chunk, kl = omega_divergence(
        student_scores,
        teacher_scores,
        student_unit,
        teacher_unit,
        has_unit,
        kind=setup.kind,
        beta=setup.beta,
        temperature=setup.temperature,
    )
    return (per_chunk * setup.weights[k0:k1]).sum(), {"kl": kl.sum()}


def text_objective(
    student_logits: Tensor | StudentHidden,
    student_ids: Tensor,
    flat: FlatChunks,
    teacher: TeacherOutputs,
    keep: np.ndarray,
    *,
    kind: str,
    beta: float,
    temperature: float,
    weight_by_tokens: bool,
    slice_size: int,
) -> tuple[Tensor, dict[str, float]]:
    """``Σ_k w_k D(P_S,k ‖ P_T,k) / (student response tokens)`` over the text events and cells
    of the kept chunks (:mod:`ctopd.objectives.text_events`); ``P = softmax(log P / τ)``."""
    events = teacher.text_events
    tables = events.tables
    device, dtype = student_logits.device, compute_dtype(student_logits)
    student = student_ids.detach().cpu().numpy().astype(np.int64)
    plan = build_event_plan(flat, keep, np.maximum(events.teacher_ids, 0), student, tables)
    at = np.searchsorted(events.plan.index, plan.index)
    if plan.num_chunks and (
        at.max() >= events.plan.index.size or not np.array_equal(events.plan.index[at], plan.index)
    ):
        raise ValueError("teacher.text_events were computed for other alignments")
    columns = tables.cell_index.size + plan.width
    teacher_scores = events.scores[torch.as_tensor(at, device=events.scores.device)]
    teacher_scores = teacher_scores[:, :columns].to(device, dtype)
    sizes = torch.as_tensor(flat.student_sizes[plan.index], device=device, dtype=dtype)
    weights = sizes if weight_by_tokens else torch.ones_like(sizes)
    rows = plan.student
    slices = []
    for k0, k1 in chunk_slices(rows, plan.num_chunks, max(1, slice_size // 2)):
        r0, r1 = side_rows_in(rows, k0, k1)
        batch = torch.as_tensor(rows.batch[r0:r1], device=device)
        pos = torch.as_tensor(rows.pos[r0:r1], device=device)
        slices.append(
            RowSlice(
                batch=batch,
                pos=pos,
                ids=torch.as_tensor(rows.ids[r0:r1]),
                chunk=torch.as_tensor(rows.chunk[r0:r1] - k0),
                k0=k0,
                k1=k1,
            )
        )

    # From hidden states, the head's rows are put in byte order once (sliced_loss's
    # column_order), so that no slice gathers its [S, V] rows into that order and back.
    column_order = positions = None
    width = student_logits.shape[-1]
    if isinstance(student_logits, StudentHidden) and width == tables.student.table.vocab_size:
        order, positions = head_order(tables, width)
        column_order = torch.as_tensor(order)

    def slice_loss(logit_rows: Tensor, row_slice: RowSlice):
        k0, k1 = row_slice.k0, row_slice.k1
        scores = event_scores(logit_rows, plan, "student", tables, k0, k1, positions=positions)
        teacher_part = teacher_scores[k0:k1]
        student_logp = torch.log_softmax(scores / temperature, dim=-1)
        teacher_logp = torch.log_softmax(teacher_part / temperature, dim=-1)
        per_chunk = divergence_of(student_logp, teacher_logp, kind=kind, beta=beta)
        with torch.no_grad():
            kl = divergence_of(student_logp, teacher_logp, kind="reverse_kl")
        return (per_chunk * weights[k0:k1]).sum(), {"kl": kl.sum()}

    sums: dict[str, float] = {}
    student_tokens = int(flat.student_lengths.sum())
    loss = sliced_loss(
        student_logits,
        slices,
        slice_loss,
        sums,
        scale=1.0 / max(student_tokens, 1),
        column_order=column_order,
    )
    kept = plan.num_chunks
    return loss, finish_metrics(
        batch_metrics(flat, teacher.token_logprobs),
        loss=loss,
        kl=sums.get("kl", 0.0) / kept if kept else 0.0,
        supervised_tokens=int(flat.student_sizes[plan.index].sum()),
        chunks_supervised=kept,
    )
