"""The exact SimCT supervision space: text events that mean the same thing to both models
(docs/concepts/simct.md).

For an aligned chunk with bytes ``U`` (``n`` bytes) each model ``X`` has realised tokens
``x_1..x_r`` at byte offsets ``o_1 = 0 < … < o_r`` and, at each of those positions, its full
next-token distribution. Every token ``v`` that model ``X`` could have written at position ``j``
instead is mapped to the *text* it implies, relative to ``U``:

* ``E_U`` — the text continues with all of ``U`` (``v``'s bytes start with ``U[o_j:]``; the
  path itself, ``x_1..x_r``, is in it);
* ``E_m`` — the text follows ``U`` up to byte ``m`` and then leaves it (``v``'s bytes share
  ``m - o_j`` bytes with ``U[o_j:]`` and then differ), ends there (the end token, ``m = o_j``),
  or stops inside ``U`` off the path (``v`` is a proper prefix of ``U[o_j:]``, counted at its
  end byte: right when the tokenizer would have merged further had the text gone on with ``U``,
  the measured choice of docs/concepts/simct.md);
* at the chunk's first position only, a *cell* per shared class ``c`` whose bytes are not a
  prefix of ``U`` and share fewer than ``L`` bytes with it, ``L`` the length of the shortest
  first token of a multi-token side (no limit when both sides are one token): "the text starts
  with ``c``'s bytes (and not with a longer shared class)". A token belongs to the cell of its
  *owner*, the longest shared class that is a prefix of its bytes, so a digit-splitting model's
  ``2`` and a digit-grouping model's ``2``, ``25``, ``250`` all land in the cell ``2``: both
  models then give the probability of the same text. The limit ``L`` keeps every text that a
  multi-token side can reach through its own path tokens out of the cells. The end class is
  always a cell.

Scored by the **joint** probability, ``P_X(E_U) = Σ_j P_X(x_<j) Σ_{v starts with U[o_j:]} p_X(v)``
and likewise for ``E_m`` (off-path mass at each position, weighted by the path prefix), these
events and cells *partition* each model's probability, so two models that give every text the
same probability give the same event distribution: zero loss, zero gradient, whatever their
tokenizers (up to the look-ahead residual of docs/concepts/simct.md, the invariant). With identical tokenizers every chunk is
1:1, every other token is its own cell, and the space is the token-level distribution: the
objective is plain OPD.

Remaining approximations (written down, measured by the invariant tests): a model's
distribution is conditioned on its canonical token prefix, not on the text prefix (a prefix that
ends in a standalone token excludes continuations its tokenizer would have merged); off-path
branches that stop inside ``U`` are assumed to leave ``U`` at their end; cells are whole-token
events at the chunk's first position (a shared class a multi-token side reaches only through a
later path position counts in ``E_m``, not in its cell); special tokens other than the end are
counted as leaving at their position.

Cost: every grouping is a range of a vocabulary sorted by bytes (``ctopd.core.prefix_table``),
read off one cumulative sum per row (float64, so small events stay exact); the cells are one
``index_add`` of each chunk's first-position probabilities by owner. Both, and the realised
tokens' log-probabilities, come from one ``softmax_sums`` call
(:mod:`ctopd.objectives.softmax_sums`), whose hand-written backward makes five dense passes in
the logits' dtype where autograd made a dozen, most of them in float64; the rest works on
``[Q]`` and ``[K, width]`` tensors. No per-chunk Python loop: the plan is built with numpy over
the whole batch, the scores slice by slice.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor

from ctopd.core.byte_table import ByteTable
from ctopd.core.prefix_table import (
    SortedClasses,
    SortedVocab,
    build_sorted_classes,
    build_sorted_vocab,
    escape_flat,
    window_keys,
)
from ctopd.core.shared_vocab import SharedVocab
from ctopd.objectives.divergences import ABSENT
from ctopd.objectives.plan import FlatChunks, expand_ranges
from ctopd.objectives.softmax_sums import SortedRanges, TokenGroups, softmax_sums, sorted_ranges
from ctopd.objectives.sparse_rows import SparseRows, sparse_softmax_sums

# Events with less probability than this are read as this (both sides): their share of the
# divergence is below float precision, and log(0) must not reach a gradient.
EVENT_FLOOR = 1e-30
_NO_LIMIT = np.iinfo(np.int64).max // 4


@dataclass(frozen=True)
class SideTables:
    """One model's sorted vocabularies: everywhere, and at the first response position."""

    table: ByteTable
    sorted: SortedVocab
    first: SortedVocab  # == sorted unless the tokenizer adds a dummy-prefix space


@dataclass(frozen=True)
class TextTables:
    """A pair's tables for the text-event space (built once per pair, see :func:`text_tables`)."""

    shared_vocab: SharedVocab
    teacher: SideTables
    student: SideTables
    classes: SortedClasses
    cell_classes: np.ndarray  # bool [C]: classes that may be cells (the end class always)
    cells: str  # the rule that chose them (cell_eligible)
    identical: bool  # identical tokenizers: every class is a cell whatever the rule

    # Only the classes that may be cells get a column (C' of them, the end class last): with
    # cells="none" that is the end class alone, and no [K, C] buffer is ever built.
    @property
    def cell_index(self) -> np.ndarray:
        """int64 ``[C']``: the classes that may be cells, ascending (their columns)."""
        return self._cell_columns()[0]

    @property
    def cell_column(self) -> np.ndarray:
        """int64 ``[C + 1]``: each class's column, ``C'`` for classes that are never cells and
        for the ``C``-th entry (tokens owned by no class)."""
        return self._cell_columns()[1]

    @property
    def cell_order(self) -> np.ndarray:
        """int64 ``[C' - 1]``: the columns of the non-end cell classes, by class bytes."""
        return self._cell_columns()[2]

    @property
    def cell_ranks(self) -> np.ndarray:
        """int64 ``[C' - 1]``: the sorted-class rank of each entry of :attr:`cell_order`
        (ascending)."""
        return self._cell_columns()[3]

    def _cell_columns(self):
        cached = self.__dict__.get("_columns")
        if cached is None:
            index = np.flatnonzero(self.cell_classes).astype(np.int64)
            column = np.full(self.cell_classes.size + 1, index.size, dtype=np.int64)
            column[index] = np.arange(index.size)
            rank = self.classes.rank[index]
            by_rank = np.argsort(np.where(rank < 0, np.iinfo(np.int64).max, rank), kind="stable")
            by_rank = by_rank[rank[by_rank] >= 0]
            cached = (index, column, by_rank.astype(np.int64), rank[by_rank].astype(np.int64))
            object.__setattr__(self, "_columns", cached)
        return cached


CELLS = ("all", "boundary", "none")
_CACHE: dict[tuple[int, str], tuple[weakref.ref, TextTables]] = {}


def _forget(cache: dict, key: tuple[int, str], _ref: weakref.ref) -> None:
    cache.pop(key, None)


def cell_eligible(shared_vocab: SharedVocab, cells: str) -> np.ndarray:
    """bool ``[C]``: the classes that may be cells under the rule ``cells``.

    ``"all"``: every class; ``"boundary"``: classes whose first byte is ASCII and neither a
    letter nor a digit (a space, a newline, punctuation), which start a new pre-token in
    either tokenizer, so neither model's context excludes them; ``"none"``: only the end class.
    """
    if cells not in CELLS:
        raise ValueError(f"unknown cell rule {cells!r}; valid: {', '.join(CELLS)}")
    out = np.zeros(shared_vocab.size, dtype=bool)
    out[shared_vocab.end_class] = True
    if cells == "all":
        out[:] = True
    elif cells == "boundary":
        for c, data in enumerate(shared_vocab.class_bytes[:-1]):
            out[c] = data[:1].isascii() and not data[:1].isalnum()
    return out


def text_tables(
    teacher: ByteTable, student: ByteTable, shared_vocab: SharedVocab, *, cells: str = "none"
) -> TextTables:
    """The pair's :class:`TextTables`, cached for as long as ``shared_vocab`` lives.

    Args:
        teacher, student: the two byte tables.
        shared_vocab: their shared classes.
        cells: which shared classes may be whole-token cells (:func:`cell_eligible`); with
            identical tokenizers every class may (both contexts exclude the same
            continuations), which makes the space token-level OPD.
    """
    identical = (
        teacher.vocab_size == student.vocab_size
        and np.array_equal(teacher.lengths, student.lengths)
        and np.array_equal(teacher.flat_bytes, student.flat_bytes)
        and np.array_equal(teacher.special, student.special)
        and teacher.dummy_prefix == student.dummy_prefix
    )
    key = (id(shared_vocab), cells)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is shared_vocab:
        return hit[1]
    sides = []
    for table in (teacher, student):
        everywhere = build_sorted_vocab(table, shared_vocab)
        first = (
            build_sorted_vocab(table, shared_vocab, strip_space=True)
            if table.dummy_prefix
            else everywhere
        )
        sides.append(SideTables(table=table, sorted=everywhere, first=first))
    tables = TextTables(
        shared_vocab=shared_vocab,
        teacher=sides[0],
        student=sides[1],
        classes=build_sorted_classes(shared_vocab),
        cell_classes=cell_eligible(shared_vocab, "all" if identical else cells),
        cells=cells,
        identical=identical,
    )
    # The callback holds the dict itself: at interpreter exit the module's globals may already
    # be None when the last SharedVocab is collected.
    _CACHE[key] = (weakref.ref(shared_vocab, partial(_forget, _CACHE, key)), tables)
    return tables


@dataclass(frozen=True)
class SideRows:
    """One side's on-path rows of the planned chunks, in chunk order (numpy).

    Attributes:
        chunk: int64 ``[R]``: planned chunk of each row.
        batch, pos: int64 ``[R]``: where the row sits in that side's ``[B, n]`` arrays.
        ids: int64 ``[R]``: the realised token.
        offset, next_offset: int64 ``[R]``: byte offset of the token in its chunk, and of the
            next one (``n`` for the last).
        first_table: bool ``[R]``: read with the first-position table (dummy prefix).
        query_row, query_length, query_lo, query_hi: int64 ``[Q]``: for every row and every
            ``l = 1..n - offset``, the sorted-vocabulary range of tokens that start with the
            chunk's bytes ``[offset, offset + l)``.
    """

    chunk: np.ndarray
    batch: np.ndarray
    pos: np.ndarray
    ids: np.ndarray
    offset: np.ndarray
    next_offset: np.ndarray
    first_table: np.ndarray
    query_row: np.ndarray
    query_length: np.ndarray
    query_lo: np.ndarray
    query_hi: np.ndarray
    row_start: np.ndarray  # int64 [K + 1]: the rows of chunk k are row_start[k]:row_start[k+1]


@dataclass(frozen=True)
class EventPlan:
    """Everything both sides need to score the planned chunks' events (numpy).

    Attributes:
        index: int64 ``[K]``: planned chunks, as rows of the batch's :class:`FlatChunks`.
        size: int64 ``[K]``: chunk bytes ``n`` (0 for the end chunk).
        limit: int64 ``[K]``: ``L``; cells share fewer than ``L`` bytes with ``U``.
        width: events per chunk, ``1 + max n`` (column 0 is ``E_U``, column ``1 + m`` is
            ``E_m``).
        class_chunk, class_length, class_lo, class_hi, class_exact: int64 ``[Qc]``: for every
            chunk and ``l = 0..n``, the sorted-class range of classes that start with ``U[:l]``
            and the class equal to ``U[:l]`` (``-1`` if none, always for ``l = 0``).
        noncell_lo, noncell_hi: int64 ``[K]``: sorted-class ranks that are not cells (classes
            starting with ``U[:L]``; empty when ``L > n``).
        prefix_chunk, prefix_class: int64 ``[P]``: classes equal to ``U[:l]`` for ``l < L``
            (not cells either).
        teacher, student: each side's rows.
    """

    index: np.ndarray
    size: np.ndarray
    limit: np.ndarray
    width: int
    class_chunk: np.ndarray
    class_length: np.ndarray
    class_lo: np.ndarray
    class_hi: np.ndarray
    class_exact: np.ndarray
    noncell_lo: np.ndarray
    noncell_hi: np.ndarray
    prefix_chunk: np.ndarray
    prefix_class: np.ndarray
    teacher: SideRows
    student: SideRows

    @property
    def num_chunks(self) -> int:
        return int(self.index.shape[0])


def context_lengths(table: ByteTable, ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """int64: byte length of each token where it stands: a dummy-prefix tokenizer's first
    response token loses its leading space (the aligner's rule, docs/concepts/alignment.md)."""
    lengths = table.lengths[ids].copy()
    lengths[table.special[ids]] = 0
    if table.dummy_prefix:
        first = (pos == 0) & (lengths > 0)
        first_byte = table.flat_bytes[np.minimum(table.starts[ids], table.flat_bytes.size - 1)]
        lengths[first & (first_byte == 0x20)] -= 1
    return lengths


def build_event_plan(
    flat: FlatChunks,
    keep: np.ndarray,
    teacher_ids: np.ndarray,
    student_ids: np.ndarray,
    tables: TextTables,
) -> EventPlan:
    """Plan the text events of the kept chunks of a batch.

    Args:
        flat: the batch's chunks.
        keep: bool ``[K_all]``: chunks to plan; each must be usable (aligned, tokens on both
            sides).
        teacher_ids, student_ids: int64 ``[B, n]`` / ``[B, m]`` response ids (padding anywhere
            beyond each response).
        tables: the pair's :class:`TextTables`.
    """
    index = np.flatnonzero(keep)
    batch = flat.batch[index]
    sides = {}
    for name, ids, start, end, side_tables in (
        (
            "teacher",
            teacher_ids,
            flat.teacher_start[index],
            flat.teacher_end[index],
            tables.teacher,
        ),
        (
            "student",
            student_ids,
            flat.student_start[index],
            flat.student_end[index],
            tables.student,
        ),
    ):
        owner, pos = expand_ranges(start, end)
        row_ids = ids[batch[owner], pos].astype(np.int64)
        lengths = context_lengths(side_tables.table, row_ids, pos)
        sides[name] = (owner, pos, row_ids, lengths, start, end)
    owner_t, pos_t, ids_t, len_t, start_t, _ = sides["teacher"]
    size = np.bincount(owner_t, weights=len_t, minlength=index.size).astype(np.int64)
    # The chunk's bytes, from the teacher's tokens (aligned chunks spell the same bytes).
    table_t = tables.teacher.table
    token_start = table_t.starts[ids_t] + (table_t.lengths[ids_t] - len_t) * ~table_t.special[ids_t]
    _, byte_index = expand_ranges(token_start, token_start + len_t)
    chunk_bytes = table_t.flat_bytes[byte_index]
    escaped, offsets = escape_flat(chunk_bytes)
    byte_start = np.cumsum(size) - size
    limit = np.full(index.size, _NO_LIMIT, dtype=np.int64)
    rows = {}
    for name in ("teacher", "student"):
        owner, pos, row_ids, lengths, start, end = sides[name]
        row_start = np.concatenate([[0], np.cumsum(end - start)])
        within = np.cumsum(lengths) - lengths
        offset = within - within[row_start[:-1]][owner]
        multi = (end - start) > 1
        first_length = lengths[row_start[:-1][multi]]
        limit[multi] = np.minimum(limit[multi], first_length)
        rows[name] = (owner, pos, row_ids, offset, row_start)
    classes = tables.classes
    # Class queries: U[:l] for l = 0..n.
    class_chunk, class_length = expand_ranges(np.zeros_like(size), size + 1)
    starts = byte_start[class_chunk]
    keys = window_keys(escaped, offsets, starts, starts + class_length, end_marker=False)
    upper = window_keys(escaped, offsets, starts, starts + class_length, end_marker=True)
    class_lo, class_hi = classes.ranges(keys, upper)
    class_exact = classes.exact(keys)
    class_exact[class_length == 0] = -1
    # Not cells: classes starting with U[:L] (when L <= n), and classes equal to U[:l], l < L.
    at_limit = class_length == np.minimum(limit, size + 1)[class_chunk]
    noncell_lo = np.zeros(index.size, dtype=np.int64)
    noncell_hi = np.zeros(index.size, dtype=np.int64)
    noncell_lo[class_chunk[at_limit]] = class_lo[at_limit]
    noncell_hi[class_chunk[at_limit]] = class_hi[at_limit]
    is_prefix = (class_exact >= 0) & (class_length < limit[class_chunk])
    side_rows = {}
    for name, side_tables in (("teacher", tables.teacher), ("student", tables.student)):
        owner, pos, row_ids, offset, row_start = rows[name]
        last = np.zeros(owner.size, dtype=bool)
        last[row_start[1:][row_start[1:] > row_start[:-1]] - 1] = True
        next_offset = np.where(last, size[owner], np.roll(offset, -1))
        first_table = (pos == 0) & side_tables.table.dummy_prefix
        query_row, query_length = expand_ranges(np.ones_like(offset), size[owner] - offset + 1)
        q_start = byte_start[owner[query_row]] + offset[query_row]
        q_keys = window_keys(escaped, offsets, q_start, q_start + query_length, end_marker=False)
        q_upper = window_keys(escaped, offsets, q_start, q_start + query_length, end_marker=True)
        lo, hi = side_tables.sorted.ranges(q_keys, q_upper)
        in_first = first_table[query_row]
        if in_first.any():
            lo_f, hi_f = side_tables.first.ranges(q_keys[in_first], q_upper[in_first])
            lo[in_first], hi[in_first] = lo_f, hi_f
        side_rows[name] = SideRows(
            chunk=owner,
            batch=batch[owner],
            pos=pos,
            ids=row_ids,
            offset=offset,
            next_offset=next_offset,
            first_table=first_table,
            query_row=query_row,
            query_length=query_length,
            query_lo=lo,
            query_hi=hi,
            row_start=row_start,
        )
    return EventPlan(
        index=index,
        size=size,
        limit=limit,
        width=1 + int(size.max(initial=0)),
        class_chunk=class_chunk,
        class_length=class_length,
        class_lo=class_lo,
        class_hi=class_hi,
        class_exact=class_exact,
        noncell_lo=noncell_lo,
        noncell_hi=noncell_hi,
        prefix_chunk=class_chunk[is_prefix],
        prefix_class=class_exact[is_prefix],
        teacher=side_rows["teacher"],
        student=side_rows["student"],
    )


def chunk_slices(rows: SideRows, num_chunks: int, slice_size: int) -> list[tuple[int, int]]:
    """Chunk ranges ``[k0, k1)`` of about ``slice_size`` rows of ``rows`` each (a chunk is never
    split)."""
    counts = np.diff(rows.row_start)
    slice_of = (np.cumsum(counts) - counts) // max(slice_size, 1)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(slice_of)) + 1, [num_chunks]])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def side_rows_in(rows: SideRows, k0: int, k1: int) -> tuple[int, int]:
    """The row range ``[r0, r1)`` of chunks ``[k0, k1)``."""
    return int(rows.row_start[k0]), int(rows.row_start[k1])


def event_scores(
    logits: Tensor | SparseRows,
    plan: EventPlan,
    side: str,
    tables: TextTables,
    k0: int,
    k1: int,
    *,
    with_token_logprobs: bool = False,
    positions: np.ndarray | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probabilities of every cell and event of chunks ``[k0, k1)`` under one model.

    Args:
        logits: float ``[S, V]``: that model's logits at the rows of chunks ``[k0, k1)`` in plan
            order (``side_rows_in``); differentiable. Or those rows as
            :class:`~ctopd.objectives.sparse_rows.SparseRows` (a served teacher's top-k reply;
            no gradient, float64).
        plan: the batch's :class:`EventPlan`.
        side: ``"teacher"`` or ``"student"``.
        tables: the pair's :class:`TextTables`.
        k0, k1: the planned chunks of this slice.
        with_token_logprobs: also return the realised tokens' log-probabilities.
        positions: int64 ``[V]``: the column of ``logits`` that holds each token, when the
            columns are permuted (:func:`head_order`: a student head whose rows were put in
            byte order once, so that no slice permutes its rows); ``None``: column ``t`` is
            token ``t``.

    Returns:
        float ``[k1 - k0, C' + width]``: columns ``0..C'-1`` the classes that may be cells
        (``tables.cell_index``; :data:`ABSENT` where one is not a cell of that chunk), then
        ``E_U`` and
        ``E_0..E_{width-2}`` (:data:`ABSENT` beyond each chunk's bytes). Each row is a
        distribution (log-sum-exp 0 up to float error and the floor). With
        ``with_token_logprobs``, also the rows' realised-token log-probs ``[S]`` (the same
        softmax pass gives them).
    """
    rows = getattr(plan, side)
    side_tables: SideTables = getattr(tables, side)
    r0, r1 = side_rows_in(rows, k0, k1)
    device, dtype = logits.device, logits.dtype
    count, width = k1 - k0, plan.width

    def t(array):  # numpy slice -> tensor on the logits' device
        return torch.as_tensor(np.ascontiguousarray(array), device=device)

    chunk = t(rows.chunk[r0:r1] - k0)
    first_row = rows.row_start[k0:k1] - r0
    first_table = rows.first_table[r0:r1]
    q0, q1 = np.searchsorted(rows.query_row, [r0, r1])
    sums = sparse_softmax_sums if isinstance(logits, SparseRows) else softmax_sums
    if positions is not None and isinstance(logits, SparseRows):
        raise ValueError("event_scores: positions apply to dense logit rows only")
    ids = rows.ids[r0:r1] if positions is None else positions[rows.ids[r0:r1]]
    token_logp, masses, cells = sums(
        logits,
        t(ids),
        _sorted_ranges(
            rows, r0, r1, q0, q1, first_table, side_tables, logits.shape[1], device, positions
        ),
        int(q1 - q0),
        _cell_groups(first_table[first_row], side_tables, tables, first_row, device, positions),
        (count, tables.cell_index.size),
    )
    # Path prefix P(x_<j): exclusive cumulative sum of the realised log-probs within the chunk.
    inclusive = torch.cumsum(token_logp, 0)
    exclusive = inclusive - token_logp
    first_row_t = t(first_row)
    path_logp = exclusive - exclusive[first_row_t][chunk]
    weight = path_logp.exp()

    events = torch.zeros(count * width, dtype=torch.float64, device=device)
    q_row = rows.query_row[q0:q1] - r0
    q_len = rows.query_length[q0:q1]
    q_row_t = t(q_row)
    previous = torch.ones_like(masses)
    later = q_len > 1
    previous[t(np.flatnonzero(later))] = masses[t(np.flatnonzero(later) - 1)]
    w64 = weight.to(torch.float64)
    row_chunk = rows.chunk[r0:r1] - k0
    offset = rows.offset[r0:r1]
    target = row_chunk[q_row] * width + 1 + offset[q_row] + q_len - 1
    events.index_add_(0, t(target), w64[q_row_t] * (previous - masses))
    # E_U: the mass that starts with the whole remainder (1 when nothing remains).
    last_query = np.full(r1 - r0, -1, dtype=np.int64)
    last_query[q_row] = np.arange(q_row.size)
    full = torch.ones(r1 - r0, dtype=torch.float64, device=device)
    has = last_query >= 0
    full[t(np.flatnonzero(has))] = masses[t(last_query[has])]
    events.index_add_(0, t(row_chunk * width), w64 * full)
    # The path goes on: x_j's own mass is not an event.
    going_on = np.flatnonzero(_not_last(rows, r0, r1))
    if going_on.size:
        at = row_chunk[going_on] * width + 1 + rows.next_offset[r0:r1][going_on]
        events.index_add_(0, t(at), -(w64 * token_logp.to(torch.float64).exp())[t(going_on)])
    events = events.view(count, width)

    events = events - _cell_sums(cells, plan, tables, k0, k1, width)
    cell_scores = _cell_scores(cells, plan, tables, k0, k1)
    size = t(plan.size[k0:k1])
    columns = torch.arange(width, device=device)
    valid = columns[None, :] <= size[:, None]  # E_U and E_0..E_{n-1}
    event_scores_ = torch.where(
        valid, events.clamp(min=EVENT_FLOOR).log(), torch.full_like(events, ABSENT)
    )
    scores = torch.cat([cell_scores, event_scores_], dim=1).to(dtype)
    return (scores, token_logp) if with_token_logprobs else scores


def head_order(tables: TextTables, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """A column order for the student's logits in which the byte-sorted vocabulary is a prefix.

    Rows of an output layer put in this order once per call give logits whose first ``N``
    columns are already sorted by bytes, so the per-slice gathers into that order and back
    (two dense ``[S, V]`` passes each way) vanish (:func:`event_scores`' ``positions``).

    Args:
        tables: the pair's text tables (the student's everywhere-table is the order used).
        columns: the logits' width ``C`` (the tokenizer's ids, padded rows excluded).

    Returns:
        ``(order, positions)``: int64 ``[C]``: ``order[j]`` is the token at column ``j`` (the
        sorted tokens first, then the others ascending); ``positions`` its inverse.
    """
    sorted_ids = tables.student.sorted.order
    sorted_ids = sorted_ids[sorted_ids < columns]
    others = np.ones(columns, dtype=bool)
    others[sorted_ids] = False
    order = np.concatenate([sorted_ids, np.flatnonzero(others)]).astype(np.int64)
    positions = np.empty(columns, dtype=np.int64)
    positions[order] = np.arange(columns)
    return order, positions


def _not_last(rows: SideRows, r0: int, r1: int) -> np.ndarray:
    """bool ``[r1 - r0]``: rows followed by another row of their chunk."""
    chunk = rows.chunk[r0:r1]
    out = np.zeros(r1 - r0, dtype=bool)
    out[:-1] = chunk[1:] == chunk[:-1]
    return out


def _sorted_ranges(
    rows: SideRows,
    r0: int,
    r1: int,
    q0: int,
    q1: int,
    first_table: np.ndarray,
    side_tables: SideTables,
    vocab: int,
    device,
    positions: np.ndarray | None = None,
) -> list[SortedRanges]:
    """The range queries ``[q0, q1)`` of rows ``[r0, r1)``, one :class:`SortedRanges` per
    sorted vocabulary the rows are read with (``vocab`` logit columns, token ``t`` at column
    ``positions[t]``, or ``t`` without them)."""
    q_row = rows.query_row[q0:q1] - r0
    lo, hi = rows.query_lo[q0:q1], rows.query_hi[q0:q1]
    out = []
    for use_first in (False, True):
        table = side_tables.first if use_first else side_tables.sorted
        row_mask = first_table == use_first
        if not row_mask.any():
            continue
        queries = np.flatnonzero(row_mask[q_row])
        if not queries.size:
            continue
        if row_mask.all():
            chosen, local = None, q_row[queries]
        else:
            chosen = np.flatnonzero(row_mask)
            position = np.full(r1 - r0, -1, dtype=np.int64)
            position[chosen] = np.arange(chosen.size)
            local = position[q_row[queries]]
        order = table.order if positions is None else positions[table.order]
        out.append(
            sorted_ranges(chosen, order, vocab, queries, local, lo[queries], hi[queries], device)
        )
    return out


def _cell_groups(
    first_table: np.ndarray,
    side_tables: SideTables,
    tables: TextTables,
    first_row: np.ndarray,
    device,
    positions: np.ndarray | None = None,
) -> list[TokenGroups]:
    """The cells of ``K`` chunks as token groups: each chunk's first-position probability by
    owner class, for the classes that may be cells (``tables.cell_index``, the columns); only
    tokens owned by one are read.

    Args:
        first_table: bool ``[K]``: the chunk's first row is read with the first-position table.
        first_row: int64 ``[K]``: each chunk's first row in the slice.
        positions: int64 ``[V]``: the logit column of each token (``None``: the token's id).
    """
    columns = tables.cell_index.size
    classes = tables.shared_vocab.size
    out = []
    for use_first in (False, True):
        table = side_tables.first if use_first else side_tables.sorted
        chosen = np.flatnonzero(first_table == use_first)
        if not chosen.size:
            continue
        column = tables.cell_column[np.where(table.owner < 0, classes, table.owner)]
        tokens = np.flatnonzero(column < columns)
        if not tokens.size:
            continue
        out.append(
            TokenGroups(
                target=torch.as_tensor(chosen, device=device),
                rows=torch.as_tensor(first_row[chosen], device=device),
                tokens=torch.as_tensor(
                    tokens if positions is None else positions[tokens], device=device
                ),
                columns=torch.as_tensor(column[tokens], device=device),
            )
        )
    return out


def _cell_sums(
    cells: Tensor, plan: EventPlan, tables: TextTables, k0: int, k1: int, width: int
) -> Tensor:
    """float64 ``[K, width]``: the cells' mass by the event it is carved out of."""
    device = cells.device
    count = k1 - k0
    ordered = cells.index_select(1, torch.as_tensor(tables.cell_order, device=device))
    cumulative = torch.nn.functional.pad(torch.cumsum(ordered, 1), (1, 0))
    q0, q1 = np.searchsorted(plan.class_chunk, [k0, k1])
    chunk = plan.class_chunk[q0:q1] - k0
    length = plan.class_length[q0:q1]
    # Class-rank ranges as ranges over the cell columns sorted by rank.
    lo = np.searchsorted(tables.cell_ranks, plan.class_lo[q0:q1])
    hi = np.searchsorted(tables.cell_ranks, plan.class_hi[q0:q1])
    exact = plan.class_exact[q0:q1]
    exact = np.where(exact >= 0, tables.cell_column[np.maximum(exact, 0)], cells.shape[1])
    is_cell = exact < cells.shape[1]
    chunk_t = torch.as_tensor(chunk, device=device)
    starting = (
        cumulative[chunk_t, torch.as_tensor(hi, device=device)]
        - cumulative[chunk_t, torch.as_tensor(lo, device=device)]
    )
    equal = torch.where(
        torch.as_tensor(is_cell, device=device),
        cells[chunk_t, torch.as_tensor(np.where(is_cell, exact, 0), device=device)],
        torch.zeros_like(starting),
    )
    size = plan.size[k0:k1][chunk]
    limit = plan.limit[k0:k1][chunk]
    following = np.minimum(np.arange(chunk.size) + 1, chunk.size - 1)  # query l + 1
    deeper = torch.where(
        torch.as_tensor(length < size, device=device),
        starting[torch.as_tensor(following, device=device)],
        torch.zeros_like(starting),
    )
    carved = (starting - deeper - equal) * torch.as_tensor(length < limit, device=device)
    target = np.where(length < size, chunk * width + 1 + length, chunk * width)
    out = torch.zeros(count * width, dtype=torch.float64, device=device)
    out.index_add_(0, torch.as_tensor(target, device=device), carved)
    out = out.view(count, width)
    # The end class is the text ending at the chunk's start: E_0, or E_U for the end chunk.
    end_column = np.where(plan.size[k0:k1] > 0, 1, 0) + np.arange(count) * width
    end = int(tables.cell_column[tables.shared_vocab.end_class])
    out.view(-1).index_add_(0, torch.as_tensor(end_column, device=device), cells[:, end])
    return out


def _cell_scores(cells: Tensor, plan: EventPlan, tables: TextTables, k0: int, k1: int) -> Tensor:
    """float64 ``[K, C']``: log-probability of each cell, :data:`ABSENT` for non-cells."""
    device = cells.device
    rank = torch.as_tensor(tables.classes.rank[tables.cell_index], device=device)
    lo = torch.as_tensor(plan.noncell_lo[k0:k1], device=device)
    hi = torch.as_tensor(plan.noncell_hi[k0:k1], device=device)
    noncell = (rank[None, :] >= lo[:, None]) & (rank[None, :] < hi[:, None])
    p0, p1 = np.searchsorted(plan.prefix_chunk, [k0, k1])
    column = tables.cell_column[plan.prefix_class[p0:p1]]
    listed = column < cells.shape[1]
    if listed.any():
        noncell[
            torch.as_tensor(plan.prefix_chunk[p0:p1][listed] - k0, device=device),
            torch.as_tensor(column[listed], device=device),
        ] = True
    scores = cells.clamp(min=EVENT_FLOOR).log()
    return scores.masked_fill(noncell, ABSENT)
