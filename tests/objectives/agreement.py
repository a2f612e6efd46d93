"""Two models that agree on every text, with different tokenizers (docs/concepts/simct.md).

A ground-truth distribution over short texts (a seeded character-level Markov chain with an end
symbol, texts of at most ``max_length`` characters) is enumerated exactly. Each tokenizer's
model is the exact next-token distribution of that text distribution under the tokenizer's
*canonical* tokenisation: ``p(v | prefix) = P(texts whose tokens extend prefix + v) / P(texts
whose tokens extend prefix)``, the end token taking the texts whose tokens are exactly the
prefix. Their logs, used as logits on texts sampled from the ground truth, are two models that
assign the same probability to every text whatever their tokenizers.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from ctopd.core.pair import TokenizerPair
from ctopd.training.rollout import pad_responses

# Log-probability given to tokens the canonical tokenisation never writes after a prefix.
IMPOSSIBLE = math.log(1e-15)


@dataclass
class TextDistribution:
    """Every text of the ground truth with its probability."""

    texts: list[str]
    probs: np.ndarray

    def sample(self, count: int, seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        return [self.texts[i] for i in rng.choice(len(self.texts), size=count, p=self.probs)]


def markov_texts(
    alphabet: str, *, max_length: int, seed: int, end_prob: float = 0.2
) -> TextDistribution:
    """All texts of 1..``max_length`` characters of a random Markov chain (normalised)."""
    rng = np.random.default_rng(seed)
    size = len(alphabet)
    start = rng.dirichlet(np.ones(size))
    moves = rng.dirichlet(np.full(size, 0.7), size=size)
    texts, probs = [], []
    for length in range(1, max_length + 1):
        for letters in itertools.product(range(size), repeat=length):
            p = start[letters[0]]
            for a, b in itertools.pairwise(letters):
                p *= (1 - end_prob) * moves[a, b]
            p *= end_prob if length < max_length else 1.0
            texts.append("".join(alphabet[i] for i in letters))
            probs.append(p)
    probs = np.asarray(probs)
    return TextDistribution(texts=texts, probs=probs / probs.sum())


class CanonicalModel:
    """The exact canonical next-token distribution of a text distribution under one tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer.
        end_id: the id that ends a response.
        distribution: the texts and their probabilities.
    """

    def __init__(self, tokenizer, end_id: int, distribution: TextDistribution) -> None:
        self.vocab_size = len(tokenizer)
        self.end_id = end_id
        encoded = tokenizer(distribution.texts, add_special_tokens=False)["input_ids"]
        self.encoding = dict(zip(distribution.texts, encoded, strict=True))
        mass: dict[tuple, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        for ids, p in zip(encoded, distribution.probs, strict=True):
            for i in range(len(ids) + 1):
                mass[tuple(ids[:i])][ids[i] if i < len(ids) else end_id] += float(p)
        self.mass = mass

    def logits(self, ids: list[int]) -> torch.Tensor:
        """float64 ``[len(ids), V]``: row ``i`` is ``log p(· | ids[:i])``."""
        rows = torch.full((len(ids), self.vocab_size), IMPOSSIBLE, dtype=torch.float64)
        for i in range(len(ids)):
            following = self.mass.get(tuple(ids[:i]))
            if not following:
                continue
            total = sum(following.values())
            for token, p in following.items():
                rows[i, token] = math.log(p / total)
        return torch.log_softmax(rows, dim=-1)


@dataclass
class AgreementBatch:
    """Teacher and student logits on sampled texts, with everything an objective needs."""

    pair: TokenizerPair
    texts: list[str]
    student_responses: list[list[int]]
    teacher_responses: list[list[int]]
    alignments: list
    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor


def agreement_batch(
    pair: TokenizerPair, distribution: TextDistribution, texts: list[str]
) -> AgreementBatch:
    """Score ``texts`` (each ended with the end token) with both canonical models."""
    t_end = int(pair.teacher_table.end_ids[0])
    s_end = int(pair.student_table.end_ids[0])
    teacher_model = CanonicalModel(pair.teacher_tokenizer, t_end, distribution)
    student_model = CanonicalModel(pair.student_tokenizer, s_end, distribution)
    student_responses = [student_model.encoding[t] + [s_end] for t in texts]
    teacher_responses = pair.teacher_ids_for_batch(student_responses)
    alignments = pair.align_batch(teacher_responses, student_responses)
    student_ids, _ = pad_responses(student_responses)
    teacher_ids, _ = pad_responses(teacher_responses, pad_id=-1)
    s_logits = torch.full(
        (len(texts), student_ids.shape[1], student_model.vocab_size),
        IMPOSSIBLE,
        dtype=torch.float64,
    )
    t_logits = torch.full(
        (len(texts), teacher_ids.shape[1], teacher_model.vocab_size),
        IMPOSSIBLE,
        dtype=torch.float64,
    )
    for b, (s, t) in enumerate(zip(student_responses, teacher_responses, strict=True)):
        s_logits[b, : len(s)] = student_model.logits(s)
        t_logits[b, : len(t)] = teacher_model.logits(t)
    return AgreementBatch(
        pair=pair,
        texts=texts,
        student_responses=student_responses,
        teacher_responses=teacher_responses,
        alignments=alignments,
        student_ids=student_ids,
        teacher_ids=teacher_ids,
        student_logits=s_logits.requires_grad_(),
        teacher_logits=t_logits,
    )
