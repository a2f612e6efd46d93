"""Rollouts sample exactly the policy, whatever the checkpoint's generation config says (issue 24).

The models here have a known next-token distribution: a one-layer Llama whose layers are zeroed
and whose embeddings are all ones, so the last hidden state is the same vector at every position
and the logits are one fixed vector, whatever the context. Tokens are then independent draws
from ``softmax(logits)`` (read from the model's own forward pass, the oracle), at the first
position and at every later one. Each checkpoint is saved with a ``generation_config.json``
setting one field that ``generate`` would otherwise apply, loaded back with ``from_pretrained``,
and sampled 4,000 times; the token counts at each position are tested against the oracle with a
chi-square goodness-of-fit test (fixed seed; fail below p = 1e-4).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ctopd.training.rollout import count_token_ids, generate_rollout, sample_responses

VOCAB = 64
END = 1  # the end-of-turn id
PROMPT = [2]  # one token: forced_bos and begin_suppress act on a one-token input
DRAWS = 4000
NEW_TOKENS = 3
P_MIN = 1e-4


def policy_logits() -> torch.Tensor:
    """``[VOCAB]`` float32 log-probabilities, all distinct (no ties for top-k / top-p): the end
    id 0.10, ids 2..9 (the prompt's among them) 0.09 down to 0.055, the other 55 ids about
    0.006 each, a tail that top-p 0.8, min-p, epsilon and eta cutoffs all remove."""
    weights = torch.empty(VOCAB, dtype=torch.float64)
    weights[END] = 0.10
    weights[2:10] = torch.linspace(0.09, 0.055, 8, dtype=torch.float64)
    light = [i for i in range(VOCAB) if i != END and not 2 <= i < 10]
    weights[light] = 1.0 + 0.01 * torch.arange(len(light), dtype=torch.float64)
    weights[light] *= (1 - weights[END] - weights[2:10].sum()) / weights[light].sum()
    return weights.log().float()


def constant_model(logits: torch.Tensor) -> LlamaForCausalLM:
    """A Llama whose next-token logits are ``logits`` ``[V]`` at every position, any context.

    Attention and MLP outputs are zero (``o_proj``, ``down_proj``), every embedding is ones, so
    the final RMSNorm gives ones; ``lm_head`` reads the logits off its first column.
    """
    config = LlamaConfig(
        vocab_size=logits.numel(),
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.model.layers.parameters():
            parameter.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = logits
    return model


def save_with(model: torch.nn.Module, folder: Path, generation: dict) -> Path:
    """Save ``model`` with ``generation`` as its ``generation_config.json`` (sampling on, the
    end id as EOS, as a chat checkpoint ships it)."""
    model.save_pretrained(folder)
    config = {"do_sample": True, "eos_token_id": END, "pad_token_id": 0, **generation}
    (folder / "generation_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def oracle(model: torch.nn.Module) -> torch.Tensor:
    """The model's own next-token probabilities ``[V]`` float64 after the prompt."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT])).logits[0, -1].double()
    return logits.softmax(-1)


def warp(
    probs: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Reference temperature → top-k → top-p on probabilities ``[V]``, each step renormalised
    (top-p keeps a token while the mass ranked strictly above it is below ``top_p``)."""
    probs = (probs.log() / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    probs[order[top_k or len(probs) :]] = 0.0
    probs = probs / probs.sum()
    above = probs[order].cumsum(0) - probs[order]
    probs[order[above >= top_p]] = 0.0
    return probs / probs.sum()


def chi_square_p(tokens: list[int], probs: torch.Tensor) -> float:
    """Goodness-of-fit p-value of ``tokens`` against ``probs`` ``[V]``; 0 if a token of
    probability 0 occurs."""
    counts = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=len(probs)).double()
    possible = probs > 0
    if counts[~possible].sum() > 0:
        return 0.0
    expected = probs[possible] * counts.sum()
    statistic = ((counts[possible] - expected) ** 2 / expected).sum()
    dof = torch.tensor((int(possible.sum()) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, statistic / 2))


def position_p_values(responses: list[list[int]], probs: torch.Tensor) -> list[float]:
    """p-value at each response position, over the responses still running there (tokens are
    independent, so position ``j`` given no end id before it is distributed as ``probs``)."""
    return [chi_square_p([r[j] for r in responses if len(r) > j], probs) for j in range(NEW_TOKENS)]


def draw(model: torch.nn.Module, **kwargs) -> list[list[int]]:
    torch.manual_seed(0)
    return sample_responses(
        model,
        [PROMPT],
        end_ids=[END],
        pad_id=0,
        max_new_tokens=NEW_TOKENS,
        samples_per_prompt=DRAWS,
        **kwargs,
    )


# Each would change what a plain sample of the policy gives, at the first position or later.
LEAKS = {
    "none": {},  # generate's own fallback is top_k=50 for any field left unset
    "top_p": {"top_p": 0.8},
    "top_k": {"top_k": 5},
    "temperature": {"temperature": 0.5},
    "top_h": {"top_h": 0.5},
    "min_p": {"min_p": 0.2},
    "typical_p": {"typical_p": 0.5},
    "epsilon_cutoff": {"epsilon_cutoff": 0.02},
    "eta_cutoff": {"eta_cutoff": 0.2},
    "repetition_penalty": {"repetition_penalty": 1.5},
    "no_repeat_ngram_size": {"no_repeat_ngram_size": 1},
    "min_new_tokens": {"min_new_tokens": 2},
    "min_length": {"min_length": len(PROMPT) + 2},
    "suppress_tokens": {"suppress_tokens": [2]},
    "begin_suppress_tokens": {"begin_suppress_tokens": [2]},
    "bad_words_ids": {"bad_words_ids": [[3]]},
    "sequence_bias": {"sequence_bias": [[[4], -10.0]]},
    "forced_bos_token_id": {"forced_bos_token_id": 5},
    "forced_eos_token_id": {"forced_eos_token_id": END},
    "exponential_decay_length_penalty": {"exponential_decay_length_penalty": [0, 2.0]},
    "num_beams": {"num_beams": 4},
    "qwen2.5-instruct": {"top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "temperature": 0.7},
}


@pytest.fixture(scope="module")
def policy() -> LlamaForCausalLM:
    return constant_model(policy_logits())


@pytest.mark.parametrize("leak", list(LEAKS))
def test_sampling_ignores_the_checkpoint_generation_config(policy, tmp_path, leak):
    model = AutoModelForCausalLM.from_pretrained(save_with(policy, tmp_path, LEAKS[leak]))
    probs = oracle(model)
    p_values = position_p_values(draw(model, temperature=1.0), probs)
    assert min(p_values) > P_MIN, p_values


def test_sampling_ignores_generation_fields_in_the_model_config(policy, tmp_path):
    # Without a generation_config.json, from_pretrained builds one from config.json.
    policy.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink(missing_ok=True)
    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    config.update(top_k=5, repetition_penalty=1.5, suppress_tokens=[3])
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.generation_config.top_k == 5  # the leak is real
    p_values = position_p_values(draw(model, temperature=1.0), oracle(model))
    assert min(p_values) > P_MIN, p_values


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.7),
        dict(temperature=1.0, top_k=7),
        dict(temperature=1.0, top_p=0.6),
        dict(temperature=1.3, top_k=20, top_p=0.9),
    ],
)
def test_the_configured_temperature_top_k_top_p_and_nothing_else(policy, tmp_path, settings):
    generation = {**LEAKS["qwen2.5-instruct"], "min_new_tokens": 2, "suppress_tokens": [6]}
    model = AutoModelForCausalLM.from_pretrained(save_with(policy, tmp_path, generation))
    probs = warp(oracle(model), **settings)
    p_values = position_p_values(draw(model, **settings), probs)
    assert min(p_values) > P_MIN, p_values


def test_the_checkpoint_generation_config_is_restored(policy, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_with(policy, tmp_path, {"top_k": 5}))
    before = model.generation_config
    sample_responses(model, [PROMPT], end_ids=[END], pad_id=0, max_new_tokens=2)
    assert model.generation_config is before and before.top_k == 5


def test_sampling_under_lora_ignores_the_checkpoint_generation_config(policy, tmp_path):
    peft = pytest.importorskip("peft")
    model = AutoModelForCausalLM.from_pretrained(
        save_with(policy, tmp_path, LEAKS["qwen2.5-instruct"])
    )
    # LoRA's B starts at zero: the wrapped model is the same policy.
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    p_values = position_p_values(draw(wrapped, temperature=1.0), oracle(model))
    assert min(p_values) > P_MIN, p_values


def manual_greedy(model: torch.nn.Module, prompt: list[int], steps: int, num_ids: int) -> list[int]:
    """Argmax of one full forward pass per step over the first ``num_ids`` rows, to the end id."""
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1, :num_ids]
        ids.append(int(logits.argmax()))
        if ids[-1] == END:
            break
    return ids[len(prompt) :]


@pytest.mark.parametrize("num_ids", [None, 40])
def test_greedy_is_the_forward_argmax_under_a_sampling_generation_config(tmp_path, num_ids):
    torch.manual_seed(5)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger logits: clear argmaxes, and a penalty has something to flip
        model.lm_head.weight.mul_(20.0)
    prompts = [[5, 9, 12, 7, 30], [17, 3]]
    expected = [manual_greedy(model, p, 8, num_ids or VOCAB) for p in prompts]
    firsts = sorted({r[0] for r in expected})
    generation = {
        "temperature": 0.7,
        "top_k": 3,
        "top_p": 0.5,
        "repetition_penalty": 1.8,
        "no_repeat_ngram_size": 1,
        "suppress_tokens": firsts,
        "min_new_tokens": 8,
    }
    loaded = AutoModelForCausalLM.from_pretrained(save_with(model, tmp_path, generation))
    masking = {} if num_ids is None else {"num_ids": num_ids}
    greedy = sample_responses(
        loaded, prompts, end_ids=[END], pad_id=0, max_new_tokens=8, temperature=0.0, **masking
    )
    assert greedy == expected


@pytest.mark.parametrize(
    "settings",
    [dict(temperature=1.0), dict(temperature=1.0, top_k=4), dict(temperature=0.8, top_p=0.5)],
)
def test_num_ids_samples_the_policy_renormalised_over_real_ids(tmp_path, settings):
    num_ids = 16
    logits = policy_logits()
    logits[num_ids:] += 5.0  # the padded rows carry about 99% of the mass
    model = AutoModelForCausalLM.from_pretrained(save_with(constant_model(logits), tmp_path, {}))
    full = oracle(model)
    assert full[num_ids:].sum() > 0.95
    real = torch.cat([full[:num_ids], torch.zeros(VOCAB - num_ids, dtype=full.dtype)])
    responses = draw(model, num_ids=num_ids, **settings)
    assert max(max(r) for r in responses) < num_ids
    p_values = position_p_values(responses, warp(real / real.sum(), **settings))
    assert min(p_values) > P_MIN, p_values
    # The real argmax is the end id; end on a padded row instead to see two steps.
    greedy = sample_responses(
        model,
        [PROMPT],
        end_ids=[VOCAB - 1],
        pad_id=0,
        max_new_tokens=2,
        temperature=0.0,
        num_ids=num_ids,
    )
    assert greedy == [[int(full[:num_ids].argmax())] * 2]


def test_num_ids_must_be_positive(policy):
    with pytest.raises(ValueError, match="num_ids"):
        sample_responses(policy, [PROMPT], end_ids=[END], pad_id=0, max_new_tokens=1, num_ids=0)


def test_count_token_ids_takes_the_largest_id_past_holes():
    class Holes:  # ids 0..4 and 9: six tokens, ten ids
        def get_vocab(self):
            return {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4, "<x>": 9}

        def __len__(self):
            return 6

    assert count_token_ids(Holes()) == 10


def test_count_token_ids_of_the_tiny_tokenizers(tiny):
    from transformers import AutoTokenizer

    for name in ("teacher", "student"):
        tokenizer = AutoTokenizer.from_pretrained(tiny[name])
        assert count_token_ids(tokenizer) == len(tokenizer)


def test_evaluate_never_chooses_a_padded_row(tiny, monkeypatch):
    from ctopd.training import evaluate as evaluation
    from ctopd.training.config import ModelConfig
    from ctopd.training.models import load_model_tokenizer
    from tests.training.padded import padded_causal_lm

    tokenizer = load_model_tokenizer(ModelConfig(str(tiny["student"])), side="student")
    model = padded_causal_lm(tokenizer, extra_rows=24)  # padded rows hold nearly all the mass
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["num_ids"])
        responses = sample_responses(*args, **kwargs)
        seen.extend(responses)
        return responses

    monkeypatch.setattr(evaluation, "sample_responses", recording)
    result = evaluation.evaluate(
        model, tokenizer, tiny["eval"], max_new_tokens=4, batch_size=4, limit=4
    )
    assert result["num_examples"] == 4 and seen[0] == count_token_ids(tokenizer)
    assert max(max(r) for r in seen[1:]) < count_token_ids(tokenizer)


@pytest.mark.parametrize("leak", ["none", "qwen2.5-instruct", "min_new_tokens", "suppress_tokens"])
@pytest.mark.parametrize(
    "settings", [dict(temperature=1.0), dict(temperature=1.3, top_k=20, top_p=0.9)]
)
def test_a_static_kv_cache_samples_the_same_policy(policy, tmp_path, leak, settings):
    """``cache_implementation="static"`` (the faster rollout of ``docs/rollout.md``) changes how
    ``generate`` keeps its cache, not what it samples."""
    model = AutoModelForCausalLM.from_pretrained(save_with(policy, tmp_path, LEAKS[leak]))
    torch.manual_seed(0)
    rollout = generate_rollout(
        model,
        [PROMPT],
        end_ids=[END],
        pad_id=0,
        max_new_tokens=NEW_TOKENS,
        samples_per_prompt=DRAWS,
        generate_options={"cache_implementation": "static"},
        **settings,
    )
    probs = warp(oracle(model), **settings)
    p_values = position_p_values(rollout.response_ids, probs)
    assert min(p_values) > P_MIN, p_values
    expected = probs.log().float()
    for response, logprobs in zip(rollout.response_ids[:50], rollout.logprobs):
        torch.testing.assert_close(logprobs, expected[response], atol=1e-5, rtol=0)
