"""Batched sampling with left padding and the response-position forward pass."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ctopd.training.config import DataConfig, ModelConfig
from ctopd.training.data import encode_prompts, load_examples
from ctopd.training.models import load_model_tokenizer
from ctopd.training.rollout import (
    cut_after_end,
    pack_prompt_response,
    pad_responses,
    response_logits,
    sample_responses,
)


@pytest.fixture(scope="module")
def student(tiny):
    tokenizer = load_model_tokenizer(ModelConfig(str(tiny["student"])), side="student")
    model = AutoModelForCausalLM.from_pretrained(tiny["student"])
    examples = load_examples(DataConfig(path=str(tiny["prompts"]), limit=5))
    return model, tokenizer, encode_prompts(tokenizer, examples, side="student")


def test_pack_left_pads_prompts_and_right_pads_responses():
    ids, mask, positions, prompt_len, response_len = pack_prompt_response(
        [[5, 6, 7], [8]], [[1], [2, 3]], pad_id=0
    )
    assert (prompt_len, response_len) == (3, 2)
    assert ids.tolist() == [[5, 6, 7, 1, 0], [0, 0, 8, 2, 3]]
    assert mask.tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert positions.tolist() == [[0, 1, 2, 3, 3], [0, 0, 0, 1, 2]]


def test_pad_responses_and_cut_after_end():
    ids, lengths = pad_responses([[4, 5], [], [6]], pad_id=-1)
    assert ids.tolist() == [[4, 5], [-1, -1], [6, -1]] and lengths.tolist() == [2, 0, 1]
    rows = torch.tensor([[3, 9, 4, 9], [3, 3, 3, 3], [2, 0, 0, 0]])
    assert cut_after_end(rows, [9, 2]) == [[3, 9], [3, 3, 3, 3], [2]]


def test_response_logits_match_an_unpadded_forward(student):
    model, _, prompts = student
    responses = [[10, 11, 12], [13], [14, 15, 16, 17, 18]]
    batch = response_logits(model, prompts[:3], responses, pad_id=0, device="cpu")
    assert batch.shape == (3, 5, model.config.vocab_size)
    for b, (prompt, response) in enumerate(zip(prompts[:3], responses)):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            alone = model(input_ids=ids).logits[
                0, len(prompt) - 1 : len(prompt) - 1 + len(response)
            ]
        torch.testing.assert_close(batch[b, : len(response)].detach(), alone, atol=1e-4, rtol=1e-4)


def test_batched_greedy_equals_one_at_a_time(student):
    model, tokenizer, prompts = student
    kwargs = dict(
        end_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=8,
        temperature=0.0,
    )
    batched = sample_responses(model, prompts, **kwargs)
    alone = [sample_responses(model, [p], **kwargs)[0] for p in prompts]
    assert batched == alone
    assert all(1 <= len(r) <= 8 for r in batched)


def test_sampling_is_seeded_and_stops_at_end_ids(student):
    model, tokenizer, prompts = student
    kwargs = dict(
        pad_id=tokenizer.pad_token_id, max_new_tokens=10, temperature=1.0, samples_per_prompt=2
    )
    torch.manual_seed(3)
    first = sample_responses(model, prompts[:2], end_ids=[tokenizer.eos_token_id], **kwargs)
    torch.manual_seed(3)
    again = sample_responses(model, prompts[:2], end_ids=[tokenizer.eos_token_id], **kwargs)
    assert first == again and len(first) == 4
    # Make every token an end id: each response is exactly one token long.
    every = list(range(model.config.vocab_size))
    assert all(len(r) == 1 for r in sample_responses(model, prompts[:2], end_ids=every, **kwargs))
