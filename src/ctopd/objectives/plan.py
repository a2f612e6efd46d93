"""Index arrays that say which student rows each objective reads, built once per batch.

The chunks of all sequences are concatenated (:class:`FlatChunks`); an objective keeps some of
them, and :func:`build_plan` turns the kept chunks into :class:`RowSlice` objects: the student
positions to gather, grouped so that a chunk never straddles two slices (a unit's score needs all
of its tokens). Within a slice the chunks' first positions come first, so the first-position
rows are a view ``rows[:num_chunks]``. Only index arrays are built here (numpy, small Python
loops over sequences and slices); no logits are touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ctopd.core.alignment import Alignment
from ctopd.core.shared_vocab import SharedVocab


@dataclass(frozen=True)
class FlatChunks:
    """Every chunk of a batch, concatenated in order (numpy).

    Attributes:
        batch: int64 ``[K]``: sequence of each chunk.
        teacher_start, teacher_end, student_start, student_end: int64 ``[K]`` token ranges.
        aligned: bool ``[K]``: chunks that may carry loss.
        is_end: bool ``[K]``: the 1:1 end-of-turn chunks.
        student_class: int64 ``[K]``: ``SharedVocab`` class of the chunk's first student token
            (the end class for end chunks; ``-1`` when not shared or no student token).
        student_lengths, teacher_lengths: int64 ``[B]`` response lengths.
    """

    batch: np.ndarray
    teacher_start: np.ndarray
    teacher_end: np.ndarray
    student_start: np.ndarray
    student_end: np.ndarray
    aligned: np.ndarray
    is_end: np.ndarray
    student_class: np.ndarray
    student_lengths: np.ndarray
    teacher_lengths: np.ndarray

    @property
    def student_sizes(self) -> np.ndarray:
        return self.student_end - self.student_start

    @property
    def teacher_sizes(self) -> np.ndarray:
        return self.teacher_end - self.teacher_start

    @property
    def usable(self) -> np.ndarray:
        """bool ``[K]``: aligned chunks with at least one token on each side."""
        return self.aligned & (self.student_sizes > 0) & (self.teacher_sizes > 0)

    @property
    def first_in_response(self) -> np.ndarray:
        """bool ``[K]``: each response's first chunk, unless it is the end chunk."""
        return (self.student_start == 0) & (self.teacher_start == 0) & ~self.is_end

    @property
    def one_to_one(self) -> np.ndarray:
        """bool ``[K]``: aligned chunks with one token on each side."""
        return self.aligned & (self.student_sizes == 1) & (self.teacher_sizes == 1)


def flatten_chunks(
    alignments: list[Alignment], student_ids: Tensor, shared_vocab: SharedVocab | None
) -> FlatChunks:
    """Concatenate the chunks of ``B`` alignments.

    Args:
        alignments: ``B`` alignments.
        student_ids: int ``[B, m]`` student response ids.
        shared_vocab: gives ``student_class``; ``None`` leaves it ``-1``.
    """
    chunks = [np.asarray(a.chunks, dtype=np.int64).reshape(-1, 4) for a in alignments]
    counts = [c.shape[0] for c in chunks]
    flat = np.concatenate(chunks) if chunks else np.zeros((0, 4), np.int64)
    batch = np.repeat(np.arange(len(alignments), dtype=np.int64), counts)
    is_end = np.concatenate([np.asarray(a.is_end, bool) for a in alignments] or [np.zeros(0, bool)])
    student_class = np.full(flat.shape[0], -1, dtype=np.int64)
    has_token = flat[:, 3] > flat[:, 2]
    if shared_vocab is not None and has_token.any():
        ids = student_ids.detach().cpu().numpy()[batch[has_token], flat[has_token, 2]]
        student_class[has_token] = shared_vocab.student_id_to_class[ids]
        student_class[is_end] = shared_vocab.end_class
    return FlatChunks(
        batch=batch,
        teacher_start=flat[:, 0],
        teacher_end=flat[:, 1],
        student_start=flat[:, 2],
        student_end=flat[:, 3],
        aligned=np.concatenate(
            [np.asarray(a.aligned, bool) for a in alignments] or [np.zeros(0, bool)]
        ),
        is_end=is_end,
        student_class=student_class,
        student_lengths=np.asarray([a.student_length for a in alignments], dtype=np.int64),
        teacher_lengths=np.asarray([a.teacher_length for a in alignments], dtype=np.int64),
    )


def expand_ranges(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every index of the ranges ``[start_k, end_k)``, with its range number.

    Returns:
        ``(owner, index)``: int64 ``[sum(end - start)]`` each.
    """
    sizes = end - start
    owner = np.repeat(np.arange(start.shape[0], dtype=np.int64), sizes)
    first = np.cumsum(sizes) - sizes
    index = start[owner] + (np.arange(owner.shape[0], dtype=np.int64) - first[owner])
    return owner, index


def range_sums(values: Tensor, batch: np.ndarray, start: np.ndarray, end: np.ndarray) -> Tensor:
    """Sum of ``values[batch_k, start_k:end_k]`` for every range, without a Python loop.

    Args:
        values: float ``[B, n]``.
        batch, start, end: int64 ``[K]``.

    Returns:
        float ``[K]`` (differentiable with respect to ``values``).
    """
    owner, index = expand_ranges(start, end)
    device = values.device
    picked = values[
        torch.as_tensor(batch[owner], device=device), torch.as_tensor(index, device=device)
    ]
    sums = values.new_zeros(start.shape[0])
    return sums.index_add(0, torch.as_tensor(owner, device=device), picked)


def segment_sum(values: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """float ``[num_segments]``: sum of ``values`` ``[S]`` per ``segment`` id ``[S]``."""
    return values.new_zeros(num_segments).index_add(0, segment, values)


@dataclass(frozen=True)
class RowSlice:
    """Student rows gathered and processed together.

    Attributes:
        batch, pos: int64 ``[S]``: where each row sits in ``student_logits``; the first
            ``num_chunks`` rows are the chunks' first positions, in chunk order.
        ids: int64 ``[S]``: the realised student id of each row.
        chunk: int64 ``[S]``: the row's chunk, counted from ``k0``.
        k0, k1: the slice holds kept chunks ``[k0, k1)``.
    """

    batch: Tensor
    pos: Tensor
    ids: Tensor
    chunk: Tensor
    k0: int
    k1: int

    @property
    def num_chunks(self) -> int:
        return self.k1 - self.k0


@dataclass(frozen=True)
class ChunkPlan:
    """The kept chunks of a batch and the row slices that cover them.

    Attributes:
        index: int64 ``[K]``: each kept chunk's row in the :class:`FlatChunks` (numpy).
        batch, teacher_start, student_sizes: int64 ``[K]`` tensors on the logits' device.
        slices: the row slices, in chunk order.
    """

    index: np.ndarray
    batch: Tensor
    teacher_start: Tensor
    student_sizes: Tensor
    slices: list[RowSlice]


def build_plan(
    flat: FlatChunks, keep: np.ndarray, student_ids: Tensor, *, all_tokens: bool, slice_size: int
) -> ChunkPlan:
    """Group the kept chunks into slices of about ``slice_size`` student rows.

    Args:
        flat: all chunks of the batch.
        keep: bool ``[K_all]``: chunks that carry loss; each must have a student token.
        student_ids: int ``[B, m]``; gives each row's realised id and the device.
        all_tokens: read every student token of a kept chunk, not only its first position.
        slice_size: rows per slice; a slice grows past it only to finish its last chunk.
    """
    index = np.flatnonzero(keep)
    starts, ends = flat.student_start[index], flat.student_end[index]
    rows_per_chunk = ends - starts if all_tokens else np.ones_like(starts)
    slice_of_chunk = (np.cumsum(rows_per_chunk) - rows_per_chunk) // slice_size
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(slice_of_chunk)) + 1, [index.size]])
    device = student_ids.device
    slices = []
    for k0, k1 in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        if k1 > k0:
            slices.append(
                _row_slice(
                    flat.batch[index[k0:k1]],
                    starts[k0:k1],
                    ends[k0:k1],
                    student_ids,
                    all_tokens,
                    k0,
                )
            )
    return ChunkPlan(
        index=index,
        batch=torch.as_tensor(flat.batch[index], device=device),
        teacher_start=torch.as_tensor(flat.teacher_start[index], device=device),
        student_sizes=torch.as_tensor(ends - starts, device=device),
        slices=slices,
    )


def _row_slice(
    batch: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    student_ids: Tensor,
    all_tokens: bool,
    k0: int,
) -> RowSlice:
    chunk = np.arange(batch.shape[0], dtype=np.int64)
    rows_batch, rows_pos, rows_chunk = [batch], [starts], [chunk]
    if all_tokens:
        owner, pos = expand_ranges(starts + 1, ends)
        rows_batch.append(batch[owner])
        rows_pos.append(pos)
        rows_chunk.append(owner)
    device = student_ids.device
    b = torch.as_tensor(np.concatenate(rows_batch), device=device)
    p = torch.as_tensor(np.concatenate(rows_pos), device=device)
    return RowSlice(
        batch=b,
        pos=p,
        ids=student_ids[b, p].long(),
        chunk=torch.as_tensor(np.concatenate(rows_chunk), device=device),
        k0=k0,
        k1=k0 + batch.shape[0],
    )
