"""The free-order task (``research/testbed.py --task-order free``): word problems whose steps
commute, each reference working them in a random order, so that a problem has several right
solutions (2 or 6) and a model that learned the references is unsure which step comes next."""

from __future__ import annotations

import random

from ctopd.demo.task import GAIN_VERBS, ITEMS, LOSS_VERBS, NAMES, PRONOUNS, Problem, worked_step


def free_order_problem(
    rng: random.Random,
    *,
    min_value: int = 10,
    max_value: int = 199,
    min_amount: int = 10,
    max_amount: int = 99,
    steps: tuple[int, ...] = (2, 3),
) -> Problem:
    """One problem whose steps commute: the gains and losses are drawn first, then a start such
    that every subset of them keeps the value in ``[min_value, max_value]`` (so every order of
    the steps is a right solution), and the solution works them in a uniformly random order."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count = rng.choice(tuple(steps))
    while True:
        gains = [rng.random() < 0.5 for _ in range(count)]
        amounts = [rng.randint(min_amount, max_amount) for _ in range(count)]
        lost = sum(amount for amount, gain in zip(amounts, gains) if not gain)
        won = sum(amount for amount, gain in zip(amounts, gains) if gain)
        if min_value + lost <= max_value - won:
            break
    start = rng.randint(min_value + lost, max_value - won)
    clauses = [
        f"{rng.choice(GAIN_VERBS if gain else LOSS_VERBS)} {amount}"
        for amount, gain in zip(amounts, gains)
    ]
    value, equations = start, []
    for index in rng.sample(range(count), count):
        equations.append(worked_step(value, amounts[index], gain=gains[index]))
        value = value + amounts[index] if gains[index] else value - amounts[index]
    story = ", then ".join([", ".join(clauses[:-1]), clauses[-1]] if len(clauses) > 2 else clauses)
    question = f"{name} has {start} {item}. {PRONOUNS[name]} {story}. How many {item} now?"
    solution = "\n".join(equations) + f"\n#### {value}"
    return Problem(question=question, solution=solution, answer=value)
