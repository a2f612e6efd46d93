"""A loss over gathered student rows, computed slice by slice with its gradient.

Every objective here is a sum of terms that each read a few rows of ``student_logits``
``[B, m, V]``. Autograd over the whole batch would keep several ``[rows, V]`` and
``[rows, C]`` intermediates alive until ``backward``. Instead :func:`sliced_loss` gathers one
slice of rows, runs the slice's loss with a local autograd graph, writes the gradient of those
rows into one ``[B, m, V]`` buffer and frees the slice before the next. ``backward`` then only
scales the buffer. Peak memory is the logits, the buffer and one slice's temporaries, whatever
the sequence length.

Given a :class:`~ctopd.objectives.student_head.StudentHidden` (final hidden states ``[B, m, H]``
and the output layer) instead of logits, no ``[B, m, V]`` tensor exists at all, in any dtype:
each slice projects its own rows ``[S, V]``, runs the slice's loss, and adds the rows' gradient
into ``[B, m, H]`` (hidden states) and ``[V, H]`` (the output weight) buffers. Peak memory is
then those buffers and one slice's ``[S, V]`` temporaries, whatever the sequence length. This
is the path the training loop takes; dense logits remain the reference (the equality tests) and
the fallback for a model whose output layer cannot be taken apart
(:meth:`~ctopd.objectives.student_head.StudentHead.from_model`).

An objective that reads the columns in another order than the ids' (the text events read
ranges of a vocabulary sorted by bytes) passes ``column_order``: from hidden states the head's
rows are then gathered into that order once per call, so every slice's rows come out in it and
no slice permutes its ``[S, V]`` rows (forward) or their gradient (backward); the weight and
bias gradients are put back in id order once at the end. The cost is one more ``[V, H]`` copy
of the weight while the loss runs (64 MB at ``V = 262,144``, ``H = 64`` in float32; 0.67 GB
at Gemma-3-270M's ``H = 640``).

The returned loss is an ordinary autograd output of the student's tensors: it is connected to
the graph even when no row carries loss (its gradient is then zero), so a distributed backward
never waits for a rank that skipped it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ctopd.objectives.plan import RowSlice
from ctopd.objectives.student_head import StudentHead, StudentHidden

# slice_loss(rows, row_slice) -> (loss_sum, {metric name: 0-dim tensor to be summed})
SliceLoss = Callable[[Tensor, RowSlice], tuple[Tensor, dict[str, Tensor]]]


def compute_dtype(logits: Tensor | StudentHidden) -> torch.dtype:
    """float64 for float64 logits (or hidden states), float32 otherwise (bf16/fp16 rows are
    upcast per slice)."""
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
    student_logits: Tensor | StudentHidden,
    slices: Sequence[RowSlice],
    slice_loss: SliceLoss,
    metrics: dict[str, float],
    *,
    scale: float = 1.0,
    column_order: Tensor | None = None,
) -> Tensor:
    """``scale`` times the sum of ``slice_loss`` over ``slices``, differentiable with respect to
    the student's tensors.

    Args:
        student_logits: float ``[B, m, V]`` logits (any float dtype; rows are computed in
            float32, or float64 for float64 logits), or the same logits as hidden states and
            output layer (:class:`~ctopd.objectives.student_head.StudentHidden`: rows are
            projected one slice at a time; the gradient flows to the hidden states and to the
            head's weight and bias).
        slices: the row slices (see :func:`~ctopd.objectives.plan.build_plan`).
        slice_loss: maps a slice's gathered rows ``[S, V]`` (a leaf that requires grad when a
            gradient is needed) and the slice to ``(loss_sum, metric_sums)``.
        metrics: filled with the summed metric values (not scaled), as floats.
        scale: applied inside, so that the usual ``loss.backward()`` hands the gradient buffer
            over instead of scaling a copy of it.
        column_order: int64 ``[C]``, a permutation of the ``C`` logit columns: ``slice_loss``
            then receives rows whose column ``j`` is token ``column_order[j]``. With hidden
            states the output layer's rows are put in this order once per call (a gather of
            ``C`` weight rows, and one scatter of their gradient at the end), so no slice
            permutes its ``[S, C]`` rows; with dense logits each slice's rows are permuted.

    Returns:
        A 0-dim tensor (float32 or float64) connected to ``student_logits``.
    """
    if column_order is not None and column_order.shape != (student_logits.shape[-1],):
        raise ValueError(
            f"column_order has shape {tuple(column_order.shape)} but the logits have "
            f"{student_logits.shape[-1]} columns"
        )
    if isinstance(student_logits, StudentHidden):
        return _sliced_head_loss(student_logits, slices, slice_loss, metrics, scale, column_order)
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    dtype = compute_dtype(student_logits)
    if column_order is not None:
        column_order = column_order.to(student_logits.device)
        unpermuted = slice_loss

        def slice_loss(rows: Tensor, row_slice: RowSlice):
            return unpermuted(rows.index_select(1, column_order), row_slice)

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


def _sliced_head_loss(
    student: StudentHidden,
    slices: Sequence[RowSlice],
    slice_loss: SliceLoss,
    metrics: dict[str, float],
    scale: float,
    column_order: Tensor | None,
) -> Tensor:
    """:func:`sliced_loss` over rows projected from hidden states, one slice at a time."""
    head = student.head
    dtype = compute_dtype(student)
    columns = head.columns

    def run(hidden: Tensor, weight: Tensor, bias: Tensor | None, grads: list | None) -> Tensor:
        weight, bias = weight[:columns], None if bias is None else bias[:columns]
        if column_order is not None:
            # The head's rows in the caller's column order, once: every slice's logits come
            # out in that order. The weight and bias gradients are gathered in the same order
            # into the caller's zeroed buffers and put back in id order at the end.
            order = column_order.to(weight.device)
            weight, bias = weight.index_select(0, order), None if bias is None else bias[order]
        if grads is not None:
            grads = [grads[0], *(None if g is None else g[:columns] for g in grads[1:])]
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        sums: dict[str, Tensor] = {}
        for row_slice in slices:
            loss, parts = _run_head_slice(
                hidden, weight, bias, head, grads, row_slice, slice_loss, dtype, scale
            )
            total += loss
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value.detach()
        if column_order is not None and grads is not None:
            positions = torch.empty_like(order)
            positions[order] = torch.arange(order.numel(), device=order.device)
            for grad in grads[1:]:
                if grad is not None:  # row j holds token order[j]: back to id order
                    grad.copy_(grad.index_select(0, positions))
        metrics.update({key: float(value) for key, value in sums.items()})
        return total

    bias = head.bias
    needs = [
        torch.is_grad_enabled() and t is not None and t.requires_grad
        for t in (student.hidden, head.weight, bias)
    ]
    return _SlicedHeadLoss.apply(student.hidden, head.weight, bias, run, needs)


class _SlicedHeadLoss(torch.autograd.Function):
    """``forward(hidden, weight, bias, run, needs)``: ``run`` returns the loss and adds its
    gradient into one buffer per input that ``needs`` one; ``backward`` hands them over."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, run: Callable, needs: list[bool]) -> Tensor:
        grads = _zero_grads(hidden, weight, bias, needs)
        loss = run(hidden, weight, bias, grads if any(needs) else None)
        ctx.save_for_backward(hidden, weight, bias)
        ctx.run, ctx.needs, ctx.grads = run, needs, grads
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        grads, ctx.grads = ctx.grads, None
        if grads is None:  # a second backward through a retained graph: recompute
            hidden, weight, bias = ctx.saved_tensors
            grads = _zero_grads(hidden, weight, bias, ctx.needs)
            ctx.run(
                hidden.detach(), weight.detach(), None if bias is None else bias.detach(), grads
            )
        if not bool(grad_loss == 1):
            for grad in grads:
                if grad is not None:
                    grad.mul_(grad_loss.to(grad.dtype))
        return (*grads, None, None)


def _zero_grads(hidden, weight, bias, needs: list[bool]) -> list[Tensor | None]:
    return [
        torch.zeros_like(t, memory_format=torch.contiguous_format) if need else None
        for t, need in zip((hidden, weight, bias), needs, strict=True)
    ]


def _run_head_slice(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    head: StudentHead,
    grads: list | None,
    row_slice: RowSlice,
    slice_loss: SliceLoss,
    dtype: torch.dtype,
    scale: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One slice: project its rows ``[S, C]`` with the head's first ``C`` rows ``weight``
    ``[C, H]`` and ``bias`` ``[C]``, run the loss, add the gradient into ``grads``
    (``[B, m, H]``, ``[C, H]``, ``[C]``)."""
    part_weight = weight
    # Under mixed precision the final norm may hand back another dtype than the weight's.
    states = hidden[row_slice.batch, row_slice.pos].to(weight.dtype)  # [S, H]
    projected = torch.nn.functional.linear(states, part_weight, bias).to(dtype)  # [S, C]
    if grads is None:
        loss, parts = slice_loss(head.transform(projected), row_slice)
        return loss * scale, parts
    projected.requires_grad_(True)
    with torch.enable_grad():
        loss, parts = slice_loss(head.transform(projected), row_slice)
        loss = loss * scale
    if loss.requires_grad:
        (grad,) = torch.autograd.grad(loss, projected)  # [S, C]
        grad = grad.to(weight.dtype)
        grad_hidden, grad_weight, grad_bias = grads
        if grad_hidden is not None:
            grad_hidden.index_put_(
                (row_slice.batch, row_slice.pos),
                (grad @ part_weight).to(grad_hidden.dtype),
                accumulate=True,
            )
        if grad_weight is not None:
            grad_weight.addmm_(grad.T, states)
        if grad_bias is not None:
            grad_bias.add_(grad.sum(0))
    return loss.detach(), parts
