"""End to end through the real command line: ``ctopd train|sft|eval|plot`` and
``python -m ctopd``."""

from __future__ import annotations

import json
import subprocess
import sys

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
    command = [sys.executable, "-m", "ctopd", "train", "--student", str(tiny["student"]),
               "--teacher", str(tiny["teacher"]), "--data", str(tiny["prompts"]),
               "--objective", "simct", "--max-steps", "2", "--output-dir", str(out),
               "--per-device-batch-size", "2", "--rollout.max-new-tokens", "8"]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done: 2 steps" in result.stdout
    assert [r["step"] for r in _rows(out)] == [1, 2]
    assert (out / "final" / "config.json").is_file() and (out / "config.yaml").is_file()


def test_train_from_yaml_with_flag_overrides(tiny, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "student": {"name_or_path": str(tiny["student"])},
        "teacher": {"name_or_path": str(tiny["teacher"])},
        "data": {"path": str(tiny["prompts"])},
        "objective": {"name": "shared_only"},
        "rollout": {"max_new_tokens": 6, "temperature": 1.0},
        "max_steps": 5, "per_device_batch_size": 2, "progress": False,
        "output_dir": str(tmp_path / "ignored"),
    }))
    out = tmp_path / "run"
    code = main(["train", "--config", str(config), "--max-steps", "1", "--output-dir", str(out)])
    assert code == 0
    assert len(_rows(out)) == 1
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["objective"]["name"] == "shared_only" and saved["max_steps"] == 1
    assert "done: 1 steps" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--objective", "simtc"], "objective.name must be one of simct"),
    (["--data", "missing.jsonl"], "data file 'missing.jsonl' does not exist"),
    (["--teacher", "./nowhere/teacher"], "teacher model folder './nowhere/teacher' does not exist"),
    (["--rollout.top-p", "0"], "rollout.top_p must be in (0, 1]"),
])
def test_bad_config_exits_2_with_the_message(tiny, tmp_path, capsys, extra, message):
    code = main(["train", *tiny_args(tiny, tmp_path / "out"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_bad_data_row_exits_2_naming_the_line(tiny, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "ok"}\n{"question": "?"}\n')
    code = main(["train", *tiny_args(tiny, tmp_path / "out"), "--data", str(data)])
    assert code == 2
    assert "bad.jsonl, line 2: needs a `messages` list or a non-empty `prompt`" in \
        capsys.readouterr().err


def test_sft_eval_and_plot_commands(tiny, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(["sft", *tiny_args(tiny, out), "--sft.source", "data",
                 "--rollout.max-new-tokens", "64"]) == 0
    capsys.readouterr()
    predictions = tmp_path / "eval.jsonl"
    assert main(["eval", "--model", str(out / "final"), "--data", str(tiny["eval"]),
                 "--max-new-tokens", "4", "--batch-size", "3", "--output", str(predictions)]) == 0
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
    for flag in ("--student", "--teacher", "--data", "--objective", "--max-steps",
                 "--output-dir", "--rollout.temperature", "--optim.lr", "--resume",
                 "--chat-template", "--lora.enabled", "--mixed-precision"):
        assert flag in text, flag
