"""SimCT vs shared-only coverage on a real tokenizer pair (qwen2 teacher, llama-spm student).

Needs the shared tokenizers folder (the ``real_tokenizers_dir`` fixture of tests/conftest.py).
"""

import numpy as np
import pytest
import torch

import ctopd
from ctopd.objectives import TeacherOutputs, compute_objective, teacher_needs

TEXTS = [
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
    "altogether in April and May.\n#### 72",
    "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute. Working 50 minutes, she earned "
    "0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # naïve, O(φ^n) 🚀",
    "Straße, café, 東京: the answer is √2 ≈ 1.41421356.",
]

PAPER_NEEDS = teacher_needs("simct", space="paper")


def paper_space(name):
    """These tests build synthetic shared vocabularies without byte tables: the paper space."""
    return {"space": "paper"} if name in ("simct", "shared_only") else {}


@pytest.fixture(scope="module")
def pair(real_tokenizers_dir):
    # Through the shared fixture: skips with a reason when ../shared is not there.
    return ctopd.TokenizerPair.from_pretrained(
        str(real_tokenizers_dir / "qwen2"), str(real_tokenizers_dir / "llama-spm")
    )


def test_simct_supervises_every_aligned_student_token(pair):
    eos = int(pair.student_table.end_ids[0])
    student = [
        pair.student_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in TEXTS
    ]
    teacher = pair.teacher_ids_for_batch(student)
    alignments = pair.align_batch(teacher, student)
    vocab = pair.shared_vocab
    m, n = max(map(len, student)), max(map(len, teacher))
    ids = torch.zeros(len(student), m, dtype=torch.long)
    for b, s in enumerate(student):
        ids[b, : len(s)] = torch.tensor(s)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(student), m, 32000, generator=gen).requires_grad_()
    teacher_out = TeacherOutputs(
        token_logprobs=-torch.rand(len(student), n, generator=gen),
        class_logprobs=torch.log_softmax(
            torch.randn(len(student), n, vocab.size, generator=gen), -1
        ),
    )
    assert set(PAPER_NEEDS) == {"token_logprobs", "class_logprobs"}
    results = {}
    for name in ("simct", "shared_only"):
        logits.grad = None
        loss, metrics = compute_objective(
            name,
            **paper_space(name),
            student_logits=logits,
            student_ids=ids,
            alignments=alignments,
            shared_vocab=vocab,
            teacher=teacher_out,
        )
        loss.backward()
        results[name] = (metrics, (logits.grad.abs().sum(-1) > 0))
    simct, shared = results["simct"][0], results["shared_only"][0]
    print(
        f"\nqwen2 -> llama-spm coverage: simct {simct['coverage']:.1%}, "
        f"shared_only {shared['coverage']:.1%} of {int(simct['student_tokens'])} student "
        f"tokens ({int(simct['chunks_multi'])} multi-token chunks)"
    )
    # Qwen2 spells a response's first word without a space, Llama-2's dummy prefix with one:
    # the first chunk's class labels do not match, so it is left out.
    assert vocab.first_position_mislabelled
    aligned = np.zeros((len(student), m), dtype=bool)
    for b, a in enumerate(alignments):
        for k in np.flatnonzero(a.aligned):
            if k > 0 or a.is_end[k]:
                aligned[b, a.chunks[k, 2] : a.chunks[k, 3]] = True
    # simct: every aligned student token but the first chunk's gets gradient, nothing else does.
    assert np.array_equal(results["simct"][1].numpy(), aligned)
    assert simct["coverage"] == pytest.approx(aligned.sum() / simct["student_tokens"])
    assert simct["chunks_multi"] > 0
    assert shared["coverage"] < simct["coverage"]
    assert results["shared_only"][1].sum() == shared["supervised_tokens"]
