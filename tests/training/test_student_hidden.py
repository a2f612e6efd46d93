"""The student's hidden states and output layer (issue 27) against the model itself: for each
supported family ``StudentHead.from_model(model)(response_hidden_states(...))`` equals the
model's own logits (``response_logits``), on tiny random configs and on the real pretrained
pair; and a loss through the sliced path gives every model parameter (tied or untied head) the
gradient the dense path gives."""

from __future__ import annotations

import pytest
import torch
import transformers

from ctopd.objectives import StudentHead, StudentHidden
from ctopd.objectives.baselines import mean_token_nll
from ctopd.training.rollout import (
    pad_responses,
    parameters_sharded,
    response_hidden_states,
    response_logits,
    response_student_logits,
)

PROMPTS, RESPONSES = [[1, 2, 3], [4, 5]], [[6, 7, 8, 9], [10, 11]]
SIZES = dict(
    vocab_size=300,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
)
CONFIGS = {
    "llama-tied": lambda: transformers.LlamaConfig(**SIZES, tie_word_embeddings=True),
    "qwen2-untied": lambda: transformers.Qwen2Config(**SIZES, tie_word_embeddings=False),
    "gemma3-softcap": lambda: transformers.Gemma3TextConfig(
        **SIZES, head_dim=8, final_logit_softcapping=5.0
    ),
    "gemma2": lambda: transformers.Gemma2Config(**SIZES, head_dim=8),  # soft cap 30 by default
}
NUM_IDS = 290  # the head has 300 rows: 10 padded


def _tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()


def _head_matches_model(model, num_ids, prompts, responses, tolerance):
    logits = response_logits(model, prompts, responses, pad_id=0, device="cpu")
    head = StudentHead.from_model(model, num_ids)
    assert head is not None and head.columns == min(num_ids, logits.shape[-1])
    layer = model.get_output_embeddings()
    hidden = response_hidden_states(model, layer, prompts, responses, pad_id=0, device="cpu")
    assert hidden.shape == (*logits.shape[:2], layer.in_features)
    torch.testing.assert_close(head(hidden), logits[..., :num_ids], rtol=tolerance, atol=tolerance)
    return head


@pytest.mark.parametrize("name", list(CONFIGS))
def test_head_of_hidden_states_is_the_models_logits(name):
    model = _tiny(name)
    with torch.no_grad():
        head = _head_matches_model(model, NUM_IDS, PROMPTS, RESPONSES, 1e-5)
    config = model.config
    assert head.softcap == getattr(config, "final_logit_softcapping", None)
    assert (head.softcap is not None) == name.startswith("gemma")
    assert (head.weight is model.get_input_embeddings().weight) == config.tie_word_embeddings


@pytest.mark.parametrize("name", ["llama-tied", "qwen2-untied", "gemma3-softcap"])
def test_sliced_gradient_reaches_every_parameter(name):
    """SFT's loss from hidden states and from the model's logits: same loss, same gradient for
    every parameter (the tied embedding gets both of its parts)."""
    targets, _ = pad_responses(RESPONSES, pad_id=-100)
    results = []
    for sliced in (False, True):
        model = _tiny(name).double()
        if sliced:
            student = response_student_logits(
                model, model, PROMPTS, RESPONSES, pad_id=0, device="cpu", num_ids=NUM_IDS
            )
            assert isinstance(student, StudentHidden)
        else:
            student = response_logits(model, PROMPTS, RESPONSES, pad_id=0, device="cpu")
            student = student[..., :NUM_IDS]
        loss = mean_token_nll(student, targets, slice_size=3)
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters()}))
    (dense_loss, dense_grads), (loss, grads) = results
    torch.testing.assert_close(loss, dense_loss, rtol=1e-9, atol=1e-9)
    assert dense_grads.keys() == grads.keys()
    for key, expected in dense_grads.items():
        torch.testing.assert_close(grads[key], expected, rtol=1e-9, atol=1e-9, msg=key)
    model = _tiny(name)
    head_layer = model.get_output_embeddings()
    head_name = next(key for key, module in model.named_modules() if module is head_layer)
    if not model.config.tie_word_embeddings:  # tied: the embedding's rows have a gradient
        assert not grads[f"{head_name}.weight"][NUM_IDS:].any()


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("folder", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_head_matches_the_real_models(real_models_dir, folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        real_models_dir / folder, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(real_models_dir / folder)
    prompts = [tokenizer("What is 6 times 7?")["input_ids"], tokenizer("Hi")["input_ids"]]
    responses = [
        tokenizer(" It is 42.")["input_ids"],
        tokenizer(" Hello there, friend")["input_ids"],
    ]
    with torch.no_grad():
        head = _head_matches_model(model, len(tokenizer), prompts, responses, 1e-4)
    assert head.num_ids == len(tokenizer)


def test_sharded_parameters_fall_back_to_full_logits():
    """FSDP and DeepSpeed ZeRO-3 shard the head: the objective then gets the model's logits,
    cut to the tokenizer's ids, with a warning saying so."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    def accelerator(kind, stage=None):
        plugin = None if stage is None else SimpleNamespace(zero_stage=stage)
        return SimpleNamespace(
            distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin)
        )

    assert parameters_sharded(accelerator(DistributedType.FSDP))
    assert parameters_sharded(accelerator(DistributedType.DEEPSPEED, 3))
    assert not parameters_sharded(accelerator(DistributedType.DEEPSPEED, 2))
    assert not parameters_sharded(accelerator(DistributedType.MULTI_GPU))
    assert not parameters_sharded(accelerator(DistributedType.NO))

    model = _tiny("llama-tied")
    with pytest.warns(UserWarning, match="sharded"):
        logits = response_student_logits(
            model, model, PROMPTS, RESPONSES, pad_id=0, device="cpu", num_ids=NUM_IDS, sharded=True
        )
    expected = response_logits(model, PROMPTS, RESPONSES, pad_id=0, device="cpu")[..., :NUM_IDS]
    torch.testing.assert_close(logits, expected)
