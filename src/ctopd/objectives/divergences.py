"""Divergences between two distributions given as log-probabilities over the same support.

Every function takes normalised log-probabilities ``[K, N]`` (rows are distributions) and returns
one value per row ``[K]``. The student side carries the gradient; callers pass the teacher side
without one. Inputs must be finite: an absent support entry is written as a very negative finite
number (:data:`ABSENT`), never ``-inf``, so that ``0 * (a - b)`` stays 0 and no NaN reaches a
gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "tv")
# Log-score of a support entry that is not there (exp underflows to exactly 0 in float32/64).
ABSENT = -1e30


def reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """``KL(P_S || P_T) = sum P_S (log P_S - log P_T)`` per row; float ``[K]``."""
    return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)


def forward_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """``KL(P_T || P_S) = sum P_T (log P_T - log P_S)`` per row; float ``[K]``."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


def jsd(student_logp: Tensor, teacher_logp: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised Jensen-Shannon divergence per row; float ``[K]``.

    With the mixture ``M = beta * P_T + (1 - beta) * P_S`` it is
    ``beta * KL(P_T || M) + (1 - beta) * KL(P_S || M)`` (the GKD/TRL convention; ``beta = 0.5``
    is the symmetric JSD). ``beta`` must lie strictly between 0 and 1.
    """
    mixture = torch.logaddexp(student_logp + math.log1p(-beta), teacher_logp + math.log(beta))
    teacher_part = (teacher_logp.exp() * (teacher_logp - mixture)).sum(-1)
    student_part = (student_logp.exp() * (student_logp - mixture)).sum(-1)
    return beta * teacher_part + (1.0 - beta) * student_part


def total_variation(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """``0.5 * sum |P_S - P_T|`` per row; float ``[K]``."""
    return 0.5 * (student_logp.exp() - teacher_logp.exp()).abs().sum(-1)


def divergence(
    student_logp: Tensor, teacher_logp: Tensor, *, kind: str = "reverse_kl", beta: float = 0.5
) -> Tensor:
    """``D(P_S || P_T)`` per row for one of :data:`DIVERGENCES`.

    Args:
        student_logp: float ``[K, N]`` normalised student log-probabilities (with gradient).
        teacher_logp: float ``[K, N]`` normalised teacher log-probabilities (no gradient).
        kind: ``"reverse_kl"`` (default), ``"forward_kl"``, ``"jsd"`` or ``"tv"``.
        beta: the JSD mixture weight of the teacher, in ``(0, 1)``.

    Returns:
        float ``[K]``.
    """
    if kind == "reverse_kl":
        return reverse_kl(student_logp, teacher_logp)
    if kind == "forward_kl":
        return forward_kl(student_logp, teacher_logp)
    if kind == "jsd":
        return jsd(student_logp, teacher_logp, beta)
    if kind == "tv":
        return total_variation(student_logp, teacher_logp)
    raise ValueError(f"unknown divergence {kind!r}; valid: {', '.join(DIVERGENCES)}")
