"""Leading and trailing whitespace against dummy prefixes, for every local family and layout.

Two readings of a first token's leading space (``align_ids_batch``):

* text input (``ctopd align``): both sides' ids are each tokenizer's own ids of the text, and a
  leading ``▁`` is the dummy prefix exactly where that tokenizer's rules put one before it;
* sampled ids (training): the response's text is what the student's tokenizer decodes, and
  the teacher's ids are the teacher's own ids of that text.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ctopd import build_byte_table
from ctopd.commands.align import align_records

from .oracles import (
    check_against_reference,
    check_partition,
    content_pieces,
    declared_rule,
    prefix_added,
)
from .strategies import texts, texts_with_whitespace_ends
from .variants import with_prepend_scheme

# (prefix_rule, decoder_strips_space) each layout must get from its own rules.
EXPECTED_RULES = {
    "byte_level": ("never", False),
    "byte_level_whole_numbers": ("never", False),
    "byte_level_prefix_space": ("unless_space", False),
    "sentencepiece_bpe": ("unless_space", True),
    "sentencepiece_bpe_always": ("unless_space", True),
    "sentencepiece_bpe_prepend": ("always", True),
    "unigram": ("unless_space", True),
    "unigram_always": ("unless_space", True),
    "unigram_prepend": ("always", True),
}


def test_each_layout_gets_its_own_prefix_rules(families, sentencepiece_tokenizer):
    for name, tokenizer in families.items():
        table = build_byte_table(tokenizer)
        assert (table.prefix_rule, table.decoder_strips_space) == EXPECTED_RULES[name], name
        assert table.prefix_rule == declared_rule(tokenizer), name
        assert table.dummy_prefix == (table.prefix_rule != "never")
        # The rule as the tokenizer applies it: "x" and " x" encoded, spelled by the table.
        for text in ("x", " x", "  x", "\nx"):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            spelled = b"".join(table.token_bytes(i) for i in ids)
            assert spelled == b" " * prefix_added(table, text) + text.encode(), (name, text)
    never = build_byte_table(with_prepend_scheme(sentencepiece_tokenizer, "never"))
    # No dummy prefix, but SentencePiece's Strip decoder still drops a leading space.
    assert (never.prefix_rule, never.decoder_strips_space) == ("never", True)


def own_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_lone_space_gets_the_byte_level_teachers_own_id(pairs, families):
    """The reported case: " " with a first-scheme student; the teacher itself gives ``Ġ``."""
    pair = pairs[("byte_level", "sentencepiece_bpe")]
    [record] = align_records(pair, [" "])
    assert record["teacher_ids"] == own_ids(families["byte_level"], " ") != []
    assert pair.teacher_table.token_bytes(record["teacher_ids"][0]) == b" "
    assert record["student_ids"] == own_ids(families["sentencepiece_bpe"], " ")
    assert record["chunks"] == [[0, 1, 0, len(record["student_ids"])]]
    assert record["aligned"] == [True]


@pytest.mark.parametrize("teacher", ["sentencepiece_bpe", "unigram", "sentencepiece_bpe_always"])
def test_three_leading_spaces_spell_three_spaces(pairs, families, teacher):
    """The reported case: a first-scheme teacher's ids of "   x..." spelled four spaces."""
    pair = pairs[(teacher, "byte_level")]
    text = "   sold 12 clips"
    [record] = align_records(pair, [text])
    assert record["teacher_ids"] == own_ids(families[teacher], text)
    al = pair.align(record["teacher_ids"], record["student_ids"], text=text)
    assert not al.teacher_dummy_space
    pieces = content_pieces(pair.teacher_table, record["teacher_ids"], al.teacher_dummy_space)
    assert b"".join(pieces) == text.encode()
    assert all(record["aligned"])


def first_space_is_prefix(table, text: str, ids: list[int]) -> bool:
    """The tokenizer put a dummy prefix before ``text`` and its first token carries it (a text
    that opens with a special-token string starts with that special id instead)."""
    return (
        prefix_added(table, text)
        and bool(ids)
        and not table.special[ids[0]]
        and table.token_bytes(ids[0])[:1] == b" "
    )


def exact_over_text(pair, text: str, teacher_ids, student_ids) -> bool:
    """Whether both tokenizers spell ``text`` itself: no literal ``▁`` (SentencePiece reads it
    as a space) and no control piece the text was segmented into."""
    return (
        "\u2581" not in text
        and not pair.teacher_table.special[teacher_ids].any()
        and not pair.student_table.special[student_ids].any()
    )


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.one_of(texts_with_whitespace_ends, texts), pair_index=st.integers(0, 10**6))
@example(text="<s>", pair_index=3)  # a text that is a special-token string
@example(text="\U0001f600<s>", pair_index=39)
def test_text_input_gives_own_ids_and_chunks_exact_over_the_text(pairs, text, pair_index):
    key = sorted(pairs)[pair_index % len(pairs)]
    pair = pairs[key]
    [record] = align_records(pair, [text])
    teacher_ids, student_ids = record["teacher_ids"], record["student_ids"]
    assert teacher_ids == own_ids(pair.teacher_tokenizer, text)
    assert student_ids == own_ids(pair.student_tokenizer, text)
    al = pair.align(teacher_ids, student_ids, text=text)
    assert al.chunks.tolist() == record["chunks"] and al.aligned.tolist() == record["aligned"]
    assert (al.teacher_dummy_space, al.student_dummy_space) == (
        first_space_is_prefix(pair.teacher_table, text, teacher_ids),
        first_space_is_prefix(pair.student_table, text, student_ids),
    )
    check_partition(al, len(teacher_ids), len(student_ids))
    student_bytes = check_against_reference(pair, teacher_ids, student_ids, al, text=text)
    if text and exact_over_text(pair, text, teacher_ids, student_ids):
        assert student_bytes == text.encode(), key
        assert al.aligned.all() and al.unaligned_bytes == 0, key


# Responses that open with whitespace or a byte-fallback piece, and how a student may have
# sampled them: its own ids, and the same after an extra leading piece.
RESPONSES = [" x", "  x", "   x", "\nx", " \n x", "\u02a4x", "x  "]
EXTRA_FIRST = ["", "\u2581", "\u2581\u2581", "<0x20>", "<0x0A>", "<0xCA>", "\u0120", "\u010a"]


def sampled_spellings(tokenizer, response: str) -> list[list[int]]:
    vocab = tokenizer.get_vocab()
    ids = own_ids(tokenizer, response)
    return [ids] + [[vocab[piece]] + ids for piece in EXTRA_FIRST if piece in vocab]


@pytest.mark.parametrize("teacher", sorted(EXPECTED_RULES))
@pytest.mark.parametrize("student", sorted(EXPECTED_RULES))
def test_sampled_response_text_is_what_the_student_decodes(pairs, teacher, student):
    pair = pairs[(teacher, student)]
    tok, t_tok = pair.student_tokenizer, pair.teacher_tokenizer
    eos, t_end = tok.eos_token_id, pair.teacher_end_of_turn_id
    for response in RESPONSES:
        for ids in sampled_spellings(tok, response):
            decoded = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            for sampled, end in ((ids, []), (ids + [eos], [t_end])):
                assert pair.student_text(sampled) == decoded, (response, ids)
                teacher_ids = pair.teacher_ids_for(sampled)
                if not pair.identical:
                    assert teacher_ids == own_ids(t_tok, decoded) + end, (response, ids)
                al = pair.align(teacher_ids, sampled)
                check_partition(al, len(teacher_ids), len(sampled))
                student_bytes = check_against_reference(pair, teacher_ids, sampled, al)
                assert student_bytes == pair.student_response_bytes(sampled)
                if decoded and "\ufffd" not in decoded:  # <0xCA> alone is invalid UTF-8
                    assert student_bytes == decoded.encode()
                    assert al.aligned.all(), (response, ids, al)


def test_identical_tokenizers_read_sampled_leading_spaces_alike(families):
    from ctopd import TokenizerPair

    tok = families["sentencepiece_bpe"]
    pair = TokenizerPair(tok, tok)
    vocab = tok.get_vocab()
    sampled = [vocab["\u2581"], vocab["\u2581x"], tok.eos_token_id]  # decodes to " x"
    assert pair.teacher_ids_for(sampled) == sampled
    al = pair.align(sampled, sampled)
    assert al.teacher_dummy_space and al.student_dummy_space
    # The first "▁" spells nothing once its dummy space is left out; it joins the next chunk.
    assert al.chunks.tolist() == [[0, 2, 0, 2], [2, 3, 2, 3]] and al.aligned.all()


def test_batches_mix_texts_that_do_and_do_not_start_with_a_space(pairs):
    """Per-sequence reading inside one batched call, for both input kinds."""
    pair = pairs[("sentencepiece_bpe", "unigram_prepend")]
    batch = ["x y", " x y", "  x", "", "\n", " ", "x ", "\u02a4 "] * 3
    teacher_ids, student_ids = pair.encode_batch(batch)
    together = pair.align_batch(teacher_ids, student_ids, texts=batch)
    for t_ids, s_ids, text, al in zip(teacher_ids, student_ids, batch, together):
        single = pair.align(t_ids, s_ids, text=text)
        assert np.array_equal(al.chunks, single.chunks) and al.aligned.all()
        assert (al.teacher_dummy_space, al.student_dummy_space) == (
            single.teacher_dummy_space,
            single.student_dummy_space,
        )
    sampled_teacher = pair.teacher_ids_for_batch(student_ids)
    for t_ids, s_ids, al in zip(
        sampled_teacher, student_ids, pair.align_batch(sampled_teacher, student_ids)
    ):
        single = pair.align(t_ids, s_ids)
        assert np.array_equal(al.chunks, single.chunks)
        assert np.array_equal(al.aligned, single.aligned)
    with pytest.raises(ValueError, match="per text"):
        pair.align_batch(teacher_ids, student_ids, texts=batch[:-1])
