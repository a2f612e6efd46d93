"""The SFT baseline (docs/concepts/baselines.md): the student is trained with cross-entropy on its own
tokenisation of response *text* — reference responses from the data file (``sft.source=data``) or
responses the teacher samples under its own chat template (``sft.source=teacher``).

A training example is ``student prompt ids`` (its chat template, generation prompt appended, no
loss) followed by ``student encoding of the response text + its end-of-turn id`` (loss): the same
layout the student produces when it samples, so SFT and on-policy training see the same inputs.
The same function trains the demo's teacher from scratch on reference answers.

Outputs match :func:`ctopd.training.loop.train`: ``config.yaml``, ``metrics.jsonl``,
``checkpoint-*/``, ``final/``, ``summary.json``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from ctopd.core.byte_table import end_of_turn_ids
from ctopd.objectives.baselines import mean_token_nll
from ctopd.training.config import ConfigError, TrainConfig
from ctopd.training.data import DataError, Example, encode_prompts, load_examples
from ctopd.training.metrics import StepMetrics
from ctopd.training.models import (
    check_vocab,
    freeze,
    load_causal_lm,
    load_model_tokenizer,
    prepare_student,
)
from ctopd.training.rollout import (
    count_token_ids,
    pad_responses,
    parameters_sharded,
    response_student_logits,
)
from ctopd.training.rollout_engine import build_rollout_engine
from ctopd.training.runtime import Runtime, next_indices


def run_sft(config: TrainConfig) -> dict:
    """Supervised fine-tuning of the student on response text.

    The run folder, resuming, non-finite figures and signals follow the rules of
    :mod:`ctopd.training.runtime`, as in ``ctopd train``.

    Returns:
        The same summary as :func:`ctopd.training.loop.train` (``final_metrics``, ``steps``,
        ``seconds``, ``output_dir``, ...) plus ``num_examples`` and ``truncated_responses``.

    Raises:
        ConfigError, DataError: bad input, before the student loads where it can be.
        RunStopped: a non-finite loss, gradient norm or weight, SIGTERM or SIGINT.
    """
    config.validate("sft")
    with Runtime(config, "sft") as runtime:  # the run folder is checked and locked here
        accelerator = runtime.accelerator
        set_seed(config.seed, device_specific=True)
        # The data first: a bad row fails before any model loads.
        examples = load_examples(config.data, response_field=config.sft.response_field)
        tokenizer = load_model_tokenizer(config.student, side="student")
        end_ids = end_of_turn_ids(tokenizer)
        if not end_ids:
            raise ConfigError("the student tokenizer has no EOS or end-of-turn token")
        end_of_turn = _end_of_turn_id(tokenizer, end_ids)

        if config.sft.source == "teacher":
            responses = _teacher_responses(config, examples, accelerator, runtime.output_dir)
            examples = [e for e in examples for _ in range(config.rollout.samples_per_prompt)]
        else:
            responses = [e.response for e in examples]
            missing = [i for i, r in enumerate(responses) if r is None]
            if missing:
                fields = dict.fromkeys(
                    [config.sft.response_field, "response", config.data.answer_field]
                )
                raise DataError(
                    f"sft.source=data but row {missing[0] + 1} of the data has no "
                    f"response text (looked in {', '.join(fields)})"
                )
        data, skipped, truncated = _encode(config, tokenizer, examples, responses, end_of_turn)
        if truncated and accelerator.is_main_process:
            print(
                f"ctopd sft: warning: {truncated} of {len(data)} responses are longer than "
                f"rollout.max_new_tokens ({config.rollout.max_new_tokens} tokens) and are cut "
                "there, without their end-of-turn token; raise --rollout.max-new-tokens to "
                "train on them whole",
                file=sys.stderr,
                flush=True,
            )

        student = load_causal_lm(config.student, side="student")
        check_vocab(student, tokenizer, "student")
        student = prepare_student(
            student, gradient_checkpointing=config.gradient_checkpointing, lora=config.lora
        )
        global_batch = config.per_device_batch_size * accelerator.num_processes
        per_step = global_batch * config.gradient_accumulation_steps
        total_steps = config.max_steps or max(
            1, math.ceil(config.epochs * math.ceil(len(data) / per_step))
        )
        student, _, _ = runtime.prepare(
            student, tokenizer, end_ids=end_ids, total_steps=total_steps, num_items=len(data)
        )
        pad_id, device = tokenizer.pad_token_id, accelerator.device
        # Output rows past the tokenizer's ids (a padded embedding matrix) are no token: the
        # cross-entropy's softmax runs over the real ids only.
        student_num_ids = count_token_ids(tokenizer)

        while runtime.step < total_steps:
            timer, figures = runtime.start_step(), StepMetrics()
            for _ in range(config.gradient_accumulation_steps):
                indices = next_indices(runtime.state, len(data), global_batch, config)
                mine = indices[accelerator.process_index * config.per_device_batch_size :][
                    : config.per_device_batch_size
                ]
                prompts = [data[i][0] for i in mine]
                targets = [data[i][1] for i in mine]
                with accelerator.accumulate(student):
                    with timer("student_forward"):
                        # Hidden states + output layer: the loss projects a slice of rows at
                        # a time (no [B, m, V] logits), or full logits where the head is sharded.
                        logits = response_student_logits(
                            student,
                            accelerator.unwrap_model(student),
                            prompts,
                            targets,
                            pad_id=pad_id,
                            device=device,
                            num_ids=student_num_ids,
                            sharded=parameters_sharded(accelerator),
                        )
                    with timer("loss"):
                        ids, _ = pad_responses(targets, pad_id=-100, device=device)
                        loss = mean_token_nll(logits, ids)
                    # Every rank, before any backward: one rank alone stopping would leave the
                    # others waiting in DDP's gradient all-reduce.
                    runtime.stop_if_non_finite(
                        None if torch.isfinite(loss.detach()) else f"the loss is {loss.item()}"
                    )
                    with timer("backward"):
                        accelerator.backward(loss)
                tokens = sum(len(t) for t in targets)
                figures.add(
                    {
                        "loss": loss.item(),
                        "student_tokens": tokens,
                        "response_tokens": tokens,
                        "responses": len(targets),
                        "prompts": len(targets),
                    }
                )
            runtime.optimizer_step(timer)  # stops first if the gradient norm is not finite
            runtime.state["samples"] += per_step
            row = figures.reduce(accelerator, timer)
            row.pop("coverage", None)
            runtime.end_step(row)
        return runtime.finish(
            {
                "num_examples": len(data),
                "skipped_prompts": skipped,
                "truncated_responses": truncated,
            }
        )


def _end_of_turn_id(tokenizer, end_ids: list[int]) -> int:
    """The id the student writes to end its turn: the template's marker, else EOS."""
    others = [i for i in end_ids if i != tokenizer.eos_token_id]
    return others[0] if others else end_ids[0]


def _encode(
    config: TrainConfig, tokenizer, examples: list[Example], responses: list[str], end_of_turn: int
):
    """``(prompt ids, response ids + end id)`` per example; over-long prompts are skipped and
    responses longer than ``rollout.max_new_tokens`` are truncated (without an end id)."""
    prompts = encode_prompts(tokenizer, examples, side="student")
    encoded = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    limit, longest = config.data.max_prompt_tokens, config.rollout.max_new_tokens
    data, truncated = [], 0
    for prompt, response in zip(prompts, encoded):
        if len(prompt) > limit:
            continue
        target = list(response) + [end_of_turn]
        if len(target) > longest:
            target, truncated = target[:longest], truncated + 1
        data.append((prompt, target))
    if not data:
        raise ConfigError(
            f"all {len(prompts)} prompts are longer than data.max_prompt_tokens ({limit}); raise it"
        )
    return data, len(prompts) - len(data), truncated


def _teacher_responses(
    config: TrainConfig, examples: list[Example], accelerator: Accelerator, output_dir: Path
) -> list[str]:
    """The teacher's sampled responses (``samples_per_prompt`` per prompt, adjacent), generated
    once across all ranks and cached in ``OUTPUT_DIR/teacher_responses.jsonl``."""
    cache = output_dir / "teacher_responses.jsonl"
    expected = len(examples) * config.rollout.samples_per_prompt
    if cache.is_file():
        rows = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines()]
        if len(rows) == expected:
            return [r["response"] for r in rows]
    tokenizer = load_model_tokenizer(config.teacher, side="teacher")
    teacher = freeze(load_causal_lm(config.teacher, side="teacher")).to(accelerator.device)
    end_ids = end_of_turn_ids(tokenizer)
    prompts = encode_prompts(tokenizer, examples, side="teacher")
    rank, world, batch = (
        accelerator.process_index,
        accelerator.num_processes,
        config.per_device_batch_size,
    )
    mine = list(range(rank, len(examples), world))
    rollouts = build_rollout_engine(
        config.rollout.engine,
        teacher,
        end_ids=end_ids,
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=config.rollout.max_new_tokens,
        temperature=config.rollout.temperature,
        top_p=config.rollout.top_p,
        top_k=config.rollout.top_k,
        num_ids=count_token_ids(tokenizer),  # the teacher's padded rows are no token
        device=accelerator.device,
    )
    out = []
    for lo in range(0, len(mine), batch):
        chunk = mine[lo : lo + batch]
        responses = rollouts.generate(
            [prompts[i] for i in chunk],
            samples_per_prompt=config.rollout.samples_per_prompt,
            logprobs=False,
        ).response_ids
        for n, response in enumerate(responses):
            index = chunk[n // config.rollout.samples_per_prompt]
            text = tokenizer.decode(response, skip_special_tokens=True)
            out.append((index, n % config.rollout.samples_per_prompt, text))
    rows = sorted(gather_object(out))
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        cache.write_text(
            "".join(
                json.dumps({"index": i, "sample": s, "response": t}) + "\n" for i, s, t in rows
            ),
            encoding="utf-8",
        )
    del teacher
    return [t for _, _, t in rows]
