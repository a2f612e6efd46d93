"""The on-policy distillation loop, top to bottom (docs/concepts/one-step.md).

One optimiser step is ``gradient_accumulation_steps`` micro-steps; each micro-step, on every rank:

1. **rollout** — the student samples responses to its own prompts (its chat template, left
   padding, stop at its end-of-turn ids) through a rollout engine
   (``ctopd.training.rollout_engine``: HF ``generate`` on the live weights). We keep the sampled
   ids and train on exactly them.
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

then gradient clipping, AdamW and the learning-rate schedule (``ctopd.training.runtime``, shared
with ``ctopd sft``: the run folder, checkpoints, non-finite figures, signals). Prompts are sharded
across ranks (every rank draws the same global batch and keeps its slice), so rollout and teacher
work are split too; the figures of a step are reduced across ranks before they are logged.

Output rows past a tokenizer's ids (a padded embedding matrix: Qwen2.5-7B has 152,064 rows for
151,665 ids) are no token, on both sides: the student never samples them and its softmax in the
objective covers its real ids only; the teacher's scores have a column per real id only.

Run it with ``ctopd train ...`` or ``accelerate launch -m ctopd train ...``; see
``ctopd.training.config`` for every option and its default.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from ctopd.core.pair import TokenizerPair
from ctopd.objectives import TeacherRequest, compute_objective, teacher_needs
from ctopd.objectives.text_events import TextTables, text_tables
from ctopd.training.config import ConfigError, TrainConfig
from ctopd.training.data import Example, encode_prompts, load_examples
from ctopd.training.metrics import StepMetrics, Timer
from ctopd.training.models import (
    check_vocab,
    load_causal_lm,
    load_model_tokenizer,
    prepare_student,
)
from ctopd.training.rollout import pad_responses, parameters_sharded, response_student_logits
from ctopd.training.rollout_engine import RolloutEngine, build_rollout_engine
from ctopd.training.runtime import Runtime, next_indices
from ctopd.training.teachers import Teacher, load_teacher, receive_outputs


@dataclass
class Prompt:
    """One usable prompt, under each model's own chat template."""

    student_ids: list[int]
    teacher_ids: list[int]


@dataclass
class Run:
    """What every micro-step reads: the config, the two models and the tokenizer pair."""

    config: TrainConfig
    runtime: Runtime  # step, last checkpoint, the non-finite rule
    accelerator: Accelerator
    student: torch.nn.Module  # prepared (DDP/FSDP/DeepSpeed wrapper)
    teacher: Teacher  # a frozen model on this rank's device, or a server's client
    pair: TokenizerPair
    student_pad_id: int

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
        return text_tables(
            pair.teacher_table,
            pair.student_table,
            pair.shared_vocab,
            cells=self.config.objective.arguments().get("cells", "none"),
        )


def train(config: TrainConfig) -> dict:
    """Distil the teacher into the student on-policy; see the module docstring for one step.

    Writes ``OUTPUT_DIR/config.yaml``, ``metrics.jsonl`` (a row per step), ``checkpoint-*/`` and
    ``final/`` (the student, its tokenizer and chat template; ``from_pretrained`` loads it).
    The run folder, resuming, non-finite figures and signals follow the rules of
    :mod:`ctopd.training.runtime`.

    Returns:
        ``{"final_metrics": mean of the last 5 steps' figures, "steps", "seconds",
        "output_dir", "skipped_prompts", "eval": last evaluation or None,
        "rank_param_checksums": one float per rank (equal under correct DDP), "num_prompts"}``.

    Raises:
        ConfigError: a bad config, a run folder that holds another run, a model without a chat
            template, ... (before any model loads where it can be).
        RunStopped: a non-finite loss, gradient norm or weight (the step and the checkpoint kept
            are named), or SIGTERM / SIGINT (a checkpoint of the last step is saved first).
    """
    config.validate("train")
    with Runtime(config, "train") as runtime:  # the run folder is checked and locked here
        accelerator = runtime.accelerator
        # Different ranks must sample different responses; DDP copies rank 0's weights at wrap.
        set_seed(config.seed, device_specific=True)

        examples = load_examples(config.data)  # a bad row fails before any model loads

        # Tokenizers, the pair (byte tables, shared vocabulary) and both models.
        student_tokenizer = load_model_tokenizer(config.student, side="student")
        teacher_tokenizer = load_model_tokenizer(config.teacher, side="teacher")
        pair = TokenizerPair(teacher_tokenizer, student_tokenizer)
        if config.objective.name == "opd" and not pair.identical:
            raise ConfigError(
                "objective opd (same-tokenizer OPD) needs identical tokenizers; "
                "use simct, dpca, shared_only or uld for a cross-tokenizer pair"
            )
        _ = pair.shared_vocab  # built once here, not inside the first step's timings
        student = load_causal_lm(config.student, side="student")
        # In process, or teacher_server.url; its scores cover the tokenizer's ids only.
        teacher = load_teacher(config, teacher_tokenizer, num_ids=pair.teacher_table.vocab_size)
        check_vocab(student, student_tokenizer, "student")
        student = prepare_student(
            student, gradient_checkpointing=config.gradient_checkpointing, lora=config.lora
        )

        # Prompts: both chat templates; too long for either side -> skipped and counted.
        prompts, skipped = _encode_prompts(config, examples, student_tokenizer, teacher_tokenizer)
        global_batch = config.per_device_batch_size * accelerator.num_processes
        per_step = global_batch * config.gradient_accumulation_steps
        total_steps = config.max_steps or max(
            1, math.ceil(config.epochs * math.ceil(len(prompts) / per_step))
        )

        # AdamW and its schedule, the accelerator's wrapping, the checkpoint when resuming.
        student, _, _ = runtime.prepare(
            student,
            student_tokenizer,
            end_ids=pair.student_table.end_ids.tolist(),
            total_steps=total_steps,
            num_items=len(prompts),
        )
        teacher.to(accelerator.device)
        accelerator.print(
            f"ctopd train: {config.teacher.name_or_path} -> {config.student.name_or_path}, "
            f"objective {config.objective.name}, {len(prompts)} prompts ({skipped} too long, "
            f"skipped), {total_steps} steps of {per_step} prompts x "
            f"{config.rollout.samples_per_prompt} samples on {accelerator.num_processes} "
            f"process(es); resolved config in {runtime.output_dir / 'config.yaml'}"
        )
        run = Run(
            config,
            runtime,
            accelerator,
            student,
            teacher,
            pair,
            student_tokenizer.pad_token_id,
        )
        # rollout.engine: hf generates with the live (gathered) student, so refresh is free.
        rollouts = build_rollout_engine(
            config.rollout.engine,
            lambda: _generation_model(accelerator, student),
            end_ids=run.student_end_ids,
            pad_id=run.student_pad_id,
            max_new_tokens=config.rollout.max_new_tokens,
            temperature=config.rollout.temperature,
            top_p=config.rollout.top_p,
            top_k=config.rollout.top_k,
            num_ids=run.student_num_ids,
            device=accelerator.device,
        )

        while runtime.step < total_steps:
            timer, figures = runtime.start_step(), StepMetrics()
            for _ in range(config.gradient_accumulation_steps):
                indices = next_indices(runtime.state, len(prompts), global_batch, config)
                mine = indices[accelerator.process_index * config.per_device_batch_size :][
                    : config.per_device_batch_size
                ]
                with accelerator.accumulate(student):
                    figures.add(_micro_step(run, [prompts[i] for i in mine], timer, rollouts))
            runtime.optimizer_step(timer)  # stops first if the gradient norm is not finite
            rollouts.refresh(accelerator.unwrap_model(student))
            runtime.state["samples"] += per_step * config.rollout.samples_per_prompt
            runtime.end_step({**figures.reduce(accelerator, timer), "skipped_prompts": skipped})
        return runtime.finish({"skipped_prompts": skipped, "num_prompts": len(prompts)})


def _micro_step(
    run: Run, prompts: list[Prompt], timer: Timer, rollouts: RolloutEngine
) -> dict[str, float]:
    """Rollout → alignment → teacher → objective → backward for this rank's prompts.

    Returns:
        The objective's figures plus response counts (python floats).
    """
    config, accelerator, pair = run.config, run.accelerator, run.pair
    step, last_saved = run.runtime.step + 1, run.runtime.saved_step
    samples = config.rollout.samples_per_prompt
    student_prompts = [p.student_ids for p in prompts for _ in range(samples)]
    teacher_prompts = [p.teacher_ids for p in prompts for _ in range(samples)]
    device = accelerator.device

    # 1. Rollout (rollout.engine): the student samples; these exact ids are what it trains on.
    with timer("rollout"):
        try:
            # No log-probs: one update per rollout, DPCA's π_old is the live policy (step 4).
            rollout = rollouts.generate(
                [p.student_ids for p in prompts], samples_per_prompt=samples, logprobs=False
            )
            student_responses, problem = rollout.response_ids, None
        except RuntimeError as err:  # torch.multinomial refuses NaN / inf probabilities
            if "probability tensor" not in str(err):
                raise
            problem = "the student's sampling probabilities are not finite"
    run.runtime.stop_if_non_finite(problem)  # every rank: one failing alone would hang the rest

    # 2. Alignment: the teacher's tokenisation of the response text (with identical tokenizers
    # the sampled ids themselves, standard OPD) and the minimal aligned chunks of the two.
    with timer("alignment"):
        teacher_responses = pair.teacher_ids_for_batch(student_responses)
        alignments = pair.align_batch(teacher_responses, student_responses)

    # 3. Teacher: scores its own tokenisation after its own prompt, no grad, in process or on a
    # server, and hands back only what the objective needs (small tensors, reduced a slice of
    # positions at a time on its side). A served teacher's answer may still be on its way: it is
    # read after the student's forward (which runs meanwhile); an in-process one's at once.
    options = config.objective.arguments()  # the objective's keywords: signature + config
    needs = teacher_needs(config.objective.name, **options)
    request = TeacherRequest(
        needs,
        pair.shared_vocab,
        slice_size=config.objective.slice_size,
        top_k=config.objective.top_k,
        alignments=alignments,
        student_ids=student_responses,
        text_tables=run.text_tables if "text_events" in needs else None,
    )

    def read_teacher():
        return receive_outputs(pending, step=step, last_saved=last_saved)

    with timer("teacher"):
        pending = run.teacher.submit(teacher_prompts, teacher_responses, request) if needs else None
        teacher_scores = read_teacher() if pending is not None and pending.done() else None

    # 4. Objective: a student forward over prompt + sampled ids, then the loss. The forward
    # stops at the final hidden states [B, m, H]: the objective projects them to the vocabulary
    # one slice of rows at a time (no [B, m, V] logits or gradient for the whole response).
    # Where the output layer cannot be taken apart (sharded parameters, no linear head) the
    # objective gets the model's full logits instead; StudentHead.from_model warns then.
    with timer("student_forward"):
        student_ids, _ = pad_responses(student_responses, device=device)
        student_logits = response_student_logits(  # StudentHidden, or [B, m, V_S] logits
            run.student,
            accelerator.unwrap_model(run.student),
            student_prompts,
            student_responses,
            pad_id=run.student_pad_id,
            device=device,
            num_ids=run.student_num_ids,
            sharded=parameters_sharded(accelerator),
        )
    if pending is not None and teacher_scores is None:
        with timer("teacher"):  # the wait the student's forward did not hide
            teacher_scores = read_teacher()
    # No student_old_logprobs: one update per rollout, so DPCA's π_old is the current policy
    # detached (ratio 1), which the objective uses when given None.
    with timer("loss"):
        try:
            loss, metrics = compute_objective(
                config.objective.name,
                student_logits=student_logits,
                student_ids=student_ids,
                alignments=alignments,
                shared_vocab=pair.shared_vocab,
                teacher=teacher_scores,
                **options,
            )
            problem = None if torch.isfinite(loss.detach()).all() else f"the loss is {loss.item()}"
        except ValueError as err:  # the objectives refuse NaN/inf logits
            if "NaN" not in str(err):
                raise
            problem = f"the student's logits are not finite ({err})"
    run.runtime.stop_if_non_finite(problem)  # every rank, before any backward

    # 5. Backward (accelerate scales by the accumulation steps and syncs on the last one). The
    # objective computed its gradient slice by slice already; this hands it to the hidden states
    # and the output weight (reduced across ranks by DDP like every other parameter's) and runs
    # the model's backward.
    with timer("backward"):
        accelerator.backward(loss)
    ended = sum(pair.ended_turn(r) for r in student_responses)
    metrics.update(
        responses=len(student_responses),
        ended_responses=ended,
        prompts=len(prompts),
        response_tokens=sum(len(r) for r in student_responses),
        teacher_tokens=sum(len(t) for t in teacher_responses),
    )
    return metrics


def _encode_prompts(
    config: TrainConfig, examples: list[Example], student_tokenizer, teacher_tokenizer
):
    """Both sides' prompt ids; prompts longer than ``data.max_prompt_tokens`` on either side
    are dropped and counted."""
    student_ids = encode_prompts(student_tokenizer, examples, side="student")
    teacher_ids = encode_prompts(teacher_tokenizer, examples, side="teacher")
    limit = config.data.max_prompt_tokens
    prompts = [
        Prompt(s, t)
        for s, t in zip(student_ids, teacher_ids)
        if len(s) <= limit and len(t) <= limit
    ]
    if not prompts:
        raise ConfigError(
            f"all {len(examples)} prompts are longer than data.max_prompt_tokens "
            f"({limit}); raise it"
        )
    return prompts, len(examples) - len(prompts)


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
