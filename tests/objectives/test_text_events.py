"""The text-event supervision space of ``simct``/``shared_only`` (docs/concepts/simct.md): against
a per-token reference, in the identical-tokenizer limit, and the agreement invariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ctopd.core.pair import TokenizerPair
from ctopd.objectives import compute_objective, teacher_needs, teacher_outputs
from ctopd.objectives.plan import flatten_chunks
from ctopd.objectives.text_events import (
    CELLS,
    build_event_plan,
    event_scores,
    side_rows_in,
    text_tables,
)
from ctopd.testing import (
    train_byte_level_bpe,
    train_digit_group_bpe,
    train_sentencepiece_bpe,
)
from ctopd.training.config import ObjectiveConfig
from ctopd.training.rollout import pad_responses

from .agreement import agreement_batch, markov_texts
from .text_reference import reference_events

CORPUS = [
    "Mia has 87 coins. She finds 68, then spends 39. How many coins now?",
    "87 + 68 = 140 + 15 = 155\n155 - 39 = 120 - 4 = 116\n#### 116",
    "the then there they thermal 1234 12 7 9999 \n\n  spaced  out",
] * 10
TEXTS = ["87 + 68 = 140 + 15 = 155", "then there 9999, 12345", "  spaced\n\nout 7 the"]


def one_special_bpe() -> PreTrainedTokenizerFast:
    """Byte-level BPE whose only special token is the end: every id is a shared class with
    itself, so the identical pair's space is the whole vocabulary."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>"
    )


@pytest.fixture(scope="module")
def families():
    return {
        "digits": train_byte_level_bpe(CORPUS, 330, split_digits=True),
        "groups": train_digit_group_bpe(CORPUS, 330),
        "spm": train_sentencepiece_bpe(CORPUS, 120),
    }


def random_batch(pair: TokenizerPair, texts, seed: int):
    end = int(pair.student_table.end_ids[0])
    student = [pair.student_tokenizer.encode(t, add_special_tokens=False) + [end] for t in texts]
    teacher = pair.teacher_ids_for_batch(student)
    alignments = pair.align_batch(teacher, student)
    teacher_ids, _ = pad_responses(teacher, pad_id=-1)
    student_ids, _ = pad_responses(student)
    gen = torch.Generator().manual_seed(seed)
    student_logits = 2 * torch.randn(
        len(texts),
        student_ids.shape[1],
        pair.student_table.vocab_size,
        generator=gen,
        dtype=torch.float64,
    )
    teacher_logits = 2 * torch.randn(
        len(texts),
        teacher_ids.shape[1],
        pair.teacher_table.vocab_size,
        generator=gen,
        dtype=torch.float64,
    )
    return (
        student,
        teacher,
        alignments,
        teacher_ids,
        student_ids,
        student_logits.requires_grad_(),
        teacher_logits,
    )


def run(name, pair, batch, *, cells="none", needs_extra=frozenset(), **options):
    student, _, alignments, teacher_ids, student_ids, s_logits, t_logits = batch
    tables = text_tables(pair.teacher_table, pair.student_table, pair.shared_vocab, cells=cells)
    needs = teacher_needs(name) | needs_extra
    teacher = teacher_outputs(
        t_logits,
        teacher_ids,
        pair.shared_vocab,
        needs,
        alignments=alignments,
        student_ids=student,
        text_tables=tables,
    )
    loss, metrics = compute_objective(
        name,
        student_logits=s_logits,
        student_ids=student_ids,
        alignments=alignments,
        shared_vocab=pair.shared_vocab,
        teacher=teacher,
        cells=cells,
        **options,
    )
    (grad,) = torch.autograd.grad(loss, s_logits)
    return loss, metrics, grad, teacher


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_identical_tokenizers_give_token_level_opd(temperature):
    tokenizer = one_special_bpe()
    pair = TokenizerPair(tokenizer, tokenizer)
    batch = random_batch(pair, TEXTS, seed=3)
    s_logits = batch[5]
    results = {}
    for name in ("simct", "shared_only", "opd"):
        options = {} if name == "opd" else {"cells": "none"}
        if name == "opd":
            student, _, alignments, teacher_ids, student_ids, _, t_logits = batch
            teacher = teacher_outputs(
                t_logits, teacher_ids, pair.shared_vocab, teacher_needs("opd")
            )
            loss, _ = compute_objective(
                "opd",
                student_logits=s_logits,
                student_ids=student_ids,
                alignments=alignments,
                shared_vocab=pair.shared_vocab,
                teacher=teacher,
                temperature=temperature,
            )
            (grad,) = torch.autograd.grad(loss, s_logits)
        else:
            loss, _, grad, _ = run(name, pair, batch, temperature=temperature, **options)
        results[name] = (loss, grad)
    for name in ("simct", "shared_only"):
        torch.testing.assert_close(results[name][0], results["opd"][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(results[name][1], results["opd"][1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "teacher_name,student_name,cells",
    [
        ("digits", "groups", "none"),
        ("digits", "spm", "none"),
        ("spm", "groups", "none"),
        ("groups", "digits", "none"),
        ("digits", "spm", "boundary"),
        ("spm", "groups", "all"),
        ("digits", "groups", "all"),
    ],
)
def test_event_scores_match_the_per_token_reference(families, teacher_name, student_name, cells):
    pair = TokenizerPair(families[teacher_name], families[student_name])
    tables = text_tables(pair.teacher_table, pair.student_table, pair.shared_vocab, cells=cells)
    student, teacher, alignments, teacher_ids, student_ids, s_logits, t_logits = random_batch(
        pair, TEXTS, seed=11
    )
    flat = flatten_chunks(alignments, student_ids, pair.shared_vocab)
    plan = build_event_plan(
        flat, flat.usable, np.maximum(teacher_ids.numpy(), 0), student_ids.numpy(), tables
    )
    assert plan.num_chunks == int(flat.usable.sum()) > 0
    classes = pair.shared_vocab.size
    checked = 0
    for k in range(plan.num_chunks):
        index = plan.index[k]
        b = int(flat.batch[index])
        chunk_bytes = pair.teacher_table.ids_to_bytes(
            teacher[b][flat.teacher_start[index] : flat.teacher_end[index]]
        )
        if (
            flat.teacher_start[index] == 0
            and pair.teacher_table.dummy_prefix
            and chunk_bytes[:1] == b" "
        ):
            chunk_bytes = chunk_bytes[1:]
        if flat.is_end[index]:
            chunk_bytes = b""
        for side, logits, ids, table in (
            ("teacher", t_logits, teacher, pair.teacher_table),
            ("student", s_logits, student, pair.student_table),
        ):
            rows = getattr(plan, side)
            r0, r1 = side_rows_in(rows, k, k + 1)
            got = event_scores(
                logits[rows.batch[r0:r1], rows.pos[r0:r1]].detach(), plan, side, tables, k, k + 1
            )[0]
            positions = rows.pos[r0:r1].tolist()
            expected = reference_events(
                logits[b, positions].detach(),
                [ids[b][p] for p in positions],
                positions,
                table,
                tables,
                chunk_bytes,
                int(plan.limit[k]),
            )
            # Only the classes that may be cells have columns; the others are never cells.
            assert (expected[:classes][~tables.cell_classes] == -1e30).all()
            expected = torch.cat([expected[:classes][tables.cell_index], expected[classes:]])
            width = tables.cell_index.size + 1 + len(chunk_bytes)
            torch.testing.assert_close(got[:width], expected, rtol=1e-9, atol=1e-9)
            assert (got[width:] == -1e30).all()
            # A distribution: the cells and events partition the model's probability.
            assert abs(float(torch.logsumexp(got, 0))) < 1e-9
            checked += 1
    assert checked == 2 * plan.num_chunks


@pytest.mark.slow
def test_gradcheck_through_events(families):
    pair = TokenizerPair(families["digits"], families["groups"])
    batch = random_batch(pair, ["87 + 68 = 140", "9999 the"], seed=5)
    student, _, alignments, teacher_ids, student_ids, s_logits, t_logits = batch
    tables = text_tables(pair.teacher_table, pair.student_table, pair.shared_vocab)
    teacher = teacher_outputs(
        t_logits,
        teacher_ids,
        pair.shared_vocab,
        teacher_needs("simct"),
        alignments=alignments,
        student_ids=student,
        text_tables=tables,
    )

    def loss_of(logits):
        return compute_objective(
            "simct",
            student_logits=logits,
            student_ids=student_ids,
            alignments=alignments,
            shared_vocab=pair.shared_vocab,
            teacher=teacher,
            slice_size=4,
        )[0]

    small = s_logits.detach()[:, :, :].clone().requires_grad_()
    assert torch.autograd.gradcheck(loss_of, (small,), eps=1e-6, atol=1e-6)


# --- the agreement invariant (docs/concepts/simct.md) ---------------------------------------------

AGREEMENT_PAIRS = [
    ("digits", "groups"),
    ("digits", "bytes"),
    ("groups", "digits"),
    ("digits", "spm"),
]


@pytest.fixture(scope="module")
def agreement_setup():
    distribution = markov_texts("ab 12", max_length=6, seed=3)
    corpus = distribution.sample(3000, seed=1)
    tokenizers = {
        "digits": train_byte_level_bpe(corpus, 290, split_digits=True),
        "groups": train_digit_group_bpe(corpus, 290),
        "bytes": train_byte_level_bpe(corpus, 290, split_digits=False),
        "spm": train_sentencepiece_bpe(corpus, 60),
    }
    # Texts that start with a letter or digit: a leading space is spelled differently by the
    # dummy-prefix tokenizer (its own canonical-encoding question, not the objective's).
    texts = [t for t in distribution.sample(400, seed=2) if not t.startswith(" ")][:48]
    return distribution, tokenizers, texts


def sampled_path_floor(batch) -> float:
    """Mean per student token of ``|L_T - L_S|`` over chunks: how far the two canonical
    models' chunk log-probabilities differ although they agree on every text (what DPCA's
    targets are off by), the look-ahead residual of docs/concepts/simct.md, the invariant."""
    total, tokens = 0.0, 0
    for b, alignment in enumerate(batch.alignments):
        s = torch.log_softmax(batch.student_logits[b].detach(), -1)
        t = torch.log_softmax(batch.teacher_logits[b], -1)
        s_lp = s[
            torch.arange(len(batch.student_responses[b])),
            torch.as_tensor(batch.student_responses[b]),
        ]
        t_lp = t[
            torch.arange(len(batch.teacher_responses[b])),
            torch.as_tensor(batch.teacher_responses[b]),
        ]
        for ts, te, ss, se in alignment.chunks.tolist():
            total += abs(float(t_lp[ts:te].sum() - s_lp[ss:se].sum()))
        tokens += alignment.student_length
    return total / tokens


def agreement_losses(pair, batch, *, space: str, cells: str = "none"):
    tables = text_tables(pair.teacher_table, pair.student_table, pair.shared_vocab, cells=cells)
    needs = teacher_needs("simct", space=space)
    teacher = teacher_outputs(
        batch.teacher_logits,
        batch.teacher_ids,
        pair.shared_vocab,
        needs,
        alignments=batch.alignments,
        student_ids=batch.student_responses,
        text_tables=tables,
    )
    out = {}
    for name in ("simct", "shared_only"):
        options = {"space": space} | ({"cells": cells} if space == "text" else {})
        loss, _ = compute_objective(
            name,
            student_logits=batch.student_logits,
            student_ids=batch.student_ids,
            alignments=batch.alignments,
            shared_vocab=pair.shared_vocab,
            teacher=teacher,
            **options,
        )
        (grad,) = torch.autograd.grad(loss, batch.student_logits)
        out[name] = (float(loss), float(grad.abs().sum(-1).max()))
    return out


@pytest.mark.parametrize("teacher_name,student_name", AGREEMENT_PAIRS)
def test_text_space_vanishes_when_models_agree_on_text(
    agreement_setup, teacher_name, student_name, capsys
):
    distribution, tokenizers, texts = agreement_setup
    pair = TokenizerPair(tokenizers[teacher_name], tokenizers[student_name])
    batch = agreement_batch(pair, distribution, texts)
    multi = sum(
        int(((a.teacher_sizes > 1) | (a.student_sizes > 1)).sum()) for a in batch.alignments
    )
    assert multi >= 10  # the pair really cuts the texts differently
    floor = sampled_path_floor(batch)
    # The default space: the config's default cells rule.
    text = agreement_losses(pair, batch, space="text", cells=ObjectiveConfig().cells)
    paper = agreement_losses(pair, batch, space="paper")
    others = {
        cells: agreement_losses(pair, batch, space="text", cells=cells)["simct"][0]
        for cells in CELLS
        if cells != ObjectiveConfig().cells
    }
    with capsys.disabled():
        print(
            f"\n[agreement {teacher_name}->{student_name}] chunk-gap floor {floor:.4f}; "
            f"text (cells {ObjectiveConfig().cells}): simct {text['simct'][0]:.4f} "
            f"shared_only {text['shared_only'][0]:.4f}; paper: simct {paper['simct'][0]:.4f} "
            f"shared_only {paper['shared_only'][0]:.4f}; simct with other cells: "
            + ", ".join(f"{k} {v:.4f}" for k, v in others.items())
        )
    for name in ("simct", "shared_only"):
        loss, grad = text[name]
        # Well below the look-ahead residual every position-wise objective carries, and well
        # below the paper's space on the same batch.
        assert loss <= 0.4 * floor, (name, loss, floor)
        assert loss < 0.5 * paper[name][0], (name, loss, paper[name][0])
        assert grad < paper[name][1], (name, grad, paper[name][1])


def test_a_student_below_the_teacher_on_a_text_is_pushed_toward_it(agreement_setup):
    """Perturb the student away from the teacher on one known text (its realised tokens lose
    probability); one gradient step on the logits gives that text more probability again."""
    distribution, tokenizers, texts = agreement_setup
    pair = TokenizerPair(tokenizers["digits"], tokenizers["groups"])
    batch = agreement_batch(pair, distribution, texts[:8])
    target = 0
    ids = torch.as_tensor(batch.student_responses[target])
    positions = torch.arange(ids.numel())
    tables = text_tables(pair.teacher_table, pair.student_table, pair.shared_vocab)
    teacher = teacher_outputs(
        batch.teacher_logits,
        batch.teacher_ids,
        pair.shared_vocab,
        teacher_needs("simct"),
        alignments=batch.alignments,
        student_ids=batch.student_responses,
        text_tables=tables,
    )
    agreed, _ = compute_objective(
        "simct",
        student_logits=batch.student_logits.detach(),
        student_ids=batch.student_ids,
        alignments=batch.alignments,
        shared_vocab=pair.shared_vocab,
        teacher=teacher,
    )
    with torch.no_grad():
        batch.student_logits[target, positions, ids] -= 1.5

    def text_logprob(logits):
        return float(torch.log_softmax(logits[target], -1)[positions, ids].sum())

    before = text_logprob(batch.student_logits.detach())
    loss, _ = compute_objective(
        "simct",
        student_logits=batch.student_logits,
        student_ids=batch.student_ids,
        alignments=batch.alignments,
        shared_vocab=pair.shared_vocab,
        teacher=teacher,
    )
    (grad,) = torch.autograd.grad(loss, batch.student_logits)
    after = text_logprob(batch.student_logits.detach() - 5.0 * grad)
    assert float(loss) > float(agreed) + 0.005
    assert after > before + 0.05, (before, after)
