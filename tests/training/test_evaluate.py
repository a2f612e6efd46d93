"""Final-answer extraction on worked cases, and accuracy on a JSONL test set."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ctopd.training.config import ModelConfig
from ctopd.training.data import DataError
from ctopd.training.evaluate import answers_match, evaluate, extract_answer
from ctopd.training.models import load_model_tokenizer


@pytest.mark.parametrize(
    "text, answer",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
        ("#### $1,234", "1234"),
        ("The total is 5.\n#### 18.00\nThanks", "18"),
        ("so the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("first \\boxed{3} then \\boxed{ 42 }", "42"),
        ("\\boxed{x^{2}+1}", "x^{2}+1"),
        ("She earned $1,250.00 in total.", "1250"),
        ("It dropped to -3.5 degrees, then 7", "7"),
        ("The temperature is -3.50.", "-3.5"),
        ("0.5 of them", "0.5"),
        ("no digits here", None),
        ("", None),
        ("#### \n but 12 later", "12"),
        ("unbalanced \\boxed{4", "4"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_answers_match():
    assert answers_match("72", "72.0") and answers_match("1250", extract_answer("$1,250"))
    assert not answers_match(None, "3") and not answers_match("3", None)
    assert answers_match("\\frac{1}{2}", "\\frac{1}{2}") and not answers_match("x", "y")


class _Oracle(torch.nn.Module):
    """Answers every prompt with fixed response ids (greedy "generation")."""

    def __init__(self, responses: list[list[int]], pad_id: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.responses, self.pad_id, self.calls = responses, pad_id, 0

    def generate(self, input_ids, attention_mask, generation_config, logits_processor=None):
        batch = self.responses[self.calls : self.calls + input_ids.shape[0]]
        self.calls += input_ids.shape[0]
        width = max(len(r) for r in batch)
        out = torch.full((input_ids.shape[0], width), self.pad_id)
        for b, response in enumerate(batch):
            out[b, : len(response)] = torch.tensor(response)
        return torch.cat([input_ids, out], dim=1)


def test_evaluate_scores_and_writes_examples(tiny, tmp_path):
    tokenizer = load_model_tokenizer(ModelConfig(str(tiny["student"])), side="student")
    rows = [json.loads(line) for line in tiny["eval"].read_text().splitlines()]
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    texts = [f"The answer is {r['answer'].split('#### ')[1]}." for r in rows]
    texts[1] = "I think it is 1000."  # one wrong
    texts[2] = "No idea."  # one without an answer
    responses = [tokenizer(t, add_special_tokens=False)["input_ids"] + [end] for t in texts]
    out = tmp_path / "eval.jsonl"
    result = evaluate(
        _Oracle(responses, tokenizer.pad_token_id),
        tokenizer,
        tiny["eval"],
        max_new_tokens=32,
        batch_size=4,
        output_path=out,
    )
    assert result["num_examples"] == 6 and result["correct"] == 4
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["answered"] == pytest.approx(5 / 6)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["correct"] for w in written] == [True, False, False, True, True, True]
    assert written[1]["prediction"] == "1000" and written[2]["prediction"] is None
    assert written[0]["response"] == texts[0] and written[0]["target"] == texts[0][14:-1]


def test_evaluate_a_saved_model_by_path(tiny, tmp_path):
    result = evaluate(
        str(tiny["student"]),
        None,
        tiny["eval"],
        max_new_tokens=4,
        batch_size=3,
        limit=4,
        output_path=tmp_path / "o.jsonl",
    )
    assert result["num_examples"] == 4 and 0.0 <= result["accuracy"] <= 1.0
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 4


def test_data_without_answers_cannot_be_scored(tiny, tmp_path, caplog):
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"prompt": "What is 2+2?"}\n{"prompt": "And 3+3?"}\n')
    with pytest.raises(
        DataError,
        match="questions.jsonl has no `answer` field in any row, so accuracy cannot be scored",
    ):
        evaluate(tiny["student"], data_path=questions)
    some = tmp_path / "some.jsonl"
    some.write_text('{"prompt": "What is 2+2?", "answer": "4"}\n{"prompt": "And 3+3?"}\n')
    with caplog.at_level(logging.WARNING, logger="ctopd.training.evaluate"):
        result = evaluate(tiny["student"], data_path=some, max_new_tokens=2)
    assert result["num_examples"] == 2
    assert "some.jsonl: 1 of 2 rows have no `answer` field; they count as wrong" in caplog.text
