"""``ctopd align`` / ``ctopd coverage`` end to end on locally trained tokenizers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ctopd import TokenizerPair, load_tokenizer
from ctopd.cli import main
from ctopd.testing import train_byte_level_bpe, train_sentencepiece_bpe
from tests.core.oracles import check_against_reference, check_partition
from tests.core.variants import with_prepend_scheme

TEXTS = [
    "Natalia sold 48/2 = 24 clips in May.",
    "Weng earns $12 an hour. 😀",
    "",
    "中文 and e\u0301 \n\n  spaces\ttab",
    "#### 72",
]


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    corpus = TEXTS * 30 + ["The answer is 1234 apples and 567 pears."] * 30
    train_byte_level_bpe(corpus, 300).save_pretrained(root / "teacher")
    sentencepiece = train_sentencepiece_bpe(corpus, 320)
    sentencepiece.save_pretrained(root / "student")
    with_prepend_scheme(sentencepiece, "prepend").save_pretrained(root / "student_prepend")
    data = root / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    return root


def test_align_writes_one_line_per_input_with_partitioning_chunks(tokenizer_folders, tmp_path):
    out = tmp_path / "chunks.jsonl"
    rc = main(
        [
            "align",
            "--teacher",
            str(tokenizer_folders / "teacher"),
            "--student",
            str(tokenizer_folders / "student"),
            "--input",
            str(tokenizer_folders / "texts.jsonl"),
            "--output",
            str(out),
            "--no-progress",
        ]
    )
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
    rc = main(
        [
            "coverage",
            "--teacher",
            str(tokenizer_folders / "teacher"),
            "--student",
            str(tokenizer_folders / "student"),
            "--input",
            str(tokenizer_folders / "texts.jsonl"),
            "--json",
            "--no-progress",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["aligned_coverage"] == 1.0
    # The byte-level teacher splits digits; the student merges them: exact matching loses them.
    assert summary["shared_only_tokens"] < summary["aligned_tokens"] == summary["student_tokens"]
    assert summary["chunks_multi"] > 0 and summary["shared_vocab_size"] > 10


def test_text_view_and_module_entry_point(tokenizer_folders):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctopd",
            "align",
            "--teacher",
            str(tokenizer_folders / "teacher"),
            "--student",
            str(tokenizer_folders / "student"),
            "--text",
            "sold 1234 clips",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "sold 1234 clips" in result.stdout and "multi" in result.stdout


def test_bad_input_gets_a_clear_error(tokenizer_folders, tmp_path, capsys):
    args = [
        "--teacher",
        str(tokenizer_folders / "teacher"),
        "--student",
        str(tokenizer_folders / "student"),
    ]
    assert (
        main(
            [
                "align",
                *args,
                "--input",
                str(tokenizer_folders / "texts.jsonl"),
                "--field",
                "prompt",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "no string field 'prompt'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    assert main(["coverage", *args, "--input", str(bad), "--no-progress"]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main(["align", *args, "--input", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "align",
                "--teacher",
                str(tmp_path / "nope"),
                "--student",
                str(tokenizer_folders / "student"),
                "--text",
                "x",
            ]
        )
        == 2
    )
    assert "tokenizer folder" in capsys.readouterr().err


WHITESPACE_TEXTS = [
    " ",
    "  ",
    "   ",
    " x",
    "  x",
    "   sold 12 clips",
    "\n",
    "\nx",
    " \n x",
    "x ",
    "x   ",
    "\t12 ",
    "\u02a4 ok",
    " \u02a4",
    "\u00a0x",
    "  \u3000 ",
]


@pytest.mark.parametrize(
    "teacher,student",
    [
        ("teacher", "student"),
        ("student", "teacher"),
        ("student_prepend", "student"),
        ("student", "student_prepend"),
    ],
)
def test_align_reports_each_tokenizers_own_ids_of_texts_with_leading_spaces(
    tokenizer_folders, tmp_path, teacher, student
):
    """Metaspace "first" (a dummy prefix only before a text without a leading space), the
    legacy Prepend normaliser (before every text) and byte-level, each way round."""
    data = tmp_path / "spaces.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in WHITESPACE_TEXTS))
    out = tmp_path / "chunks.jsonl"
    assert (
        main(
            [
                "align",
                "--teacher",
                str(tokenizer_folders / teacher),
                "--student",
                str(tokenizer_folders / student),
                "--input",
                str(data),
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    pair = TokenizerPair(
        load_tokenizer(str(tokenizer_folders / teacher)),
        load_tokenizer(str(tokenizer_folders / student)),
    )
    assert len(rows) == len(WHITESPACE_TEXTS)
    for text, row in zip(WHITESPACE_TEXTS, rows):
        assert (
            row["teacher_ids"]
            == pair.teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        ), text
        assert (
            row["student_ids"]
            == pair.student_tokenizer(text, add_special_tokens=False)["input_ids"]
        ), text
        al = pair.align(row["teacher_ids"], row["student_ids"], text=text)
        assert row["chunks"] == al.chunks.tolist() and row["aligned"] == al.aligned.tolist()
        check_partition(al, len(row["teacher_ids"]), len(row["student_ids"]))
        spelled = check_against_reference(
            pair, row["teacher_ids"], row["student_ids"], al, text=text
        )
        assert spelled == text.encode() and all(row["aligned"]), text
