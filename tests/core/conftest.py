"""Tokenizer families trained locally in a few seconds, for the alignment tests, each
SentencePiece family with each dummy-prefix layout (Metaspace ``prepend_scheme`` "first" and
"always", and the legacy ``Prepend`` normaliser) and byte-level BPE with and without a prefix
space."""

from __future__ import annotations

import pytest

from ctopd.testing import (
    train_byte_level_bpe,
    train_sentencepiece_bpe,
    train_sentencepiece_unigram,
)

from .variants import with_prefix_space, with_prepend_scheme

CORPUS = [
    "Natalia sold 48 clips in April and half as many, 24, in May: 72 in all.",
    "Weng earns $12 an hour; 50 minutes of babysitting pay 0.2 x 50 = $10.",
    "The café served crème brûlée to 1,234 guests.\n\tThen it closed.",
    "東京タワーは高さ333メートルです。 北京 上海 中文 日本語",
    "Emoji 👩‍👩‍👧 and 😀😀 with flags 🇫🇷 in text.  Double  spaces   here.",
    "Ünïcödé with combining marks: e\u0301 a\u0308 and Ω ≈ ∑ √2",
    "def f(x):\n    return x * 2\r\n\r\n# comment\n",
] * 20


@pytest.fixture(scope="session")
def byte_level_tokenizer():
    return train_byte_level_bpe(CORPUS, 400)


@pytest.fixture(scope="session")
def byte_level_whole_numbers_tokenizer():
    return train_byte_level_bpe(CORPUS, 380, split_digits=False)


@pytest.fixture(scope="session")
def sentencepiece_tokenizer():
    return train_sentencepiece_bpe(CORPUS, 450)


@pytest.fixture(scope="session")
def unigram_tokenizer():
    return train_sentencepiece_unigram(CORPUS, 300)


@pytest.fixture(scope="session")
def families(
    byte_level_tokenizer,
    sentencepiece_tokenizer,
    unigram_tokenizer,
    byte_level_whole_numbers_tokenizer,
):
    """Name -> tokenizer, for every family and dummy-prefix layout the tests align across.

    ``sentencepiece_bpe`` and ``unigram`` use Metaspace ``prepend_scheme="first"``; the
    ``_always`` variants ``"always"``, the ``_prepend`` variants a ``Prepend("▁")`` normaliser
    (a dummy prefix before every text, also one that starts with a space);
    ``byte_level_prefix_space`` is ByteLevel with ``add_prefix_space=True``.
    """
    return {
        "byte_level": byte_level_tokenizer,
        "byte_level_whole_numbers": byte_level_whole_numbers_tokenizer,
        "byte_level_prefix_space": with_prefix_space(byte_level_whole_numbers_tokenizer),
        "sentencepiece_bpe": sentencepiece_tokenizer,
        "sentencepiece_bpe_always": with_prepend_scheme(sentencepiece_tokenizer, "always"),
        "sentencepiece_bpe_prepend": with_prepend_scheme(sentencepiece_tokenizer, "prepend"),
        "unigram": unigram_tokenizer,
        "unigram_always": with_prepend_scheme(unigram_tokenizer, "always"),
        "unigram_prepend": with_prepend_scheme(unigram_tokenizer, "prepend"),
    }


@pytest.fixture(scope="session")
def pairs(families):
    """(teacher name, student name) -> TokenizerPair, every ordered pair of families."""
    from ctopd import TokenizerPair

    return {(t, s): TokenizerPair(families[t], families[s]) for t in families for s in families}
