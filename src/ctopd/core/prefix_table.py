"""Vocabularies sorted by bytes: "the tokens whose bytes start with ``w``" as one contiguous range.

The exact SimCT supervision space (``ctopd.objectives.text_events``) groups a model's next-token
distribution into *text events*: "the text continues with these bytes", "the text leaves the
chunk at byte ``m``". Sorting a vocabulary's byte strings once turns every such group into a
range of the sorted order, so a cumulative sum over the sorted probabilities answers any number
of them with two gathers. This module holds the sorted tables and the vectorised range search
(numpy only).

Byte strings are compared through an order-preserving escape so that numpy's fixed-width byte
strings (which drop trailing NUL bytes) and a ``0xFF`` end marker are safe: byte ``0x00`` becomes
``01 01``, ``0x01`` becomes ``01 02``, ``0xFE`` becomes ``FE 01``, ``0xFF`` becomes ``FE 02``, every
other byte stays. The escape is a prefix code that keeps lexicographic order, contains no
``0x00`` and no ``0xFF``, so ``[searchsorted(w), searchsorted(w + 0xFF))`` is exactly the range of
strings that start with ``w``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctopd.core.byte_table import ByteTable
from ctopd.core.shared_vocab import SharedVocab

_ESCAPE_LENGTH = np.ones(256, dtype=np.int64)
_ESCAPE_LENGTH[[0x00, 0x01, 0xFE, 0xFF]] = 2
_ESCAPE_FIRST = np.arange(256, dtype=np.uint8)
_ESCAPE_FIRST[[0x00, 0x01]] = 0x01
_ESCAPE_FIRST[[0xFE, 0xFF]] = 0xFE
_ESCAPE_SECOND = np.zeros(256, dtype=np.uint8)
_ESCAPE_SECOND[[0x00, 0xFE]] = 0x01
_ESCAPE_SECOND[[0x01, 0xFF]] = 0x02


def escape_bytes(data: bytes) -> bytes:
    """The order-preserving escape of one byte string (see the module docstring)."""
    escaped, _ = escape_flat(np.frombuffer(data, dtype=np.uint8))
    return escaped.tobytes()


def escape_flat(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Escape a flat uint8 array.

    Returns:
        ``(escaped, offsets)``: the escaped uint8 bytes and int64 ``[len(flat) + 1]`` offsets:
        original byte ``i`` starts at ``escaped[offsets[i]]``.
    """
    flat = np.asarray(flat, dtype=np.uint8)
    lengths = _ESCAPE_LENGTH[flat]
    offsets = np.zeros(flat.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    escaped = np.empty(int(offsets[-1]), dtype=np.uint8)
    escaped[offsets[:-1]] = _ESCAPE_FIRST[flat]
    two = lengths == 2
    escaped[offsets[:-1][two] + 1] = _ESCAPE_SECOND[flat[two]]
    return escaped, offsets


def window_keys(
    escaped: np.ndarray,
    offsets: np.ndarray,
    start: np.ndarray,
    stop: np.ndarray,
    *,
    end_marker: bool,
) -> np.ndarray:
    """Fixed-width byte-string keys of the windows ``flat[start_q:stop_q]`` (escaped).

    Args:
        escaped, offsets: from :func:`escape_flat` of the flat bytes.
        start, stop: int64 ``[Q]`` windows in original byte positions.
        end_marker: append ``0xFF`` to every key (the upper bound of "starts with").

    Returns:
        numpy ``S`` array ``[Q]``.
    """
    lo, hi = offsets[start], offsets[stop]
    width = int((hi - lo).max(initial=0)) + 1
    matrix = np.zeros((start.size, width), dtype=np.uint8)
    sizes = hi - lo
    rows = np.repeat(np.arange(start.size), sizes)
    first = np.cumsum(sizes) - sizes
    cols = np.arange(rows.size) - first[rows]
    matrix[rows, cols] = escaped[lo[rows] + cols]
    if end_marker:
        matrix[np.arange(start.size), sizes] = 0xFF
    return matrix.view(f"S{width}").reshape(-1)


@dataclass(frozen=True)
class SortedVocab:
    """One vocabulary's ordinary tokens sorted by their bytes (as they mean at some position).

    Attributes:
        order: int64 ``[N]``: token ids sorted by bytes (special and empty ids left out).
        keys: ``S`` ``[N]``: their escaped bytes, ascending.
        owner: int64 ``[V]``: for every id, the shared class whose bytes are the longest prefix
            of the id's bytes (the id's own class when it is shared); the end class for end ids;
            ``-1`` when no shared class is a prefix.
    """

    order: np.ndarray
    keys: np.ndarray
    owner: np.ndarray

    def ranges(self, keys: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int64 ``[Q]`` ``(lo, hi)``: the sorted positions of the tokens that start with each
        query (``keys`` without, ``upper`` with the end marker; :func:`window_keys`)."""
        return (
            np.searchsorted(self.keys, keys, side="left").astype(np.int64),
            np.searchsorted(self.keys, upper, side="left").astype(np.int64),
        )


@dataclass(frozen=True)
class SortedClasses:
    """The shared classes (end class left out) sorted by bytes.

    Attributes:
        order: int64 ``[C - 1]``: class indices sorted by bytes.
        keys: ``S`` ``[C - 1]``: their escaped bytes, ascending.
        rank: int64 ``[C]``: position of each class in ``order`` (``-1`` for the end class).
    """

    order: np.ndarray
    keys: np.ndarray
    rank: np.ndarray

    def ranges(self, keys: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`SortedVocab.ranges`, over the classes."""
        return (
            np.searchsorted(self.keys, keys, side="left").astype(np.int64),
            np.searchsorted(self.keys, upper, side="left").astype(np.int64),
        )

    def exact(self, keys: np.ndarray) -> np.ndarray:
        """int64 ``[Q]``: the class whose bytes equal each query, ``-1`` where none does."""
        if self.keys.size == 0:
            return np.full(keys.shape, -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.keys, keys, side="left"), self.keys.size - 1)
        found = self.keys[at] == keys
        return np.where(found, self.order[at], -1).astype(np.int64)


def token_byte_list(table: ByteTable, *, strip_space: bool = False) -> list[bytes | None]:
    """Every id's bytes (``None`` for special ids); ``strip_space`` drops one leading space (a
    dummy-prefix tokenizer's first response token means its bytes without it)."""
    flat = table.flat_bytes.tobytes()
    out: list[bytes | None] = []
    for token_id in range(table.vocab_size):
        if table.special[token_id]:
            out.append(None)
            continue
        start, length = int(table.starts[token_id]), int(table.lengths[token_id])
        data = flat[start : start + length]
        if strip_space and data[:1] == b" ":
            data = data[1:]
        out.append(data)
    return out


def build_sorted_vocab(
    table: ByteTable, shared_vocab: SharedVocab, *, strip_space: bool = False
) -> SortedVocab:
    """Sort ``table``'s ordinary ids by bytes and find each id's owner class.

    Args:
        table: the tokenizer's byte table.
        shared_vocab: the pair's shared classes (for the owners).
        strip_space: the bytes as they mean at a dummy-prefix tokenizer's first response
            position (one leading space dropped).
    """
    token_bytes = token_byte_list(table, strip_space=strip_space)
    class_of = {b: c for c, b in enumerate(shared_vocab.class_bytes[:-1])}
    ids = [i for i, b in enumerate(token_bytes) if b]
    ids.sort(key=lambda i: token_bytes[i])
    owner = np.full(table.vocab_size, -1, dtype=np.int64)
    for token_id in ids:
        data = token_bytes[token_id]
        for length in range(len(data), 0, -1):  # the longest shared prefix
            found = class_of.get(data[:length])
            if found is not None:
                owner[token_id] = found
                break
    owner[table.end_ids] = shared_vocab.end_class
    keys = _keys([token_bytes[i] for i in ids])
    return SortedVocab(order=np.asarray(ids, dtype=np.int64), keys=keys, owner=owner)


def build_sorted_classes(shared_vocab: SharedVocab) -> SortedClasses:
    """Sort the shared classes (end class excluded) by bytes."""
    classes = shared_vocab.class_bytes[:-1]
    order = sorted(range(len(classes)), key=lambda c: classes[c])
    rank = np.full(shared_vocab.size, -1, dtype=np.int64)
    rank[order] = np.arange(len(order))
    return SortedClasses(
        order=np.asarray(order, dtype=np.int64), keys=_keys([classes[c] for c in order]), rank=rank
    )


def _keys(strings: list[bytes]) -> np.ndarray:
    escaped = [escape_bytes(s) for s in strings]
    width = max((len(s) for s in escaped), default=1)
    return np.array(escaped, dtype=f"S{max(width, 1)}")
