"""SimCT, shared-only OPD and same-tokenizer OPD against the per-chunk reference, by hand, and in
the identical-tokenizer limit."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctopd.core.alignment import Alignment
from ctopd.objectives import (
    TEACHER_NEEDS,
    TeacherOutputs,
    compute_objective,
    teacher_needs,
    teacher_outputs,
)

from .reference import make_shared_vocab, random_batch, ref_chunk_objective

PAPER_NEEDS = teacher_needs("simct", space="paper")


def paper_space(name):
    """These tests build synthetic shared vocabularies without byte tables: the paper space."""
    return {"space": "paper"} if name in ("simct", "shared_only") else {}


def run(name, batch, teacher, **options):
    batch.student_logits.grad = None
    loss, metrics = compute_objective(
        name,
        **paper_space(name),
        student_logits=batch.student_logits,
        student_ids=batch.student_ids,
        alignments=batch.alignments,
        shared_vocab=batch.shared_vocab,
        teacher=teacher,
        **options,
    )
    loss.backward()
    grad, batch.student_logits.grad = batch.student_logits.grad, None
    return loss, metrics, grad


def run_reference(name, batch, teacher, **options):
    batch.student_logits.grad = None
    loss = ref_chunk_objective(
        name,
        batch.student_logits,
        batch.student_ids,
        batch.alignments,
        batch.shared_vocab,
        teacher,
        **options,
    )
    loss.backward()
    grad, batch.student_logits.grad = batch.student_logits.grad, None
    return loss, grad


def class_teacher(batch):
    return teacher_outputs(batch.teacher_logits, batch.teacher_ids, batch.shared_vocab, PAPER_NEEDS)


CASES = [
    {},
    {"temperature": 0.6, "slice_size": 2},
    {"divergence": "forward_kl", "temperature": 0.7},
    {"divergence": "jsd", "beta": 0.3, "weight_by_tokens": True},
    {"divergence": "tv", "temperature": 1.5, "slice_size": 1},
    {"weight_by_tokens": True, "slice_size": 3},
]


@pytest.mark.parametrize("name", ["simct", "shared_only"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("seed", range(6))
def test_matches_per_chunk_reference(name, case, seed):
    batch = random_batch(100 + seed, batch=3)
    teacher = class_teacher(batch)
    options = CASES[case]
    loss, _, grad = run(name, batch, teacher, **options)
    reference = {k: v for k, v in options.items() if k != "slice_size"}
    ref_loss, ref_grad = run_reference(name, batch, teacher, **reference)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch_size=st.integers(1, 4),
    name=st.sampled_from(["simct", "shared_only"]),
    divergence=st.sampled_from(["reverse_kl", "forward_kl", "jsd", "tv"]),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    weight_by_tokens=st.booleans(),
    slice_size=st.integers(1, 8),
)
def test_matches_reference_on_generated_batches(
    seed, batch_size, name, divergence, temperature, weight_by_tokens, slice_size
):
    batch = random_batch(seed, batch=batch_size)
    teacher = class_teacher(batch)
    options = {
        "divergence": divergence,
        "temperature": temperature,
        "weight_by_tokens": weight_by_tokens,
    }
    loss, _, grad = run(name, batch, teacher, slice_size=slice_size, **options)
    ref_loss, ref_grad = run_reference(name, batch, teacher, **options)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_backward_twice_with_retain_graph():
    batch = random_batch(12, batch=3)
    teacher = class_teacher(batch)
    loss, _ = compute_objective(
        "simct",
        space="paper",
        student_logits=batch.student_logits,
        student_ids=batch.student_ids,
        alignments=batch.alignments,
        shared_vocab=batch.shared_vocab,
        teacher=teacher,
    )
    (2.0 * loss).backward(retain_graph=True)
    first = batch.student_logits.grad.clone()
    loss.backward()  # the gradient buffer was handed over; it is recomputed
    torch.testing.assert_close(batch.student_logits.grad, 1.5 * first)


def test_hand_worked_multi_token_chunk():
    # Student vocabulary {0, 1, 2}; classes: c0 = {student 0 | teacher 0}, end = {1 | 1};
    # student id 2 is not shared. One aligned chunk: 1 teacher token, 2 student tokens [2, 0].
    vocab = make_shared_vocab([[0], [1]], [[0], [1]], student_vocab=3, teacher_vocab=3)
    alignment = Alignment(
        chunks=np.array([[0, 1, 0, 2]]),
        aligned=np.array([True]),
        is_end=np.array([False]),
        teacher_length=1,
        student_length=2,
    )
    # Student row 0 probs (0.25, 0.25, 0.5), row 1 probs (0.125, 0.125, 0.75).
    logits = torch.log(
        torch.tensor([[[0.25, 0.25, 0.5], [0.125, 0.125, 0.75]]], dtype=torch.float64)
    ).requires_grad_()
    ids = torch.tensor([[2, 0]])
    # Teacher at its first position: q(c0) = 0.5, q(end) = 0.25; its realised token q = 0.125.
    teacher = TeacherOutputs(
        token_logprobs=torch.log(torch.tensor([[0.125]], dtype=torch.float64)),
        class_logprobs=torch.log(torch.tensor([[[0.5, 0.25]]], dtype=torch.float64)),
    )
    # On paper, Ω = {c0, end, unit}:
    #   student scores: ℓ(c0) = ln 0.25, ℓ(end) = ln 0.25,
    #                   ℓ(unit) = (ln 0.5 + ln 0.125) / 2 = ln 0.25   -> P_S = (1/3, 1/3, 1/3)
    #   teacher scores: ln 0.5, ln 0.25, ln 0.125 (sum 0.875)         -> P_T = (4/7, 2/7, 1/7)
    #   KL(P_S || P_T) = 1/3 [ln(7/12) + ln(7/6) + ln(7/3)] = 1/3 ln(343/216) = 0.1541507...
    #   divided by the 2 student tokens: 0.0770753...
    expected = math.log(343 / 216) / 3 / 2
    assert expected == pytest.approx(0.0770753, abs=1e-7)
    loss, metrics = compute_objective(
        "simct",
        space="paper",
        student_logits=logits,
        student_ids=ids,
        alignments=[alignment],
        shared_vocab=vocab,
        teacher=teacher,
    )
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["kl"] == pytest.approx(2 * expected, abs=1e-12)
    assert metrics["coverage"] == 1.0 and metrics["chunks_multi"] == 1.0
    # The gradient reaches both tokens of the unit (position 1 only through the unit).
    loss.backward()
    assert (logits.grad[0, 1].abs() > 1e-3).all()
    # shared_only drops the chunk altogether.
    shared, shared_metrics = compute_objective(
        "shared_only",
        space="paper",
        student_logits=logits,
        student_ids=ids,
        alignments=[alignment],
        shared_vocab=vocab,
        teacher=teacher,
    )
    assert shared.item() == 0.0 and shared_metrics["coverage"] == 0.0


def identical_batch(seed, vocab_size=11, lengths=(5, 3, 7), ended=(True, False, True)):
    """Identical tokenizers: ids 0..V-2 ordinary, V-1 the end id; classes in a shuffled order;
    the teacher scored the student's own ids, so every chunk is 1:1."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(vocab_size - 1).tolist()
    members = [[i] for i in order] + [[vocab_size - 1]]
    vocab = make_shared_vocab(members, members, vocab_size, vocab_size)
    m = max(lengths) + 1
    ids = torch.as_tensor(rng.integers(0, vocab_size - 1, (len(lengths), m)))
    alignments = []
    for b, (length, end) in enumerate(zip(lengths, ended, strict=True)):
        if end:
            ids[b, length - 1] = vocab_size - 1
        chunks = np.stack([np.arange(length), np.arange(1, length + 1)] * 2, 1)
        alignments.append(
            Alignment(
                chunks=chunks.astype(np.int64),
                aligned=np.ones(length, bool),
                is_end=(np.arange(length) == length - 1) & end,
                teacher_length=length,
                student_length=length,
            )
        )
    gen = torch.Generator().manual_seed(seed)
    student = (
        2 * torch.randn(len(lengths), m, vocab_size, generator=gen, dtype=torch.float64)
    ).requires_grad_()
    teacher_logits = 2 * torch.randn(
        len(lengths), m, vocab_size, generator=gen, dtype=torch.float64
    )
    teacher = teacher_outputs(teacher_logits, ids, vocab, PAPER_NEEDS | TEACHER_NEEDS["opd"])
    return student, ids, alignments, vocab, teacher


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_identical_tokenizers_equal_full_distribution_opd(temperature):
    student, ids, alignments, vocab, teacher = identical_batch(7)
    # Token-level full-vocabulary reverse-KL OPD, written directly.
    total = student.sum() * 0.0
    for b, a in enumerate(alignments):
        p_s = torch.log_softmax(student[b, : a.student_length] / temperature, -1)
        p_t = torch.log_softmax(teacher.full_logprobs[b, : a.student_length] / temperature, -1)
        total = total + (p_s.exp() * (p_s - p_t)).sum()
    expected = total / sum(a.student_length for a in alignments)
    (expected_grad,) = torch.autograd.grad(expected, student)
    for name in ("simct", "shared_only", "opd"):
        loss, metrics = compute_objective(
            name,
            **paper_space(name),
            student_logits=student,
            student_ids=ids,
            alignments=alignments,
            shared_vocab=vocab,
            teacher=teacher,
            temperature=temperature,
        )
        (grad,) = torch.autograd.grad(loss, student)
        assert abs(loss.item() - expected.item()) < 1e-6, name
        assert (grad - expected_grad).abs().max().item() < 1e-6, name
        assert metrics["coverage"] == 1.0 and metrics["chunks_multi"] == 0.0


@pytest.mark.parametrize("name", ["simct", "shared_only", "opd"])
def test_gradcheck(name):
    if name == "opd":
        student, ids, alignments, vocab, teacher = identical_batch(
            3, vocab_size=5, lengths=(3, 2), ended=(True, False)
        )
    else:
        batch = random_batch(11, batch=2, student_vocab=6, teacher_vocab=7, classes=4)
        student, ids, alignments, vocab = (
            batch.student_logits,
            batch.student_ids,
            batch.alignments,
            batch.shared_vocab,
        )
        teacher = class_teacher(batch)

    def loss_of(logits, divergence):
        return compute_objective(
            name,
            **paper_space(name),
            student_logits=logits,
            student_ids=ids,
            alignments=alignments,
            shared_vocab=vocab,
            teacher=teacher,
            divergence=divergence,
            temperature=0.8,
            slice_size=2,
        )[0]

    leaf = student.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss_of(x, "reverse_kl"), (leaf,))
    for divergence in ("forward_kl", "jsd", "tv"):
        assert torch.autograd.gradcheck(
            lambda x, d=divergence: loss_of(x, d), (leaf,), fast_mode=True
        )


def test_metrics_count_what_each_objective_supervises():
    batch = random_batch(42, batch=4)
    teacher = class_teacher(batch)
    _, simct_metrics, simct_grad = run("simct", batch, teacher)
    _, shared_metrics, shared_grad = run("shared_only", batch, teacher)
    student_tokens = sum(a.student_length for a in batch.alignments)
    aligned_tokens = sum(a.aligned_student_tokens for a in batch.alignments)
    assert simct_metrics["student_tokens"] == student_tokens
    assert simct_metrics["supervised_tokens"] == aligned_tokens
    assert simct_metrics["coverage"] == pytest.approx(aligned_tokens / student_tokens)
    assert shared_metrics["supervised_tokens"] < simct_metrics["supervised_tokens"]
    unaligned = sum(int(a.student_sizes[~a.aligned].sum()) for a in batch.alignments)
    assert simct_metrics["unaligned_share"] == pytest.approx(unaligned / student_tokens)
    assert simct_metrics["chunks_one_to_one"] == sum(
        int(a.one_to_one.sum()) for a in batch.alignments
    )
    teacher_tokens = [
        teacher.token_logprobs[b, : a.teacher_length] for b, a in enumerate(batch.alignments)
    ]
    assert simct_metrics["teacher_logprob_mean"] == pytest.approx(
        torch.cat(teacher_tokens).mean().item()
    )
    # Gradient rows: exactly the supervised student positions (first positions of kept chunks
    # and every token of a unit).
    rows_with_grad = int((simct_grad.abs().sum(-1) > 0).sum())
    assert rows_with_grad == aligned_tokens
    assert int((shared_grad.abs().sum(-1) > 0).sum()) == shared_metrics["supervised_tokens"]


def test_no_aligned_chunk_still_returns_a_connected_zero_loss():
    batch = random_batch(0, batch=2)
    for a in batch.alignments:
        a.aligned[:] = False
    teacher = class_teacher(batch)
    for name in ("simct", "shared_only"):
        loss, metrics, grad = run(name, batch, teacher)
        assert loss.item() == 0.0 and loss.requires_grad
        assert grad is not None and (grad == 0).all()
        assert metrics["coverage"] == 0.0 and metrics["kl"] == 0.0


def test_non_finite_inputs_are_named_and_padding_is_ignored():
    batch = random_batch(9, batch=2)
    teacher = class_teacher(batch)
    a = batch.alignments[0]
    with torch.no_grad():
        batch.student_logits[0, a.student_length :] = float("nan")  # padding: ignored
    run("simct", batch, teacher)
    with torch.no_grad():
        batch.student_logits[0, 0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"student_logits holds NaN or inf at sequence 0"):
        run("simct", batch, teacher)
    batch = random_batch(9, batch=2)
    teacher.class_logprobs[1, 0, 0] = float("nan")
    if batch.alignments[1].teacher_length:
        with pytest.raises(ValueError, match=r"teacher\.class_logprobs holds NaN"):
            run("shared_only", batch, teacher)


def test_low_precision_logits_and_no_grad_mode():
    batch = random_batch(21, batch=3, dtype=torch.float32)
    teacher = class_teacher(batch)
    loss32, _, grad32 = run("simct", batch, teacher)
    half = batch.student_logits.detach().to(torch.bfloat16).requires_grad_()
    loss16, _ = compute_objective(
        "simct",
        space="paper",
        student_logits=half,
        student_ids=batch.student_ids,
        alignments=batch.alignments,
        shared_vocab=batch.shared_vocab,
        teacher=teacher,
    )
    loss16.backward()
    assert loss16.dtype == torch.float32 and half.grad.dtype == torch.bfloat16
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    with torch.no_grad():
        plain, _ = compute_objective(
            "simct",
            space="paper",
            student_logits=batch.student_logits,
            student_ids=batch.student_ids,
            alignments=batch.alignments,
            shared_vocab=batch.shared_vocab,
            teacher=teacher,
        )
    assert not plain.requires_grad and plain.item() == pytest.approx(loss32.item(), rel=1e-6)


def test_opd_rejects_different_vocabularies_and_missing_fields():
    batch = random_batch(4, batch=2)
    teacher = teacher_outputs(
        batch.teacher_logits,
        batch.teacher_ids,
        batch.shared_vocab,
        frozenset({"full_logprobs", "class_logprobs"}),
    )
    with pytest.raises(ValueError, match="opd needs identical tokenizers"):
        run("opd", batch, teacher)
    with pytest.raises(ValueError, match=r"needs teacher\.class_logprobs"):
        run("simct", batch, TeacherOutputs(token_logprobs=teacher.token_logprobs))


@pytest.mark.parametrize("name", ["simct", "shared_only"])
@pytest.mark.parametrize("seed", range(4))
def test_mismatched_first_position_labels_leave_the_first_chunk_out(name, seed):
    """When exactly one tokenizer adds a dummy-prefix space, a response's first chunk gets no
    loss: the result equals the plain objective on alignments whose first chunk is unaligned."""
    import dataclasses

    batch = random_batch(300 + seed, batch=3)
    teacher = class_teacher(batch)
    plain_loss, _, plain_grad = run(name, batch, teacher)
    batch.shared_vocab = dataclasses.replace(batch.shared_vocab, first_position_mislabelled=True)
    loss, metrics, grad = run(name, batch, teacher)
    first_out = []
    for al in batch.alignments:
        aligned = al.aligned.copy()
        if al.num_chunks and not al.is_end[0]:
            aligned[0] = False
        first_out.append(dataclasses.replace(al, aligned=aligned))
    batch.shared_vocab = dataclasses.replace(batch.shared_vocab, first_position_mislabelled=False)
    batch.alignments = first_out
    expected_loss, _, expected_grad = run(name, batch, teacher)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)
    left_out = [b for b, al in enumerate(first_out) if al.num_chunks and not al.is_end[0]]
    assert grad[left_out, 0].abs().sum() == 0
    if plain_grad[left_out, 0].abs().sum() > 0:
        assert not torch.equal(grad, plain_grad)
