"""Minimal aligned chunks between two tokenisations of the same response (ALGORITHMS §2).

Let ``P_T`` and ``P_S`` be the cumulative byte offsets of the teacher's and the student's tokens.
Every pair of consecutive common offsets ``P_T ∩ P_S`` is one chunk: teacher tokens
``[teacher_start, teacher_end)`` and student tokens ``[student_start, student_end)`` spelling the
same bytes. Chunks partition both sequences and are minimal (no chunk contains an offset both
sides share).

When the two byte strings really differ (a normaliser rewrote the text, the student sampled
invalid UTF-8, a special token sits inside the response), the byte strings are matched first
(they are equal almost everywhere), common offsets are taken only where both sides agree, and
each chunk that touches a difference is marked unaligned.

The common case, equal bytes, is computed for a whole batch at once with numpy; only sequences
whose bytes differ take the per-sequence path with a byte matcher.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass

import numpy as np

from ctopd.core.byte_table import ByteTable, check_ids_in_range

# Specials inside a response have no text. They are given one placeholder byte so they occupy a
# position, and any chunk containing one is unaligned.
_SPECIAL_PLACEHOLDER = 0xFF
# Above this many differing bytes in the middle of a pair, the byte matcher (quadratic in the
# worst case) is skipped and the whole differing middle is one unaligned region.
MAX_MATCHED_MIDDLE_BYTES = 20_000


@dataclass(frozen=True)
class Alignment:
    """The chunks of one response.

    Attributes:
        chunks: int64 ``[K, 4]``: ``(teacher_start, teacher_end, student_start, student_end)``
            token ranges, covering both sequences in order.
        aligned: bool ``[K]``: False where the two sides' bytes differ (no loss there).
        is_end: bool ``[K]``: the 1:1 end-of-turn chunk (student EOS/end-of-turn with the
            teacher's), which is supervised through the shared end class.
        teacher_length: number of teacher response tokens ``n``.
        student_length: number of student response tokens ``m``.
        unaligned_bytes: student response bytes that fall in unaligned chunks.
    """

    chunks: np.ndarray
    aligned: np.ndarray
    is_end: np.ndarray
    teacher_length: int
    student_length: int
    unaligned_bytes: int = 0

    @property
    def num_chunks(self) -> int:
        return int(self.chunks.shape[0])

    @property
    def teacher_sizes(self) -> np.ndarray:
        """int64 ``[K]``: teacher tokens per chunk."""
        return self.chunks[:, 1] - self.chunks[:, 0]

    @property
    def student_sizes(self) -> np.ndarray:
        """int64 ``[K]``: student tokens per chunk."""
        return self.chunks[:, 3] - self.chunks[:, 2]

    @property
    def one_to_one(self) -> np.ndarray:
        """bool ``[K]``: aligned chunks with exactly one token on each side."""
        return self.aligned & (self.teacher_sizes == 1) & (self.student_sizes == 1)

    @property
    def aligned_student_tokens(self) -> int:
        """Student tokens inside aligned chunks."""
        return int(self.student_sizes[self.aligned].sum())


@dataclass
class _Side:
    """One side of a batch as flat arrays over all tokens of all sequences.

    ``content`` is False only for each sequence's trailing end token; ``lengths`` and ``starts``
    already account for specials (one placeholder byte) and the dummy-prefix space.
    """

    ids: np.ndarray  # int64 [N]
    seq_start: np.ndarray  # int64 [B + 1], first token of each sequence in the flat arrays
    has_end: np.ndarray  # bool [B]
    content_count: np.ndarray  # int64 [B], tokens before the trailing end token
    content: np.ndarray  # bool [N]
    special: np.ndarray  # bool [N]
    lengths: np.ndarray  # int64 [N], bytes per token
    starts: np.ndarray  # int64 [N], start in table.flat_bytes (-1 for specials)
    seq_of_token: np.ndarray  # int64 [N]


def _flatten(ids_list: list) -> tuple[np.ndarray, np.ndarray]:
    counts = np.fromiter((len(x) for x in ids_list), np.int64, len(ids_list))
    if all(isinstance(x, np.ndarray) for x in ids_list) and ids_list:
        flat = np.concatenate([x.reshape(-1) for x in ids_list]).astype(np.int64, copy=False)
    else:
        flat = np.fromiter(itertools.chain.from_iterable(
            x.tolist() if hasattr(x, "tolist") else x for x in ids_list), np.int64, int(counts.sum()))
    return flat, counts


def _prepare_side(table: ByteTable, ids_list: list, label: str) -> _Side:
    ids, counts = _flatten(ids_list)
    check_ids_in_range(ids, table.vocab_size, f"{label} {table.name}")
    seq_start = np.concatenate([[0], np.cumsum(counts)])
    last = seq_start[1:] - 1
    has_end = np.zeros(counts.size, dtype=bool)
    nonempty = counts > 0
    has_end[nonempty] = np.isin(ids[last[nonempty]], table.end_ids)
    content = np.ones(ids.size, dtype=bool)
    content[last[has_end]] = False
    special = table.special[ids]
    lengths = np.where(special, 1, table.lengths[ids])
    starts = np.where(special, -1, table.starts[ids])
    content_count = counts - has_end
    if table.dummy_prefix:
        # The dummy-prefix space is the tokenizer's artefact, not content (ALGORITHMS §2).
        first = seq_start[:-1][content_count > 0]
        first = first[~special[first] & (lengths[first] > 0)]
        first = first[table.flat_bytes[starts[first]] == 0x20]
        lengths[first] -= 1
        starts[first] += 1
    seq_of_token = np.repeat(np.arange(counts.size), counts)
    return _Side(ids, seq_start, has_end, content_count, content, special, lengths, starts,
                 seq_of_token)


def _sequence_bytes(table: ByteTable, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """uint8 bytes of tokens back to back, specials as one placeholder byte."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.uint8)
    # Byte i of the output is byte (i - first byte of its token) of that token's entry.
    # int32 indices halve the memory traffic; token tables are far below 2**31 bytes.
    shift = (starts - (np.cumsum(lengths) - lengths)).astype(np.int32)
    index = np.repeat(shift, lengths) + np.arange(total, dtype=np.int32)
    out = table.flat_bytes[np.maximum(index, 0)]
    if (starts < 0).any():
        out[np.repeat(starts < 0, lengths)] = _SPECIAL_PLACEHOLDER
    return out


def _token_ranges(offsets: np.ndarray, cuts: np.ndarray, num_tokens: int) -> np.ndarray:
    """Token index where each cut offset begins; ``offsets`` are token start offsets (sorted).

    A zero-length token at a cut goes with the chunk that starts there; the first chunk always
    starts at token 0 and the last always ends at ``num_tokens``.
    """
    index = np.searchsorted(offsets, cuts, side="left")
    index[0] = 0
    index[-1] = num_tokens
    return index


def _matching_blocks(a: np.ndarray, b: np.ndarray) -> list[tuple[int, int, int]]:
    """Blocks ``(i, j, n)`` with ``a[i:i+n] == b[j:j+n]``: common prefix, suffix, and what
    difflib finds in between (skipped when the middle is huge)."""
    la, lb = a.shape[0], b.shape[0]
    short = min(la, lb)
    differ = np.flatnonzero(a[:short] != b[:short])
    prefix = int(differ[0]) if differ.size else short
    rest = short - prefix
    differ_tail = np.flatnonzero(a[la - rest :][::-1] != b[lb - rest :][::-1]) if rest else []
    suffix = int(differ_tail[0]) if len(differ_tail) else rest
    blocks = [(0, 0, prefix)] if prefix else []
    mid_a = a[prefix : la - suffix].tobytes()
    mid_b = b[prefix : lb - suffix].tobytes()
    if mid_a and mid_b and max(len(mid_a), len(mid_b)) <= MAX_MATCHED_MIDDLE_BYTES:
        matcher = difflib.SequenceMatcher(None, mid_a, mid_b, autojunk=False)
        for i, j, n in matcher.get_matching_blocks():
            if n:
                blocks.append((prefix + i, prefix + j, n))
    if suffix:
        blocks.append((la - suffix, lb - suffix, suffix))
    return blocks


def _content_slice(side: _Side, k: int) -> slice:
    return slice(side.seq_start[k], side.seq_start[k] + side.content_count[k])


def _align_one_slow(teacher: ByteTable, student: ByteTable, t_side: _Side, s_side: _Side,
                    k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Chunks and aligned flags of the content of sequence ``k``, whose bytes may differ."""
    t_slice, s_slice = _content_slice(t_side, k), _content_slice(s_side, k)
    t_len, s_len = t_side.lengths[t_slice], s_side.lengths[s_slice]
    a = _sequence_bytes(teacher, t_side.starts[t_slice], t_len)
    b = _sequence_bytes(student, s_side.starts[s_slice], s_len)
    t_offsets = np.concatenate([[0], np.cumsum(t_len)]).astype(np.int64)
    s_offsets = np.concatenate([[0], np.cumsum(s_len)]).astype(np.int64)
    # Common offsets lie on one matching block's diagonal; remember which block.
    pairs: dict[tuple[int, int], int] = {(0, 0): -1, (int(a.size), int(b.size)): -2}
    for block_id, (i, j, n) in enumerate(_matching_blocks(a, b)):
        lo, hi = np.searchsorted(t_offsets, [i, i + n + 1])
        xs = t_offsets[lo:hi]
        ys = j + (xs - i)
        pos = np.minimum(np.searchsorted(s_offsets, ys), s_offsets.size - 1)
        on_both = s_offsets[pos] == ys
        for x, y in zip(xs[on_both].tolist(), ys[on_both].tolist()):
            pairs[(x, y)] = block_id
    ordered = sorted(pairs)
    cuts = np.asarray(ordered, dtype=np.int64)
    blocks = np.asarray([pairs[p] for p in ordered])
    if t_len.size == 0 and s_len.size == 0:
        return np.zeros((0, 4), np.int64), np.zeros(0, bool), 0
    if cuts.shape[0] == 1:  # tokens that spell no bytes at all (a lone dummy-prefix piece)
        return np.asarray([[0, t_len.size, 0, s_len.size]], np.int64), np.zeros(1, bool), 0
    t = _token_ranges(t_offsets[:-1], cuts[:, 0], t_len.size)
    s = _token_ranges(s_offsets[:-1], cuts[:, 1], s_len.size)
    chunks = np.stack([t[:-1], t[1:], s[:-1], s[1:]], axis=1).astype(np.int64)
    aligned = (blocks[:-1] == blocks[1:]) & (blocks[:-1] >= 0)
    aligned &= (np.diff(cuts[:, 0]) > 0) & (np.diff(cuts[:, 1]) > 0)
    aligned &= ~_chunk_has_special(chunks, t_side.special[t_slice], s_side.special[s_slice])
    unaligned_bytes = int(np.diff(cuts[:, 1])[~aligned].sum())
    return chunks, aligned, unaligned_bytes


def _chunk_has_special(chunks: np.ndarray, t_special: np.ndarray, s_special: np.ndarray):
    def any_in(flags: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        csum = np.concatenate([[0], np.cumsum(flags)])
        return (csum[hi] - csum[lo]) > 0

    return any_in(t_special, chunks[:, 0], chunks[:, 1]) | any_in(
        s_special, chunks[:, 2], chunks[:, 3]
    )


def _per_seq_sum(side: _Side, mask: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(side.seq_of_token[mask], weights=values[mask], minlength=size).astype(
        np.int64)


def _equal_bytes(teacher: ByteTable, student: ByteTable, t_side: _Side, s_side: _Side
                 ) -> np.ndarray:
    """bool ``[B]``: sequences with no specials, content on both sides, identical bytes."""
    size = t_side.has_end.size
    t_total = _per_seq_sum(t_side, t_side.content, t_side.lengths, size)
    s_total = _per_seq_sum(s_side, s_side.content, s_side.lengths, size)
    t_specials = _per_seq_sum(t_side, t_side.content, t_side.special, size)
    s_specials = _per_seq_sum(s_side, s_side.content, s_side.special, size)
    good = ((t_total == s_total) & (t_side.content_count > 0) & (s_side.content_count > 0)
            & (t_specials == 0) & (s_specials == 0))
    t_sel = t_side.content & good[t_side.seq_of_token]
    s_sel = s_side.content & good[s_side.seq_of_token]
    a = _sequence_bytes(teacher, t_side.starts[t_sel], t_side.lengths[t_sel])
    b = _sequence_bytes(student, s_side.starts[s_sel], s_side.lengths[s_sel])
    differ = np.flatnonzero(a != b)
    if differ.size:  # rare: find which sequences the differing bytes belong to
        byte_ends = np.cumsum(t_side.lengths[t_sel])
        token = np.searchsorted(byte_ends, differ, side="right")
        good[np.unique(t_side.seq_of_token[t_sel][token])] = False
    return good


def _align_fast(t_side: _Side, s_side: _Side, good: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chunks of the sequences marked ``good`` (bytes known equal), computed in one pass.

    Returns:
        ``(chunks [K, 4] with sequence-local token indices, chunk counts [G])`` in order of the
        good sequences.
    """
    if not good.any():
        return np.zeros((0, 4), dtype=np.int64), np.zeros(0, dtype=np.int64)
    t_sel = t_side.content & good[t_side.seq_of_token]
    s_sel = s_side.content & good[s_side.seq_of_token]
    t_len, s_len = t_side.lengths[t_sel], s_side.lengths[s_sel]
    t_starts = np.cumsum(t_len) - t_len  # global byte offset where each token starts
    s_starts = np.cumsum(s_len) - s_len
    t_ends, s_ends = t_starts + t_len, s_starts + s_len
    # Student tokens ending at each byte offset, counted over the whole batch (O(bytes)); the
    # teacher's end offsets that some student token also ends at are the common offsets, and
    # the student tokens ending before an offset give the student token index there.
    ends_at = np.bincount(s_ends, minlength=int(t_ends[-1]) + 1)
    on_both = ends_at[t_ends] > 0
    pos = np.cumsum(ends_at)[t_ends] - ends_at[t_ends]
    # A common offset x closes teacher token i and student token pos[i]; the next chunk starts at
    # the token after each. Where zero-length tokens repeat an offset, keep its first closing
    # token, so the zero-length one opens the next chunk. Sequence ends are common offsets too.
    first_time = np.concatenate([[True], np.diff(t_ends[on_both]) != 0])
    cuts = np.concatenate([[0], t_ends[on_both][first_time]])
    t_cut = np.concatenate([[0], np.flatnonzero(on_both)[first_time] + 1])
    s_cut = np.concatenate([[0], pos[on_both][first_time] + 1])
    if cuts.size > 1 and cuts[1] == 0:  # a zero-length first token: offset 0 listed twice
        cuts, t_cut, s_cut = cuts[1:], t_cut[1:], s_cut[1:]
        t_cut[0] = s_cut[0] = 0
    t_counts, s_counts = t_side.content_count[good], s_side.content_count[good]
    t_first = np.concatenate([[0], np.cumsum(t_counts)])
    s_first = np.concatenate([[0], np.cumsum(s_counts)])
    seq_of_token = np.repeat(np.arange(t_counts.size), t_counts)
    bases = np.concatenate([[0], np.cumsum(
        np.bincount(seq_of_token, weights=t_len, minlength=t_counts.size).astype(np.int64))])
    cut_of_base = np.searchsorted(cuts, bases)
    t_cut[cut_of_base] = t_first  # each sequence's first chunk starts at its first token
    s_cut[cut_of_base] = s_first
    seq_of_chunk = np.repeat(np.arange(t_counts.size), np.diff(cut_of_base))
    chunks = np.stack([t_cut[:-1] - t_first[seq_of_chunk], t_cut[1:] - t_first[seq_of_chunk],
                       s_cut[:-1] - s_first[seq_of_chunk], s_cut[1:] - s_first[seq_of_chunk]],
                      axis=1)
    return chunks, np.diff(cut_of_base)


def align_ids_batch(
    teacher: ByteTable,
    student: ByteTable,
    teacher_ids: list,
    student_ids: list,
) -> list[Alignment]:
    """Align many responses; see :func:`align_ids` for one.

    Sequences whose bytes are equal on both sides (the common case) are aligned together in one
    vectorised pass; the others go through the byte matcher one by one.

    Args:
        teacher: byte table of the teacher tokenizer.
        student: byte table of the student tokenizer.
        teacher_ids: ``B`` sequences of teacher response ids (lists or int arrays).
        student_ids: ``B`` sequences of student response ids.

    Returns:
        ``B`` :class:`Alignment` objects.

    Raises:
        ValueError: the batch sizes differ or an id is out of a tokenizer's range.
    """
    if len(teacher_ids) != len(student_ids):
        raise ValueError(
            f"align_batch got {len(teacher_ids)} teacher sequences and {len(student_ids)} "
            "student sequences; pass one teacher sequence per student sequence"
        )
    if not teacher_ids:
        return []
    t_side = _prepare_side(teacher, teacher_ids, "teacher")
    s_side = _prepare_side(student, student_ids, "student")
    good = _equal_bytes(teacher, student, t_side, s_side)
    fast = _fast_alignments(t_side, s_side, good)
    results = []
    for k in range(len(teacher_ids)):
        if good[k]:
            results.append(fast[k])
        else:
            chunks, aligned, unaligned_bytes = _align_one_slow(teacher, student, t_side, s_side, k)
            results.append(_with_end_chunk(chunks, aligned, unaligned_bytes, t_side, s_side, k))
    return results


def _fast_alignments(t_side: _Side, s_side: _Side, good: np.ndarray) -> dict[int, Alignment]:
    """Alignments of the sequences with equal bytes, end chunks appended for all at once; each
    holds views of three batch-wide arrays."""
    chunks, counts = _align_fast(t_side, s_side, good)
    if not counts.size:
        return {}
    t_end, s_end = t_side.has_end[good], s_side.has_end[good]
    t_n, s_m = t_side.content_count[good], s_side.content_count[good]
    with_end = t_end | s_end
    end_rows = np.stack([t_n, t_n + t_end, s_m, s_m + s_end], axis=1)[with_end]
    insert_at = np.cumsum(counts)[with_end]
    chunks = np.insert(chunks, insert_at, end_rows, axis=0)
    end_index = insert_at + np.arange(insert_at.size)
    aligned = np.ones(chunks.shape[0], dtype=bool)
    aligned[end_index] = (t_end & s_end)[with_end]
    is_end = np.zeros(chunks.shape[0], dtype=bool)
    is_end[end_index] = aligned[end_index]
    bounds = np.concatenate([[0], np.cumsum(counts + with_end)]).tolist()
    t_len, s_len = (t_n + t_end).tolist(), (s_m + s_end).tolist()
    return {
        k: Alignment(chunks[lo:hi], aligned[lo:hi], is_end[lo:hi], t_len[g], s_len[g])
        for g, (k, lo, hi) in enumerate(zip(np.flatnonzero(good).tolist(), bounds[:-1],
                                            bounds[1:]))
    }


def _with_end_chunk(chunks, aligned, unaligned_bytes, t_side: _Side, s_side: _Side, k: int):
    n_content, m_content = int(t_side.content_count[k]), int(s_side.content_count[k])
    t_end, s_end = bool(t_side.has_end[k]), bool(s_side.has_end[k])
    is_end = np.zeros(chunks.shape[0] + (t_end or s_end), dtype=bool)
    if t_end or s_end:
        end_row = [[n_content, n_content + t_end, m_content, m_content + s_end]]
        chunks = np.concatenate([chunks.reshape(-1, 4), end_row])
        aligned = np.append(aligned, t_end and s_end)
        is_end[-1] = t_end and s_end
    return Alignment(
        chunks=chunks.reshape(-1, 4).astype(np.int64, copy=False),
        aligned=aligned,
        is_end=is_end,
        teacher_length=n_content + t_end,
        student_length=m_content + s_end,
        unaligned_bytes=unaligned_bytes,
    )


def response_bytes_batch(table: ByteTable, ids_list: list) -> tuple[list[bytes], np.ndarray]:
    """The response bytes of many id sequences at once.

    Each response's bytes are its tokens' bytes back to back, without a trailing end token,
    without specials and without a dummy-prefix space.

    Returns:
        ``(B byte strings, bool [B] whether each sequence ended with an end id)``.
    """
    if not ids_list:
        return [], np.zeros(0, dtype=bool)
    side = _prepare_side(table, ids_list, "student")
    keep = side.content & ~side.special
    data = _sequence_bytes(table, side.starts[keep], side.lengths[keep]).tobytes()
    per_seq = np.bincount(side.seq_of_token[keep], weights=side.lengths[keep],
                          minlength=side.has_end.size).astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(per_seq)]).tolist()
    return [data[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])], side.has_end


def align_ids(teacher: ByteTable, student: ByteTable, teacher_ids, student_ids) -> Alignment:
    """Minimal aligned chunks of one response.

    Args:
        teacher: byte table of the teacher tokenizer.
        student: byte table of the student tokenizer.
        teacher_ids: int ``[n]`` teacher response ids, optionally ending with an end id.
        student_ids: int ``[m]`` student response ids, optionally ending with an end id.

    Returns:
        The :class:`Alignment`.
    """
    return align_ids_batch(teacher, student, [teacher_ids], [student_ids])[0]
