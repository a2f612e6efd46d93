"""The fixtures that read ../shared skip, with a reason, wherever it is not there."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import (
    GSM8K_ENV,
    REAL_MODELS,
    REAL_MODELS_ENV,
    REAL_TOKENIZERS,
    TOKENIZERS_ENV,
    find_gsm8k,
    find_real_models,
    find_real_tokenizers,
)


def test_real_models_fixture_gives_reasons(tmp_path, monkeypatch):
    monkeypatch.delenv(REAL_MODELS_ENV, raising=False)
    assert find_real_models()[0] is None and "is not set" in find_real_models()[1]
    monkeypatch.setenv(REAL_MODELS_ENV, str(tmp_path))
    folder, reason = find_real_models()
    assert folder is None and "lacks smollm2-135m-instruct, gemma-3-270m" in reason
    for name in REAL_MODELS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"")
    assert find_real_models() == (tmp_path, "")


def test_unset_empty_missing_and_incomplete_folders_give_reasons(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKENIZERS_ENV, raising=False)
    monkeypatch.delenv(GSM8K_ENV, raising=False)
    assert find_real_tokenizers() == (None, find_real_tokenizers()[1])
    assert "is not set" in find_real_tokenizers()[1]
    assert "neither" in find_gsm8k()[1]
    monkeypatch.setenv(TOKENIZERS_ENV, "")
    assert "is not set" in find_real_tokenizers()[1]
    monkeypatch.setenv(TOKENIZERS_ENV, str(tmp_path / "shared" / "tokenizers"))
    folder, reason = find_real_tokenizers()
    assert folder is None and "is not a folder" in reason
    assert find_gsm8k()[0] is None and "does not exist" in find_gsm8k()[1]
    (tmp_path / "shared" / "tokenizers" / "qwen2").mkdir(parents=True)
    (tmp_path / "shared" / "tokenizers" / "qwen2" / "tokenizer.json").write_text("{}")
    folder, reason = find_real_tokenizers()
    assert folder is None and "lacks llama-spm, phi-3, gpt-2" in reason
    for name in REAL_TOKENIZERS:
        (tmp_path / "shared" / "tokenizers" / name).mkdir(exist_ok=True)
        (tmp_path / "shared" / "tokenizers" / name / "tokenizer.json").write_text("{}")
    assert find_real_tokenizers() == (tmp_path / "shared" / "tokenizers", "")
    data = tmp_path / "shared" / "data" / "gsm8k" / "train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text('{"answer": "#### 1"}\n')
    assert find_gsm8k() == (data, "")


def test_missing_folder_skips_through_the_fixture(tmp_path, monkeypatch, request):
    monkeypatch.setenv(TOKENIZERS_ENV, str(tmp_path / "nowhere"))
    from tests import conftest

    with pytest.raises(pytest.skip.Exception, match="is not a folder"):
        conftest.real_tokenizers_dir.__wrapped__()
    with pytest.raises(pytest.skip.Exception, match="does not exist"):
        conftest.gsm8k_answers.__wrapped__()


def test_no_test_reads_the_shared_folder_around_the_fixtures():
    """A test module that reads the variable (or ../shared) itself would error, not skip, on a
    fresh clone: only tests/conftest.py may."""
    root = Path(__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name in ("conftest.py", Path(__file__).name) and path.parent == root:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        strings = [
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        ]
        docstrings = {
            ast.get_docstring(n, clean=False)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
        }
        if any(
            s in (TOKENIZERS_ENV, GSM8K_ENV) or "../shared" in s
            for s in strings
            if s not in docstrings
        ):
            offenders.append(str(path.relative_to(root)))
    assert offenders == []
