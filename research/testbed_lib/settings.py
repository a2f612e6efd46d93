"""The testbed's configurations beyond ``ctopd demo``'s, and the knobs of its studies.

:class:`StudySettings` is :class:`ctopd.demo.settings.DemoSettings` plus the sweep's grids,
the ablation's seeds and the calibration's budgets. :func:`pick_settings` picks one of:

* the matched start (``ctopd demo``'s :data:`FULL` / :data:`QUICK`, the default);
* :data:`FIXED_WARMUP` (``--fixed-warmup``): both students warmed up 1,000 steps (the demo's
  default until the matched start replaced it; ``results/demo-fixed-warmup/`` was measured
  with it), at the learning rates its own sweep chose;
* ``--warmup-target ACCURACY``: the matched start stopped elsewhere;
* :data:`FREE_ORDER` (``--task-order free``): steps that commute, each reference worked in a
  random order, so a problem has several right solutions and the teacher is unsure which step
  comes next (on the story-order task the teacher's distribution is its sample and every
  divergence from its path is fatal, so OPD gets nothing SFT lacks;
  ``results/demo/teacher_signal.md``). The teacher recipe reaches 0.015, 0.560, 0.790, 0.845,
  0.860 and 0.870 validation accuracy in six rounds on it, so it gets six.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ctopd.demo import settings as demo

from .task import free_order_problem

RUNS = demo.RUNS
# The supervision spaces the ablation compares: (label, objective options of simct).
SIMCT_SPACES = (
    ("paper", {"space": "paper"}),
    ("text, cells none", {"space": "text", "cells": "none"}),
    ("text, cells boundary", {"space": "text", "cells": "boundary"}),
    ("text, cells all", {"space": "text", "cells": "all"}),
)


@dataclass(frozen=True)
class StudySettings(demo.DemoSettings):
    """:class:`DemoSettings` plus what the studies run."""

    # "fixed": each solution works the steps in the story's order (one right solution per
    # problem); "free": the steps commute and each reference works them in a random order
    # (testbed_lib.task.free_order_problem).
    task_order: str = "fixed"

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
    # The SimCT space ablation (--ablation): these seeds, method_steps steps at simct's lr.
    ablation_seeds: int = 2
    # The budget calibration (--calibrate): the control's OPD and continued SFT at each of these
    # step counts, calibration_seeds seeds each, scored on the extra validation split (a
    # testbed where same-tokenizer OPD does not beat continued SFT cannot judge cross-tokenizer
    # methods).
    calibration_steps: tuple[int, ...] = (25, 50, 100)
    calibration_seeds: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task_order not in ("fixed", "free"):
            raise ValueError("StudySettings.task_order must be fixed or free")
        if sorted(key for key, _ in self.sweep_lrs) != sorted(RUNS):
            raise ValueError(f"StudySettings.sweep_lrs must name each of {', '.join(RUNS)} once")
        if not self.calibration_steps or min(self.calibration_steps) < 1:
            raise ValueError("calibration_steps must list step counts of at least 1")
        if self.calibration_seeds < 1:
            raise ValueError("calibration_seeds must be at least 1")

    def sweep_grid(self, run: str) -> tuple[float, ...]:
        """The learning rates the sweep tries for a run name."""
        return tuple(dict(self.sweep_lrs)[run])

    def task_ranges(self) -> dict:
        """The demo's task ranges, drawn by the free-order generator for ``task_order="free"``."""
        ranges = super().task_ranges()
        return {**ranges, "generator": free_order_problem} if self.task_order == "free" else ranges

    def teacher_stamp(self) -> dict:
        """The demo's stamp, naming the task order when it is not the story's (so cached
        fixed-order teachers stay valid)."""
        stamp = super().teacher_stamp()
        return stamp if self.task_order == "fixed" else {**stamp, "task_order": self.task_order}

    def slice_steps(self) -> int:
        """Each seed's SFT slice holds the longest budget the demo or the calibration runs, so
        a run of the demo's budget is the head of the calibration's."""
        return max(self.method_steps, *self.calibration_steps)


def widen(settings: demo.DemoSettings, **changes) -> StudySettings:
    """``settings`` (a :class:`DemoSettings`) as :class:`StudySettings`, with ``changes``."""
    values = {f.name: getattr(settings, f.name) for f in fields(demo.DemoSettings)}
    return StudySettings(**{**values, **changes})


# The full run with a fixed warm-up (``--fixed-warmup``): about 20 minutes on two CPU cores.
FIXED_WARMUP = widen(
    demo.FULL,
    warmup_steps=1000,
    warmup_target=None,
    warmup_check_every=250,
    method_lrs=StudySettings(num_train=0, num_test=0).method_lrs,  # the fixed warm-up's sweep
)
FULL = widen(demo.FULL)
QUICK = widen(
    demo.QUICK,
    sweep_steps=2,
    ablation_seeds=1,
    calibration_steps=(2, 4),
    calibration_seeds=2,
    sweep_lrs=tuple((name, (1e-4, 3e-4)) for name in RUNS),
)
QUICK_FIXED_WARMUP = replace(QUICK, warmup_target=None, warmup_check_every=250)
FREE_ORDER = {"task_order": "free", "teacher_rounds": 6}


def pick_settings(
    *,
    quick: bool = False,
    matched: bool = True,
    warmup_target: float | None = None,
    task_order: str = "fixed",
) -> StudySettings:
    """The settings a testbed run uses: the matched start (:data:`FULL`, or :data:`QUICK`)
    unless ``matched=False`` (:data:`FIXED_WARMUP`, :data:`QUICK_FIXED_WARMUP`);
    ``warmup_target`` replaces the matched start's target; ``task_order="free"`` puts
    :data:`FREE_ORDER` on top.

    Raises:
        ValueError: a ``warmup_target`` with ``matched=False`` or outside ``[0, 1]``; a
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
        settings = QUICK_FIXED_WARMUP if quick else FIXED_WARMUP
    else:
        settings = QUICK if quick else FULL
        if warmup_target is not None:
            settings = replace(settings, warmup_target=warmup_target)
    return replace(settings, **FREE_ORDER) if task_order == "free" else settings
