"""Two training steps with real vocabularies (Qwen2 byte-level BPE teacher, Llama-2
SentencePiece student with a chat-template override) on tiny random models and GSM8K prompts.
Runs when ``CTOPD_TOKENIZERS`` points at ``../shared/tokenizers``."""

from __future__ import annotations

import json
import math

import pytest

from ctopd.training.config import ConfigError, load_config
from ctopd.training.loop import train

LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


@pytest.mark.slow
def test_qwen2_teacher_llama_student_on_gsm8k(real_tokenizers_dir, gsm8k_answers, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from ctopd.testing import tiny_causal_lm

    for name, source in (("teacher", "qwen2"), ("student", "llama-spm")):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(real_tokenizers_dir / source))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = tiny_causal_lm(
            tokenizer, hidden_size=16, num_layers=1, num_heads=2, max_positions=1024
        )
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": "Explain: " + a.split("\n")[0], "answer": a}) + "\n"
            for a in gsm8k_answers[:8]
        )
    )
    args = [
        "--student",
        str(tmp_path / "student"),
        "--teacher",
        str(tmp_path / "teacher"),
        "--data",
        str(data),
        "--max-steps",
        "2",
        "--per-device-batch-size",
        "4",
        "--rollout.max-new-tokens",
        "16",
        "--rollout.temperature",
        "1.0",
        "--progress",
        "false",
    ]
    with pytest.raises(ConfigError, match="student tokenizer has no chat template"):
        train(load_config([*args, "--output-dir", str(tmp_path / "none")]))
    template = tmp_path / "llama2.jinja"
    template.write_text(LLAMA2_TEMPLATE)
    summary = train(
        load_config(
            [*args, "--output-dir", str(tmp_path / "run"), "--chat-template", str(template)]
        )
    )
    metrics = summary["final_metrics"]
    assert math.isfinite(metrics["loss"]) and metrics["student_tokens"] > 0
    assert 0.0 < metrics["coverage"] <= 1.0
