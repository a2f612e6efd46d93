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
from dataclasses import dataclass

import numpy as np

from ctopd.core.byte_table import ByteTable, check_ids_in_range, gather_bytes

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
    """One side of a batch after end tokens are split off: flat arrays over all sequences."""

    ids: list[np.ndarray]  # content ids per sequence (end token removed)
    end_index: list[int]  # index of the trailing end token per sequence, -1 if none
    lengths: list[np.ndarray]  # byte length per content token (specials: 1 placeholder byte)
    starts: list[np.ndarray]  # start of each token's bytes in table.flat_bytes (-1 special)
    special: list[np.ndarray]  # bool per content token


def _prepare_side(table: ByteTable, ids_list: list[np.ndarray]) -> _Side:
    side = _Side([], [], [], [], [])
    end_ids = table.end_ids
    for ids in ids_list:
        end = -1
        if ids.size and np.isin(ids[-1], end_ids):
            end = ids.size - 1
            ids = ids[:-1]
        special = table.special[ids]
        lengths = np.where(special, 1, table.lengths[ids])
        starts = np.where(special, -1, table.starts[ids])
        if table.dummy_prefix and ids.size and not special[0] and lengths[0] > 0:
            # The dummy-prefix space is the tokenizer's artefact, not content (ALGORITHMS §2).
            if table.flat_bytes[starts[0]] == 0x20:
                lengths = lengths.copy()
                starts = starts.copy()
                lengths[0] -= 1
                starts[0] += 1
        side.ids.append(ids)
        side.end_index.append(end)
        side.lengths.append(lengths)
        side.starts.append(starts)
        side.special.append(special)
    return side


def _sequence_bytes(table: ByteTable, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """uint8 bytes of one sequence's content tokens, specials as one placeholder byte."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.uint8)
    token_of_byte = np.repeat(np.arange(lengths.shape[0]), lengths)
    first_byte = np.cumsum(lengths) - lengths
    index = starts[token_of_byte] + (np.arange(total) - first_byte[token_of_byte])
    out = table.flat_bytes[np.maximum(index, 0)]
    out[starts[token_of_byte] < 0] = _SPECIAL_PLACEHOLDER
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


def _chunks_from_cuts(
    teacher_starts: np.ndarray,
    student_starts: np.ndarray,
    teacher_cuts: np.ndarray,
    student_cuts: np.ndarray,
) -> np.ndarray:
    t = _token_ranges(teacher_starts, teacher_cuts, teacher_starts.shape[0])
    s = _token_ranges(student_starts, student_cuts, student_starts.shape[0])
    return np.stack([t[:-1], t[1:], s[:-1], s[1:]], axis=1).astype(np.int64)


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


def _align_one_slow(teacher: ByteTable, student: ByteTable, t_side: _Side, s_side: _Side,
                    k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Chunks and aligned flags of sequence ``k`` whose byte strings may differ."""
    t_len, s_len = t_side.lengths[k], s_side.lengths[k]
    a = _sequence_bytes(teacher, t_side.starts[k], t_len)
    b = _sequence_bytes(student, s_side.starts[k], s_len)
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
    if cuts.shape[0] < 2:  # both sides empty
        return np.zeros((0, 4), np.int64), np.zeros(0, bool), 0
    chunks = _chunks_from_cuts(t_offsets[:-1], s_offsets[:-1], cuts[:, 0], cuts[:, 1])
    aligned = (blocks[:-1] == blocks[1:]) & (blocks[:-1] >= 0)
    aligned &= (np.diff(cuts[:, 0]) > 0) & (np.diff(cuts[:, 1]) > 0)
    aligned &= ~_chunk_has_special(chunks, t_side.special[k], s_side.special[k])
    unaligned_bytes = int(np.diff(cuts[:, 1])[~aligned].sum())
    return chunks, aligned, unaligned_bytes


def _chunk_has_special(chunks: np.ndarray, t_special: np.ndarray, s_special: np.ndarray):
    def any_in(flags: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        csum = np.concatenate([[0], np.cumsum(flags)])
        return (csum[hi] - csum[lo]) > 0

    return any_in(t_special, chunks[:, 0], chunks[:, 1]) | any_in(
        s_special, chunks[:, 2], chunks[:, 3]
    )


def _align_fast(teacher: ByteTable, student: ByteTable, t_side: _Side, s_side: _Side,
                seqs: list[int]) -> dict[int, np.ndarray]:
    """Chunks of the sequences ``seqs``, whose bytes are known equal, computed in one pass."""
    if not seqs:
        return {}
    t_len = [t_side.lengths[k] for k in seqs]
    s_len = [s_side.lengths[k] for k in seqs]
    t_counts = np.fromiter((x.size for x in t_len), np.int64, len(seqs))
    s_counts = np.fromiter((x.size for x in s_len), np.int64, len(seqs))
    totals = np.fromiter((int(x.sum()) for x in t_len), np.int64, len(seqs))
    bases = np.concatenate([[0], np.cumsum(totals)])
    t_all, s_all = np.concatenate(t_len), np.concatenate(s_len)
    t_starts = np.cumsum(t_all) - t_all  # global byte offset where each token starts
    s_starts = np.cumsum(s_all) - s_all
    t_ends, s_ends = t_starts + t_all, s_starts + s_all
    pos = np.searchsorted(s_ends, t_ends)
    pos = np.minimum(pos, s_ends.size - 1) if s_ends.size else pos
    common = t_ends[(pos < s_ends.size) & (s_ends[pos] == t_ends)] if s_ends.size else t_ends[:0]
    cuts = np.unique(np.concatenate([common, bases]))
    # Token index where each cut starts, global; then fix each sequence's first/last chunk.
    t_cut = np.searchsorted(t_starts, cuts, side="left")
    s_cut = np.searchsorted(s_starts, cuts, side="left")
    cut_of_base = np.searchsorted(cuts, bases)
    t_first = np.concatenate([[0], np.cumsum(t_counts)])
    s_first = np.concatenate([[0], np.cumsum(s_counts)])
    t_cut[cut_of_base] = t_first
    s_cut[cut_of_base] = s_first
    out: dict[int, np.ndarray] = {}
    for n, k in enumerate(seqs):
        lo, hi = cut_of_base[n], cut_of_base[n + 1]
        t = t_cut[lo : hi + 1] - t_first[n]
        s = s_cut[lo : hi + 1] - s_first[n]
        t[-1], s[-1] = t_counts[n], s_counts[n]
        out[k] = np.stack([t[:-1], t[1:], s[:-1], s[1:]], axis=1)
    return out


def align_ids_batch(
    teacher: ByteTable,
    student: ByteTable,
    teacher_ids: list,
    student_ids: list,
) -> list[Alignment]:
    """Align many responses; see :func:`align_ids` for one.

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
    t_arrays = [np.asarray(x, dtype=np.int64).reshape(-1) for x in teacher_ids]
    s_arrays = [np.asarray(x, dtype=np.int64).reshape(-1) for x in student_ids]
    if t_arrays:
        check_ids_in_range(np.concatenate(t_arrays), teacher.vocab_size, f"teacher {teacher.name}")
        check_ids_in_range(np.concatenate(s_arrays), student.vocab_size, f"student {student.name}")
    t_side = _prepare_side(teacher, t_arrays)
    s_side = _prepare_side(student, s_arrays)
    fast = _fast_candidates(teacher, student, t_side, s_side)
    fast_chunks = _align_fast(teacher, student, t_side, s_side, fast)
    results = []
    for k in range(len(t_arrays)):
        if k in fast_chunks:
            chunks = fast_chunks[k]
            aligned = np.ones(chunks.shape[0], dtype=bool)
            unaligned_bytes = 0
        else:
            chunks, aligned, unaligned_bytes = _align_one_slow(teacher, student, t_side, s_side, k)
        results.append(_with_end_chunk(chunks, aligned, unaligned_bytes, t_side, s_side, k))
    return results


def _fast_candidates(teacher: ByteTable, student: ByteTable, t_side: _Side, s_side: _Side):
    """Indices of sequences with no specials, no empty side, and byte-identical content."""
    candidates = []
    for k in range(len(t_side.ids)):
        t_len, s_len = t_side.lengths[k], s_side.lengths[k]
        if (t_len.size and s_len.size and t_len.sum() == s_len.sum()
                and not t_side.special[k].any() and not s_side.special[k].any()):
            candidates.append(k)
    if not candidates:
        return []
    a = gather_bytes_from(teacher, [t_side.starts[k] for k in candidates],
                          [t_side.lengths[k] for k in candidates])
    b = gather_bytes_from(student, [s_side.starts[k] for k in candidates],
                          [s_side.lengths[k] for k in candidates])
    totals = np.fromiter((int(t_side.lengths[k].sum()) for k in candidates), np.int64)
    seq_of_byte = np.repeat(np.arange(len(candidates)), totals)
    bad = np.zeros(len(candidates), dtype=bool)
    bad[np.unique(seq_of_byte[a != b])] = True
    return [k for k, is_bad in zip(candidates, bad) if not is_bad]


def gather_bytes_from(table: ByteTable, starts: list[np.ndarray], lengths: list[np.ndarray]):
    """uint8 bytes of many sequences back to back, given per-token starts and lengths."""
    if not starts:
        return np.zeros(0, dtype=np.uint8)
    return _sequence_bytes(table, np.concatenate(starts), np.concatenate(lengths))


def _with_end_chunk(chunks, aligned, unaligned_bytes, t_side: _Side, s_side: _Side, k: int):
    n_content, m_content = t_side.ids[k].size, s_side.ids[k].size
    t_end, s_end = t_side.end_index[k], s_side.end_index[k]
    is_end = np.zeros(chunks.shape[0], dtype=bool)
    if t_end >= 0 or s_end >= 0:
        t_hi = n_content + (t_end >= 0)
        s_hi = m_content + (s_end >= 0)
        chunks = np.concatenate([chunks, [[n_content, t_hi, m_content, s_hi]]]).astype(np.int64)
        both = t_end >= 0 and s_end >= 0
        aligned = np.concatenate([aligned, [both]])
        is_end = np.concatenate([is_end, [both]])
    return Alignment(
        chunks=chunks.reshape(-1, 4).astype(np.int64),
        aligned=aligned.astype(bool),
        is_end=is_end,
        teacher_length=n_content + (t_end >= 0),
        student_length=m_content + (s_end >= 0),
        unaligned_bytes=unaligned_bytes,
    )


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
