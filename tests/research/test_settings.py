"""The testbed's configurations beyond ``ctopd demo``'s: the fixed warm-up, another matched
target, the free-order task, the studies' grids, and the commands that reproduce each."""

import dataclasses

import pytest
from testbed_lib.settings import (
    FIXED_WARMUP,
    FREE_ORDER,
    FULL,
    QUICK,
    QUICK_FIXED_WARMUP,
    RUNS,
    pick_settings,
)
from testbed_lib.studies import rerun_command

from ctopd.demo import settings as demo
from ctopd.demo.samples import samples_needed, sft_slice, warmup_slice


def test_the_testbed_runs_the_demo_settings_unless_asked_otherwise():
    for ours, theirs in ((FULL, demo.FULL), (QUICK, demo.QUICK)):
        assert ours.samples_stamp() == theirs.samples_stamp()
        assert ours.student_stamp("student") == theirs.student_stamp("student")
        assert ours.method_lrs == theirs.method_lrs and ours.slice_steps() == theirs.method_steps
    # The demo's rates are among the rates the sweep tries (the sweep chose them).
    for settings in (FULL, FIXED_WARMUP):
        assert all(settings.lr(name) in settings.sweep_grid(name) for name in RUNS)
    with pytest.raises(ValueError, match="sweep_lrs must name each of"):
        dataclasses.replace(FULL, sweep_lrs=(("simct", (1e-4,)),))


def test_sft_slices_hold_the_longest_calibration_budget():
    warm = warmup_slice(FULL)
    # Each seed's slice holds the longest calibration budget even when the demo's is shorter:
    # no two seeds share a sample, and the demo's run is the head of the calibration's.
    short = dataclasses.replace(FULL, method_steps=25, calibration_steps=(25, 50, 100))
    longest = [sft_slice(short, seed, steps=100) for seed in range(3)]
    spans = [set(range(start, start + count)) for start, count in longest]
    assert all(not a & b for i, a in enumerate(spans) for b in spans[i + 1 :])
    assert not spans[0] & set(range(*warm)) and min(spans[0]) >= sum(warm)
    assert samples_needed(short, seeds=3, warmup=False, sft=True) == max(spans[2]) + 1
    assert sft_slice(short, 1) == (longest[1][0], 25 * short.method_batch)


def test_matched_start_is_the_default_and_the_fixed_warmup_stays_selectable():
    matched = pick_settings()
    assert matched is FULL and matched.warmup_target == demo.FULL.warmup_target
    assert pick_settings(matched=False) is FIXED_WARMUP and FIXED_WARMUP.warmup_target is None
    assert pick_settings(quick=True, matched=False) is QUICK_FIXED_WARMUP
    assert pick_settings(quick=True).warmup_target == 0.0
    assert matched.warmup_steps == 2000 > FIXED_WARMUP.warmup_steps == 1000
    # Everything else is the fixed warm-up's: the same teacher, samples and budgets.
    assert matched.samples_stamp() == FIXED_WARMUP.samples_stamp()
    assert matched.method_steps == FIXED_WARMUP.method_steps
    # Without a target the stamp is what it was (cached students stay valid); with one it
    # names the target, so a matched student never passes for a fixed-budget one.
    assert "warmup_target" not in FIXED_WARMUP.student_stamp("student")
    assert matched.student_stamp("student")["warmup_target"] == 0.45
    assert (
        rerun_command("--sweep", quick=False, methods=RUNS) == "python research/testbed.py --sweep"
    )
    assert rerun_command("--sweep", quick=False, methods=RUNS, matched=False) == (
        "python research/testbed.py --sweep --fixed-warmup"
    )
    assert rerun_command("--calibrate", quick=True, warmup_target=0.7) == (
        "python research/testbed.py --calibrate --quick --warmup-target 0.7"
    )
    # Its own sweep chose its rates, from the same grids.
    for name in RUNS:
        assert matched.lr(name) in matched.sweep_grid(name)


def test_a_warmup_target_moves_only_the_matched_start():
    later = pick_settings(warmup_target=0.7)
    assert later.warmup_target == 0.7
    assert dataclasses.replace(later, warmup_target=FULL.warmup_target) == FULL
    # The students are stamped with their target (rebuilt for a new one); nothing before them.
    assert later.samples_stamp() == FULL.samples_stamp()
    assert later.student_stamp("control") != FULL.student_stamp("control")
    assert pick_settings(quick=True, warmup_target=1.0).warmup_target == 1.0
    with pytest.raises(ValueError, match="drop --fixed-warmup or --warmup-target"):
        pick_settings(matched=False, warmup_target=0.7)
    with pytest.raises(ValueError, match="warmup_target"):
        pick_settings(warmup_target=1.5)


def test_task_order_free_puts_the_free_order_settings_on_either_start():
    assert pick_settings(task_order="free") == dataclasses.replace(FULL, **FREE_ORDER)
    assert pick_settings(matched=False, task_order="free") == dataclasses.replace(
        FIXED_WARMUP, **FREE_ORDER
    )
    assert pick_settings(quick=True, task_order="free").task_order == "free"
    assert pick_settings(task_order="fixed") is FULL
    with pytest.raises(ValueError, match="--task-order must be fixed or free"):
        pick_settings(task_order="shuffled")
    assert rerun_command("--calibrate", quick=False, task_order="free") == (
        "python research/testbed.py --calibrate --task-order free"
    )
    assert rerun_command("", quick=True, seeds=2) == "python research/testbed.py --quick --seeds 2"
    assert rerun_command("", quick=False, seeds=3) == "python research/testbed.py"
