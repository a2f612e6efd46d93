"""What the demo measures on a model folder: held-out accuracy, the common sequence-level KL and
how often the student spells its text non-canonically; and a run's coverage from its metrics."""

from __future__ import annotations

from pathlib import Path

from ctopd.demo.settings import DemoSettings


def accuracy(model_dir: Path, data_path: Path, settings: DemoSettings) -> float:
    """Greedy exact-final-answer accuracy on every row of ``data_path``."""
    scores = outcomes(model_dir, data_path, settings)
    return scores.count("1") / len(scores)


def outcomes(
    model_dir: Path,
    data_path: Path,
    settings: DemoSettings,
    responses_path: Path | None = None,
    *,
    sampled: bool = False,
) -> str:
    """Exact-final-answer outcome of every row of ``data_path`` (``eval_batch`` prompts per
    ``generate`` call), in order, as a string of ``1`` (right) and ``0`` (wrong): compact in
    ``results.json``, and what paired comparisons need. ``responses_path``: where to keep each
    response (one JSON row per problem).

    ``sampled``: one response per problem at ``settings.sampled_temperature``, seeded with
    ``settings.sampled_seed`` for every model, instead of the greedy one. Sampled accuracy also
    counts the probability a model leaves on wrong tokens, which the reverse KL of on-policy
    distillation penalises (logit gradient about ``q log(1/p)`` for a token the teacher rules
    out) and continued SFT barely does (``q``)."""
    from ctopd.training.evaluate import evaluate

    if sampled and settings.sampled_temperature is None:
        raise ValueError("sampled outcomes need DemoSettings.sampled_temperature")
    result = evaluate(
        str(model_dir),
        None,
        data_path,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.eval_batch,
        output_path=responses_path,
        temperature=settings.sampled_temperature if sampled else 0.0,
        seed=settings.sampled_seed,
    )
    return "".join("1" if hit else "0" for hit in result["outcomes"])


def measure_outcomes(job: dict) -> dict:
    """:func:`outcomes` of ``job["model"]`` on ``job["data"]`` (in a worker process), returned
    with the job's ``key`` and ``sampled`` flag."""
    from ctopd.demo.stages import one_thread

    one_thread()
    sampled = bool(job.get("sampled", False))
    return {
        "key": job["key"],
        "sampled": sampled,
        "outcomes": outcomes(
            Path(job["model"]), Path(job["data"]), job["settings"], sampled=sampled
        ),
    }


def sequence_kl(
    student_dir: Path, teacher_dir: Path, data_path: Path, settings: DemoSettings
) -> dict:
    """Reverse KL per student token, the same for every method and either student (each
    objective's own ``kl`` is over its own supervision space, not comparable), and how often the
    student spells its text with other tokens than its tokenizer would.

    The student samples ``y`` (temperature 1) for each of the first ``settings.kl_prompts``
    prompts of ``data_path``; ``log π(y)`` sums its token log-probs, ``log q(y)`` is the
    teacher's log-prob of the same text in its own tokens (end of turn included).

    Returns:
        ``kl``: ``Σ (log π(y) - log q(y)) / Σ |y|`` (nats per student token); ``noncanonical``:
        the share of responses whose ids differ from the student tokenizer's encoding of their
        text (a student that learned to spell numbers digit by digit, say).
    """
    import torch

    from ctopd.core.pair import TokenizerPair
    from ctopd.training.config import DataConfig, ModelConfig
    from ctopd.training.data import encode_prompts, load_examples
    from ctopd.training.models import load_causal_lm, load_model_tokenizer
    from ctopd.training.rollout import sample_responses

    examples = load_examples(DataConfig(path=str(data_path), limit=settings.kl_prompts))
    tokenizers, models, prompts = {}, {}, {}
    for side, folder in (("student", student_dir), ("teacher", teacher_dir)):
        config = ModelConfig(name_or_path=str(folder))
        tokenizers[side] = load_model_tokenizer(config, side=side)
        models[side] = load_causal_lm(config, side=side).eval()
        prompts[side] = encode_prompts(tokenizers[side], examples, side=side)
    pair = TokenizerPair(tokenizers["teacher"], tokenizers["student"])
    pad = {side: tokenizer.pad_token_id for side, tokenizer in tokenizers.items()}
    total, tokens, noncanonical, batch = 0.0, 0, 0, settings.eval_batch
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        for lo in range(0, len(examples), batch):
            responses = sample_responses(
                models["student"],
                prompts["student"][lo : lo + batch],
                end_ids=pair.student_table.end_ids.tolist(),
                pad_id=pad["student"],
                max_new_tokens=settings.max_new_tokens,
                temperature=1.0,
            )
            both = {"student": responses, "teacher": pair.teacher_ids_for_batch(responses)}
            for side, sign in (("student", 1), ("teacher", -1)):
                batch_prompts = prompts[side][lo : lo + batch]
                total += sign * _logprob_sum(models[side], batch_prompts, both[side], pad[side])
            tokens += sum(len(r) for r in responses)
            noncanonical += sum(_noncanonical(pair, tokenizers["student"], r) for r in responses)
    return {"kl": total / max(tokens, 1), "noncanonical": noncanonical / max(len(examples), 1)}


def _logprob_sum(model, prompts: list, responses: list, pad_id: int) -> float:
    """``Σ_b log p(responses[b] | prompts[b])`` under ``model``."""
    import torch

    from ctopd.training.rollout import pad_responses, response_logits

    logits = response_logits(model, prompts, responses, pad_id=pad_id, device="cpu")
    targets, lengths = pad_responses(responses)
    logprobs = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = torch.arange(targets.shape[1]) < lengths.unsqueeze(1)
    return float((logprobs * mask).sum())


def _noncanonical(pair, tokenizer, ids) -> bool:
    """Whether a sampled response's ids (end of turn aside) differ from the tokenizer's own
    encoding of its text."""
    body = ids[:-1] if pair.ended_turn(ids) else ids
    return list(body) != tokenizer.encode(pair.student_text(body), add_special_tokens=False)


def coverage(rows: list[dict]) -> tuple[float, float, float]:
    """Over every step of a run (``metrics.jsonl`` rows): supervised student tokens / sampled
    student tokens, supervised / aligned student tokens (those outside unaligned chunks), and
    the unaligned share."""
    sampled = sum(r["student_tokens"] for r in rows if "student_tokens" in r)
    supervised = sum(r["supervised_tokens"] for r in rows if "supervised_tokens" in r)
    unaligned = sum(
        round(r["student_tokens"] * r["unaligned_share"]) for r in rows if "unaligned_share" in r
    )  # integer counts, stored as shares
    aligned = sampled - unaligned
    return (
        supervised / sampled if sampled else 0.0,
        supervised / aligned if aligned > 0 else 0.0,
        unaligned / sampled if sampled else 0.0,
    )
