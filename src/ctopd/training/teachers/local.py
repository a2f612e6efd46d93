"""The teacher as the loop sees it: one small interface, a model in this process or a server.

The loop asks a teacher for one thing (ALGORITHMS §1.4): given each sequence's teacher prompt ids
(the teacher's own chat template) and the teacher's tokenisation of the response, the teacher's
next-token scores at every response position, as a dense float tensor ``[B, n, V_T]`` whose
log-softmax over the last dimension is the teacher's distribution. Row ``j`` predicts response
token ``j``. ``V_T`` is the teacher *tokenizer's* id count, not the model's output rows: rows past
the last id (a padded embedding matrix) are no token and carry no mass. The loop turns that
tensor into what the objective needs with ``ctopd.objectives.teacher_outputs`` (the same call
for both kinds of teacher), so every objective works with either.

* :class:`LocalTeacher` — a frozen ``transformers`` model on this rank's device; it returns its
  logits, computed when asked.
* :class:`~ctopd.training.teachers.served.ServedTeacher` — a client of an OpenAI-compatible
  completions server (vLLM, ``ctopd serve-teacher``); it returns log-probabilities rebuilt from the
  server's top-k prompt log-probs, and keeps its request in flight in the background so the
  student's forward runs meanwhile.

Both hand back a :class:`PendingScores` at once: ``done()`` says whether the scores are ready,
``result()`` waits for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from ctopd.training.config import TrainConfig
from ctopd.training.models import check_vocab, freeze, load_causal_lm
from ctopd.training.rollout import count_token_ids, response_logits


class TeacherServerError(RuntimeError):
    """A served teacher could not be reached within its retry budget, refused the request, or
    sent a reply that does not match the request (the message names the field)."""


class PendingScores(Protocol):
    """A teacher's scores that may still be on their way."""

    def done(self) -> bool:
        """True when :meth:`result` returns without waiting."""

    def result(self) -> Tensor:
        """The scores ``[B, n, V_T]`` on the teacher's device (waits for them).

        Raises:
            TeacherServerError: a served teacher failed.
        """


class Teacher(Protocol):
    """What the loop needs from a teacher (see the module docstring)."""

    def submit(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        *,
        needs: frozenset[str] | None = None,
    ) -> PendingScores:
        """Ask for the scores of ``B`` teacher prompts followed by their responses.

        ``needs`` (``TEACHER_NEEDS``-style field names) lets a teacher send less: a served one
        asks for no top-k at all when only ``token_logprobs`` are needed (``dpca``)."""

    def to(self, device: torch.device | str) -> Teacher:
        """Put the returned scores (and a local model) on ``device``."""


class Ready:
    """Scores that are already computed."""

    def __init__(self, scores: Tensor) -> None:
        self.scores = scores

    def done(self) -> bool:
        return True

    def result(self) -> Tensor:
        return self.scores


class LocalTeacher:
    """A frozen causal LM in this process: one no-grad forward over prompt + response.

    Args:
        model: the teacher (``freeze``-d: eval mode, no gradients).
        pad_id: id written at padded positions (masked out).
        num_ids: ``V_T``, the tokenizer's id count (largest id + 1); the model's output rows
            from it on are padding and are cut off the scores. ``None``: every row is an id.
    """

    def __init__(self, model: torch.nn.Module, *, pad_id: int, num_ids: int | None = None) -> None:
        self.model = model
        self.pad_id = pad_id
        self.num_ids = num_ids
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> LocalTeacher:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def submit(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        *,
        needs: frozenset[str] | None = None,
    ) -> Ready:
        """The teacher's logits ``[B, n, V_T]`` (model dtype) over the tokenizer's ids only (a
        view of the model's ``[B, n, rows]``; their log-softmax renormalises over the real ids),
        computed now (``needs`` is not used: the logits hold everything)."""
        with torch.no_grad():
            logits = response_logits(
                self.model, prompt_ids, response_ids, pad_id=self.pad_id, device=self.device
            )
        return Ready(logits[..., : self.num_ids])  # [:None] keeps every column


def load_teacher(
    config: TrainConfig, tokenizer: Any, *, num_ids: int | None = None
) -> LocalTeacher | Teacher:
    """The run's teacher: a client of ``teacher_server.url`` when it is set (the connection and
    the server's tokenizer are checked now), else ``teacher.name_or_path`` loaded in process.

    Args:
        config: the run's config.
        tokenizer: the teacher's tokenizer.
        num_ids: ``V_T``, the width of the scores: the tokenizer's id count (the pair's
            ``teacher_table.vocab_size``); ``None``: :func:`count_token_ids` of ``tokenizer``.

    Raises:
        ConfigError: a model that does not match its tokenizer, a server that runs another
            tokenizer.
        TeacherServerError: a server that cannot be reached within the retry budget.
    """
    if num_ids is None:
        num_ids = count_token_ids(tokenizer)
    if config.teacher_server.url:
        from ctopd.training.teachers.served import ServedTeacher, teacher_output_rows

        teacher = ServedTeacher(
            config.teacher_server,
            tokenizer,
            vocab_size=num_ids,
            model_rows=teacher_output_rows(config.teacher, num_ids),
        )
        teacher.check()
        return teacher
    model = freeze(load_causal_lm(config.teacher, side="teacher"))
    check_vocab(model, tokenizer, "teacher")
    return LocalTeacher(model, pad_id=tokenizer.pad_token_id, num_ids=num_ids)


def receive_scores(pending: PendingScores, *, step: int, last_saved: int | None) -> Tensor:
    """``pending.result()``; a served teacher's failure is re-raised naming the step and the
    checkpoint that stays on disk."""
    try:
        return pending.result()
    except TeacherServerError as err:
        where = f"checkpoint of step {last_saved} kept" if last_saved else "no checkpoint yet"
        raise TeacherServerError(
            f"teacher failed at step {step}: {err}; stopping, {where} (--resume continues from it)"
        ) from err
