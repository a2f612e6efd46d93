"""The SFT baseline (ALGORITHMS §6): the student is trained with cross-entropy on its own
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
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from ctopd.core.byte_table import end_of_turn_ids
from ctopd.training.checkpoint import (
    export_student,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from ctopd.training.config import ConfigError, TrainConfig
from ctopd.training.data import DataError, Example, encode_prompts, load_examples
from ctopd.training.loop import (
    build_optimizer,
    clip_gradients,
    console_line,
    evaluate_during_training,
    make_accelerator,
    next_indices,
    param_checksum,
    prepare,
)
from ctopd.training.metrics import MetricsLogger, StepMetrics, Timer, mean_of_last, read_metrics
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
    response_logits,
    sample_responses,
)


def run_sft(config: TrainConfig) -> dict:
    """Supervised fine-tuning of the student on response text.

    Returns:
        The same summary as :func:`ctopd.training.loop.train` (``final_metrics``, ``steps``,
        ``seconds``, ``output_dir``, ...) plus ``num_examples`` and ``truncated_responses``.
    """
    config.validate("sft")
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    accelerator = make_accelerator(config)
    set_seed(config.seed, device_specific=True)
    tokenizer = load_model_tokenizer(config.student, side="student")
    end_ids = end_of_turn_ids(tokenizer)
    if not end_ids:
        raise ConfigError("the student tokenizer has no EOS or end-of-turn token")
    end_of_turn = _end_of_turn_id(tokenizer, end_ids)

    examples = load_examples(config.data, response_field=config.sft.response_field)
    if config.sft.source == "teacher":
        responses = _teacher_responses(config, examples, accelerator, output_dir)
        examples = [e for e in examples for _ in range(config.rollout.samples_per_prompt)]
    else:
        responses = [e.response for e in examples]
        missing = [i for i, r in enumerate(responses) if r is None]
        if missing:
            fields = dict.fromkeys([config.sft.response_field, "response",
                                    config.data.answer_field])
            raise DataError(f"sft.source=data but row {missing[0] + 1} of the data has no "
                            f"response text (looked in {', '.join(fields)})")
    data, skipped, truncated = _encode(config, tokenizer, examples, responses, end_of_turn)

    student = load_causal_lm(config.student, side="student")
    check_vocab(student, tokenizer, "student")
    student = prepare_student(student, gradient_checkpointing=config.gradient_checkpointing,
                              lora=config.lora)
    global_batch = config.per_device_batch_size * accelerator.num_processes
    steps_per_epoch = math.ceil(len(data) / (global_batch * config.gradient_accumulation_steps))
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    optimizer, scheduler = build_optimizer(config, student, total_steps)
    student, optimizer = prepare(accelerator, student, optimizer, config)
    accelerator.register_for_checkpointing(scheduler)

    state = {"step": 0, "epoch": 0, "position": 0, "samples": 0}
    checkpoint = resolve_resume(config.resume, output_dir)
    if checkpoint is not None:
        state.update(load_checkpoint(accelerator, checkpoint))
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        config.to_yaml(output_dir / "config.yaml")
    logger = MetricsLogger(output_dir, enabled=accelerator.is_main_process,
                           reporters=config.reporters, run_name=config.run_name,
                           config=config.to_dict(),
                           resume_step=state["step"] if checkpoint else None)
    progress = tqdm(total=total_steps, initial=state["step"], desc="ctopd sft", dynamic_ncols=True,
                    disable=not (config.progress and accelerator.is_main_process))
    pad_id, last_eval = tokenizer.pad_token_id, None
    # Output rows past the tokenizer's ids (a padded embedding matrix) are no token: the
    # cross-entropy's softmax runs over the real ids only.
    student_num_ids = count_token_ids(tokenizer)

    while state["step"] < total_steps:
        step_started = time.perf_counter()
        timer = Timer(synchronize=accelerator.device.type == "cuda")
        figures = StepMetrics()
        for _ in range(config.gradient_accumulation_steps):
            indices = next_indices(state, len(data), global_batch, config)
            mine = indices[accelerator.process_index * config.per_device_batch_size:][
                : config.per_device_batch_size]
            prompts = [data[i][0] for i in mine]
            targets = [data[i][1] for i in mine]
            with accelerator.accumulate(student):
                with timer("student_forward"):
                    logits = response_logits(student, prompts, targets, pad_id=pad_id,
                                             device=accelerator.device)
                with timer("loss"):
                    ids, _ = pad_responses(targets, pad_id=-100, device=accelerator.device)
                    loss = F.cross_entropy(logits[..., :student_num_ids].float().flatten(0, 1),
                                           ids.flatten(), ignore_index=-100)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite SFT loss at step {state['step'] + 1}")
                with timer("backward"):
                    accelerator.backward(loss)
            tokens = sum(len(t) for t in targets)
            figures.add({"loss": loss.item(), "student_tokens": tokens, "response_tokens": tokens,
                         "responses": len(targets), "prompts": len(targets)})
        with timer("optimizer"):
            grad_norm = clip_gradients(accelerator, student, config.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["samples"] += global_batch * config.gradient_accumulation_steps
        row = figures.reduce(accelerator, timer)
        row.pop("coverage", None)
        seconds = time.perf_counter() - step_started
        row.update(step=state["step"], epoch=state["epoch"] + state["position"] / len(data),
                   lr=scheduler.get_last_lr()[0], grad_norm=grad_norm, time_step=seconds,
                   tokens_per_second=row.get("response_tokens", 0.0) / max(seconds, 1e-9))
        if config.eval_data and (state["step"] == total_steps or (
                config.eval_every and state["step"] % config.eval_every == 0)):
            last_eval = evaluate_during_training(accelerator, student, tokenizer, config)
            row.update(eval_accuracy=last_eval["accuracy"], eval_examples=last_eval["num_examples"])
        logger.log(row)
        progress.update(1)
        progress.set_postfix(loss=f"{row['loss']:.4f}")
        if not config.progress and state["step"] % config.log_every == 0:
            accelerator.print(console_line(row))
        if state["step"] == total_steps or (
                config.save_every and state["step"] % config.save_every == 0):
            save_checkpoint(accelerator, student, tokenizer, output_dir, dict(state),
                            end_ids=end_ids, keep=config.keep_checkpoints)
    progress.close()

    checksums = gather_object([param_checksum(accelerator.unwrap_model(student))])
    export_student(accelerator, student, tokenizer, output_dir / "final", end_ids=end_ids,
                   merge_lora=True)
    logger.close()
    rows = read_metrics(output_dir) if (output_dir / "metrics.jsonl").exists() else []
    summary = {
        "final_metrics": mean_of_last(rows), "steps": state["step"],
        "seconds": time.perf_counter() - started, "output_dir": str(output_dir),
        "num_examples": len(data), "skipped_prompts": skipped,
        "truncated_responses": truncated, "eval": last_eval, "rank_param_checksums": checksums,
    }
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str),
                                                 encoding="utf-8")
    accelerator.wait_for_everyone()
    return summary


def _end_of_turn_id(tokenizer, end_ids: list[int]) -> int:
    """The id the student writes to end its turn: the template's marker, else EOS."""
    others = [i for i in end_ids if i != tokenizer.eos_token_id]
    return others[0] if others else end_ids[0]


def _encode(config: TrainConfig, tokenizer, examples: list[Example], responses: list[str],
            end_of_turn: int):
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
        raise ConfigError(f"all {len(prompts)} prompts are longer than data.max_prompt_tokens "
                          f"({limit}); raise it")
    return data, len(prompts) - len(data), truncated


def _teacher_responses(config: TrainConfig, examples: list[Example], accelerator: Accelerator,
                       output_dir: Path) -> list[str]:
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
    rank, world, batch = accelerator.process_index, accelerator.num_processes, \
        config.per_device_batch_size
    mine = list(range(rank, len(examples), world))
    out = []
    for lo in range(0, len(mine), batch):
        chunk = mine[lo : lo + batch]
        responses = sample_responses(
            teacher, [prompts[i] for i in chunk], end_ids=end_ids, pad_id=tokenizer.pad_token_id,
            max_new_tokens=config.rollout.max_new_tokens, temperature=config.rollout.temperature,
            top_p=config.rollout.top_p, top_k=config.rollout.top_k,
            samples_per_prompt=config.rollout.samples_per_prompt, device=accelerator.device,
            num_ids=count_token_ids(tokenizer))  # the teacher's padded rows are no token
        for n, response in enumerate(responses):
            index = chunk[n // config.rollout.samples_per_prompt]
            text = tokenizer.decode(response, skip_special_tokens=True)
            out.append((index, n % config.rollout.samples_per_prompt, text))
    rows = sorted(gather_object(out))
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        cache.write_text("".join(json.dumps({"index": i, "sample": s, "response": t}) + "\n"
                                 for i, s, t in rows), encoding="utf-8")
    del teacher
    return [t for _, _, t in rows]
