"""Batched sampling and the forward pass that scores a response (docs/concepts/one-step.md).

Layout used everywhere: prompts are **left**-padded to a common length ``P`` and responses are
**right**-padded after it, so response token ``j`` of every row sits at position ``P + j`` and is
predicted by the logits at ``P + j - 1``. Position ids count real tokens only, so a padded row sees
the same positions as it would alone (this is also what ``generate`` does with left padding).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ctopd.objectives.student_head import StudentHead, StudentHidden


def pack_prompt_response(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Left-pad prompts, right-pad responses, into one batch.

    Args:
        prompt_ids: ``B`` prompt id lists.
        response_ids: ``B`` response id lists (may be empty).
        pad_id: id written at padded positions (masked out).
        device: where the tensors go.

    Returns:
        ``(input_ids [B, P+n] int64, attention_mask [B, P+n] int64, position_ids [B, P+n] int64,
        P, n)`` where ``P`` is the longest prompt and ``n`` the longest response (at least 1).
    """
    batch = len(prompt_ids)
    prompt_len = max(len(p) for p in prompt_ids)
    response_len = max(1, max((len(r) for r in response_ids), default=0))
    input_ids = torch.full((batch, prompt_len + response_len), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for b, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        start = prompt_len - len(prompt)
        input_ids[b, start:prompt_len] = torch.as_tensor(prompt, dtype=torch.long)
        mask[b, start:prompt_len] = 1
        if len(response):
            end = prompt_len + len(response)
            input_ids[b, prompt_len:end] = torch.as_tensor(response, dtype=torch.long)
            mask[b, prompt_len:end] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), mask.to(device), position_ids.to(device), prompt_len, response_len


def pad_responses(
    response_ids: Sequence[Sequence[int]], *, pad_id: int = 0, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad responses: ``(ids [B, n] int64, lengths [B] int64)``, ``n >= 1``."""
    lengths = torch.tensor([len(r) for r in response_ids], dtype=torch.long)
    width = max(1, int(lengths.max()) if len(response_ids) else 1)
    ids = torch.full((len(response_ids), width), pad_id, dtype=torch.long)
    for b, response in enumerate(response_ids):
        if len(response):
            ids[b, : len(response)] = torch.as_tensor(response, dtype=torch.long)
    return ids.to(device), lengths.to(device)


def response_logits(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    device: torch.device | str,
) -> torch.Tensor:
    """Next-token logits at response positions, in one forward pass.

    Only the ``n + 1`` last positions are projected to the vocabulary (``logits_to_keep``), so
    prompt positions never allocate ``[P, V]`` logits.

    Returns:
        ``[B, n, V]`` logits (model dtype); row ``j`` predicts ``response_ids[:, j]``. Rows past a
        response's length are padding.
    """
    input_ids, mask, position_ids, prompt_len, response_len = pack_prompt_response(
        prompt_ids, response_ids, pad_id=pad_id, device=device
    )
    kwargs = dict(
        input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
    )
    try:
        logits = model(**kwargs, logits_to_keep=response_len + 1).logits
    except TypeError:  # a model class without logits_to_keep
        logits = model(**kwargs).logits[:, prompt_len - 1 :]
    return logits[:, :response_len]


def response_hidden_states(
    model: torch.nn.Module,
    head_layer: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    device: torch.device | str,
) -> torch.Tensor:
    """The final hidden states at response positions, in one forward pass, without logits.

    A forward pre-hook on ``head_layer`` (the model's ``get_output_embeddings()``) keeps the
    hidden states the output layer would project and hands it zero positions instead, so no
    logits are made; :class:`~ctopd.objectives.student_head.StudentHidden` then projects them
    one slice at a time inside the objective. ``model`` may be the DDP wrapper: the forward runs
    through it, so its gradient hooks see the head's weight as usual.

    Returns:
        ``[B, n, H]`` (the head's input dtype); row ``j`` is what the model projects to the
        logits that predict ``response_ids[:, j]``. Rows past a response's length are padding.
    """
    input_ids, mask, position_ids, prompt_len, response_len = pack_prompt_response(
        prompt_ids, response_ids, pad_id=pad_id, device=device
    )
    kwargs = dict(
        input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
    )
    kept: list[torch.Tensor] = []

    def keep_hidden(_layer, args):
        kept.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head_layer.register_forward_pre_hook(keep_hidden)
    try:
        try:
            model(**kwargs, logits_to_keep=response_len + 1)
            hidden = kept[-1]
        except TypeError:  # a model class without logits_to_keep
            kept.clear()
            model(**kwargs)
            hidden = kept[-1][:, prompt_len - 1 :]
    finally:
        handle.remove()
    if len(kept) != 1:
        raise RuntimeError(f"the output layer ran {len(kept)} times in one forward; expected once")
    return hidden[:, :response_len]


def parameters_sharded(accelerator: Any) -> bool:
    """Whether the prepared model's parameters are sharded across ranks (FSDP, DeepSpeed
    ZeRO-3): its output layer cannot then be read whole on one rank."""
    kind = str(accelerator.distributed_type)
    if kind.endswith("FSDP"):
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return kind.endswith("DEEPSPEED") and plugin is not None and plugin.zero_stage == 3


def response_student_logits(
    model: torch.nn.Module,
    unwrapped: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    device: torch.device | str,
    num_ids: int,
    sharded: bool = False,
) -> torch.Tensor | StudentHidden:
    """The student's logits at response positions, for an objective, in one forward pass.

    By default the final hidden states and the output layer
    (:class:`~ctopd.objectives.student_head.StudentHidden`, ``[B, n, H]`` plus ``[V, H]``): the
    objective projects them one slice of rows at a time, so no ``[B, n, V]`` logits exist.
    Where the output layer cannot be taken apart (``sharded`` parameters, no linear head;
    :meth:`~ctopd.objectives.student_head.StudentHead.from_model` warns then) the model's own
    logits, cut to the first ``num_ids`` columns: ``[B, n, min(V, num_ids)]``.

    Args:
        model: the model to run (may be the DDP wrapper).
        unwrapped: the same model unwrapped (its ``get_output_embeddings()`` and config).
        num_ids: the tokenizer's id count; output rows past it are no token.
        sharded: the parameters are sharded across ranks (:func:`parameters_sharded`).
    """
    packed = dict(pad_id=pad_id, device=device)
    head = StudentHead.from_model(unwrapped, num_ids, sharded=sharded)
    if head is None:
        logits = response_logits(model, prompt_ids, response_ids, **packed)
        return logits[..., :num_ids]
    layer = unwrapped.get_output_embeddings()
    hidden = response_hidden_states(model, layer, prompt_ids, response_ids, **packed)
    return StudentHidden(hidden, head)


def cut_after_end(sequences: torch.Tensor, end_ids: Sequence[int]) -> list[list[int]]:
    """Each row up to and including its first end id (the whole row if none).

    Args:
        sequences: int64 ``[B, n]`` generated tokens (prompt removed).
        end_ids: ids that end a turn.
    """
    is_end = torch.isin(sequences, torch.as_tensor(list(end_ids), device=sequences.device))
    has_end = is_end.any(dim=1)
    first = torch.where(has_end, is_end.int().argmax(dim=1) + 1, sequences.shape[1])
    rows = sequences.tolist()
    return [row[:length] for row, length in zip(rows, first.tolist())]


def count_token_ids(tokenizer: Any) -> int:
    """The number of ids a tokenizer can emit: ``max(len(tokenizer), largest id + 1)``.

    The same count :func:`ctopd.core.byte_table.build_byte_table` covers (``len`` counts tokens,
    so a vocabulary with holes in its ids needs the largest id). Pass it as ``num_ids`` to
    :func:`sample_responses`: model output rows past it (padded embedding matrices) are no token.
    """
    vocab = tokenizer.get_vocab()  # added tokens included
    largest = max(vocab.values()) + 1 if vocab else 0
    return max(len(tokenizer), largest) if hasattr(tokenizer, "__len__") else largest


class MaskIdsFrom(LogitsProcessor):
    """Logit columns ``>= num_ids`` set to ``-inf``: padded output rows are never drawn.

    Args:
        num_ids: the first id that is no token.
    """

    def __init__(self, num_ids: int):
        self.num_ids = num_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``scores``: float ``[B, V]``; returns a masked copy of the same shape."""
        padded = torch.arange(scores.shape[-1], device=scores.device) >= self.num_ids
        return scores.masked_fill(padded, float("-inf"))


@contextmanager
def _without_checkpoint_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """Give every module holding a ``generation_config`` an empty one for the duration.

    ``generate`` fills each field left ``None`` in the config it is given from
    ``model.generation_config`` (the checkpoint's ``generation_config.json``, or ``config.json``
    without one) before its global defaults (transformers 5.x ``_prepare_generation_config``), so
    a fresh config alone still inherits ``top_p``, ``repetition_penalty``, ``suppress_tokens``,
    ``min_new_tokens``... Every module is swapped, not only the outer one: a PEFT wrapper copies
    its (forwarded) config onto the inner model inside its own ``generate``.
    """
    holders = [
        m for m in model.modules() if isinstance(vars(m).get("generation_config"), GenerationConfig)
    ]
    saved = [m.generation_config for m in holders]
    for holder in holders:
        holder.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for holder, config in zip(holders, saved):
            holder.generation_config = config


def _policy_generation_config(
    *,
    greedy: bool,
    max_new_tokens: int,
    end_ids: Sequence[int],
    pad_id: int,
    samples_per_prompt: int,
) -> GenerationConfig:
    """The only settings ``generate`` runs with: plain sampling (or argmax), nothing of its own.

    Temperature, top-k and top-p are applied by :func:`policy_processors` (passed as
    ``logits_processor``), so here they are written out as off (``None`` fields would be filled
    from the global defaults, which include ``top_k=50``) and ``generate`` adds no warper: the
    scores it samples from are the last processor's output, which :class:`RecordLogprobs` reads.
    """
    return GenerationConfig(
        do_sample=not greedy,
        num_beams=1,
        temperature=None if greedy else 1.0,
        top_p=None if greedy else 1.0,
        top_k=None if greedy else 0,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(end_ids),
        pad_token_id=pad_id,
        num_return_sequences=samples_per_prompt,
    )


def policy_processors(
    *, num_ids: int | None, temperature: float, top_k: int, top_p: float
) -> LogitsProcessorList:
    """The sampling policy as logits processors: padded rows masked, then temperature, top-k,
    top-p, in that order (``generate``'s own order), each only when it is on.

    ``temperature=0`` (greedy) keeps only the mask: the argmax needs no warping.
    """
    processors = LogitsProcessorList([MaskIdsFrom(num_ids)] if num_ids is not None else [])
    if temperature == 0:
        return processors
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(float(temperature)))
    if top_k > 0:
        processors.append(TopKLogitsWarper(top_k=int(top_k)))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=float(top_p)))
    return processors


class RecordLogprobs(LogitsProcessor):
    """The last processor: leaves the scores as they are and records each drawn token's
    log-probability under them, ``log softmax(scores)[token]``, i.e. under the policy sampled.

    A step's token is only known at the next call (it is the last column of ``input_ids``), so
    one step's ``[B, V]`` scores and their log-normaliser are held at a time; :meth:`finish`
    reads the last token's. Memory: one ``[B, V]`` reference, never ``[B, n, V]``.
    """

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []  # float32 [B] per generated token
        self._scores: torch.Tensor | None = None
        self._log_normaliser: torch.Tensor | None = None

    def _read(self, tokens: torch.Tensor) -> None:
        if self._scores is not None:
            drawn = self._scores.gather(1, tokens[:, None])[:, 0]
            self.steps.append((drawn - self._log_normaliser).float())

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``scores``: float ``[B, V]``, returned unchanged."""
        self._read(input_ids[:, -1])
        self._scores, self._log_normaliser = scores, scores.logsumexp(-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """Read the last step's token (int64 ``[B]``); returns float32 ``[B, steps]``."""
        self._read(last_tokens)
        self._scores = self._log_normaliser = None
        if not self.steps:
            return torch.zeros(last_tokens.shape[0], 0)
        return torch.stack(self.steps, dim=1).cpu()


@dataclass
class Rollout:
    """Sampled responses and their log-probabilities under the policy that drew them.

    Attributes:
        response_ids: ``N`` id lists, each up to and including its first end id (or cut at
            ``max_new_tokens``).
        logprobs: ``N`` float32 ``[len(response_ids[i])]`` tensors (CPU): ``log π(token)`` under
            the *sampling* policy (padded rows masked, temperature, top-k, top-p applied, the
            same scores ``generate`` drew from). This is the model's own log-probability only at
            temperature 1 with top-k and top-p off. Greedy decoding (temperature 0) is a point
            mass: all zeros. ``None`` when not asked for (``logprobs=False``).
    """

    response_ids: list[list[int]]
    logprobs: list[torch.Tensor] | None


@torch.no_grad()
def generate_rollout(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    end_ids: Sequence[int],
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    samples_per_prompt: int = 1,
    device: torch.device | str = "cpu",
    num_ids: int | None = None,
    generate_options: dict[str, Any] | None = None,
    logprobs: bool = True,
) -> Rollout:
    """Sample responses with HF ``generate`` and keep each token's log-prob under the policy.

    Arguments as :func:`sample_responses`; ``generate_options`` are extra ``GenerationConfig``
    fields that change how, not what, ``generate`` computes (``cache_implementation="static"``);
    anything that changes the distribution is refused by the tests in
    ``tests/training/test_sampling.py``. ``logprobs=False`` skips the log-probs (one
    ``logsumexp`` over ``[B, V]`` per token: about 10 ms at ``B=4``, ``V=262,144`` on one CPU
    thread, more than a tiny model's own step).

    Returns:
        A :class:`Rollout` of ``B * samples_per_prompt`` responses.
    """
    if num_ids is not None and num_ids < 1:
        raise ValueError(f"num_ids must be positive; got {num_ids}")
    input_ids, mask, _, prompt_len, _ = pack_prompt_response(
        prompt_ids, [[] for _ in prompt_ids], pad_id=pad_id, device=device
    )
    input_ids, mask = input_ids[:, :prompt_len], mask[:, :prompt_len]
    greedy = temperature == 0
    generation_config = _policy_generation_config(
        greedy=greedy,
        max_new_tokens=max_new_tokens,
        end_ids=end_ids,
        pad_id=pad_id,
        samples_per_prompt=samples_per_prompt,
    )
    generation_config.update(**(generate_options or {}))
    processors = policy_processors(
        num_ids=num_ids, temperature=temperature, top_k=top_k, top_p=top_p
    )
    recorder = RecordLogprobs() if logprobs and not greedy else None
    if recorder is not None:
        processors.append(recorder)
    was_training = model.training
    model.eval()
    try:
        with _without_checkpoint_generation_config(model):
            output = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                generation_config=generation_config,
                logits_processor=processors,
            )
    finally:
        model.train(was_training)
    generated = output[:, prompt_len:]
    responses = cut_after_end(generated, end_ids)
    if not logprobs:
        return Rollout(responses, None)
    step_logprobs = (
        torch.zeros(generated.shape, dtype=torch.float32)
        if recorder is None
        else recorder.finish(generated[:, -1])
    )
    return Rollout(responses, [row[: len(r)].clone() for row, r in zip(step_logprobs, responses)])


def sample_responses(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    end_ids: Sequence[int],
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    samples_per_prompt: int = 1,
    device: torch.device | str = "cpu",
    num_ids: int | None = None,
) -> list[list[int]]:
    """Sample responses for a batch of prompts with left padding; generation stops at any of
    ``end_ids`` and each response is cut after its first end id.

    Each token is drawn from the model's next-token distribution with ``temperature``, ``top_k``
    and ``top_p`` applied (in that order) and nothing else, whatever the checkpoint's generation
    config says (no repetition penalty, minimum length, suppressed or forced tokens...);
    ``temperature=0`` takes the argmax. :func:`generate_rollout` also returns the log-probs.

    Args:
        model: a causal LM with ``generate`` (unwrapped from DDP).
        prompt_ids: ``B`` prompt id lists (chat template applied).
        end_ids: the model's end-of-turn ids.
        pad_id: padding id for the left-padded batch.
        max_new_tokens: longest response; a response this long without an end id is truncated.
        temperature: 0 means greedy decoding.
        top_p: nucleus threshold (1 = off).
        top_k: top-k filter (0 = off).
        samples_per_prompt: responses per prompt; they come out next to each other.
        device: where the model lives.
        num_ids: the tokenizer's id count (:func:`count_token_ids`); logit columns from it on
            (padded output rows) are masked before temperature, top-k and top-p, so the policy is
            renormalised over real ids. ``None``: every output row can be drawn.

    Returns:
        ``B * samples_per_prompt`` response id lists, each ending with an end id unless cut at
        ``max_new_tokens``.
    """
    return generate_rollout(
        model,
        prompt_ids,
        end_ids=end_ids,
        pad_id=pad_id,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        samples_per_prompt=samples_per_prompt,
        device=device,
        num_ids=num_ids,
        logprobs=False,
    ).response_ids
