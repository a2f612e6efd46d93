"""Input and option checks shared by the objectives: wrong shapes, missing teacher fields and
NaN/inf values fail early with a message that names the tensor."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ctopd.core.alignment import Alignment
from ctopd.objectives.divergences import DIVERGENCES
from ctopd.objectives.student_head import StudentHidden


def check_student(
    student_logits: Tensor | StudentHidden, student_ids: Tensor, alignments: list[Alignment]
) -> None:
    """Check the student tensors against the alignments.

    ``student_logits`` is dense logits ``[B, m, V_S]`` or the same as hidden states and output
    layer (:class:`~ctopd.objectives.student_head.StudentHidden`; its hidden states are checked
    for NaN/inf instead of logits that do not exist).

    Raises:
        ValueError: wrong rank/dtype, batch or length mismatch, an id out of range, or a
            non-finite logit (or hidden state) inside a response.
    """
    if isinstance(student_logits, StudentHidden):
        _check_hidden(student_logits)
    elif student_logits.dim() != 3 or not student_logits.is_floating_point():
        raise ValueError(
            f"student_logits must be a float [B, m, V_S] tensor, got shape "
            f"{tuple(student_logits.shape)} and dtype {student_logits.dtype}"
        )
    if student_ids.dim() != 2 or student_ids.is_floating_point() or student_ids.is_complex():
        raise ValueError(
            f"student_ids must be an integer [B, m] tensor, got "
            f"{tuple(student_ids.shape)} {student_ids.dtype}"
        )
    if tuple(student_ids.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(
            f"student_ids has shape {tuple(student_ids.shape)} but student_logits has "
            f"{tuple(student_logits.shape)}; row i of the logits must predict student_ids[:, i]"
        )
    if len(alignments) != student_logits.shape[0]:
        raise ValueError(
            f"got {len(alignments)} alignments for a batch of {student_logits.shape[0]} sequences"
        )
    lengths = [a.student_length for a in alignments]
    _check_lengths("student_logits", student_logits, lengths)
    vocab = student_logits.shape[-1]
    for b, length in enumerate(lengths):
        ids = student_ids[b, :length]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(
                f"student_ids[{b}] holds an id outside [0, {vocab}) inside the "
                f"response (length {length})"
            )
    if isinstance(student_logits, StudentHidden):
        # The head's weight is not searched (V x H per step): a NaN there makes the loss
        # non-finite, which the training loop stops on.
        check_finite("the student's hidden states", student_logits.hidden, lengths)
    else:
        check_finite("student_logits", student_logits, lengths)


def _check_hidden(student: StudentHidden) -> None:
    hidden, weight = student.hidden, student.head.weight
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(
            f"the student's hidden states must be a float [B, m, H] tensor, got shape "
            f"{tuple(hidden.shape)} and dtype {hidden.dtype}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"the student's output weight must be [V, {hidden.shape[-1]}] for hidden states "
            f"{tuple(hidden.shape)}, got {tuple(weight.shape)}"
        )


def real_id_columns(logits: Tensor | StudentHidden, num_ids: int) -> Tensor | StudentHidden:
    """``logits[..., :num_ids]``: the columns of a tokenizer's ids (a view, no copy).

    A checkpoint's output matrix often has more rows than its tokenizer has ids (Qwen2.5-7B:
    152,064 rows for 151,665 ids). The rows past the last id are no token, so no softmax over a
    model's scores may give them mass: every softmax of the objectives runs over the columns this
    returns. Logits no wider than ``num_ids`` come back unchanged.

    Args:
        logits: float ``[..., rows]``.
        num_ids: the tokenizer's id count (``len(shared_vocab.student_id_to_class)`` or
            ``len(shared_vocab.teacher_id_to_class)``: the byte table's ``vocab_size``).

    Returns:
        float ``[..., min(rows, num_ids)]``.
    """
    if isinstance(logits, StudentHidden):  # the head never projects the rows past num_ids
        return logits.real_id_columns(num_ids)
    return logits[..., :num_ids] if logits.shape[-1] > num_ids else logits


def check_finite(name: str, tensor: Tensor, lengths: Iterable[int]) -> None:
    """Raise ``ValueError`` naming ``name`` if ``tensor[b, :lengths[b]]`` holds NaN or inf."""
    for b, length in enumerate(lengths):
        part = tensor[b, :length]
        # A sum is non-finite whenever an element is (inf, -inf and NaN all propagate); only
        # then pay for the element-wise search that locates it.
        if part.numel() and not bool(torch.isfinite(part.sum())):
            bad = (~torch.isfinite(part)).nonzero()
            if bad.numel():
                where = ", ".join(str(int(i)) for i in bad[0])
                raise ValueError(
                    f"{name} holds NaN or inf at sequence {b}, index ({where}); check the model "
                    "(fp16 overflow?) or the teacher server's output"
                )


def _check_lengths(name: str, tensor: Tensor, lengths: list[int]) -> None:
    longest = max(lengths, default=0)
    if longest > tensor.shape[1]:
        raise ValueError(
            f"{name} has {tensor.shape[1]} positions but an alignment needs "
            f"{longest}; pass the response positions of every sequence"
        )


def check_teacher(
    teacher, fields: Iterable[str], alignments: list[Alignment], batch: int, objective: str
) -> None:
    """Check that ``teacher`` has the ``fields`` an objective needs, with a sane shape.

    Raises:
        ValueError: the teacher or a field is missing, a field is too short or holds NaN/inf.
    """
    fields = sorted(fields)
    if not fields:
        return
    if teacher is None:
        raise ValueError(f"objective {objective!r} needs teacher outputs with {fields}; got None")
    lengths = [a.teacher_length for a in alignments]
    for field in fields:
        tensor = getattr(teacher, field)
        if tensor is None:
            raise ValueError(
                f"objective {objective!r} needs teacher.{field}; compute it with "
                f"teacher_outputs(..., needs=TEACHER_NEEDS[{objective!r}])"
            )
        if tensor.dim() < 2 or tensor.shape[0] != batch:
            raise ValueError(
                f"teacher.{field} has shape {tuple(tensor.shape)}; expected [{batch}, n, ...]"
            )
        _check_lengths(f"teacher.{field}", tensor, lengths)
        # Lazy full_logprobs (TeacherLogprobRows): finite hidden states, no [n, V_T] rows made.
        hidden = getattr(tensor, "hidden", None) if not isinstance(tensor, Tensor) else None
        check_finite(f"teacher.{field}", tensor if hidden is None else hidden, lengths)


# What each option of the built-in objectives may be: (test, what a valid value is). Read by
# check_options (the objectives) and by the run config, so both say the same thing.
OPTION_RULES = {
    "divergence": (lambda v: v in DIVERGENCES, f"one of {', '.join(DIVERGENCES)}"),
    "beta": (lambda v: 0.0 < v < 1.0, "strictly between 0 and 1"),
    "temperature": (lambda v: v > 0.0, "> 0"),
    "weight_by_tokens": (lambda v: isinstance(v, bool), "True or False"),
    "slice_size": (lambda v: isinstance(v, int) and v >= 1, "an int >= 1"),
    "advantage_clip": (lambda v: v > 0.0, "> 0"),
    "clip_low": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "clip_high": (lambda v: v >= 0.0, ">= 0"),
    "epsilon": (lambda v: v >= 0.0, ">= 0"),
    "top_k": (lambda v: v is None or (isinstance(v, int) and v >= 1), "None or an int >= 1"),
    "space": (lambda v: v in ("text", "paper"), "one of text, paper"),
    "cells": (lambda v: v in ("none", "boundary", "all"), "one of none, boundary, all"),
}


def invalid_option(name: str, value) -> str | None:
    """What a valid ``name`` is (e.g. ``"> 0"``) when ``value`` is not one, else ``None``
    (also for a name without a rule)."""
    if name not in OPTION_RULES:
        return None
    valid, expected = OPTION_RULES[name]
    try:
        ok = bool(valid(value))
    except TypeError:
        ok = False
    return None if ok else expected


def check_options(**options) -> None:
    """Validate option values by name (only the names given are checked; see
    :data:`OPTION_RULES`).

    Raises:
        ValueError: a value outside its range, naming the option and the valid values.
    """
    for name, value in options.items():
        expected = invalid_option(name, value)
        if expected is not None:
            raise ValueError(f"option {name}={value!r} is invalid; expected {expected}")
