"""Tiny random models whose output matrix has more rows than their tokenizer has ids, as real
checkpoints do (Qwen2.5-7B: 152,064 rows for 151,665 ids), with the padded rows rigged to hold
nearly all the probability, so that any softmax that lets them in is visibly wrong."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast

from ctopd.training.rollout import count_token_ids

# Added to the padded rows' logits: against random logits near 0 they hold all but
# ~ ids * e^-30 / rows of the mass (below 1e-7 for Qwen2's 151,936 ids).
PADDED_BIAS = 30.0


def load_real_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A real tokenizer folder, with EOS as its pad token when it has none."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def padded_causal_lm(
    tokenizer, *, extra_rows: int, seed: int = 0, hidden_size: int = 16, max_positions: int = 512
) -> PhiForCausalLM:
    """A random one-layer Phi model (its ``lm_head`` has a bias) with ``extra_rows`` output rows
    past the tokenizer's ids, each biased by :data:`PADDED_BIAS`.

    Args:
        tokenizer: sets the id count and the bos/eos/pad ids.
        extra_rows: padded output rows (``vocab_size = ids + extra_rows``).
        seed: initialisation seed.
        hidden_size: width of the residual stream.
        max_positions: longest sequence.
    """
    num_ids = count_token_ids(tokenizer)
    config = PhiConfig(
        vocab_size=num_ids + extra_rows,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = PhiForCausalLM(config)
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[num_ids:] = PADDED_BIAS
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_padded(folder: Path, tokenizer, *, extra_rows: int, seed: int = 0) -> Path:
    """:func:`padded_causal_lm` and its tokenizer saved as a ``from_pretrained`` folder."""
    padded_causal_lm(tokenizer, extra_rows=extra_rows, seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
