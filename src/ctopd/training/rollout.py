"""Batched sampling and the forward pass that scores a response (ALGORITHMS §1.2 and §1.4).

Layout used everywhere: prompts are **left**-padded to a common length ``P`` and responses are
**right**-padded after it, so response token ``j`` of every row sits at position ``P + j`` and is
predicted by the logits at ``P + j - 1``. Position ids count real tokens only, so a padded row sees
the same positions as it would alone (this is also what ``generate`` does with left padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig


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


def pad_responses(response_ids: Sequence[Sequence[int]], *, pad_id: int = 0,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
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
    kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                  use_cache=False)
    try:
        logits = model(**kwargs, logits_to_keep=response_len + 1).logits
    except TypeError:  # a model class without logits_to_keep
        logits = model(**kwargs).logits[:, prompt_len - 1 :]
    return logits[:, :response_len]


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


@torch.no_grad()
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
) -> list[list[int]]:
    """Sample responses for a batch of prompts with left padding; generation stops at any of
    ``end_ids`` and each response is cut after its first end id.

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

    Returns:
        ``B * samples_per_prompt`` response id lists, each ending with an end id unless cut at
        ``max_new_tokens``.
    """
    input_ids, mask, _, prompt_len, _ = pack_prompt_response(
        prompt_ids, [[] for _ in prompt_ids], pad_id=pad_id, device=device
    )
    input_ids, mask = input_ids[:, :prompt_len], mask[:, :prompt_len]
    greedy = temperature == 0
    # A fresh GenerationConfig: no hidden defaults (top_k=50, repetition penalty...) from the
    # checkpoint's generation_config.json change the sampling distribution.
    generation_config = GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy or top_p >= 1.0 else top_p,
        top_k=None if greedy or top_k <= 0 else top_k,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(end_ids),
        pad_token_id=pad_id,
        num_return_sequences=samples_per_prompt,
    )
    was_training = model.training
    model.eval()
    try:
        output = model.generate(input_ids=input_ids, attention_mask=mask,
                                generation_config=generation_config)
    finally:
        model.train(was_training)
    return cut_after_end(output[:, prompt_len:], end_ids)
