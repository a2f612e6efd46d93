"""Helpers the alignment tests share: per-token bytes, the byte matcher as an oracle, and
equal-length token substitutions."""

from __future__ import annotations

import numpy as np

from ctopd import TokenizerPair


def content_pieces(table, ids: list[int]) -> list[bytes]:
    """Per-token bytes with the dummy-prefix space dropped from the first token."""
    pieces = [table.token_bytes(i) for i in ids]
    if table.dummy_prefix and pieces and pieces[0][:1] == b" ":
        pieces[0] = pieces[0][1:]
    return pieces


def byte_matcher_alignment(pair: TokenizerPair, teacher_ids, student_ids):
    """The alignment the per-sequence byte matcher gives (the path for sequences whose bytes
    differ), used as the oracle for the batched path's own byte check."""
    from ctopd.core import alignment as core

    t_side = core._prepare_side(pair.teacher_table, [teacher_ids], "teacher")
    s_side = core._prepare_side(pair.student_table, [student_ids], "student")
    chunks, aligned, unaligned_bytes = core._align_one_slow(t_side, s_side, 0)
    return core._with_end_chunk(chunks, aligned, unaligned_bytes, t_side, s_side, 0)


def same_length_substitute(table, ids: list[int], position: int, choice: int) -> list[int]:
    """``ids`` with the token at ``position`` replaced by another ordinary token spelling the
    same number of bytes but different bytes (unchanged when no such token exists)."""
    if not ids:
        return ids
    position %= len(ids)
    old = ids[position]
    if table.special[old]:
        return ids
    others = np.flatnonzero((table.lengths == table.lengths[old]) & ~table.special)
    for k in range(others.size):
        new = int(others[(choice + k) % others.size])
        if table.token_bytes(new) != table.token_bytes(old):
            return ids[:position] + [new] + ids[position + 1 :]
    return ids
