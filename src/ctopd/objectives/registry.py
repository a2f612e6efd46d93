"""The objectives by name, what each needs from the teacher, and one entry point."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import Tensor

from ctopd.core.alignment import Alignment
from ctopd.core.shared_vocab import SharedVocab
from ctopd.objectives.baselines import sft, uld
from ctopd.objectives.checks import real_id_columns
from ctopd.objectives.dpca import dpca
from ctopd.objectives.simct import opd, shared_only, simct
from ctopd.objectives.student_head import StudentHidden
from ctopd.objectives.teacher import TeacherOutputs

OBJECTIVES: dict[str, Callable[..., tuple[Tensor, dict[str, float]]]] = {
    "simct": simct,
    "dpca": dpca,
    "shared_only": shared_only,
    "uld": uld,
    "sft": sft,
    "opd": opd,
}

# What each objective needs with its default options (see teacher_needs for the others).
TEACHER_NEEDS: dict[str, frozenset[str]] = {
    "simct": frozenset({"token_logprobs", "text_events"}),
    "dpca": frozenset({"token_logprobs"}),
    "shared_only": frozenset({"token_logprobs", "text_events"}),
    "uld": frozenset({"token_logprobs", "topk_probs"}),
    "sft": frozenset(),
    "opd": frozenset({"token_logprobs", "full_logprobs"}),
}

_PAPER_SPACE_NEEDS = frozenset({"token_logprobs", "class_logprobs"})
_BUILT_IN = frozenset(OBJECTIVES)


def register_objective(
    name: str,
    function: Callable[..., tuple[Tensor, dict[str, float]]],
    needs: frozenset[str] | set[str],
) -> None:
    """Make ``function`` trainable as ``objective.name: <name>`` (configs, ``ctopd train``).

    Args:
        name: a new name (the built-in ones cannot be replaced; registering a name again
            replaces the earlier registration).
        function: called like the built-in objectives, with the keywords
            ``student_logits``, ``student_ids``, ``alignments``, ``shared_vocab``, ``teacher``,
            ``student_old_logprobs`` and any of the config's objective options it names in its
            signature (``divergence``, ``temperature``, ...); returns ``(loss, metrics)`` like
            :func:`compute_objective` (``metrics`` needs at least ``loss``, ``kl`` and
            ``coverage``).
        needs: the teacher fields it reads (a subset of
            ``ctopd.objectives.teacher.TEACHER_FIELDS``).

    Raises:
        ValueError: a built-in name, a function without the common keywords, or an unknown
            teacher field.
    """
    from ctopd.objectives.teacher import TEACHER_FIELDS

    if name in _BUILT_IN:
        raise ValueError(f"objective {name!r} is built in; register yours under another name")
    parameters = inspect.signature(function).parameters
    missing = sorted(_COMMON_ARGUMENTS - set(parameters))
    if missing and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        raise ValueError(f"objective {name!r} must accept the keyword(s) {', '.join(missing)}")
    unknown = sorted(set(needs) - TEACHER_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown teacher field(s) {', '.join(unknown)}; valid: "
            f"{', '.join(sorted(TEACHER_FIELDS))}"
        )
    OBJECTIVES[name] = function
    TEACHER_NEEDS[name] = frozenset(needs)


def teacher_needs(name: str, **options) -> frozenset[str]:
    """The teacher fields objective ``name`` needs with these options (``space="paper"``
    reads class log-probabilities instead of text events).

    Raises:
        ValueError: unknown objective name.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    if name in ("simct", "shared_only") and options.get("space", "text") == "paper":
        return _PAPER_SPACE_NEEDS
    return TEACHER_NEEDS[name]


_COMMON_ARGUMENTS = frozenset(
    {
        "student_logits",
        "student_ids",
        "alignments",
        "shared_vocab",
        "teacher",
        "student_old_logprobs",
    }
)


def objective_options(name: str) -> dict[str, object]:
    """The options an objective accepts, with their defaults.

    Raises:
        ValueError: unknown objective name.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    parameters = inspect.signature(OBJECTIVES[name]).parameters.values()
    return {
        p.name: p.default
        for p in parameters
        if p.name not in _COMMON_ARGUMENTS and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def compute_objective(
    name: str,
    *,
    student_logits: Tensor | StudentHidden,
    student_ids: Tensor,
    alignments: list[Alignment],
    shared_vocab: SharedVocab,
    teacher: TeacherOutputs | None,
    student_old_logprobs: Tensor | None = None,
    **options,
) -> tuple[Tensor, dict[str, float]]:
    """Run the objective ``name`` on a batch.

    Args:
        name: one of :data:`OBJECTIVES`.
        student_logits: the student's logits, row ``i`` predicting ``student_ids[:, i]``, in
            one of two forms. A :class:`~ctopd.objectives.student_head.StudentHidden` (final
            hidden states ``[B, m, H]`` and the output layer; what the training loop passes):
            every objective projects one slice of rows at a time, so no ``[B, m, V]`` logits
            or gradient exist, and the gradient flows to the hidden states and the head's
            weight. Or dense float ``[B, m, V]`` logits (requires grad): the reference path,
            and the fallback for a model whose head cannot be taken apart (see
            :meth:`~ctopd.objectives.student_head.StudentHead.from_model`). Columns past the
            student tokenizer's ids ``V_S`` (the output rows of a padded embedding matrix,
            ``V > V_S``) are dropped before the objective sees them
            (:func:`~ctopd.objectives.checks.real_id_columns`; the sliced path never projects
            them): they carry no probability and get no gradient. ``V_S`` is read from
            ``shared_vocab``.
        student_ids: int ``[B, m]``; padding beyond ``alignment.student_length`` is arbitrary.
        alignments: ``B`` alignments.
        shared_vocab: the pair's shared vocabulary.
        teacher: the teacher's outputs with the fields ``TEACHER_NEEDS[name]`` (``None`` for
            ``sft``).
        student_old_logprobs: float ``[B, m]`` rollout-time log-probs for the DPCA ratio
            (``None`` = current, detached).
        **options: the objective's options (see :func:`objective_options`).

    Returns:
        ``(loss, metrics)``: a 0-dim loss connected to the student's tensors, and python floats
        ``loss``, ``kl``, ``coverage``, ``supervised_tokens``, ``student_tokens``,
        ``chunks_one_to_one``, ``chunks_multi``, ``unaligned_share``, ``teacher_logprob_mean``
        (plus objective-specific extras).

    Raises:
        ValueError: unknown name or option (listing the valid ones), a bad option value,
            inconsistent shapes, a missing teacher field, or NaN/inf in an input.
    """
    valid = objective_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for objective {name!r}; valid: "
            f"{', '.join(valid) or 'none'}"
        )
    if shared_vocab is not None:
        student_logits = real_id_columns(student_logits, len(shared_vocab.student_id_to_class))
    return OBJECTIVES[name](
        student_logits=student_logits,
        student_ids=student_ids,
        alignments=alignments,
        shared_vocab=shared_vocab,
        teacher=teacher,
        student_old_logprobs=student_old_logprobs,
        **options,
    )
