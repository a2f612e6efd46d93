"""Prompt files: messages or prompt rows, chat templates, and the promised error messages."""

from __future__ import annotations

import json

import pytest

from ctopd.training.config import ConfigError, DataConfig, ModelConfig
from ctopd.training.data import DataError, encode_prompts, load_examples
from ctopd.training.models import load_model_tokenizer


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prompt_and_messages_rows(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        [
            {"prompt": "What is 2+2?", "answer": "#### 4"},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                ]
            },
            "",
        ],
    )
    examples = load_examples(DataConfig(path=str(path)))
    assert examples[0].messages == [{"role": "user", "content": "What is 2+2?"}]
    assert examples[0].answer == "#### 4"
    # A trailing assistant turn is the reference response, not part of the prompt.
    assert [m["role"] for m in examples[1].messages] == ["system", "user"]
    assert examples[1].response == "Hello!"
    with_system = load_examples(DataConfig(path=str(path), system_prompt="Think.", limit=1))
    assert with_system[0].messages[0] == {"role": "system", "content": "Think."}
    assert len(with_system) == 1


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [
                '{"prompt": "a"',
            ],
            r"line 1: not valid JSON",
        ),
        ([{"prompt": "ok"}, [1, 2]], r"line 2: expected a JSON object"),
        (
            [{"question": "no prompt field"}],
            r"line 1: needs a `messages` list or a non-empty "
            r"`prompt` string \(fields found: question\)",
        ),
        ([{"messages": "hi"}], r"line 1: `messages` must be a non-empty list"),
        ([{"messages": [{"role": "assistant", "content": "x"}]}], r"holds only an assistant turn"),
        ([""], r"holds no rows"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, rows, message):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message):
        load_examples(DataConfig(path=str(path)))


def test_each_model_gets_its_own_chat_template(tiny):
    student = load_model_tokenizer(ModelConfig(str(tiny["student"])), side="student")
    teacher = load_model_tokenizer(ModelConfig(str(tiny["teacher"])), side="teacher")
    examples = load_examples(DataConfig(path=str(tiny["prompts"]), limit=2))
    s_text = student.decode(encode_prompts(student, examples, side="student")[0])
    t_text = teacher.decode(encode_prompts(teacher, examples, side="teacher")[0])
    assert "<start_of_turn>model" in s_text and "<|im_start|>" not in s_text
    assert "<|im_start|>assistant" in t_text and "<start_of_turn>" not in t_text


def test_missing_chat_template_error_and_override(tmp_path, tiny):
    import shutil

    folder = tmp_path / "no_template"
    shutil.copytree(tiny["student"], folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConfigError,
        match=r"student tokenizer has no chat template; pass one with "
        r"--student.chat_template FILE.jinja \(or "
        r"--chat-template",
    ):
        load_model_tokenizer(ModelConfig(str(folder)), side="student")
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}A:")
    tokenizer = load_model_tokenizer(
        ModelConfig(str(folder), chat_template=str(template)), side="student"
    )
    examples = load_examples(DataConfig(path=str(tiny["prompts"]), limit=1))
    assert tokenizer.decode(encode_prompts(tokenizer, examples, side="student")[0]).endswith("A:")
    with pytest.raises(ConfigError, match="does not render"):
        load_model_tokenizer(
            ModelConfig(str(folder), chat_template="{{ messages[5]['x'] }"), side="student"
        )


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps({"prompt": "Hi"}).encode()
        + b"\n"
        + json.dumps({"prompt": "Ho"}).encode()
        + b"\n"
    )
    assert [e.messages[0]["content"] for e in load_examples(DataConfig(path=str(path)))] == [
        "Hi",
        "Ho",
    ]


def test_latin_1_bytes_name_the_line_and_column(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        json.dumps({"prompt": "fine"}).encode()
        + b"\n"
        + '{"prompt": "caf\u00e9"}\n'.encode("latin-1")
    )
    with pytest.raises(
        DataError,
        match=r"latin1.jsonl, line 2: not UTF-8 text \(byte 0xe9 at "
        r"column 16\); save the file as UTF-8",
    ):
        load_examples(DataConfig(path=str(path)))
