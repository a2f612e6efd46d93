"""SFT and ULD against the per-chunk reference."""

import pytest
import torch

from ctopd.objectives import TEACHER_NEEDS, compute_objective, teacher_outputs

from .reference import random_batch, ref_sft, ref_uld


def run(name, batch, teacher, **options):
    batch.student_logits.grad = None
    loss, metrics = compute_objective(
        name,
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


def reference_grad(loss, batch):
    batch.student_logits.grad = None
    loss.backward()
    grad, batch.student_logits.grad = batch.student_logits.grad, None
    return grad


@pytest.mark.parametrize("seed", range(6))
def test_sft_matches_reference_without_a_teacher(seed):
    batch = random_batch(400 + seed, batch=3)
    loss, metrics, grad = run("sft", batch, None, slice_size=2)
    ref = ref_sft(batch.student_logits, batch.student_ids, batch.alignments)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, reference_grad(ref, batch), rtol=1e-9, atol=1e-12)
    assert metrics["coverage"] == (1.0 if metrics["student_tokens"] else 0.0)
    assert metrics["kl"] == 0.0 and metrics["teacher_logprob_mean"] == 0.0


def test_sft_kl_estimate_with_a_teacher():
    batch = random_batch(410, batch=3)
    teacher = teacher_outputs(
        batch.teacher_logits, batch.teacher_ids, batch.shared_vocab, TEACHER_NEEDS["dpca"]
    )
    _, metrics, _ = run("sft", batch, teacher)
    student_lp = torch.log_softmax(batch.student_logits.detach(), -1)
    num, den = 0.0, 0
    for b, a in enumerate(batch.alignments):
        for k, (ts, te, ss, se) in enumerate(a.chunks.tolist()):
            if a.aligned[k]:
                num += sum(student_lp[b, i, batch.student_ids[b, i]].item() for i in range(ss, se))
                num -= teacher.token_logprobs[b, ts:te].sum().item()
                den += se - ss
    assert metrics["kl"] == pytest.approx(num / den if den else 0.0, abs=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_uld_matches_reference(seed):
    batch = random_batch(500 + seed, batch=3)
    teacher = teacher_outputs(
        batch.teacher_logits, batch.teacher_ids, batch.shared_vocab, TEACHER_NEEDS["uld"], top_k=6
    )
    loss, metrics, grad = run("uld", batch, teacher, top_k=4, slice_size=2)
    ref = ref_uld(batch.student_logits, batch.alignments, teacher, 4)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, reference_grad(ref, batch), rtol=1e-9, atol=1e-12)
    usable = sum(
        int(((a.aligned) & (a.teacher_sizes > 0) & (a.student_sizes > 0)).sum())
        for a in batch.alignments
    )
    assert metrics["supervised_tokens"] == usable


def test_uld_top_k_cannot_exceed_the_teacher():
    batch = random_batch(3, batch=2)
    teacher = teacher_outputs(
        batch.teacher_logits, batch.teacher_ids, batch.shared_vocab, TEACHER_NEEDS["uld"], top_k=3
    )
    with pytest.raises(ValueError, match="holds only 3"):
        run("uld", batch, teacher, top_k=4)


@pytest.mark.parametrize("name", ["sft", "uld"])
def test_gradcheck(name):
    batch = random_batch(23, batch=2, student_vocab=6, teacher_vocab=7, classes=4)
    teacher = teacher_outputs(
        batch.teacher_logits, batch.teacher_ids, batch.shared_vocab, TEACHER_NEEDS["uld"], top_k=3
    )
    leaf = batch.student_logits.detach().clone().requires_grad_()

    def loss_of(x):
        return compute_objective(
            name,
            student_logits=x,
            student_ids=batch.student_ids,
            alignments=batch.alignments,
            shared_vocab=batch.shared_vocab,
            teacher=teacher,
            slice_size=2,
        )[0]

    assert torch.autograd.gradcheck(loss_of, (leaf,))
