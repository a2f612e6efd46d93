"""Padded vocabularies (issue 24): logits with columns past the tokenizer's ids (a padded output
matrix, Qwen2.5-7B's 152,064 rows for 151,665 ids) give every objective exactly what the logits
cut to the real ids give, on both sides, however much mass the padded columns would take.

Needs the shared tokenizers folder (the ``real_tokenizers_dir`` fixture of tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import ctopd
from ctopd.objectives import compute_objective, teacher_needs, teacher_outputs
from ctopd.objectives.text_events import text_tables
from ctopd.training.rollout import pad_responses

TEXTS = ["Natalia sold 48/2 = 24 clips in May.\n#### 72", "Straße, café: √2 ≈ 1.41"]
STUDENT_EXTRA, TEACHER_EXTRA = 128, 64
PADDED_LOGIT = 30.0  # against randn logits the padded columns hold all but ~1e-9 of the mass

# (name, options): every built-in objective that a cross-tokenizer pair can run.
CASES = [
    ("simct", {}),
    ("simct", {"space": "paper"}),
    ("shared_only", {}),
    ("dpca", {}),
    ("uld", {}),
    ("sft", {}),
]


@pytest.fixture(scope="module")
def batch(real_tokenizers_dir):
    """A Llama-2 teacher and a Qwen2 student, padded logits on both sides (float32)."""
    pair = ctopd.TokenizerPair.from_pretrained(
        str(real_tokenizers_dir / "llama-spm"), str(real_tokenizers_dir / "qwen2")
    )
    eos = int(pair.student_table.end_ids[0])
    student = [
        pair.student_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in TEXTS
    ]
    teacher = pair.teacher_ids_for_batch(student)
    student_ids, _ = pad_responses(student)
    teacher_ids, _ = pad_responses(teacher, pad_id=-1)
    gen = torch.Generator().manual_seed(0)

    def padded_logits(ids, num_ids, extra):  # [B, length, num_ids + extra]
        logits = torch.randn(*ids.shape, num_ids + extra, generator=gen)
        logits[..., num_ids:] += PADDED_LOGIT
        return logits

    num_student, num_teacher = pair.student_table.vocab_size, pair.teacher_table.vocab_size
    return {
        "pair": pair,
        "student": student,
        "alignments": pair.align_batch(teacher, student),
        "student_ids": student_ids,
        "teacher_ids": teacher_ids,
        "student_logits": padded_logits(student_ids, num_student, STUDENT_EXTRA),
        "teacher_logits": padded_logits(teacher_ids, num_teacher, TEACHER_EXTRA),
        "tables": text_tables(pair.teacher_table, pair.student_table, pair.shared_vocab),
        "num_student": num_student,
        "num_teacher": num_teacher,
    }


def _teacher(batch, name, options, logits):
    needs = teacher_needs(name, **options)
    return teacher_outputs(
        logits,
        batch["teacher_ids"],
        batch["pair"].shared_vocab,
        needs,
        top_k=64,
        alignments=batch["alignments"],
        student_ids=batch["student"],
        text_tables=batch["tables"] if "text_events" in needs else None,
    )


def _loss(batch, name, options, student_logits, teacher):
    logits = student_logits.clone().requires_grad_()
    loss, metrics = compute_objective(
        name,
        **options,
        student_logits=logits,
        student_ids=batch["student_ids"],
        alignments=batch["alignments"],
        shared_vocab=batch["pair"].shared_vocab,
        teacher=teacher,
    )
    loss.backward()
    return loss.detach(), metrics, logits.grad


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_padded_columns_carry_nothing(batch, name, options):
    n_s, n_t = batch["num_student"], batch["num_teacher"]
    padded, real = batch["student_logits"], batch["student_logits"][..., :n_s]
    teacher_padded = _teacher(batch, name, options, batch["teacher_logits"])
    teacher_real = _teacher(batch, name, options, batch["teacher_logits"][..., :n_t])
    torch.testing.assert_close(teacher_padded.token_logprobs, teacher_real.token_logprobs)
    # The rig: over every column the teacher's own tokens would get ~ -30 and below.
    assert teacher_real.token_logprobs.min() > -20

    loss, metrics, grad = _loss(batch, name, options, padded, teacher_padded)
    expected_loss, expected_metrics, expected_grad = _loss(batch, name, options, real, teacher_real)
    assert expected_metrics["supervised_tokens"] > 0
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for key in ("kl", "coverage", "teacher_logprob_mean"):
        assert metrics[key] == pytest.approx(expected_metrics[key], rel=1e-5, abs=1e-6), key
    assert grad.shape == padded.shape and not grad[..., n_s:].any()  # no gradient to padding
    torch.testing.assert_close(grad[..., :n_s], expected_grad, rtol=1e-4, atol=1e-8)


@pytest.mark.slow
def test_same_tokenizer_opd_across_different_paddings(real_tokenizers_dir):
    """Qwen2.5-7B (152,064 rows) teaching Qwen2.5-0.5B (151,936): one tokenizer, two paddings."""
    pair = ctopd.TokenizerPair.from_pretrained(
        str(real_tokenizers_dir / "qwen2"), str(real_tokenizers_dir / "qwen2")
    )
    num_ids = pair.student_table.vocab_size
    eos = int(pair.student_table.end_ids[0])
    student = [pair.student_tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"] + [eos]]
    teacher = pair.teacher_ids_for_batch(student)
    ids, _ = pad_responses(student)
    gen = torch.Generator().manual_seed(1)
    student_logits = torch.randn(1, ids.shape[1], num_ids + STUDENT_EXTRA, generator=gen)
    teacher_logits = torch.randn(1, ids.shape[1], num_ids + TEACHER_EXTRA + 200, generator=gen)
    for logits in (student_logits, teacher_logits):
        logits[..., num_ids:] += PADDED_LOGIT
    losses = []
    for s_logits, t_logits in (
        (student_logits, teacher_logits),
        (student_logits[..., :num_ids], teacher_logits[..., :num_ids]),
    ):
        outputs = teacher_outputs(
            t_logits, pad_responses(teacher, pad_id=-1)[0], pair.shared_vocab, teacher_needs("opd")
        )
        assert outputs.full_logprobs.shape[-1] == num_ids
        loss, _ = compute_objective(
            "opd",
            student_logits=s_logits,
            student_ids=ids,
            alignments=pair.align_batch(teacher, student),
            shared_vocab=pair.shared_vocab,
            teacher=outputs,
        )
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    assert 0 < losses[1].item() < 5  # two random near-uniform models, not ~30 nats apart
