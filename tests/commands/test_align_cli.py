"""``ctopd align`` / ``ctopd coverage`` end to end on locally trained tokenizers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ctopd.cli import main
from ctopd.demo.tokenizers import train_byte_level_bpe, train_sentencepiece_bpe

TEXTS = ["Natalia sold 48/2 = 24 clips in May.", "Weng earns $12 an hour. 😀", "",
         "中文 and e\u0301 \n\n  spaces\ttab", "#### 72"]


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    corpus = TEXTS * 30 + ["The answer is 1234 apples and 567 pears."] * 30
    train_byte_level_bpe(corpus, 300).save_pretrained(root / "teacher")
    train_sentencepiece_bpe(corpus, 320).save_pretrained(root / "student")
    data = root / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    return root


def test_align_writes_one_line_per_input_with_partitioning_chunks(tokenizer_folders, tmp_path):
    out = tmp_path / "chunks.jsonl"
    rc = main(["align", "--teacher", str(tokenizer_folders / "teacher"), "--student",
               str(tokenizer_folders / "student"), "--input", str(tokenizer_folders / "texts.jsonl"),
               "--output", str(out), "--no-progress"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(TEXTS)
    for row in rows:
        assert set(row) == {"teacher_ids", "student_ids", "chunks", "aligned"}
        assert len(row["chunks"]) == len(row["aligned"])
        if row["student_ids"]:
            assert row["chunks"][0][0] == 0 and row["chunks"][0][2] == 0
            assert row["chunks"][-1][1] == len(row["teacher_ids"])
            assert row["chunks"][-1][3] == len(row["student_ids"])
            assert all(row["aligned"])
    assert rows[2] == {"teacher_ids": [], "student_ids": [], "chunks": [], "aligned": []}


def test_coverage_json_counts(tokenizer_folders, capsys):
    rc = main(["coverage", "--teacher", str(tokenizer_folders / "teacher"), "--student",
               str(tokenizer_folders / "student"), "--input", str(tokenizer_folders / "texts.jsonl"),
               "--json", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["aligned_coverage"] == 1.0
    # The byte-level teacher splits digits; the student merges them: exact matching loses them.
    assert summary["shared_only_tokens"] < summary["aligned_tokens"] == summary["student_tokens"]
    assert summary["chunks_multi"] > 0 and summary["shared_vocab_size"] > 10


def test_text_view_and_module_entry_point(tokenizer_folders):
    result = subprocess.run(
        [sys.executable, "-m", "ctopd", "align", "--teacher", str(tokenizer_folders / "teacher"),
         "--student", str(tokenizer_folders / "student"), "--text", "sold 1234 clips"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "sold 1234 clips" in result.stdout and "multi" in result.stdout


def test_bad_input_gets_a_clear_error(tokenizer_folders, tmp_path, capsys):
    args = ["--teacher", str(tokenizer_folders / "teacher"), "--student",
            str(tokenizer_folders / "student")]
    assert main(["align", *args, "--input", str(tokenizer_folders / "texts.jsonl"),
                 "--field", "prompt", "--no-progress"]) == 2
    assert "no string field 'prompt'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    assert main(["coverage", *args, "--input", str(bad), "--no-progress"]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main(["align", *args, "--input", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["align", "--teacher", str(tmp_path / "nope"), "--student",
                 str(tokenizer_folders / "student"), "--text", "x"]) == 2
    assert "tokenizer folder" in capsys.readouterr().err
