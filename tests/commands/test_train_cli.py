"""End to end through the real command line: ``ctopd train|sft|eval|plot`` and
``python -m ctopd``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ctopd.cli import main
from tests.training.tiny import build_assets, subprocess_env, tiny_args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return build_assets(tmp_path_factory.mktemp("tiny_cli"))


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_python_dash_m_ctopd_train(tiny, tmp_path):
    out = tmp_path / "runs" / "x"
    command = [
        sys.executable,
        "-m",
        "ctopd",
        "train",
        "--student",
        str(tiny["student"]),
        "--teacher",
        str(tiny["teacher"]),
        "--data",
        str(tiny["prompts"]),
        "--objective",
        "simct",
        "--max-steps",
        "2",
        "--output-dir",
        str(out),
        "--per-device-batch-size",
        "2",
        "--rollout.max-new-tokens",
        "8",
    ]
    result = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done: 2 steps" in result.stdout
    assert [r["step"] for r in _rows(out)] == [1, 2]
    assert (out / "final" / "config.json").is_file() and (out / "config.yaml").is_file()


def test_train_from_yaml_with_flag_overrides(tiny, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "student": {"name_or_path": str(tiny["student"])},
                "teacher": {"name_or_path": str(tiny["teacher"])},
                "data": {"path": str(tiny["prompts"])},
                "objective": {"name": "shared_only"},
                "rollout": {"max_new_tokens": 6, "temperature": 1.0},
                "max_steps": 5,
                "per_device_batch_size": 2,
                "progress": False,
                "output_dir": str(tmp_path / "ignored"),
            }
        )
    )
    out = tmp_path / "run"
    code = main(["train", "--config", str(config), "--max-steps", "1", "--output-dir", str(out)])
    assert code == 0
    assert len(_rows(out)) == 1
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["objective"]["name"] == "shared_only" and saved["max_steps"] == 1
    assert "done: 1 steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--objective", "simtc"], "objective.name must be one of simct"),
        (["--data", "missing.jsonl"], "data file 'missing.jsonl' does not exist"),
        (
            ["--teacher", "./nowhere/teacher"],
            "teacher model folder './nowhere/teacher' does not exist",
        ),
        (["--rollout.top-p", "0"], "rollout.top_p must be in (0, 1]"),
    ],
)
def test_bad_config_exits_2_with_the_message(tiny, tmp_path, capsys, extra, message):
    code = main(["train", *tiny_args(tiny, tmp_path / "out"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_bad_data_row_exits_2_naming_the_line(tiny, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "ok"}\n{"question": "?"}\n')
    code = main(["train", *tiny_args(tiny, tmp_path / "out"), "--data", str(data)])
    assert code == 2
    assert (
        "bad.jsonl, line 2: needs a `messages` list or a non-empty `prompt`"
        in capsys.readouterr().err
    )


def test_sft_eval_and_plot_commands(tiny, tmp_path, capsys):
    out = tmp_path / "sft"
    assert (
        main(
            ["sft", *tiny_args(tiny, out), "--sft.source", "data", "--rollout.max-new-tokens", "64"]
        )
        == 0
    )
    capsys.readouterr()
    predictions = tmp_path / "eval.jsonl"
    assert (
        main(
            [
                "eval",
                "--model",
                str(out / "final"),
                "--data",
                str(tiny["eval"]),
                "--max-new-tokens",
                "4",
                "--batch-size",
                "3",
                "--output",
                str(predictions),
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["num_examples"] == 6 and 0.0 <= result["accuracy"] <= 1.0
    assert len(predictions.read_text().splitlines()) == 6
    assert main(["plot", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "loss.png" in printed and (out / "plots" / "loss.png").is_file()
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--student",
        "--teacher",
        "--data",
        "--objective",
        "--max-steps",
        "--output-dir",
        "--rollout.temperature",
        "--optim.lr",
        "--resume",
        "--chat-template",
        "--lora.enabled",
        "--mixed-precision",
        "--overwrite",
        "--resume-changed",
    ):
        assert flag in text, flag


# --- bad input is one line, before any model loads -------------------------------------------


@pytest.fixture
def no_models(monkeypatch):
    import ctopd.training.loop as loop
    import ctopd.training.sft as sft

    def refuse(*args, **kwargs):
        raise AssertionError("a model loaded before the check")

    for module in (loop, sft):
        monkeypatch.setattr(module, "load_model_tokenizer", refuse)
        monkeypatch.setattr(module, "load_causal_lm", refuse)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_output_dir_under_a_file_or_unwritable(tiny, tmp_path, capsys, no_models):
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    for command in ("train", "sft"):
        assert main([command, *tiny_args(tiny, blocker / "run")]) == 2
        assert _one_line(capsys.readouterr().err) == (
            f"error: output_dir {blocker / 'run'} cannot be created: {blocker} is a file, not a "
            "folder; choose another --output-dir"
        )
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no /sys here to stand for a folder nobody may write")
    assert main(["train", *tiny_args(tiny, Path("/sys/ctopd-run"))]) == 2
    assert _one_line(capsys.readouterr().err).startswith(
        "error: output_dir /sys/ctopd-run is not writable ("
    )


def test_a_second_run_into_a_finished_folder_is_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *tiny_args(tiny, out)]) == 0
    rows = _rows(out)
    capsys.readouterr()
    assert main(["train", *tiny_args(tiny, out), "--max-steps", "1"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {out} already holds a run (config.yaml, metrics.jsonl")
    assert "--resume" in line and "--overwrite" in line
    assert _rows(out) == rows  # the first run's metrics survive


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("data: {data}\n", "error: data must be a mapping, e.g. `data: {{path: {data}}}`; got "),
        ("optim: 3\n", "error: optim must be a mapping, e.g. `optim: {{lr: ...}}`; got 3"),
    ],
)
def test_a_yaml_section_as_a_plain_value_is_one_line(tiny, tmp_path, capsys, yaml_text, message):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text.format(data=tiny["prompts"]))
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--student",
                str(tiny["student"]),
                "--teacher",
                str(tiny["teacher"]),
            ]
        )
        == 2
    )
    assert _one_line(capsys.readouterr().err).startswith(message.format(data=tiny["prompts"]))


def test_lr_1e6_ends_in_one_line_with_exit_1(tiny, tmp_path, capfd):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny_args(
                    tiny,
                    out,
                    "--objective",
                    "dpca",
                    "--optim.lr",
                    "1e6",
                    "--save-every",
                    "1",
                    "--max-steps",
                    "4",
                ),
            ]
        )
        == 1
    )
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(
            "ctopd train: stopped at step 2: the gradient norm is nan, so the step was not applied"
        )
    )


def test_more_bad_inputs_are_one_line(tiny, tmp_path, capsys, monkeypatch, no_models):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *tiny_args(tiny, tmp_path / "a"), "--student", "mystudent"]) == 2
    assert "student model 'mystudent' is neither a local folder nor a hub id" in _one_line(
        capsys.readouterr().err
    )
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    assert main(["sft", *tiny_args(tiny, tmp_path / "b"), "--data", str(latin)]) == 2
    assert "latin1.jsonl, line 1: not UTF-8 text" in _one_line(capsys.readouterr().err)
    assert main(["train", *tiny_args(tiny, tmp_path / "c"), "--resume"]) == 2
    assert "holds no checkpoint to continue from" in _one_line(capsys.readouterr().err)
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"prompt": "What is 2+2?"}\n')
    assert main(["eval", "--model", str(tiny["student"]), "--data", str(questions)]) == 2
    assert "accuracy cannot be scored" in _one_line(capsys.readouterr().err)


def test_plot_skips_a_half_written_last_line(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n{"step": 3, "lo'
    )
    assert main(["plot", str(run)]) == 0
    assert "loss.png" in capsys.readouterr().out
    # A warning (logging prints it to stderr when nothing else is set up, as in `ctopd plot`).
    assert f"{run / 'metrics.jsonl'}, line 3: skipped, not valid JSON" in caplog.text
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    assert main(["plot", str(run)]) == 2
    assert "metrics.jsonl, line 2: not valid JSON" in _one_line(capsys.readouterr().err)
