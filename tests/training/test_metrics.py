"""Step figures: reduction over micro-steps, metrics.jsonl on resume, and the PNG plots."""

from __future__ import annotations

import json
import logging

import pytest
from accelerate import Accelerator

from ctopd.training.metrics import (
    MetricsError,
    MetricsLogger,
    StepMetrics,
    Timer,
    mean_of_last,
    read_metrics,
)
from ctopd.training.plot import plot_run


def test_counts_add_up_and_figures_average():
    figures = StepMetrics()
    figures.add(
        {
            "loss": 1.0,
            "kl": 0.5,
            "supervised_tokens": 6,
            "student_tokens": 10,
            "responses": 2,
            "response_tokens": 10,
            "ended_responses": 1,
        }
    )
    figures.add(
        {
            "loss": 3.0,
            "kl": 1.5,
            "supervised_tokens": 4,
            "student_tokens": 10,
            "responses": 2,
            "response_tokens": 30,
            "ended_responses": 2,
        }
    )
    timer = Timer()
    with timer("rollout"):
        pass
    row = figures.reduce(Accelerator(cpu=True), timer)
    assert row["loss"] == 2.0 and row["kl"] == 1.0
    assert row["supervised_tokens"] == 10 and row["student_tokens"] == 20
    assert row["coverage"] == 0.5  # recomputed from the sums, not averaged
    assert row["response_length_mean"] == 10.0 and row["ended_share"] == 0.75
    assert row["time_rollout"] >= 0 and row["time_backward"] == 0.0


def test_logger_truncates_rows_after_the_resumed_step(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, reporters=[])
    for step in (1, 2, 3):
        logger.log({"step": step, "loss": float(step)})
    resumed = MetricsLogger(tmp_path, enabled=True, reporters=[], resume_step=2)
    resumed.log({"step": 3, "loss": 30.0, "odd": float("nan")})
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert rows[-1]["odd"] == "nan"  # JSON has no NaN; it is written as a string
    assert mean_of_last(rows, 2) == {"loss": 16.0}
    MetricsLogger(tmp_path, enabled=False, reporters=[]).log({"step": 9})
    assert len(read_metrics(tmp_path)) == 3


def test_plot_writes_pngs(tmp_path):
    rows = [
        {
            "step": s,
            "loss": 1.0 / s,
            "kl": 0.1 * s,
            "coverage": 0.7,
            "time_rollout": 0.5,
            "time_loss": 0.01,
            **({"eval_accuracy": 0.2 * s} if s % 2 == 0 else {}),
        }
        for s in range(1, 6)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = {p.name for p in plot_run(tmp_path)}
    assert written == {"loss.png", "kl.png", "coverage.png", "eval_accuracy.png", "time_split.png"}
    assert all((tmp_path / "plots" / name).stat().st_size > 1000 for name in written)
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_run(tmp_path / "empty")


def test_a_half_written_last_line_is_skipped_with_a_warning(tmp_path, caplog):
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    # A run killed while writing its fourth row.
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    with caplog.at_level(logging.WARNING, logger="ctopd.training.metrics"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        assert {p.name for p in plot_run(tmp_path)} >= {"loss.png"}
    assert f"{path}, line 4: skipped, not valid JSON" in caplog.text
    # Resuming from step 2 rewrites the file without the cut row.
    MetricsLogger(tmp_path, enabled=True, reporters=[], resume_step=2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_a_bad_line_before_the_last_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(MetricsError, match=f"{path}, line 2: not valid JSON"):
        read_metrics(tmp_path)
