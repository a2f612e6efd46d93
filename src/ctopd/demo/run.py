"""The ``ctopd demo`` experiment: cross-tokenizer OPD on a task a laptop can check.

Top to bottom, everything local and seeded:

1. **task** — arithmetic word problems with worked solutions (:mod:`ctopd.demo.task`), written as
   ``train.jsonl`` / ``test.jsonl`` in the trainer's data format;
2. **tokenizers** — a byte-level BPE that splits digits (teacher) and a SentencePiece BPE with
   multi-digit pieces and a dummy-prefix space (student), trained on the task's text;
3. **teacher** — a small Llama trained from scratch on the reference solutions (``run_sft``,
   ``sft.source=data``), saved in ``teacher/``;
4. **student** — a smaller Llama warmed up briefly with SFT on teacher samples, saved in
   ``student/``;
5. **methods** — from that same ``student/`` and with equal budgets (steps × prompts per step):
   ``simct``, ``dpca`` and ``shared_only`` on-policy distillation (``train``) and continued SFT on
   teacher samples (``run_sft``), once per seed, two runs at a time;
6. **report** — held-out accuracy, coverage, KL and wall time per method in ``results.json``,
   a printed table, ``results.md`` and ``curves.png`` (:mod:`ctopd.demo.report`).

Teacher and student are cached: a second run with the same settings reuses them (a
``demo.json`` stamp in each folder records the settings they were built with); ``force`` rebuilds.

Every process uses one thread: on two shared cores a two-thread step waits for whichever core is
busy, and two one-thread runs side by side finish sooner than two two-thread runs in a row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

METHODS = ("simct", "dpca", "shared_only", "sft")
STAMP = "demo.json"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and budgets of one demo configuration (see :data:`FULL` and :data:`QUICK`)."""

    # Task: values stay in [10, 199], amounts in [10, 99] (ctopd.demo.task).
    num_train: int
    num_test: int
    task_seed: int = 0
    # Tokenizers (vocabulary sizes; the student's gets 256 byte-fallback pieces on top).
    teacher_vocab: int = 512
    student_vocab: int = 600
    # Teacher: trained from scratch on the reference solutions.
    teacher_hidden: int = 64
    teacher_layers: int = 3
    teacher_steps: int = 1000
    teacher_batch: int = 64
    teacher_lr: float = 5e-3
    # Student: smaller, warmed up with SFT on teacher samples.
    student_hidden: int = 64
    student_layers: int = 2
    warmup_steps: int = 1000
    warmup_batch: int = 32
    warmup_lr: float = 3e-3
    # Methods: equal budgets from the warmed-up student.
    method_steps: int = 150
    method_batch: int = 32
    method_lr: float = 2e-4
    temperature: float = 1.0
    eval_every: int = 25
    max_new_tokens: int = 96
    # Held-out prompts for the sequence-level KL estimate.
    kl_prompts: int = 64

    def teacher_stamp(self) -> dict:
        """The settings the teacher depends on (a cached teacher is reused when they match)."""
        keys = ("num_train", "num_test", "task_seed", "teacher_vocab", "student_vocab",
                "teacher_hidden", "teacher_layers", "teacher_steps", "teacher_batch",
                "teacher_lr")
        return {key: getattr(self, key) for key in keys}

    def student_stamp(self) -> dict:
        """The settings the warmed-up student depends on (the teacher's included)."""
        keys = ("student_hidden", "student_layers", "warmup_steps", "warmup_batch", "warmup_lr",
                "temperature", "max_new_tokens")
        return {**self.teacher_stamp(), **{key: getattr(self, key) for key in keys}}


# The full run: under 20 minutes on two CPU cores.
FULL = DemoSettings(num_train=20000, num_test=200)
# CI: every stage runs, nothing is learned; under 3 minutes.
QUICK = DemoSettings(
    num_train=400, num_test=16, teacher_hidden=32, teacher_layers=1, teacher_steps=20,
    teacher_batch=16, student_hidden=32, student_layers=1, warmup_steps=4, warmup_batch=8,
    method_steps=3, method_batch=4, eval_every=3, max_new_tokens=48, kl_prompts=8,
)


def run_demo(output_dir: str | Path = "ctopd-demo", *, quick: bool = False, seeds: int = 3,
             force: bool = False, workers: int | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Run the whole experiment and write its report into ``output_dir``.

    Args:
        output_dir: folder for the data, models, runs and report (created).
        quick: the CI configuration (:data:`QUICK`), minutes instead of a quarter hour.
        seeds: runs per method (seeds ``0..seeds-1``); each starts from the same student.
        force: rebuild the teacher and the student even when cached ones match.
        workers: method runs side by side (default: CPU cores, at most 2).
        log: where progress lines go.

    Returns:
        The ``results.json`` content.
    """
    from ctopd.demo.report import plot_curves, results_markdown, write_results

    started = time.perf_counter()
    settings = QUICK if quick else FULL
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _one_thread()
    prepare_data(out, settings)
    teacher = build_teacher(out, settings, force=force, log=log)
    student = build_student(out, settings, force=force or teacher["rebuilt"], log=log)

    jobs = [dict(method=m, seed=s, out=str(out), settings=dataclasses.asdict(settings))
            for s in range(seeds) for m in METHODS]
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    log(f"[demo] {len(jobs)} runs ({', '.join(METHODS)} x {seeds} seeds), "
        f"{settings.method_steps} steps x {settings.method_batch} prompts each, "
        f"{workers} at a time")
    runs = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        for run in pool.map(run_method, jobs):
            log(f"[demo] {run['method']:<11} seed {run['seed']}: accuracy "
                f"{run['accuracy']:.3f}, coverage {_fmt(run['coverage'])}, "
                f"KL {_fmt(run['kl'])}, {run['seconds']:.0f} s")
            runs.append(run)

    results = summarize(teacher, student, runs, settings, seeds=seeds, quick=quick,
                        seconds=time.perf_counter() - started)
    write_results(out, results)
    plot_curves(results, out / "curves.png")
    table = results_markdown(results)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    log("\n" + table)
    log(f"\n[demo] wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'curves.png'} "
        f"in {results['seconds']:.0f} s")
    return results


def prepare_data(out: Path, settings: DemoSettings) -> None:
    """``train.jsonl`` and ``test.jsonl`` (regenerated each run: cheap and deterministic)."""
    from ctopd.demo.task import make_split, write_jsonl

    train, test = make_split(settings.num_train, settings.num_test, seed=settings.task_seed)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(test, out / "test.jsonl")


def build_teacher(out: Path, settings: DemoSettings, *, force: bool,
                  log: Callable[[str], None]) -> dict:
    """Train both tokenizers and the teacher (or reuse ``teacher/``); evaluate it.

    Returns:
        ``{"accuracy", "seconds", "rebuilt"}``.
    """
    stamp = settings.teacher_stamp()
    folder = out / "teacher"
    cached = None if force else _read_stamp(folder, stamp)
    if cached is not None and (out / "tokenizers" / "student").is_dir():
        log(f"[demo] reusing the teacher in {folder} (accuracy {cached['accuracy']:.3f})")
        return {**cached, "rebuilt": False}

    from ctopd.demo.models import tiny_causal_lm
    from ctopd.demo.task import corpus, make_split
    from ctopd.demo.tokenizers import train_byte_level_bpe, train_sentencepiece_bpe
    from ctopd.training.sft import run_sft

    started = time.perf_counter()
    train, _ = make_split(settings.num_train, settings.num_test, seed=settings.task_seed)
    texts = corpus(train[:4000])  # enough text for every merge either tokenizer makes
    teacher_tokenizer = train_byte_level_bpe(texts, settings.teacher_vocab, split_digits=True)
    student_tokenizer = train_sentencepiece_bpe(texts, settings.student_vocab)
    student_tokenizer.save_pretrained(out / "tokenizers" / "student")

    init = out / "runs" / "teacher-init"
    model = tiny_causal_lm(teacher_tokenizer, hidden_size=settings.teacher_hidden,
                           num_layers=settings.teacher_layers, num_heads=4, max_positions=512,
                           seed=settings.task_seed)
    _save(model, teacher_tokenizer, init)
    log(f"[demo] training the teacher ({_params(model)} parameters, "
        f"{settings.teacher_steps} steps) on reference solutions")
    config = _config(settings, out / "runs" / "teacher", student=init, teacher=None,
                     steps=settings.teacher_steps, batch=settings.teacher_batch,
                     lr=settings.teacher_lr, seed=settings.task_seed, eval_every=0,
                     warmup_ratio=0.03)
    config.sft.source = "data"
    run_sft(config)
    _replace(out / "runs" / "teacher" / "final", folder)
    shutil.rmtree(init, ignore_errors=True)
    accuracy = _accuracy(folder, out / "test.jsonl", settings)
    result = {"accuracy": accuracy, "seconds": time.perf_counter() - started}
    _write_stamp(folder, stamp, result)
    log(f"[demo] teacher: held-out accuracy {accuracy:.3f} ({result['seconds']:.0f} s)")
    return {**result, "rebuilt": True}


def build_student(out: Path, settings: DemoSettings, *, force: bool,
                  log: Callable[[str], None]) -> dict:
    """Warm up the student with SFT on teacher samples (or reuse ``student/``); evaluate it.

    Returns:
        ``{"accuracy", "kl", "noncanonical", "seconds"}`` (see :func:`sequence_kl`).
    """
    stamp = settings.student_stamp()
    folder = out / "student"
    cached = None if force else _read_stamp(folder, stamp)
    if cached is not None:
        log(f"[demo] reusing the student in {folder} (accuracy {cached['accuracy']:.3f})")
        return cached

    from ctopd.demo.models import tiny_causal_lm
    from ctopd.training.config import ModelConfig
    from ctopd.training.models import load_model_tokenizer
    from ctopd.training.sft import run_sft

    started = time.perf_counter()
    tokenizer = load_model_tokenizer(
        ModelConfig(name_or_path=str(out / "tokenizers" / "student")), side="student")
    init = out / "runs" / "student-init"
    model = tiny_causal_lm(tokenizer, hidden_size=settings.student_hidden,
                           num_layers=settings.student_layers, num_heads=4, max_positions=512,
                           seed=settings.task_seed + 1)
    _save(model, tokenizer, init)
    log(f"[demo] warming up the student ({_params(model)} parameters, "
        f"{settings.warmup_steps} SFT steps on teacher samples)")
    config = _config(settings, out / "runs" / "warmup", student=init, teacher=out / "teacher",
                     steps=settings.warmup_steps, batch=settings.warmup_batch,
                     lr=settings.warmup_lr, seed=settings.task_seed, eval_every=0,
                     warmup_ratio=0.05)
    config.sft.source = "teacher"
    # One teacher sample for each of warmup_steps x warmup_batch training prompts.
    config.data.path = str(_sample_prompts(out / "train.jsonl", out / "runs" / "warmup-prompts.jsonl",
                                           settings.warmup_steps * settings.warmup_batch,
                                           seed=settings.task_seed))
    run_sft(config)
    _replace(out / "runs" / "warmup" / "final", folder)
    shutil.rmtree(init, ignore_errors=True)
    accuracy = _accuracy(folder, out / "test.jsonl", settings)
    samples = sequence_kl(folder, out / "teacher", out / "test.jsonl", settings)
    kl = samples["kl"]
    result = {"accuracy": accuracy, "kl": kl, "noncanonical": samples["noncanonical"],
              "seconds": time.perf_counter() - started}
    _write_stamp(folder, stamp, result)
    log(f"[demo] student after warm-up: held-out accuracy {accuracy:.3f}, KL {kl:.3f} "
        f"({result['seconds']:.0f} s)")
    return result


def run_method(job: dict) -> dict:
    """One method, one seed, from ``student/`` (runs in a worker process).

    Args:
        job: ``method``, ``seed``, ``out`` (the demo folder) and ``settings`` (a dict).

    Returns:
        ``method``, ``seed``, ``accuracy`` (held-out, after the last step), ``coverage``,
        ``aligned_coverage`` and ``unaligned_share`` (over all steps, :func:`_coverage`) and
        ``train_kl`` (the objective's own, mean of the last steps); all ``None`` for SFT;
        ``kl`` and ``noncanonical`` (held-out samples, :func:`sequence_kl`), ``seconds`` (the run's wall time, its
        evaluations included) and ``curve`` (``step``, ``accuracy``, ``train_kl`` lists).
    """
    _one_thread()
    from ctopd.training.loop import train
    from ctopd.training.metrics import read_metrics
    from ctopd.training.sft import run_sft

    settings = DemoSettings(**job["settings"])
    out, method, seed = Path(job["out"]), job["method"], job["seed"]
    run_dir = out / "runs" / f"{method}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = _config(settings, run_dir, student=out / "student", teacher=out / "teacher",
                     steps=settings.method_steps, batch=settings.method_batch,
                     lr=settings.method_lr, seed=seed, eval_every=settings.eval_every,
                     warmup_ratio=0.0)
    if method == "sft":
        # Equal budget: one teacher sample per prompt, as many prompts as OPD sees.
        config.sft.source = "teacher"
        config.data.path = str(_sample_prompts(out / "train.jsonl", run_dir / "prompts.jsonl",
                                               settings.method_steps * settings.method_batch,
                                               seed=1000 + seed))
        summary = run_sft(config)
    else:
        config.objective.name = method
        summary = train(config)
    rows = read_metrics(run_dir)
    evals = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    final = summary["final_metrics"]
    final_dir = run_dir / "final"
    samples = sequence_kl(final_dir, out / "teacher", out / "test.jsonl", settings)
    shutil.rmtree(final_dir, ignore_errors=True)  # the report keeps the numbers, not the weights
    for checkpoint in run_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)
    coverage, aligned_coverage, unaligned_share = _coverage(rows) if method != "sft" else (None,) * 3
    return {
        "method": method, "seed": seed,
        "accuracy": summary["eval"]["accuracy"],
        "coverage": coverage, "aligned_coverage": aligned_coverage,
        "unaligned_share": unaligned_share,
        "train_kl": final.get("kl") if method != "sft" else None,
        "kl": samples["kl"], "noncanonical": samples["noncanonical"],
        "seconds": summary["seconds"], "steps": summary["steps"],
        "curve": {"step": [s for s, _ in evals], "accuracy": [a for _, a in evals],
                  "train_kl_step": [r["step"] for r in rows if "kl" in r],
                  "train_kl": [r["kl"] for r in rows if "kl" in r]},
    }


def _coverage(rows: list[dict]) -> tuple[float, float, float]:
    """Over every step of a run: supervised student tokens / sampled student tokens, supervised
    / aligned student tokens (those outside unaligned chunks), and the unaligned share."""
    sampled = sum(r["student_tokens"] for r in rows if "student_tokens" in r)
    supervised = sum(r["supervised_tokens"] for r in rows if "supervised_tokens" in r)
    unaligned = sum(round(r["student_tokens"] * r["unaligned_share"]) for r in rows
                    if "unaligned_share" in r)  # integer counts, stored as shares
    aligned = sampled - unaligned
    return (supervised / sampled if sampled else 0.0,
            supervised / aligned if aligned > 0 else 0.0,
            unaligned / sampled if sampled else 0.0)


def summarize(teacher: dict, student: dict, runs: list[dict], settings: DemoSettings, *,
              seeds: int, quick: bool, seconds: float) -> dict:
    """The ``results.json`` content: per method, the mean over seeds and every seed's run."""
    import statistics

    methods = {}
    for method in METHODS:
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        accuracies = [r["accuracy"] for r in mine]
        methods[method] = {
            "accuracy": statistics.fmean(accuracies),
            "accuracy_mean": statistics.fmean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "coverage": _mean([r["coverage"] for r in mine]),
            "aligned_coverage": _mean([r["aligned_coverage"] for r in mine]),
            "unaligned_share": _mean([r["unaligned_share"] for r in mine]),
            "kl": _mean([r["kl"] for r in mine]),
            "noncanonical": _mean([r["noncanonical"] for r in mine]),
            "train_kl": _mean([r["train_kl"] for r in mine]),
            "seconds": statistics.fmean(r["seconds"] for r in mine),
            "steps": mine[0]["steps"],
            "runs": mine,
        }
    return {
        "teacher_accuracy": teacher["accuracy"],
        "student_start_accuracy": student["accuracy"],
        "student_start_kl": student["kl"],
        "student_start_noncanonical": student.get("noncanonical"),
        "methods": methods,
        "seeds": seeds,
        "quick": quick,
        "settings": dataclasses.asdict(settings),
        "teacher_seconds": teacher["seconds"],
        "student_seconds": student["seconds"],
        "seconds": seconds,
    }


def sequence_kl(student_dir: Path, teacher_dir: Path, data_path: Path,
                settings: DemoSettings) -> dict:
    """Reverse KL per student token, measured the same way for every method, and how often the
    student spells its text with other tokens than its tokenizer would.

    The objectives each report their own ``kl`` over their own supervision space (SimCT over
    ``V∩`` plus units, shared-only over ``V∩``, DPCA per chunk), which are not comparable. This
    estimate is: the student samples a response ``y`` (temperature 1) to each of the first
    ``settings.kl_prompts`` held-out prompts; ``log π(y)`` is the sum of its token log-probs and
    ``log q(y)`` the teacher's log-prob of the same text under its own tokenisation (end of turn
    included).

    Returns:
        ``kl``: ``Σ (log π(y) - log q(y)) / Σ |y|`` (nats per student token); ``noncanonical``:
        the share of responses whose ids differ from the student tokenizer's encoding of their
        own text (a student that learned to spell numbers digit by digit, say).
    """
    import torch

    from ctopd.core.pair import TokenizerPair
    from ctopd.training.config import DataConfig, ModelConfig
    from ctopd.training.data import encode_prompts, load_examples
    from ctopd.training.models import load_causal_lm, load_model_tokenizer
    from ctopd.training.rollout import pad_responses, response_logits, sample_responses

    student_tokenizer = load_model_tokenizer(ModelConfig(name_or_path=str(student_dir)),
                                             side="student")
    teacher_tokenizer = load_model_tokenizer(ModelConfig(name_or_path=str(teacher_dir)),
                                             side="teacher")
    pair = TokenizerPair(teacher_tokenizer, student_tokenizer)
    student = load_causal_lm(ModelConfig(name_or_path=str(student_dir)), side="student").eval()
    teacher = load_causal_lm(ModelConfig(name_or_path=str(teacher_dir)), side="teacher").eval()
    examples = load_examples(DataConfig(path=str(data_path), limit=settings.kl_prompts))
    student_prompts = encode_prompts(student_tokenizer, examples, side="student")
    teacher_prompts = encode_prompts(teacher_tokenizer, examples, side="teacher")
    total, tokens, noncanonical = 0.0, 0, 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        batch = settings.method_batch
        for lo in range(0, len(examples), batch):
            s_prompts, t_prompts = student_prompts[lo:lo + batch], teacher_prompts[lo:lo + batch]
            responses = sample_responses(
                student, s_prompts, end_ids=pair.student_table.end_ids.tolist(),
                pad_id=student_tokenizer.pad_token_id, max_new_tokens=settings.max_new_tokens,
                temperature=1.0)
            teacher_responses = pair.teacher_ids_for_batch(responses)
            for model, prompts, ids, pad_id, sign in (
                (student, s_prompts, responses, student_tokenizer.pad_token_id, 1.0),
                (teacher, t_prompts, teacher_responses, teacher_tokenizer.pad_token_id, -1.0),
            ):
                logits = response_logits(model, prompts, ids, pad_id=pad_id, device="cpu")
                targets, lengths = pad_responses(ids)
                logprobs = torch.log_softmax(logits.float(), -1).gather(
                    -1, targets.unsqueeze(-1)).squeeze(-1)
                mask = torch.arange(targets.shape[1]) < lengths.unsqueeze(1)
                total += sign * float((logprobs * mask).sum())
            tokens += sum(len(r) for r in responses)
            for ids in responses:
                body = ids[:-1] if pair.ended_turn(ids) else ids
                canonical = student_tokenizer.encode(pair.student_text(body),
                                                     add_special_tokens=False)
                noncanonical += int(list(body) != canonical)
    return {"kl": total / max(tokens, 1), "noncanonical": noncanonical / max(len(examples), 1)}


def _config(settings: DemoSettings, output_dir: Path, *, student: Path, teacher: Path | None,
            steps: int, batch: int, lr: float, seed: int, eval_every: int, warmup_ratio: float):
    """A :class:`TrainConfig` for one stage; everything the demo does not set is the default."""
    from ctopd.training.config import TrainConfig

    values = {
        "student": {"name_or_path": str(student), "dtype": "float32"},
        "teacher": {"name_or_path": str(teacher) if teacher else "", "dtype": "float32"},
        "data": {"path": str(output_dir.parent.parent / "train.jsonl"), "shuffle": True},
        "rollout": {"temperature": settings.temperature,
                    "max_new_tokens": settings.max_new_tokens},
        # A constant rate after the warm-up: the methods' runs are short, and a cosine to
        # ~0 would spend half of them barely moving.
        "optim": {"lr": lr, "min_lr": 0.0, "schedule": "constant" if eval_every else "cosine",
                  "warmup_ratio": warmup_ratio, "weight_decay": 0.0},
        "output_dir": str(output_dir), "seed": seed, "max_steps": steps,
        "per_device_batch_size": batch, "progress": False, "log_every": 10 ** 9,
        "save_every": 0, "keep_checkpoints": 1,
        "eval_data": str(output_dir.parent.parent / "test.jsonl") if eval_every else None,
        "eval_every": eval_every, "eval_max_new_tokens": settings.max_new_tokens,
    }
    return TrainConfig.from_dict(values)


def _sample_prompts(source: Path, target: Path, count: int, *, seed: int) -> Path:
    """``count`` rows of ``source`` drawn without replacement (seeded), written to ``target``."""
    import random

    rows = source.read_text(encoding="utf-8").splitlines()
    chosen = random.Random(seed).sample(rows, min(count, len(rows)))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return target


def _accuracy(model_dir: Path, data_path: Path, settings: DemoSettings) -> float:
    from ctopd.training.evaluate import evaluate

    result = evaluate(str(model_dir), None, data_path, max_new_tokens=settings.max_new_tokens,
                      batch_size=max(settings.method_batch, 8))
    return result["accuracy"]


def _save(model, tokenizer, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _replace(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)


def _read_stamp(folder: Path, stamp: dict) -> dict | None:
    """The cached result when ``folder`` was built with exactly ``stamp``, else ``None``."""
    path = folder / STAMP
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return saved.get("result") if saved.get("settings") == stamp else None


def _write_stamp(folder: Path, stamp: dict, result: dict) -> None:
    (folder / STAMP).write_text(json.dumps({"settings": stamp, "result": result}, indent=2),
                                encoding="utf-8")


def _one_thread() -> None:
    """One torch thread, and no per-load progress bars from transformers (the demo logs its own
    progress lines)."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()


def _params(model) -> str:
    count = sum(p.numel() for p in model.parameters())
    return f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count / 1e3:.0f}k"


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
