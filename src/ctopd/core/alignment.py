"""Minimal aligned chunks between two tokenisations of the same response (docs/concepts/alignment.md).

Let ``P_T`` and ``P_S`` be the cumulative byte offsets of the teacher's and the student's tokens.
Every pair of consecutive common offsets ``P_T ∩ P_S`` is one chunk: teacher tokens
``[teacher_start, teacher_end)`` and student tokens ``[student_start, student_end)`` spelling the
same bytes. Chunks partition both sequences and are minimal (no chunk contains an offset both
sides share).

When the two byte strings really differ (a normaliser rewrote the text, the student sampled
invalid UTF-8, a special token sits inside the response), the byte strings are matched first
(they are equal almost everywhere), common offsets are taken only where both sides agree, and
each chunk that touches a difference is marked unaligned.

The common case, equal bytes, is computed for a whole batch at once with numpy, in time linear
in tokens: chunk starts come from marking where each side's tokens start, and the bytes of
each chunk are checked equal as packed 64-bit words (chunks of up to 8 bytes) or byte by byte
(longer ones). Only sequences whose bytes differ take the per-sequence path with a byte matcher.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass

import numpy as np

from ctopd.core.byte_table import (
    SPECIAL_PLACEHOLDER,
    ByteTable,
    adds_dummy_prefix,
    check_ids_in_range,
    first_bytes_of,
)

# Above this many differing bytes in the middle of a pair, the byte matcher (quadratic in the
# worst case) is not run on the whole middle: the middle is first cut at an anchor, a run of
# ANCHOR_BYTES bytes found once in each side, and each part is matched on its own. Only a middle
# with no such anchor stays one unaligned region.
MAX_MATCHED_MIDDLE_BYTES = 20_000
ANCHOR_BYTES = 32
# A large batch is aligned in blocks of about this many student tokens.
BLOCK_TOKENS = 65_536


@dataclass(slots=True)
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
        teacher_dummy_space: the first teacher token's leading space is a dummy prefix, left out
            of the text (its bytes there are its table bytes less that space).
        student_dummy_space: the same for the first student token.
    """

    chunks: np.ndarray
    aligned: np.ndarray
    is_end: np.ndarray
    teacher_length: int
    student_length: int
    unaligned_bytes: int = 0
    teacher_dummy_space: bool = False
    student_dummy_space: bool = False

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

    Token byte lengths count a special id as one placeholder byte and leave out a leading
    dummy-prefix space (docs/concepts/alignment.md); a trailing end id is part of ``ids`` and ``lengths`` but
    not of the sequence's content.
    """

    table: ByteTable
    ids: np.ndarray  # int64 [N]
    seq_start: np.ndarray  # int64 [B + 1], first token of each sequence in the flat arrays
    has_end: np.ndarray  # bool [B], the sequence's last token is an end id
    content_count: np.ndarray  # int64 [B], tokens before the trailing end id
    lengths: np.ndarray  # int64 [N], bytes per token
    byte_offsets: np.ndarray  # int64 [N + 1], cumulative ``lengths`` (0 first)
    stripped: np.ndarray  # int64 [S], sorted tokens whose dummy-prefix space was left out
    content_specials: np.ndarray  # int64 [B], special ids among each sequence's content

    @property
    def counts(self) -> np.ndarray:
        """int64 ``[B]``: tokens per sequence, trailing end id included."""
        return np.diff(self.seq_start)

    def dummy_spaces(self) -> np.ndarray:
        """bool ``[B]``: sequences whose first token's dummy-prefix space was left out."""
        out = np.zeros(self.counts.size, dtype=bool)
        out[np.searchsorted(self.seq_start, self.stripped, side="right") - 1] = True
        return out

    def content_bytes(self) -> np.ndarray:
        """int64 ``[B]``: bytes of each sequence's content."""
        first = self.seq_start[:-1]
        return self.byte_offsets[first + self.content_count] - self.byte_offsets[first]

    def starts(self, index: np.ndarray) -> np.ndarray:
        """int64: where the bytes of tokens ``index`` begin in ``table.flat_bytes`` (-1 for
        specials), after any left-out dummy-prefix space."""
        ids = self.ids[index]
        out = np.where(self.table.special[ids], -1, self.table.starts[ids])
        if self.stripped.size:
            pos = np.minimum(np.searchsorted(self.stripped, index), self.stripped.size - 1)
            out += self.stripped[pos] == index
        return out

    def special(self, index) -> np.ndarray:
        """bool: whether tokens ``index`` are special ids."""
        return self.table.special[self.ids[index]]

    def words(self) -> np.ndarray:
        """uint64 ``[N]``: each token's first 8 bytes, packed (see ``ByteTable.words``)."""
        words = self.table.words[self.ids]
        if self.stripped.size:
            # Without its leading space a token's word loses its low byte and, when it is longer
            # than 8 bytes, gains its 9th byte at the top.
            ids = self.ids[self.stripped]
            ninth = self.table.flat_bytes[
                np.minimum(self.table.starts[ids] + 8, self.table.flat_bytes.size - 1)
            ]
            ninth = np.where(self.table.lengths[ids] > 8, ninth, 0).astype(np.uint64)
            words[self.stripped] = (words[self.stripped] >> np.uint64(8)) | (ninth << np.uint64(56))
        return words

    def select(self, keep: np.ndarray) -> _Side:
        """The same side restricted to the sequences where ``keep`` (bool ``[B]``) is True."""
        counts = self.counts
        token_keep = np.repeat(keep, counts)
        new_index = np.cumsum(token_keep) - 1
        lengths = self.lengths[token_keep]
        return _Side(
            table=self.table,
            ids=self.ids[token_keep],
            seq_start=np.concatenate([[0], np.cumsum(counts[keep])]),
            has_end=self.has_end[keep],
            content_count=self.content_count[keep],
            lengths=lengths,
            byte_offsets=np.concatenate([[0], np.cumsum(lengths)]),
            stripped=new_index[self.stripped[token_keep[self.stripped]]],
            content_specials=self.content_specials[keep],
        )


def _flatten(ids_list: list) -> tuple[np.ndarray, np.ndarray]:
    """``(int64 [N] all ids back to back, int64 [B] ids per sequence)``."""
    counts = np.fromiter(map(len, ids_list), np.int64, len(ids_list))
    if isinstance(ids_list[0], np.ndarray):  # 1-D int arrays (the trainer's): one concatenate
        try:
            flat = np.concatenate(ids_list)
        except ValueError:
            flat = None
        if (
            flat is not None
            and flat.ndim == 1
            and flat.dtype.kind in "iu"
            and (flat.size == counts.sum())
        ):
            return flat.astype(np.int64, copy=False), counts
    for x in ids_list:
        if getattr(x, "ndim", 1) != 1:
            raise ValueError(
                f"each id sequence must be 1-D; got one of shape {tuple(x.shape)} (pass a list "
                "of sequences, e.g. list(batch) for a [B, n] tensor without its padding)"
            )
    flat = np.fromiter(
        itertools.chain.from_iterable(x.tolist() if hasattr(x, "tolist") else x for x in ids_list),
        np.int64,
        int(counts.sum()),
    )
    return flat, counts


def _prepare_side(
    table: ByteTable, ids_list: list, label: str, prefixed: np.ndarray | None = None
) -> _Side:
    """Flat arrays of one side of a batch.

    Args:
        prefixed: bool ``[B]``: whether each sequence's first token carries a dummy-prefix space
            that is not content; ``None``: the tokenizer's decoding rule (``decoder_strips_space``,
            the reading of sampled ids). A space is left out only from a first token that is not
            special and starts with one.
    """
    ids, counts = _flatten(ids_list)
    check_ids_in_range(ids, table.vocab_size, f"{label} {table.name}")
    seq_start = np.concatenate([[0], np.cumsum(counts)])
    last = seq_start[1:] - 1
    has_end = np.zeros(counts.size, dtype=bool)
    nonempty = counts > 0
    has_end[nonempty] = table.is_end[ids[last[nonempty]]]
    content_count = counts - has_end
    lengths = table.placeholder_lengths[ids]
    content_specials = np.zeros(counts.size, dtype=np.int64)
    special_at = np.flatnonzero(table.special[ids])
    if special_at.size:
        seq = np.searchsorted(seq_start, special_at, side="right") - 1
        in_content = special_at < seq_start[seq] + content_count[seq]
        content_specials = np.bincount(seq[in_content], minlength=counts.size)
    stripped = np.zeros(0, dtype=np.int64)
    strip = (content_count > 0) & (table.decoder_strips_space if prefixed is None else prefixed)
    if strip.any():
        # The dummy-prefix space is the tokenizer's artefact, not content (docs/concepts/alignment.md).
        first = seq_start[:-1][strip]
        first = first[~table.special[ids[first]] & (lengths[first] > 0)]
        stripped = first[table.flat_bytes[table.starts[ids[first]]] == 0x20]
        lengths[stripped] -= 1
    byte_offsets = np.zeros(ids.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=byte_offsets[1:])
    return _Side(
        table,
        ids,
        seq_start,
        has_end,
        content_count,
        lengths,
        byte_offsets,
        stripped,
        content_specials,
    )


def _prefixed_for_text_of(table: ByteTable, side: _Side) -> np.ndarray:
    """bool ``[B]``: whether ``table``'s tokenizer puts a dummy prefix before the text of each
    of ``side``'s sequences (only the rule "unless_space" needs the text's first byte)."""
    if table.prefix_rule == "unless_space":
        return adds_dummy_prefix(table, _first_text_bytes(side))
    return np.full(side.counts.size, table.prefix_rule == "always")


def _first_text_bytes(side: _Side) -> np.ndarray:
    """int64 ``[B]``: the first byte of each sequence's text (its content without specials,
    dummy-prefix space left out), ``-1`` where the text is empty."""
    out = np.full(side.counts.size, -1, dtype=np.int64)
    seqs = np.flatnonzero(side.content_count > 0)
    first = side.seq_start[:-1][seqs]
    readable = ~side.special(first) & (side.lengths[first] > 0)
    out[seqs[readable]] = side.table.flat_bytes[side.starts(first[readable])]
    rest = seqs[~readable]  # rare: a response that opens with a special or a lone "▁"
    if not rest.size:
        return out
    candidates = np.flatnonzero(~side.table.special[side.ids] & (side.lengths > 0))
    if candidates.size:
        pos = np.minimum(np.searchsorted(candidates, side.seq_start[rest]), candidates.size - 1)
        token = candidates[pos]
        inside = (token >= side.seq_start[rest]) & (
            token < side.seq_start[rest] + side.content_count[rest]
        )
        out[rest[inside]] = side.table.flat_bytes[side.starts(token[inside])]
    return out


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
        out[np.repeat(starts < 0, lengths)] = SPECIAL_PLACEHOLDER
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
    mid_a, mid_b = a[prefix : la - suffix], b[prefix : lb - suffix]
    blocks += [(prefix + i, prefix + j, n) for i, j, n in _middle_blocks(mid_a, mid_b)]
    if suffix:
        blocks.append((la - suffix, lb - suffix, suffix))
    return blocks


def _middle_blocks(a: np.ndarray, b: np.ndarray) -> list[tuple[int, int, int]]:
    """Matching blocks of two middles that differ at both ends: difflib's when both are at most
    ``MAX_MATCHED_MIDDLE_BYTES`` long; else the blocks of each side of an anchor (a run of
    ``ANCHOR_BYTES`` bytes that occurs once in ``b``), found near the middle of ``a``; none
    when there is no anchor. Every block is a run of equal bytes, in increasing order."""
    if not a.size or not b.size:
        return []
    if max(a.size, b.size) <= MAX_MATCHED_MIDDLE_BYTES:
        matcher = difflib.SequenceMatcher(None, a.tobytes(), b.tobytes(), autojunk=False)
        return [(i, j, n) for i, j, n in matcher.get_matching_blocks() if n]
    anchor = _anchor(a.tobytes(), b.tobytes())
    if anchor is None:
        return []
    i, j = anchor
    k = ANCHOR_BYTES
    right = _matching_blocks(a[i + k :], b[j + k :])
    return [
        *_matching_blocks(a[:i], b[:j]),
        (i, j, k),
        *[(i + k + x, j + k + y, n) for x, y, n in right],
    ]


def _anchor(a: bytes, b: bytes, tries: int = 256) -> tuple[int, int] | None:
    """``(i, j)`` with ``a[i:i+ANCHOR_BYTES] == b[j:j+ANCHOR_BYTES]``, that run occurring once in
    ``b``; ``i`` tried from the middle of ``a`` outwards."""
    k = ANCHOR_BYTES
    if len(a) < k or len(b) < k:
        return None
    middle, step = (len(a) - k) // 2, max(1, (len(a) - k) // (2 * tries))
    for n in range(tries):
        for i in (middle + n * step, middle - n * step):
            if not 0 <= i <= len(a) - k:
                continue
            run = a[i : i + k]
            j = b.find(run)
            if j >= 0 and b.find(run, j + 1) < 0:
                return i, j
    return None


def _align_one_slow(t_side: _Side, s_side: _Side, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Chunks and aligned flags of the content of sequence ``k``, whose bytes may differ."""
    t_index = np.arange(t_side.seq_start[k], t_side.seq_start[k] + t_side.content_count[k])
    s_index = np.arange(s_side.seq_start[k], s_side.seq_start[k] + s_side.content_count[k])
    t_len, s_len = t_side.lengths[t_index], s_side.lengths[s_index]
    a = _sequence_bytes(t_side.table, t_side.starts(t_index), t_len)
    b = _sequence_bytes(s_side.table, s_side.starts(s_index), s_len)
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
    aligned &= ~_chunk_has_special(chunks, t_side.special(t_index), s_side.special(s_index))
    unaligned_bytes = int(np.diff(cuts[:, 1])[~aligned].sum())
    return chunks, aligned, unaligned_bytes


def _chunk_has_special(chunks: np.ndarray, t_special: np.ndarray, s_special: np.ndarray):
    def any_in(flags: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        csum = np.concatenate([[0], np.cumsum(flags)])
        return (csum[hi] - csum[lo]) > 0

    return any_in(t_special, chunks[:, 0], chunks[:, 1]) | any_in(
        s_special, chunks[:, 2], chunks[:, 3]
    )


def _fast_candidates(t_side: _Side, s_side: _Side) -> np.ndarray:
    """bool ``[B]``: sequences the batched path can align: content of equal byte length (> 0) on
    both sides, no special id inside it, an end id on both sides or neither, and no token that
    spells zero bytes except a sequence's first. Their bytes are still compared chunk by chunk."""
    t_bytes, s_bytes = t_side.content_bytes(), s_side.content_bytes()
    ok = (
        (t_bytes == s_bytes)
        & (t_bytes > 0)
        & (t_side.has_end == s_side.has_end)
        & (t_side.content_specials == 0)
        & (s_side.content_specials == 0)
    )
    for side in (t_side, s_side):
        empty = np.flatnonzero(side.lengths == 0)
        if empty.size:
            seq = np.searchsorted(side.seq_start, empty, side="right") - 1
            ok[seq[empty != side.seq_start[seq]]] = False
    return ok


def _token_runs(first: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Token indices of the ranges ``[first, stop)``, back to back."""
    sizes = stop - first
    return np.arange(int(sizes.sum())) + np.repeat(first - (np.cumsum(sizes) - sizes), sizes)


def _packed_prefix(side: _Side, first: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """uint64 ``[K + 1]``: running sums (mod 2**64) of the chunks' packed bytes, so that
    ``diff`` gives each chunk of at most 8 bytes its bytes packed little-endian.

    A token's word is shifted by 8 bits per byte it starts into its chunk; tokens of a chunk of
    at most 8 bytes occupy disjoint bits, so their sum is the chunk's packed bytes. Longer
    chunks give meaningless sums (shifts of 64 bits and more are 0) and are compared byte by
    byte instead.
    """
    shifts = (side.byte_offsets[:-1] - np.repeat(side.byte_offsets[first], stop - first)).view(
        np.uint64
    )
    shifts <<= np.uint64(3)
    running = np.zeros(side.ids.size + 1, dtype=np.uint64)
    np.cumsum(side.words() << shifts, out=running[1:])
    return running[np.append(first, side.ids.size)]


def _differing_chunks(
    t_side: _Side,
    s_side: _Side,
    t_first: np.ndarray,
    s_first: np.ndarray,
    t_stop: np.ndarray,
    s_stop: np.ndarray,
    chunk_bytes: np.ndarray,
) -> np.ndarray:
    """bool ``[K]``: chunks whose bytes differ between the sides (their lengths are equal).

    Exact, and linear in tokens rather than bytes: a chunk of at most 8 bytes is compared as
    one packed 64-bit word per side, a longer one byte by byte.
    """
    # Chunk k's packed bytes are equal iff the difference of the two running sums is the same
    # before and after it.
    gap = _packed_prefix(t_side, t_first, t_stop) - _packed_prefix(s_side, s_first, s_stop)
    differ = (np.diff(gap) != 0) & (chunk_bytes <= 8)
    long = np.flatnonzero(chunk_bytes > 8)
    if long.size:
        t_index = _token_runs(t_first[long], t_stop[long])
        s_index = _token_runs(s_first[long], s_stop[long])
        a = _sequence_bytes(t_side.table, t_side.starts(t_index), t_side.lengths[t_index])
        b = _sequence_bytes(s_side.table, s_side.starts(s_index), s_side.lengths[s_index])
        where = np.flatnonzero(a != b)
        if where.size:
            differ[long[np.searchsorted(np.cumsum(chunk_bytes[long]), where, side="right")]] = True
    return differ


def _align_fast(t_side: _Side, s_side: _Side) -> list[Alignment | None]:
    """Alignments of sequences that :func:`_fast_candidates` accepted, all in one pass; ``None``
    for a sequence whose bytes turn out to differ.

    The sequences are laid end to end. Each token starts at a byte offset of that stream; a
    chunk starts wherever a teacher token and a student token start at the same offset, so
    chunk boundaries come from marking offsets (linear in bytes, no search). A trailing end id
    counts as one placeholder byte on each side, which makes it a chunk of its own.
    """
    t_offsets, s_offsets = t_side.byte_offsets[:-1], s_side.byte_offsets[:-1]
    total = int(t_side.byte_offsets[-1])
    # A token opens a chunk when a token of the other side starts at the same offset.
    starts_here = np.zeros(total + 1, dtype=bool)
    starts_here[s_offsets] = True
    t_opens = starts_here[t_offsets]
    starts_here[:] = False
    starts_here[t_offsets] = True
    s_opens = starts_here[s_offsets]
    # A zero-length token (only ever a sequence's first) shares its offset with the next one;
    # it opens the chunk and the next token joins it.
    for side, opens in ((t_side, t_opens), (s_side, s_opens)):
        opens[np.flatnonzero(side.lengths == 0) + 1] = False
    t_first, s_first = np.flatnonzero(t_opens), np.flatnonzero(s_opens)
    t_stop = np.append(t_first[1:], t_side.ids.size)
    s_stop = np.append(s_first[1:], s_side.ids.size)
    chunk_bytes = np.diff(np.append(t_offsets[t_first], total))
    first_chunk = np.searchsorted(t_first, t_side.seq_start[:-1])
    chunks_per_seq = np.diff(np.append(first_chunk, t_first.size))

    differ = np.flatnonzero(
        _differing_chunks(t_side, s_side, t_first, s_first, t_stop, s_stop, chunk_bytes)
    )
    bad = np.zeros(first_chunk.size, dtype=bool)
    bad[np.searchsorted(first_chunk, differ, side="right") - 1] = True

    t_base = np.repeat(t_side.seq_start[:-1], chunks_per_seq)
    s_base = np.repeat(s_side.seq_start[:-1], chunks_per_seq)
    chunks = np.empty((t_first.size, 4), dtype=np.int64)
    chunks[:, 0] = t_first - t_base
    chunks[:, 1] = t_stop - t_base
    chunks[:, 2] = s_first - s_base
    chunks[:, 3] = s_stop - s_base
    aligned = np.ones(t_first.size, dtype=bool)
    is_end = np.zeros(t_first.size, dtype=bool)
    is_end[(first_chunk + chunks_per_seq - 1)[t_side.has_end]] = True
    bounds = np.append(first_chunk, t_first.size).tolist()
    t_lengths, s_lengths = t_side.counts.tolist(), s_side.counts.tolist()
    t_spaces, s_spaces = t_side.dummy_spaces().tolist(), s_side.dummy_spaces().tolist()
    return [
        None
        if is_bad
        else Alignment(chunks[lo:hi], aligned[lo:hi], is_end[lo:hi], n, m, 0, t_space, s_space)
        for is_bad, lo, hi, n, m, t_space, s_space in zip(
            bad.tolist(), bounds[:-1], bounds[1:], t_lengths, s_lengths, t_spaces, s_spaces
        )
    ]


def align_ids_batch(
    teacher: ByteTable,
    student: ByteTable,
    teacher_ids: list,
    student_ids: list,
    *,
    texts: list[str] | None = None,
    teacher_sampled: bool = False,
) -> list[Alignment]:
    """Align many responses; see :func:`align_ids` for one.

    Sequences whose bytes are equal on both sides (the common case) are aligned together in one
    vectorised pass; the others go through the byte matcher one by one.

    How a first token's leading space is read (a dummy-prefix space is the tokenizer's
    artefact, not content, docs/concepts/alignment.md; which one it is depends on the text):

    * ``texts`` given: each side's ids are its tokenizer's own encoding of ``texts[b]``, and a
      side's first token loses one space exactly where its tokenizer's prefix rule puts one
      before that text (:func:`~ctopd.core.byte_table.adds_dummy_prefix`).
    * otherwise the student ids are a sampled response, read by the student's decoding rule
      (:func:`response_bytes_batch`), and the teacher ids are the teacher's encoding of that
      response's text (``TokenizerPair.teacher_ids_for``): the teacher's prefix rule is applied
      to that text. With ``teacher_sampled`` the teacher ids are read by the teacher's decoding
      rule instead (identical tokenizers, where the teacher scores the sampled ids themselves).

    Args:
        teacher: byte table of the teacher tokenizer.
        student: byte table of the student tokenizer.
        teacher_ids: ``B`` sequences of teacher response ids (lists or int arrays).
        student_ids: ``B`` sequences of student response ids.
        texts: ``B`` texts both sides encoded, or ``None`` for sampled responses.
        teacher_sampled: read the teacher ids like sampled ones (only without ``texts``).

    Returns:
        ``B`` :class:`Alignment` objects.

    Raises:
        ValueError: the batch sizes differ or an id is out of a tokenizer's range.
    """
    if len(teacher_ids) != len(student_ids) or (
        texts is not None and len(texts) != len(student_ids)
    ):
        raise ValueError(
            f"align_batch got {len(teacher_ids)} teacher sequences and {len(student_ids)} "
            "student sequences"
            + ("" if texts is None else f" for {len(texts)} texts")
            + "; pass one teacher sequence per student sequence (and per text)"
        )
    if not teacher_ids:
        return []
    first_bytes = None if texts is None else first_bytes_of(texts)
    # Blocks of about BLOCK_TOKENS tokens keep every temporary array in cache; a batch of any
    # size costs the same per token.
    sizes = np.fromiter(map(len, student_ids), np.int64, len(student_ids))
    block_of_seq = (np.cumsum(sizes) - sizes) // BLOCK_TOKENS
    cuts = np.flatnonzero(np.diff(block_of_seq)) + 1
    bounds = [0, *cuts.tolist(), len(student_ids)]
    results: list[Alignment] = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if first_bytes is None:
            s_side = _prepare_side(student, student_ids[lo:hi], "student")
            t_prefixed = None if teacher_sampled else _prefixed_for_text_of(teacher, s_side)
        else:
            s_side = _prepare_side(
                student,
                student_ids[lo:hi],
                "student",
                adds_dummy_prefix(student, first_bytes[lo:hi]),
            )
            t_prefixed = adds_dummy_prefix(teacher, first_bytes[lo:hi])
        t_side = _prepare_side(teacher, teacher_ids[lo:hi], "teacher", t_prefixed)
        results.extend(_align_block(t_side, s_side))
    return results


def _align_block(t_side: _Side, s_side: _Side) -> list[Alignment]:
    candidate = _fast_candidates(t_side, s_side)
    results: list[Alignment | None] = [None] * int(candidate.size)
    if candidate.any():
        everyone = bool(candidate.all())
        fast = _align_fast(
            t_side if everyone else t_side.select(candidate),
            s_side if everyone else s_side.select(candidate),
        )
        for k, alignment in zip(np.flatnonzero(candidate).tolist(), fast):
            results[k] = alignment
    for k, alignment in enumerate(results):
        if alignment is None:
            chunks, aligned, unaligned_bytes = _align_one_slow(t_side, s_side, k)
            results[k] = _with_end_chunk(chunks, aligned, unaligned_bytes, t_side, s_side, k)
    return results


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
        teacher_dummy_space=bool(n_content and np.isin(t_side.seq_start[k], t_side.stripped)),
        student_dummy_space=bool(m_content and np.isin(s_side.seq_start[k], s_side.stripped)),
    )


def response_bytes_batch(table: ByteTable, ids_list: list) -> tuple[list[bytes], np.ndarray]:
    """The text bytes of many sampled responses at once.

    The rule: a sampled response's text is what the student's tokenizer decodes its ids to as
    the opening of the assistant's turn, the context it was sampled in, i.e.
    ``tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)`` with
    a trailing end id left out. In bytes: the tokens' bytes back to back (exact also where a
    token holds part of a UTF-8 character, where ``decode`` would give U+FFFD), specials left
    out, and one leading space less where the tokenizer's decoder drops it
    (``ByteTable.decoder_strips_space``: a SentencePiece/Metaspace decoder drops the dummy-prefix
    space of the first token, so ``▁Sure`` opening a response is ``"Sure"``, ``▁``, ``▁Sure``
    is ``" Sure"``, and a first byte-fallback piece ``<0x20>`` is no text). Byte-level decoders
    drop nothing. A response that opens with a special token keeps the space of the token after
    it.

    Returns:
        ``(B byte strings, bool [B] whether each sequence ended with an end id)``.
    """
    if not ids_list:
        return [], np.zeros(0, dtype=bool)
    side = _prepare_side(table, ids_list, "student")
    keep = ~table.special[side.ids]
    keep[side.seq_start[1:][side.has_end] - 1] = False
    index = np.flatnonzero(keep)
    data = _sequence_bytes(table, side.starts(index), side.lengths[index]).tobytes()
    kept_before = np.concatenate([[0], np.cumsum(keep)])[side.seq_start]
    bounds = np.concatenate([[0], np.cumsum(side.lengths[index])])[kept_before].tolist()
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
