"""Byte tables: each id's exact bytes, specials, end ids, dummy prefix, clear refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ctopd import TokenizerPair, UnsupportedTokenizerError, build_byte_table
from ctopd.core.byte_table import gather_bytes

from .oracles import prefix_added
from .strategies import texts, texts_with_whitespace_ends


def spelled(table, ids, text: str | None = None) -> bytes:
    """The bytes ids spell, less the dummy-prefix space the tokenizer put before ``text`` (no
    text: the space its decoder drops)."""
    out = gather_bytes(table, np.asarray(ids, dtype=np.int64)).tobytes()
    prefixed = table.decoder_strips_space if text is None else prefix_added(table, text)
    return out[1:] if prefixed and out[:1] == b" " else out


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.one_of(texts, texts_with_whitespace_ends))
def test_tables_spell_encoded_text_exactly(families, text):
    for name, tokenizer in families.items():
        table = build_byte_table(tokenizer) if name not in _TABLES else _TABLES[name]
        _TABLES[name] = table
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if "\u2581" in text and table.kind == "metaspace":
            continue  # SentencePiece reads a literal ▁ as a space
        if table.special[ids].any():
            continue  # a Unigram model can segment "<s>" into its control piece (spells nothing)
        assert spelled(table, ids, text) == text.encode(), name


_TABLES: dict = {}


def test_family_layouts(families):
    byte_level = build_byte_table(families["byte_level"])
    assert byte_level.kind == "byte_level" and not byte_level.dummy_prefix
    sentencepiece = build_byte_table(families["sentencepiece_bpe"])
    assert sentencepiece.kind == "metaspace" and sentencepiece.dummy_prefix
    assert sentencepiece.prefix_only_if_no_space and sentencepiece.decoder_strips_space
    unigram = build_byte_table(families["unigram"])
    assert unigram.kind == "metaspace" and unigram.dummy_prefix
    legacy = build_byte_table(families["sentencepiece_bpe_prepend"])
    assert legacy.prefix_rule == "always" and not legacy.prefix_only_if_no_space


def test_byte_fallback_and_duplicate_spellings(sentencepiece_tokenizer):
    table = build_byte_table(sentencepiece_tokenizer)
    vocab = sentencepiece_tokenizer.get_vocab()
    assert table.token_bytes(vocab["<0x0A>"]) == b"\n"
    assert table.token_bytes(vocab["<0xE4>"]) == b"\xe4"
    # "a" exists both as a learned piece and as the byte piece <0x61>.
    assert table.token_bytes(vocab["a"]) == table.token_bytes(vocab["<0x61>"]) == b"a"
    assert table.token_bytes(vocab["▁in"]) == b" in"


def test_specials_and_end_ids(byte_level_tokenizer, sentencepiece_tokenizer):
    bl = build_byte_table(byte_level_tokenizer)
    vocab = byte_level_tokenizer.get_vocab()
    assert bl.special[vocab["<|im_start|>"]] and bl.lengths[vocab["<|im_start|>"]] == 0
    assert bl.end_ids.tolist() == [vocab["<|im_end|>"]]
    sp = build_byte_table(sentencepiece_tokenizer)
    sp_vocab = sentencepiece_tokenizer.get_vocab()
    # EOS and the end-of-turn marker of the chat template both end the turn.
    assert sorted(sp.end_ids.tolist()) == sorted([sp_vocab["</s>"], sp_vocab["<end_of_turn>"]])


def test_decoding_one_token_at_a_time_is_not_exact_but_the_table_is(byte_level_tokenizer):
    table = build_byte_table(byte_level_tokenizer)
    ids = byte_level_tokenizer.encode("😀", add_special_tokens=False)
    per_token = "".join(byte_level_tokenizer.decode([i]) for i in ids)
    assert len(ids) > 1 and per_token != "😀"
    assert spelled(table, ids).decode() == "😀"


def _wordpiece() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        ["hello world"] * 5,
        trainers.WordPieceTrainer(vocab_size=50, special_tokens=["[UNK]"], show_progress=False),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_unrepresentable_tokenizers_are_refused_with_a_reason():
    with pytest.raises(UnsupportedTokenizerError, match="WordPiece tokenizers drop whitespace"):
        build_byte_table(_wordpiece())
    suffix = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<unk>"))
    suffix.pre_tokenizer = pre_tokenizers.Whitespace()
    suffix.train_from_iterator(
        ["hello world"] * 5,
        trainers.BpeTrainer(
            vocab_size=60, end_of_word_suffix="</w>", special_tokens=["<unk>"], show_progress=False
        ),
    )
    with pytest.raises(UnsupportedTokenizerError, match="end-of-word suffix"):
        build_byte_table(PreTrainedTokenizerFast(tokenizer_object=suffix, unk_token="<unk>"))
    with pytest.raises(UnsupportedTokenizerError, match="not a Hugging Face \\*fast\\* tokenizer"):
        build_byte_table(object())


def _lowercasing(byte_level_tokenizer) -> PreTrainedTokenizerFast:
    spec = json.loads(byte_level_tokenizer.backend_tokenizer.to_str())
    spec["normalizer"] = json.loads(normalizers.Lowercase().__getstate__())
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>"
    )
    return tok


def test_lowercasing_normaliser_warns_and_marks_rewritten_text_unaligned(
    byte_level_tokenizer, sentencepiece_tokenizer
):
    lower = _lowercasing(byte_level_tokenizer)
    with pytest.warns(UserWarning, match="Lowercase"):
        pair = TokenizerPair(lower, sentencepiece_tokenizer)
    student_ids = sentencepiece_tokenizer.encode("the cat Sat on the mat", add_special_tokens=False)
    al = pair.align(pair.teacher_ids_for(student_ids), student_ids)
    assert al.aligned.any() and not al.aligned.all()
    assert 1 <= al.unaligned_bytes <= 4  # only the chunk around "S" differs


def test_a_prefix_space_before_every_pre_token_is_refused(byte_level_tokenizer):
    """ByteLevel(add_prefix_space=True) after a digit-splitting pre-tokenizer puts a space
    before every digit, inside the text: no first-token rule can undo that."""
    from .variants import with_prefix_space

    with pytest.raises(UnsupportedTokenizerError, match="spells 'a1 b22.c' as b' a 1 b 2 2 .c'"):
        build_byte_table(with_prefix_space(byte_level_tokenizer))
