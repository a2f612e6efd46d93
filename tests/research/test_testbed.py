"""``research/testbed.py``: its flags (those ``ctopd demo`` had), refused before anything is
built, and the paired comparisons it adds to a demo's results."""

import ast
from pathlib import Path

import pytest
from testbed import main
from testbed_lib.report import comparisons, comparisons_markdown

REPOSITORY = Path(__file__).resolve().parents[2]


def test_calibrate_is_its_own_run_of_the_control_alone(tmp_path, capsys):
    for extra in (["--sweep"], ["--ablation"], ["--methods", "control_opd"]):
        assert main(["--quick", "--calibrate", *extra, "--output-dir", str(tmp_path)]) == 2
    printed = capsys.readouterr().out
    assert "separate runs; choose one" in printed and "drop --methods" in printed
    assert not (tmp_path / "teacher").exists()  # refused before anything was built


def test_warmup_target_is_a_matched_start_accuracy(tmp_path, capsys):
    out = str(tmp_path)
    assert main(["--quick", "--fixed-warmup", "--warmup-target", "0.7", "--output-dir", out]) == 2
    assert main(["--quick", "--warmup-target", "1.5", "--output-dir", out]) == 2
    assert main(["--quick", "--methods", "simct,opd", "--output-dir", out]) == 2
    printed = capsys.readouterr().out
    assert "drop --fixed-warmup or --warmup-target" in printed
    assert "--warmup-target must be a validation accuracy in [0, 1]; got 1.5" in printed
    assert "unknown method opd" in printed
    assert not (tmp_path / "teacher").exists()


def test_starts_are_either_matched_or_fixed(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--matched-start", "--fixed-warmup", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def _run(name: str, seed: int, outcomes: list[str]) -> dict:
    return {
        "name": name,
        "seed": seed,
        "curve": {"extra_step": [2, 4][: len(outcomes)], "extra_outcomes": outcomes},
        "extra_sampled_outcomes": outcomes[-1],
    }


def test_comparisons_pair_the_runs_at_every_step_and_the_gap_fraction_at_the_last():
    starts = {
        key: {"outcomes": text, "sampled_outcomes": text}
        for key, text in (("teacher", "11111111"), ("student", "10000000"), ("control", "11000000"))
    }
    runs = [
        _run("simct", 0, ["11100000", "11111100"]),
        _run("simct", 1, ["11000000", "11111110"]),
        _run("sft", 0, ["10000000", "11110000"]),
        _run("sft", 1, ["11000000", "11100000"]),
        _run("control_opd", 0, ["11100000", "11110000"]),
        _run("control_sft", 0, ["11000000", "11100000"]),
    ]
    rows = comparisons(starts, runs)
    greedy = [r for r in rows if r["metric"] == "greedy" and r["kind"] == "difference"]
    assert {(r["a"], r["b"], r["step"]) for r in greedy} == {
        (a, b, step)
        for a, b in (("simct", "sft"), ("control_opd", "control_sft"))
        for step in (2, 4)
    }
    last = next(r for r in greedy if (r["a"], r["step"]) == ("simct", 4))
    assert last["value"] == pytest.approx((13 / 16) - (7 / 16))
    assert last["low"] <= last["value"] <= last["high"] and last["problems"] == 8
    fraction = next(r for r in rows if r["kind"] == "gap_fraction" and r["a"] == "simct")
    # simct closes (13/16 - 1/8) / (7/8) of its gap, the control's OPD (4/8 - 2/8) / (6/8).
    assert fraction["value"] == pytest.approx(((13 / 16 - 1 / 8) / (7 / 8)) / ((2 / 8) / (6 / 8)))
    sampled = {(r["kind"], r["a"], r["b"], r["step"]) for r in rows if r["metric"] == "sampled"}
    assert ("difference", "simct", "sft", 4) in sampled and all(s[3] == 4 for s in sampled)
    table = comparisons_markdown({"extra_test": starts, "settings": {}, "comparisons": rows})
    assert "At the end (step 4)" in table and "Accuracy differences by step" in table
    assert comparisons({}, runs) == []


def test_the_package_never_imports_research_and_research_uses_public_names():
    for path in (REPOSITORY / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [alias.name for alias in node.names]
                assert not any(n.split(".")[0] in ("research", "testbed_lib") for n in names), path
    for path in (REPOSITORY / "research").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ctopd"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path} imports private {private} from {node.module}"
