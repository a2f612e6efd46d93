"""The free-order task of ``research/testbed.py --task-order free``: steps that commute."""

import re

from testbed_lib.task import free_order_problem

from ctopd.demo.task import generate_problems, worked_step
from ctopd.training.evaluate import extract_answer

STEP = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+) ([+-]) (\d+) = (\d+)$")


def _clauses(question: str) -> list[tuple[bool, int]]:
    """(gain, amount) of each step of a question, in the story's order."""
    from ctopd.demo.task import GAIN_VERBS

    story = question.split(". ", 1)[1].split(". How many")[0].split(" ", 1)[1]
    parts = [part.strip() for part in re.split(r", then |, ", story)]
    return [(part.rsplit(" ", 1)[0] in GAIN_VERBS, int(part.rsplit(" ", 1)[1])) for part in parts]


def test_free_order_steps_commute_and_each_reference_is_one_right_order():
    import itertools

    orders = set()
    for problem in generate_problems(2000, seed=0, generator=free_order_problem):
        start = int(re.search(r"has (\d+)", problem.question).group(1))
        clauses = _clauses(problem.question)
        assert 2 <= len(clauses) <= 3
        # Every order of the steps keeps every value in range and ends at the answer.
        for order in itertools.permutations(clauses):
            value = start
            for gain, amount in order:
                value += amount if gain else -amount
                assert 10 <= value <= 199
            assert value == problem.answer
        # The reference works the story's steps, each once, in some order, correctly.
        *steps, last = problem.solution.split("\n")
        assert extract_answer(last) == str(problem.answer)
        value, worked = start, []
        for line in steps:
            a, op, b, tens, sign, ones, result = STEP.match(line).groups()
            assert int(a) == value
            value = int(result)
            assert value == int(a) + int(b) if op == "+" else value == int(a) - int(b)
            assert line == worked_step(int(a), int(b), gain=op == "+")
            worked.append((op == "+", int(b)))
        assert sorted(worked) == sorted(clauses)
        orders.add(
            tuple(clauses.index(step) for step in worked)
            if len(set(clauses)) == len(clauses)
            else None
        )
    # Every order of three distinct steps occurs among the references.
    assert set(itertools.permutations(range(3))) <= orders


def test_the_free_order_task_is_the_demo_task_with_another_generator():
    import dataclasses

    import pytest
    from testbed_lib.settings import FULL

    free = dataclasses.replace(FULL, task_order="free")
    assert free.task_ranges()["generator"] is free_order_problem
    assert "generator" not in FULL.task_ranges()
    assert free.teacher_stamp()["task_order"] == "free"
    assert "task_order" not in FULL.teacher_stamp()  # cached fixed-order teachers stay valid
    with pytest.raises(ValueError, match="task_order must be fixed or free"):
        dataclasses.replace(FULL, task_order="random")
    assert generate_problems(50, seed=1) != generate_problems(
        50, seed=1, generator=free_order_problem
    )
