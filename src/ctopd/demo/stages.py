"""The demo's build stages: data, tokenizers and teacher, the two warmed-up students; and what
every stage shares (a stage's ``TrainConfig``, cache stamps, one torch thread).

The teacher's tokenizer is a Qwen2-style byte-level BPE with one token per digit, the
cross-tokenizer student's a Llama-3-style one with digit groups of up to three: the realistic
multi-digit case (Qwen2.5 → Llama-3.2), and the mismatch falls where the answer is decided. The
same-tokenizer control (folder ``control/``) uses the teacher's tokenizer and chat template.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ctopd.demo.settings import DemoSettings

STAMP = "demo.json"
# Whose tokenizer each warmed-up student (and its folder, OUT/<kind>/) uses.
STUDENT_TOKENIZERS = {"student": "student", "control": "teacher"}


def prepare_data(out: Path, settings: DemoSettings) -> None:
    """Write the five splits as ``<split>.jsonl`` (cheap and deterministic: every run)."""
    from ctopd.demo.task import make_splits, write_jsonl

    splits = make_splits(
        settings.num_train,
        settings.num_test,
        settings.num_validation,
        seed=settings.task_seed,
        num_extra_test=settings.num_extra_test,
        num_extra_validation=settings.num_extra_validation,
        **settings.task_ranges(),
    )
    for name, problems in splits._asdict().items():
        write_jsonl(problems, out / f"{name}.jsonl")


def build_teacher(
    out: Path, settings: DemoSettings, *, force: bool, log: Callable[[str], None]
) -> dict:
    """Train both tokenizers and the teacher (or reuse ``teacher/``) and evaluate it:
    ``{"accuracy", "validation_accuracy", "rounds", "seconds", "rebuilt"}``.

    The teacher trains in rounds (warm restarts, each a cosine cycle with its own data order)
    until it reaches ``teacher_target``: one 1,000-step round gave 1.000 on one machine and
    0.495 on another; when a small model learns to read the later verbs is floating-point luck.
    """
    stamp, folder = settings.teacher_stamp(), out / "teacher"
    cached = None if force else read_stamp(folder, stamp)
    if cached is not None and all(
        (out / "tokenizers" / n).is_dir() for n in ("teacher", "student")
    ):
        log(f"[demo] reusing the teacher in {folder} (accuracy {cached['accuracy']:.3f})")
        return {**cached, "rebuilt": False}

    from ctopd.demo.measure import accuracy
    from ctopd.demo.task import corpus, make_splits
    from ctopd.testing import train_byte_level_bpe, train_digit_group_bpe

    started = time.perf_counter()
    counts = (settings.num_train, settings.num_test, settings.num_validation)
    train = make_splits(*counts, seed=settings.task_seed, **settings.task_ranges()).train
    texts = corpus(train[:4000])  # enough text for every merge either tokenizer makes
    tokenizer = train_byte_level_bpe(texts, settings.teacher_vocab, split_digits=True)
    train_digit_group_bpe(texts, settings.student_vocab).save_pretrained(
        out / "tokenizers" / "student"
    )
    tokenizer.save_pretrained(out / "tokenizers" / "teacher")
    init = out / "runs" / "teacher-init"
    params = _new_model(tokenizer, settings, "teacher", init, seed=settings.task_seed)
    target = settings.teacher_target
    until = ""
    if target is not None:
        until = f" per round, until its validation accuracy reaches {target:g}, at most "
        until += f"{settings.teacher_rounds} rounds"
    log(
        f"[demo] training the teacher ({params} parameters, {settings.teacher_steps} steps"
        f"{until}) on reference solutions"
    )
    rounds, current, run_dirs = [], init, []
    for index in range(settings.teacher_rounds if target is not None else 1):
        # runs/teacher for the first round, then runs/teacher-round2, ...
        run_dirs.append(out / "runs" / ("teacher" if index == 0 else f"teacher-round{index + 1}"))
        run_sft_stage(
            settings,
            run_dirs[-1],
            response_field="answer",  # the reference solution
            data=out / "train.jsonl",
            student=current,
            steps=settings.teacher_steps,
            batch=settings.teacher_batch,
            lr=settings.teacher_lr,
            seed=settings.task_seed + index,
            warmup_ratio=0.03,
        )
        current = run_dirs[-1] / "final"
        validation = accuracy(current, out / "validation.jsonl", settings)
        rounds.append(
            {"round": index + 1, "steps": settings.teacher_steps, "validation_accuracy": validation}
        )
        log(f"[demo] teacher round {index + 1}: validation accuracy {validation:.3f}")
        if target is None or validation >= target:
            break
    else:
        log(
            f"[demo] warning: the teacher reached {validation:.3f} validation accuracy after "
            f"{len(rounds)} rounds, short of {target:g}; the demo goes on, but every student "
            "is distilled from (and every gap measured to) a weaker teacher"
        )
    replace_folder(current, folder)
    for run_dir in run_dirs:  # each round's metrics stay, its weights go
        for leftover in (*run_dir.glob("checkpoint-*"), run_dir / "final"):
            shutil.rmtree(leftover, ignore_errors=True)
    shutil.rmtree(init, ignore_errors=True)
    result = {
        "accuracy": accuracy(folder, out / "test.jsonl", settings),
        "validation_accuracy": validation,
        "rounds": rounds,
        "seconds": time.perf_counter() - started,
    }
    write_stamp(folder, stamp, result)
    log(
        f"[demo] teacher: held-out accuracy {result['accuracy']:.3f} after {len(rounds)} "
        f"round(s) ({result['seconds']:.0f} s)"
    )
    return {**result, "rebuilt": True}


def cached_student(out: Path, settings: DemoSettings, kind: str) -> dict | None:
    """A warmed-up student's stamped result when ``OUT/<kind>/`` was built with these
    settings, else ``None``."""
    return read_stamp(out / kind, settings.student_stamp(kind))


def build_student(job: dict) -> dict:
    """Warm the ``job["kind"]`` student up with SFT on the warm-up slice of the teacher samples
    and evaluate it (in a worker process). Both students share everything but the tokenizer.
    Returns ``{"kind", "accuracy", "kl", "noncanonical", "warmup_steps", "warmup_curve",
    "seconds"}``."""
    one_thread()
    from ctopd.demo.measure import accuracy, sequence_kl
    from ctopd.demo.samples import warmup_slice, write_sft_data
    from ctopd.training.config import ModelConfig
    from ctopd.training.models import load_model_tokenizer

    started = time.perf_counter()
    out, settings, kind = Path(job["out"]), job["settings"], job["kind"]
    folder, runs = out / kind, out / "runs" / f"warmup-{kind}"
    shutil.rmtree(runs, ignore_errors=True)
    tokenizer_dir = out / "tokenizers" / STUDENT_TOKENIZERS[kind]
    tokenizer = load_model_tokenizer(ModelConfig(name_or_path=str(tokenizer_dir)), side="student")
    _new_model(tokenizer, settings, "student", runs / "init", seed=settings.task_seed + 1)
    # The matched start keeps a checkpoint every warmup_check_every steps to choose from.
    matched = settings.warmup_target is not None
    every = settings.warmup_check_every if matched else 0
    run_sft_stage(
        settings,
        runs / "train",
        response_field="response",  # the teacher's sample
        data=write_sft_data(out, runs / "data.jsonl", *warmup_slice(settings)),
        student=runs / "init",
        steps=settings.warmup_steps,
        batch=settings.warmup_batch,
        lr=settings.warmup_lr,
        seed=settings.task_seed,
        schedule=settings.warmup_schedule,
        warmup_ratio=0.05,
        save_every=every,
        keep_checkpoints=settings.warmup_steps // every + 1 if matched else 1,
    )
    chosen, steps, curve = runs / "train" / "final", settings.warmup_steps, []
    if matched:
        chosen, steps, curve = _first_at_target(runs / "train", out, settings)
    replace_folder(chosen, folder)
    shutil.rmtree(runs, ignore_errors=True)
    result = {
        "kind": kind,
        "accuracy": accuracy(folder, out / "test.jsonl", settings),
        **sequence_kl(folder, out / "teacher", out / "test.jsonl", settings),
        "warmup_steps": steps,
        "warmup_curve": curve,
        "seconds": time.perf_counter() - started,
    }
    write_stamp(folder, settings.student_stamp(kind), result)
    return result


def _first_at_target(run_dir: Path, out: Path, settings: DemoSettings) -> tuple[Path, int, list]:
    """The matched start: the warm-up's first checkpoint reaching ``warmup_target`` validation
    accuracy (else the last), its step, and ``[step, accuracy]`` of each checkpoint measured."""
    from ctopd.demo.measure import accuracy
    from ctopd.training.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise RuntimeError(f"the warm-up in {run_dir} saved no checkpoint")
    curve = []
    for checkpoint in checkpoints:
        step = int(checkpoint.name.split("-")[-1])
        curve.append([step, accuracy(checkpoint / "student", out / "validation.jsonl", settings)])
        if curve[-1][1] >= settings.warmup_target:
            break
    return checkpoint / "student", step, curve


def _new_model(tokenizer, settings: DemoSettings, role: str, folder: Path, *, seed: int) -> str:
    """Save a new model of the ``role``'s size (``teacher``, ``student``) with ``tokenizer`` in
    ``folder``; return its parameter count as text (``"190k"``)."""
    from ctopd.testing import tiny_causal_lm

    model = tiny_causal_lm(
        tokenizer,
        hidden_size=getattr(settings, f"{role}_hidden"),
        num_layers=getattr(settings, f"{role}_layers"),
        num_heads=getattr(settings, f"{role}_heads"),
        seed=seed,
    )
    save_model(model, tokenizer, folder)
    count = sum(p.numel() for p in model.parameters())
    return f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count / 1e3:.0f}k"


def run_sft_stage(
    settings: DemoSettings, output_dir: Path, *, response_field: str, schedule="cosine", **stage
) -> dict:
    """SFT on the ``response_field`` of each data row (:func:`stage_config`'s ``stage``
    arguments, no teacher); returns ``run_sft``'s summary."""
    from ctopd.training.sft import run_sft

    config = stage_config(settings, output_dir, teacher=None, schedule=schedule, **stage)
    config.sft.source, config.sft.response_field = "data", response_field
    return run_sft(config)


def stage_config(
    settings: DemoSettings,
    output_dir: Path,
    *,
    data: Path,
    student: Path,
    teacher: Path | None,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    schedule: str,
    warmup_ratio: float = 0.0,
    save_every: int = 0,
    keep_checkpoints: int = 1,
):
    """A :class:`TrainConfig` for one stage, rebuilding its folder. No evaluation inside the
    loop: the demo measures the checkpoints ``save_every`` writes afterwards, in big batches."""
    from ctopd.training.config import TrainConfig

    optim = {"lr": lr, "min_lr": 0.0, "schedule": schedule, "warmup_ratio": warmup_ratio}
    rollout = {"temperature": settings.temperature, "max_new_tokens": settings.max_new_tokens}
    return TrainConfig.from_dict(
        {
            "student": {"name_or_path": str(student), "dtype": "float32"},
            "teacher": {"name_or_path": str(teacher) if teacher else "", "dtype": "float32"},
            "data": {"path": str(data), "shuffle": True},
            "rollout": rollout,
            "optim": {**optim, "weight_decay": 0.0},
            "output_dir": str(output_dir),
            "seed": seed,
            "max_steps": steps,
            "per_device_batch_size": batch,
            "progress": False,
            "log_every": 10**9,
            "save_every": save_every,
            "keep_checkpoints": keep_checkpoints,
            "overwrite": True,
        }
    )


def read_stamp(folder: Path, stamp: dict, name: str = STAMP) -> dict | None:
    """The cached result when ``folder`` was built with exactly ``stamp``, else ``None``."""
    path = folder / name
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return saved.get("result") if saved.get("settings") == stamp else None


def write_stamp(folder: Path, stamp: dict, result: dict, name: str = STAMP) -> None:
    text = json.dumps({"settings": stamp, "result": result}, indent=2)
    (folder / name).write_text(text, encoding="utf-8")


def save_model(model, tokenizer, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def replace_folder(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)


def one_thread() -> None:
    """One torch thread and no per-load progress bars: on two shared cores two one-thread
    processes side by side finish sooner than two two-thread ones in a row."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
