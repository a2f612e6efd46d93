"""Minimal aligned chunks: property tests against a brute-force reference, across families."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctopd import TokenizerPair
from ctopd.core.alignment import align_ids_batch

from .oracles import (
    byte_matcher_alignment,
    check_against_reference,
    check_partition,
    content_pieces,
    same_length_substitute,
    sides_prefixed,
)
from .strategies import texts, texts_with_whitespace_ends


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.one_of(texts, texts_with_whitespace_ends),
    pair_index=st.integers(0, 10**6),
    ended=st.booleans(),
)
def test_chunks_partition_match_bytes_and_are_minimal(pairs, text, pair_index, ended):
    key = sorted(pairs)[pair_index % len(pairs)]
    pair = pairs[key]
    student = pair.student_tokenizer
    student_ids = student(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if ended:
        student_ids = student_ids + [student.eos_token_id]
    # The rule for sampled ids: their text is what the student's tokenizer decodes them to.
    assert pair.student_text(student_ids) == student.decode(
        student_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    # A Unigram model can segment text like "<s>" into its control piece, which spells nothing.
    segmented_into_special = pair.student_table.special[student_ids[: len(student_ids) - ended]]
    teacher_ids = pair.teacher_ids_for(student_ids)
    al = pair.align(teacher_ids, student_ids)
    check_partition(al, len(teacher_ids), len(student_ids))
    check_against_reference(pair, teacher_ids, student_ids, al)
    # SentencePiece reads a literal ▁ as a space: bytes really differ. Tokens spelling no bytes
    # at all (a lone dummy-prefix piece) carry no content to supervise. A control piece either
    # side's model segmented the text into spells nothing and is rightly unaligned.
    teacher_special = pair.teacher_table.special[teacher_ids[: len(teacher_ids) - ended]]
    if (
        "\u2581" not in text
        and pair.student_text(student_ids)
        and not segmented_into_special.any()
        and not teacher_special.any()
    ):
        assert al.aligned.all(), f"{key}: unaligned chunk on {text!r}"
        assert al.unaligned_bytes == 0
    if ended:
        assert al.is_end[-1] and al.aligned[-1]
        assert tuple(al.chunks[-1]) == (
            len(teacher_ids) - 1,
            len(teacher_ids),
            len(student_ids) - 1,
            len(student_ids),
        )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batch=st.lists(st.one_of(texts, texts_with_whitespace_ends), min_size=1, max_size=6),
    pair_index=st.integers(0, 10**6),
)
def test_align_batch_equals_one_by_one(pairs, batch, pair_index):
    pair = pairs[sorted(pairs)[pair_index % len(pairs)]]
    student_ids = [pair.student_tokenizer.encode(t, add_special_tokens=False) for t in batch]
    teacher_ids = pair.teacher_ids_for_batch(student_ids)
    together = pair.align_batch(teacher_ids, student_ids)
    for t_ids, s_ids, al in zip(teacher_ids, student_ids, together):
        single = pair.align(t_ids, s_ids)
        assert np.array_equal(al.chunks, single.chunks)
        assert np.array_equal(al.aligned, single.aligned)


def test_hand_checked_chunks(byte_level_tokenizer, sentencepiece_tokenizer):
    pair = TokenizerPair(byte_level_tokenizer, sentencepiece_tokenizer)
    student_ids = sentencepiece_tokenizer.encode("sold 1234", add_special_tokens=False)
    teacher_ids = pair.teacher_ids_for(student_ids)
    # The byte-level teacher splits digits one by one; each chunk is the smallest piece both
    # tokenizations end on.
    teacher_tokens = [pair.teacher_table.token_bytes(i) for i in teacher_ids]
    assert teacher_tokens[-4:] == [b"1", b"2", b"3", b"4"]
    al = pair.align(teacher_ids, student_ids)
    for ta, tb, sa, sb in al.chunks:
        t = b"".join(pair.teacher_table.token_bytes(i) for i in teacher_ids[ta:tb])
        s = b"".join(content_pieces(pair.student_table, student_ids)[sa:sb])
        assert t == s
    assert b"".join(content_pieces(pair.student_table, student_ids)) == b"sold 1234"


def test_empty_response_and_end_only(byte_level_tokenizer, sentencepiece_tokenizer):
    pair = TokenizerPair(byte_level_tokenizer, sentencepiece_tokenizer)
    empty = pair.align([], [])
    assert empty.num_chunks == 0 and empty.teacher_length == 0
    eos = sentencepiece_tokenizer.eos_token_id
    end_only = pair.align(pair.teacher_ids_for([eos]), [eos])
    assert end_only.chunks.tolist() == [[0, 1, 0, 1]]
    assert end_only.is_end.tolist() == [True] and end_only.aligned.tolist() == [True]


def test_end_on_one_side_only_is_unaligned(byte_level_tokenizer, sentencepiece_tokenizer):
    pair = TokenizerPair(byte_level_tokenizer, sentencepiece_tokenizer)
    student_ids = sentencepiece_tokenizer.encode("abc", add_special_tokens=False)
    teacher_ids = pair.teacher_ids_for(student_ids)
    al = pair.align(teacher_ids, student_ids + [sentencepiece_tokenizer.eos_token_id])
    assert not al.aligned[-1] and not al.is_end[-1]
    assert al.chunks[-1].tolist() == [
        len(teacher_ids),
        len(teacher_ids),
        len(student_ids),
        len(student_ids) + 1,
    ]


def test_ids_out_of_range_raise(byte_level_tokenizer, sentencepiece_tokenizer):
    pair = TokenizerPair(byte_level_tokenizer, sentencepiece_tokenizer)
    with pytest.raises(ValueError, match="out of range for tokenizer student"):
        pair.align([1, 2], [1, 10**6])
    with pytest.raises(ValueError, match="out of range for tokenizer teacher"):
        pair.align([-1], [5])
    with pytest.raises(ValueError, match="one teacher sequence per student sequence"):
        pair.align_batch([[1]], [[1], [2]])


def test_mismatched_texts_give_unaligned_chunks_not_shifts(
    byte_level_tokenizer, sentencepiece_tokenizer
):
    pair = TokenizerPair(byte_level_tokenizer, sentencepiece_tokenizer)
    student_ids = sentencepiece_tokenizer.encode(
        "The total is 1234 apples.", add_special_tokens=False
    )
    teacher_ids = byte_level_tokenizer.encode("The total is 98 apples.", add_special_tokens=False)
    al = pair.align(teacher_ids, student_ids)
    check_partition(al, len(teacher_ids), len(student_ids))
    assert not al.aligned.all() and al.aligned.any()
    assert al.unaligned_bytes > 0
    check_against_reference(pair, teacher_ids, student_ids, al)
    # The common suffix " apples." is still aligned after the differing number.
    last = al.chunks[al.aligned][-1]
    t = b"".join(pair.teacher_table.token_bytes(i) for i in teacher_ids[last[0] : last[1]])
    assert t.endswith(b".")


def test_a_long_differing_middle_is_cut_at_anchors_not_lost(
    byte_level_tokenizer, sentencepiece_tokenizer, monkeypatch
):
    """Texts that differ near both ends with a long equal stretch between (a sampled response
    with a broken byte early and late): above ``MAX_MATCHED_MIDDLE_BYTES`` the middle is cut at
    anchors and matched piece by piece, not lost as one unaligned region."""
    from ctopd.core import alignment as core

    pair = TokenizerPair(byte_level_tokenizer, sentencepiece_tokenizer)
    middle = " ".join(
        f"Box {i} holds {i * 7 % 97} red and {i * 13 % 89} blue beads." for i in range(60)
    )
    student_ids = sentencepiece_tokenizer.encode(
        f"Total 1234: {middle} So 56.", add_special_tokens=False
    )
    teacher_ids = byte_level_tokenizer.encode(f"Total 98: {middle} So 7.", add_special_tokens=False)
    whole = pair.align(teacher_ids, student_ids)  # the middle is below the default limit
    monkeypatch.setattr(core, "MAX_MATCHED_MIDDLE_BYTES", 200)
    cut = pair.align(teacher_ids, student_ids)
    check_partition(cut, len(teacher_ids), len(student_ids))
    check_against_reference(pair, teacher_ids, student_ids, cut)
    # Equal to the whole-middle matcher's up to a few bytes next to the differing ends (the
    # matcher, run on each piece, pairs fewer stray equal bytes there).
    assert whole.unaligned_bytes <= cut.unaligned_bytes <= whole.unaligned_bytes + 4
    assert cut.aligned.sum() >= whole.aligned.sum() - 4
    monkeypatch.setattr(core, "_anchor", lambda a, b: None)  # no anchor: one unaligned region
    assert pair.align(teacher_ids, student_ids).unaligned_bytes > len(middle)


def test_special_token_inside_response_is_unaligned(byte_level_tokenizer, sentencepiece_tokenizer):
    pair = TokenizerPair(byte_level_tokenizer, sentencepiece_tokenizer)
    sp = sentencepiece_tokenizer
    start_of_turn = sp.convert_tokens_to_ids("<start_of_turn>")
    student_ids = (
        sp.encode("ab", add_special_tokens=False)
        + [start_of_turn]
        + sp.encode("cd", add_special_tokens=False)
    )
    teacher_ids = pair.teacher_ids_for(student_ids)
    al = pair.align(teacher_ids, student_ids)
    check_partition(al, len(teacher_ids), len(student_ids))
    holding = [k for k, c in enumerate(al.chunks) if c[2] <= 1 < c[3] or c[2] <= 2 < c[3]]
    assert any(not al.aligned[k] for k in holding)
    assert al.aligned.any()


def test_invalid_utf8_sampled_by_student_is_unaligned(
    byte_level_tokenizer, sentencepiece_tokenizer
):
    pair = TokenizerPair(byte_level_tokenizer, sentencepiece_tokenizer)
    sp = sentencepiece_tokenizer
    # "ab", then a lone continuation byte (invalid UTF-8), then "cd".
    student_ids = (
        sp.encode("ab", add_special_tokens=False)
        + [sp.convert_tokens_to_ids("<0x80>")]
        + sp.encode(" cd", add_special_tokens=False)
    )
    teacher_ids = pair.teacher_ids_for(student_ids)  # text carries U+FFFD where 0x80 was
    al = pair.align(teacher_ids, student_ids)
    check_partition(al, len(teacher_ids), len(student_ids))
    assert not al.aligned.all() and al.unaligned_bytes >= 1
    assert al.aligned[0]


def test_batch_of_many_sizes_is_consistent(families):
    pair = TokenizerPair(families["unigram"], families["byte_level"])
    words = ["alpha", " 12", "😀", "\n", " beta", "345", "中文", "  "]
    rng = np.random.default_rng(0)
    batch = ["".join(rng.choice(words, size=rng.integers(0, 30))) for _ in range(200)]
    student_ids = [families["byte_level"].encode(t, add_special_tokens=False) for t in batch]
    teacher_ids = pair.teacher_ids_for_batch(student_ids)
    for al, t_ids, s_ids in zip(
        align_ids_batch(pair.teacher_table, pair.student_table, teacher_ids, student_ids),
        teacher_ids,
        student_ids,
    ):
        check_partition(al, len(t_ids), len(s_ids))
        check_against_reference(pair, t_ids, s_ids, al)


def test_identical_tokenizers_score_the_sampled_ids_as_they_are(byte_level_tokenizer):
    pair = TokenizerPair(byte_level_tokenizer, byte_level_tokenizer)
    vocab = byte_level_tokenizer.get_vocab()
    # A non-canonical sample: "ab" spelled as two single-byte tokens.
    sampled = [vocab["a"], vocab["b"], vocab["<|im_end|>"]]
    assert pair.teacher_ids_for(sampled) == sampled
    al = pair.align(sampled, sampled)
    assert al.one_to_one.all() and al.num_chunks == 3


LONG_WORDS = [
    "internationalization",
    " extraordinary",
    " 1234567890123",
    "😀😀😀",
    "東京東京",
    " counterrevolutionaries",
    "\n\n\n\n\n\n\n\n\n\n",
    "e\u0301e\u0301e\u0301e\u0301",
]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.one_of(
        texts, st.lists(st.sampled_from(LONG_WORDS), min_size=1, max_size=6).map("".join)
    ),
    pair_index=st.integers(0, 10**6),
    mutate=st.sampled_from(["teacher", "student", "both"]),
    position=st.integers(0, 10**6),
    choice=st.integers(0, 10**6),
    ended=st.booleans(),
    in_long_chunk=st.booleans(),
)
def test_batched_byte_check_catches_equal_length_differences(
    pairs, text, pair_index, mutate, position, choice, ended, in_long_chunk
):
    """A token swapped for another of the same byte length keeps every offset in place, so
    only the byte comparison (packed words for chunks of up to 8 bytes, bytes beyond) can tell
    the texts apart. The batched result must equal the byte matcher's, sequence by sequence,
    with an untouched copy in the same batch aligned in full."""
    pair = pairs[sorted(pairs)[pair_index % len(pairs)]]
    student_ids = pair.student_tokenizer(text, add_special_tokens=False, split_special_tokens=True)[
        "input_ids"
    ]
    if ended:
        student_ids = student_ids + [pair.student_tokenizer.eos_token_id]
    teacher_ids = pair.teacher_ids_for(student_ids)
    t_position = s_position = position
    if in_long_chunk:  # aim at a chunk of more than 8 bytes (compared byte by byte)
        t_pre = sides_prefixed(pair, student_ids)[0]
        t_offsets = np.cumsum(
            [0] + [len(p) for p in content_pieces(pair.teacher_table, teacher_ids, t_pre)]
        )
        al = pair.align(teacher_ids, student_ids)
        long = [c for c in al.chunks[~al.is_end] if t_offsets[c[1]] - t_offsets[c[0]] > 8]
        if long:
            ta, tb, sa, sb = long[position % len(long)]
            t_position, s_position = ta + position % (tb - ta), sa + position % (sb - sa)
    t_mutated, s_mutated = teacher_ids, student_ids
    if mutate in ("teacher", "both"):
        t_mutated = same_length_substitute(pair.teacher_table, teacher_ids, t_position, choice)
    if mutate in ("student", "both"):
        s_mutated = same_length_substitute(pair.student_table, student_ids, s_position, choice // 7)
    batch = pair.align_batch(
        [teacher_ids, t_mutated, teacher_ids], [student_ids, s_mutated, student_ids]
    )
    for t_ids, s_ids, al in zip(
        [teacher_ids, t_mutated, teacher_ids], [student_ids, s_mutated, student_ids], batch
    ):
        expected = byte_matcher_alignment(pair, t_ids, s_ids)
        assert np.array_equal(al.chunks, expected.chunks)
        assert np.array_equal(al.aligned, expected.aligned)
        assert np.array_equal(al.is_end, expected.is_end)
        assert al.unaligned_bytes == expected.unaligned_bytes
        check_partition(al, len(t_ids), len(s_ids))
    t_pre, s_pre = sides_prefixed(pair, s_mutated)
    t_bytes = b"".join(content_pieces(pair.teacher_table, t_mutated, t_pre))
    s_bytes = b"".join(content_pieces(pair.student_table, s_mutated, s_pre))
    if t_bytes != s_bytes:
        assert not batch[1].aligned.all()
    has_special = pair.student_table.special[student_ids[: len(student_ids) - ended]].any()
    if "\u2581" not in text and pair.student_text(student_ids) and not has_special:
        assert batch[0].aligned.all() and batch[2].aligned.all()


def test_blocks_of_a_large_batch_give_the_same_alignments(families, monkeypatch):
    from ctopd.core import alignment as core

    pair = TokenizerPair(families["sentencepiece_bpe"], families["byte_level"])
    words = ["alpha", " 12", "😀", "\n", " beta", "345", "中文", "  ", " extraordinary"]
    rng = np.random.default_rng(1)
    batch = ["".join(rng.choice(words, size=rng.integers(0, 20))) for _ in range(120)]
    student_ids = [families["byte_level"].encode(t, add_special_tokens=False) for t in batch]
    teacher_ids = pair.teacher_ids_for_batch(student_ids)
    whole = pair.align_batch(teacher_ids, student_ids)
    monkeypatch.setattr(core, "BLOCK_TOKENS", 7)
    blocked = pair.align_batch(teacher_ids, student_ids)
    assert len(blocked) == len(whole) == len(batch)
    for a, b in zip(whole, blocked):
        assert np.array_equal(a.chunks, b.chunks) and np.array_equal(a.aligned, b.aligned)
        assert np.array_equal(a.is_end, b.is_end)
        assert (a.teacher_length, a.student_length) == (b.teacher_length, b.student_length)


def test_id_sequences_as_arrays_tensors_and_lists_agree(
    byte_level_tokenizer, sentencepiece_tokenizer
):
    import torch

    pair = TokenizerPair(byte_level_tokenizer, sentencepiece_tokenizer)
    texts_ = ["The total is 1234 apples.", "", "😀 中文"]
    student_ids = [sentencepiece_tokenizer.encode(t, add_special_tokens=False) for t in texts_]
    teacher_ids = pair.teacher_ids_for_batch(student_ids)
    expected = pair.align_batch(teacher_ids, student_ids)
    for convert in (lambda x: np.asarray(x, dtype=np.int32), lambda x: torch.tensor(x)):
        got = pair.align_batch([convert(x) for x in teacher_ids], [convert(x) for x in student_ids])
        for a, b in zip(expected, got):
            assert np.array_equal(a.chunks, b.chunks) and np.array_equal(a.aligned, b.aligned)
    with pytest.raises(ValueError, match="must be 1-D"):
        pair.align_batch([np.asarray([teacher_ids[0]])], [np.asarray([student_ids[0]])])
