"""Log-probabilities over :class:`~ctopd.core.shared_vocab.SharedVocab` classes.

A class's log-probability is the log-sum-exp of the log-probabilities of all its ids (a
SentencePiece vocabulary can spell one byte string twice, ``A`` and ``<0x41>``). Row 0 of a
member matrix has one id per class; further rows add ids for the few classes that have more, so
the computation is one column gather plus one small log-add-exp per further rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class ClassMembers:
    """Index tensors that map vocabulary columns to class columns.

    Attributes:
        first: int64 ``[C]``: one id of every class.
        extra: per further member rank, ``(columns, ids)``: int64 ``[E]`` classes that have a
            member of that rank and the member ids.
        max_id: the largest id used (the logits must have more columns than this).
    """

    first: Tensor
    extra: tuple[tuple[Tensor, Tensor], ...]
    max_id: int

    @property
    def size(self) -> int:
        """Number of classes ``C``."""
        return int(self.first.shape[0])


def class_members(member_ids: np.ndarray, device: torch.device | str = "cpu") -> ClassMembers:
    """Build :class:`ClassMembers` from a ``SharedVocab`` member matrix.

    Args:
        member_ids: int64 ``[R, C]`` (``teacher_member_ids`` or ``student_member_ids``), ``-1``
            where a class has no member of that rank; row 0 must be filled.

    Raises:
        ValueError: a class has no member in row 0.
    """
    member_ids = np.asarray(member_ids, dtype=np.int64)
    if (member_ids[0] < 0).any():
        missing = int(np.flatnonzero(member_ids[0] < 0)[0])
        raise ValueError(f"class {missing} of the shared vocabulary has no member id")
    extra = []
    for row in member_ids[1:]:
        columns = np.flatnonzero(row >= 0)
        if columns.size:
            extra.append(
                (
                    torch.as_tensor(columns, device=device),
                    torch.as_tensor(row[columns], device=device),
                )
            )
    return ClassMembers(
        first=torch.as_tensor(member_ids[0], device=device),
        extra=tuple(extra),
        max_id=int(member_ids.max()),
    )


def class_logprobs(scores: Tensor, members: ClassMembers) -> Tensor:
    """Log-sum-exp of each class's member columns.

    Given log-probabilities this is the class log-probability; given raw logits it is the class
    logit (subtract the row's log-sum-exp afterwards), which avoids a ``[rows, V]`` temporary.

    Args:
        scores: float ``[K, V]`` log-probabilities or logits over a vocabulary.
        members: the class member index tensors of that vocabulary.

    Returns:
        float ``[K, C]``, differentiable with respect to ``scores``.
    """
    out = scores.index_select(-1, members.first)
    for columns, ids in members.extra:
        merged = torch.logaddexp(out.index_select(-1, columns), scores.index_select(-1, ids))
        # In place is safe: index_select's backward does not need its output.
        out.index_copy_(-1, columns, merged)
    return out
