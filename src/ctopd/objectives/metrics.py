"""The per-step numbers every objective reports (docs/concepts/metrics.md)."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from ctopd.objectives.plan import FlatChunks


def batch_metrics(flat: FlatChunks, teacher_token_logprobs: Tensor | None) -> dict[str, float]:
    """Counts that do not depend on the objective.

    Args:
        flat: all chunks of the batch.
        teacher_token_logprobs: float ``[B, n]`` or ``None``.

    Returns:
        ``student_tokens``, ``chunks_one_to_one``, ``chunks_multi`` (aligned chunks with more
        than one token on a side), ``unaligned_share`` (student tokens in unaligned chunks /
        student tokens) and ``teacher_logprob_mean`` (over teacher response tokens, 0.0 if
        there are none or no teacher).
    """
    student_tokens = int(flat.student_lengths.sum())
    one_to_one = flat.one_to_one
    unaligned_tokens = int(flat.student_sizes[~flat.aligned].sum())
    return {
        "student_tokens": float(student_tokens),
        "chunks_one_to_one": float(one_to_one.sum()),
        "chunks_multi": float((flat.usable & ~one_to_one).sum()),
        "unaligned_share": unaligned_tokens / student_tokens if student_tokens else 0.0,
        "teacher_logprob_mean": _teacher_mean(teacher_token_logprobs, flat.teacher_lengths),
    }


def _teacher_mean(token_logprobs: Tensor | None, lengths: np.ndarray) -> float:
    total = int(lengths.sum())
    if token_logprobs is None or total == 0:
        return 0.0
    summed = sum(float(token_logprobs[b, :n].sum()) for b, n in enumerate(lengths.tolist()))
    return summed / total


def finish_metrics(
    base: dict[str, float], *, loss: Tensor, kl: float, supervised_tokens: int, **extra: float
) -> dict[str, float]:
    """Add ``loss``, ``kl``, ``coverage`` and ``supervised_tokens`` (and ``extra``) to ``base``."""
    student_tokens = base["student_tokens"]
    out = dict(base)
    out.update(
        loss=float(loss.detach()),
        kl=float(kl),
        coverage=supervised_tokens / student_tokens if student_tokens else 0.0,
        supervised_tokens=float(supervised_tokens),
    )
    out.update({key: float(value) for key, value in extra.items()})
    return out
