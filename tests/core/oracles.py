"""Helpers the alignment tests share: per-token bytes, a brute-force reference of the chunks,
the byte matcher as an oracle, and equal-length token substitutions."""

from __future__ import annotations

import itertools
import json

import numpy as np

from ctopd import TokenizerPair


def prefix_added(table, text: str) -> bool:
    """Whether the tokenizer's encoding of ``text`` puts a dummy-prefix space before it, read
    slowly off the table's prefix rule."""
    if not text or table.prefix_rule == "never":
        return False
    return table.prefix_rule == "always" or not text.startswith(" ")


def content_pieces(table, ids: list[int], prefixed: bool | None = None) -> list[bytes]:
    """Per-token bytes, the first token's leading space left out when ``prefixed`` (default:
    when the tokenizer's decoder drops it, the reading of sampled ids). A special first token
    keeps the next token's space."""
    pieces = [table.token_bytes(i) for i in ids]
    if prefixed is None:
        prefixed = table.decoder_strips_space
    if prefixed and pieces and not table.special[ids[0]] and pieces[0][:1] == b" ":
        pieces[0] = pieces[0][1:]
    return pieces


def sides_prefixed(pair: TokenizerPair, student_ids, text: str | None = None) -> tuple[bool, bool]:
    """``(teacher, student)``: whether each side's first token carries a dummy-prefix space,
    for ids encoded from ``text`` by each tokenizer, or (no text) for sampled student ids and
    the teacher's ids from ``teacher_ids_for``."""
    if text is not None:
        return prefix_added(pair.teacher_table, text), prefix_added(pair.student_table, text)
    student = pair.student_table.decoder_strips_space
    if pair.identical:
        return student, student
    return prefix_added(pair.teacher_table, pair.student_text(student_ids)), student


def byte_matcher_alignment(
    pair: TokenizerPair,
    teacher_ids,
    student_ids,
    text=None,
    prefixed: tuple[bool, bool] | None = None,
):
    """The alignment the per-sequence byte matcher gives (the path for sequences whose bytes
    differ), used as the oracle for the batched path's own byte check. ``prefixed``: as
    :func:`sides_prefixed` gives it (default: from the unmutated ``student_ids``)."""
    from ctopd.core import alignment as core

    t_pre, s_pre = prefixed or sides_prefixed(pair, student_ids, text)
    t_side = core._prepare_side(pair.teacher_table, [teacher_ids], "teacher", np.asarray([t_pre]))
    s_side = core._prepare_side(pair.student_table, [student_ids], "student", np.asarray([s_pre]))
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


def reference_chunks(teacher_pieces: list[bytes], student_pieces: list[bytes]) -> list[tuple]:
    """Slow, obviously correct minimal chunks of two tokenisations of the same bytes.

    Tokens are given by their bytes; a token belongs to the chunk its first byte falls in (a
    zero-length token to the chunk that starts where it stands, or the last chunk at the end).
    """
    assert b"".join(teacher_pieces) == b"".join(student_pieces)

    def starts(pieces):
        out, offset = [], 0
        for piece in pieces:
            out.append(offset)
            offset += len(piece)
        return out, offset

    t_starts, total = starts(teacher_pieces)
    s_starts, _ = starts(student_pieces)
    t_cuts = set(t_starts) | {total}
    s_cuts = set(s_starts) | {total}
    common = sorted(t_cuts & s_cuts)
    chunks = []
    for lo, hi in zip(common, common[1:]):
        t_in = [i for i, s in enumerate(t_starts) if lo <= s < hi]
        s_in = [i for i, s in enumerate(s_starts) if lo <= s < hi]
        chunks.append([min(t_in), max(t_in) + 1, min(s_in), max(s_in) + 1])
    if chunks:
        chunks[0][0] = chunks[0][2] = 0
        chunks[-1][1], chunks[-1][3] = len(teacher_pieces), len(student_pieces)
    return [tuple(c) for c in chunks]


def check_partition(al, n: int, m: int) -> None:
    chunks = al.chunks
    assert chunks.dtype == np.int64 and chunks.shape[1] == 4
    assert al.teacher_length == n and al.student_length == m
    if n == 0 and m == 0:
        assert chunks.shape[0] == 0
        return
    assert chunks[0, 0] == 0 and chunks[0, 2] == 0
    assert chunks[-1, 1] == n and chunks[-1, 3] == m
    assert np.array_equal(chunks[1:, 0], chunks[:-1, 1])
    assert np.array_equal(chunks[1:, 2], chunks[:-1, 3])
    assert (chunks[:, 1] >= chunks[:, 0]).all() and (chunks[:, 3] >= chunks[:, 2]).all()


def check_against_reference(
    pair: TokenizerPair, teacher_ids, student_ids, al, text: str | None = None
) -> bytes:
    """Aligned chunks spell equal bytes, are minimal, and equal the reference chunks. ``text``:
    both id lists are the tokenizers' own encodings of it (else: a sampled response and its
    teacher tokenisation). Returns the student side's content bytes."""
    t_table, s_table = pair.teacher_table, pair.student_table
    t_pre, s_pre = sides_prefixed(pair, student_ids, text)
    t_content = list(teacher_ids[:-1] if pair.ended_turn(student_ids) else teacher_ids)
    s_content = list(student_ids[:-1] if pair.ended_turn(student_ids) else student_ids)
    t_pieces = content_pieces(t_table, t_content, t_pre)
    s_pieces = content_pieces(s_table, s_content, s_pre)
    content = al.chunks[~al.is_end]
    for (ta, tb, sa, sb), ok in zip(content, al.aligned[~al.is_end]):
        if ok:
            assert b"".join(t_pieces[ta:tb]) == b"".join(s_pieces[sa:sb])
            size = sum(len(p) for p in t_pieces[ta:tb])
            t_inner = set(itertools.accumulate(len(p) for p in t_pieces[ta:tb])) - {0, size}
            s_inner = set(itertools.accumulate(len(p) for p in s_pieces[sa:sb])) - {0, size}
            assert not (t_inner & s_inner), "an aligned chunk could be split further"
    # A special id (a text that holds "<s>", encoded with specials parsed) spells nothing but
    # takes a place; the chunk holding it is rightly unaligned.
    no_specials = not (t_table.special[t_content].any() or s_table.special[s_content].any())
    if b"".join(t_pieces) == b"".join(s_pieces) != b"" and no_specials:
        assert al.aligned.all()
        assert [tuple(c) for c in content.tolist()] == reference_chunks(t_pieces, s_pieces)
    return b"".join(s_pieces)


def declared_rule(tokenizer) -> str:
    """The prefix rule tokenizer.json declares, read slowly: a Prepend normaliser before every
    text; Metaspace (prepend_scheme first or always) or ByteLevel(add_prefix_space) only before a
    text that does not start with a space; nothing otherwise."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())

    def parts(node, key):
        if not node:
            return []
        return (
            [c for child in node.get(key, []) for c in parts(child, key)]
            if (node["type"] == "Sequence")
            else [node]
        )

    if any(n["type"] == "Prepend" for n in parts(spec["normalizer"], "normalizers")):
        return "always"
    for pre in parts(spec["pre_tokenizer"], "pretokenizers"):
        if pre["type"] == "Metaspace" and pre.get("prepend_scheme") in ("first", "always"):
            return "unless_space"
        if pre["type"] == "ByteLevel" and pre.get("add_prefix_space"):
            return "unless_space"
    return "never"
