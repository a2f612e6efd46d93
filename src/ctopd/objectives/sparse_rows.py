"""Rows of a teacher distribution given sparsely: some ids' log-probabilities (a served top-k
reply) and one even share for every id not listed (the remainder rule of
:mod:`ctopd.training.teachers.served`).

Every field an objective needs is a sum of probabilities over some ids, so it is read off the
listed entries plus ``count × share`` for the unlisted ids, with no ``[S, V]`` row ever built:
``Σ_{i ∈ A} p_i = |A| p_fill + Σ_{listed e ∈ A} (p_e - p_fill)``. Sums are float64. The one
exception is ``full_logprobs`` (``opd``), the full distribution by definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ctopd.objectives.classes import ClassMembers
from ctopd.objectives.softmax_sums import SortedRanges, TokenGroups


@dataclass(frozen=True)
class SparseRows:
    """``S`` normalised distributions over ``V`` ids.

    Attributes:
        row: int64 ``[E]``: the row of each listed entry.
        ids: int64 ``[E]``: its id (``< V``; unique within a row).
        logprobs: float64 ``[E]``: its log-probability.
        fill: float64 ``[S]``: the log-probability of each id not listed in the row.
        unlisted: float64 ``[S]``: how many ids are not listed (``V`` minus the row's entries).
        vocab_size: ``V``.
    """

    row: Tensor
    ids: Tensor
    logprobs: Tensor
    fill: Tensor
    unlisted: Tensor
    vocab_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.fill.shape[0]), self.vocab_size)

    @property
    def device(self) -> torch.device:
        return self.fill.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64

    def with_temperature(self, temperature: float) -> SparseRows:
        """``softmax(log p / τ)`` of every row (``self`` for ``τ = 1``)."""
        if temperature == 1.0:
            return self
        logprobs, fill = self.logprobs / temperature, self.fill / temperature
        total = self.unlisted * fill.exp()
        total = total.index_add(0, self.row, logprobs.exp())
        log_total = total.log()
        return SparseRows(
            self.row,
            self.ids,
            logprobs - log_total[self.row],
            fill - log_total,
            self.unlisted,
            self.vocab_size,
        )

    def log_probs_at(self, ids: Tensor) -> Tensor:
        """float64 ``[S]``: each row's log-probability of ``ids[row]``."""
        out = self.fill.clone()
        hit = self.ids == ids[self.row]
        out[self.row[hit]] = self.logprobs[hit]
        return out

    def group_sums(self, group_of_id: Tensor, group_sizes: Tensor) -> Tensor:
        """float64 ``[S, G]``: each row's probability summed over the ids of each group.

        Args:
            group_of_id: int64 ``[V]``: each id's group, ``-1`` for none.
            group_sizes: ``[G]``: ids per group.
        """
        fill_p = self.fill.exp()
        out = fill_p[:, None] * group_sizes.to(torch.float64)[None, :]
        group = group_of_id[self.ids]
        listed = group >= 0
        row = self.row[listed]
        extra = self.logprobs[listed].exp() - fill_p[row]
        out.index_put_((row, group[listed]), extra, accumulate=True)
        return out

    def class_logprobs(self, members: ClassMembers) -> Tensor:
        """float64 ``[S, C]``: log-sum-exp of each class's member ids."""
        device = self.device
        class_of_id = torch.full((self.vocab_size,), -1, dtype=torch.long, device=device)
        class_of_id[members.first] = torch.arange(members.size, device=device)
        sizes = torch.ones(members.size, dtype=torch.float64, device=device)
        for columns, ids in members.extra:
            class_of_id[ids] = columns
            sizes[columns] += 1
        return self.group_sums(class_of_id, sizes).log()

    def topk_probs(self, k: int) -> Tensor:
        """float64 ``[S, k]``: each row's ``k`` largest probabilities, descending (the listed
        entries above the share, the share repeated for every unlisted id, then the rest)."""
        count = self.shape[0]
        fill_p = self.fill.exp()
        out = fill_p[:, None].expand(count, k).clone()
        if self.row.numel() == 0:
            return out
        # Entries by row, then by log-prob descending.
        order = torch.argsort(self.logprobs, descending=True, stable=True)
        order = order[torch.argsort(self.row[order], stable=True)]
        row, probs = self.row[order], self.logprobs[order].exp()
        starts = torch.zeros(count + 1, dtype=torch.long, device=self.device)
        starts[1:] = torch.bincount(row, minlength=count).cumsum(0)
        rank = torch.arange(row.numel(), device=self.device) - starts[row]
        below = probs < fill_p[row]
        slot = rank + torch.where(below, self.unlisted[row].long(), 0)
        kept = slot < k
        out[row[kept], slot[kept]] = probs[kept]
        return out

    def dense(self) -> Tensor:
        """float64 ``[S, V]`` log-probabilities (only for ``full_logprobs``: ``opd``)."""
        out = self.fill[:, None].expand(*self.shape).clone()
        out[self.row, self.ids] = self.logprobs
        return out

    def select(self, rows: Tensor) -> SparseRows:
        """The rows ``rows`` (int64 ``[S']``, distinct), in that order."""
        local = torch.full((self.shape[0],), -1, dtype=torch.long, device=self.device)
        local[rows] = torch.arange(rows.numel(), device=self.device)
        new_row = local[self.row]
        keep = new_row >= 0
        return SparseRows(
            new_row[keep],
            self.ids[keep],
            self.logprobs[keep],
            self.fill[rows],
            self.unlisted[rows],
            self.vocab_size,
        )

    def fill_outputs(self, out, batch: Tensor, pos: Tensor, ids: Tensor, members, temperature):
        """Write these rows (at ``(batch, pos)``, realised ``ids``) into a ``TeacherOutputs``."""
        rows = self.with_temperature(temperature)
        where = (batch, pos)
        dtype = out.token_logprobs.dtype
        out.token_logprobs[where] = rows.log_probs_at(ids).to(dtype)
        if out.class_logprobs is not None:
            out.class_logprobs[where] = rows.class_logprobs(members).to(dtype)
        if out.topk_probs is not None:
            out.topk_probs[where] = rows.topk_probs(out.topk_probs.shape[-1]).to(dtype)
        if out.full_logprobs is not None:
            out.full_logprobs[where] = rows.dense().to(dtype)


def sparse_softmax_sums(
    rows: SparseRows,
    ids: Tensor,
    ranges: Sequence[SortedRanges],
    num_queries: int,
    groups: Sequence[TokenGroups] = (),
    cell_shape: tuple[int, int] = (0, 0),
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`~ctopd.objectives.softmax_sums.softmax_sums` of sparse rows (no gradient): the
    realised ids' log-probs ``[S]``, the range masses ``[Q]`` and the group sums ``[K, C]``,
    all float64."""
    device = rows.device
    fill_p = rows.fill.exp()
    listed_p = rows.logprobs.exp()
    masses = torch.zeros(num_queries, dtype=torch.float64, device=device)
    for group in ranges:
        if group.query.numel() == 0:
            continue
        if group.rows is None:
            entry_row, keep = rows.row, torch.ones_like(rows.row, dtype=torch.bool)
            query_row = group.row
        else:
            local = torch.full((rows.shape[0],), -1, dtype=torch.long, device=device)
            local[group.rows] = torch.arange(group.rows.numel(), device=device)
            entry_row = local[rows.row]
            keep = entry_row >= 0
            query_row = group.rows[group.row]
        size = group.order.numel() + 1
        # Listed entries by (row, sorted position); their excess over the share, summed.
        key = entry_row[keep] * size + group.inverse[rows.ids[keep]]
        excess = listed_p[keep] - fill_p[rows.row[keep]]
        key, order = torch.sort(key)
        cumulative = torch.nn.functional.pad(excess[order].cumsum(0), (1, 0))
        base = group.row * size
        upper = torch.searchsorted(key, base + group.hi)
        lower = torch.searchsorted(key, base + group.lo)
        count = (group.hi - group.lo).clamp(min=0).to(torch.float64)
        mass = count * fill_p[query_row] + cumulative[upper] - cumulative[lower]
        masses[group.query] = torch.where(group.hi > group.lo, mass, 0.0)
    cells = torch.zeros(cell_shape, dtype=torch.float64, device=device)
    for group in groups:
        if group.tokens.numel() == 0 or group.rows.numel() == 0:
            continue
        column_of_id = torch.full((rows.vocab_size,), -1, dtype=torch.long, device=device)
        column_of_id[group.tokens] = group.columns
        sizes = torch.bincount(group.columns, minlength=cell_shape[1])
        cells[group.target] = rows.select(group.rows).group_sums(column_of_id, sizes)
    return rows.log_probs_at(ids), masses, cells
