"""The registry: names, teacher needs, option checking and the common contract of every
objective (metric keys, a loss connected to the logits, padding ignored)."""

import numpy as np
import pytest
import torch

from ctopd.core.alignment import Alignment
from ctopd.objectives import (
    OBJECTIVES,
    TEACHER_NEEDS,
    compute_objective,
    objective_options,
    teacher_needs,
    teacher_outputs,
)
from ctopd.objectives.teacher import TEACHER_FIELDS

from .reference import make_shared_vocab, random_batch

METRIC_KEYS = {
    "loss",
    "kl",
    "coverage",
    "supervised_tokens",
    "student_tokens",
    "chunks_one_to_one",
    "chunks_multi",
    "unaligned_share",
    "teacher_logprob_mean",
}

PAPER_NEEDS = teacher_needs("simct", space="paper")


def paper_space(name):
    """These tests build synthetic shared vocabularies without byte tables: the paper space."""
    return {"space": "paper"} if name in ("simct", "shared_only") else {}


def test_names_and_teacher_needs():
    assert set(OBJECTIVES) == {"simct", "dpca", "shared_only", "uld", "sft", "opd"}
    assert set(TEACHER_NEEDS) == set(OBJECTIVES)
    assert TEACHER_NEEDS["sft"] == frozenset()
    assert TEACHER_NEEDS["dpca"] == frozenset({"token_logprobs"})
    assert all(needs <= TEACHER_FIELDS for needs in TEACHER_NEEDS.values())
    assert objective_options("simct") == {
        "divergence": "reverse_kl",
        "beta": 0.5,
        "temperature": 1.0,
        "weight_by_tokens": False,
        "slice_size": 256,
        "space": "text",
        "cells": "none",
    }
    assert teacher_needs("simct") == frozenset({"token_logprobs", "text_events"})
    assert teacher_needs("simct", space="paper") == frozenset({"token_logprobs", "class_logprobs"})
    assert teacher_needs("dpca", space="paper") == TEACHER_NEEDS["dpca"]
    assert objective_options("dpca")["clip_high"] == 0.28


def _call(name, batch, teacher, **options):
    return compute_objective(
        name,
        **paper_space(name),
        student_logits=batch.student_logits,
        student_ids=batch.student_ids,
        alignments=batch.alignments,
        shared_vocab=batch.shared_vocab,
        teacher=teacher,
        **options,
    )


def test_unknown_name_or_option_lists_the_valid_ones():
    batch = random_batch(0, batch=1)
    with pytest.raises(ValueError, match="valid: simct, dpca, shared_only, uld, sft, opd"):
        _call("gkd", batch, None)
    with pytest.raises(ValueError, match=r"unknown option\(s\) tau .*valid: divergence, beta"):
        _call("simct", batch, None, tau=2.0)
    with pytest.raises(ValueError, match="unknown option.*valid: slice_size"):
        _call("sft", batch, None, divergence="jsd")


@pytest.mark.parametrize(
    ("name", "options", "pattern"),
    [
        ("simct", {"divergence": "hellinger"}, "divergence='hellinger'.*reverse_kl"),
        ("simct", {"beta": 1.0}, "beta=1.0"),
        ("shared_only", {"temperature": 0.0}, "temperature=0.0"),
        ("simct", {"slice_size": 0}, "slice_size=0"),
        ("dpca", {"clip_low": 1.5}, "clip_low=1.5"),
        ("dpca", {"advantage_clip": -1.0}, "advantage_clip=-1.0"),
        ("uld", {"top_k": 0}, "top_k=0"),
    ],
)
def test_bad_option_values(name, options, pattern):
    batch = random_batch(0, batch=1)
    with pytest.raises(ValueError, match=pattern):
        _call(name, batch, None, **options)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_keeps_the_contract(name):
    # Identical tokenizers so that opd applies too.
    members = [[i] for i in range(7)] + [[7]]
    vocab = make_shared_vocab(members, members, 8, 8)
    batch = random_batch(31, batch=3, student_vocab=8, teacher_vocab=8)
    batch.shared_vocab = vocab
    batch.student_ids = batch.student_ids.clamp(max=7)
    teacher = teacher_outputs(
        batch.teacher_logits, batch.teacher_ids, vocab, teacher_needs(name, space="paper"), top_k=4
    )
    loss, metrics = _call(name, batch, None if name == "sft" else teacher)
    assert loss.dim() == 0 and loss.requires_grad
    assert METRIC_KEYS <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["loss"] == pytest.approx(loss.item())
    assert 0.0 <= metrics["coverage"] <= 1.0
    loss.backward()
    # Padding positions never receive gradient.
    for b, a in enumerate(batch.alignments):
        assert (batch.student_logits.grad[b, a.student_length :] == 0).all()


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_nothing_to_supervise_still_gives_a_connected_loss(name):
    vocab = make_shared_vocab([[0], [1]], [[0], [1]], 3, 3)
    empty = Alignment(np.zeros((0, 4), np.int64), np.zeros(0, bool), np.zeros(0, bool), 0, 0)
    unaligned = Alignment(np.array([[0, 2, 0, 1]]), np.array([False]), np.array([False]), 2, 1)
    logits = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    teacher = teacher_outputs(
        torch.randn(2, 2, 3, dtype=torch.float64),
        torch.zeros(2, 2, dtype=torch.long),
        vocab,
        TEACHER_FIELDS - {"text_events"},
        top_k=2,
    )
    loss, metrics = compute_objective(
        name,
        **paper_space(name),
        student_logits=logits,
        student_ids=torch.zeros(2, 2, dtype=torch.long),
        alignments=[empty, unaligned],
        shared_vocab=vocab,
        teacher=teacher,
    )
    assert loss.requires_grad
    loss.backward()
    assert logits.grad is not None
    if name != "sft":
        assert loss.item() == 0.0 and (logits.grad == 0).all()
        assert metrics["unaligned_share"] == 1.0


def test_shape_mismatches_are_explained():
    batch = random_batch(5, batch=2)
    teacher = teacher_outputs(
        batch.teacher_logits, batch.teacher_ids, batch.shared_vocab, PAPER_NEEDS
    )
    with pytest.raises(ValueError, match="student_ids has shape"):
        compute_objective(
            "simct",
            space="paper",
            student_logits=batch.student_logits,
            student_ids=batch.student_ids[:, :1],
            alignments=batch.alignments,
            shared_vocab=batch.shared_vocab,
            teacher=teacher,
        )
    with pytest.raises(ValueError, match="got 1 alignments for a batch of 2"):
        compute_objective(
            "simct",
            space="paper",
            student_logits=batch.student_logits,
            student_ids=batch.student_ids,
            alignments=batch.alignments[:1],
            shared_vocab=batch.shared_vocab,
            teacher=teacher,
        )
    with pytest.raises(ValueError, match="needs teacher outputs"):
        _call("dpca", batch, None)
    other = make_shared_vocab([[0], [1], [2]], [[0], [1], [2]], 13, 17)
    with pytest.raises(ValueError, match="teacher.class_logprobs has .* classes"):
        compute_objective(
            "simct",
            space="paper",
            student_logits=batch.student_logits,
            student_ids=batch.student_ids,
            alignments=batch.alignments,
            shared_vocab=other,
            teacher=teacher,
        )
