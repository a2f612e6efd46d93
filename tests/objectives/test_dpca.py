"""DPCA against the per-chunk reference, by hand, and in the identical-tokenizer limit."""

import math

import numpy as np
import pytest
import torch

from ctopd.core.alignment import Alignment
from ctopd.objectives import TEACHER_NEEDS, TeacherOutputs, compute_objective, dpca_advantages
from ctopd.objectives import teacher_outputs as make_teacher
from ctopd.objectives.dpca import chunk_advantages

from .reference import make_shared_vocab, random_batch, ref_dpca
from .test_simct import identical_batch


def realised_logprobs(logits, ids):
    safe = ids.clamp(0, logits.shape[-1] - 1)
    return torch.log_softmax(logits, -1).gather(-1, safe[..., None])[..., 0]


def old_logprobs(batch, seed):
    gen = torch.Generator().manual_seed(seed)
    noisy = batch.student_logits.detach() + 0.3 * torch.randn(
        batch.student_logits.shape, generator=gen, dtype=batch.student_logits.dtype
    )
    return realised_logprobs(noisy, batch.student_ids)


def run(batch, teacher, old=None, **options):
    batch.student_logits.grad = None
    loss, metrics = compute_objective(
        "dpca",
        student_logits=batch.student_logits,
        student_ids=batch.student_ids,
        alignments=batch.alignments,
        shared_vocab=batch.shared_vocab,
        teacher=teacher,
        student_old_logprobs=old,
        **options,
    )
    loss.backward()
    grad, batch.student_logits.grad = batch.student_logits.grad, None
    return loss, metrics, grad


@pytest.mark.parametrize("with_old", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_matches_per_chunk_reference(seed, with_old):
    batch = random_batch(200 + seed, batch=3)
    teacher = make_teacher(
        batch.teacher_logits, batch.teacher_ids, batch.shared_vocab, TEACHER_NEEDS["dpca"]
    )
    old = old_logprobs(batch, seed) if with_old else None
    options = {"advantage_clip": 1.5, "clip_low": 0.1, "clip_high": 0.15, "slice_size": 2}
    loss, metrics, grad = run(batch, teacher, old, **options)
    batch.student_logits.grad = None
    ref_loss, ref_adv = ref_dpca(
        batch.student_logits,
        batch.student_ids,
        batch.alignments,
        teacher,
        old,
        advantage_clip=1.5,
        clip_low=0.1,
        clip_high=0.15,
    )
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, batch.student_logits.grad, rtol=1e-9, atol=1e-12)
    reference_old = (
        old if with_old else realised_logprobs(batch.student_logits.detach(), batch.student_ids)
    )
    advantages, mask = dpca_advantages(
        reference_old, teacher.token_logprobs, batch.alignments, advantage_clip=1.5
    )
    assert set(zip(*[x.tolist() for x in mask.nonzero(as_tuple=True)], strict=True)) == set(ref_adv)
    for (b, i), value in ref_adv.items():
        assert advantages[b, i].item() == pytest.approx(value, abs=1e-12)
    assert metrics["supervised_tokens"] == len(ref_adv)


def test_identical_tokenizers_give_per_token_opd_advantages():
    student, ids, alignments, _, teacher = identical_batch(5)
    current = realised_logprobs(student.detach(), ids)
    advantages, mask = dpca_advantages(current, teacher.token_logprobs, alignments)
    expected = teacher.token_logprobs[:, : ids.shape[1]] - current
    assert mask.sum().item() == sum(a.student_length for a in alignments)
    assert (advantages[mask] - expected[mask]).abs().max().item() < 1e-6
    # One-update form: the gradient is -A_i ∇ log π(s_i) / N.
    loss, metrics = compute_objective(
        "dpca",
        student_logits=student,
        student_ids=ids,
        alignments=alignments,
        shared_vocab=None,
        teacher=teacher,
    )
    (grad,) = torch.autograd.grad(loss, student)
    surrogate = -(expected.detach() * realised_logprobs(student, ids))[mask].sum() / mask.sum()
    (expected_grad,) = torch.autograd.grad(surrogate, student)
    assert (grad - expected_grad).abs().max().item() < 1e-6
    # kl: mean(log π(s) - log q(t)) over the tokens.
    assert metrics["kl"] == pytest.approx(-expected[mask].mean().item(), abs=1e-9)


def _one_position_gradients(seed, vocab_size=9, **options):
    """Identical tokenizers, one response position: DPCA's gradient on the student's logits for
    each token the student could sample there, the student's probabilities of those tokens, and
    full-distribution OPD's gradient at the same position (the end id gets no mass on either
    side)."""
    members = [[i] for i in range(vocab_size)]
    vocab = make_shared_vocab(members, members, vocab_size, vocab_size)
    gen = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(1, 2, vocab_size, generator=gen, dtype=torch.float64)
    teacher_logits = 2 * torch.randn(1, 2, vocab_size, generator=gen, dtype=torch.float64)
    student[..., -1] = teacher_logits[..., -1] = -60.0
    alignment = [
        Alignment(
            chunks=np.array([[0, 1, 0, 1]]),
            aligned=np.ones(1, bool),
            is_end=np.zeros(1, bool),
            teacher_length=1,
            student_length=1,
        )
    ]
    grads = {}
    for token in range(vocab_size - 1):
        ids = torch.tensor([[token, 0]])
        teacher = make_teacher(teacher_logits, ids, vocab, TEACHER_NEEDS["opd"])
        for name in ("dpca", "opd"):
            logits = student.clone().requires_grad_()
            loss, _ = compute_objective(
                name,
                student_logits=logits,
                student_ids=ids,
                alignments=alignment,
                shared_vocab=vocab,
                teacher=teacher,
                **(options if name == "dpca" else {}),
            )
            (grads[name, token],) = torch.autograd.grad(loss, logits)
    probs = torch.softmax(student[0, 0], -1)
    advantages = (
        torch.log_softmax(teacher_logits[0, 0], -1) - torch.log_softmax(student[0, 0], -1)
    )[:-1]
    sampled = sum(probs[t] * grads["dpca", t] for t in range(vocab_size - 1))
    return (
        sampled,
        grads["opd", 0],
        [grads["dpca", t] for t in range(vocab_size - 1)],
        probs[:-1],
        advantages,
    )


@pytest.mark.parametrize("seed", range(4))
def test_identical_tokenizers_dpca_gradient_is_opd_gradient_in_expectation(seed):
    """DPCA sees only the sampled token; averaged over what the student samples, its gradient
    is full-distribution OPD's at that position. They differ in variance, not in direction
    (the figure ``research/demo_gradient_noise.py`` measures on the demo)."""
    expected, opd_grad, per_token, probs, advantages = _one_position_gradients(seed)
    assert advantages.abs().max().item() < 10.0  # inside the clamp
    assert (expected - opd_grad).abs().max().item() < 1e-12
    # One sample is not the expectation: at these random logits its variance is larger than
    # the squared norm of the gradient it estimates (3.7x to 17x over the seeds).
    spread = sum(p * (g - expected).pow(2).sum() for p, g in zip(probs, per_token))
    assert spread.item() > opd_grad.pow(2).sum().item()


def test_clamping_the_advantage_biases_the_expected_gradient():
    _, opd_grad, *_ = _one_position_gradients(0)
    expected, _, _, _, advantages = _one_position_gradients(0, advantage_clip=0.5)
    assert advantages.abs().max().item() > 0.5
    assert (expected - opd_grad).abs().max().item() > 1e-3


def test_hand_worked_chunk_spreads_the_teacher_budget():
    # One chunk: teacher log q = ln 0.125 = -3 ln 2 (one token); student tokens with
    # log π_old = -ln 2 and -3 ln 2, so L_S = -4 ln 2.
    # r = (L_T / L_S) log π_old = (3/4)(-ln 2), (3/4)(-3 ln 2)      (sum = L_T)
    # A = r - log π_old = 0.25 ln 2, 0.75 ln 2.
    ln2 = math.log(2)
    old = torch.tensor([-ln2, -3 * ln2], dtype=torch.float64)
    adv = chunk_advantages(old, torch.tensor([0, 0]), torch.tensor([-3 * ln2], dtype=torch.float64))
    torch.testing.assert_close(adv, torch.tensor([0.25 * ln2, 0.75 * ln2], dtype=torch.float64))
    # |L_S| < ε: the budget is spread evenly; and the clamp holds.
    tiny = chunk_advantages(
        torch.tensor([0.0, 0.0], dtype=torch.float64),
        torch.tensor([0, 0]),
        torch.tensor([-40.0], dtype=torch.float64),
        advantage_clip=10.0,
    )
    torch.testing.assert_close(tiny, torch.tensor([-10.0, -10.0], dtype=torch.float64))
    # The same chunk through the objective, with the student's current log-probs as π_old.
    vocab = make_shared_vocab([[0], [1]], [[0], [1]], 3, 3)
    logits = torch.log(
        torch.tensor([[[0.25, 0.25, 0.5], [0.125, 0.125, 0.75]]], dtype=torch.float64)
    ).requires_grad_()
    alignment = Alignment(np.array([[0, 1, 0, 2]]), np.array([True]), np.array([False]), 1, 2)
    teacher = TeacherOutputs(token_logprobs=torch.tensor([[-3 * ln2]], dtype=torch.float64))
    loss, metrics = compute_objective(
        "dpca",
        student_logits=logits,
        student_ids=torch.tensor([[2, 0]]),
        alignments=[alignment],
        shared_vocab=vocab,
        teacher=teacher,
    )
    # one-update loss = -(A_0 log π(s_0) + A_1 log π(s_1)) / 2
    #                 = -(0.25 ln2 (-ln2) + 0.75 ln2 (-3 ln2)) / 2 = 1.25 (ln 2)^2
    assert loss.item() == pytest.approx(1.25 * ln2**2, abs=1e-12)
    assert metrics["kl"] == pytest.approx((-4 * ln2 + 3 * ln2) / 2, abs=1e-12)


def test_one_student_token_per_chunk_gets_the_whole_chunk_log_ratio():
    # Where the student merges what the teacher splits (student ▁140 against teacher 1 4 0),
    # each chunk has one student token, the proportional split has nothing to split, and DPCA is
    # chunk-level REINFORCE: A = L_T - L_S of the chunk, clamped.
    old = torch.tensor([-0.5, -2.0, -0.01], dtype=torch.float64)
    teacher_sums = torch.tensor([-1.7, -0.1, -30.0], dtype=torch.float64)
    adv = chunk_advantages(old, torch.tensor([0, 1, 2]), teacher_sums, advantage_clip=10.0)
    torch.testing.assert_close(adv, (teacher_sums - old).clamp(-10.0, 10.0))
    assert adv[2].item() == -10.0


def test_clipped_surrogate_stops_gradient_outside_the_trust_region():
    batch = random_batch(300, batch=2)
    teacher = make_teacher(
        batch.teacher_logits, batch.teacher_ids, batch.shared_vocab, TEACHER_NEEDS["dpca"]
    )
    current = realised_logprobs(batch.student_logits.detach(), batch.student_ids)
    # π_old far below π_θ: ratio >> 1 + clip_high, so positive-advantage tokens get no gradient.
    _, metrics, grad = run(batch, teacher, current - 5.0)
    advantages, mask = dpca_advantages(current - 5.0, teacher.token_logprobs, batch.alignments)
    positive = mask & (advantages > 0)
    assert metrics["clip_fraction"] == 1.0
    assert (grad[positive].abs().sum(-1) == 0).all()
    assert (grad[mask & (advantages < 0)].abs().sum(-1) > 0).all()


def test_gradcheck():
    # With rollout-time log-probs the advantages are constants and the loss is a function of
    # the logits. (The one-update form detaches advantages computed from the current policy, a
    # stop-gradient that finite differences cannot reproduce; its gradient is checked against
    # the reference and the OPD limit above.)
    batch = random_batch(17, batch=2, student_vocab=6, teacher_vocab=7, classes=4)
    teacher = make_teacher(
        batch.teacher_logits, batch.teacher_ids, batch.shared_vocab, TEACHER_NEEDS["dpca"]
    )
    old = old_logprobs(batch, 0)
    leaf = batch.student_logits.detach().clone().requires_grad_()

    def loss_of(x):
        return compute_objective(
            "dpca",
            student_logits=x,
            student_ids=batch.student_ids,
            alignments=batch.alignments,
            shared_vocab=None,
            teacher=teacher,
            student_old_logprobs=old,
            slice_size=2,
        )[0]

    assert torch.autograd.gradcheck(loss_of, (leaf,))


def test_old_logprobs_are_checked():
    batch = random_batch(1, batch=2)
    teacher = make_teacher(
        batch.teacher_logits, batch.teacher_ids, batch.shared_vocab, TEACHER_NEEDS["dpca"]
    )
    with pytest.raises(ValueError, match="student_old_logprobs has shape"):
        run(batch, teacher, torch.zeros(1, 1, dtype=torch.float64))
    old = old_logprobs(batch, 1)
    old[0, 0] = float("nan")
    if batch.alignments[0].student_length:
        with pytest.raises(ValueError, match="student_old_logprobs holds NaN"):
            run(batch, teacher, old)
