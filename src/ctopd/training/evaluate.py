"""Answer accuracy on a JSONL test set: greedy generation, final-answer extraction, exact match.

The final answer of a text is, in order of preference: what follows the last ``####`` (GSM8K), the
content of the last ``\\boxed{...}`` (MATH), or the last number in the text. Numbers are compared
as numbers (``1,234``, ``$1234`` and ``1234.0`` are the same answer); other answers are compared
as strings with spaces removed.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch

from ctopd.core.byte_table import end_of_turn_ids
from ctopd.training.config import DataConfig, ModelConfig
from ctopd.training.data import DataError, encode_prompts, load_examples
from ctopd.training.rollout import count_token_ids, sample_responses

logger = logging.getLogger(__name__)

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None  # unbalanced: no answer


def normalize_answer(answer: str) -> str:
    """Canonical form: numbers without ``$``, commas, units or trailing zeros; other text with
    spaces, ``$`` and a trailing period removed."""
    text = answer.strip().replace("$", "").replace("\\!", "").strip().rstrip(".").strip()
    text = re.sub(r"\\text\{[^}]*\}", "", text).strip()
    numbers = _NUMBER.findall(text)
    if len(numbers) == 1 and _NUMBER.fullmatch(text.replace(" ", "").rstrip("%")):
        value = float(numbers[0].replace(",", ""))
        return str(int(value)) if value.is_integer() else repr(value)
    return text.replace(" ", "")


def extract_answer(text: str) -> str | None:
    """The final answer of a model response or reference solution, normalised.

    Examples:
        >>> extract_answer("48/2 = 24 clips in May.\\n#### 72")
        '72'
        >>> extract_answer("so the answer is $\\\\boxed{\\\\frac{1}{2}}$")
        '\\\\frac{1}{2}'
        >>> extract_answer("She earned $1,250.00 in total.")
        '1250'
        >>> extract_answer("no idea") is None
        True
    """
    if text is None:
        return None
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().splitlines()
        if tail and tail[0].strip():
            first = tail[0].strip()
            number = _NUMBER.search(first)
            return normalize_answer(number.group(0) if number else first)
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return normalize_answer(boxed)
    numbers = _NUMBER.findall(text)
    if numbers:
        return normalize_answer(numbers[-1])
    return None


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Both present and equal after normalisation (numbers compared as numbers)."""
    if predicted is None or reference is None:
        return False
    try:
        return abs(float(predicted) - float(reference)) < 1e-6
    except ValueError:
        return predicted == reference


def _load(model_path_or_model: Any, tokenizer: Any, chat_template: str | None, dtype: str):
    from ctopd.training.models import load_causal_lm, load_model_tokenizer

    model = model_path_or_model
    if isinstance(model, (str, Path)):
        model = load_causal_lm(ModelConfig(name_or_path=str(model), dtype=dtype), side="model")
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        source = tokenizer or model_path_or_model
        if not isinstance(source, (str, Path)):
            raise ValueError("evaluate needs a tokenizer (or a model path to load it from)")
        tokenizer = load_model_tokenizer(
            ModelConfig(name_or_path=str(source), chat_template=chat_template), side="model"
        )
    elif chat_template:
        from ctopd.training.data import set_chat_template

        set_chat_template(tokenizer, chat_template, side="model")
    return model, tokenizer


def evaluate(
    model_path_or_model: Any,
    tokenizer: Any = None,
    data_path: str | Path | None = None,
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    output_path: str | Path | None = None,
    limit: int | None = None,
    temperature: float = 0.0,
    data_config: DataConfig | None = None,
    chat_template: str | None = None,
    dtype: str = "auto",
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict:
    """Generate an answer for every test prompt and score it against the reference.

    Args:
        model_path_or_model: a model folder / hub id, or a loaded causal LM.
        tokenizer: the model's tokenizer (or its folder); default: loaded from the model path.
        data_path: JSONL with ``messages`` or ``prompt`` and a reference ``answer`` per row.
        max_new_tokens: longest response.
        batch_size: prompts generated at once.
        output_path: where to write one JSON row per example (prompt, response, prediction,
            target, correct).
        limit: evaluate the first N rows only.
        temperature: 0 (default) is greedy decoding.
        data_config: field names etc.; ``data_path`` replaces its ``path``.
        chat_template: template override for a tokenizer without one.
        dtype: weight dtype when loading from a path.
        device: default: the model's device.
        seed: sampling seed when ``temperature > 0``.

    Returns:
        ``accuracy``, ``num_examples``, ``correct``, ``answered`` (share with an extractable
        answer), ``response_length_mean`` (tokens), ``seconds``, ``outcomes`` (per example, in
        data order: whether its answer was right).
    """
    start = time.perf_counter()
    config = DataConfig(
        **{
            **(data_config.__dict__ if data_config else {}),
            "path": str(data_path),
            "limit": limit or (data_config.limit if data_config else None),
        }
    )
    examples = load_examples(config)  # read before the model loads: a bad file fails at once
    unanswered = sum(e.answer is None for e in examples)
    if unanswered == len(examples):
        raise DataError(
            f"{data_path} has no `{config.answer_field}` field in any row, so "
            "accuracy cannot be scored; add the reference answers or name their "
            "field (--answer-field)"
        )
    if unanswered:
        logger.warning(
            "%s: %d of %d rows have no `%s` field; they count as wrong",
            data_path,
            unanswered,
            len(examples),
            config.answer_field,
        )
    model, tokenizer = _load(model_path_or_model, tokenizer, chat_template, dtype)
    device = device or next(model.parameters()).device
    end_ids = end_of_turn_ids(tokenizer)
    num_ids = count_token_ids(tokenizer)  # output rows past it (padding) are never chosen
    prompts = encode_prompts(tokenizer, examples, side="model")
    torch.manual_seed(seed)
    rows, correct, answered, tokens = [], 0, 0, 0
    for lo in range(0, len(examples), batch_size):
        responses = sample_responses(
            model,
            prompts[lo : lo + batch_size],
            end_ids=end_ids,
            pad_id=tokenizer.pad_token_id,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            device=device,
            num_ids=num_ids,
        )
        for example, response in zip(examples[lo : lo + batch_size], responses):
            text = tokenizer.decode(response, skip_special_tokens=True)
            predicted, target = extract_answer(text), extract_answer(example.answer or "")
            hit = answers_match(predicted, target)
            correct += hit
            answered += predicted is not None
            tokens += len(response)
            rows.append(
                {
                    "index": len(rows),
                    "messages": example.messages,
                    "response": text,
                    "prediction": predicted,
                    "target": target,
                    "correct": hit,
                }
            )
    if output_path:
        Path(output_path).parent.mkdir(parents=True, exist_ok=True)
        with open(output_path, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    count = max(len(rows), 1)
    return {
        "accuracy": correct / count,
        "num_examples": len(rows),
        "correct": correct,
        "answered": answered / count,
        "response_length_mean": tokens / count,
        "seconds": time.perf_counter() - start,
        "outcomes": [row["correct"] for row in rows],
    }
