"""``ctopd demo --quick`` end to end: every stage runs and leaves what the README promises."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from ctopd.cli import main
from ctopd.core.pair import TokenizerPair
from ctopd.demo.settings import CROSS_METHODS, QUICK

COMMON_FIELDS = (
    "accuracy",
    "accuracy_mean",
    "accuracy_std",
    "gap_closed",
    "kl",
    "coverage",
    "aligned_coverage",
    "noncanonical",
    "seconds",
    "lr",
    "runs",
)


@pytest.mark.slow
def test_quick_demo_writes_report_models_and_data_and_reuses_the_teacher(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--seeds", "2", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| SimCT OPD |" in printed and "training the teacher" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["warmup_target"] == 0.0  # the matched start is the default
    assert 0.0 <= results["teacher_accuracy"] <= 1.0
    assert 0.0 <= results["student_start_accuracy"] <= 1.0
    assert set(results["methods"]) == set(CROSS_METHODS)
    for name, row in results["methods"].items():
        assert set(COMMON_FIELDS) <= set(row)
        assert 0.0 <= row["accuracy"] <= 1.0 and row["seconds"] > 0
        assert row["accuracy_mean"] == sum(r["accuracy"] for r in row["runs"]) / 2
        assert row["accuracy_std"] >= 0.0
        assert row["lr"] == QUICK.lr(name)
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        if name == "sft":
            assert row["coverage"] is None
        else:
            assert 0.0 < row["coverage"] <= 1.0
        # The common KL curve: step 0 (the warmed-up student) and every checkpoint.
        steps = row["runs"][0]["curve"]["step"]
        assert steps == list(range(0, QUICK.method_steps + 1, QUICK.eval_every))
        assert row["runs"][0]["curve"]["kl"][0] == results["student_start_kl"]
    # SimCT's text events supervise every aligned student token, the first position included
    # (the demo's student adds a dummy-prefix space, its teacher does not); shared-only drops
    # the multi-token chunks. DPCA supervises them all.
    simct, shared = (results["methods"][m]["aligned_coverage"] for m in ("simct", "shared_only"))
    assert shared < simct == 1.0
    assert results["methods"]["dpca"]["aligned_coverage"] == 1.0

    # The same-tokenizer control: its own start, OPD and continued SFT with the same fields.
    controls = results["controls"]
    assert 0.0 <= controls["student_start_accuracy"] <= 1.0
    for name in ("opd", "sft"):
        assert set(COMMON_FIELDS) <= set(controls[name])
        assert [r["student"] for r in controls[name]["runs"]] == ["control", "control"]
        assert controls[name]["runs"][0]["curve"]["kl"][0] == controls["student_start_kl"]
    assert controls["opd"]["aligned_coverage"] == 1.0  # identical tokenizers: every token

    # Every final model and every start is also scored, problem by problem, on the extra test
    # split (research/testbed.py compares runs there, paired, with intervals).
    extra = results["extra_test"]
    assert set(extra) == {"teacher", "student", "control"}
    for row in extra.values():
        assert len(row["outcomes"]) == QUICK.num_extra_test
        assert row["accuracy"] == row["outcomes"].count("1") / QUICK.num_extra_test
    for row in [*results["methods"].values(), controls["opd"], controls["sft"]]:
        for run in row["runs"]:
            assert len(run["extra_outcomes"]) == QUICK.num_extra_test
            assert run["extra_accuracy"] == run["extra_outcomes"].count("1") / QUICK.num_extra_test
        assert row["extra_accuracy_mean"] == sum(r["extra_accuracy"] for r in row["runs"]) / 2
    # Each demo run keeps its final model, loadable as it is, and none of its checkpoints.
    for run in ("simct-seed0", "control_opd-seed1", "sft-seed0"):
        kept = out / "runs" / run / "final"
        assert AutoModelForCausalLM.from_pretrained(kept).config.vocab_size >= len(
            AutoTokenizer.from_pretrained(kept)
        )
        assert not list((out / "runs" / run).glob("checkpoint-*"))
    responses = (out / "runs" / "simct-seed0" / "extra_test_responses.jsonl").read_text()
    assert responses.count("\n") == QUICK.num_extra_test
    final = QUICK.method_steps
    for run in results["methods"]["simct"]["runs"]:  # every checkpoint, the last as above
        assert run["curve"]["extra_step"] == list(
            range(QUICK.eval_every, final + 1, QUICK.eval_every)
        )
        assert run["curve"]["extra_outcomes"][-1] == run["extra_outcomes"]
    report = (out / "results.md").read_text()
    assert "On 24 more held-out problems" in report and "comparisons" not in results

    # Sampled accuracy beside the greedy one: one response per problem at temperature 1 for
    # every start and final model.
    for row in extra.values():
        assert len(row["sampled_outcomes"]) == QUICK.num_extra_test
        assert row["sampled_accuracy"] == row["sampled_outcomes"].count("1") / QUICK.num_extra_test
    for row in [*results["methods"].values(), controls["opd"], controls["sft"]]:
        for run in row["runs"]:
            assert len(run["extra_sampled_outcomes"]) == QUICK.num_extra_test
        assert row["extra_sampled_accuracy_mean"] == pytest.approx(
            sum(r["extra_sampled_accuracy"] for r in row["runs"]) / 2
        )
    sampled_responses = out / "runs" / "simct-seed0" / "extra_test_sampled_responses.jsonl"
    assert sampled_responses.read_text().count("\n") == QUICK.num_extra_test
    assert "sampled accuracy (T = 1)" in report
    assert set(results["stages"]) == {"teacher", "samples", "students", "methods"}
    assert "| same-tokenizer OPD |" in printed
    assert (out / "curves.png").stat().st_size > 10_000
    assert "| DPCA OPD |" in (out / "results.md").read_text()

    # teacher/, student/ and control/ are plain from_pretrained folders; the control speaks the
    # teacher's tokenizer, the student another family.
    teacher_tok = AutoTokenizer.from_pretrained(out / "teacher")
    student_tok = AutoTokenizer.from_pretrained(out / "student")
    control_tok = AutoTokenizer.from_pretrained(out / "control")
    assert teacher_tok.chat_template and student_tok.chat_template
    assert not TokenizerPair(teacher_tok, student_tok).identical
    assert TokenizerPair(teacher_tok, control_tok).identical
    for folder, tokenizer in (
        ("teacher", teacher_tok),
        ("student", student_tok),
        ("control", control_tok),
    ):
        model = AutoModelForCausalLM.from_pretrained(out / folder)
        assert model.config.vocab_size >= len(tokenizer)
    student_model = AutoModelForCausalLM.from_pretrained(out / "student")
    control_model = AutoModelForCausalLM.from_pretrained(out / "control")
    assert student_model.config.num_hidden_layers == control_model.config.num_hidden_layers
    assert student_model.config.hidden_size == control_model.config.hidden_size
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert rows[0]["messages"][0]["role"] == "user" and "####" in rows[0]["answer"]
    assert (out / "test.jsonl").read_text().count("\n") == results["settings"]["num_test"]

    # A second run reuses the cached teacher, samples and students; --methods runs a subset.
    assert (
        main(
            [
                "demo",
                "--quick",
                "--seeds",
                "1",
                "--methods",
                "dpca,control_opd",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "reusing the teacher" in printed and "reusing the cross-tokenizer student" in printed
    assert "reusing the same-tokenizer control" in printed
    assert "training the teacher" not in printed and "sampling the teacher" not in printed
    again = json.loads((out / "results.json").read_text())
    assert again["teacher_accuracy"] == results["teacher_accuracy"]
    assert again["student_start_accuracy"] == results["student_start_accuracy"]
    assert again["seeds"] == 1
    assert set(again["methods"]) == {"dpca"} and "opd" in again["controls"]
    assert "sft" not in again["controls"]


def test_demo_rejects_unknown_methods(tmp_path, capsys):
    assert main(["demo", "--quick", "--methods", "simct,opd", "--output-dir", str(tmp_path)]) == 2
    assert "unknown method opd" in capsys.readouterr().out


def test_demo_rejects_zero_seeds(tmp_path, capsys):
    assert main(["demo", "--quick", "--seeds", "0", "--output-dir", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_matched_start_stops_each_warm_up_at_its_first_checkpoint_at_target(tmp_path):
    from ctopd.demo.run import run_demo

    settings = QUICK
    out = tmp_path / "matched"
    results = run_demo(
        out,
        quick=True,
        seeds=1,
        methods=("simct", "control_opd"),
        log=lambda line: None,
    )
    # Target 0 in quick mode: the first checkpoint reaches it, for both students.
    first = settings.warmup_check_every
    assert results["warmup_steps"] == {"student": first, "control": first}
    for kind in ("student", "control"):
        ((step, accuracy),) = results["warmup_curves"][kind]
        assert step == first and 0.0 <= accuracy <= 1.0
        stamp = json.loads((out / kind / "demo.json").read_text())
        assert stamp["settings"]["warmup_target"] == 0.0
        assert stamp["result"]["warmup_steps"] == first
    assert results["settings"]["warmup_target"] == 0.0
    assert "Matched start" in (out / "results.md").read_text()


def test_teacher_trains_in_rounds_until_its_validation_target(tmp_path):
    import dataclasses

    import yaml

    from ctopd.demo.stages import build_teacher, prepare_data

    lines = []
    # A target the tiny quick teacher cannot reach: every round runs, and the log says so.
    settings = dataclasses.replace(QUICK, teacher_target=1.0, teacher_rounds=2)
    prepare_data(tmp_path, settings)
    result = build_teacher(tmp_path, settings, force=False, log=lines.append)
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert result["validation_accuracy"] == result["rounds"][-1]["validation_accuracy"] < 1.0
    assert any("short of 1" in line for line in lines)
    for run in ("teacher", "teacher-round2"):  # each round's metrics kept, its weights not
        assert (tmp_path / "runs" / run / "metrics.jsonl").is_file()
        assert not (tmp_path / "runs" / run / "final").exists()
    round2 = yaml.safe_load((tmp_path / "runs" / "teacher-round2" / "config.yaml").read_text())
    assert round2["seed"] == settings.task_seed + 1  # its own data order
    assert round2["student"]["name_or_path"] == str(tmp_path / "runs" / "teacher" / "final")
    # A reachable target stops after the first round.
    reached = dataclasses.replace(QUICK, teacher_target=0.0, teacher_rounds=3)
    prepare_data(tmp_path / "reached", reached)
    result = build_teacher(tmp_path / "reached", reached, force=False, log=lines.append)
    assert [r["round"] for r in result["rounds"]] == [1]
    assert not (tmp_path / "reached" / "runs" / "teacher-round2").exists()


def test_sampled_outcomes_are_seeded_and_need_a_temperature(tmp_path):
    """One sampled response per problem: the same seed gives the same outcomes, and a model
    that is unsure of its tokens samples other responses than its greedy ones."""
    import dataclasses

    from ctopd.demo.measure import outcomes
    from ctopd.demo.task import make_splits, write_jsonl
    from ctopd.testing import tiny_causal_lm, train_byte_level_bpe

    splits = make_splits(200, 12, 0, seed=0)
    train, test = splits.train, splits.test
    texts = [t for p in train for t in (p.question, p.solution)]
    tokenizer = train_byte_level_bpe(texts, 300, split_digits=True)
    model = tiny_causal_lm(
        tokenizer, hidden_size=16, num_layers=1, num_heads=2, max_positions=256, seed=0
    )  # untrained: near-uniform next tokens
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = write_jsonl(test, tmp_path / "test.jsonl")
    settings = dataclasses.replace(QUICK, max_new_tokens=12)
    first = outcomes(tmp_path / "model", data, settings, tmp_path / "a.jsonl", sampled=True)
    again = outcomes(tmp_path / "model", data, settings, tmp_path / "b.jsonl", sampled=True)
    outcomes(tmp_path / "model", data, settings, tmp_path / "greedy.jsonl")
    assert first == again and len(first) == 12
    read = [
        [json.loads(line)["response"] for line in (tmp_path / name).open()]
        for name in ("a.jsonl", "b.jsonl", "greedy.jsonl")
    ]
    assert read[0] == read[1] and read[0] != read[2]
    reseeded = dataclasses.replace(settings, sampled_seed=1)
    outcomes(tmp_path / "model", data, reseeded, tmp_path / "c.jsonl", sampled=True)
    assert [json.loads(line)["response"] for line in (tmp_path / "c.jsonl").open()] != read[0]
    with pytest.raises(ValueError, match="sampled_temperature"):
        outcomes(
            tmp_path / "model",
            data,
            dataclasses.replace(settings, sampled_temperature=None),
            sampled=True,
        )
