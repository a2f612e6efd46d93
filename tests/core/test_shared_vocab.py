"""The shared vocabulary: classes by byte string, member ids, the end class."""

from __future__ import annotations

import numpy as np

from ctopd import TokenizerPair


def test_every_class_member_spells_the_class_bytes(byte_level_tokenizer, sentencepiece_tokenizer):
    pair = TokenizerPair(byte_level_tokenizer, sentencepiece_tokenizer)
    shared = pair.shared_vocab
    for member_ids, table in (
        (shared.teacher_member_ids, pair.teacher_table),
        (shared.student_member_ids, pair.student_table),
    ):
        assert member_ids.shape[1] == shared.size
        assert (member_ids[0] >= 0).all()  # every class has at least one id on each side
        for rank in range(member_ids.shape[0]):
            for c in np.flatnonzero(member_ids[rank, :-1] >= 0):
                assert table.token_bytes(member_ids[rank, c]) == shared.class_bytes[c]
    assert shared.class_bytes[shared.end_class] == b""
    assert shared.classes()[-1] == "<end>"
    assert sorted(
        shared.student_member_ids[:, -1][shared.student_member_ids[:, -1] >= 0]
    ) == sorted(pair.student_table.end_ids.tolist())


def test_duplicate_spellings_share_one_class(byte_level_tokenizer, sentencepiece_tokenizer):
    pair = TokenizerPair(byte_level_tokenizer, sentencepiece_tokenizer)
    shared = pair.shared_vocab
    vocab = sentencepiece_tokenizer.get_vocab()
    a, byte_a = vocab["a"], vocab["<0x61>"]
    assert shared.student_id_to_class[a] == shared.student_id_to_class[byte_a] >= 0
    c = shared.student_id_to_class[a]
    assert {a, byte_a} <= set(shared.student_member_ids[:, c].tolist())
    assert shared.student_member_ids.shape[0] >= 2


def test_id_to_class_is_the_inverse_of_members(byte_level_tokenizer, unigram_tokenizer):
    pair = TokenizerPair(byte_level_tokenizer, unigram_tokenizer)
    shared = pair.shared_vocab
    for member_ids, id_to_class in (
        (shared.teacher_member_ids, shared.teacher_id_to_class),
        (shared.student_member_ids, shared.student_id_to_class),
    ):
        ranks, classes = np.nonzero(member_ids >= 0)
        assert np.array_equal(id_to_class[member_ids[ranks, classes]], classes)
        assert (id_to_class >= 0).sum() == ranks.size


def test_identical_tokenizers_share_every_ordinary_token(byte_level_tokenizer):
    pair = TokenizerPair(byte_level_tokenizer, byte_level_tokenizer)
    assert pair.identical
    table = pair.student_table
    ordinary = int((~table.special).sum())
    # Every ordinary id is its own class; the end class holds <|im_end|>.
    assert pair.shared_vocab.size == ordinary + 1
    assert pair.shared_vocab.student_member_ids.shape[0] == 1


def test_whitespace_and_non_ascii_tokens_are_shared(real_tokenizers_dir):
    pair = TokenizerPair.from_pretrained(
        real_tokenizers_dir / "gpt-2", real_tokenizers_dir / "phi-3"
    )
    shared = set(pair.shared_vocab.class_bytes)
    # A string-replacement mapping (Ġ -> ▁) misses all of these.
    for piece in (b"\n", b"\t", b" the", b"\xc3\xa9", b" "):
        assert piece in shared, piece


def test_first_position_labels_mismatch_only_across_dummy_prefix_kinds(families):
    from ctopd import TokenizerPair

    def mislabelled(teacher, student):
        return TokenizerPair(
            families[teacher], families[student]
        ).shared_vocab.first_position_mislabelled

    assert mislabelled("byte_level", "sentencepiece_bpe")
    assert mislabelled("unigram", "byte_level")
    assert not mislabelled("byte_level", "byte_level_whole_numbers")
    assert not mislabelled("sentencepiece_bpe", "unigram")
