"""The on-policy distillation loop, top to bottom (ALGORITHMS §1).

One optimiser step is ``gradient_accumulation_steps`` micro-steps; each micro-step, on every rank:

1. **rollout** — the student samples responses to its own prompts (its chat template, left
   padding, stop at its end-of-turn ids). We keep the sampled ids and train on exactly them.
2. **alignment** — the teacher's tokenisation of the response text (plus its end-of-turn id when
   the student ended its turn; with identical tokenizers ``TokenizerPair`` hands it the student's
   sampled ids as they are, since re-encoding would split a non-canonical sample differently),
   then the minimal aligned chunks between the two tokenisations.
3. **teacher** — reads its tokens after *its own* chat-template prompt in one no-grad forward
   pass, in this process or on a server (``ctopd.training.teachers``; a served teacher's request
   stays in flight while the student runs step 4's forward); only what the objective needs is
   kept (``teacher_needs``).
4. **objective** — a student forward pass over prompt + sampled ids (response positions only),
   then the chosen objective (SimCT, DPCA, shared-only, ULD, same-tokenizer OPD).
5. **backward** — through ``accelerator`` (DDP / FSDP / DeepSpeed, gradient accumulation).

then gradient clipping, AdamW and the learning-rate schedule. Prompts are sharded across ranks
(every rank draws the same global batch and keeps its slice), so rollout and teacher work are
split too; the figures of a step are reduced across ranks before they are logged.

Output rows past a tokenizer's ids (a padded embedding matrix: Qwen2.5-7B has 152,064 rows for
151,665 ids) are no token, on both sides: the student never samples them and its softmax in the
objective covers its real ids only; the teacher's scores have a column per real id only.

Run it with ``ctopd train ...`` or ``accelerate launch -m ctopd train ...``; see
``ctopd.training.config`` for every option and its default.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from tqdm.auto import tqdm

from ctopd.core.pair import TokenizerPair
from ctopd.objectives import (
    compute_objective,
    objective_options,
    teacher_needs,
    teacher_outputs,
)
from ctopd.objectives.text_events import TextTables, text_tables
from ctopd.training.checkpoint import (
    export_student,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from ctopd.training.config import ConfigError, TrainConfig
from ctopd.training.data import encode_prompts, load_examples
from ctopd.training.evaluate import evaluate
from ctopd.training.metrics import MetricsLogger, StepMetrics, Timer, mean_of_last
from ctopd.training.models import (
    check_vocab,
    load_causal_lm,
    load_model_tokenizer,
    prepare_student,
)
from ctopd.training.rollout import pad_responses, response_logits, sample_responses
from ctopd.training.teachers import Teacher, load_teacher, receive_scores


@dataclass
class Prompt:
    """One usable prompt, under each model's own chat template."""

    student_ids: list[int]
    teacher_ids: list[int]


@dataclass
class Run:
    """What every micro-step reads: the config, the two models and the tokenizer pair."""

    config: TrainConfig
    accelerator: Accelerator
    student: torch.nn.Module  # prepared (DDP/FSDP/DeepSpeed wrapper)
    teacher: Teacher  # a frozen model on this rank's device, or a server's client
    pair: TokenizerPair
    student_pad_id: int
    teacher_pad_id: int

    @property
    def student_end_ids(self) -> list[int]:
        return self.pair.student_table.end_ids.tolist()

    @property
    def student_num_ids(self) -> int:
        """The student tokenizer's id count (largest id + 1). Output rows past it (a padded
        embedding matrix: Qwen2.5-7B has 152,064 rows for 151,665 ids) are no token: never
        sampled, never in a softmax."""
        return self.pair.student_table.vocab_size

    @property
    def text_tables(self) -> TextTables:
        """The pair's sorted tables for the text-event space (built on first use)."""
        pair = self.pair
        return text_tables(pair.teacher_table, pair.student_table, pair.shared_vocab,
                           cells=self.config.objective.cells)


def train(config: TrainConfig) -> dict:
    """Distil the teacher into the student on-policy; see the module docstring for one step.

    Writes ``OUTPUT_DIR/config.yaml``, ``metrics.jsonl`` (a row per step), ``checkpoint-*/`` and
    ``final/`` (the student, its tokenizer and chat template; ``from_pretrained`` loads it).

    Returns:
        ``{"final_metrics": mean of the last 5 steps' figures, "steps", "seconds",
        "output_dir", "skipped_prompts", "eval": last evaluation or None,
        "rank_param_checksums": one float per rank (equal under correct DDP)}``.

    Raises:
        ConfigError: a bad config, a model without a chat template, ...
        FloatingPointError: a non-finite loss (the step is named; the last checkpoint is kept).
    """
    config.validate("train")
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    accelerator = make_accelerator(config)
    # Different ranks must sample different responses; DDP copies rank 0's weights at wrap time.
    set_seed(config.seed, device_specific=True)

    # Tokenizers, the pair (byte tables, shared vocabulary) and both models.
    student_tokenizer = load_model_tokenizer(config.student, side="student")
    teacher_tokenizer = load_model_tokenizer(config.teacher, side="teacher")
    pair = TokenizerPair(teacher_tokenizer, student_tokenizer)
    if config.objective.name == "opd" and not pair.identical:
        raise ConfigError("objective opd (same-tokenizer OPD) needs identical tokenizers; "
                          "use simct, dpca, shared_only or uld for a cross-tokenizer pair")
    _ = pair.shared_vocab  # built once here, not inside the first step's timings
    student_end_ids = pair.student_table.end_ids.tolist()
    student = load_causal_lm(config.student, side="student")
    # In process, or teacher_server.url; its scores cover the tokenizer's ids only.
    teacher = load_teacher(config, teacher_tokenizer, num_ids=pair.teacher_table.vocab_size)
    check_vocab(student, student_tokenizer, "student")
    student = prepare_student(student, gradient_checkpointing=config.gradient_checkpointing,
                              lora=config.lora)

    # Prompts: both chat templates; too long for either side -> skipped and counted.
    prompts, skipped = _encode_prompts(config, student_tokenizer, teacher_tokenizer)
    global_batch = config.per_device_batch_size * accelerator.num_processes
    steps_per_epoch = math.ceil(len(prompts) / (global_batch * config.gradient_accumulation_steps))
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))

    # AdamW + warm-up + cosine decay (ALGORITHMS §8). The scheduler is stepped once per
    # optimiser step by hand (accelerate would step it once per process).
    optimizer, scheduler = build_optimizer(config, student, total_steps)
    student, optimizer = prepare(accelerator, student, optimizer, config)
    accelerator.register_for_checkpointing(scheduler)
    teacher.to(accelerator.device)
    accelerator.print(
        f"ctopd train: {config.teacher.name_or_path} -> {config.student.name_or_path}, objective "
        f"{config.objective.name}, {len(prompts)} prompts ({skipped} too long, skipped), "
        f"{total_steps} steps of {global_batch * config.gradient_accumulation_steps} prompts x "
        f"{config.rollout.samples_per_prompt} samples on {accelerator.num_processes} process(es); "
        f"resolved config in {output_dir / 'config.yaml'}")

    # Resume: weights, optimiser, scheduler, every rank's RNG, step and data position.
    state = {"step": 0, "epoch": 0, "position": 0, "samples": 0}
    checkpoint = resolve_resume(config.resume, output_dir)
    if checkpoint is not None:
        state.update(load_checkpoint(accelerator, checkpoint))
        accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        config.to_yaml(output_dir / "config.yaml")
    logger = MetricsLogger(output_dir, enabled=accelerator.is_main_process,
                           reporters=config.reporters, run_name=config.run_name,
                           config=config.to_dict(),
                           resume_step=state["step"] if checkpoint else None)
    run = Run(config, accelerator, student, teacher, pair, student_tokenizer.pad_token_id,
              teacher_tokenizer.pad_token_id)
    progress = tqdm(total=total_steps, initial=state["step"], desc="ctopd train", dynamic_ncols=True,
                    disable=not (config.progress and accelerator.is_main_process))
    last_eval = None
    saved_step = state["step"] if checkpoint else None

    while state["step"] < total_steps:
        step_started = time.perf_counter()
        timer = Timer(synchronize=accelerator.device.type == "cuda")
        figures = StepMetrics()
        for _ in range(config.gradient_accumulation_steps):
            indices = next_indices(state, len(prompts), global_batch, config)
            mine = indices[accelerator.process_index * config.per_device_batch_size:][
                : config.per_device_batch_size]
            with accelerator.accumulate(student):
                figures.add(_micro_step(run, [prompts[i] for i in mine], timer,
                                        step=state["step"] + 1, last_saved=saved_step))
        with timer("optimizer"):
            grad_norm = clip_gradients(accelerator, student, config.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["samples"] += global_batch * config.gradient_accumulation_steps * (
            config.rollout.samples_per_prompt)

        row = {"step": state["step"], **figures.reduce(accelerator, timer)}
        seconds = time.perf_counter() - step_started
        row.update(epoch=state["epoch"] + state["position"] / len(prompts),
                   lr=scheduler.get_last_lr()[0], grad_norm=grad_norm, time_step=seconds,
                   tokens_per_second=row.get("response_tokens", 0.0) / max(seconds, 1e-9),
                   skipped_prompts=skipped)
        if config.eval_data and (state["step"] == total_steps or (
                config.eval_every and state["step"] % config.eval_every == 0)):
            last_eval = evaluate_during_training(accelerator, student, student_tokenizer, config)
            row.update(eval_accuracy=last_eval["accuracy"], eval_examples=last_eval["num_examples"])
        logger.log(row)
        progress.update(1)
        progress.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}",
                             kl=f"{row.get('kl', float('nan')):.4f}",
                             cov=f"{row.get('coverage', 0.0):.2f}")
        if not config.progress and state["step"] % config.log_every == 0:
            accelerator.print(console_line(row))
        if state["step"] == total_steps or (
                config.save_every and state["step"] % config.save_every == 0):
            save_checkpoint(accelerator, student, student_tokenizer, output_dir, dict(state),
                            end_ids=student_end_ids, keep=config.keep_checkpoints)
            saved_step = state["step"]
    progress.close()

    checksums = gather_object([param_checksum(accelerator.unwrap_model(student))])
    export_student(accelerator, student, student_tokenizer, output_dir / "final",
                   end_ids=student_end_ids, merge_lora=True)
    logger.close()
    summary = {
        "final_metrics": mean_of_last(_read_rows(logger)),
        "steps": state["step"], "seconds": time.perf_counter() - started,
        "output_dir": str(output_dir), "skipped_prompts": skipped, "eval": last_eval,
        "rank_param_checksums": checksums, "num_prompts": len(prompts),
    }
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(_json(summary), encoding="utf-8")
    accelerator.wait_for_everyone()
    return summary


def _micro_step(run: Run, prompts: list[Prompt], timer: Timer, *, step: int,
                last_saved: int | None) -> dict[str, float]:
    """Rollout → alignment → teacher → objective → backward for this rank's prompts.

    Returns:
        The objective's figures plus response counts (python floats).
    """
    config, accelerator, pair = run.config, run.accelerator, run.pair
    samples = config.rollout.samples_per_prompt
    student_prompts = [p.student_ids for p in prompts for _ in range(samples)]
    teacher_prompts = [p.teacher_ids for p in prompts for _ in range(samples)]
    device = accelerator.device

    # 1. Rollout: the student samples; these exact ids are what it trains on.
    with timer("rollout"), _generation_model(accelerator, run.student) as generator:
        student_responses = sample_responses(
            generator, [p.student_ids for p in prompts], end_ids=run.student_end_ids,
            pad_id=run.student_pad_id, max_new_tokens=config.rollout.max_new_tokens,
            temperature=config.rollout.temperature, top_p=config.rollout.top_p,
            top_k=config.rollout.top_k, samples_per_prompt=samples, device=device,
            num_ids=run.student_num_ids)

    # 2. Alignment: the teacher's tokenisation of the response text (with identical tokenizers
    # the sampled ids themselves, standard OPD) and the minimal aligned chunks of the two.
    with timer("alignment"):
        teacher_responses = pair.teacher_ids_for_batch(student_responses)
        alignments = pair.align_batch(teacher_responses, student_responses)

    # 3. Teacher: scores its own tokenisation after its own prompt, no grad, in process or on a
    # server. A served teacher's scores may still be on their way: they are read after the
    # student's forward (which runs meanwhile); an in-process teacher's are read at once.
    needs = teacher_needs(config.objective.name, **_objective_options(config))

    def read_teacher():
        logits = receive_scores(pending, step=step, last_saved=last_saved)  # [B, n, V_T]
        return teacher_outputs(
            logits, teacher_ids, pair.shared_vocab, needs,
            slice_size=config.objective.slice_size, top_k=config.objective.top_k,
            alignments=alignments, student_ids=student_responses,
            text_tables=run.text_tables if "text_events" in needs else None)

    with timer("teacher"):
        teacher_ids, _ = pad_responses(teacher_responses, pad_id=-1, device=device)
        pending = (run.teacher.submit(teacher_prompts, teacher_responses, needs=needs)
                   if needs else None)
        teacher_scores = read_teacher() if pending is not None and pending.done() else None

    # 4. Objective: a student forward over prompt + sampled ids, then the loss.
    with timer("student_forward"):
        student_ids, _ = pad_responses(student_responses, device=device)
        student_logits = response_logits(run.student, student_prompts, student_responses,
                                         pad_id=run.student_pad_id, device=device)
        # Padded output rows are no token: the objective's softmax covers the real ids only.
        student_logits = student_logits[..., : run.student_num_ids]  # [B, m, V_S]
    if pending is not None and teacher_scores is None:
        with timer("teacher"):  # the wait the student's forward did not hide
            teacher_scores = read_teacher()
    # No student_old_logprobs: one update per rollout, so DPCA's π_old is the current policy
    # detached (ratio 1), which the objective uses when given None.
    with timer("loss"):
        try:
            loss, metrics = compute_objective(
                config.objective.name, student_logits=student_logits, student_ids=student_ids,
                alignments=alignments, shared_vocab=pair.shared_vocab, teacher=teacher_scores,
                **_objective_options(config))
            problem = None if torch.isfinite(loss.detach()).all() else f"loss {loss.item()}"
        except ValueError as err:  # the objectives refuse NaN/inf logits
            if "NaN" not in str(err):
                raise
            problem = str(err)
    bad = torch.tensor(float(problem is not None), device=device)
    if accelerator.reduce(bad, reduction="sum").item() > 0:  # every rank stops together
        where = f"checkpoint of step {last_saved} kept" if last_saved else "no checkpoint yet"
        raise FloatingPointError(f"non-finite loss at step {step} ({problem or 'another rank'}); "
                                 f"stopping, {where}. Lower optim.lr or check the dtypes.")

    # 5. Backward (accelerate scales by the accumulation steps and syncs on the last one).
    with timer("backward"):
        accelerator.backward(loss)
    ended = sum(pair.ended_turn(r) for r in student_responses)
    metrics.update(responses=len(student_responses), ended_responses=ended, prompts=len(prompts),
                   response_tokens=sum(len(r) for r in student_responses),
                   teacher_tokens=sum(len(t) for t in teacher_responses))
    return metrics


def _objective_options(config: TrainConfig) -> dict:
    """The config's objective options that the chosen objective accepts (flat keywords)."""
    o = config.objective
    values = dict(divergence=o.divergence, beta=o.beta, temperature=o.temperature,
                  weight_by_tokens=o.weight_by_tokens, advantage_clip=o.advantage_clip,
                  clip_low=o.clip_low, clip_high=o.clip_high, epsilon=o.epsilon, top_k=o.top_k,
                  slice_size=o.slice_size, space=o.space, cells=o.cells)
    accepted = objective_options(o.name)
    return {key: value for key, value in values.items() if key in accepted}


def _encode_prompts(config: TrainConfig, student_tokenizer, teacher_tokenizer):
    """Both sides' prompt ids; prompts longer than ``data.max_prompt_tokens`` on either side
    are dropped and counted."""
    examples = load_examples(config.data)
    student_ids = encode_prompts(student_tokenizer, examples, side="student")
    teacher_ids = encode_prompts(teacher_tokenizer, examples, side="teacher")
    limit = config.data.max_prompt_tokens
    prompts = [Prompt(s, t) for s, t in zip(student_ids, teacher_ids)
               if len(s) <= limit and len(t) <= limit]
    if not prompts:
        raise ConfigError(f"all {len(examples)} prompts are longer than data.max_prompt_tokens "
                          f"({limit}); raise it")
    return prompts, len(examples) - len(prompts)


def next_indices(state: dict, num_prompts: int, count: int, config: TrainConfig) -> list[int]:
    """The next ``count`` prompt indices of the seeded epoch order; advances ``state``'s data
    position (epoch, position) so a resumed run continues where this one stopped."""
    out: list[int] = []
    while len(out) < count:
        order = torch.arange(num_prompts)
        if config.data.shuffle:
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + state["epoch"])
            order = torch.randperm(num_prompts, generator=generator)
        take = order[state["position"] : state["position"] + count - len(out)].tolist()
        out += take
        state["position"] += len(take)
        if state["position"] >= num_prompts:
            state["epoch"] += 1
            state["position"] = 0
    return out


def build_optimizer(config: TrainConfig, model: torch.nn.Module, total_steps: int):
    """AdamW over the trainable parameters and its ``LambdaLR`` schedule."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.optim.lr, eps=config.optim.eps,
                                  betas=(config.optim.beta1, config.optim.beta2),
                                  weight_decay=config.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config, total_steps))
    return optimizer, scheduler


def prepare(accelerator: Accelerator, model, optimizer, config: TrainConfig):
    """``accelerator.prepare`` for a loop without a DataLoader: DeepSpeed is told the
    micro-batch size it would otherwise read from one."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.per_device_batch_size
    return accelerator.prepare(model, optimizer)


def lr_schedule(config: TrainConfig, total_steps: int):
    """Multiplier of ``optim.lr`` at each step: linear warm-up, then cosine / linear decay to
    ``optim.min_lr`` (or constant)."""
    warmup = int(config.optim.warmup_ratio * total_steps)
    floor = config.optim.min_lr / config.optim.lr
    schedule = config.optim.schedule

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return multiplier


def clip_gradients(accelerator: Accelerator, model, max_norm: float) -> float:
    """Clip the gradient norm (when asked) and return it (pre-clipping)."""
    if max_norm > 0:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        return float(norm) if norm is not None else float("nan")  # DeepSpeed clips internally
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


@contextmanager
def _generation_model(accelerator: Accelerator, model):
    """The student as a plain model ``generate`` can run: DDP unwrapped; DeepSpeed ZeRO-3 and
    FSDP parameters gathered for the duration (generation is not sharded)."""
    unwrapped = accelerator.unwrap_model(model)
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield unwrapped
    elif kind == DistributedType.FSDP and hasattr(model, "summon_full_params"):
        with model.summon_full_params(model, writeback=False, recurse=False):
            yield unwrapped
    else:
        yield unwrapped


def evaluate_during_training(accelerator, student, tokenizer, config: TrainConfig) -> dict:
    """Accuracy on ``eval_data`` (main process, greedy, training RNG untouched)."""
    result = None
    if accelerator.is_main_process:
        with torch.random.fork_rng(devices=[]):
            result = evaluate(accelerator.unwrap_model(student), tokenizer, config.eval_data,
                              max_new_tokens=config.eval_max_new_tokens,
                              batch_size=config.per_device_batch_size, limit=config.eval_limit,
                              data_config=config.data, device=accelerator.device)
    return gather_object([result])[0]


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The run's ``Accelerator``. In a single, unlaunched process (a notebook, the demo, tests)
    accelerate's process-wide state is reset first so runs with different mixed precision can
    follow each other; launched processes keep theirs."""
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps)
    check_launch(accelerator)
    return accelerator


def check_launch(accelerator: Accelerator) -> None:
    """Refuse processes that a launcher started but that are not connected to each other (on a
    machine without GPUs, ``accelerate launch --multi_gpu`` does that unless
    ``ACCELERATE_USE_CPU=1`` is set): each would train alone on the same output dir."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise ConfigError(
            f"{launched} processes were launched but accelerate sees {accelerator.num_processes}; "
            "on CPU run `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N "
            "-m ctopd train ...` (gloo DDP)")


def param_checksum(model) -> float:
    """A float64 fingerprint of the weights (equal on every rank when DDP works)."""
    total = 0.0
    for index, param in enumerate(model.parameters()):
        data = param.detach().double()
        total += (index + 1) * float(data.sum()) + float(data.square().sum())
    return total


def console_line(row: dict) -> str:
    keys = ("step", "loss", "kl", "coverage", "response_length_mean", "lr", "time_step")
    return "  ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}"
                     for k in keys if k in row)


def _read_rows(logger: MetricsLogger) -> list[dict]:
    from ctopd.training.metrics import read_metrics

    return read_metrics(logger.path.parent) if logger.path.exists() else []


def _json(value) -> str:
    import json

    return json.dumps(value, indent=2, default=str)
