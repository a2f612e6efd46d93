"""The SFT baseline: responses from the data file or sampled by the teacher."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ctopd.training.config import load_config
from ctopd.training.data import DataError
from ctopd.training.sft import run_sft
from tests.training.tiny import final_weights, tiny_args, write_jsonl


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_from_reference_answers_learns(tiny, tmp_path):
    out = tmp_path / "sft"
    summary = run_sft(
        load_config(
            tiny_args(
                tiny,
                out,
                "--max-steps",
                "12",
                "--optim.lr",
                "3e-3",
                "--optim.warmup-ratio",
                "0",
                "--optim.schedule",
                "constant",
                "--sft.source",
                "data",
                "--rollout.max-new-tokens",
                "64",
                "--eval-data",
                str(tiny["eval"]),
                "--eval-max-new-tokens",
                "4",
            )
        )
    )
    rows = _rows(out)
    assert len(rows) == 12 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # cross-entropy on the answers goes down
    assert "eval_accuracy" in rows[-1]
    assert summary["num_examples"] == 40 and summary["truncated_responses"] == 0
    assert (out / "final" / "model.safetensors").is_file()


def test_sft_from_teacher_samples(tiny, tmp_path):
    out = tmp_path / "sft"
    summary = run_sft(
        load_config(
            tiny_args(
                tiny,
                out,
                "--sft.source",
                "teacher",
                "--data.limit",
                "6",
                "--rollout.samples-per-prompt",
                "2",
                "--max-steps",
                "2",
            )
        )
    )
    cached = [
        json.loads(line) for line in (out / "teacher_responses.jsonl").read_text().splitlines()
    ]
    assert len(cached) == 12 and [r["index"] for r in cached[:4]] == [0, 0, 1, 1]
    assert summary["num_examples"] == 12
    before = final_weights(out)
    # A second run (--overwrite) keeps and reuses the cached teacher samples: edited here, they
    # are what it trains on.
    cache = out / "teacher_responses.jsonl"
    cache.write_text(
        "".join(json.dumps({**row, "response": "Sam has 7 coins. #### 7"}) + "\n" for row in cached)
    )
    summary = run_sft(
        load_config(
            tiny_args(
                tiny,
                out,
                "--sft.source",
                "teacher",
                "--data.limit",
                "6",
                "--rollout.samples-per-prompt",
                "2",
                "--max-steps",
                "2",
                "--overwrite",
            )
        )
    )
    assert "#### 7" in cache.read_text() and summary["steps"] == 2
    after = final_weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_sft_without_responses_names_the_row(tiny, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    config = load_config(tiny_args(tiny, tmp_path / "out", "--data", str(path)))
    with pytest.raises(
        DataError,
        match=r"row 2 of the data has no response text "
        r"\(looked in response, answer\)",
    ):
        run_sft(config)


def test_sft_warns_when_responses_are_cut(tiny, tmp_path, capsys):
    out = tmp_path / "sft"
    summary = run_sft(
        load_config(tiny_args(tiny, out, "--max-steps", "1", "--rollout.max-new-tokens", "6"))
    )
    cut = summary["truncated_responses"]
    assert cut > 0
    assert (
        f"ctopd sft: warning: {cut} of 40 responses are longer than rollout.max_new_tokens "
        "(6 tokens) and are cut there, without their end-of-turn token; raise "
        "--rollout.max-new-tokens to train on them whole"
    ) in capsys.readouterr().err
