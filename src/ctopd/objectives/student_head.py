"""The student's logits held as final hidden states and the output layer (issue 27).

At a 262,144-id student and 4,096 response tokens a ``[B, m, V]`` float32 logits tensor is 4 GB
per sequence, its gradient as much again. :class:`StudentHidden` stands for those logits without
making them: the final hidden states ``[B, m, H]`` and a :class:`StudentHead` (the output
matrix, its bias and the family's logit transform). The objectives accept it wherever they
accept dense logits; :func:`~ctopd.objectives.sliced.sliced_loss` then projects one slice of
rows at a time and sends the gradient to the hidden states and the head's weight.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class StudentHead:
    """A language model's output layer: ``logits = transform(hidden @ weight.T + bias)``.

    Attributes:
        weight: float ``[V, H]``: the output matrix (tied to the input embedding or not). It may
            have more rows than the tokenizer has ids (a padded embedding matrix).
        bias: float ``[V]`` or ``None``.
        softcap: Gemma-2 style ``final_logit_softcapping``: ``logits = c * tanh(logits / c)``;
            ``None`` for none.
        scale: a factor applied before the soft cap (Cohere's ``logit_scale``, ``1 /`` Granite's
            ``logits_scaling``); ``1.0`` for none.
        num_ids: the tokenizer's id count ``V_S``: rows ``>= num_ids`` are no token and are never
            projected (no probability, no gradient).
    """

    weight: Tensor
    bias: Tensor | None
    softcap: float | None
    num_ids: int
    scale: float = 1.0

    @property
    def columns(self) -> int:
        """The logits' width: ``min(V, num_ids)``."""
        return min(self.weight.shape[0], self.num_ids)

    def project(self, hidden: Tensor) -> Tensor:
        """Logits before the transform, ``[..., columns]`` in the weight's dtype."""
        rows = self.columns
        bias = None if self.bias is None else self.bias[:rows]
        return torch.nn.functional.linear(hidden, self.weight[:rows], bias)

    def transform(self, logits: Tensor) -> Tensor:
        """The family's logit transform (scale, then soft cap) of projected logits."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def __call__(self, hidden: Tensor) -> Tensor:
        """Dense logits ``[..., columns]`` of ``hidden`` ``[..., H]`` (the reference path)."""
        return self.transform(self.project(hidden))

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, num_ids: int, *, sharded: bool = False
    ) -> StudentHead | None:
        """The output layer of a causal LM (unwrapped: not the DDP wrapper), or ``None`` with a
        one-line warning when it cannot be taken apart.

        ``None`` when the model has no ``get_output_embeddings()`` linear layer, when the
        caller says its parameters are ``sharded`` or its weight looks sharded (FSDP's flat parameters, DeepSpeed ZeRO-3, tensor parallel ``DTensor``); the
        caller then uses the model's own full logits. The transform is read from the config:
        ``final_logit_softcapping`` (Gemma-2/3), ``logit_scale`` (Cohere), ``logits_scaling``
        (Granite); tests/objectives/test_student_head.py checks ``head(hidden)`` against the
        model's own logits for the supported families.
        """
        if sharded:
            return _dense(f"the parameters of {type(model).__name__} are sharded")
        get_head = getattr(model, "get_output_embeddings", None)
        layer = get_head() if callable(get_head) else None
        if not isinstance(layer, torch.nn.Linear):
            return _dense(f"{type(model).__name__} has no linear output layer")
        weight = layer.weight
        if (
            hasattr(weight, "ds_id")
            or type(weight).__name__ in ("DTensor", "FlatParameter")
            or weight.dim() != 2
            or tuple(weight.shape) != (layer.out_features, layer.in_features)
        ):
            return _dense(f"the output layer of {type(model).__name__} is sharded")
        config = getattr(model, "config", None)
        config = getattr(config, "text_config", None) or config
        softcap = getattr(config, "final_logit_softcapping", None)
        scale = float(getattr(config, "logit_scale", None) or 1.0)
        if getattr(config, "logits_scaling", None):
            scale /= float(config.logits_scaling)
        softcap = float(softcap) if softcap else None
        return cls(layer.weight, layer.bias, softcap, num_ids, scale)


def _dense(reason: str) -> None:
    warnings.warn(
        f"{reason}: computing the objective from full [B, m, V] logits (more memory)",
        stacklevel=3,
    )
    return None


@dataclass(frozen=True)
class StudentHidden:
    """The student's logits ``[B, m, V_S]`` as final hidden states and the output layer.

    Row ``i`` of ``head(hidden)`` predicts ``student_ids[:, i]``. ``shape``, ``dtype``,
    ``device`` and ``requires_grad`` describe those logits, so the objectives read them as they
    read a dense tensor; only :func:`~ctopd.objectives.sliced.sliced_loss` ever makes rows, one
    slice at a time.

    Attributes:
        hidden: float ``[B, m, H]``: the final hidden states (after the final norm), connected
            to the model's graph.
        head: the output layer.
    """

    hidden: Tensor
    head: StudentHead

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.head.columns))

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def requires_grad(self) -> bool:
        bias = self.head.bias
        return (
            self.hidden.requires_grad
            or self.head.weight.requires_grad
            or (bias is not None and bias.requires_grad)
        )

    def real_id_columns(self, num_ids: int) -> StudentHidden:
        """The same logits cut to the first ``num_ids`` columns (never widened)."""
        if num_ids >= self.head.columns:
            return self
        return replace(self, head=replace(self.head, num_ids=num_ids))

    def dense(self) -> Tensor:
        """The full logits ``[B, m, V_S]`` (the reference path; memory grows with ``m * V``)."""
        return self.head(self.hidden)
