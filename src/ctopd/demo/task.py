"""A synthetic, verifiable reasoning task: multi-step arithmetic word problems.

Every problem is a short story about one person's stock of items that changes two or three times;
the worked solution takes one line per step, worked by place value (tens, then ones, then the
sum), and ends with ``#### answer``, the GSM8K convention, so the answer can be checked exactly::

    Q: Mia has 87 coins. She finds 68, then spends 39. How many coins now?
    A: 87 + 68 = 140 + 15 = 155
       155 - 39 = 120 - 4 = 116
       #### 116

Numbers have two and three digits, so the teacher's tokenizer (one token per digit) and the
student's (groups of up to three) cut each differently where the answer is decided. Why place
value: a model of a few hundred thousand parameters does not learn whole-number addition in a
few thousand CPU steps (under 12% right after 1,400 steps of ``a + b = c``), while every part of
a place-value step is a one-digit fact or a carry (about 90% after 1,000 steps). Everything is
drawn from one ``random.Random(seed)``: the same problems and splits on every machine.
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
    """One word problem: the question (one line), the worked solution (one equation per line,
    then ``#### answer``) and the final number."""

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
    """One step worked by place value: ``87 + 68 = 140 + 15 = 155``, ``155 - 39 = 120 - 4 =
    116``."""
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
    """The five splits; no question appears in two of them."""

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
    and extra validation; each part is the same whatever the later parts' sizes are."""
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
    return [text for problem in problems for text in (problem.question, problem.solution)]
