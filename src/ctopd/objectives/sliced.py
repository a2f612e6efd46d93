"""A loss over gathered student rows, computed slice by slice with its gradient.

Every objective here is a sum of terms that each read a few rows of ``student_logits``
``[B, m, V]``. Autograd over the whole batch would keep several ``[rows, V]`` and
``[rows, C]`` intermediates alive until ``backward``. Instead :func:`sliced_loss` gathers one
slice of rows, runs the slice's loss with a local autograd graph, writes the gradient of those
rows into one ``[B, m, V]`` buffer and frees the slice before the next. ``backward`` then only
scales the buffer. Peak memory is the logits, the buffer and one slice's temporaries, whatever
the sequence length.

The returned loss is an ordinary autograd output of ``student_logits``: it is connected to the
graph even when no row carries loss (its gradient is then zero), so a distributed backward never
waits for a rank that skipped it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ctopd.objectives.plan import RowSlice

# slice_loss(rows, row_slice) -> (loss_sum, {metric name: 0-dim tensor to be summed})
SliceLoss = Callable[[Tensor, RowSlice], tuple[Tensor, dict[str, Tensor]]]


def compute_dtype(logits: Tensor) -> torch.dtype:
    """float64 for float64 logits, float32 otherwise (bf16/fp16 rows are upcast per slice)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class _SlicedLoss(torch.autograd.Function):
    """``forward(logits, run, needs_grad)``: ``run(logits, buffer)`` returns the loss and fills
    ``buffer`` with its gradient; ``backward`` hands the buffer over."""

    @staticmethod
    def forward(ctx, logits: Tensor, run: Callable, needs_grad: bool) -> Tensor:
        buffer = (
            torch.zeros_like(logits, memory_format=torch.contiguous_format) if needs_grad else None
        )
        loss = run(logits, buffer)
        ctx.save_for_backward(logits)
        ctx.run, ctx.buffer = run, buffer
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        # Give the buffer away (no copy, and autograd may keep it as .grad without cloning).
        # A second backward through the same graph (retain_graph=True) recomputes it.
        buffer, ctx.buffer = ctx.buffer, None
        if buffer is None:
            (logits,) = ctx.saved_tensors
            buffer = torch.zeros_like(logits, memory_format=torch.contiguous_format)
            ctx.run(logits.detach(), buffer)
        if not bool(grad_loss == 1):
            buffer.mul_(grad_loss.to(buffer.dtype))
        return buffer, None, None


def sliced_loss(
    student_logits: Tensor,
    slices: Sequence[RowSlice],
    slice_loss: SliceLoss,
    metrics: dict[str, float],
    *,
    scale: float = 1.0,
) -> Tensor:
    """``scale`` times the sum of ``slice_loss`` over ``slices``, differentiable with respect to
    the logits.

    Args:
        student_logits: float ``[B, m, V]`` (any float dtype; rows are computed in float32, or
            float64 for float64 logits).
        slices: the row slices (see :func:`~ctopd.objectives.plan.build_plan`).
        slice_loss: maps a slice's gathered rows ``[S, V]`` (a leaf that requires grad when a
            gradient is needed) and the slice to ``(loss_sum, metric_sums)``.
        metrics: filled with the summed metric values (not scaled), as floats.
        scale: applied inside, so that the usual ``loss.backward()`` hands the gradient buffer
            over instead of scaling a copy of it.

    Returns:
        A 0-dim tensor (float32 or float64) connected to ``student_logits``.
    """
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    dtype = compute_dtype(student_logits)

    def run(logits: Tensor, buffer: Tensor | None) -> Tensor:
        total = torch.zeros((), dtype=dtype, device=logits.device)
        sums: dict[str, Tensor] = {}
        for row_slice in slices:
            loss, parts = _run_slice(logits, buffer, row_slice, slice_loss, dtype, scale)
            total += loss
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value.detach()
        metrics.update({key: float(value) for key, value in sums.items()})
        return total

    return _SlicedLoss.apply(student_logits, run, needs_grad)


def _run_slice(
    logits: Tensor,
    buffer: Tensor | None,
    row_slice: RowSlice,
    slice_loss: SliceLoss,
    dtype: torch.dtype,
    scale: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    rows = logits[row_slice.batch, row_slice.pos].to(dtype)
    if buffer is None:
        loss, parts = slice_loss(rows, row_slice)
        return loss * scale, parts
    rows.requires_grad_(True)
    with torch.enable_grad():
        loss, parts = slice_loss(rows, row_slice)
        loss = loss * scale
    if loss.requires_grad:
        (grad,) = torch.autograd.grad(loss, rows)
        buffer[row_slice.batch, row_slice.pos] = grad.to(buffer.dtype)
    return loss.detach(), parts
