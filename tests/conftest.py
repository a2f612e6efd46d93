"""Fixtures shared by every test folder: real tokenizers and the GSM8K sample, read from
../shared through environment variables.

Every test that needs ../shared takes one of these fixtures, never the environment variable
itself: they skip the test, with the reason, when the variable is unset or points at nothing
(a fresh clone without ../shared beside it), so the README's test command passes there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

TOKENIZERS_ENV = "CTOPD_TOKENIZERS"
GSM8K_ENV = "CTOPD_GSM8K"
REAL_MODELS_ENV = "CTOPD_REAL_MODELS"
REAL_MODELS = ("smollm2-135m-instruct", "gemma-3-270m")
REAL_TOKENIZERS = ("qwen2", "llama-spm", "phi-3", "gpt-2")


def find_real_tokenizers() -> tuple[Path | None, str]:
    """``(folder, "")`` when ``$CTOPD_TOKENIZERS`` is a folder holding every tokenizer of
    ``REAL_TOKENIZERS``, else ``(None, why not)``."""
    value = os.environ.get(TOKENIZERS_ENV, "")
    if not value.strip():
        return None, f"{TOKENIZERS_ENV} is not set (point it at ../shared/tokenizers to run this)"
    folder = Path(value)
    if not folder.is_dir():
        return None, (
            f"{TOKENIZERS_ENV}={value} is not a folder (no ../shared beside this "
            "checkout?); real-tokenizer tests skipped"
        )
    missing = [name for name in REAL_TOKENIZERS if not (folder / name / "tokenizer.json").is_file()]
    if missing:
        return None, f"{TOKENIZERS_ENV}={value} lacks {', '.join(missing)} (no tokenizer.json)"
    return folder, ""


def find_gsm8k() -> tuple[Path | None, str]:
    """``(file, "")`` for ``$CTOPD_GSM8K``, or ``data/gsm8k/train.jsonl`` beside
    ``$CTOPD_TOKENIZERS``; else ``(None, why not)``."""
    value = os.environ.get(GSM8K_ENV, "")
    if not value.strip() and os.environ.get(TOKENIZERS_ENV, "").strip():
        value = str(Path(os.environ[TOKENIZERS_ENV]).parent / "data" / "gsm8k" / "train.jsonl")
    if not value.strip():
        return None, (
            f"neither {GSM8K_ENV} nor {TOKENIZERS_ENV} is set (point {GSM8K_ENV} at "
            "../shared/data/gsm8k/train.jsonl to run this)"
        )
    if not Path(value).is_file():
        return None, f"GSM8K sample {value} does not exist (no ../shared beside this checkout?)"
    return Path(value), ""


@pytest.fixture(scope="session")
def real_tokenizers_dir() -> Path:
    """Folder of real tokenizer folders (``$CTOPD_TOKENIZERS``); skips the test, saying why,
    when it is unset, missing or incomplete."""
    folder, reason = find_real_tokenizers()
    if folder is None:
        pytest.skip(reason)
    return folder


@pytest.fixture(scope="session")
def gsm8k_answers() -> list[str]:
    """Worked answers of ../shared/data/gsm8k/train.jsonl (``$CTOPD_GSM8K``, or found beside
    ``$CTOPD_TOKENIZERS``); skips the test, saying why, when there is no such file."""
    path, reason = find_gsm8k()
    if path is None:
        pytest.skip(reason)
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line)["answer"] for line in handle if line.strip()]


def find_real_models() -> tuple[Path | None, str]:
    """``(folder, "")`` when ``$CTOPD_REAL_MODELS`` holds the real pretrained pair that
    ``examples/real_pair/fetch_models.py`` makes, else ``(None, why not)``."""
    value = os.environ.get(REAL_MODELS_ENV, "")
    if not value.strip():
        return None, (
            f"{REAL_MODELS_ENV} is not set (run examples/real_pair/fetch_models.py "
            f"--cache DIR and point {REAL_MODELS_ENV} at DIR to run this)"
        )
    folder = Path(value)
    missing = [m for m in REAL_MODELS if not (folder / m / "model.safetensors").is_file()]
    if missing:
        return None, (
            f"{REAL_MODELS_ENV}={value} lacks {', '.join(missing)} (run "
            "examples/real_pair/fetch_models.py --cache there)"
        )
    return folder, ""


@pytest.fixture(scope="session")
def real_models_dir() -> Path:
    """Folder of the real pretrained pair (``$CTOPD_REAL_MODELS``); skips the test, saying why,
    when it is unset or incomplete."""
    folder, reason = find_real_models()
    if folder is None:
        pytest.skip(reason)
    return folder


def pytest_collection_modifyitems(config, items) -> None:
    """A test marked ``real`` is also ``slow``: the fast loop (``pytest -m "not slow"``) never
    loads the real pretrained pair."""
    for item in items:
        if item.get_closest_marker("real") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
