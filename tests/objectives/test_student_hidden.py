"""The student side from hidden states (issue 27): every objective given final hidden states and
the output layer (:class:`StudentHidden`, projected one slice at a time) gives the loss and the
gradients (hidden states, head weight, head bias) that the dense reference gives on the logits
``head(hidden)``, with a padded output matrix and with identical tokenizers; and no
``[B, m, V]``-sized tensor is ever allocated on the sliced path.

Needs the shared tokenizers folder (the ``real_tokenizers_dir`` fixture of tests/conftest.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ctopd
from ctopd.objectives import (
    StudentHead,
    StudentHidden,
    compute_objective,
    teacher_needs,
    teacher_outputs,
)
from ctopd.objectives.baselines import mean_token_nll
from ctopd.objectives.teacher import TeacherLogprobRows
from ctopd.objectives.text_events import text_tables
from ctopd.training.rollout import pad_responses

TEXTS = ["Natalia sold 48/2 = 24 clips in May.\n#### 72", "Straße, café: √2 ≈ 1.41"]
HIDDEN, PADDED_ROWS, PADDED_BIAS = 8, 96, 30.0
CASES = [
    ("simct", {}),
    ("simct", {"space": "paper"}),
    ("shared_only", {}),
    ("dpca", {}),
    ("uld", {}),
    ("sft", {}),
]
DTYPES = [(torch.float32, 1e-5), (torch.float64, 1e-9)]


def _make_batch(pair, texts, seed):
    eos = int(pair.student_table.end_ids[0])
    student = [
        pair.student_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts
    ]
    teacher = pair.teacher_ids_for_batch(student)
    student_ids, _ = pad_responses(student)
    teacher_ids, _ = pad_responses(teacher, pad_id=-1)
    gen = torch.Generator().manual_seed(seed)
    num_student = pair.student_table.vocab_size
    rows = num_student + PADDED_ROWS
    bias = torch.randn(rows, generator=gen, dtype=torch.float64)
    bias[num_student:] += PADDED_BIAS  # padded rows would take all the mass if projected
    return {
        "pair": pair,
        "student": student,
        "alignments": pair.align_batch(teacher, student),
        "student_ids": student_ids,
        "teacher_ids": teacher_ids,
        "hidden": torch.randn(*student_ids.shape, HIDDEN, generator=gen, dtype=torch.float64),
        "weight": torch.randn(rows, HIDDEN, generator=gen, dtype=torch.float64) * 0.7,
        "bias": bias,
        "teacher_logits": torch.randn(
            *teacher_ids.shape, pair.teacher_table.vocab_size, generator=gen
        ),
        "num_student": num_student,
    }


@pytest.fixture(scope="module")
def batch(real_tokenizers_dir):
    """A Llama-2 teacher and a Qwen2 student (151,936 ids) with a padded output matrix."""
    pair = ctopd.TokenizerPair.from_pretrained(
        str(real_tokenizers_dir / "llama-spm"), str(real_tokenizers_dir / "qwen2")
    )
    data = _make_batch(pair, TEXTS, seed=0)
    data["tables"] = text_tables(pair.teacher_table, pair.student_table, pair.shared_vocab)
    return data


@pytest.fixture(scope="module")
def same_batch(real_tokenizers_dir):
    """GPT-2 teaching GPT-2: one tokenizer, the OPD case."""
    pair = ctopd.TokenizerPair.from_pretrained(
        str(real_tokenizers_dir / "gpt-2"), str(real_tokenizers_dir / "gpt-2")
    )
    data = _make_batch(pair, TEXTS[:1], seed=1)
    data["tables"] = text_tables(pair.teacher_table, pair.student_table, pair.shared_vocab)
    return data


@pytest.fixture(scope="module")
def spm_batch(real_tokenizers_dir):
    """A Qwen2 teacher and a Llama-2 student: the student adds a dummy-prefix space, so its
    first response rows read another byte order than the one its head is put in."""
    pair = ctopd.TokenizerPair.from_pretrained(
        str(real_tokenizers_dir / "qwen2"), str(real_tokenizers_dir / "llama-spm")
    )
    data = _make_batch(pair, TEXTS, seed=2)
    data["tables"] = text_tables(pair.teacher_table, pair.student_table, pair.shared_vocab)
    return data


def _teacher(batch, name, options):
    needs = teacher_needs(name, **options)
    return teacher_outputs(
        batch["teacher_logits"],
        batch["teacher_ids"],
        batch["pair"].shared_vocab,
        needs,
        top_k=64,
        alignments=batch["alignments"],
        student_ids=batch["student"],
        text_tables=batch.get("tables") if "text_events" in needs else None,
    )


def _leaves(batch, dtype, with_bias):
    hidden = batch["hidden"].to(dtype, copy=True).requires_grad_()
    weight = batch["weight"].to(dtype, copy=True).requires_grad_()
    bias = batch["bias"].to(dtype, copy=True).requires_grad_() if with_bias else None
    return hidden, weight, bias


def _run(batch, name, options, teacher, student_logits):
    loss, metrics = compute_objective(
        name,
        **options,
        student_logits=student_logits,
        student_ids=batch["student_ids"],
        alignments=batch["alignments"],
        shared_vocab=batch["pair"].shared_vocab,
        teacher=teacher,
    )
    loss.backward()
    return loss.detach(), metrics


def _compare(batch, name, options, dtype, tolerance, *, with_bias, softcap):
    """Sliced from hidden states against dense ``head(hidden)``: loss and every gradient, over
    several slices of rows (``slice_size=8``)."""
    teacher = _teacher(batch, name, options)
    options = {**options, "slice_size": 8}
    rows = batch["weight"].shape[0]
    results = []
    for sliced in (False, True):
        hidden, weight, bias = _leaves(batch, dtype, with_bias)
        head = StudentHead(weight, bias, softcap, num_ids=rows)  # the objective cuts to V_S
        student = StudentHidden(hidden, head) if sliced else head(hidden)
        loss, metrics = _run(batch, name, options, teacher, student)
        grads = [hidden.grad, weight.grad] + ([bias.grad] if with_bias else [])
        results.append((loss, metrics, grads))
    (dense_loss, dense_metrics, dense_grads), (loss, metrics, grads) = results
    assert dense_metrics["supervised_tokens"] > 0
    assert loss.dtype == dense_loss.dtype == dtype
    torch.testing.assert_close(loss, dense_loss, rtol=tolerance, atol=tolerance)
    for key in ("kl", "coverage", "teacher_logprob_mean"):
        assert metrics[key] == pytest.approx(dense_metrics[key], rel=1e-6, abs=1e-9), key
    for grad, expected in zip(grads, dense_grads, strict=True):
        assert grad.abs().max() > 0
        torch.testing.assert_close(grad, expected, rtol=tolerance, atol=tolerance)
    num_ids = batch["num_student"]
    assert not grads[1][num_ids:].any()  # padded rows: no gradient
    if with_bias:
        assert not grads[2][num_ids:].any()


@pytest.mark.parametrize(("dtype", "tolerance"), DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_sliced_hidden_equals_dense(batch, name, options, dtype, tolerance):
    _compare(batch, name, options, dtype, tolerance, with_bias=True, softcap=20.0)


@pytest.mark.parametrize(("name", "options"), [("simct", {}), ("dpca", {})], ids=["simct", "dpca"])
def test_sliced_hidden_equals_dense_plain_head(batch, name, options):
    """No bias, no soft cap (Llama, Qwen2): the common head."""
    _compare(batch, name, options, torch.float32, 1e-5, with_bias=False, softcap=None)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.float64, 1e-9)])
def test_sliced_hidden_equals_dense_identical_tokenizers(same_batch, dtype, tolerance):
    _compare(same_batch, "opd", {}, dtype, tolerance, with_bias=True, softcap=None)
    _compare(same_batch, "simct", {}, dtype, max(tolerance, 1e-5), with_bias=False, softcap=None)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.float64, 1e-9)])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_opd_lazy_teacher_rows_equal_dense_full_logprobs(same_batch, dtype, tolerance, temperature):
    """``opd`` with the teacher's full log-softmax as :class:`TeacherLogprobRows` (hidden states
    and a padded, soft-capped output layer; rows made per slice) gives the loss and gradients
    it gives with the dense ``[B, n, V]`` ``full_logprobs``, and never allocates a
    ``[B, n, V]``-sized tensor."""
    batch = same_batch
    teacher_ids = batch["teacher_ids"]
    gen = torch.Generator().manual_seed(5)
    rows = batch["pair"].teacher_table.vocab_size + PADDED_ROWS
    teacher_hidden = torch.randn(*teacher_ids.shape, HIDDEN, generator=gen, dtype=dtype)
    teacher_bias = torch.randn(rows, generator=gen, dtype=dtype)
    teacher_bias[-PADDED_ROWS:] += PADDED_BIAS  # padded rows: no mass unless projected
    num_ids = batch["pair"].teacher_table.vocab_size
    teacher_head = StudentHead(
        torch.randn(rows, HIDDEN, generator=gen, dtype=dtype), teacher_bias, 15.0, num_ids
    )
    dense = teacher_outputs(
        teacher_head.transform(
            torch.nn.functional.linear(teacher_hidden, teacher_head.weight, teacher_bias)
        ),
        teacher_ids,
        batch["pair"].shared_vocab,
        teacher_needs("opd"),
        temperature=temperature,
    )
    lazy_rows = TeacherLogprobRows(
        teacher_hidden, teacher_head, teacher_ids >= 0, temperature=temperature, out_dtype=dtype
    )
    lazy = dataclasses.replace(dense, full_logprobs=lazy_rows)
    assert lazy_rows.shape == dense.full_logprobs.shape and lazy_rows.dtype == dtype
    torch.testing.assert_close(lazy_rows.dense(), dense.full_logprobs, rtol=0, atol=tolerance)
    # It holds no [B, n, V] tensor: hidden states, the valid mask and the output layer only.
    held = [lazy_rows.hidden, lazy_rows.valid, teacher_head.weight, teacher_head.bias]
    full = teacher_ids.numel() * num_ids
    assert all(t.numel() < full for t in held)

    size_b, size_m = batch["student_ids"].shape
    slice_size = 2
    assert size_b * size_m >= 8 * slice_size
    results = []
    for teacher in (dense, lazy):
        hidden, weight, bias = _leaves(batch, dtype, True)
        head = StudentHead(weight, bias, None, num_ids=weight.shape[0])
        with _LargestTensor() as tracker:
            loss, metrics = _run(
                batch, "opd", {"slice_size": slice_size}, teacher, StudentHidden(hidden, head)
            )
        results.append((loss, metrics, [hidden.grad, weight.grad, bias.grad], tracker.largest))
    (dense_loss, dense_metrics, dense_grads, dense_largest), (loss, metrics, grads, largest) = (
        results
    )
    assert dense_metrics["supervised_tokens"] > 0 and dense_largest >= full
    assert loss.dtype == dtype
    torch.testing.assert_close(loss, dense_loss, rtol=tolerance, atol=tolerance)
    for key in ("kl", "coverage", "teacher_logprob_mean"):
        assert metrics[key] == pytest.approx(dense_metrics[key], rel=1e-6, abs=1e-9), key
    for grad, expected in zip(grads, dense_grads, strict=True):
        assert grad.abs().max() > 0
        torch.testing.assert_close(grad, expected, rtol=tolerance, atol=tolerance)
    # One slice's rows (student or teacher) or an output matrix [V, H] (H = 8 here): below
    # B * n * V.
    assert largest <= max(3 * slice_size * rows, rows * HIDDEN) < full
    # The check for NaN reads the hidden states, not [n, V] rows.
    broken = teacher_hidden.clone()
    broken[0, 1, 2] = float("nan")
    bad = dataclasses.replace(dense, full_logprobs=dataclasses.replace(lazy_rows, hidden=broken))
    hidden, weight, bias = _leaves(batch, dtype, True)
    student = StudentHidden(hidden, StudentHead(weight, bias, None, num_ids=weight.shape[0]))
    with pytest.raises(ValueError, match=r"teacher.full_logprobs holds NaN"):
        _run(batch, "opd", {}, bad, student)


def test_hidden_path_never_permutes_student_rows(batch, monkeypatch):
    """From hidden states the head's rows are put in byte order once, so the text events never
    gather a slice's ``[S, V]`` rows into that order or back; the dense path, as a check on the
    rig, does."""
    import ctopd.objectives.softmax_sums as softmax_sums_module

    teacher = _teacher(batch, "simct", {})
    gathered = []
    take = softmax_sums_module.take_columns

    def recording_take(matrix, index):
        gathered.append(tuple(matrix.shape))
        return take(matrix, index)

    monkeypatch.setattr(softmax_sums_module, "take_columns", recording_take)
    counts = {}
    for sliced in (True, False):
        gathered.clear()
        hidden, weight, bias = _leaves(batch, torch.float32, True)
        head = StudentHead(weight, bias, None, num_ids=weight.shape[0])
        student = StudentHidden(hidden, head) if sliced else head(hidden)
        _run(batch, "simct", {"slice_size": 8}, teacher, student)
        counts[sliced] = len(gathered)
    assert counts[False] > 0
    assert counts[True] == 0


@pytest.mark.parametrize(("dtype", "tolerance"), DTYPES, ids=["float32", "float64"])
def test_sliced_hidden_equals_dense_dummy_prefix_student(spm_batch, dtype, tolerance):
    assert spm_batch["tables"].student.first is not spm_batch["tables"].student.sorted
    _compare(spm_batch, "simct", {}, dtype, tolerance, with_bias=True, softcap=None)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("name", ["simct", "dpca", "sft"])
def test_no_full_logits_on_the_sliced_path(batch, name):
    """Loss and backward from hidden states never allocate a ``[B, m, V]``-sized tensor; the
    dense path, as a check on the rig, does."""
    teacher = _teacher(batch, name, {})
    rows, (size_b, size_m) = batch["weight"].shape[0], batch["student_ids"].shape
    full = size_b * size_m * batch["num_student"]
    slice_size = 4
    largest = {}
    for sliced in (True, False):
        hidden, weight, bias = _leaves(batch, torch.float32, True)
        head = StudentHead(weight, bias, None, num_ids=rows)
        with _LargestTensor() as tracker:
            student = StudentHidden(hidden, head) if sliced else head(hidden)
            loss, _ = compute_objective(
                name,
                student_logits=student,
                student_ids=batch["student_ids"],
                alignments=batch["alignments"],
                shared_vocab=batch["pair"].shared_vocab,
                teacher=teacher,
                slice_size=slice_size,
            )
            loss.backward()
        largest[sliced] = tracker.largest
    assert largest[False] >= full
    # One slice's rows (a slice grows past slice_size only to finish a chunk) or the head's
    # weight, whichever is larger: far below B * m * V.
    assert size_b * size_m >= 8 * slice_size
    assert largest[True] <= max(3 * slice_size * rows, rows * HIDDEN) < full / 2


def test_head_of_a_model_without_a_linear_head_warns():
    class NoHead(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.warns(UserWarning, match=r"full \[B, m, V\] logits"):
        assert StudentHead.from_model(NoHead(), 10) is None
    with pytest.warns(UserWarning, match="sharded"):
        assert StudentHead.from_model(NoHead(), 10, sharded=True) is None


def test_bad_hidden_states_fail_with_a_message(batch):
    hidden, weight, _ = _leaves(batch, torch.float32, False)
    head = StudentHead(weight, None, None, num_ids=weight.shape[0])
    kwargs = dict(
        student_ids=batch["student_ids"],
        alignments=batch["alignments"],
        shared_vocab=batch["pair"].shared_vocab,
        teacher=None,
    )
    with pytest.raises(ValueError, match=r"hidden states must be a float \[B, m, H\]"):
        compute_objective("sft", student_logits=StudentHidden(hidden[0], head), **kwargs)
    with pytest.raises(ValueError, match="output weight must be"):
        compute_objective("sft", student_logits=StudentHidden(hidden[..., :3], head), **kwargs)
    broken = hidden.detach().clone()
    broken[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compute_objective("sft", student_logits=StudentHidden(broken, head), **kwargs)


@pytest.mark.parametrize(("dtype", "tolerance"), DTYPES, ids=["float32", "float64"])
def test_mean_token_nll_equals_cross_entropy(dtype, tolerance):
    """The SFT loss from hidden states (several slices, ignored ids, a padded head with a soft
    cap) equals ``F.cross_entropy`` on the dense logits cut to the real ids."""
    gen = torch.Generator().manual_seed(3)
    num_ids, rows, size_b, size_m = 500, 540, 3, 11
    targets = torch.randint(0, num_ids, (size_b, size_m), generator=gen)
    targets[0, 7:] = -100
    targets[2, 0] = -100
    results = []
    for sliced in (False, True):
        torch.manual_seed(4)
        hidden = torch.randn(size_b, size_m, HIDDEN, dtype=dtype, requires_grad=True)
        weight = torch.randn(rows, HIDDEN, dtype=dtype, requires_grad=True)
        head = StudentHead(weight, None, 15.0, num_ids=num_ids)
        if sliced:
            loss = mean_token_nll(StudentHidden(hidden, head), targets, slice_size=4)
        else:
            loss = torch.nn.functional.cross_entropy(
                head(hidden).flatten(0, 1), targets.flatten(), ignore_index=-100
            )
        loss.backward()
        results.append((loss.detach(), hidden.grad, weight.grad))
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    assert not results[1][2][num_ids:].any()
    with pytest.raises(ValueError, match="target_ids has shape"):
        mean_token_nll(StudentHidden(hidden, head), targets[:, :3])


def _plain_logits_objective(
    *, student_logits, student_ids, alignments, shared_vocab, teacher, student_old_logprobs=None
):
    """A user's objective that reads plain logits: the realised tokens' mean log-probability
    minus the teacher's (tensor methods a StudentHidden does not have)."""
    logprobs = student_logits.log_softmax(-1).gather(-1, student_ids.unsqueeze(-1)).squeeze(-1)
    mask = torch.zeros_like(logprobs, dtype=torch.bool)
    for row, alignment in enumerate(alignments):
        mask[row, : alignment.student_length] = True
    loss = -(logprobs * mask).sum() / mask.sum()
    return loss, {"loss": float(loss), "kl": 0.0, "coverage": 1.0}


_plain_logits_objective.teacher_needs = set()


def test_a_users_objective_gets_dense_logits_from_hidden_states(batch):
    """A registered objective that does not declare ``accepts_student_hidden`` receives the
    dense logits ``head(hidden)`` (padded rows cut) when the loop passes hidden states: the same
    loss and gradients as given the dense logits directly."""
    from ctopd.objectives import OBJECTIVES, TEACHER_NEEDS, register_objective

    register_objective(
        "test_plain_logits", _plain_logits_objective, _plain_logits_objective.teacher_needs
    )
    results = []
    try:
        for sliced in (True, False):
            hidden, weight, bias = _leaves(batch, torch.float64, with_bias=True)
            head = StudentHead(weight, bias, None, batch["num_student"])
            logits = StudentHidden(hidden, head) if sliced else head(hidden)
            loss, _ = _run(batch, "test_plain_logits", {}, None, logits)
            results.append((loss, hidden.grad, weight.grad, bias.grad))
    finally:
        OBJECTIVES.pop("test_plain_logits")
        TEACHER_NEEDS.pop("test_plain_logits")
    for sliced, dense in zip(*results):
        torch.testing.assert_close(sliced, dense, rtol=0, atol=1e-12)
    assert results[0][2][batch["num_student"] :].abs().max() == 0  # padded rows: no gradient
