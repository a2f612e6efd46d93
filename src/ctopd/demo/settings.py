"""The demo's sizes, budgets and learning rates: one frozen dataclass and its configurations.

:data:`FULL` is what ``ctopd demo`` runs: the matched start (:data:`MATCHED`, each student warmed
up until it reaches the same validation accuracy) on top of :data:`FIXED_WARMUP`, which is
``ctopd demo --fixed-warmup`` (both students warmed up 1,000 steps; the demo's default until
the matched start replaced it, and what the README's fixed-warm-up tables were measured with).
:data:`QUICK` is ``--quick`` (CI: every stage runs, nothing is learned, well under 3 minutes),
with :data:`QUICK_MATCHED` on top unless ``--fixed-warmup``. :func:`demo_settings` picks one.
Learning rates are chosen by ``ctopd demo --sweep`` on the validation split and copied into
:attr:`DemoSettings.method_lrs` by hand; the demo never reads the sweep and nothing is selected
on the test set.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

# The runs, each from a warmed-up student: the cross-tokenizer student's on-policy methods and
# continued SFT, then the same-tokenizer control's OPD and continued SFT.
CROSS_METHODS = ("simct", "dpca", "shared_only", "sft")
CONTROL_METHODS = ("control_opd", "control_sft")
RUNS = CROSS_METHODS + CONTROL_METHODS
# Which warmed-up student a run starts from, and what trains it ("sft": run_sft).
RUN_SPECS = {
    "simct": ("student", "simct"),
    "dpca": ("student", "dpca"),
    "shared_only": ("student", "shared_only"),
    "sft": ("student", "sft"),
    "control_opd": ("control", "opd"),
    "control_sft": ("control", "sft"),
}
# The supervision spaces the ablation compares: (label, objective options of simct).
SIMCT_SPACES = (
    ("paper", {"space": "paper"}),
    ("text, cells none", {"space": "text", "cells": "none"}),
    ("text, cells boundary", {"space": "text", "cells": "boundary"}),
    ("text, cells all", {"space": "text", "cells": "all"}),
)
# Bump when a change of code (not of settings) makes the cached models stale.
CACHE_VERSION = 2


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and budgets of one demo configuration (see :data:`FULL` and :data:`QUICK`)."""

    # Task (ctopd.demo.task): problem counts, number ranges and steps per problem.
    num_train: int
    num_test: int
    num_validation: int = 200
    # Extra held-out problems (drawn after the validation split) the final models and the
    # starts are also scored on: 200 test problems cannot tell two runs 0.01 apart (a standard
    # error of 0.014 at 0.96 accuracy); these give paired comparisons with intervals.
    num_extra_test: int = 2000
    # Extra validation problems (drawn after the extra test split): what ``--calibrate`` scores
    # on, so that a choice which must resolve 0.01 (the budget at which the same-tokenizer
    # control separates) is made with as many problems as it is later judged on, not on the test
    # problems. Not in any stamp: adding them changes no cached model.
    num_extra_validation: int = 2000
    task_seed: int = 0
    min_value: int = 10
    max_value: int = 199
    min_amount: int = 10
    max_amount: int = 99
    task_steps: tuple[int, ...] = (2, 3)
    # "fixed": each solution works the steps in the story's order (one right solution per
    # problem); "free": the steps commute and each reference works them in a random order
    # (ctopd.demo.task.generate_problem).
    task_order: str = "fixed"
    # Tokenizers: vocabulary sizes, special tokens included.
    teacher_vocab: int = 512
    student_vocab: int = 600
    # Teacher: trained from scratch on the reference solutions.
    teacher_hidden: int = 64
    teacher_layers: int = 4
    teacher_heads: int = 4
    teacher_steps: int = 1000
    teacher_batch: int = 64
    teacher_lr: float = 5e-3
    # The teacher trains in rounds of teacher_steps (each a cosine cycle from the last round's
    # model) until its validation accuracy reaches teacher_target, at most teacher_rounds;
    # None: one round.
    teacher_target: float | None = 0.99
    teacher_rounds: int = 3
    # Teacher samples, drawn once (temperature below) in batches of this many prompts.
    sample_batch: int = 256
    # Students (cross-tokenizer and same-tokenizer control: the same architecture and init
    # seed), warmed up alike with SFT on the same teacher samples.
    student_hidden: int = 64
    student_layers: int = 3
    student_heads: int = 4
    warmup_steps: int = 1000
    warmup_batch: int = 32
    warmup_lr: float = 3e-3
    # "cosine": the warm-up anneals to 0 and every run re-warms its own rate; "constant": the
    # warm-up stays at warmup_lr (after a 5% ramp) and each run is the decay phase
    # (warmup-stable-decay), so no run starts by undoing an annealed optimum.
    warmup_schedule: str = "constant"
    # Matched start (``ctopd demo --matched-start``): each student's warm-up stops at the first
    # checkpoint (every warmup_check_every steps, up to warmup_steps) whose validation accuracy
    # reaches warmup_target, so both students start the methods at about the same accuracy and
    # "gap closed" compares like with like. None: both train warmup_steps.
    warmup_target: float | None = None
    warmup_check_every: int = 250
    # Methods: equal budgets (steps x prompts per step) from the warmed-up students.
    method_steps: int = 100
    method_batch: int = 32
    method_warmup_ratio: float = 0.1
    # Peak learning rate per run name (RUNS), as the sweep on the validation split chose it
    # (docs/demo-fixed-warmup/sweep.md; the matched start overrides them, see MATCHED).
    method_lrs: tuple[tuple[str, float], ...] = (
        ("simct", 3e-4),
        ("dpca", 3e-4),
        ("shared_only", 3e-4),
        ("sft", 1e-3),
        ("control_opd", 1e-3),
        ("control_sft", 1e-3),
    )
    # The sweep (--sweep): learning rates tried per run name, one seed, sweep_steps steps,
    # scored on the validation split. An explicit grid, so the sweep's command reproduces it
    # after method_lrs changed.
    sweep_lrs: tuple[tuple[str, tuple[float, ...]], ...] = (
        ("simct", (3e-4, 1e-3, 3e-3)),
        ("dpca", (1e-4, 3e-4, 1e-3)),
        ("shared_only", (3e-4, 1e-3, 3e-3)),
        ("sft", (3e-4, 1e-3, 3e-3)),
        ("control_opd", (3e-4, 1e-3, 3e-3)),
        ("control_sft", (3e-4, 1e-3, 3e-3)),
    )
    sweep_steps: int = 50
    # The SimCT space ablation (--ablation): these seeds, method_steps steps at simct's lr,
    # scored on the validation split.
    ablation_seeds: int = 2
    # The budget calibration (--calibrate): the same-tokenizer control's OPD and continued SFT
    # at each of these step counts (method_batch prompts per step, their method_lrs),
    # calibration_seeds seeds each, scored on the extra validation split. The budget at which
    # OPD's lead over SFT is most surely positive is chosen (ALGORITHMS §9: a testbed where
    # same-tokenizer OPD does not beat continued SFT cannot judge cross-tokenizer methods).
    calibration_steps: tuple[int, ...] = (25, 50, 100)
    calibration_seeds: int = 3
    # Sampling temperature of the teacher samples and of the students' rollouts.
    temperature: float = 1.0
    # Sampled accuracy, scored beside the greedy one on the extra splits (final models, starts
    # and teacher): one response per problem at this temperature, every model with the same
    # sampling seed (ctopd.demo.measure.outcomes). None: greedy only. Not in any stamp.
    sampled_temperature: float | None = 1.0
    sampled_seed: int = 0
    max_new_tokens: int = 96
    # Held-out accuracy and KL are measured at steps 0, eval_every, 2 * eval_every, ..., end.
    eval_every: int = 25
    eval_batch: int = 200
    # Held-out prompts for the common sequence-level KL estimate.
    kl_prompts: int = 64

    def __post_init__(self) -> None:
        for name in ("method_lrs", "sweep_lrs"):
            keys = [key for key, _ in getattr(self, name)]
            if sorted(keys) != sorted(RUNS):
                raise ValueError(
                    f"DemoSettings.{name} must name each of {', '.join(RUNS)} "
                    f"once; got {', '.join(keys)}"
                )
        if self.task_order not in ("fixed", "free"):
            raise ValueError("DemoSettings.task_order must be fixed or free")
        if self.warmup_schedule not in ("cosine", "constant"):
            raise ValueError("DemoSettings.warmup_schedule must be cosine or constant")
        if self.eval_every < 1:
            raise ValueError("DemoSettings.eval_every must be at least 1")
        if self.warmup_target is not None and not 0.0 <= self.warmup_target <= 1.0:
            raise ValueError("DemoSettings.warmup_target must be an accuracy in [0, 1] or None")
        if self.warmup_check_every < 1:
            raise ValueError("DemoSettings.warmup_check_every must be at least 1")
        if not self.calibration_steps or min(self.calibration_steps) < 1:
            raise ValueError("DemoSettings.calibration_steps must list step counts of at least 1")
        if self.teacher_target is not None and not 0.0 <= self.teacher_target <= 1.0:
            raise ValueError("DemoSettings.teacher_target must be an accuracy in [0, 1] or None")
        if self.teacher_rounds < 1:
            raise ValueError("DemoSettings.teacher_rounds must be at least 1")
        if self.sampled_temperature is not None and not self.sampled_temperature > 0:
            raise ValueError(
                "DemoSettings.sampled_temperature must be above 0, or None for greedy accuracy only"
            )
        if self.calibration_seeds < 1:
            raise ValueError("DemoSettings.calibration_seeds must be at least 1")

    def lr(self, run: str) -> float:
        """The learning rate of a run name (:data:`RUNS`)."""
        return dict(self.method_lrs)[run]

    def sweep_grid(self, run: str) -> tuple[float, ...]:
        """The learning rates the sweep tries for a run name."""
        return tuple(dict(self.sweep_lrs)[run])

    def task_ranges(self) -> dict:
        """Keyword arguments of :func:`ctopd.demo.task.make_splits` beyond the counts."""
        return {
            "min_value": self.min_value,
            "max_value": self.max_value,
            "min_amount": self.min_amount,
            "max_amount": self.max_amount,
            "steps": self.task_steps,
            "order": self.task_order,
        }

    def teacher_stamp(self) -> dict:
        """The settings the data, both tokenizers and the teacher depend on (a cached teacher
        is reused when they match)."""
        keys = (
            "num_train",
            "num_test",
            "num_validation",
            "task_seed",
            "min_value",
            "max_value",
            "min_amount",
            "max_amount",
            "task_steps",
            "teacher_vocab",
            "student_vocab",
            "teacher_hidden",
            "teacher_layers",
            "teacher_heads",
            "teacher_steps",
            "teacher_batch",
            "teacher_lr",
            "teacher_target",
            "teacher_rounds",
        )
        if self.task_order != "fixed":  # absent otherwise: older caches stay valid
            keys += ("task_order",)
        return _jsonable({"version": CACHE_VERSION, **self._pick(keys)})

    def samples_stamp(self) -> dict:
        """The settings the teacher samples depend on (the teacher's included)."""
        keys = ("sample_batch", "temperature", "max_new_tokens")
        return {**self.teacher_stamp(), **_jsonable(self._pick(keys))}

    def student_stamp(self, kind: str) -> dict:
        """The settings a warmed-up student (``kind``: student or control) depends on."""
        keys = (
            "student_hidden",
            "student_layers",
            "student_heads",
            "warmup_steps",
            "warmup_batch",
            "warmup_lr",
            "warmup_schedule",
            "kl_prompts",
            "eval_batch",
        )
        if self.warmup_target is not None:  # absent otherwise: older caches stay valid
            keys += ("warmup_target", "warmup_check_every")
        return {**self.samples_stamp(), "kind": kind, **_jsonable(self._pick(keys))}

    def _pick(self, keys: tuple[str, ...]) -> dict:
        return {key: getattr(self, key) for key in keys}


def _jsonable(values: dict) -> dict:
    """Tuples as lists, as a stamp read back from JSON holds them."""
    return json.loads(json.dumps(values))


def settings_dict(settings: DemoSettings) -> dict:
    """The settings as JSON-ready values (for ``results.json`` and ``sweep.json``)."""
    return _jsonable(asdict(settings))


# The full run with a fixed warm-up (``--fixed-warmup``): about 20 minutes on two CPU cores.
FIXED_WARMUP = DemoSettings(num_train=20000, num_test=200)
# CI: every stage runs, nothing is learned.
QUICK = DemoSettings(
    num_train=400,
    num_test=16,
    num_validation=16,
    num_extra_test=24,
    num_extra_validation=24,
    teacher_hidden=32,
    teacher_target=None,
    teacher_layers=1,
    teacher_steps=20,
    teacher_batch=16,
    sample_batch=16,
    student_hidden=32,
    student_layers=1,
    warmup_steps=4,
    warmup_batch=8,
    method_steps=4,
    method_batch=4,
    sweep_steps=2,
    eval_every=2,
    eval_batch=16,
    max_new_tokens=48,
    kl_prompts=8,
    ablation_seeds=1,
    calibration_steps=(2, 4),
    calibration_seeds=2,
    sweep_lrs=tuple((name, (1e-4, 3e-4)) for name in RUNS),
)
# The matched start (the default): up to twice the warm-up, each student stopped at the first
# checkpoint that reaches 0.45 validation accuracy (measured on an earlier machine: after 1,000
# steps the control is at 0.47 and the cross-tokenizer student at 0.29, far from its teacher,
# where even OPD from a teacher on its own tokenizer stays below continued SFT;
# benchmarks/simct_limits.py). "Gap closed" compares the two students only from starts this
# alike. Its learning rates come from its own sweep (`ctopd demo --sweep`, docs/demo/sweep.md,
# scored on the extra validation split). The budget is 100 steps: `ctopd demo --calibrate`
# (docs/demo/calibration.md) finds no budget of 25, 50 or 100 steps at which the control's OPD
# beats its SFT by greedy accuracy, and OPD ahead at all three by sampled accuracy, most surely
# at 100 (+0.049 [+0.036, +0.062]).
MATCHED = {
    "warmup_steps": 2000,
    "warmup_target": 0.45,
    "warmup_check_every": 100,
    "method_lrs": (
        ("simct", 1e-3),
        ("dpca", 3e-4),
        ("shared_only", 3e-4),
        ("sft", 3e-4),
        ("control_opd", 1e-3),
        ("control_sft", 1e-3),
    ),
}
QUICK_MATCHED = {"warmup_target": 0.0, "warmup_check_every": 2}
# The free-order task (``--task-order free``): steps that commute, each reference worked in a
# random order, so that a problem has several right solutions and the teacher is unsure which
# step comes next (ALGORITHMS §9: on the story-order task the teacher's distribution is its
# sample and every divergence from its path is fatal, so OPD gets nothing SFT lacks;
# docs/demo/teacher_signal.md). Measured: the teacher recipe reaches 0.015, 0.560, 0.790,
# 0.845, 0.860 and 0.870 validation accuracy in six rounds on it (README, "The free-order
# task"): it gets six rounds, and a testbed on this task still needs a teacher that masters it.
FREE_ORDER = {"task_order": "free", "teacher_rounds": 6}
# What ``ctopd demo`` runs: about 42 minutes from scratch on two CPU cores (the teacher in two
# rounds), 14 with cached models.
FULL = replace(FIXED_WARMUP, **MATCHED)


def demo_settings(
    *,
    quick: bool = False,
    matched: bool = True,
    warmup_target: float | None = None,
    task_order: str = "fixed",
) -> DemoSettings:
    """The settings ``ctopd demo`` runs with: :data:`FULL` (or :data:`QUICK` with
    :data:`QUICK_MATCHED`); with ``matched=False`` (``--fixed-warmup``) :data:`FIXED_WARMUP`
    (or :data:`QUICK`). ``warmup_target`` (``--warmup-target``, matched start only) replaces the
    validation accuracy at which each warm-up stops; ``task_order="free"`` (``--task-order``)
    puts :data:`FREE_ORDER` on top.

    Raises:
        ValueError: a ``warmup_target`` with ``matched=False``, or one outside ``[0, 1]``; a
            ``task_order`` other than ``fixed`` or ``free``.
    """
    if task_order not in ("fixed", "free"):
        raise ValueError(f"--task-order must be fixed or free; got {task_order!r}")
    if not matched:
        if warmup_target is not None:
            raise ValueError(
                "--warmup-target sets where the matched start stops; the fixed "
                "warm-up has no target: drop --fixed-warmup or --warmup-target"
            )
        settings = QUICK if quick else FIXED_WARMUP
    else:
        settings = replace(QUICK, **QUICK_MATCHED) if quick else FULL
        if warmup_target is not None:
            settings = replace(settings, warmup_target=warmup_target)
    return replace(settings, **FREE_ORDER) if task_order == "free" else settings
