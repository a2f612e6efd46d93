"""Softmax probability summed over ranges of a sorted vocabulary, with a hand-written backward.

The text-event space (:mod:`ctopd.objectives.text_events`) reads, from each logit row ``z``
``[V]`` with ``p = softmax(z)``:

* the realised token's log-probability ``log p_x``;
* *range masses* ``Σ_{i ∈ [lo, hi)} p_{order[i]}``: the probability of the tokens at sorted
  positions ``[lo, hi)`` of a vocabulary sorted by bytes, read off block sums in the logits'
  dtype with float64 prefix sums over the blocks and the partial blocks at the ends summed in
  float64 (:func:`range_masses`: exact to about ``1e-16`` of the row's probability plus the
  rounding of the range's own mass, so small ranges keep their log-probability);
* *token groups* ``Σ_{t: column[t] = c} p_{token[t]}``: a few chosen tokens' probabilities
  summed by column (the cells).

Plain autograd through that chain (log-sum-exp, exp, a column permutation, a float64 cumsum and
two gathers per query) makes a dozen dense ``[S, V]`` passes in backward, most of them in
float64. Every output here has the form ``m = Σ_{j ∈ A} p_j`` (``A`` a set of tokens), whose
gradient is ``∂m/∂z_j = p_j ([j ∈ A] - m)``, and ``∂ log p_x / ∂z_j = [j = x] - p_j``. So

``∂L/∂z_j = p_j (H_j - c) + g_x [j = x]``, ``H_j = Σ_{outputs m ∋ j} g_m``,
``c = g_x + Σ_m g_m m``,

where ``g`` are the incoming gradients. ``c`` is a per-row scalar from the small outputs, and
``H`` over a row's ranges is one difference array in sorted space (``+g`` at ``lo``, ``-g`` at
``hi``), one cumulative sum and one gather back to token order. Backward is then five dense
passes in the logits' dtype (a zeroed difference array, its cumulative sum, the gather, the
subtraction of ``c`` and the product with the saved probabilities), none of them in float64.

The forward pass is one fused log-softmax, one exponential, one gather into sorted order per
vocabulary and one block sum: no dense pass in float64 (it made most of the forward's time at a
262k vocabulary). Logits whose columns are already in that order (``SortedRanges.in_order``: a
student head whose rows were put in byte order once, :func:`ctopd.objectives.text_events.head_order`)
skip the gather both ways: the ranges read the first ``N`` columns in place, and backward builds
``H`` directly in the logits' columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


@dataclass(frozen=True)
class SortedRanges:
    """Range queries over one sorted vocabulary, for some rows of a slice.

    Attributes:
        rows: int64 ``[S_g]``: the slice rows read with this order; ``None`` for all rows.
        order: int64 ``[N]``: token ids sorted by bytes (``N <= V``).
        inverse: int64 ``[V]``: each id's position in ``order``, ``N`` for ids not in it.
        query: int64 ``[Q_g]``: where each query's mass goes in the output ``[Q]``.
        row: int64 ``[Q_g]``: each query's row, as a position in ``rows`` (``0..S_g-1``).
        lo, hi: int64 ``[Q_g]``: the sorted positions ``[lo, hi)`` summed (``lo <= hi <= N``).
        in_order: ``order`` is ``0..N-1``: the logits' first ``N`` columns are already sorted
            (a student head whose rows were permuted into this order), so no column gather is
            made in either direction.
    """

    rows: Tensor | None
    order: Tensor
    inverse: Tensor
    query: Tensor
    row: Tensor
    lo: Tensor
    hi: Tensor
    in_order: bool = False


@dataclass(frozen=True)
class TokenGroups:
    """Chosen tokens' probabilities summed by column: ``out[target_k, columns[t]] += p[rows_k,
    tokens[t]]`` for every ``k`` and ``t``.

    Attributes:
        target: int64 ``[K_g]``: output rows.
        rows: int64 ``[K_g]``: the slice row read for each.
        tokens, columns: int64 ``[T]``: the tokens summed and their output columns.
    """

    target: Tensor
    rows: Tensor
    tokens: Tensor
    columns: Tensor


def sorted_ranges(
    rows: np.ndarray | None,
    order: np.ndarray,
    vocab: int,
    query: np.ndarray,
    row: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    device,
) -> SortedRanges:
    """A :class:`SortedRanges` from numpy arrays (``inverse`` built here, over ``vocab``
    columns; ``in_order`` detected here)."""
    in_order = bool(
        order.size and order[0] == 0 and order[-1] == order.size - 1
    ) and np.array_equal(order, np.arange(order.size))
    inverse = np.full(vocab, order.size, dtype=np.int64)
    inverse[order] = np.arange(order.size)

    def t(array):
        return torch.as_tensor(np.ascontiguousarray(array, dtype=np.int64), device=device)

    return SortedRanges(
        rows=None if rows is None else t(rows),
        order=t(order),
        inverse=t(inverse),
        query=t(query),
        row=t(row),
        lo=t(lo),
        hi=t(hi),
        in_order=in_order,
    )


class _SoftmaxSums(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        ids: Tensor,
        ranges: Sequence[SortedRanges],
        num_queries: int,
        groups: Sequence[TokenGroups],
        cell_shape: tuple[int, int],
    ):
        ctx.set_materialize_grads(False)
        log_probs = torch.log_softmax(logits, dim=-1)  # one fused pass
        tokens = log_probs.gather(1, ids[:, None])[:, 0]
        probs = log_probs.exp_()  # [S, V], kept for backward
        masses = torch.zeros(num_queries, dtype=torch.float64, device=logits.device)
        for group in ranges:
            if group.query.numel() == 0:
                continue
            part = probs if group.rows is None else probs.index_select(0, group.rows)
            size = group.order.numel()
            in_order = part[:, :size] if group.in_order else take_columns(part, group.order)
            masses[group.query] = range_masses(in_order, group.row, group.lo, group.hi)
        cells = torch.zeros(cell_shape, dtype=torch.float64, device=logits.device)
        for group in groups:
            if group.tokens.numel() == 0 or group.rows.numel() == 0:
                continue
            picked = probs[group.rows[:, None], group.tokens[None, :]].to(torch.float64)
            part = torch.zeros(
                group.rows.numel(), cell_shape[1], dtype=torch.float64, device=logits.device
            )
            cells[group.target] = part.index_add_(1, group.columns, picked)
        ctx.save_for_backward(probs, ids, masses, cells)
        ctx.ranges, ctx.groups = ranges, groups
        return tokens, masses, cells

    @staticmethod
    @once_differentiable
    def backward(
        ctx, grad_tokens: Tensor | None, grad_masses: Tensor | None, grad_cells: Tensor | None
    ):
        probs, ids, masses, cells = ctx.saved_tensors
        rows_count, vocab = probs.shape
        dtype, device = probs.dtype, probs.device
        offset = torch.zeros(rows_count, dtype=torch.float64, device=device)  # c
        if grad_tokens is not None:
            offset += grad_tokens.to(torch.float64)
        grad = None  # H, then the gradient
        if grad_masses is not None:
            for group in ctx.ranges:
                if group.query.numel() == 0:
                    continue
                rows = group.row if group.rows is None else group.rows[group.row]
                g = grad_masses[group.query]
                offset.index_add_(0, rows, g * masses[group.query])
                size = group.order.numel()
                count = rows_count if group.rows is None else group.rows.numel()
                # H in sorted space: +g at lo, -g at hi, one cumulative sum.
                g = g.to(dtype)
                if group.in_order:
                    # The logits' first `size` columns are the sorted ones: H is made in place
                    # in a [count, V] array (a mark at V would fall past the end: dropped).
                    part = torch.zeros(count, vocab, dtype=dtype, device=device)
                    for at, sign in ((group.lo, g), (group.hi, -g)):
                        inside = at < vocab
                        part.view(-1).index_add_(
                            0, group.row[inside] * vocab + at[inside], sign[inside]
                        )
                    part.cumsum_(1)
                    part[:, size:] = 0.0  # ids outside the order (and rounding at the end)
                else:
                    difference = torch.zeros(count, size + 1, dtype=dtype, device=device)
                    flat = difference.view(-1)
                    flat.index_add_(0, group.row * (size + 1) + group.lo, g)
                    flat.index_add_(0, group.row * (size + 1) + group.hi, -g)
                    difference.cumsum_(1)
                    difference[:, size] = 0.0  # ids outside the order (and rounding at the end)
                    part = take_columns(difference, group.inverse)
                if group.rows is None and grad is None:
                    grad = part
                else:
                    if grad is None:
                        grad = torch.zeros(rows_count, vocab, dtype=dtype, device=device)
                    grad.index_add_(
                        0,
                        torch.arange(rows_count, device=device)
                        if group.rows is None
                        else group.rows,
                        part,
                    )
        if grad_cells is not None:
            for group in ctx.groups:
                if group.tokens.numel() == 0 or group.rows.numel() == 0:
                    continue
                g = grad_cells[group.target]
                offset.index_add_(0, group.rows, (g * cells[group.target]).sum(dim=1))
                if grad is None:
                    grad = torch.zeros(rows_count, vocab, dtype=dtype, device=device)
                grad.index_put_(
                    (group.rows[:, None], group.tokens[None, :]),
                    g[:, group.columns].to(dtype),
                    accumulate=True,
                )
        if grad is None:
            grad = torch.zeros(rows_count, vocab, dtype=dtype, device=device)
        grad.sub_(offset.to(dtype)[:, None]).mul_(probs)
        if grad_tokens is not None:
            grad.view(-1).index_add_(
                0, torch.arange(rows_count, device=device) * vocab + ids, grad_tokens.to(dtype)
            )
        return grad, None, None, None, None, None


BLOCK = 256  # sorted positions per block of the range sums


def take_columns(matrix: Tensor, index: Tensor) -> Tensor:
    """``matrix.index_select(1, index)`` (no gradient). On CPU through numpy's ``take`` with
    int32 indices, about twice as fast as torch's at a 262k vocabulary, where this gather is the
    largest single cost of the text-event space."""
    if matrix.device.type != "cpu" or matrix.requires_grad or index.numel() >= 2**31:
        return matrix.index_select(1, index)
    columns = index.numpy().astype(np.int32)
    return torch.from_numpy(np.take(matrix.contiguous().numpy(), columns, axis=1))


def range_masses(sorted_probs: Tensor, row: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """float64 ``[Q]``: ``Σ_{lo <= i < hi} sorted_probs[row, i]`` for every query.

    Blocks of :data:`BLOCK` sorted positions are summed in the probabilities' dtype (positive
    terms: a relative error of a few ulps of the block's own mass), their prefix sums taken in
    float64, and the two partial blocks at a range's ends summed in float64 from the entries
    themselves. So a range's mass is exact to about ``1e-16`` of the row's probability plus
    float rounding of its own mass: a small range keeps its log-probability. Two dense passes
    over ``[S, N]`` in the probabilities' dtype, none in float64.

    Args:
        sorted_probs: float ``[S, N]`` probabilities in sorted order (contiguous rows; a column
            slice of a wider tensor is read in place).
        row, lo, hi: int64 ``[Q]``: each query's row and sorted positions ``[lo, hi)``
            (``0 <= lo``, ``hi <= N``; ``hi <= lo`` reads 0).
    """
    count, size = sorted_probs.shape
    device = sorted_probs.device
    whole = size // BLOCK
    blocks = sorted_probs[:, : whole * BLOCK].reshape(count, whole, BLOCK).sum(-1)
    if size > whole * BLOCK:
        blocks = torch.cat([blocks, sorted_probs[:, whole * BLOCK :].sum(-1, keepdim=True)], 1)
    prefix = torch.nn.functional.pad(blocks.to(torch.float64).cumsum(1), (1, 0))  # [S, nb + 1]
    last = prefix.shape[1] - 1
    first_block, end_block = lo // BLOCK, hi // BLOCK
    middle = prefix[row, end_block.clamp(max=last)] - prefix[row, (first_block + 1).clamp(max=last)]
    middle = torch.where(end_block > first_block + 1, middle, 0.0)
    offsets = torch.arange(BLOCK, device=device)
    if sorted_probs.stride(-1) != 1:
        sorted_probs = sorted_probs.contiguous()
    # Rows may be a column slice of wider rows: index the storage with the row stride.
    stride = sorted_probs.stride(0) if count > 1 else size
    flat = sorted_probs.as_strided((max((count - 1) * stride + size, 0),), (1,))
    total = middle
    for block, start in ((first_block, lo), (end_block, torch.maximum(lo, end_block * BLOCK))):
        position = block[:, None] * BLOCK + offsets  # [Q, BLOCK]
        inside = (position >= start[:, None]) & (position < hi[:, None]) & (position < size)
        if block is end_block:
            inside &= (end_block > first_block)[:, None]  # else the first block held it all
        index = row[:, None] * stride + position.clamp(max=max(size - 1, 0))
        values = flat[index].to(torch.float64) if size else torch.zeros_like(middle)[:, None]
        total = total + torch.where(inside, values, 0.0).sum(1)
    return total


def softmax_sums(
    logits: Tensor,
    ids: Tensor,
    ranges: Sequence[SortedRanges],
    num_queries: int,
    groups: Sequence[TokenGroups] = (),
    cell_shape: tuple[int, int] = (0, 0),
) -> tuple[Tensor, Tensor, Tensor]:
    """Realised-token log-probabilities, range masses and token-group sums of softmax rows.

    Args:
        logits: float ``[S, V]`` logit rows (float32 or float64; differentiable).
        ids: int64 ``[S]``: each row's realised token.
        ranges: the range queries, one :class:`SortedRanges` per sorted vocabulary used; their
            ``query`` fields together cover ``0..num_queries-1`` (any not covered reads 0).
        num_queries: ``Q``.
        groups: the token groups, one :class:`TokenGroups` per set of tokens.
        cell_shape: ``(K, C)``, the shape of the token-group output.

    Returns:
        ``(tokens, masses, cells)``: ``log p_x`` ``[S]`` in the logits' dtype; float64
        ``[Q]`` probabilities of the ranges; float64 ``[K, C]`` group sums (0 where no group
        writes). One backward pass through all three (no double backward).
    """
    return _SoftmaxSums.apply(
        logits, ids, tuple(ranges), num_queries, tuple(groups), tuple(cell_shape)
    )
