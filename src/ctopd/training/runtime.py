"""The run around the step, shared by ``ctopd train`` (:mod:`ctopd.training.loop`) and ``ctopd
sft`` (:mod:`ctopd.training.sft`): the accelerator, the run folder and its lock, the optimiser and
its schedule, checkpoints and resuming, the metrics log, non-finite figures and stop signals.

Each loop calls it in the order a step runs, so the loop still reads top to bottom::

    runtime = Runtime(config, "train")    # run folder checked and locked before models load
    ...                                   # tokenizers, models, prompts
    student, optimizer, scheduler = runtime.prepare(student, tokenizer, ...)
    while runtime.step < total_steps:
        timer = runtime.start_step()
        ...                               # micro-steps; runtime.stop_if_non_finite before backward
        runtime.optimizer_step(timer)     # clip, check the gradient norm, step, schedule
        runtime.end_step(row)             # evaluate, log, checkpoint, stop on a signal
    return runtime.finish(summary)        # final/ and summary.json

The rules it keeps (``docs/guides/faults.md`` lists each fault tried, what happens and the test):

* **A run folder belongs to one run.** Starting into a folder that holds a run (``config.yaml``,
  ``metrics.jsonl``, ``summary.json``, checkpoints, ``final/``) needs ``--resume`` (continue it)
  or ``--overwrite`` (remove those, listed, then start). The main process holds an exclusive lock
  on ``OUTPUT_DIR/.lock`` for the run's life; a second live run into the folder is refused, and
  the kernel drops the lock however the process ends, so a killed run never leaves it stale.
* **Nothing non-finite is stepped or saved.** A non-finite loss (before its backward), gradient
  norm (before ``optimizer.step``) or weight (before a checkpoint or ``final/``) stops the run on
  every rank at once, with the step, the likely cause and the checkpoint kept. Stopping, not
  skipping the step: a step that overflows is a learning rate or precision that is wrong for
  the model, and a run that skips such steps goes on to produce a model nobody asked for, while
  the checkpoint kept and ``--resume`` make a stop cheap.
* **SIGTERM and SIGINT stop between steps.** The handler only notes the signal; after each
  optimiser step the ranks agree on it, save a checkpoint of that step and exit with
  128 + the signal number (143, 130), printing the command that resumes. A second SIGINT stops
  at once.
* **--resume continues the same computation.** Settings that change what the run computes
  (everything but :data:`ctopd.training.run_folder.RESUMABLE_CHANGES`) are compared with the
  saved ``config.yaml`` and the number of processes with the checkpoint's; a difference is
  refused, naming each field as old → new, unless ``--resume-changed``. ``--resume`` with no
  checkpoint is an error, never a fresh start.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from ctopd.training.checkpoint import (
    checkpoint_dir,
    export_student,
    load_checkpoint,
    save_checkpoint,
)
from ctopd.training.config import ConfigError, TrainConfig
from ctopd.training.metrics import MetricsLogger, Timer, mean_of_last, read_metrics
from ctopd.training.run_folder import FolderLock, claim_folder

NON_FINITE_EXIT = 1


class RunStopped(RuntimeError):
    """The run stopped on purpose (a non-finite figure, a signal, a checkpoint that could not be
    written); raised alike on every rank. ``str(err)`` is the one line to show, ``exit_code``
    the process's exit status."""

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Runtime:
    """One run's outer machinery (see the module docstring); the loop owns the step.

    Args:
        config: the run's config (already ``validate``-d).
        mode: ``train`` or ``sft``: the command, for messages and the resume check.

    Raises:
        ConfigError: the run folder cannot be written, holds a run (no ``--resume`` or
            ``--overwrite``), is in use by a live run, or ``--resume`` finds nothing to continue
            or other settings. Raised before any model loads, on every rank.
    """

    def __init__(self, config: TrainConfig, mode: str) -> None:
        self.config, self.mode = config, mode
        self.output_dir = Path(config.output_dir)
        self.started = time.perf_counter()
        self.accelerator = make_accelerator(config)
        self.state = {"step": 0, "epoch": 0, "position": 0, "samples": 0}
        self.saved_step: int | None = None
        self.steps_done = 0  # optimiser steps taken by this process (not counting a resume)
        self.grad_norm: float | None = None
        self.last_eval: dict | None = None
        self.logger: MetricsLogger | None = None
        self.progress = None
        self.lock = FolderLock(self.output_dir)
        self.signals = StopSignals(announce=self.accelerator.is_main_process)
        try:
            checkpoint, self.changes = on_main(
                self.accelerator,
                lambda: claim_folder(
                    config, mode, self.lock, num_processes=self.accelerator.num_processes
                ),
            )
        except BaseException:
            self.lock.release()
            raise
        self.checkpoint = Path(checkpoint) if checkpoint else None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Restore the signal handlers, close the log, drop the folder's lock and end the
        process group (left to interpreter exit, gloo's threads can abort a rank that stopped,
        "terminate called without an active exception", instead of its exit code)."""
        self.signals.restore()
        if self.progress is not None:
            self.progress.close()
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        self.lock.release()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    @property
    def step(self) -> int:
        """Optimiser steps finished (a resumed run counts the steps before it)."""
        return self.state["step"]

    def prepare(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        end_ids: list[int],
        total_steps: int,
        num_items: int,
    ):
        """Build the optimiser and schedule, wrap for the accelerator, load the checkpoint when
        resuming, write ``config.yaml``, open ``metrics.jsonl`` and start noting signals.

        Args:
            model: the student (LoRA and gradient checkpointing already applied).
            tokenizer: saved with every checkpoint and ``final/``.
            end_ids: the student's end-of-turn ids (the saved generation config's EOS).
            total_steps: optimiser steps of the whole run.
            num_items: prompts (train) or examples (sft) of one epoch, for the epoch figure.

        Returns:
            ``(model, optimizer, scheduler)``: the model and optimiser wrapped by accelerate.
        """
        config, accelerator = self.config, self.accelerator
        self.tokenizer, self.end_ids = tokenizer, end_ids
        self.total_steps, self.num_items = total_steps, num_items
        # AdamW + warm-up + decay (docs/concepts/defaults.md). The scheduler is stepped once per optimiser
        # step by hand (accelerate would step it once per process).
        optimizer, scheduler = build_optimizer(config, model, total_steps)
        model, optimizer = _accelerate_prepare(accelerator, model, optimizer, config)
        accelerator.register_for_checkpointing(scheduler)
        if self.checkpoint is not None:
            # Weights, optimiser, scheduler, every rank's RNG, step and data position.
            self.state.update(load_checkpoint(accelerator, self.checkpoint))
            self.saved_step = self.state["step"]
            if self.changes:
                apply_optim_settings(optimizer, scheduler, config)
            accelerator.print(f"resumed from {self.checkpoint} at step {self.state['step']}")
        if accelerator.is_main_process:
            # How this run was started is no part of it: the saved config resumes as it is.
            dataclasses.replace(config, resume=None, overwrite=False, resume_changed=False).to_yaml(
                self.output_dir / "config.yaml"
            )
        self.logger = MetricsLogger(
            self.output_dir,
            enabled=accelerator.is_main_process,
            reporters=config.reporters,
            run_name=config.run_name,
            config=config.to_dict(),
            resume_step=self.state["step"] if self.checkpoint else None,
        )
        self.progress = tqdm(
            total=total_steps,
            initial=self.state["step"],
            desc=f"ctopd {self.mode}",
            dynamic_ncols=True,
            disable=not (config.progress and accelerator.is_main_process),
        )
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.signals.install()
        return model, optimizer, scheduler

    def start_step(self) -> Timer:
        """The step's timer (its clock starts now)."""
        self.step_started = time.perf_counter()
        return Timer(synchronize=self.accelerator.device.type == "cuda")

    def stop_if_non_finite(self, problem: str | None, *, applied: bool = False) -> None:
        """Stop every rank if any rank found a non-finite figure (collective: all ranks call it
        at the same point, before the figure is used).

        Args:
            problem: what this rank found, as a clause: ``"the loss is nan"``; None when all
                is finite.
            applied: the step's update is already in the weights (a weight check before a
                save); otherwise the check runs before it.

        Raises:
            RunStopped: one line (the step, the likely cause, the checkpoint kept), exit 1.
        """
        flag = torch.tensor(float(problem is not None), device=self.accelerator.device)
        if self.accelerator.reduce(flag, reduction="sum").item() == 0:
            return
        found = gather_object([problem]) if self.accelerator.num_processes > 1 else [problem]
        problem = next(p for p in found if p is not None)
        step = self.state["step"] if applied else self.state["step"] + 1
        what = (
            "so its weights were not saved"
            if applied
            else "so the step was not applied and nothing was saved"
        )
        config, retry = self.config, ""
        if config.mixed_precision == "fp16":
            cause, retry = (
                "an fp16 overflow; use --mixed-precision bf16 (or no)",
                " --resume-changed --mixed-precision bf16",
            )
        elif self.steps_done == 0 and self.checkpoint is None and not applied:
            cause = (
                "the student is non-finite before any update: check its weights and "
                "student.dtype (float16 weights overflow; use float32 or bfloat16)"
            )
        else:
            cause, retry = (
                f"a learning rate too high for this model (optim.lr {config.optim.lr:g}); lower it",
                f" --resume-changed --optim.lr {config.optim.lr / 10:g}",
            )
        if self.saved_step:
            kept = (
                f"Last checkpoint kept: {checkpoint_dir(self.output_dir, self.saved_step)}; "
                f"continue from it with `{self.resume_command()}{retry}`"
            )
        else:
            kept = (
                "No checkpoint was saved before it (--save-every N keeps some); start again "
                "with --overwrite"
            )
        raise RunStopped(
            f"ctopd {self.mode}: stopped at step {step}: {problem}, "
            f"{what}. Likely cause: {cause}. {kept}",
            exit_code=NON_FINITE_EXIT,
        )

    def optimizer_step(self, timer: Timer) -> None:
        """Clip the gradients, stop if their norm is not finite (before the weights change),
        then AdamW and the schedule; counts the step. Collective."""
        with timer("optimizer"):
            norm = clip_gradients(self.accelerator, self.model, self.config.optim.max_grad_norm)
            self.stop_if_non_finite(
                None if norm is None or math.isfinite(norm) else f"the gradient norm is {norm}"
            )
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.grad_norm = norm
        self.state["step"] += 1
        self.steps_done += 1

    def end_step(self, row: dict) -> None:
        """Complete the step's row (epoch, lr, grad norm, times), evaluate when due, log it,
        checkpoint when due, and stop (after saving) when a signal came. Collective.

        Args:
            row: the step's reduced figures (``StepMetrics.reduce``) plus the loop's extras.
        """
        config, state, step = self.config, self.state, self.state["step"]
        seconds = time.perf_counter() - self.step_started
        row = {"step": step, **row}
        row.update(
            epoch=state["epoch"] + state["position"] / self.num_items,
            lr=self.scheduler.get_last_lr()[0],
            grad_norm=float("nan") if self.grad_norm is None else self.grad_norm,
            time_step=seconds,
            tokens_per_second=row.get("response_tokens", 0.0) / max(seconds, 1e-9),
        )
        if config.eval_data and (
            step == self.total_steps or (config.eval_every and step % config.eval_every == 0)
        ):
            self.last_eval = evaluate_during_training(
                self.accelerator, self.model, self.tokenizer, config
            )
            row.update(
                eval_accuracy=self.last_eval["accuracy"],
                eval_examples=self.last_eval["num_examples"],
            )
        self.logger.log(row)
        self.progress.update(1)
        self.progress.set_postfix(
            {
                k: f"{row[k]:.4f}"
                for k in ("loss", "kl", "coverage")
                if isinstance(row.get(k), float)
            }
        )
        if not config.progress and step % config.log_every == 0:
            self.accelerator.print(console_line(row))
        if step == self.total_steps or (config.save_every and step % config.save_every == 0):
            self.save()
        if step < self.total_steps:  # at the last step finishing is as quick as stopping
            self.stop_if_signalled()

    def save(self) -> None:
        """Checkpoint the finished step (collective), unless it is saved already or a weight
        is not finite.

        Raises:
            RunStopped: a weight is not finite, or the checkpoint could not be written (a full
                disk): the previous checkpoint is named, exit 1.
        """
        step = self.state["step"]
        if self.saved_step == step:
            return
        self.stop_if_non_finite(non_finite_weights(self.model), applied=True)
        state = {
            **self.state,
            "num_processes": self.accelerator.num_processes,
            "command": self.mode,
        }
        try:
            save_checkpoint(
                self.accelerator,
                self.model,
                self.tokenizer,
                self.output_dir,
                state,
                end_ids=self.end_ids,
                keep=self.config.keep_checkpoints,
            )
        except OSError as err:  # single process only: under DDP the other ranks would wait
            kept = (
                f"{checkpoint_dir(self.output_dir, self.saved_step)} is kept; free space "
                f"and continue with `{self.resume_command()}`"
                if self.saved_step
                else "no earlier checkpoint; free space and start again with --overwrite"
            )
            raise RunStopped(
                f"ctopd {self.mode}: could not write the checkpoint of step {step} "
                f"({err.strerror or err}); {kept}",
                exit_code=1,
            ) from err
        self.saved_step = step

    def stop_if_signalled(self) -> None:
        """When any rank noted SIGTERM or SIGINT: save this step on every rank and stop.

        Raises:
            RunStopped: naming the checkpoint and the resume command; exit 128 + signal.
        """
        noted = torch.tensor(float(self.signals.received or 0), device=self.accelerator.device)
        signum = int(self.accelerator.reduce(noted, reduction="max").item())
        if not signum:
            return
        self.save()
        raise RunStopped(
            f"ctopd {self.mode}: stopped by {signal.Signals(signum).name} after step "
            f"{self.step} of {self.total_steps}; checkpoint saved: "
            f"{checkpoint_dir(self.output_dir, self.step)}; continue with: "
            f"{self.resume_command()}",
            exit_code=128 + signum,
        )

    def resume_command(self) -> str:
        """The command that continues this run: its saved config plus ``--resume``."""
        launch = (
            "ctopd"
            if self.accelerator.num_processes == 1
            else f"accelerate launch --num_processes {self.accelerator.num_processes} -m ctopd"
        )
        config = shlex.quote(str(self.output_dir / "config.yaml"))
        return f"{launch} {self.mode} --config {config} --resume"

    def finish(self, summary: dict) -> dict:
        """Export ``final/`` (weights checked finite first), close the log, write
        ``summary.json``. Collective.

        Args:
            summary: the loop's own summary figures (added to the common ones).

        Returns:
            ``final_metrics`` (mean of the last 5 steps' figures), ``steps``, ``seconds``,
            ``output_dir``, ``eval`` (the last evaluation or None), ``rank_param_checksums``
            (one float per rank, equal under correct DDP), then ``summary``.
        """
        self.signals.restore()
        self.progress.close()
        self.stop_if_non_finite(non_finite_weights(self.model), applied=True)
        accelerator = self.accelerator
        checksums = gather_object([param_checksum(accelerator.unwrap_model(self.model))])
        export_student(
            accelerator,
            self.model,
            self.tokenizer,
            self.output_dir / "final",
            end_ids=self.end_ids,
            merge_lora=True,
        )
        self.logger.close()
        self.logger = None
        rows = read_metrics(self.output_dir) if (self.output_dir / "metrics.jsonl").exists() else []
        summary = {
            "final_metrics": mean_of_last(rows),
            "steps": self.step,
            "seconds": time.perf_counter() - self.started,
            "output_dir": str(self.output_dir),
            "eval": self.last_eval,
            "rank_param_checksums": checksums,
            **summary,
        }
        if accelerator.is_main_process:
            (self.output_dir / "summary.json").write_text(
                json.dumps(summary, indent=2, default=str), encoding="utf-8"
            )
        accelerator.wait_for_everyone()
        return summary


def apply_optim_settings(optimizer, scheduler, config: TrainConfig) -> None:
    """After a resume with ``--resume-changed``: the checkpoint restored the old optimiser
    hyper-parameters and the schedule's base rate; put this config's in their place (the
    step count and AdamW's moments stay)."""
    optim = config.optim
    scheduler.base_lrs = [optim.lr] * len(scheduler.base_lrs)
    multiplier = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        group.update(
            lr=optim.lr * multiplier,
            initial_lr=optim.lr,
            eps=optim.eps,
            betas=(optim.beta1, optim.beta2),
            weight_decay=optim.weight_decay,
        )


def on_main(accelerator: Accelerator, work):
    """``work()`` on the main process only; every rank returns its result, or raises the error
    it raised (so ranks never wait on one that failed)."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except Exception as err:  # handed to every rank, then raised there
            error = err
    if accelerator.num_processes > 1:
        result, error = broadcast_object_list([result, error])
    if error is not None:
        raise error
    return result


# ---------------------------------------------------------------------------------------------
# Signals and non-finite weights


class StopSignals:
    """SIGTERM and SIGINT while steps run. The handler only notes the signal: saving from it
    would run in the middle of a step (and, under DDP, on one rank only), so the loop checks
    after each optimiser step (:meth:`Runtime.stop_if_signalled`). A second SIGINT stops at once,
    as a second Ctrl-C does elsewhere; a repeated SIGTERM (a launcher passing on the one it got)
    changes nothing. Handlers can only be set from the main thread; elsewhere the defaults stay.
    """

    def __init__(self, *, announce: bool) -> None:
        self.announce = announce
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.received = signum
        if self.announce:  # os.write: safe wherever the handler interrupts the main thread
            os.write(
                2,
                f"ctopd: {signal.Signals(signum).name} received; saving a checkpoint "
                "when this step ends (a second Ctrl-C stops at once, losing it)\n".encode(),
            )

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


def non_finite_weights(model: torch.nn.Module) -> str | None:
    """``"the weight NAME is not finite"`` for the first parameter holding a NaN or an infinity,
    else None
    (this rank's shard under FSDP / ZeRO-3)."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param.detach()).all():
            return f"the weight {name} is not finite"
    return None


# ---------------------------------------------------------------------------------------------
# The pieces both loops share


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The run's ``Accelerator``. In a single, unlaunched process (a notebook, the demo, tests)
    accelerate's process-wide state is reset first so runs with different mixed precision can
    follow each other; launched processes keep theirs."""
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
    )
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
            "-m ctopd train ...` (gloo DDP)"
        )


def next_indices(state: dict, num_items: int, count: int, config: TrainConfig) -> list[int]:
    """The next ``count`` item indices of the seeded epoch order; advances ``state``'s data
    position (epoch, position) so a resumed run continues where this one stopped."""
    out: list[int] = []
    while len(out) < count:
        order = torch.arange(num_items)
        if config.data.shuffle:
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + state["epoch"])
            order = torch.randperm(num_items, generator=generator)
        take = order[state["position"] : state["position"] + count - len(out)].tolist()
        out += take
        state["position"] += len(take)
        if state["position"] >= num_items:
            state["epoch"] += 1
            state["position"] = 0
    return out


def build_optimizer(config: TrainConfig, model: torch.nn.Module, total_steps: int):
    """AdamW over the trainable parameters and its ``LambdaLR`` schedule."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=config.optim.lr,
        eps=config.optim.eps,
        betas=(config.optim.beta1, config.optim.beta2),
        weight_decay=config.optim.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config, total_steps))
    return optimizer, scheduler


def _accelerate_prepare(accelerator: Accelerator, model, optimizer, config: TrainConfig):
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


def clip_gradients(accelerator: Accelerator, model, max_norm: float) -> float | None:
    """Clip the gradient norm (when asked) and return it (pre-clipping); None where DeepSpeed
    clips internally and reports none."""
    if max_norm > 0:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        return None if norm is None else float(norm)
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def evaluate_during_training(accelerator, student, tokenizer, config: TrainConfig) -> dict:
    """Accuracy on ``eval_data`` (main process, greedy, training RNG untouched)."""
    from ctopd.training.evaluate import evaluate

    result = None
    if accelerator.is_main_process:
        with torch.random.fork_rng(devices=[]):
            result = evaluate(
                accelerator.unwrap_model(student),
                tokenizer,
                config.eval_data,
                max_new_tokens=config.eval_max_new_tokens,
                batch_size=config.per_device_batch_size,
                limit=config.eval_limit,
                data_config=config.data,
                device=accelerator.device,
            )
    return gather_object([result])[0]


def param_checksum(model) -> float:
    """A float64 fingerprint of the weights (equal on every rank when DDP works)."""
    total = 0.0
    for index, param in enumerate(model.parameters()):
        data = param.detach().double()
        total += (index + 1) * float(data.sum()) + float(data.square().sum())
    return total


def console_line(row: dict) -> str:
    keys = ("step", "loss", "kl", "coverage", "response_length_mean", "lr", "time_step")
    return "  ".join(
        f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}"
        for k in keys
        if k in row
    )
