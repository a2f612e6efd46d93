"""What the teacher provides to the objectives, computed from its logits under no-grad.

The teacher's logits over a 150k vocabulary at thousands of positions are the largest tensor of
a step, so everything here works on one ``[slice, V_T]`` block at a time and keeps only the small
results (realised-token log-probs, class log-probs, top-k probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ctopd.core.shared_vocab import SharedVocab
from ctopd.objectives.classes import ClassMembers, class_logprobs, class_members

TEACHER_FIELDS = frozenset({"token_logprobs", "class_logprobs", "full_logprobs", "topk_probs"})


@dataclass
class TeacherOutputs:
    """The teacher's side of an objective, without gradient.

    Attributes:
        token_logprobs: float ``[B, n]``: ``log q(t_j | prefix)`` of the realised teacher tokens
            (positions beyond each ``alignment.teacher_length`` are ignored).
        class_logprobs: float ``[B, n, C]``: ``log q(class | prefix)`` over the ``SharedVocab``
            classes at each teacher response position (``C = shared_vocab.size``, end class
            last). Needed by ``simct`` and ``shared_only``.
        full_logprobs: float ``[B, n, V_T]``: the full log-softmax; only for ``opd``.
        topk_probs: float ``[B, n, k]``: the teacher's largest probabilities, sorted
            descending; only for ``uld``.
    """

    token_logprobs: Tensor
    class_logprobs: Tensor | None = None
    full_logprobs: Tensor | None = None
    topk_probs: Tensor | None = None


def teacher_outputs(
    teacher_logits: Tensor,
    teacher_ids: Tensor,
    shared_vocab: SharedVocab,
    needs: frozenset[str],
    *,
    temperature: float = 1.0,
    slice_size: int = 256,
    top_k: int = 256,
) -> TeacherOutputs:
    """Compute the fields named in ``needs`` from the teacher's logits.

    ``token_logprobs`` is always computed (it is cheap and feeds the metrics). Runs under
    ``torch.no_grad`` over slices of ``slice_size`` positions of one sequence, so at most one
    ``[slice_size, V_T]`` log-softmax is alive.

    Args:
        teacher_logits: float ``[B, n, V_T]``; row ``j`` predicts ``teacher_ids[:, j]``. Any
            dtype; results are float32 (float64 when the logits are float64).
        teacher_ids: int ``[B, n]``; negative ids are padding and get log-prob 0.
        shared_vocab: the pair's shared vocabulary (for ``class_logprobs``).
        needs: a subset of ``{"token_logprobs", "class_logprobs", "full_logprobs",
            "topk_probs"}``, e.g. ``TEACHER_NEEDS[name]``.
        temperature: the teacher's logits are divided by it before the softmax. The objectives
            have their own ``temperature`` (applied to both sides' scores); use one of the two.
        slice_size: positions per slice.
        top_k: number of probabilities kept for ``topk_probs`` (capped at ``V_T``).

    Returns:
        The :class:`TeacherOutputs`, fields not in ``needs`` left ``None``.

    Raises:
        ValueError: unknown field in ``needs``, mismatched shapes, an id ``>= V_T``, or a
            shared vocabulary whose teacher ids do not fit ``V_T``.
    """
    _check_teacher_args(teacher_logits, teacher_ids, needs, temperature, slice_size, top_k)
    batch, length, vocab = teacher_logits.shape
    dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    device = teacher_logits.device
    members = None
    if "class_logprobs" in needs:
        members = class_members(shared_vocab.teacher_member_ids, device)
        if members.max_id >= vocab:
            raise ValueError(
                f"the shared vocabulary uses teacher id {members.max_id} but teacher_logits has "
                f"only {vocab} columns; was the pair built from another teacher tokenizer?"
            )
    out = TeacherOutputs(token_logprobs=torch.zeros(batch, length, dtype=dtype, device=device))
    if members is not None:
        out.class_logprobs = torch.empty(batch, length, members.size, dtype=dtype, device=device)
    if "full_logprobs" in needs:
        out.full_logprobs = torch.empty(batch, length, vocab, dtype=dtype, device=device)
    if "topk_probs" in needs:
        out.topk_probs = torch.empty(batch, length, min(top_k, vocab), dtype=dtype, device=device)
    with torch.no_grad():
        for b in range(batch):
            for lo in range(0, length, slice_size):
                hi = min(lo + slice_size, length)
                logp = torch.log_softmax(teacher_logits[b, lo:hi].to(dtype) / temperature, -1)
                _fill_slice(out, logp, teacher_ids[b, lo:hi], members, b, slice(lo, hi))
    return out


def _fill_slice(out: TeacherOutputs, logp: Tensor, ids: Tensor, members: ClassMembers | None,
                b: int, span: slice) -> None:
    """Write one slice's results into the preallocated outputs."""
    padding = ids < 0
    picked = logp.gather(-1, ids.clamp(min=0).long()[:, None])[:, 0]
    out.token_logprobs[b, span] = picked.masked_fill(padding, 0.0)
    if out.class_logprobs is not None:
        out.class_logprobs[b, span] = class_logprobs(logp, members)
    if out.full_logprobs is not None:
        out.full_logprobs[b, span] = logp
    if out.topk_probs is not None:
        out.topk_probs[b, span] = logp.topk(out.topk_probs.shape[-1], dim=-1).values.exp()


def _check_teacher_args(teacher_logits: Tensor, teacher_ids: Tensor, needs: frozenset[str],
                        temperature: float, slice_size: int, top_k: int) -> None:
    unknown = set(needs) - TEACHER_FIELDS
    if unknown:
        raise ValueError(
            f"unknown teacher field(s) {sorted(unknown)}; valid: {sorted(TEACHER_FIELDS)}"
        )
    if teacher_logits.dim() != 3 or not teacher_logits.is_floating_point():
        raise ValueError(
            f"teacher_logits must be a float [B, n, V_T] tensor, got {tuple(teacher_logits.shape)} "
            f"{teacher_logits.dtype}"
        )
    if tuple(teacher_ids.shape) != tuple(teacher_logits.shape[:2]):
        raise ValueError(
            f"teacher_ids has shape {tuple(teacher_ids.shape)} but teacher_logits has "
            f"{tuple(teacher_logits.shape)}; row j of the logits must predict teacher_ids[:, j]"
        )
    if teacher_ids.numel() and int(teacher_ids.max()) >= teacher_logits.shape[-1]:
        raise ValueError(
            f"teacher id {int(teacher_ids.max())} is out of range for "
            f"{teacher_logits.shape[-1]} teacher logit columns"
        )
    if not temperature > 0 or slice_size < 1 or top_k < 1:
        raise ValueError(
            f"need temperature > 0, slice_size >= 1 and top_k >= 1; got {temperature}, "
            f"{slice_size}, {top_k}"
        )
