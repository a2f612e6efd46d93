"""Where the demo's final models go wrong, measured on the extra test split.

``ctopd demo`` keeps every final model's greedy responses to the extra test problems
(``runs/<run>-seed<k>/extra_test_responses.jsonl``). This script reads them and files each wrong
answer under the first part of its worked solution that differs from the reference::

    87 + 68 = 140 + 15 = 155      value + amount = tens + ones = result

* ``operand``: the line's first number or its amount is not the reference's (a misread
  question or a wrong carry-over of the previous result), or the operator is;
* ``tens``: the tens part (``140``); ``ones``: the ones part and its sign (``+ 15``);
* ``result``: the sum of the two (``155``), the one step whose number is a single token to the
  student (numbers of up to three digits are one token of its tokenizer) and three to the
  teacher;
* ``final``: every equation right, the ``####`` line wrong; ``length``: the response stops early
  or goes on past the reference; ``format``: a line that is not an equation.

It then prints, per run (summed over seeds, per 1,000 problems), how many problems are wrong by
each part, and for two runs how far their wrong problems overlap: errors of one that the other
also makes are a property of the problems (or of the student's capacity), the rest of the method.

Usage (from the repository root, after a demo run)::

    python research/demo_errors.py --demo-dir ctopd-demo [--json errors.json]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

EQUATION = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+) ([+-]) (\d+) = (\d+)$")
# The parts of an equation line in order, as groups of EQUATION.
PARTS = (("operand", (1, 2, 3)), ("tens", (4,)), ("ones", (5, 6)), ("result", (7,)))
CATEGORIES = ("operand", "tens", "ones", "result", "final", "length", "format")


def first_error(response: str, reference: str) -> str:
    """The category (:data:`CATEGORIES`) of the first part of ``response`` that differs from
    ``reference``, both worked solutions (equation lines, then ``#### answer``).

    Raises:
        ValueError: the two are the same text (not an error).
    """
    got, want = response.strip().splitlines(), reference.strip().splitlines()
    for line, expected in zip(got, want):
        if line.strip() == expected.strip():
            continue
        if expected.startswith("####"):
            return "final"
        found, wanted = EQUATION.match(line.strip()), EQUATION.match(expected.strip())
        if found is None or wanted is None:
            return "format"
        for name, groups in PARTS:
            if any(found.group(g) != wanted.group(g) for g in groups):
                return name
        return "format"  # the same numbers, other spacing
    if len(got) != len(want):
        return "length"
    raise ValueError("the response is the reference solution")


def story_steps(question: str) -> list[tuple[bool, int]]:
    """``(gain, amount)`` of each step of a demo question, in the story's order."""
    from ctopd.demo.task import GAIN_VERBS

    story = question.split(". ", 1)[1].split(". How many")[0].split(" ", 1)[1]
    parts = [part.strip() for part in re.split(r", then |, ", story)]
    return [(part.rsplit(" ", 1)[0] in GAIN_VERBS, int(part.rsplit(" ", 1)[1])) for part in parts]


def reference_in_order(response: str, question: str) -> str:
    """The right worked solution that follows ``response``'s order of the steps (the free-order
    task, where every order is right): each of its lines that applies a step not yet used is
    worked from the true value; at the first line that applies none, the story's next unused
    step (so :func:`first_error` files that line under ``operand``); then ``#### answer``."""
    from ctopd.demo.task import worked_step

    left = story_steps(question)
    value = int(re.search(r"has (\d+)", question).group(1))
    lines = []
    for line in response.strip().splitlines():
        found = EQUATION.match(line.strip())
        step = (found.group(2) == "+", int(found.group(3))) if found else None
        if step not in left:
            break
        left.remove(step)
        lines.append(worked_step(value, step[1], gain=step[0]))
        value += step[1] if step[0] else -step[1]
    for gain, amount in left:
        lines.append(worked_step(value, amount, gain=gain))
        value += amount if gain else -amount
    return "\n".join(lines + [f"#### {value}"])


def run_errors(responses: list[dict], references: list[str], *, free_order: bool = False) -> dict:
    """``{"wrong": [problem indices], "categories": Counter}`` of one run's responses
    (``extra_test_responses.jsonl`` rows, in problem order) against the reference solutions;
    ``free_order``: against the right solution in the response's own order of the steps
    (:func:`reference_in_order`)."""
    wrong, categories = [], Counter()
    for row in responses:
        if row["correct"]:
            continue
        wrong.append(row["index"])
        reference = references[row["index"]]
        if free_order:
            reference = reference_in_order(row["response"], row["messages"][0]["content"])
        try:
            categories[first_error(row["response"], reference)] += 1
        except ValueError:  # the worked solution is right but the answer did not parse
            categories["format"] += 1
    return {"wrong": wrong, "categories": categories}


def collect(demo_dir: Path) -> dict:
    """Per run name, per seed: :func:`run_errors` of every run folder with responses."""
    references = [
        json.loads(line)["answer"]
        for line in (demo_dir / "extra_test.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    results = demo_dir / "results.json"
    settings = (
        json.loads(results.read_text(encoding="utf-8"))["settings"] if results.exists() else {}
    )
    free_order = settings.get("task_order", "fixed") == "free"
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted((demo_dir / "runs").glob("*-seed*/extra_test_responses.jsonl")):
        name, _, seed = path.parent.name.rpartition("-seed")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        runs.setdefault(name, {})[int(seed)] = run_errors(rows, references, free_order=free_order)
    if not runs:
        raise SystemExit(
            f"no runs/*-seed*/extra_test_responses.jsonl under {demo_dir}: run "
            "`ctopd demo` there first (a version that scores the extra test split)"
        )
    return {"problems": len(references), "runs": runs}


def overlap(first: dict[int, dict], second: dict[int, dict]) -> float:
    """Share of ``first``'s wrong (seed, problem) pairs whose problem ``second`` gets wrong at
    some seed."""
    other = {i for run in second.values() for i in run["wrong"]}
    pairs = [i for run in first.values() for i in run["wrong"]]
    return sum(i in other for i in pairs) / len(pairs) if pairs else 0.0


def table(found: dict, pairs: list[tuple[str, str]]) -> str:
    problems, runs = found["problems"], found["runs"]
    lines = [
        "| run | seeds | wrong per 1000 | " + " | ".join(CATEGORIES) + " |",
        "| --- | --- | --- |" + " --- |" * len(CATEGORIES),
    ]
    for name, seeds in runs.items():
        per = 1000.0 / (problems * len(seeds))
        total = sum(len(run["wrong"]) for run in seeds.values()) * per
        counts = sum((run["categories"] for run in seeds.values()), Counter())
        lines.append(
            f"| {name} | {len(seeds)} | {total:.1f} | "
            + " | ".join(f"{counts[c] * per:.1f}" for c in CATEGORIES)
            + " |"
        )
    lines += ["", "| errors of | also wrong (any seed) in | share |", "| --- | --- | --- |"]
    for a, b in pairs:
        if a in runs and b in runs:
            lines.append(f"| {a} | {b} | {overlap(runs[a], runs[b]):.3f} |")
    lines += [
        "",
        f"{problems} extra test problems; each wrong answer counted once, under the "
        "first part of its worked solution that differs from the reference.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=Path("ctopd-demo"))
    parser.add_argument("--json", type=Path, help="also write the counts here")
    args = parser.parse_args(argv)
    found = collect(args.demo_dir)
    pairs = [
        ("simct", "sft"),
        ("sft", "simct"),
        ("dpca", "sft"),
        ("simct", "dpca"),
        ("control_opd", "control_sft"),
        ("simct", "control_opd"),
    ]
    print(table(found, pairs))
    if args.json:
        payload = {
            name: {
                str(seed): {"wrong": run["wrong"], "categories": dict(run["categories"])}
                for seed, run in seeds.items()
            }
            for name, seeds in found["runs"].items()
        }
        args.json.write_text(
            json.dumps({"problems": found["problems"], "runs": payload}, indent=1) + "\n",
            encoding="utf-8",
        )


if __name__ == "__main__":
    main()
