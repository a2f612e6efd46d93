"""A synthetic, verifiable reasoning task: multi-step arithmetic word problems.

Every problem is a short story about one person's stock of items that changes two or three times;
the worked solution takes one line per step, worked by place value (tens, then ones, then the
sum), and ends with ``#### answer``, the GSM8K convention, so the answer can be checked exactly::

    Q: Mia has 87 coins. She finds 68, then spends 39. How many coins now?
    A: 87 + 68 = 140 + 15 = 155
       155 - 39 = 120 - 4 = 116
       #### 116

Values stay between 10 and 199 and amounts between 10 and 99, so numbers have two and three
digits: the teacher's tokenizer (one token per digit, Qwen2 style) and the student's (Llama-3
style groups of up to three digits, so ``140`` is one token) cut every number differently, and the
mismatch falls where the answer is decided. Why place value:
a transformer of a few hundred thousand parameters does not learn whole-number addition from a
few thousand CPU steps (calibrated: under 12% of problems right after 1,400 steps of
``a + b = c``), while every part of a place-value step is a one-digit fact or a carry, and the
same model reaches about 90% in about 1,000 steps. Responses are 40-70 teacher tokens.

Everything is drawn from one ``random.Random(seed)``; the same seed gives the same problems and
the same train / validation / test split on every machine and Python version.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

NAMES = ["Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben", "Eva", "Tom", "Lily", "Noah"]
ITEMS = ["coins", "apples", "stamps", "books", "cards", "shells", "marbles", "pens"]
GAIN_VERBS = ["finds", "buys", "gets", "wins", "receives"]
LOSS_VERBS = ["spends", "sells", "loses", "gives away", "uses"]
PRONOUNS = dict.fromkeys(["Mia", "Ava", "Zoe", "Ivy", "Eva", "Lily"], "She")
PRONOUNS.update(dict.fromkeys(["Leo", "Sam", "Max", "Ben", "Tom", "Noah"], "He"))


@dataclass(frozen=True)
class Problem:
    """One word problem.

    Attributes:
        question: the story and the question, one line.
        solution: the worked solution, one equation per line, then ``#### answer``.
        answer: the final number.
    """

    question: str
    solution: str
    answer: int


def generate_problem(
    rng: random.Random,
    *,
    min_value: int = 10,
    max_value: int = 199,
    min_amount: int = 10,
    max_amount: int = 99,
    steps: tuple[int, ...] = (2, 3),
) -> Problem:
    """Draw one problem; every value stays in ``[min_value, max_value]``, every amount in
    ``[min_amount, max_amount]``, and the number of steps is drawn from ``steps``; the solution
    works the steps in the story's order."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(min_value, max_value)
    clauses, equations = [], []
    for _ in range(rng.choice(tuple(steps))):
        can_gain = value + min_amount <= max_value
        can_lose = value - min_amount >= min_value
        gain = can_gain and (not can_lose or rng.random() < 0.5)
        if gain:
            amount = rng.randint(min_amount, min(max_amount, max_value - value))
        else:
            amount = rng.randint(min_amount, min(max_amount, value - min_value))
        new_value = value + amount if gain else value - amount
        verb = rng.choice(GAIN_VERBS if gain else LOSS_VERBS)
        clauses.append(f"{verb} {amount}")
        equations.append(worked_step(value, amount, gain=gain))
        value = new_value
    story = ", then ".join([", ".join(clauses[:-1]), clauses[-1]] if len(clauses) > 2 else clauses)
    start = equations[0].split(" ")[0]
    question = f"{name} has {start} {item}. {PRONOUNS[name]} {story}. How many {item} now?"
    solution = "\n".join(equations) + f"\n#### {value}"
    return Problem(question=question, solution=solution, answer=value)


def worked_step(value: int, amount: int, *, gain: bool) -> str:
    """One step of the solution, worked by place value: tens first, then ones, then the sum.

    ``87 + 68 = 140 + 15 = 155``; ``155 - 39 = 120 - 4 = 116``. Each part is a one-digit fact
    or a carry, which a tiny model learns far faster than whole-number addition.
    """
    tens = (value // 10 + (amount // 10 if gain else -(amount // 10))) * 10
    ones = value % 10 + (amount % 10 if gain else -(amount % 10))
    result = tens + ones
    sign = "+" if ones >= 0 else "-"
    return f"{value} {'+' if gain else '-'} {amount} = {tens} {sign} {abs(ones)} = {result}"


def generate_problems(count: int, *, seed: int, generator=None, **ranges) -> list[Problem]:
    """``count`` distinct problems (by question text) drawn from ``seed`` by ``generator``
    (a function like :func:`generate_problem`, which is the default)."""
    generator = generator or generate_problem
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    while len(problems) < count:
        problem = generator(rng, **ranges)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


class Splits(NamedTuple):
    """Training, validation, test, extra test and extra validation problems; no question
    appears in two of them."""

    train: list[Problem]
    validation: list[Problem]
    test: list[Problem]
    extra_test: list[Problem] = []
    extra_validation: list[Problem] = []


def make_splits(
    num_train: int,
    num_test: int,
    num_validation: int,
    *,
    seed: int = 0,
    num_extra_test: int = 0,
    num_extra_validation: int = 0,
    **kwargs,
) -> Splits:
    """Distinct problems from ``seed``, cut in order into training, test, validation, extra test
    (a larger held-out set the final models are also scored on) and extra validation (for
    choices 200 problems cannot resolve). Each part is the same whatever the later parts' sizes
    are: adding extra problems changes none of the parts before them."""
    total = num_train + num_test + num_validation
    extra_end = total + num_extra_test
    problems = generate_problems(extra_end + num_extra_validation, seed=seed, **kwargs)
    test_end = num_train + num_test
    return Splits(
        train=problems[:num_train],
        validation=problems[test_end:total],
        test=problems[num_train:test_end],
        extra_test=problems[total:extra_end],
        extra_validation=problems[extra_end:],
    )


def make_split(
    num_train: int, num_test: int, *, seed: int = 0, **kwargs
) -> tuple[list[Problem], list[Problem]]:
    """A fixed train/test split: ``num_train + num_test`` distinct problems from ``seed``, the
    last ``num_test`` held out. No question appears in both parts."""
    splits = make_splits(num_train, num_test, 0, seed=seed, **kwargs)
    return splits.train, splits.test


def to_record(problem: Problem) -> dict:
    """The trainer's data format: a chat prompt plus the reference response in ``answer``."""
    return {"messages": [{"role": "user", "content": problem.question}], "answer": problem.solution}


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> Path:
    """Write problems as JSONL records (:func:`to_record`); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for problem in problems:
            handle.write(json.dumps(to_record(problem)) + "\n")
    return path


def corpus(problems: Iterable[Problem]) -> list[str]:
    """Texts to train the tokenizers on: every question and every solution."""
    texts = []
    for problem in problems:
        texts.extend((problem.question, problem.solution))
    return texts
