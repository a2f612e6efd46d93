"""The shared vocabulary ``V∩``: byte strings that are ordinary tokens of both tokenizers, plus
one *end* class (docs/concepts/shared-vocabulary.md).

Classes are byte strings, not ids: a SentencePiece vocabulary can spell the same bytes twice
(``A`` and ``<0x41>``), so a model's log-probability of a class is the log-sum-exp of all its ids
with those bytes. The tables here are numpy index arrays ready for a gather per "member rank":
row 0 of ``*_member_ids`` holds one id per class, later rows hold the further ids of classes that
have them (``-1`` elsewhere). Most vocabularies need one or two rows.

With identical tokenizers whose only special token is the end token and whose ids all spell
distinct bytes, ``V∩`` is the whole vocabulary, so every objective reduces to plain OPD.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctopd.core.byte_table import ByteTable

END_CLASS_NAME = "<end>"


@dataclass(frozen=True)
class SharedVocab:
    """Shared classes between a teacher and a student tokenizer.

    Attributes:
        class_bytes: ``C`` byte strings, one per class; the last class is the end class and its
            entry is ``b""`` (see :attr:`end_class`).
        teacher_member_ids: int64 ``[R_T, C]``: teacher ids of each class by rank, ``-1`` = none.
        student_member_ids: int64 ``[R_S, C]``: the same for the student.
        teacher_id_to_class: int64 ``[V_T]``: class of each teacher id, ``-1`` if not shared.
        student_id_to_class: int64 ``[V_S]``: class of each student id, ``-1`` if not shared.
        first_position_mislabelled: exactly one of the two tokenizers adds a dummy-prefix space.
            At a response's first position its ids then mean other text than their classes
            say: the student's ``▁Sure`` is the text ``"Sure"`` there (the aligner drops the
            artefact space), yet its class is ``" Sure"``, which the teacher's ``Ġ Sure``
            shares, while the teacher spells the text ``"Sure"`` without a space. Objectives
            that compare distributions over classes skip a response's first chunk then.
    """

    class_bytes: list[bytes]
    teacher_member_ids: np.ndarray
    student_member_ids: np.ndarray
    teacher_id_to_class: np.ndarray
    student_id_to_class: np.ndarray
    first_position_mislabelled: bool = False

    @property
    def size(self) -> int:
        """Number of classes ``C``, the end class included."""
        return len(self.class_bytes)

    @property
    def end_class(self) -> int:
        """Index of the end class (always the last)."""
        return len(self.class_bytes) - 1

    def classes(self) -> list[str]:
        """Readable class names: the bytes decoded with replacement, the end class as ``<end>``."""
        names = [b.decode("utf-8", errors="backslashreplace") for b in self.class_bytes[:-1]]
        return names + [END_CLASS_NAME]


def _ids_by_bytes(table: ByteTable) -> dict[bytes, list[int]]:
    out: dict[bytes, list[int]] = {}
    flat = table.flat_bytes.tobytes()
    for token_id in np.flatnonzero(~table.special & (table.lengths > 0)).tolist():
        start = int(table.starts[token_id])
        out.setdefault(flat[start : start + int(table.lengths[token_id])], []).append(token_id)
    return out


def _member_matrix(members: list[list[int]]) -> np.ndarray:
    ranks = max((len(m) for m in members), default=1)
    matrix = np.full((ranks, len(members)), -1, dtype=np.int64)
    for class_index, ids in enumerate(members):
        matrix[: len(ids), class_index] = ids
    return matrix


def build_shared_vocab(teacher: ByteTable, student: ByteTable) -> SharedVocab:
    """Build ``V∩`` from two byte tables.

    Classes are ordered by the student id of their first member; the end class comes last and
    holds each side's ``end_ids``.

    Raises:
        ValueError: a side has no end id (the end-of-turn decision could not be supervised).
    """
    for side, table in (("teacher", teacher), ("student", student)):
        if table.end_ids.size == 0:
            raise ValueError(
                f"the {side} tokenizer ({table.name}) has no end-of-turn/EOS id; set eos_token on "
                "the tokenizer or pass end ids explicitly"
            )
    teacher_by_bytes = _ids_by_bytes(teacher)
    student_by_bytes = _ids_by_bytes(student)
    shared = sorted(
        (b for b in student_by_bytes if b in teacher_by_bytes),
        key=lambda b: student_by_bytes[b][0],
    )
    teacher_members = [teacher_by_bytes[b] for b in shared] + [teacher.end_ids.tolist()]
    student_members = [student_by_bytes[b] for b in shared] + [student.end_ids.tolist()]

    def id_to_class(members: list[list[int]], vocab_size: int) -> np.ndarray:
        mapping = np.full(vocab_size, -1, dtype=np.int64)
        for class_index, ids in enumerate(members):
            mapping[ids] = class_index
        return mapping

    return SharedVocab(
        class_bytes=shared + [b""],
        teacher_member_ids=_member_matrix(teacher_members),
        student_member_ids=_member_matrix(student_members),
        teacher_id_to_class=id_to_class(teacher_members, teacher.vocab_size),
        student_id_to_class=id_to_class(student_members, student.vocab_size),
        first_position_mislabelled=teacher.dummy_prefix != student.dummy_prefix,
    )
