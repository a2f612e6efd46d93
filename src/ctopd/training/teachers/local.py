"""The teacher as the loop sees it: one small interface, a model in this process or a server.

The loop asks a teacher for one thing (docs/concepts/one-step.md): given each sequence's teacher prompt ids
(the teacher's own chat template), the teacher's tokenisation of the response and a
:class:`~ctopd.objectives.teacher.TeacherRequest` (the fields the objective needs), the
:class:`~ctopd.objectives.teacher.TeacherOutputs` with those fields. Row ``j`` of every
per-position field belongs to response token ``j``. Both kinds of teacher reduce their scores
one slice of positions at a time, on their side (:func:`~ctopd.objectives.teacher.reduce_teacher`),
so no ``[B, n, V_T]`` tensor of scores exists for the whole sequence (``opd``'s
``full_logprobs``: the in-process teacher hands back lazy rows, a served one a dense tensor)
and nothing of the teacher's forward is alive during the student's
backward. Every softmax covers the teacher *tokenizer's* ``V_T`` ids: output rows past the last
id (a padded embedding matrix) are no token and carry no mass.

* :class:`LocalTeacher` — a frozen ``transformers`` model on this rank's device: one forward to
  its final hidden states, then its output layer applied to one slice of positions at a time.
* :class:`~ctopd.training.teachers.served.ServedTeacher` — a client of an OpenAI-compatible
  completions server (vLLM, ``ctopd serve-teacher``); it reduces the server's sparse top-k
  prompt log-probs (never re-densified), and keeps its request in flight in the background so
  the student's forward runs meanwhile.

Both hand back a :class:`PendingOutputs` at once: ``done()`` says whether the outputs are
ready, ``result()`` waits for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import Tensor

from ctopd.objectives.student_head import StudentHead
from ctopd.objectives.teacher import (
    TeacherLogprobRows,
    TeacherOutputs,
    TeacherRequest,
    reduce_teacher,
)
from ctopd.training.config import TrainConfig
from ctopd.training.models import check_vocab, freeze, load_causal_lm
from ctopd.training.rollout import count_token_ids, pack_prompt_response, pad_responses


class TeacherServerError(RuntimeError):
    """A served teacher could not be reached within its retry budget, refused the request, or
    sent a reply that does not match the request (the message names the field)."""


class PendingOutputs(Protocol):
    """A teacher's outputs that may still be on their way."""

    def done(self) -> bool:
        """True when :meth:`result` returns without waiting."""

    def result(self) -> TeacherOutputs:
        """The outputs on the teacher's device (waits for them).

        Raises:
            TeacherServerError: a served teacher failed.
        """


class Teacher(Protocol):
    """What the loop needs from a teacher (see the module docstring)."""

    def submit(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        request: TeacherRequest,
    ) -> PendingOutputs:
        """Ask for ``request.needs`` of ``B`` teacher prompts followed by their responses. A
        served teacher sends less where it can: no top-k at all when only ``token_logprobs``
        are needed (``dpca``)."""

    def to(self, device: torch.device | str) -> Teacher:
        """Put the returned outputs (and a local model) on ``device``."""


class Ready:
    """Outputs that are already computed."""

    def __init__(self, outputs: TeacherOutputs) -> None:
        self.outputs = outputs

    def done(self) -> bool:
        return True

    def result(self) -> TeacherOutputs:
        return self.outputs


class _HiddenCaptured(Exception):
    """Stops a forward at the output layer: its input is all the teacher needs."""


class LocalTeacher:
    """A frozen causal LM in this process: one no-grad forward over prompt + response to the
    final hidden states, then the output layer one slice of positions at a time.

    The logits are ``output_layer(hidden)[:, :V_T]`` (with the model's
    ``final_logit_softcapping`` where its config sets one). The first :meth:`submit` checks
    that against the model's own forward on one sequence and refuses a model whose logits are
    something else.

    Args:
        model: the teacher (``freeze``-d: eval mode, no gradients).
        pad_id: id written at padded positions (masked out).
        num_ids: ``V_T``, the tokenizer's id count (largest id + 1); the model's output rows
            from it on are padding and never computed. ``None``: every row is an id.
    """

    def __init__(self, model: torch.nn.Module, *, pad_id: int, num_ids: int | None = None) -> None:
        self.model = model
        self.pad_id = pad_id
        self.num_ids = num_ids
        self.device = torch.device("cpu")
        self.checked = False

    def to(self, device: torch.device | str) -> LocalTeacher:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def submit(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        request: TeacherRequest,
    ) -> Ready:
        """The outputs ``request`` asks for, computed now (see the class docstring)."""
        if not self.checked:
            self.check_output_layer(prompt_ids[0], response_ids[0])
        lazy_full = "full_logprobs" in request.needs
        with torch.no_grad():
            hidden = self.hidden_states(prompt_ids, response_ids).detach()  # [B, n, H]
            ids, _ = pad_responses(response_ids, pad_id=-1, device=self.device)
            dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
            head = self.head()
            reduced = replace(request, needs=request.needs - {"full_logprobs"})
            outputs = reduce_teacher(lambda b, p: head(hidden[b, p]), ids, reduced, dtype=dtype)
        if lazy_full:  # opd: rows made where the objective reads them, never [B, n, V_T]
            outputs.full_logprobs = TeacherLogprobRows(
                hidden, head, ids >= 0, temperature=request.temperature, out_dtype=dtype
            )
        return Ready(outputs)

    def head(self) -> StudentHead:
        """The output layer: ``[S, H]`` final hidden states to ``[S, V_T]`` logits (rows past
        ``V_T`` never projected, the config's ``final_logit_softcapping`` applied)."""
        layer = self.model.get_output_embeddings()
        config = getattr(self.model.config, "get_text_config", lambda: self.model.config)()
        cap = getattr(config, "final_logit_softcapping", None)
        num_ids = layer.weight.shape[0] if self.num_ids is None else self.num_ids
        bias = getattr(layer, "bias", None)
        return StudentHead(layer.weight, bias, float(cap) if cap else None, num_ids)

    def logits(self, hidden: Tensor) -> Tensor:
        """``[S, V_T]`` logits of final hidden states ``[S, H]`` (rows past ``V_T`` skipped)."""
        return self.head()(hidden)

    def hidden_states(
        self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
    ) -> Tensor:
        """The final hidden states ``[B, n, H]`` at response positions (row ``j`` predicts
        response token ``j``): the input of the output layer, which never runs here."""
        input_ids, mask, position_ids, prompt_len, response_len = pack_prompt_response(
            prompt_ids, response_ids, pad_id=self.pad_id, device=self.device
        )
        kwargs = dict(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
        )
        captured: list[Tensor] = []

        def capture(_module, args):
            captured.append(args[0])
            raise _HiddenCaptured

        handle = self.model.get_output_embeddings().register_forward_pre_hook(capture)
        try:
            try:
                self.model(**kwargs, logits_to_keep=response_len + 1)
            except TypeError:  # a model class without logits_to_keep
                captured.clear()
                self.model(**kwargs)
        except _HiddenCaptured:
            pass
        finally:
            handle.remove()
        hidden = captured[0]
        if hidden.shape[1] != response_len + 1:  # every position came back
            hidden = hidden[:, prompt_len - 1 :]
        return hidden[:, :response_len]

    def check_output_layer(self, prompt: Sequence[int], response: Sequence[int]) -> None:
        """Compare :meth:`logits` of the last hidden state with the model's own logits.

        Raises:
            ValueError: the model's logits are not its output layer (+ soft-capping) applied to
                its final hidden states.
        """
        input_ids, mask, position_ids, *_ = pack_prompt_response(
            [prompt], [response], pad_id=self.pad_id, device=self.device
        )
        captured: list[Tensor] = []
        layer = self.model.get_output_embeddings()
        handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            with torch.no_grad():
                kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids)
                try:
                    own = self.model(**kwargs, use_cache=False, logits_to_keep=1).logits
                except TypeError:  # a model class without logits_to_keep
                    captured.clear()
                    own = self.model(**kwargs, use_cache=False).logits
                own = own[0, -1, : self.num_ids]
                ours = self.logits(captured[-1][0, -1])
        finally:
            handle.remove()
        scale = float(own.abs().max()) + 1.0
        if not torch.allclose(ours.float(), own.float(), atol=1e-3 * scale, rtol=1e-3):
            raise ValueError(
                f"the teacher model ({type(self.model).__name__}) computes logits that are not "
                "its output layer applied to its final hidden states; the in-process teacher "
                "cannot compute them a slice at a time (serve it with ctopd serve-teacher or "
                "vLLM instead)"
            )
        self.checked = True


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


def receive_outputs(
    pending: PendingOutputs, *, step: int, last_saved: int | None
) -> TeacherOutputs:
    """``pending.result()``; a served teacher's failure is re-raised naming the step and the
    checkpoint that stays on disk."""
    try:
        return pending.result()
    except TeacherServerError as err:
        where = f"checkpoint of step {last_saved} kept" if last_saved else "no checkpoint yet"
        raise TeacherServerError(
            f"teacher failed at step {step}: {err}; stopping, {where} (--resume continues from it)"
        ) from err
