"""The demo's settings and its teacher-sample pool: every run name has a learning rate, slices
of the pool never overlap, and the stamps change when what they guard changes."""

import dataclasses

import pytest

from ctopd.demo.run import parse_runs
from ctopd.demo.samples import pool_order, samples_needed, sft_slice, warmup_slice
from ctopd.demo.settings import FULL, QUICK, RUNS, DemoSettings


def test_every_run_has_a_learning_rate():
    for settings in (FULL, QUICK):
        assert all(settings.lr(name) > 0 for name in RUNS)


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


def test_the_demo_runs_the_matched_start():
    from ctopd.demo.settings import demo_settings

    assert demo_settings() is FULL and demo_settings(quick=True) is QUICK
    # Each warm-up stops at its first checkpoint reaching 0.45 (quick: 0, the first one).
    assert (FULL.warmup_target, FULL.warmup_check_every, FULL.warmup_steps) == (0.45, 100, 2000)
    assert QUICK.warmup_target == 0.0 and QUICK.warmup_steps % QUICK.warmup_check_every == 0
    # With a target the stamp names it, so a matched student never passes for another one.
    assert FULL.student_stamp("student")["warmup_target"] == 0.45
    untargeted = dataclasses.replace(FULL, warmup_target=None)
    assert "warmup_target" not in untargeted.student_stamp("student")
    assert untargeted.samples_stamp() == FULL.samples_stamp()
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="warmup_target"):
            dataclasses.replace(FULL, warmup_target=bad)
    with pytest.raises(ValueError, match="warmup_check_every"):
        dataclasses.replace(FULL, warmup_check_every=0)


def test_sampled_accuracy_settings_are_checked_and_change_no_cached_model():
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="sampled_temperature must be above 0"):
            dataclasses.replace(FULL, sampled_temperature=bad)
    greedy_only = dataclasses.replace(FULL, sampled_temperature=None, sampled_seed=3)
    assert greedy_only.student_stamp("control") == FULL.student_stamp("control")
    assert greedy_only.samples_stamp() == FULL.samples_stamp()
