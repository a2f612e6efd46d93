"""The rollout-engine seam: HF ``generate`` behind ``generate`` / ``refresh``, and the log-probs
it returns checked against a direct computation (one full forward pass per response, the policy
applied by hand in float64)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ctopd.training.config import ConfigError, RolloutConfig
from ctopd.training.rollout import generate_rollout, sample_responses
from ctopd.training.rollout_engine import ROLLOUT_ENGINES, HFRolloutEngine, build_rollout_engine

VOCAB = 64
END = 1
PROMPTS = [[5, 9, 12, 7, 30], [17, 3], [40, 41, 42]]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(3)
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
    with torch.no_grad():  # spread-out logits: top-k / top-p cut real mass
        model.lm_head.weight.mul_(8.0)
    return model


def policy_logprobs(
    logits: torch.Tensor, *, num_ids: int | None, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Reference policy on raw logits ``[n, V]`` (float64): padded rows masked, temperature,
    top-k, top-p (a token stays while the mass ranked strictly above it is below ``top_p``);
    returns ``[n, V]`` log-probabilities (``-inf`` where removed)."""
    logits = logits.double().clone()
    if num_ids is not None:
        logits[:, num_ids:] = float("-inf")
    logits = logits / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    order = probs.argsort(dim=-1, descending=True)
    ranked = probs.gather(-1, order)
    above = ranked.cumsum(-1) - ranked
    removed = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, above >= top_p)
    return logits.masked_fill(removed, float("-inf")).log_softmax(-1)


def direct_logprobs(model, prompt: list[int], response: list[int], **policy) -> torch.Tensor:
    """``[len(response)]`` log-probs of each sampled token, one unpadded forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
    rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]
    logprobs = policy_logprobs(rows, **policy)
    return logprobs.gather(-1, torch.tensor(response)[:, None])[:, 0]


@pytest.mark.parametrize(
    "policy",
    [
        dict(num_ids=None, temperature=1.0, top_k=0, top_p=1.0),
        dict(num_ids=None, temperature=0.7, top_k=7, top_p=1.0),
        dict(num_ids=None, temperature=1.3, top_k=0, top_p=0.8),
        dict(num_ids=40, temperature=0.9, top_k=10, top_p=0.9),
    ],
)
def test_logprobs_are_the_sampling_policy_of_each_drawn_token(model, policy):
    torch.manual_seed(0)
    rollout = generate_rollout(
        model, PROMPTS, end_ids=[END], pad_id=0, max_new_tokens=12, samples_per_prompt=2, **policy
    )
    assert len(rollout.response_ids) == len(rollout.logprobs) == 2 * len(PROMPTS)
    prompts = [p for p in PROMPTS for _ in range(2)]
    for prompt, response, logprobs in zip(prompts, rollout.response_ids, rollout.logprobs):
        assert logprobs.dtype == torch.float32 and logprobs.shape == (len(response),)
        expected = direct_logprobs(model, prompt, response, **policy)
        assert torch.isfinite(expected).all()  # every drawn token is inside the policy
        torch.testing.assert_close(logprobs.double(), expected, atol=2e-5, rtol=0)
    # top-k / top-p at work: some drawn tokens have a higher log-prob than under the raw logits
    if policy["top_k"] or policy["top_p"] < 1:
        raw = dict(num_ids=policy["num_ids"], temperature=policy["temperature"], top_k=0, top_p=1)
        plain = [direct_logprobs(model, p, r, **raw) for p, r in zip(prompts, rollout.response_ids)]
        assert (torch.cat(rollout.logprobs).double() > torch.cat(plain) + 1e-4).any()


def test_the_logprobs_change_neither_the_draws_nor_their_order(model):
    settings = dict(end_ids=[END], pad_id=0, max_new_tokens=10, samples_per_prompt=3)
    settings.update(temperature=0.8, top_k=12, top_p=0.95)
    torch.manual_seed(11)
    ids = sample_responses(model, PROMPTS, **settings)
    torch.manual_seed(11)
    engine = HFRolloutEngine(
        model, **{k: v for k, v in settings.items() if k != "samples_per_prompt"}
    )
    rollout = engine.generate(PROMPTS, samples_per_prompt=3)
    assert rollout.response_ids == ids and len(rollout.logprobs) == len(ids)
    torch.manual_seed(11)
    without = engine.generate(PROMPTS, samples_per_prompt=3, logprobs=False)
    assert without.response_ids == ids and without.logprobs is None


def test_greedy_is_a_point_mass(model):
    rollout = generate_rollout(
        model, PROMPTS, end_ids=[END], pad_id=0, max_new_tokens=6, temperature=0.0
    )
    greedy = sample_responses(
        model, PROMPTS, end_ids=[END], pad_id=0, max_new_tokens=6, temperature=0.0
    )
    assert rollout.response_ids == greedy
    assert all(lp.shape == (len(r),) and not lp.any() for lp, r in zip(rollout.logprobs, greedy))


def test_the_engine_generates_with_the_live_weights_inside_its_context(model):
    entered = []

    @contextmanager
    def gathered():  # as the loop's _generation_model: entered for each generate
        entered.append(True)
        yield model

    engine = build_rollout_engine(
        "hf", gathered, end_ids=[END], pad_id=0, max_new_tokens=3, temperature=0.0
    )
    saved = model.lm_head.weight.detach().clone()
    try:
        before = engine.generate([[5, 6]]).response_ids
        with torch.no_grad():  # an "optimiser step" that turns every argmax into an argmin
            model.lm_head.weight.neg_()
        engine.refresh(model)
        after = engine.generate([[5, 6]]).response_ids
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)
    assert len(entered) == 2 and before[0][0] != after[0][0]


def test_unknown_engines_are_refused():
    with pytest.raises(ValueError, match="unknown rollout engine 'vllm'; choose one of \\['hf',"):
        build_rollout_engine(
            "vllm", torch.nn.Linear(1, 1), end_ids=[END], pad_id=0, max_new_tokens=1
        )
    with pytest.raises(
        ConfigError, match="rollout.engine must be one of hf, hf_static; got 'vllm'"
    ):
        RolloutConfig(engine="vllm")
    assert RolloutConfig().engine == "hf" and set(ROLLOUT_ENGINES) == {"hf", "hf_static"}


def test_hf_static_draws_what_hf_draws(model):
    settings = dict(end_ids=[END], pad_id=0, max_new_tokens=8, temperature=0.9, top_k=20)
    draws = {}
    for name in ("hf", "hf_static"):
        torch.manual_seed(4)
        draws[name] = build_rollout_engine(name, model, **settings).generate(PROMPTS)
    assert draws["hf"].response_ids == draws["hf_static"].response_ids
    for a, b in zip(draws["hf"].logprobs, draws["hf_static"].logprobs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
