"""Per-step figures (docs/concepts/metrics.md): summed over micro-steps, reduced across ranks, written to
``metrics.jsonl`` and optionally to TensorBoard / Weights & Biases."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Figures that add up over micro-steps and ranks; everything else is averaged.
COUNT_KEYS = frozenset(
    {
        "supervised_tokens",
        "student_tokens",
        "chunks_one_to_one",
        "chunks_multi",
        "chunks_supervised",
        "responses",
        "ended_responses",
        "response_tokens",
        "teacher_tokens",
        "prompts",
    }
)
# The time split of one step, in the order the loop runs it.
PHASES = ("rollout", "teacher", "alignment", "student_forward", "loss", "backward", "optimizer")


class Timer:
    """Wall-clock seconds per phase; ``with timer("rollout"): ...`` adds to ``seconds``."""

    def __init__(self, synchronize: bool = False) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.synchronize = synchronize and torch.cuda.is_available()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.synchronize:  # CUDA is asynchronous: time the work, not its launch
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - start


class StepMetrics:
    """Accumulates one optimiser step's micro-step figures on one rank."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.micro_steps = 0

    def add(self, metrics: dict[str, float]) -> None:
        self.micro_steps += 1
        for key, value in metrics.items():
            self.sums[key] += float(value)

    def reduce(self, accelerator: Any, timer: Timer) -> dict[str, float]:
        """Sum counts and average the rest over micro-steps and ranks; add the time split.

        Every rank must call this (it is a collective).
        """
        keys = sorted(self.sums)
        phases = [f"time_{p}" for p in PHASES]
        values = [self.sums[k] for k in keys] + [timer.seconds.get(p, 0.0) for p in PHASES]
        tensor = torch.tensor(
            values + [float(self.micro_steps)], dtype=torch.float64, device=accelerator.device
        )
        tensor = accelerator.reduce(tensor, reduction="sum").tolist()
        world, micro = accelerator.num_processes, max(tensor[-1], 1.0)
        out = {}
        for key, value in zip(keys, tensor):
            out[key] = value if key in COUNT_KEYS else value / micro
        for key, value in zip(phases, tensor[len(keys) :]):
            out[key] = value / world  # ranks run in parallel: mean seconds per rank
        if out.get("student_tokens"):
            out["coverage"] = out.get("supervised_tokens", 0.0) / out["student_tokens"]
        if out.get("responses"):
            out["response_length_mean"] = out.get("response_tokens", 0.0) / out["responses"]
            out["ended_share"] = out.get("ended_responses", 0.0) / out["responses"]
        return out


class MetricsLogger:
    """Writes one JSON row per step to ``OUTPUT_DIR/metrics.jsonl`` (main process only).

    Args:
        output_dir: the run folder.
        enabled: False on every rank but the main one.
        reporters: any of ``tensorboard``, ``wandb``.
        run_name: the tracker run name.
        config: the resolved config, sent to W&B.
        resume_step: when resuming, rows after this step (written by the killed run after its
            last checkpoint) are dropped so the file has one row per step.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        enabled: bool,
        reporters: list[str],
        run_name: str | None = None,
        config: dict | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [row for row in read_metrics(output_dir) if row.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
        elif resume_step is None:
            self.path.write_text("", encoding="utf-8")
        if "tensorboard" in reporters:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if "wandb" in reporters:
            try:
                import wandb
            except ImportError as err:
                raise RuntimeError("report_to wandb needs `pip install wandb`") from err
            self.wandb = wandb.init(
                name=run_name, config=config, dir=str(output_dir), resume="allow"
            )

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
            for k, v in row.items()
        }
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")
        step = int(row.get("step", 0))
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


class MetricsError(ValueError):
    """A line of ``metrics.jsonl`` other than the last is not JSON (the file was edited or
    two runs wrote to it)."""


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``RUN_DIR/metrics.jsonl``.

    A last line that is not JSON is what a run killed while writing a row leaves: it is skipped
    with a warning naming the file and the line.

    Raises:
        FileNotFoundError: no ``metrics.jsonl`` in ``run_dir``.
        MetricsError: an earlier line is not JSON (the message names the file and line).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    lines = [
        (number, line)
        for number, line in enumerate(
            path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1
        )
        if line.strip()
    ]
    rows = []
    for index, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if index < len(lines) - 1:
                raise MetricsError(
                    f"{path}, line {number}: not valid JSON (not the last line, "
                    "so not a row cut short by a killed run); fix or remove "
                    "it"
                ) from None
            logger.warning(
                "%s, line %d: skipped, not valid JSON (a row cut short when the "
                "run was killed while writing it)",
                path,
                number,
            )
    return rows


def mean_of_last(rows: list[dict], count: int = 5) -> dict[str, float]:
    """Mean of each numeric figure over the last ``count`` training rows."""
    rows = [r for r in rows if "loss" in r][-count:]
    sums: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                sums[key].append(float(value))
    return {k: sum(v) / len(v) for k, v in sums.items()}
