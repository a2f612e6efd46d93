"""The teacher contract by need: ``reduce_teacher`` reading the teacher's scores a slice of
positions at a time (dense rows, or a served top-k reply kept sparse) gives the same
``TeacherOutputs`` as the dense reference ``teacher_outputs`` on full logits, for every need
set, with padded output rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctopd.core.pair import TokenizerPair
from ctopd.objectives import TeacherRequest, reduce_teacher, teacher_needs, teacher_outputs
from ctopd.objectives.text_events import text_tables
from ctopd.testing import train_byte_level_bpe, train_sentencepiece_bpe
from ctopd.training.rollout import pad_responses
from ctopd.training.teachers.served import dense_logprobs, sparse_logprobs

from .test_text_events import CORPUS, TEXTS

PADDED_ROWS = 3  # output rows past the tokenizer's ids


@pytest.fixture(scope="module")
def pair():
    return TokenizerPair(
        train_byte_level_bpe(CORPUS, 330, split_digits=True), train_sentencepiece_bpe(CORPUS, 120)
    )


NEED_SETS = {
    "simct": teacher_needs("simct"),
    "simct_paper": teacher_needs("simct", space="paper"),
    "uld": teacher_needs("uld"),
    "dpca": teacher_needs("dpca"),
    "everything": teacher_needs("simct") | {"class_logprobs", "topk_probs", "full_logprobs"},
}


def batch(pair, dtype):
    """Responses, alignments and random teacher logits with padded output rows."""
    end = int(pair.student_table.end_ids[0])
    student = [pair.student_tokenizer.encode(t, add_special_tokens=False) + [end] for t in TEXTS]
    teacher = pair.teacher_ids_for_batch(student)
    teacher_ids, _ = pad_responses(teacher, pad_id=-1)
    vocab = pair.teacher_table.vocab_size
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(*teacher_ids.shape, vocab + PADDED_ROWS, generator=gen, dtype=dtype)
    logits[..., vocab:] += 5.0  # padded rows that would take mass if they were read
    return student, teacher_ids, pair.align_batch(teacher, student), logits


def request_for(pair, needs, student, alignments, cells="none"):
    tables = text_tables(pair.teacher_table, pair.student_table, pair.shared_vocab, cells=cells)
    return TeacherRequest(
        needs,
        pair.shared_vocab,
        slice_size=5,
        top_k=4,
        alignments=alignments,
        student_ids=student,
        text_tables=tables,
    )


def reference(logits, teacher_ids, request):
    return teacher_outputs(
        logits,
        teacher_ids,
        request.shared_vocab,
        request.needs,
        slice_size=7,
        top_k=request.top_k,
        alignments=request.alignments,
        student_ids=request.student_ids,
        text_tables=request.text_tables,
    )


def assert_same(got, want, teacher_ids, tolerance):
    valid = teacher_ids >= 0
    for field in ("token_logprobs", "class_logprobs", "topk_probs", "full_logprobs"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None) == (b is None), field
        if a is not None:
            torch.testing.assert_close(a[valid], b[valid].to(a.dtype), **tolerance)
    assert (got.text_events is None) == (want.text_events is None)
    if got.text_events is not None:
        assert np.array_equal(got.text_events.plan.index, want.text_events.plan.index)
        torch.testing.assert_close(
            got.text_events.scores,
            want.text_events.scores.to(got.text_events.scores.dtype),
            **tolerance,
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(NEED_SETS))
def test_sliced_rows_equal_the_dense_reference(pair, name, dtype):
    student, teacher_ids, alignments, logits = batch(pair, dtype)
    request = request_for(pair, NEED_SETS[name], student, alignments)
    vocab = request.vocab_size
    read = []

    def rows_of(b, p):
        read.append(torch.stack([b, p], 1))
        return logits[b, p, :vocab]  # a teacher never computes the padded rows

    got = reduce_teacher(rows_of, teacher_ids, request, dtype=dtype)
    # Every response position read exactly once, a slice at a time.
    positions = torch.cat(read)
    assert positions.shape[0] == int((teacher_ids >= 0).sum()) or name == "everything"
    assert max(r.shape[0] for r in read) <= request.slice_size
    tolerance = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert_same(got, reference(logits, teacher_ids, request), teacher_ids, tolerance)
    assert (got.token_logprobs[teacher_ids < 0] == 0).all()


def top_k_reply(logits, teacher_ids, k, padded_entries):
    """A vLLM-like sparse reply: per position the top ``k`` of a log-softmax over every output
    row (padded rows included, as vLLM normalises) plus the realised token."""
    logp = torch.log_softmax(logits.double(), -1)
    batch, width, _ = logp.shape
    rows, ids, values, caps = [], [], [], torch.zeros(batch * width, dtype=torch.float64)
    for b in range(batch):
        for j in range(width):
            token = int(teacher_ids[b, j])
            if token < 0:
                continue
            top = logp[b, j].topk(k)
            chosen = top.indices.tolist()
            if not padded_entries:
                chosen = [i for i in chosen if i < logits.shape[-1] - PADDED_ROWS]
            cap = float(top.values[-1])
            if token not in chosen:
                chosen.append(token)
            row = b * width + j
            rows += [row] * len(chosen)
            ids += chosen
            values += logp[b, j, chosen].tolist()
            caps[row] = cap
    return torch.tensor(rows), torch.tensor(ids), torch.tensor(values, dtype=torch.float64), caps


@pytest.mark.parametrize("cells", ["none", "all"])
@pytest.mark.parametrize("padded_entries", [False, True])
@pytest.mark.parametrize("name", sorted(NEED_SETS))
def test_sparse_reply_equals_the_dense_rebuild(pair, name, padded_entries, cells):
    """The served client's path: the top-k reply kept sparse gives what the reference gives on
    the dense rebuild (``dense_logprobs``), padded rows among the returned entries or not."""
    student, teacher_ids, alignments, logits = batch(pair, torch.float64)
    request = request_for(pair, NEED_SETS[name], student, alignments, cells=cells)
    vocab = request.vocab_size
    rows, ids, values, caps = top_k_reply(logits, teacher_ids, 6, padded_entries)
    total = teacher_ids.numel()
    width = teacher_ids.shape[1]
    sparse = sparse_logprobs(rows, ids, values, rows_total=total, vocab_size=vocab, caps=caps)
    got = reduce_teacher(
        lambda b, p: sparse.select(b * width + p), teacher_ids, request, dtype=torch.float64
    )
    dense = dense_logprobs(
        rows, ids, values, rows_total=total, vocab_size=vocab, caps=caps, dtype=torch.float64
    )
    want = reference(dense.view(*teacher_ids.shape, vocab), teacher_ids, request)
    assert_same(got, want, teacher_ids, dict(rtol=1e-9, atol=1e-9))


def test_sparse_top_k_puts_the_share_before_entries_below_it():
    """A realised token returned below the share of the unreturned ids ranks after them."""
    rows = torch.tensor([0, 0])
    ids = torch.tensor([0, 1])
    values = torch.tensor([math.log(0.9), math.log(1e-6)], dtype=torch.float64)
    sparse = sparse_logprobs(rows, ids, values, rows_total=1, vocab_size=4)
    dense = dense_logprobs(rows, ids, values, rows_total=1, vocab_size=4).double().exp()
    want = dense[0].sort(descending=True).values
    torch.testing.assert_close(sparse.topk_probs(4)[0], want, rtol=1e-6, atol=1e-9)
