"""Paired bootstrap comparisons of testbed runs (research/testbed_lib/compare.py)."""

import numpy as np
import pytest
from testbed_lib.compare import (
    bootstrap,
    difference,
    gap_fraction_ratio,
    outcome_matrix,
    seed_variance,
)


def _strings(matrix: np.ndarray) -> list[str]:
    return ["".join("1" if x else "0" for x in row) for row in matrix]


def test_outcome_matrix_reads_strings_and_rejects_bad_ones():
    matrix = outcome_matrix(["1010", "0011"])
    assert matrix.tolist() == [[1, 0, 1, 0], [0, 0, 1, 1]]
    with pytest.raises(ValueError, match="same problems"):
        outcome_matrix(["101", "10"])
    with pytest.raises(ValueError, match="0 and 1"):
        outcome_matrix(["10x"])
    with pytest.raises(ValueError, match="at least one"):
        outcome_matrix([])


def test_identical_runs_differ_by_zero_up_to_their_seeds_spread():
    rng = np.random.default_rng(0)
    runs = outcome_matrix(_strings(rng.random((3, 4000)) < 0.9))
    result = difference(runs, runs.copy(), draws=500)
    # The same problems in every draw cancel; what is left is each method's seed term, drawn
    # independently, which is small for seeds that differ only by luck.
    assert result["value"] == 0.0
    assert -0.01 < result["low"] <= 0.0 <= result["high"] < 0.01
    single = outcome_matrix(_strings(rng.random((1, 500)) < 0.9))
    point = difference(single, single.copy(), draws=500)
    assert point["value"] == point["low"] == point["high"] == 0.0  # one model each: no seeds


def test_seed_variance_separates_the_seeds_own_spread_from_their_luck():
    rng = np.random.default_rng(3)
    luck = (rng.random((3, 4000)) < 0.9).astype(float)
    assert seed_variance(luck) < 2e-5  # iid outcomes: the row means differ by luck alone
    # Seeds 0.8, 0.9, 1.0 accurate on every problem alike: variance 0.01.
    spread = (rng.random((3, 4000)) < np.array([[0.8], [0.9], [1.0]])).astype(float)
    assert seed_variance(spread) == pytest.approx(0.01, rel=0.15)
    other = (rng.random((3, 4000)) < 0.9).astype(float)
    narrow, wide = difference(luck, other), difference(spread, other)
    assert (wide["high"] - wide["low"]) > 3 * (narrow["high"] - narrow["low"])


def test_pairing_narrows_the_interval_of_runs_that_fail_the_same_problems():
    rng = np.random.default_rng(1)
    hard = rng.random(2000) < 0.1  # problems both runs fail
    a = ~hard & (rng.random(2000) < 0.99)
    b = ~hard
    paired = difference(outcome_matrix(_strings(a[None])), outcome_matrix(_strings(b[None])))
    # The same accuracies on unrelated problems: b's outcomes shuffled.
    shuffled = difference(
        outcome_matrix(_strings(a[None])), outcome_matrix(_strings(rng.permutation(b)[None]))
    )
    assert paired["value"] == pytest.approx(shuffled["value"])
    assert paired["value"] < 0 and paired["high"] < 0 and paired["above_zero"] == 0.0
    assert (paired["high"] - paired["low"]) < 0.5 * (shuffled["high"] - shuffled["low"])


def test_intervals_cover_the_true_difference_about_as_often_as_they_say():
    # Independent runs with known accuracies (every seed alike): a 90% interval of the
    # difference covers the true one in about 90% of repeated experiments.
    rng = np.random.default_rng(2)
    true_a, true_b, covered, trials = 0.95, 0.93, 0, 120
    for trial in range(trials):
        a = rng.random((3, 800)) < true_a
        b = rng.random((3, 800)) < true_b
        result = difference(a.astype(float), b.astype(float), draws=800, level=0.9, seed=trial)
        covered += result["low"] <= true_a - true_b <= result["high"]
    assert 0.8 <= covered / trials <= 0.98


def test_gap_fraction_ratio_reads_starts_and_teacher_on_the_same_problems():
    problems = 1000
    teacher = np.ones((1, problems))
    start = np.zeros((1, problems))
    start[0, :500] = 1  # 0.5
    control_start = np.zeros((1, problems))
    control_start[0, :600] = 1  # 0.6
    method = np.zeros((2, problems))
    method[:, :900] = 1  # 0.9: closes 0.8 of its gap
    control = np.zeros((2, problems))
    control[:, :960] = 1  # 0.96: closes 0.9 of its gap
    result = gap_fraction_ratio(method, start, control, control_start, teacher, draws=300)
    assert result["value"] == pytest.approx(0.8 / 0.9)
    assert result["low"] <= result["value"] <= result["high"]


def test_bootstrap_rejects_matrices_over_different_problems():
    with pytest.raises(ValueError, match="same problems"):
        bootstrap({"a": np.ones((1, 3)), "b": np.ones((1, 4))}, lambda m: m["a"] - m["b"])


def test_a_ratio_of_zero_gaps_has_no_value_rather_than_a_crash():
    zeros, ones = np.zeros((1, 10)), np.ones((1, 10))
    result = gap_fraction_ratio(ones, zeros, zeros, zeros, zeros, draws=50)
    assert result["value"] is None and result["low"] is None
    assert difference(ones, zeros, draws=50)["value"] == 1.0
