"""Real vocabularies (../shared/tokenizers) over real text (GSM8K answers): every student token
is covered by aligned chunks, for every ordered pair of tokenizer families."""

from __future__ import annotations

import itertools
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctopd import TokenizerPair, build_byte_table, load_tokenizer
from ctopd.commands.align import align_records
from tests.conftest import REAL_TOKENIZERS

from .oracles import (
    byte_matcher_alignment,
    check_against_reference,
    check_partition,
    content_pieces,
    declared_rule,
    same_length_substitute,
    sides_prefixed,
)
from .strategies import texts, texts_with_whitespace_ends


@pytest.fixture(scope="module")
def real_tokenizers(real_tokenizers_dir):
    return {name: load_tokenizer(str(real_tokenizers_dir / name)) for name in REAL_TOKENIZERS}


@pytest.fixture(scope="module")
def real_pairs(real_tokenizers):
    """Every ordered pair of real tokenizers, identical ones included."""
    return {
        (t, s): TokenizerPair(real_tokenizers[t], real_tokenizers[s])
        for t in REAL_TOKENIZERS
        for s in REAL_TOKENIZERS
    }


@pytest.fixture(scope="module")
def gsm8k_ids(real_tokenizers, gsm8k_answers):
    """Each tokenizer's ids of every GSM8K answer (encoded once, shared by all pairs)."""
    return {
        name: tok(gsm8k_answers, add_special_tokens=False)["input_ids"]
        for name, tok in real_tokenizers.items()
    }


@pytest.mark.parametrize("teacher,student", list(itertools.permutations(REAL_TOKENIZERS, 2)))
def test_every_student_token_is_covered_on_gsm8k(
    real_tokenizers, gsm8k_answers, gsm8k_ids, teacher, student
):
    pair = TokenizerPair(real_tokenizers[teacher], real_tokenizers[student])
    end = int(pair.student_table.end_ids[0])
    student_ids = [ids + [end] for ids in gsm8k_ids[student]]
    teacher_ids = pair.teacher_ids_for_batch(student_ids)
    alignments = pair.align_batch(teacher_ids, student_ids)
    covered = sum(al.aligned_student_tokens for al in alignments)
    total = sum(len(ids) for ids in student_ids)
    print(f"{teacher} -> {student}: {covered}/{total} student tokens covered")
    assert covered == total
    multi = sum(int((~al.one_to_one & al.aligned).sum()) for al in alignments)
    assert multi > 0 or pair.identical
    # The student's bytes are the text it would decode to.
    for ids, text in zip(student_ids[:50], gsm8k_answers[:50]):
        assert pair.student_text(ids) == text


def test_prefix_rules_of_real_tokenizers(real_tokenizers):
    """Llama-2's Metaspace "first" and Phi-3's Prepend normaliser, as their own rules say."""
    expected = {
        "qwen2": ("never", False),
        "gpt-2": ("never", False),
        "llama-spm": ("unless_space", True),
        "phi-3": ("always", True),
    }
    for name, tokenizer in real_tokenizers.items():
        table = build_byte_table(tokenizer)
        assert (table.prefix_rule, table.decoder_strips_space) == expected[name], name
        assert table.prefix_rule == declared_rule(tokenizer), name


def test_end_of_turn_ids_of_real_templates(real_tokenizers):
    def ids(name, *tokens):
        return sorted(real_tokenizers[name].convert_tokens_to_ids(list(tokens)))

    qwen = TokenizerPair(real_tokenizers["qwen2"], real_tokenizers["phi-3"])
    assert qwen.teacher_table.end_ids.tolist() == ids("qwen2", "<|endoftext|>", "<|im_end|>")
    assert qwen.student_table.end_ids.tolist() == ids("phi-3", "<|endoftext|>", "<|end|>")
    assert qwen.teacher_end_of_turn_id == ids("qwen2", "<|im_end|>")[0]


def test_special_token_text_in_a_response_stays_text(real_tokenizers):
    pair = TokenizerPair(real_tokenizers["qwen2"], real_tokenizers["llama-spm"])
    student_ids = real_tokenizers["llama-spm"].encode(
        "say <|im_end|> now", add_special_tokens=False
    )
    teacher_ids = pair.teacher_ids_for(student_ids)
    assert real_tokenizers["qwen2"].convert_tokens_to_ids("<|im_end|>") not in teacher_ids
    al = pair.align(teacher_ids, student_ids)
    assert al.aligned.all()


def test_per_token_decode_loses_llama_spaces(real_tokenizers):
    """Why alignment works on bytes: decoding Llama pieces one by one strips their spaces."""
    tok = real_tokenizers["llama-spm"]
    ids = tok.encode("sold 48 clips", add_special_tokens=False)
    assert "".join(tok.decode([i]) for i in ids) != "sold 48 clips"
    table = TokenizerPair(real_tokenizers["gpt-2"], tok).student_table
    assert np.all(table.lengths[ids] > 0)


@pytest.mark.parametrize(
    "teacher,student",
    [("qwen2", "llama-spm"), ("llama-spm", "gpt-2"), ("gpt-2", "qwen2"), ("phi-3", "qwen2")],
)
def test_batched_byte_check_on_real_pairs(real_tokenizers, gsm8k_ids, teacher, student):
    """Real vocabularies have long tokens, so many chunks exceed 8 bytes (compared byte by byte)
    and many are multi-token (compared as packed words). In each of 150 answers one token, on
    the teacher's or the student's side, is swapped for another of the same byte length; every
    sequence of the batch, the untouched ones interleaved, must come out as the byte matcher
    aligns it."""
    pair = TokenizerPair(real_tokenizers[teacher], real_tokenizers[student])
    end = int(pair.student_table.end_ids[0])
    rng = np.random.default_rng(0)
    student_ids = [ids + [end] for ids in gsm8k_ids[student][:150]]
    teacher_ids = pair.teacher_ids_for_batch(student_ids)
    batch_t, batch_s, long_hits = [], [], 0
    for k, (t_ids, s_ids, al) in enumerate(
        zip(teacher_ids, student_ids, pair.align_batch(teacher_ids, student_ids))
    ):
        t_pre = sides_prefixed(pair, s_ids)[0]
        offsets = np.cumsum(
            [0] + [len(p) for p in content_pieces(pair.teacher_table, t_ids, t_pre)]
        )
        content = al.chunks[~al.is_end]
        sizes = offsets[content[:, 1]] - offsets[content[:, 0]]
        # Every other answer: aim at a chunk of more than 8 bytes when there is one.
        pool = content[sizes > 8] if k % 2 == 0 and (sizes > 8).any() else content
        ta, tb, sa, sb = pool[rng.integers(len(pool))]
        long_hits += bool(offsets[tb] - offsets[ta] > 8)
        if k % 3 == 0:
            s_ids = same_length_substitute(
                pair.student_table, s_ids, int(rng.integers(sa, sb)), int(rng.integers(10**6))
            )
        else:
            t_ids = same_length_substitute(
                pair.teacher_table, t_ids, int(rng.integers(ta, tb)), int(rng.integers(10**6))
            )
        batch_t += [teacher_ids[k], t_ids]
        batch_s += [student_ids[k], s_ids]
    assert long_hits >= 40
    differing = 0
    for t_ids, s_ids, al in zip(batch_t, batch_s, pair.align_batch(batch_t, batch_s)):
        expected = byte_matcher_alignment(pair, t_ids, s_ids)
        assert np.array_equal(al.chunks, expected.chunks)
        assert np.array_equal(al.aligned, expected.aligned)
        assert al.unaligned_bytes == expected.unaligned_bytes
        differing += not al.aligned.all()
    assert differing >= 140  # nearly every mutated answer (a few tokens have no same-length twin)


def rewritten(table, text: str) -> bool:
    """Whether the tokenizer's normaliser changes ``text`` (Qwen2's NFC)."""
    return "NFC" in table.rewrites_text and unicodedata.normalize("NFC", text) != text


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.one_of(texts_with_whitespace_ends, texts),
    pair_index=st.integers(0, len(REAL_TOKENIZERS) ** 2 - 1),
)
def test_real_text_input_gives_own_ids_and_exact_chunks(real_pairs, text, pair_index):
    """``ctopd align`` on real vocabularies (Llama-2's Metaspace "first", Phi-3's Prepend
    normaliser, byte-level GPT-2 and Qwen2): each side's own ids, chunks exact over the text."""
    key = sorted(real_pairs)[pair_index]
    pair = real_pairs[key]
    [record] = align_records(pair, [text])
    teacher_ids, student_ids = record["teacher_ids"], record["student_ids"]
    assert teacher_ids == pair.teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert student_ids == pair.student_tokenizer(text, add_special_tokens=False)["input_ids"]
    al = pair.align(teacher_ids, student_ids, text=text)
    assert al.chunks.tolist() == record["chunks"]
    check_partition(al, len(teacher_ids), len(student_ids))
    student_bytes = check_against_reference(pair, teacher_ids, student_ids, al, text=text)
    special = (
        pair.teacher_table.special[teacher_ids].any()
        or pair.student_table.special[student_ids].any()
    )
    if (
        text
        and "\u2581" not in text
        and not special
        and not rewritten(pair.teacher_table, text)
        and not rewritten(pair.student_table, text)
    ):
        assert student_bytes == text.encode(), key
        assert al.aligned.all(), (key, text)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.one_of(texts_with_whitespace_ends, texts),
    pair_index=st.integers(0, len(REAL_TOKENIZERS) ** 2 - 1),
    extra=st.integers(0, 3),
)
def test_real_sampled_response_text_is_what_the_student_decodes(
    real_pairs, text, pair_index, extra
):
    """Sampled ids, opened by up to three extra space pieces: the response text is the student
    tokenizer's decoding, the teacher's ids its own ids of that text."""
    pair = real_pairs[sorted(real_pairs)[pair_index]]
    tok = pair.student_tokenizer
    space = [i for i in tok.encode(" ", add_special_tokens=False)][-1:]
    sampled = space * extra + tok(text, add_special_tokens=False)["input_ids"]
    decoded = tok.decode(sampled, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert pair.student_text(sampled) == decoded
    teacher_ids = pair.teacher_ids_for(sampled)
    if not pair.identical:
        assert (
            teacher_ids
            == pair.teacher_tokenizer(decoded, add_special_tokens=False, split_special_tokens=True)[
                "input_ids"
            ]
        )
    al = pair.align(teacher_ids, sampled)
    check_partition(al, len(teacher_ids), len(sampled))
    check_against_reference(pair, teacher_ids, sampled, al)
    if (
        decoded
        and "\u2581" not in text
        and not pair.student_table.special[sampled].any()
        and not rewritten(pair.teacher_table, decoded)
    ):
        assert al.aligned.all(), text
