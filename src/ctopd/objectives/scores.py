"""The student's scores from gathered logit rows, with a hand-written backward.

:func:`row_scores` maps rows ``[S, V]`` to the realised tokens' log-probabilities ``[S]`` and,
for the first ``K`` rows, class log-probabilities ``[K, C]``. Plain autograd would allocate a
zero-filled ``[S, V]`` gradient for each gather plus the log-sum-exp's own, and add them up; here
the backward turns the forward's saved exponentials into the softmax in place and scatters the
few class and token terms into it, one ``[S, V]`` buffer in all.

Gradients (``p = softmax(z)``, ``G_c``/``g_i`` the incoming gradients):
``∂/∂z_j = -p_j (Σ_c G_c + g_i) + Σ_c G_c [j ∈ c] p_j / P(c) + g_i [j = s_i]``, where
``p_j / P(c) = 1`` for a class with one member.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ctopd.objectives.classes import ClassMembers, class_logprobs


class _RowScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, ids: Tensor, count: int, members: ClassMembers | None):
        peak = rows.amax(dim=-1, keepdim=True)
        exps = torch.sub(rows, peak).exp_()  # [S, V], reused as the softmax in backward
        totals = exps.sum(dim=-1)
        normaliser = totals.log() + peak[:, 0]
        tokens = rows.gather(1, ids[:, None])[:, 0] - normaliser
        first = rows[:count]
        classes = first if members is None else class_logprobs(first, members)
        classes = classes - normaliser[:count, None]
        ctx.save_for_backward(rows, exps, totals, normaliser, ids, classes)
        ctx.count, ctx.members, ctx.used = count, members, False
        return classes, tokens

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_classes: Tensor | None, grad_tokens: Tensor | None):
        if ctx.used:  # the saved exponentials were overwritten by the first backward
            raise RuntimeError("row_scores supports a single backward pass")
        ctx.used = True
        rows, exps, totals, normaliser, ids, classes = ctx.saved_tensors
        count = ctx.count
        weight = torch.zeros_like(totals) if grad_tokens is None else grad_tokens.clone()
        if grad_classes is not None and count:
            weight[:count] += grad_classes.sum(dim=-1)
        grad = exps.mul_((-weight / totals)[:, None])  # -p_j * weight, in place
        if grad_tokens is not None:
            grad.scatter_add_(1, ids[:, None], grad_tokens[:, None])
        if grad_classes is not None and count:
            if ctx.members is None:
                grad[:count] += grad_classes
            else:
                _add_class_grads(
                    grad[:count],
                    grad_classes,
                    rows[:count],
                    normaliser[:count],
                    classes,
                    ctx.members,
                )
        return grad, None, None, None


def _add_class_grads(
    grad: Tensor,
    grad_classes: Tensor,
    rows: Tensor,
    normaliser: Tensor,
    classes: Tensor,
    members: ClassMembers,
) -> None:
    """Add ``Σ_c G_c [j ∈ c] p_j / P(c)`` to ``grad`` ``[K, V]`` in place."""
    grad.index_add_(1, members.first, grad_classes)  # p_j / P(c) = 1 for one-member classes
    if not members.extra:
        return
    shared_columns = members.extra[0][0]  # classes with a second member: fix the first's share
    first_ids = members.first[shared_columns]
    base = normaliser[:, None] + classes[:, shared_columns]
    share = torch.exp(rows.index_select(1, first_ids) - base)
    grad.index_add_(1, first_ids, grad_classes[:, shared_columns] * (share - 1.0))
    for columns, ids in members.extra:
        base = normaliser[:, None] + classes[:, columns]
        share = torch.exp(rows.index_select(1, ids) - base)
        grad.index_add_(1, ids, grad_classes[:, columns] * share)


def row_scores(
    rows: Tensor, ids: Tensor, count: int = 0, members: ClassMembers | None = None
) -> tuple[Tensor, Tensor]:
    """Class log-probabilities of the first rows and realised-token log-probabilities.

    Args:
        rows: float ``[S, V]`` logits (a leaf of the slice's local graph).
        ids: int64 ``[S]`` realised ids.
        count: the first ``count`` rows also get class log-probabilities.
        members: class members of this vocabulary; ``None`` = every id its own class (the
            classes are then the full log-softmax).

    Returns:
        ``(classes, tokens)``: float ``[count, C]`` (``C = V`` without members) and ``[S]``.
        Supports one backward pass.
    """
    return _RowScores.apply(rows, ids, count, members)
