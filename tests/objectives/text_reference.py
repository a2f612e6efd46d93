"""A slow, obviously correct text-event space (per chunk, per token, from the definitions in
``ctopd.objectives.text_events``), to test the vectorised one against."""

from __future__ import annotations

import torch

from ctopd.objectives.text_events import TextTables, context_lengths


def _bytes_of(table, token_id: int, *, first: bool) -> bytes | None:
    if table.special[token_id]:
        return None
    data = table.token_bytes(token_id)
    if first and table.dummy_prefix and data[:1] == b" ":
        data = data[1:]
    return data


def _owner(data: bytes, class_of: dict) -> int:
    for length in range(len(data), 0, -1):
        if data[:length] in class_of:
            return class_of[data[:length]]
    return -1


def _lcp(a: bytes, b: bytes) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def reference_events(
    logits: torch.Tensor,
    ids: list[int],
    positions: list[int],
    table,
    tables: TextTables,
    chunk_bytes: bytes,
    limit: int,
) -> torch.Tensor:
    """float64 ``[C + n + 1]`` event log-probabilities of one chunk under one model.

    Args:
        logits: float ``[r, V]``: the model's logits at the chunk's ``r`` on-path positions.
        ids: the realised tokens; positions: their response positions.
        table: that model's byte table.
        tables: the pair's tables (for the classes and the cell rule).
        chunk_bytes: ``U``; limit: ``L``.
    """
    import numpy as np

    vocab = tables.shared_vocab
    classes = vocab.size
    class_of = {b: c for c, b in enumerate(vocab.class_bytes[:-1])}
    n = len(chunk_bytes)
    probs = torch.softmax(logits.double(), dim=-1)
    lengths = context_lengths(table, np.asarray(ids), np.asarray(positions))
    offsets = [int(sum(lengths[:j])) for j in range(len(ids))]
    prefix_classes = {
        class_of[chunk_bytes[:m]]
        for m in range(1, n + 1)
        if chunk_bytes[:m] in class_of and m < limit
    }
    cells = torch.zeros(classes, dtype=torch.float64)
    events = torch.zeros(n + 1, dtype=torch.float64)  # [E_U, E_0, ..., E_{n-1}]
    path = torch.ones((), dtype=torch.float64)
    end_ids = set(table.end_ids.tolist())
    for j, (token, pos, o) in enumerate(zip(ids, positions, offsets, strict=True)):
        rest = chunk_bytes[o:]
        for v in range(probs.shape[1]):
            p = path * probs[j, v]
            if j < len(ids) - 1 and v == token:
                continue  # the path goes on
            data = _bytes_of(table, v, first=pos == 0)
            if data is None or data == b"":
                if j == 0 and v in end_ids and tables.cell_classes[vocab.end_class]:
                    cells[vocab.end_class] += p
                elif data == b"" and o == n:
                    events[0] += p
                else:
                    events[1 + o if o < n else 0] += p
                continue
            if j == 0:
                owner = _owner(data, class_of)
                shared = _lcp(data, chunk_bytes)
                if (
                    owner >= 0
                    and tables.cell_classes[owner]
                    and owner not in prefix_classes
                    and shared < limit
                    and not chunk_bytes.startswith(vocab.class_bytes[owner])
                ):
                    cells[owner] += p
                    continue
            shared = _lcp(data, rest)
            if shared == len(rest):
                events[0] += p
            else:
                events[1 + o + shared] += p
        path = path * probs[j, token]
    out = torch.full((classes + n + 1,), -1e30, dtype=torch.float64)
    is_cell = torch.zeros(classes, dtype=torch.bool)
    for c in range(classes - 1):
        data = vocab.class_bytes[c]
        is_cell[c] = (
            bool(tables.cell_classes[c])
            and c not in prefix_classes
            and not chunk_bytes.startswith(data)
            and _lcp(data, chunk_bytes) < limit
        )
    is_cell[vocab.end_class] = bool(tables.cell_classes[vocab.end_class])
    out[:classes] = torch.where(is_cell, cells.clamp(min=1e-30).log(), out[:classes])
    out[classes:] = events.clamp(min=1e-30).log()
    return out
