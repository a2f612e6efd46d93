"""Paired comparisons of demo runs on the same held-out problems, with bootstrap intervals.

A model's outcomes on a split are a string of ``1`` (right) and ``0`` (wrong), one per problem
in order (:func:`ctopd.demo.measure.outcomes`); a method's are one such string per seed, a
``[seeds, problems]`` matrix. Every figure compared here is a function of the mean accuracies
of a few such matrices (two methods' difference; the ratio of two methods' gap closed, which
also reads the starts and the teacher). A mean over a ``[seeds, problems]`` matrix varies for
three reasons: which problems were drawn, which seeds, and each seed's luck on each problem.
Its interval is a bootstrap that counts each once:

* problems are resampled with replacement, **one draw shared by every matrix**, on each
  method's per-problem mean over seeds. All runs were scored on the same problems, and keeping
  the pairing removes the problems' own difficulty from a difference (two methods that fail
  the same hard problems differ by less noise than two independent 0.96s). This also carries
  the seed-by-problem luck, averaged over the seeds.
* the seeds' own spread (a run that is better on every problem) is added per method as a
  normal draw of variance ``sigma_seed^2 / seeds``, ``sigma_seed^2`` estimated from the two-way
  analysis of variance: the variance of the seeds' mean accuracies less the part the
  seed-by-problem luck explains, ``max(0, var(row means) - MS_residual / problems)``.
  Resampling the seeds as well would count that luck twice (measured: 90% intervals covered
  the truth in every one of 120 simulated experiments; this scheme's covered it in 95%, a
  little conservative). A single model (a start, the teacher) has no seed term.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np


def outcome_matrix(outcomes: Sequence[str]) -> np.ndarray:
    """``[len(outcomes), problems]`` float64 array of 0/1 from outcome strings of equal length.

    Raises:
        ValueError: no strings, strings of different lengths, or a character other than 0/1.
    """
    if not outcomes:
        raise ValueError("outcome_matrix needs at least one outcome string")
    lengths = {len(text) for text in outcomes}
    if len(lengths) != 1:
        raise ValueError(
            f"outcome strings must cover the same problems; got lengths {sorted(lengths)}"
        )
    matrix = np.frombuffer("".join(outcomes).encode("ascii"), dtype=np.uint8).reshape(
        len(outcomes), -1
    )
    if not np.isin(matrix, (ord("0"), ord("1"))).all():
        raise ValueError("outcome strings hold only the characters 0 and 1")
    return (matrix == ord("1")).astype(np.float64)


def seed_variance(matrix: np.ndarray) -> float:
    """The seeds' own variance of accuracy, ``sigma_seed^2``, of a ``[seeds, problems]`` 0/1
    matrix, from the two-way analysis of variance (0 for a single seed or a single problem)."""
    seeds, problems = matrix.shape
    if seeds < 2 or problems < 2:
        return 0.0
    rows, columns, mean = matrix.mean(1), matrix.mean(0), matrix.mean()
    residual = matrix - rows[:, None] - columns[None, :] + mean
    ms_residual = float((residual**2).sum()) / ((seeds - 1) * (problems - 1))
    return max(0.0, float(rows.var(ddof=1)) - ms_residual / problems)


def bootstrap(
    matrices: Mapping[str, np.ndarray],
    statistic: Callable[[dict], float],
    *,
    draws: int = 4000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """A statistic of mean accuracies and its bootstrap interval (see the module docstring).

    Args:
        matrices: name -> ``[seeds, problems]`` 0/1 array; every one has the same problems (a
            single model is one row).
        statistic: maps ``{name: mean accuracy}`` to a number; it receives numpy arrays of
            ``draws`` resampled means as well, so it must be written with arithmetic only
            (``m["a"] - m["b"]``, ratios), no ``if``.
        draws: bootstrap resamples.
        level: the interval's coverage (percentile interval).
        seed: the resampling seed (the same inputs give the same interval).

    Returns:
        ``value`` (the statistic of the observed means), ``low`` and ``high`` (the interval,
        over the resamples where the statistic is finite), ``above_zero`` (share of resamples
        with a positive statistic), ``problems``, ``draws``; the first four ``None`` when the
        observed statistic is not finite (a ratio of gaps that are 0).
    """
    sizes = {m.shape[1] for m in matrices.values()}
    if len(sizes) != 1:
        raise ValueError("every matrix must hold the same problems (columns)")
    (problems,) = sizes
    rng = np.random.default_rng(seed)
    # How often each problem was drawn in each resample, [draws, problems].
    problem_weights = rng.multinomial(problems, np.full(problems, 1.0 / problems), size=draws)
    observed, resampled = {}, {}
    for name, matrix in matrices.items():
        observed[name] = float(matrix.mean())
        spread = np.sqrt(seed_variance(matrix) / matrix.shape[0])
        resampled[name] = (
            problem_weights @ matrix.mean(0) / problems + rng.normal(0.0, 1.0, draws) * spread
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(statistic({k: np.float64(v) for k, v in observed.items()}))
        values = np.asarray(statistic(resampled), dtype=np.float64)
    finite = values[np.isfinite(values)]
    if not np.isfinite(value) or finite.size == 0:  # e.g. a ratio of gaps that are all 0
        return {
            "value": None,
            "low": None,
            "high": None,
            "above_zero": None,
            "problems": problems,
            "draws": draws,
        }
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return {
        "value": value,
        "low": float(low),
        "high": float(high),
        "above_zero": float((values > 0).mean()),
        "problems": problems,
        "draws": draws,
    }


def difference(a: np.ndarray, b: np.ndarray, **kwargs) -> dict:
    """Mean accuracy of ``a`` minus that of ``b`` (``[seeds, problems]`` each, the same
    problems), with its paired bootstrap interval (:func:`bootstrap`)."""
    return bootstrap({"a": a, "b": b}, lambda m: m["a"] - m["b"], **kwargs)


def gap_fraction_ratio(
    method: np.ndarray,
    start: np.ndarray,
    control: np.ndarray,
    control_start: np.ndarray,
    teacher: np.ndarray,
    **kwargs,
) -> dict:
    """How large a share of its gap to the teacher a method closes, as a fraction of the share
    a control method closes of its own: ``((m - s) / (t - s)) / ((c - cs) / (t - cs))`` of mean
    accuracies, with its bootstrap interval. The starts and the teacher are single models
    (one row each)."""

    def ratio(m):
        return (
            (m["method"] - m["start"])
            / (m["teacher"] - m["start"])
            / ((m["control"] - m["control_start"]) / (m["teacher"] - m["control_start"]))
        )

    return bootstrap(
        {
            "method": method,
            "start": start,
            "control": control,
            "control_start": control_start,
            "teacher": teacher,
        },
        ratio,
        **kwargs,
    )
