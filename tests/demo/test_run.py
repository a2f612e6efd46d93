"""``ctopd demo --quick`` end to end: every stage runs and leaves what the README promises."""

import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from ctopd.cli import main
from ctopd.core.pair import TokenizerPair
from ctopd.demo.run import METHODS


def test_quick_demo_writes_report_models_and_data_and_reuses_the_teacher(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--seeds", "2", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| SimCT OPD |" in printed and "training the teacher" in printed

    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["teacher_accuracy"] <= 1.0
    assert 0.0 <= results["student_start_accuracy"] <= 1.0
    assert set(results["methods"]) == set(METHODS)
    for name, row in results["methods"].items():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["seconds"] > 0
        assert row["accuracy_mean"] == sum(r["accuracy"] for r in row["runs"]) / 2
        assert row["accuracy_std"] >= 0.0
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        if name == "sft":
            assert row["coverage"] is None
        else:
            assert 0.0 < row["coverage"] <= 1.0
    # SimCT supervises every aligned student token but each response's first chunk (the demo's
    # student adds a dummy-prefix space, its teacher does not); shared-only also drops the
    # multi-token chunks. DPCA supervises them all.
    simct, shared = (results["methods"][m]["aligned_coverage"] for m in ("simct", "shared_only"))
    assert shared < simct < 1.0
    assert results["methods"]["dpca"]["aligned_coverage"] == 1.0
    assert (out / "curves.png").stat().st_size > 10_000
    assert "| DPCA OPD |" in (out / "results.md").read_text()

    # teacher/ and student/ are plain from_pretrained folders with different tokenizer families.
    teacher_tok = AutoTokenizer.from_pretrained(out / "teacher")
    student_tok = AutoTokenizer.from_pretrained(out / "student")
    assert teacher_tok.chat_template and student_tok.chat_template
    assert not TokenizerPair(teacher_tok, student_tok).identical
    for folder, tokenizer in (("teacher", teacher_tok), ("student", student_tok)):
        model = AutoModelForCausalLM.from_pretrained(out / folder)
        assert model.config.vocab_size >= len(tokenizer)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert rows[0]["messages"][0]["role"] == "user" and "####" in rows[0]["answer"]
    assert (out / "test.jsonl").read_text().count("\n") == results["settings"]["num_test"]

    # A second run reuses the cached teacher and student instead of training them again.
    assert main(["demo", "--quick", "--seeds", "1", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reusing the teacher" in printed and "reusing the student" in printed
    assert "training the teacher" not in printed
    again = json.loads((out / "results.json").read_text())
    assert again["teacher_accuracy"] == results["teacher_accuracy"]
    assert again["seeds"] == 1


def test_demo_rejects_zero_seeds(tmp_path, capsys):
    assert main(["demo", "--quick", "--seeds", "0", "--output-dir", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().out
