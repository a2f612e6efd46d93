"""A few real training steps of every objective on tiny models of two tokenizer families."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ctopd.training.config import ConfigError, load_config
from ctopd.training.loop import train
from ctopd.training.runtime import RunStopped
from tests.training.tiny import final_weights, tiny_args

# docs/concepts/metrics.md figures and the time split every row must carry.
ROW_KEYS = {
    "step",
    "loss",
    "kl",
    "coverage",
    "supervised_tokens",
    "student_tokens",
    "chunks_one_to_one",
    "chunks_multi",
    "unaligned_share",
    "teacher_logprob_mean",
    "response_length_mean",
    "tokens_per_second",
    "lr",
    "grad_norm",
    "skipped_prompts",
    "time_rollout",
    "time_teacher",
    "time_alignment",
    "time_student_forward",
    "time_loss",
    "time_backward",
    "time_optimizer",
    "time_step",
}


def _run(tiny, out, *extra):
    config = load_config(tiny_args(tiny, out, *extra))
    return train(config), config


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["simct", "dpca", "shared_only", "uld"])
def test_each_objective_trains(tiny, tmp_path, objective):
    initial = final_weights_of(tiny["student"])
    summary, _ = _run(tiny, tmp_path / "run", "--objective", objective)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert math.isfinite(row["loss"]) and math.isfinite(row["kl"])
        assert 0.0 <= row["coverage"] <= 1.0 and row["responses"] == 4
    changed = final_weights(tmp_path / "run")
    assert any(not torch.equal(initial[k], changed[k]) for k in initial)
    assert summary["steps"] == 2 and math.isfinite(summary["final_metrics"]["loss"])
    assert (tmp_path / "run" / "config.yaml").is_file()


def final_weights_of(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_final_student_loads_with_plain_from_pretrained(tiny, tmp_path):
    _run(tiny, tmp_path / "run", "--max-steps", "1")
    final = tmp_path / "run" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template and "<start_of_turn>" in tokenizer.chat_template
    assert set(model.generation_config.eos_token_id) == {
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<end_of_turn>"),
    }


def test_same_tokenizer_opd_and_its_guard(tiny, tmp_path):
    summary, _ = _run(
        tiny, tmp_path / "opd", "--objective", "opd", "--teacher", str(tiny["student_twin"])
    )
    rows = _rows(tmp_path / "opd")
    # Identical tokenizers: the teacher scores the sampled ids themselves, every chunk is 1:1.
    assert all(r["chunks_multi"] == 0 and r["chunks_one_to_one"] > 0 for r in rows)
    assert math.isfinite(summary["final_metrics"]["loss"])
    with pytest.raises(ConfigError, match="opd .* needs identical tokenizers"):
        _run(tiny, tmp_path / "bad", "--objective", "opd")


def test_same_seed_same_weights(tiny, tmp_path):
    _run(tiny, tmp_path / "a", "--objective", "dpca", "--seed", "5")
    _run(tiny, tmp_path / "b", "--objective", "dpca", "--seed", "5")
    _run(tiny, tmp_path / "c", "--objective", "dpca", "--seed", "6")
    a, b, c = (final_weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_accumulation_samples_and_eval(tiny, tmp_path):
    summary, _ = _run(
        tiny,
        tmp_path / "run",
        "--gradient-accumulation-steps",
        "2",
        "--rollout.samples-per-prompt",
        "2",
        "--per-device-batch-size",
        "2",
        "--eval-data",
        str(tiny["eval"]),
        "--eval-every",
        "1",
        "--eval-max-new-tokens",
        "6",
        "--report-to",
        "tensorboard",
    )
    rows = _rows(tmp_path / "run")
    # 2 micro-steps x 2 prompts x 2 samples per optimiser step.
    assert all(r["responses"] == 8 and r["prompts"] == 4 for r in rows)
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 and r["eval_examples"] == 6 for r in rows)
    assert summary["eval"]["num_examples"] == 6
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_long_prompts_are_skipped_and_counted(tiny, tmp_path):
    from ctopd.training.config import ModelConfig
    from ctopd.training.data import encode_prompts, load_examples
    from ctopd.training.models import load_model_tokenizer

    config = load_config(tiny_args(tiny, tmp_path))
    lengths = []
    for side in ("student", "teacher"):
        tokenizer = load_model_tokenizer(ModelConfig(str(tiny[side])), side=side)
        lengths.append(
            [len(p) for p in encode_prompts(tokenizer, load_examples(config.data), side=side)]
        )
    limit = max(max(s, t) for s, t in zip(*lengths)) - 1  # the longest prompts go
    expected = sum(max(s, t) > limit for s, t in zip(*lengths))
    assert expected > 0
    summary, _ = _run(
        tiny, tmp_path / "run", "--data.max-prompt-tokens", str(limit), "--max-steps", "1"
    )
    assert summary["skipped_prompts"] == expected
    assert _rows(tmp_path / "run")[0]["skipped_prompts"] == expected
    with pytest.raises(
        ConfigError, match="all 40 prompts are longer than data.max_prompt_tokens \\(3\\)"
    ):
        _run(tiny, tmp_path / "none", "--data.max-prompt-tokens", "3")


def test_non_finite_loss_stops_naming_the_step(tiny, tmp_path, monkeypatch):
    import ctopd.training.loop as loop

    real = loop.compute_objective
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), metrics

    monkeypatch.setattr(loop, "compute_objective", poisoned)
    with pytest.raises(
        RunStopped,
        match="stopped at step 2: the loss is nan, so the step was "
        "not applied .*Last checkpoint kept: "
        ".*checkpoint-000001",
    ) as stop:
        _run(tiny, tmp_path / "run", "--save-every", "1", "--max-steps", "3")
    assert stop.value.exit_code == 1
    assert (tmp_path / "run" / "checkpoint-000001" / "student" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "checkpoint-000002").exists()


def test_lora_and_gradient_checkpointing(tiny, tmp_path):
    pytest.importorskip("peft")
    initial = final_weights_of(tiny["student"])
    _run(
        tiny,
        tmp_path / "run",
        "--lora.enabled",
        "--lora.r",
        "4",
        "--gradient-checkpointing",
        "--lora.target-modules",
        "q_proj,v_proj",
    )
    final = tmp_path / "run" / "final"
    assert not (final / "adapter_config.json").exists()  # merged: a plain model folder
    merged = final_weights(tmp_path / "run")
    assert set(merged) == set(initial)
    changed = [k for k in initial if not torch.equal(initial[k], merged[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    AutoModelForCausalLM.from_pretrained(final)


def test_bf16_autocast_after_a_float32_run_in_one_process(tiny, tmp_path):
    _run(tiny, tmp_path / "fp32", "--max-steps", "1")
    summary, _ = _run(
        tiny,
        tmp_path / "bf16",
        "--max-steps",
        "1",
        "--mixed-precision",
        "bf16",
        "--teacher.dtype",
        "bfloat16",
    )
    assert math.isfinite(summary["final_metrics"]["loss"])


def test_a_registered_objective_trains_by_name(tiny, tmp_path, monkeypatch):
    from ctopd.objectives import registry
    from ctopd.objectives.dpca import dpca

    monkeypatch.setattr(registry, "OBJECTIVES", dict(registry.OBJECTIVES))
    monkeypatch.setattr(registry, "TEACHER_NEEDS", dict(registry.TEACHER_NEEDS))
    calls = []

    def halved_dpca(
        *,
        student_logits,
        student_ids,
        alignments,
        shared_vocab,
        teacher,
        student_old_logprobs=None,
        advantage_clip=10.0,
    ):
        calls.append((student_logits.shape[0], teacher.token_logprobs.shape[0], advantage_clip))
        loss, metrics = dpca(
            student_logits=student_logits,
            student_ids=student_ids,
            alignments=alignments,
            shared_vocab=shared_vocab,
            teacher=teacher,
            student_old_logprobs=student_old_logprobs,
            advantage_clip=advantage_clip,
        )
        return 0.5 * loss, metrics

    registry.register_objective("halved_dpca", halved_dpca, {"token_logprobs"})
    assert registry.teacher_needs("halved_dpca") == frozenset({"token_logprobs"})
    assert registry.objective_options("halved_dpca") == {"advantage_clip": 10.0}
    initial = final_weights_of(tiny["student"])
    summary, config = _run(tiny, tmp_path / "run", "--objective", "halved_dpca")
    # Two steps of four responses, the config's own option passed through.
    assert calls == [(4, 4, config.objective.arguments()["advantage_clip"])] * 2
    assert summary["steps"] == 2
    changed = final_weights(tmp_path / "run")
    assert any(not torch.equal(initial[k], changed[k]) for k in initial)
    with pytest.raises(ValueError, match="built in"):
        registry.register_objective("dpca", halved_dpca, {"token_logprobs"})
    with pytest.raises(ValueError, match="unknown teacher field"):
        registry.register_objective("other", halved_dpca, {"logits"})
    with pytest.raises(ValueError, match="must accept"):
        registry.register_objective("other", lambda student_logits: None, set())
    with pytest.raises(ConfigError, match="objective"):
        _run(tiny, tmp_path / "bad", "--objective", "not_registered")
