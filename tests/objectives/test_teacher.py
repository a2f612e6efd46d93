import pytest
import torch

from ctopd.objectives import TEACHER_NEEDS, teacher_needs, teacher_outputs
from ctopd.objectives.teacher import TEACHER_FIELDS

from .reference import full_teacher, random_batch

PAPER_NEEDS = teacher_needs("simct", space="paper")


def paper_space(name):
    """These tests build synthetic shared vocabularies without byte tables: the paper space."""
    return {"space": "paper"} if name in ("simct", "shared_only") else {}


def _valid(tensor, alignments):
    return [tensor[b, : a.teacher_length] for b, a in enumerate(alignments)]


@pytest.mark.parametrize("slice_size", [1, 2, 1000])
def test_fields_match_direct_computation(slice_size):
    batch = random_batch(3, batch=4)
    # text_events need byte tables (tests/objectives/test_text_events.py).
    fields = TEACHER_FIELDS - {"text_events"}
    out = teacher_outputs(
        batch.teacher_logits,
        batch.teacher_ids,
        batch.shared_vocab,
        fields,
        slice_size=slice_size,
        top_k=5,
    )
    expected = full_teacher(batch, top_k=5)
    for field in sorted(fields):
        for got, want in zip(
            _valid(getattr(out, field), batch.alignments),
            _valid(getattr(expected, field), batch.alignments),
            strict=True,
        ):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_only_requested_fields_are_computed_and_padding_reads_zero():
    batch = random_batch(5, batch=3)
    out = teacher_outputs(
        batch.teacher_logits, batch.teacher_ids, batch.shared_vocab, TEACHER_NEEDS["dpca"]
    )
    assert out.class_logprobs is None and out.full_logprobs is None and out.topk_probs is None
    assert out.token_logprobs.shape == batch.teacher_ids.shape
    assert (out.token_logprobs[batch.teacher_ids < 0] == 0).all()
    assert (out.token_logprobs[batch.teacher_ids >= 0] < 0).all()


def test_no_grad_float32_for_half_inputs_and_temperature():
    batch = random_batch(1, batch=2)
    logits = batch.teacher_logits.to(torch.bfloat16).requires_grad_()
    out = teacher_outputs(
        logits, batch.teacher_ids, batch.shared_vocab, PAPER_NEEDS, temperature=2.0
    )
    assert out.class_logprobs.dtype == torch.float32 and not out.class_logprobs.requires_grad
    batch.teacher_logits = logits.detach().double() / 2.0
    expected = full_teacher(batch)
    for got, want in zip(
        _valid(out.class_logprobs, batch.alignments),
        _valid(expected.class_logprobs, batch.alignments),
        strict=True,
    ):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_rejected():
    batch = random_batch(2, batch=2)
    with pytest.raises(ValueError, match="unknown teacher field"):
        teacher_outputs(
            batch.teacher_logits,
            batch.teacher_ids,
            batch.shared_vocab,
            frozenset({"hidden_states"}),
        )
    bad_ids = batch.teacher_ids.clone()
    bad_ids[0, 0] = batch.teacher_logits.shape[-1]
    with pytest.raises(ValueError, match="out of range"):
        teacher_outputs(batch.teacher_logits, bad_ids, batch.shared_vocab, frozenset())
    with pytest.raises(ValueError, match="teacher_ids has shape"):
        teacher_outputs(
            batch.teacher_logits, batch.teacher_ids[:, :1], batch.shared_vocab, frozenset()
        )
    with pytest.raises(ValueError, match="teacher id .* only"):
        teacher_outputs(
            batch.teacher_logits[..., :3],
            batch.teacher_ids.clamp(max=2),
            batch.shared_vocab,
            frozenset({"class_logprobs"}),
        )
