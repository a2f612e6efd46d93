"""The demo's synthetic task: seeded, correct, split without overlap."""

import json
import random
import re

from ctopd.demo.task import (
    corpus,
    generate_problem,
    generate_problems,
    make_splits,
    worked_step,
    write_jsonl,
)
from ctopd.training.evaluate import extract_answer

STEP = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+) ([+-]) (\d+) = (\d+)$")


def test_same_seed_same_problems_other_seed_others():
    assert generate_problems(50, seed=3) == generate_problems(50, seed=3)
    assert generate_problems(50, seed=3) != generate_problems(50, seed=4)


def test_every_step_and_answer_is_correct():
    for problem in generate_problems(2000, seed=0):
        *steps, last = problem.solution.split("\n")
        assert 2 <= len(steps) <= 3
        numbers = [int(n) for n in re.findall(r"\d+", problem.question)]
        value = numbers[0]
        for line, amount in zip(steps, numbers[1:]):
            a, op, b, tens, sign, ones, result = STEP.match(line).groups()
            assert int(a) == value and int(b) == amount
            expected = value + amount if op == "+" else value - amount
            assert int(result) == expected
            assert int(tens) % 10 == 0 and int(ones) <= 18
            assert int(tens) + (int(ones) if sign == "+" else -int(ones)) == expected
            assert 10 <= expected <= 199 and 10 <= amount <= 99
            value = expected
        assert last == f"#### {value}" and problem.answer == value
        assert extract_answer(problem.solution) == str(value)


def test_numbers_have_two_and_three_digits():
    digits = {
        len(n) for p in generate_problems(500, seed=1) for n in re.findall(r"\d+", p.solution)
    }
    assert {2, 3} <= digits


def test_worked_step_by_place_value():
    assert worked_step(87, 68, gain=True) == "87 + 68 = 140 + 15 = 155"
    assert worked_step(155, 39, gain=False) == "155 - 39 = 120 - 4 = 116"
    assert worked_step(58, 21, gain=False) == "58 - 21 = 30 + 7 = 37"


def test_generate_problem_respects_ranges():
    rng = random.Random(0)
    for _ in range(300):
        problem = generate_problem(
            rng, min_value=100, max_value=999, min_amount=100, max_amount=499
        )
        assert 100 <= problem.answer <= 999


def test_split_is_fixed_and_disjoint():
    splits = make_splits(300, 50, 0, seed=0)
    train, test = splits.train, splits.test
    assert len(train) == 300 and len(test) == 50
    assert not {p.question for p in train} & {p.question for p in test}
    assert make_splits(300, 50, 0, seed=0) == splits


def test_validation_test_and_training_splits_share_no_question():
    splits = make_splits(400, 60, 70, seed=0, num_extra_test=90)
    questions = [{p.question for p in part} for part in splits]
    # train, validation, test, extra test, extra validation; no repeats within or across them
    assert [len(q) for q in questions] == [400, 70, 60, 90, 0]  # no extra validation asked
    for i, first in enumerate(questions):
        for second in questions[i + 1 :]:
            assert not first & second
    # Adding a validation split leaves the training and test problems as they were; adding
    # extra test problems leaves all three as they were.
    no_validation = make_splits(400, 60, 0, seed=0)
    assert (no_validation.train, no_validation.test) == (splits.train, splits.test)
    without = make_splits(400, 60, 70, seed=0)
    assert without.extra_test == [] and without.extra_validation == []
    assert (without.train, without.validation, without.test) == splits[:3]
    # Extra validation problems come last: every other part stays as it was, none shared.
    more = make_splits(400, 60, 70, seed=0, num_extra_test=90, num_extra_validation=80)
    assert more[:4] == splits[:4] and len(more.extra_validation) == 80
    earlier = set().union(*({p.question for p in part} for part in more[:4]))
    assert len({p.question for p in more.extra_validation} - earlier) == 80


def test_demo_folders_hold_disjoint_splits(tmp_path):
    from ctopd.demo.settings import QUICK
    from ctopd.demo.stages import prepare_data

    prepare_data(tmp_path, QUICK)
    rows = {
        name: [
            json.loads(line)["messages"][0]["content"]
            for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()
        ]
        for name in ("train", "validation", "test", "extra_test", "extra_validation")
    }
    assert [len(rows[n]) for n in rows] == [
        QUICK.num_train,
        QUICK.num_validation,
        QUICK.num_test,
        QUICK.num_extra_test,
        QUICK.num_extra_validation,
    ]
    assert len(set().union(*rows.values())) == sum(len(r) for r in rows.values())  # disjoint


def test_jsonl_is_the_trainer_format(tmp_path):
    from ctopd.training.config import DataConfig
    from ctopd.training.data import load_examples

    problems = generate_problems(5, seed=0)
    path = write_jsonl(problems, tmp_path / "data" / "train.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == {
        "messages": [{"role": "user", "content": problems[0].question}],
        "answer": problems[0].solution,
    }
    examples = load_examples(DataConfig(path=str(path)))
    assert [e.response for e in examples] == [p.solution for p in problems]
    assert len(corpus(problems)) == 10
