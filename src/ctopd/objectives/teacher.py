"""What the teacher provides to the objectives, computed under no-grad, slice by slice.

**The contract.** An objective names the teacher fields it needs (``teacher_needs``); the loop
sends them with the batch as a :class:`TeacherRequest`, and a teacher answers with a
:class:`TeacherOutputs` holding exactly those fields as small tensors: realised-token
log-probabilities ``[B, n]``, text-event scores ``[K, C' + width]``, class log-probabilities
``[B, n, C]``, top-k probabilities ``[B, n, k]``. No ``[B, n, V_T]`` tensor of the teacher's
scores exists for the whole sequence. ``full_logprobs`` (``opd``) is the full distribution by
definition: the in-process teacher hands it back as :class:`TeacherLogprobRows` (final hidden
states and the output layer; rows made only where the objective reads them), a served teacher
as a dense tensor. The reduction runs one ``[slice, V_T]`` block of logits at a time
(:func:`reduce_teacher`), wherever the teacher computes them: an in-process teacher from its
final hidden states and output layer, a served one from the sparse top-k reply
(:mod:`ctopd.objectives.sparse_rows`). Nothing of the teacher's forward outlives the reduction, so
nothing of it is alive during the student's backward.

:func:`teacher_outputs` does the same from dense ``[B, n, V]`` logits: the reference the sliced
teachers are tested against, and the entry point for code that already holds logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from ctopd.core.alignment import Alignment
from ctopd.core.shared_vocab import SharedVocab
from ctopd.objectives.checks import real_id_columns
from ctopd.objectives.classes import ClassMembers, class_logprobs, class_members
from ctopd.objectives.plan import flatten_chunks
from ctopd.objectives.sparse_rows import SparseRows
from ctopd.objectives.student_head import StudentHead
from ctopd.objectives.text_events import (
    EventPlan,
    TextTables,
    build_event_plan,
    chunk_slices,
    event_scores,
    side_rows_in,
)

TEACHER_FIELDS = frozenset(
    {"token_logprobs", "class_logprobs", "full_logprobs", "topk_probs", "text_events"}
)


@dataclass
class TeacherTextEvents:
    """The teacher's side of the text-event space (``simct``/``shared_only`` with
    ``space="text"``) for every usable chunk of the batch.

    Attributes:
        plan: the events of the batch's usable chunks (:func:`build_event_plan`).
        scores: float ``[K, C' + plan.width]``: the teacher's log-probability of each cell and
            event of each planned chunk (:func:`event_scores`).
        teacher_ids: int64 ``[B, n]`` response ids the plan was built from (``-1`` padding).
        tables: the pair's tables.
    """

    plan: EventPlan
    scores: Tensor
    teacher_ids: np.ndarray
    tables: TextTables


@dataclass
class TeacherOutputs:
    """The teacher's side of an objective, without gradient.

    Attributes:
        token_logprobs: float ``[B, n]``: ``log q(t_j | prefix)`` of the realised teacher tokens
            (positions beyond each ``alignment.teacher_length`` are ignored).
        class_logprobs: float ``[B, n, C]``: ``log q(class | prefix)`` over the ``SharedVocab``
            classes at each teacher response position (``C = shared_vocab.size``, end class
            last). Needed by ``simct`` and ``shared_only``.
        full_logprobs: float ``[B, n, V_T]``: the full log-softmax; only for ``opd``. A dense
            tensor, or :class:`TeacherLogprobRows` (the in-process teacher) that makes the rows
            it is indexed at.
        topk_probs: float ``[B, n, k]``: the teacher's largest probabilities, sorted
            descending; only for ``uld``.
        text_events: the teacher's text-event scores; for ``simct`` and ``shared_only`` with
            ``space="text"``.
    """

    token_logprobs: Tensor
    class_logprobs: Tensor | None = None
    full_logprobs: Tensor | TeacherLogprobRows | None = None
    topk_probs: Tensor | None = None
    text_events: TeacherTextEvents | None = None


@dataclass(frozen=True)
class TeacherLogprobRows:
    """The teacher's full log-softmax ``[B, n, V_T]`` without making it: its final hidden states
    and output layer; indexing makes just the rows asked for.

    ``self[batch_index, position_index]`` is
    ``log_softmax(head(hidden[batch_index, position_index]).to(dtype) / temperature)``, with
    rows at padding positions (``valid`` false) 0, exactly as the dense ``full_logprobs`` of
    :func:`reduce_teacher` reads. ``shape``, ``dtype`` and ``device`` describe that dense tensor.

    Attributes:
        hidden: float ``[B, n, H]``: the teacher's final hidden states, detached (no gradient).
        head: its output layer (columns past ``V_T`` never projected; soft cap applied).
        valid: bool ``[B, n]``: response positions (``False``: padding, rows read 0).
        temperature: the scores are divided by it before the softmax.
        out_dtype: the rows' dtype (float32, float64 for a float64 teacher).
    """

    hidden: Tensor
    head: StudentHead
    valid: Tensor
    temperature: float = 1.0
    out_dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.head.columns))

    @property
    def dtype(self) -> torch.dtype:
        return self.out_dtype

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def dim(self) -> int:
        return 3

    def detach(self) -> TeacherLogprobRows:
        return self  # the hidden states carry no gradient

    def to(self, target: torch.device | str | torch.dtype) -> TeacherLogprobRows:
        """The same rows on another device (hidden states and output layer moved) or, given a
        float dtype, made in that dtype."""
        if isinstance(target, torch.dtype):
            return replace(self, out_dtype=target)
        device = torch.device(target)
        if device == self.device:
            return self
        head = self.head
        bias = None if head.bias is None else head.bias.to(device)
        return replace(
            self,
            hidden=self.hidden.to(device),
            head=replace(head, weight=head.weight.to(device), bias=bias),
            valid=self.valid.to(device),
        )

    def float(self) -> TeacherLogprobRows:
        return self.to(torch.float32)

    def double(self) -> TeacherLogprobRows:
        return self.to(torch.float64)

    def __getitem__(self, index) -> Tensor:
        """Rows ``[..., V_T]`` at an index of the first two dimensions (anything a ``[B, n]``
        tensor accepts: ``(batch_index, position_index)`` int64 ``[S]`` tensors, a bool
        ``[B, n]`` mask, ints, slices), optionally followed by an int or slice of the vocabulary
        dimension. Only those rows are projected."""
        vocab_index = slice(None)
        if isinstance(index, tuple) and len(index) == 3:
            index, vocab_index = index[:2], index[2]
            if not isinstance(vocab_index, (int, slice)):
                raise IndexError("TeacherLogprobRows: the vocabulary index must be an int or slice")
        elif isinstance(index, tuple) and len(index) > 3:
            raise IndexError(f"TeacherLogprobRows has 3 dimensions, got {len(index)} indices")
        with torch.no_grad():
            logits = self.head(self.hidden[index]).to(self.out_dtype)
            rows = torch.log_softmax(logits / self.temperature, -1)
            rows = torch.where(self.valid[index][..., None], rows, rows.new_zeros(()))
        return rows[..., vocab_index]

    def dense(self) -> Tensor:
        """The full ``[B, n, V_T]`` tensor (the reference path; memory grows with ``n * V_T``)."""
        return self[:, :]


@dataclass(frozen=True)
class TeacherRequest:
    """What the objective needs from the teacher for one batch (the loop builds it at step 3).

    Attributes:
        needs: the fields to compute, a subset of :data:`TEACHER_FIELDS`
            (``teacher_needs(name, ...)``).
        shared_vocab: the pair's shared vocabulary (``V_T`` is
            ``len(shared_vocab.teacher_id_to_class)``; class columns).
        temperature: the teacher's scores are divided by it before every softmax.
        slice_size: positions reduced at once (memory: one ``[slice_size, V_T]`` block).
        top_k: probabilities kept for ``topk_probs``.
        alignments, student_ids, text_tables: the batch's alignments, the student's response
            ids (``[B, m]`` tensor or ``B`` lists) and the pair's tables; needed for
            ``text_events``.
    """

    needs: frozenset[str]
    shared_vocab: SharedVocab
    temperature: float = 1.0
    slice_size: int = 256
    top_k: int = 256
    alignments: list[Alignment] | None = None
    student_ids: Tensor | list | None = field(default=None, repr=False)
    text_tables: TextTables | None = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        """``V_T``: the teacher tokenizer's id count."""
        return len(self.shared_vocab.teacher_id_to_class)


# Logit rows of the teacher, given flat (batch, position) int64 [S] indices: float [S, V_T]
# (real ids only, before the temperature), or a SparseRows (a served top-k reply).
RowSource = Callable[[Tensor, Tensor], Tensor | SparseRows]


def reduce_teacher(
    rows_of: RowSource,
    teacher_ids: Tensor,
    request: TeacherRequest,
    *,
    dtype: torch.dtype = torch.float32,
) -> TeacherOutputs:
    """The fields ``request.needs`` asks for, reading the teacher's scores one slice of
    positions at a time (never all of them at once).

    Every response position (``teacher_ids >= 0``) is read exactly once: first the positions of
    the text-event plan's chunks in plan order (their slices also give the realised tokens'
    log-probs), then every other position, ``request.slice_size`` at a time.

    Args:
        rows_of: the teacher's scores at given positions (:data:`RowSource`).
        teacher_ids: int64 ``[B, n]``; negative ids are padding (log-prob 0, not read).
        request: what to compute.
        dtype: float32, or float64 for a float64 teacher.

    Returns:
        The :class:`TeacherOutputs`; fields not in ``request.needs`` are ``None``, padding
        positions of the per-position fields read 0.

    Raises:
        ValueError: an unknown field, an id ``>= V_T``, bad options or missing text-event
            inputs.
    """
    needs = frozenset(request.needs)
    vocab = request.vocab_size
    _check_request(teacher_ids, request, vocab)
    batch, length = teacher_ids.shape
    device = teacher_ids.device
    members = None
    if "class_logprobs" in needs:
        members = class_members(request.shared_vocab.teacher_member_ids, device)
    out = TeacherOutputs(token_logprobs=torch.zeros(batch, length, dtype=dtype, device=device))
    if members is not None:
        out.class_logprobs = torch.zeros(batch, length, members.size, dtype=dtype, device=device)
    if "full_logprobs" in needs:
        out.full_logprobs = torch.zeros(batch, length, vocab, dtype=dtype, device=device)
    if "topk_probs" in needs:
        k = min(request.top_k, vocab)
        out.topk_probs = torch.zeros(batch, length, k, dtype=dtype, device=device)
    valid = teacher_ids >= 0
    done = torch.zeros_like(valid)
    dense_fields = needs & {"class_logprobs", "full_logprobs", "topk_probs"}
    with torch.no_grad():
        if "text_events" in needs:
            events, tokens, where = _sliced_text_events(rows_of, teacher_ids, request, dtype)
            out.text_events = events
            out.token_logprobs[where] = tokens.to(dtype)
            done[where] = True
            if dense_fields:  # never with the built-in objectives: read those rows again
                done[where] = False
        todo_batch, todo_pos = (valid & ~done).nonzero(as_tuple=True)
        for lo in range(0, todo_batch.numel(), request.slice_size):
            b = todo_batch[lo : lo + request.slice_size]
            p = todo_pos[lo : lo + request.slice_size]
            rows = rows_of(b, p)
            if isinstance(rows, SparseRows):
                rows.fill_outputs(out, b, p, teacher_ids[b, p], members, request.temperature)
                continue
            logp = torch.log_softmax(rows.to(dtype) / request.temperature, -1)
            _fill_rows(out, logp, teacher_ids[b, p], members, (b, p))
    return out


def _sliced_text_events(
    rows_of: RowSource, teacher_ids: Tensor, request: TeacherRequest, dtype: torch.dtype
) -> tuple[TeacherTextEvents, Tensor, tuple[Tensor, Tensor]]:
    """The text events, slice by slice of the plan's teacher rows; also the realised tokens'
    log-probs at those rows and where they are (``(batch, pos)`` int64 ``[R]``)."""
    plan, teacher, tables = _event_plan(teacher_ids, request)
    device = teacher_ids.device
    width = tables.cell_index.size + plan.width
    scores = torch.empty(plan.num_chunks, width, dtype=dtype, device=device)
    rows = plan.teacher
    batch = torch.as_tensor(rows.batch, device=device)
    pos = torch.as_tensor(rows.pos, device=device)
    tokens = torch.empty(batch.numel(), dtype=torch.float64, device=device)
    # Each row holds a cumulative sum over the vocabulary: smaller slices than the rest.
    for k0, k1 in chunk_slices(rows, plan.num_chunks, max(1, request.slice_size // 4)):
        r0, r1 = side_rows_in(rows, k0, k1)
        logits = rows_of(batch[r0:r1], pos[r0:r1])
        if isinstance(logits, Tensor):
            logits = logits.to(dtype)
            if request.temperature != 1.0:  # x / 1 == x: skip a dense pass
                logits = logits / request.temperature
        else:
            logits = logits.with_temperature(request.temperature)
        scores[k0:k1], tokens[r0:r1] = event_scores(
            logits, plan, "teacher", tables, k0, k1, with_token_logprobs=True
        )
    events = TeacherTextEvents(plan=plan, scores=scores, teacher_ids=teacher, tables=tables)
    return events, tokens, (batch, pos)


def _event_plan(teacher_ids: Tensor, request: TeacherRequest):
    """The batch's :class:`EventPlan` (the teacher's view), its teacher ids and tables."""
    if request.alignments is None or request.student_ids is None or request.text_tables is None:
        raise ValueError(
            "the teacher's text_events need alignments, student_ids and "
            "text_tables (ctopd.objectives.text_events.text_tables(pair...))"
        )
    tables = request.text_tables
    if tables.shared_vocab is not request.shared_vocab:
        raise ValueError("text_tables were built for another shared vocabulary")
    student = padded_ids(request.student_ids)
    teacher = teacher_ids.detach().cpu().numpy().astype(np.int64)
    flat = flatten_chunks(
        request.alignments, torch.as_tensor(np.maximum(student, 0)), request.shared_vocab
    )
    plan = build_event_plan(
        flat, flat.usable, np.maximum(teacher, 0), np.maximum(student, 0), tables
    )
    return plan, teacher, tables


def _fill_rows(
    out: TeacherOutputs,
    logp: Tensor,
    ids: Tensor,
    members: ClassMembers | None,
    where: tuple[Tensor, Tensor],
) -> None:
    """Write one slice of rows (log-softmax ``[S, V_T]``, at ``where``) into the outputs."""
    out.token_logprobs[where] = logp.gather(-1, ids.clamp(min=0).long()[:, None])[:, 0]
    if out.class_logprobs is not None:
        out.class_logprobs[where] = class_logprobs(logp, members)
    if out.full_logprobs is not None:
        out.full_logprobs[where] = logp
    if out.topk_probs is not None:
        out.topk_probs[where] = logp.topk(out.topk_probs.shape[-1], dim=-1).values.exp()


def _check_request(teacher_ids: Tensor, request: TeacherRequest, vocab: int) -> None:
    unknown = set(request.needs) - TEACHER_FIELDS
    if unknown:
        raise ValueError(
            f"unknown teacher field(s) {sorted(unknown)}; valid: {sorted(TEACHER_FIELDS)}"
        )
    if teacher_ids.dim() != 2 or teacher_ids.is_floating_point():
        raise ValueError(
            f"teacher_ids must be an integer [B, n] tensor, got {tuple(teacher_ids.shape)} "
            f"{teacher_ids.dtype}"
        )
    if teacher_ids.numel() and int(teacher_ids.max()) >= vocab:
        raise ValueError(
            f"teacher id {int(teacher_ids.max())} is out of range for the teacher tokenizer's "
            f"{vocab} ids"
        )
    if not request.temperature > 0 or request.slice_size < 1 or request.top_k < 1:
        raise ValueError(
            f"need temperature > 0, slice_size >= 1 and top_k >= 1; got {request.temperature}, "
            f"{request.slice_size}, {request.top_k}"
        )


def teacher_outputs(
    teacher_logits: Tensor,
    teacher_ids: Tensor,
    shared_vocab: SharedVocab,
    needs: frozenset[str],
    *,
    temperature: float = 1.0,
    slice_size: int = 256,
    top_k: int = 256,
    alignments: list[Alignment] | None = None,
    student_ids: Tensor | list | None = None,
    text_tables: TextTables | None = None,
) -> TeacherOutputs:
    """Compute the fields named in ``needs`` from the teacher's logits.

    ``token_logprobs`` is always computed (it is cheap and feeds the metrics). Runs under
    ``torch.no_grad`` over slices of ``slice_size`` positions of one sequence, so at most one
    ``[slice_size, V_T]`` log-softmax is alive.

    Args:
        teacher_logits: float ``[B, n, V]``; row ``j`` predicts ``teacher_ids[:, j]``. Any
            dtype; results are float32 (float64 when the logits are float64). Columns past the
            teacher tokenizer's ids ``V_T`` (``len(shared_vocab.teacher_id_to_class)``; a padded
            embedding matrix has ``V > V_T`` rows) are dropped first: every softmax here is
            over the real ids, and ``full_logprobs`` has ``V_T`` columns.
        teacher_ids: int ``[B, n]``; negative ids are padding and get log-prob 0.
        shared_vocab: the pair's shared vocabulary (for ``class_logprobs``).
        needs: a subset of ``{"token_logprobs", "class_logprobs", "full_logprobs",
            "topk_probs"}``, e.g. ``TEACHER_NEEDS[name]``.
        temperature: the teacher's logits are divided by it before the softmax. The objectives
            have their own ``temperature`` (applied to both sides' scores); use one of the two.
        slice_size: positions per slice.
        top_k: number of probabilities kept for ``topk_probs`` (capped at ``V_T``).
        alignments, student_ids, text_tables: the batch's alignments, the student's response
            ids (``[B, m]`` tensor or ``B`` lists) and the pair's tables
            (:func:`~ctopd.objectives.text_events.text_tables`); needed for ``text_events``.

    Returns:
        The :class:`TeacherOutputs`, fields not in ``needs`` left ``None``.

    Raises:
        ValueError: unknown field in ``needs``, mismatched shapes, an id ``>= V_T``, or a
            shared vocabulary whose teacher ids do not fit ``V_T``.
    """
    teacher_logits = real_id_columns(teacher_logits, len(shared_vocab.teacher_id_to_class))
    _check_teacher_args(teacher_logits, teacher_ids, needs, temperature, slice_size, top_k)
    batch, length, vocab = teacher_logits.shape
    dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    device = teacher_logits.device
    members = None
    if "class_logprobs" in needs:
        members = class_members(shared_vocab.teacher_member_ids, device)
        if members.max_id >= vocab:
            raise ValueError(
                f"the shared vocabulary uses teacher id {members.max_id} but teacher_logits has "
                f"only {vocab} columns; was the pair built from another teacher tokenizer?"
            )
    out = TeacherOutputs(token_logprobs=torch.zeros(batch, length, dtype=dtype, device=device))
    if members is not None:
        out.class_logprobs = torch.empty(batch, length, members.size, dtype=dtype, device=device)
    if "full_logprobs" in needs:
        out.full_logprobs = torch.empty(batch, length, vocab, dtype=dtype, device=device)
    if "topk_probs" in needs:
        out.topk_probs = torch.empty(batch, length, min(top_k, vocab), dtype=dtype, device=device)
    with torch.no_grad():
        for b in range(batch):
            for lo in range(0, length, slice_size):
                hi = min(lo + slice_size, length)
                logp = torch.log_softmax(teacher_logits[b, lo:hi].to(dtype) / temperature, -1)
                _fill_slice(out, logp, teacher_ids[b, lo:hi], members, b, slice(lo, hi))
        if "text_events" in needs:
            out.text_events = _text_events(
                teacher_logits,
                teacher_ids,
                shared_vocab,
                dtype,
                temperature,
                slice_size,
                alignments,
                student_ids,
                text_tables,
            )
    return out


def _text_events(
    teacher_logits: Tensor,
    teacher_ids: Tensor,
    shared_vocab: SharedVocab,
    dtype: torch.dtype,
    temperature: float,
    slice_size: int,
    alignments: list[Alignment] | None,
    student_ids,
    text_tables: TextTables | None,
) -> TeacherTextEvents:
    """Score the text events of every usable chunk with the teacher (no grad)."""
    if alignments is None or student_ids is None or text_tables is None:
        raise ValueError(
            "the teacher's text_events need alignments, student_ids and "
            "text_tables (ctopd.objectives.text_events.text_tables(pair...))"
        )
    if text_tables.shared_vocab is not shared_vocab:
        raise ValueError("text_tables were built for another shared vocabulary")
    student = padded_ids(student_ids)
    teacher = teacher_ids.detach().cpu().numpy().astype(np.int64)
    flat = flatten_chunks(alignments, torch.as_tensor(np.maximum(student, 0)), shared_vocab)
    plan = build_event_plan(
        flat, flat.usable, np.maximum(teacher, 0), np.maximum(student, 0), text_tables
    )
    width = text_tables.cell_index.size + plan.width
    scores = torch.empty(plan.num_chunks, width, dtype=dtype, device=teacher_logits.device)
    # Each row holds a cumulative sum over the vocabulary in float64: smaller slices.
    for k0, k1 in chunk_slices(plan.teacher, plan.num_chunks, max(1, slice_size // 4)):
        r0, r1 = side_rows_in(plan.teacher, k0, k1)
        device = teacher_logits.device
        rows = teacher_logits[
            torch.as_tensor(plan.teacher.batch[r0:r1], device=device),
            torch.as_tensor(plan.teacher.pos[r0:r1], device=device),
        ]
        rows = rows.to(dtype)
        if temperature != 1.0:  # x / 1 == x: skip a dense pass
            rows = rows / temperature
        scores[k0:k1] = event_scores(rows, plan, "teacher", text_tables, k0, k1)
    return TeacherTextEvents(plan=plan, scores=scores, teacher_ids=teacher, tables=text_tables)


def padded_ids(ids: Tensor | list) -> np.ndarray:
    """int64 ``[B, m]`` numpy ids from a tensor or from ``B`` lists (``-1`` padding)."""
    if isinstance(ids, Tensor):
        return ids.detach().cpu().numpy().astype(np.int64)
    rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in ids]
    out = np.full((len(rows), max((r.size for r in rows), default=0)), -1, dtype=np.int64)
    for b, row in enumerate(rows):
        out[b, : row.size] = row
    return out


def _fill_slice(
    out: TeacherOutputs,
    logp: Tensor,
    ids: Tensor,
    members: ClassMembers | None,
    b: int,
    span: slice,
) -> None:
    """Write one slice's results into the preallocated outputs."""
    padding = ids < 0
    picked = logp.gather(-1, ids.clamp(min=0).long()[:, None])[:, 0]
    out.token_logprobs[b, span] = picked.masked_fill(padding, 0.0)
    if out.class_logprobs is not None:
        out.class_logprobs[b, span] = class_logprobs(logp, members)
    if out.full_logprobs is not None:
        out.full_logprobs[b, span] = logp
    if out.topk_probs is not None:
        out.topk_probs[b, span] = logp.topk(out.topk_probs.shape[-1], dim=-1).values.exp()


def _check_teacher_args(
    teacher_logits: Tensor,
    teacher_ids: Tensor,
    needs: frozenset[str],
    temperature: float,
    slice_size: int,
    top_k: int,
) -> None:
    unknown = set(needs) - TEACHER_FIELDS
    if unknown:
        raise ValueError(
            f"unknown teacher field(s) {sorted(unknown)}; valid: {sorted(TEACHER_FIELDS)}"
        )
    if teacher_logits.dim() != 3 or not teacher_logits.is_floating_point():
        raise ValueError(
            f"teacher_logits must be a float [B, n, V_T] tensor, got {tuple(teacher_logits.shape)} "
            f"{teacher_logits.dtype}"
        )
    if tuple(teacher_ids.shape) != tuple(teacher_logits.shape[:2]):
        raise ValueError(
            f"teacher_ids has shape {tuple(teacher_ids.shape)} but teacher_logits has "
            f"{tuple(teacher_logits.shape)}; row j of the logits must predict teacher_ids[:, j]"
        )
    if teacher_ids.numel() and int(teacher_ids.max()) >= teacher_logits.shape[-1]:
        raise ValueError(
            f"teacher id {int(teacher_ids.max())} is out of range for "
            f"{teacher_logits.shape[-1]} teacher logit columns"
        )
    if not temperature > 0 or slice_size < 1 or top_k < 1:
        raise ValueError(
            f"need temperature > 0, slice_size >= 1 and top_k >= 1; got {temperature}, "
            f"{slice_size}, {top_k}"
        )
