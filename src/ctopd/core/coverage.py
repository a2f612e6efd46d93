"""How much of the student's response gets supervision: shared-vocabulary-only matching versus
minimal aligned units (the "lost supervision" SimCT recovers), from alignments alone."""

from __future__ import annotations

import numpy as np

from ctopd.core.alignment import Alignment
from ctopd.core.shared_vocab import SharedVocab


def coverage_counts(
    alignments: list[Alignment], student_ids: list, shared_vocab: SharedVocab
) -> dict[str, int]:
    """Count student tokens and chunks by kind over a batch.

    Args:
        alignments: ``B`` alignments.
        student_ids: the ``B`` student id sequences they were computed from.
        shared_vocab: ``V∩`` of the pair.

    Returns:
        Integer counts: ``student_tokens``; ``shared_only_tokens`` (tokens in aligned 1:1 chunks
        whose token is in ``V∩``: what exact shared-token matching supervises);
        ``aligned_tokens`` (tokens in any aligned chunk: what minimal aligned units supervise);
        ``chunks_one_to_one``, ``chunks_multi``, ``chunks_unaligned``; ``unaligned_bytes``.
    """
    counts = dict.fromkeys(
        (
            "student_tokens",
            "shared_only_tokens",
            "aligned_tokens",
            "chunks_one_to_one",
            "chunks_multi",
            "chunks_unaligned",
            "unaligned_bytes",
        ),
        0,
    )
    for al, ids in zip(alignments, student_ids):
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        one_to_one = al.one_to_one
        first_student = ids[al.chunks[one_to_one, 2]]
        counts["student_tokens"] += al.student_length
        counts["shared_only_tokens"] += int(
            (shared_vocab.student_id_to_class[first_student] >= 0).sum()
        )
        counts["aligned_tokens"] += al.aligned_student_tokens
        counts["chunks_one_to_one"] += int(one_to_one.sum())
        counts["chunks_multi"] += int((al.aligned & ~one_to_one).sum())
        counts["chunks_unaligned"] += int((~al.aligned).sum())
        counts["unaligned_bytes"] += al.unaligned_bytes
    return counts


def coverage_summary(counts: dict[str, int], shared_vocab: SharedVocab) -> dict[str, float]:
    """Shares from :func:`coverage_counts`, plus the shared vocabulary size."""
    tokens = max(counts["student_tokens"], 1)
    return {
        **counts,
        "shared_only_coverage": counts["shared_only_tokens"] / tokens,
        "aligned_coverage": counts["aligned_tokens"] / tokens,
        "shared_vocab_size": shared_vocab.size,
    }
