"""Small local fixtures for tests and smoke runs: tokenizers of four families trained in about a
second, and tiny randomly initialised causal LMs sized for them (no hub download)."""

from ctopd.testing.models import tiny_causal_lm
from ctopd.testing.tokenizers import (
    train_byte_level_bpe,
    train_digit_group_bpe,
    train_sentencepiece_bpe,
    train_sentencepiece_unigram,
)

__all__ = [
    "tiny_causal_lm",
    "train_byte_level_bpe",
    "train_digit_group_bpe",
    "train_sentencepiece_bpe",
    "train_sentencepiece_unigram",
]
