"""Fixtures shared by every test folder: real tokenizers (opt-in through an environment variable)
and the GSM8K sample, both read from ../shared through environment variables."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

TOKENIZERS_ENV = "CTOPD_TOKENIZERS"
GSM8K_ENV = "CTOPD_GSM8K"
REAL_TOKENIZERS = ("qwen2", "llama-spm", "phi-3", "gpt-2")


@pytest.fixture(scope="session")
def real_tokenizers_dir() -> Path:
    """Folder of real tokenizer folders (``$CTOPD_TOKENIZERS``); skips the test when unset."""
    value = os.environ.get(TOKENIZERS_ENV)
    if not value:
        pytest.skip(f"{TOKENIZERS_ENV} is not set (point it at ../shared/tokenizers to run this)")
    folder = Path(value)
    if not folder.is_dir():
        pytest.skip(f"{TOKENIZERS_ENV}={value} is not a folder")
    return folder


@pytest.fixture(scope="session")
def gsm8k_answers() -> list[str]:
    """Worked answers of ../shared/data/gsm8k/train.jsonl (``$CTOPD_GSM8K``, or found beside
    ``$CTOPD_TOKENIZERS``); skips when neither is set."""
    value = os.environ.get(GSM8K_ENV)
    if not value and os.environ.get(TOKENIZERS_ENV):
        value = str(Path(os.environ[TOKENIZERS_ENV]).parent / "data" / "gsm8k" / "train.jsonl")
    if not value or not Path(value).is_file():
        pytest.skip(f"{GSM8K_ENV} is not set (point it at ../shared/data/gsm8k/train.jsonl)")
    with open(value, encoding="utf-8") as handle:
        return [json.loads(line)["answer"] for line in handle if line.strip()]
