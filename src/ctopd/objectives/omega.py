"""Divergence between the student's and the teacher's distributions over the supervision space
``Ω_k`` of each chunk (docs/concepts/simct.md): the class scores ``[K, C]`` plus, for some chunks, one
unit column ``[K]``.

``P_k = softmax(ℓ_k / τ)`` over ``Ω_k`` on each side. Reverse KL, the default and the hot path
of training, has a fused forward/backward (its gradient with respect to the student's scores is
``p ⊙ (log p - log q - KL) / τ``), which needs about half the passes over ``[K, C]`` that autograd
takes; the other divergences go through autograd on an explicit ``[K, C + 1]`` concatenation.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ctopd.objectives.divergences import ABSENT, divergence, reverse_kl


def omega_divergence(
    student_scores: Tensor,
    teacher_scores: Tensor,
    student_unit: Tensor | None,
    teacher_unit: Tensor | None,
    has_unit: Tensor | None,
    *,
    kind: str,
    beta: float,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """``D(P_S,k || P_T,k)`` per chunk, and the reverse-KL metric.

    Args:
        student_scores: float ``[K, C]`` student class log-probabilities (with gradient).
        teacher_scores: float ``[K, C]`` teacher class log-probabilities (no gradient).
        student_unit, teacher_unit: float ``[K]`` unit scores, or ``None`` when no chunk of
            the slice has a unit column.
        has_unit: bool ``[K]`` chunks whose ``Ω_k`` includes the unit, or ``None``.
        kind, beta: the divergence (see :func:`~ctopd.objectives.divergences.divergence`).
        temperature: ``τ``.

    Returns:
        ``(per_chunk, kl)``: float ``[K]`` divergence (differentiable) and float ``[K]`` reverse
        KL without gradient.
    """
    if kind == "reverse_kl":
        values = _OmegaReverseKL.apply(
            student_scores, teacher_scores, student_unit, teacher_unit, has_unit, temperature
        )
        return values, values.detach()
    student_logp = _omega_logprobs(student_scores, student_unit, has_unit, temperature)
    teacher_logp = _omega_logprobs(teacher_scores, teacher_unit, has_unit, temperature)
    values = divergence(student_logp, teacher_logp, kind=kind, beta=beta)
    with torch.no_grad():
        kl = reverse_kl(student_logp, teacher_logp)
    return values, kl


def _omega_logprobs(
    scores: Tensor, unit: Tensor | None, has_unit: Tensor | None, temperature: float
) -> Tensor:
    """``log softmax(ℓ / τ)`` over ``Ω``: ``[K, C]`` or, with a unit, ``[K, C + 1]``."""
    if temperature != 1.0:
        scores = scores / temperature
    if unit is not None:
        column = torch.where(has_unit, unit / temperature, torch.full_like(unit, ABSENT))
        scores = torch.cat([scores, column[:, None]], dim=1)
    return torch.log_softmax(scores, dim=-1)


def _unit_column(
    unit: Tensor | None, has_unit: Tensor | None, temperature: float, like: Tensor
) -> Tensor:
    """``ℓ(u) / τ`` per chunk, ``ABSENT`` where there is no unit; float ``[K]``."""
    if unit is None:
        return torch.full(like.shape[:1], ABSENT, dtype=like.dtype, device=like.device)
    return torch.where(
        has_unit, unit.to(like.dtype) / temperature, torch.full_like(unit, ABSENT, dtype=like.dtype)
    )


def _log_normaliser(scores: Tensor, unit: Tensor) -> Tensor:
    """``log(Σ_c exp(scores_c) + exp(unit))`` per row; float ``[K]``."""
    return torch.logaddexp(torch.logsumexp(scores, dim=-1), unit)


class _OmegaReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student: Tensor,
        teacher: Tensor,
        student_unit: Tensor | None,
        teacher_unit: Tensor | None,
        has_unit: Tensor | None,
        temperature: float,
    ):
        if temperature != 1.0:
            student, teacher = student / temperature, teacher / temperature
        s_unit = _unit_column(student_unit, has_unit, temperature, student)
        t_unit = _unit_column(teacher_unit, has_unit, temperature, student)
        s_norm = _log_normaliser(student, s_unit)
        t_norm = _log_normaliser(teacher.to(student.dtype), t_unit)
        probs = torch.sub(student, s_norm[:, None]).exp_()  # P_S over the classes
        gap = torch.sub(student, teacher).sub_((s_norm - t_norm)[:, None])  # log P_S - log P_T
        unit_probs = torch.exp(s_unit - s_norm)
        unit_gap = (s_unit - s_norm) - (t_unit - t_norm)
        values = torch.linalg.vecdot(probs, gap) + unit_probs * unit_gap
        ctx.save_for_backward(probs, gap, unit_probs, unit_gap, values)
        ctx.temperature, ctx.used = temperature, False
        ctx.has_student_unit = student_unit is not None
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values: Tensor):
        if ctx.used:  # the saved tensors are overwritten below
            raise RuntimeError("the fused reverse KL supports a single backward pass")
        ctx.used = True
        probs, gap, unit_probs, unit_gap, values = ctx.saved_tensors
        scale = grad_values / ctx.temperature
        grad_student = gap.sub_(values[:, None]).mul_(probs).mul_(scale[:, None])
        grad_unit = None
        if ctx.has_student_unit:
            grad_unit = unit_probs * (unit_gap - values) * scale
        return grad_student, None, grad_unit, None, None, None
