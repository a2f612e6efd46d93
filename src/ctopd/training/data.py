"""Prompts in, token ids out: reading JSONL / ``datasets`` rows and applying each model's own chat
template (docs/concepts/one-step.md: never paste one model's markers into the other's input)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctopd.training.config import ConfigError, DataConfig


class DataError(ValueError):
    """A data file or row is malformed; the message names the file, line and field."""


@dataclass
class Example:
    """One prompt.

    Attributes:
        messages: chat messages ``[{"role": ..., "content": ...}, ...]`` ending with the user's.
        answer: the reference answer text, if the row has one.
        response: a reference response (SFT from data), if the row has one.
    """

    messages: list[dict]
    answer: str | None = None
    response: str | None = None


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; empty lines are skipped, bad JSON names its line.

    The file is UTF-8; a byte-order mark (as some Windows editors write) is accepted. Bytes
    that are not UTF-8 (a latin-1 file) name the line and column.
    """
    rows = []
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}, line {number}: expected a JSON object, got {type(row).__name__}"
            )
        rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def _text_lines(path: str | Path):
    """``(line number from 1, text)`` of a UTF-8 (or UTF-8 with BOM) file."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}, line {number}: not UTF-8 text (byte "
                    f"0x{raw[err.start]:02x} at column {err.start + 1}); save the "
                    "file as UTF-8"
                ) from None


def row_to_example(
    row: dict, config: DataConfig, where: str, response_field: str | None = None
) -> Example:
    """Turn one row into an :class:`Example`, checking its fields."""
    messages = row.get(config.messages_field)
    if messages is not None:
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise DataError(
                f"{where}: `{config.messages_field}` must be a non-empty list of "
                "{'role': ..., 'content': str} objects"
            )
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # a trailing assistant turn is the reference, not the prompt
            if not messages:
                raise DataError(f"{where}: `{config.messages_field}` holds only an assistant turn")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        prompt = row.get(config.prompt_field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(
                f"{where}: needs a `{config.messages_field}` list or a non-empty "
                f"`{config.prompt_field}` string (fields found: {', '.join(row)})"
            )
        messages = [{"role": "user", "content": prompt}]
    if config.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": config.system_prompt}] + messages
    answer = row.get(config.answer_field)
    response = None
    for name in (response_field, "response", config.answer_field):
        if name and isinstance(row.get(name), str):
            response = row[name]
            break
    raw = row.get(config.messages_field)
    if response is None and isinstance(raw, list) and raw and raw[-1].get("role") == "assistant":
        response = raw[-1]["content"]
    return Example(messages, None if answer is None else str(answer), response)


def load_examples(config: DataConfig, *, response_field: str | None = None) -> list[Example]:
    """All prompts of a run (``config.limit`` first ones), from ``config.path`` or
    ``config.dataset``.

    Raises:
        DataError: a row has neither messages nor a prompt, or the file is malformed.
    """
    if config.path:
        rows, source = read_rows(config.path), str(config.path)
        where = [f"{source}, line {i + 1}" for i in range(len(rows))]
    elif config.dataset:
        try:
            import datasets
        except ImportError as err:
            raise ConfigError(
                "data.dataset needs the `datasets` package: pip install 'ctopd[data]'"
            ) from err
        table = datasets.load_dataset(config.dataset, config.dataset_config, split=config.split)
        rows = [dict(r) for r in table]
        where = [f"{config.dataset}[{i}]" for i in range(len(rows))]
    else:
        raise ConfigError("no prompts: set data.path or data.dataset")
    if config.limit:
        rows, where = rows[: config.limit], where[: config.limit]
    return [row_to_example(r, config, w, response_field) for r, w in zip(rows, where)]


def render_template(
    tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool = True, side: str = "model"
) -> str:
    """The chat template applied to ``messages`` as text."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"the {side} tokenizer has no chat template; pass one with "
            f"--{side}.chat_template FILE.jinja (or --chat-template for the student)"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_prompts(tokenizer: Any, examples: list[Example], *, side: str) -> list[list[int]]:
    """Each example's prompt ids under ``tokenizer``'s chat template (generation prompt
    appended). The template writes BOS itself, so no special tokens are added on top."""
    texts = [render_template(tokenizer, e.messages, side=side) for e in examples]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def set_chat_template(tokenizer: Any, template: str | None, *, side: str) -> None:
    """Install a template override (a file path or the template text), then check the
    tokenizer has a template that renders a one-message chat."""
    if template:
        path = Path(template)
        tokenizer.chat_template = path.read_text(encoding="utf-8") if path.is_file() else template
    try:
        render_template(tokenizer, [{"role": "user", "content": "hi"}], side=side)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(
            f"the {side} chat template does not render a user message: {err}"
        ) from err
