"""The demo's sizes, budgets and learning rates: :data:`FULL` (``ctopd demo``) and :data:`QUICK`
(``--quick``). The learning rates come from the validation sweep of ``research/testbed.py
--sweep``, copied by hand: nothing is selected on the test set. Other configurations (a fixed
warm-up, the free-order task) live in ``research/``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

# The runs: the cross-tokenizer student's, then the same-tokenizer control's.
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
# Bump when a change of code (not of settings) makes the cached models stale.
CACHE_VERSION = 2


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and budgets of one demo configuration (see :data:`FULL` and :data:`QUICK`)."""

    # Task (ctopd.demo.task): problem counts, number ranges and steps per problem.
    num_train: int
    num_test: int
    num_validation: int = 200
    # More held-out problems the final models and starts are scored on: 200 cannot tell two
    # runs 0.01 apart (a standard error of 0.014 at 0.96). Extra validation: for research.
    num_extra_test: int = 2000
    num_extra_validation: int = 2000
    task_seed: int = 0
    min_value: int = 10
    max_value: int = 199
    min_amount: int = 10
    max_amount: int = 99
    task_steps: tuple[int, ...] = (2, 3)
    # Tokenizers: vocabulary sizes, special tokens included.
    teacher_vocab: int = 512
    student_vocab: int = 600
    # Teacher: trained on the reference solutions in rounds of teacher_steps until its
    # validation accuracy reaches teacher_target, at most teacher_rounds (None: one round).
    teacher_hidden: int = 64
    teacher_layers: int = 4
    teacher_heads: int = 4
    teacher_steps: int = 1000
    teacher_batch: int = 64
    teacher_lr: float = 5e-3
    teacher_target: float | None = 0.99
    teacher_rounds: int = 3
    # Teacher samples, drawn once in batches of this many prompts.
    sample_batch: int = 256
    # Both students: the same architecture and init, warmed up alike with SFT on the same
    # teacher samples at a constant rate; each run is then the decay of a warmup-stable-decay
    # schedule ("cosine": anneal the warm-up instead).
    student_hidden: int = 64
    student_layers: int = 3
    student_heads: int = 4
    warmup_steps: int = 1000
    warmup_batch: int = 32
    warmup_lr: float = 3e-3
    warmup_schedule: str = "constant"
    # Matched start: each warm-up stops at its first checkpoint (every warmup_check_every
    # steps) reaching warmup_target validation accuracy. None: both train warmup_steps.
    warmup_target: float | None = None
    warmup_check_every: int = 250
    # Methods: equal budgets (steps x prompts per step) from the warmed-up students.
    method_steps: int = 100
    method_batch: int = 32
    method_warmup_ratio: float = 0.1
    # Peak learning rate per run name (RUNS).
    method_lrs: tuple[tuple[str, float], ...] = (
        ("simct", 3e-4),
        ("dpca", 3e-4),
        ("shared_only", 3e-4),
        ("sft", 1e-3),
        ("control_opd", 1e-3),
        ("control_sft", 1e-3),
    )
    # Sampling temperature of the teacher samples and of the students' rollouts.
    temperature: float = 1.0
    # Sampled accuracy on the extra test split: one response per problem at this temperature,
    # the same seed for every model. None: greedy only.
    sampled_temperature: float | None = 1.0
    sampled_seed: int = 0
    max_new_tokens: int = 96
    # Held-out accuracy and KL at steps 0, eval_every, 2 * eval_every, ..., end.
    eval_every: int = 25
    eval_batch: int = 200
    # Held-out prompts for the common sequence-level KL estimate.
    kl_prompts: int = 64

    def __post_init__(self) -> None:
        if sorted(key for key, _ in self.method_lrs) != sorted(RUNS):
            raise ValueError(f"DemoSettings.method_lrs must name each of {', '.join(RUNS)} once")
        if self.warmup_schedule not in ("cosine", "constant"):
            raise ValueError("DemoSettings.warmup_schedule must be cosine or constant")
        for name in ("eval_every", "warmup_check_every", "teacher_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoSettings.{name} must be at least 1")
        for name in ("warmup_target", "teacher_target"):
            if getattr(self, name) is not None and not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DemoSettings.{name} must be an accuracy in [0, 1] or None")
        if self.sampled_temperature is not None and not self.sampled_temperature > 0:
            raise ValueError("DemoSettings.sampled_temperature must be above 0, or None")

    def lr(self, run: str) -> float:
        """The learning rate of a run name (:data:`RUNS`)."""
        return dict(self.method_lrs)[run]

    def slice_steps(self) -> int:
        """Batches in each seed's slice of the teacher samples (the longest SFT run)."""
        return self.method_steps

    def task_ranges(self) -> dict:
        """Keyword arguments of :func:`ctopd.demo.task.make_splits` beyond the counts."""
        keys = ("min_value", "max_value", "min_amount", "max_amount")
        return {**self._pick(keys), "steps": self.task_steps}

    def teacher_stamp(self) -> dict:
        """The settings the data, both tokenizers and the teacher depend on."""
        keys = ("num_train", "num_test", "num_validation", "task_seed", "min_value", "max_value")
        keys += ("min_amount", "max_amount", "task_steps", "teacher_vocab", "student_vocab")
        keys += ("teacher_hidden", "teacher_layers", "teacher_heads", "teacher_steps")
        keys += ("teacher_batch", "teacher_lr", "teacher_target", "teacher_rounds")
        return _jsonable({"version": CACHE_VERSION, **self._pick(keys)})

    def samples_stamp(self) -> dict:
        """The settings the teacher samples depend on (the teacher's included)."""
        keys = ("sample_batch", "temperature", "max_new_tokens")
        return {**self.teacher_stamp(), **_jsonable(self._pick(keys))}

    def student_stamp(self, kind: str) -> dict:
        """The settings a warmed-up student (``kind``: student or control) depends on."""
        keys = ("student_hidden", "student_layers", "student_heads", "warmup_steps")
        keys += ("warmup_batch", "warmup_lr", "warmup_schedule", "kl_prompts", "eval_batch")
        if self.warmup_target is not None:  # absent otherwise: older caches stay valid
            keys += ("warmup_target", "warmup_check_every")
        return {**self.samples_stamp(), "kind": kind, **_jsonable(self._pick(keys))}

    def _pick(self, keys: tuple[str, ...]) -> dict:
        return {key: getattr(self, key) for key in keys}


def _jsonable(values: dict) -> dict:
    """Tuples as lists, as a stamp read back from JSON holds them."""
    return json.loads(json.dumps(values))


def settings_dict(settings: DemoSettings) -> dict:
    """The settings as JSON-ready values (for ``results.json``)."""
    return _jsonable(asdict(settings))


# What ``ctopd demo`` runs: about 42 minutes from scratch on two CPU cores, 14 with cached
# models. Each warm-up stops at 0.45 validation accuracy: after a fixed 1,000 steps the
# cross-tokenizer student started far below the control (0.29 against 0.47), where even OPD from
# a teacher on its own tokenizer stays below continued SFT (research/simct_limits.py).
# Learning rates: research/results/demo/sweep.md; budget: research/results/demo/calibration.md.
FULL = DemoSettings(
    num_train=20000,
    num_test=200,
    warmup_steps=2000,
    warmup_target=0.45,
    warmup_check_every=100,
    method_lrs=(
        ("simct", 1e-3),
        ("dpca", 3e-4),
        ("shared_only", 3e-4),
        ("sft", 3e-4),
        ("control_opd", 1e-3),
        ("control_sft", 1e-3),
    ),
)
# CI: every stage runs, nothing is learned (the warm-up target 0 stops at the first checkpoint).
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
    warmup_target=0.0,
    warmup_check_every=2,
    method_steps=4,
    method_batch=4,
    eval_every=2,
    eval_batch=16,
    max_new_tokens=48,
    kl_prompts=8,
)


def demo_settings(*, quick: bool = False) -> DemoSettings:
    """The settings ``ctopd demo`` runs with: :data:`FULL`, or :data:`QUICK` with ``quick``."""
    return QUICK if quick else FULL
