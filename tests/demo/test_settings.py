"""The demo's settings and its teacher-sample pool: every run name has a learning rate, slices
of the pool never overlap, and the stamps change when what they guard changes."""

import dataclasses

import pytest

from ctopd.demo.run import parse_runs
from ctopd.demo.samples import pool_order, samples_needed, sft_slice, warmup_slice
from ctopd.demo.settings import FULL, QUICK, RUNS, DemoSettings


def test_every_run_has_a_learning_rate_and_a_sweep_grid():
    for settings in (FULL, QUICK):
        for name in RUNS:
            assert settings.lr(name) > 0
            assert len(settings.sweep_grid(name)) >= 2
    # The demo's rates are among the rates the sweep tries (the sweep chose them).
    for name in RUNS:
        assert FULL.lr(name) in FULL.sweep_grid(name)


def test_settings_reject_a_missing_run_name():
    with pytest.raises(ValueError, match="method_lrs must name each of"):
        dataclasses.replace(FULL, method_lrs=(("simct", 1e-4),))


def test_pool_slices_do_not_overlap_and_seeds_extend_the_pool():
    warm = warmup_slice(FULL)
    slices = [warm] + [sft_slice(FULL, seed) for seed in range(3)]
    ranges = [set(range(start, start + count)) for start, count in slices]
    for i, a in enumerate(ranges):
        for b in ranges[i + 1 :]:
            assert not a & b
    assert samples_needed(FULL, seeds=3, warmup=True, sft=True) == max(map(max, ranges)) + 1
    assert samples_needed(FULL, seeds=3, warmup=False, sft=False) == 0
    # A sweep's shorter SFT run takes the head of its seed's slice.
    assert sft_slice(FULL, 0, steps=10) == (sft_slice(FULL, 0)[0], 10 * FULL.method_batch)
    # Each seed's slice holds the longest calibration budget even when the demo's is shorter:
    # no two seeds share a sample, and the demo's run is the head of the calibration's.
    short = dataclasses.replace(FULL, method_steps=25, calibration_steps=(25, 50, 100))
    longest = [sft_slice(short, seed, steps=100) for seed in range(3)]
    spans = [set(range(start, start + count)) for start, count in longest]
    assert all(not a & b for i, a in enumerate(spans) for b in spans[i + 1 :])
    assert not spans[0] & set(range(*warm)) and min(spans[0]) >= sum(warm)
    assert samples_needed(short, seeds=3, warmup=False, sft=True) == max(spans[2]) + 1
    assert sft_slice(short, 1) == (longest[1][0], 25 * short.method_batch)
    # One permutation of the prompts after another: a longer pool starts with a shorter one.
    assert pool_order(50, 120, seed=0)[:70] == pool_order(50, 70, seed=0)
    assert sorted(pool_order(50, 50, seed=0)) == list(range(50))


def test_stamps_follow_what_they_guard():
    other_teacher = dataclasses.replace(FULL, teacher_steps=FULL.teacher_steps + 1)
    assert other_teacher.teacher_stamp() != FULL.teacher_stamp()
    assert other_teacher.student_stamp("student") != FULL.student_stamp("student")
    other_lr = dataclasses.replace(FULL, method_lrs=tuple((n, 1e-5) for n in RUNS))
    assert other_lr.student_stamp("student") == FULL.student_stamp("student")
    assert FULL.student_stamp("student") != FULL.student_stamp("control")


def test_parse_runs():
    assert parse_runs(None) == RUNS
    assert parse_runs("control_sft, simct") == ("simct", "control_sft")  # RUNS order
    with pytest.raises(ValueError, match="unknown method opd.*choose from simct"):
        parse_runs("simct,opd")


def test_full_settings_are_a_valid_demo():
    assert isinstance(FULL, DemoSettings) and FULL.num_validation > 0
    assert FULL.method_steps % FULL.eval_every == 0  # a measured point at the end


def test_matched_start_is_the_default_and_the_fixed_warmup_stays_selectable():
    from ctopd.demo.settings import FIXED_WARMUP, MATCHED, demo_settings
    from ctopd.demo.sweep import demo_command

    matched = demo_settings()
    assert matched is FULL and matched.warmup_target == MATCHED["warmup_target"]
    assert demo_settings(matched=False) is FIXED_WARMUP and FIXED_WARMUP.warmup_target is None
    assert demo_settings(quick=True, matched=False) is QUICK
    assert demo_settings(quick=True).warmup_target == 0.0
    assert matched.warmup_steps == MATCHED["warmup_steps"] > FIXED_WARMUP.warmup_steps
    # Everything else is the fixed warm-up's: the same teacher, samples and budgets.
    assert matched.samples_stamp() == FIXED_WARMUP.samples_stamp()
    assert matched.method_steps == FIXED_WARMUP.method_steps
    # Without a target the stamp is what it was (cached students stay valid); with one it
    # names the target, so a matched student never passes for a fixed-budget one.
    assert "warmup_target" not in FIXED_WARMUP.student_stamp("student")
    assert matched.student_stamp("student")["warmup_target"] == MATCHED["warmup_target"]
    assert demo_command("--sweep", quick=False, methods=RUNS) == "ctopd demo --sweep"
    assert demo_command("--sweep", quick=False, methods=RUNS, matched=False) == (
        "ctopd demo --sweep --fixed-warmup"
    )
    assert demo_command("--calibrate", quick=True, warmup_target=0.7) == (
        "ctopd demo --calibrate --quick --warmup-target 0.7"
    )
    # Its own sweep chose its rates, from the same grids.
    for name in RUNS:
        assert matched.lr(name) in matched.sweep_grid(name)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="warmup_target"):
            dataclasses.replace(FULL, warmup_target=bad)
    with pytest.raises(ValueError, match="warmup_check_every"):
        dataclasses.replace(FULL, warmup_check_every=0)


def test_a_warmup_target_moves_only_the_matched_start():
    from ctopd.demo.settings import demo_settings

    later = demo_settings(warmup_target=0.7)
    assert later.warmup_target == 0.7
    assert dataclasses.replace(later, warmup_target=FULL.warmup_target) == FULL
    # The students are stamped with their target (rebuilt for a new one); nothing before them.
    assert later.samples_stamp() == FULL.samples_stamp()
    assert later.student_stamp("control") != FULL.student_stamp("control")
    assert demo_settings(quick=True, warmup_target=1.0).warmup_target == 1.0
    with pytest.raises(ValueError, match="drop --fixed-warmup or --warmup-target"):
        demo_settings(matched=False, warmup_target=0.7)
    with pytest.raises(ValueError, match="warmup_target"):
        demo_settings(warmup_target=1.5)


def test_the_free_order_task_is_stamped_and_the_fixed_order_keeps_old_caches():
    free = dataclasses.replace(FULL, task_order="free")
    assert free.task_ranges()["order"] == "free" and FULL.task_ranges()["order"] == "fixed"
    assert free.teacher_stamp()["task_order"] == "free"
    assert "task_order" not in FULL.teacher_stamp()  # cached fixed-order teachers stay valid
    with pytest.raises(ValueError, match="task_order must be fixed or free"):
        dataclasses.replace(FULL, task_order="random")


def test_task_order_free_puts_the_free_order_settings_on_either_start():
    from ctopd.demo.settings import FIXED_WARMUP, FREE_ORDER, demo_settings
    from ctopd.demo.sweep import demo_command

    assert demo_settings(task_order="free") == dataclasses.replace(FULL, **FREE_ORDER)
    assert demo_settings(matched=False, task_order="free") == dataclasses.replace(
        FIXED_WARMUP, **FREE_ORDER
    )
    assert demo_settings(quick=True, task_order="free").task_order == "free"
    assert demo_settings(task_order="fixed") is FULL
    with pytest.raises(ValueError, match="--task-order must be fixed or free"):
        demo_settings(task_order="shuffled")
    assert demo_command("--calibrate", quick=False, task_order="free") == (
        "ctopd demo --calibrate --task-order free"
    )


def test_sampled_accuracy_settings_are_checked_and_change_no_cached_model():
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="sampled_temperature must be above 0"):
            dataclasses.replace(FULL, sampled_temperature=bad)
    greedy_only = dataclasses.replace(FULL, sampled_temperature=None, sampled_seed=3)
    assert greedy_only.student_stamp("control") == FULL.student_stamp("control")
    assert greedy_only.samples_stamp() == FULL.samples_stamp()
