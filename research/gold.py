"""TRL's GOLD trainer side by side with ``ctopd train`` on the demo: held-out accuracy, the
demo's common KL and throughput, on the same models, prompts, budgets and sampling settings.

    pip install -e ".[bench]"          # trl==1.16.0, the version this was checked with
    python research/gold.py --demo-dir ctopd-demo [--seeds 0,1,2] [--steps 100] [--lrs 3e-4,1e-3]
        [--variants recommended,teacher_template] [--rerun-ours] [--json] [--output FILE]

Reads a finished ``python research/testbed.py --fixed-warmup`` folder (``teacher/``, ``student/``, the
splits, ``results.json``) and trains the warmed-up cross-tokenizer student from the teacher with
``trl.experimental.gold.GOLDTrainer`` in the cross-tokenizer configuration TRL's GOLD page
recommends (``docs/source/gold_trainer.md``, "Usage tips" and its explicit example):

* ``use_uld_loss=True``: "Set this to True for cross-tokenizer setups."
* ``teacher_tokenizer_name_or_path=DEMO/teacher``: "required when use_uld_loss=True; GOLD uses
  the teacher tokenizer to align tokens" (a local folder, nothing is downloaded).
* ``uld_use_hybrid_loss=True``: "compares exact vocabulary matches directly and falls back to the
  original sorted-probability ULD loss for unmatched tokens"; its two weights unset, as in the
  page's explicit example, which makes them adaptive (matched = matched teacher ids / V_T).
* ``lmbda=1.0``: every batch on-policy (the default 0.5 trains half the steps on dataset text).
* left at GOLD's defaults: ``use_extended_uld=True`` (byte-offset groups; both demo tokenizers
  are byte-level, the case it is for), ``beta=0.5`` (generalized JSD on the matched part),
  ``uld_token_merge_strategy="observed"``, ``uld_skip_student_eos=uld_skip_teacher_eos=True``,
  ``uld_crossentropy_weight=0``.

Set to the demo's ``ctopd train`` values (``runs/<method>-seed<k>/config.yaml``) so that only the
method differs: 32 prompts per optimizer step (``per_device_train_batch_size=32``, no
accumulation), ``max_steps`` 100 (the sweep: 50), ``max_completion_length=96``, temperature 1,
``top_p=1``, ``top_k=0``, AdamW (``adam_beta2=0.98``, eps 1e-8, no weight decay), cosine decay
with ``warmup_steps=0.1``, ``max_grad_norm=1.0``, fp32 on the CPU, ``gradient_checkpointing=False``
(SFTConfig's default is True, ctopd's False), ``dataloader_drop_last=True`` (the GOLD page's
advice), the run's seed. What still differs: the warm-up starts at lr 0 (ctopd's at lr/11) and
the two samplers shuffle the 20,000 prompts differently (the prompts' ids are the same: GOLD's
prompt split of every checked row equals ``ctopd``'s ``encode_prompts``). The dataset is ``train.jsonl``'s chat
with the reference answer as the assistant turn: GOLD finds the prompt as "everything before the
last assistant turn", and with ``lmbda=1`` that answer is never trained on.

Measured as the demo measures its own methods (:mod:`ctopd.demo.measure`): greedy exact-answer
accuracy on the 200 test problems, the common sequence-level KL on 64 prompts, the non-canonical
share. The learning rate is chosen like the demo's (``testbed_lib/studies.py``): simct's grid
(``StudySettings.sweep_lrs``), seed 0, ``sweep_steps`` steps, scored on ``validation.jsonl``,
:func:`testbed_lib.studies.choose`. The ``simct`` and ``dpca`` rows are read from the demo's
``results.json`` (same seeds; its settings are checked equal to the ones used here), or rerun in
this run with ``--rerun-ours`` (:func:`ctopd.demo.methods.run_method`).

Variants (``--variants``, default: recommended, bayesian, teacher_template_bayesian):
``recommended`` is the configuration above. ``bayesian`` adds the documented
``uld_token_merge_strategy="bayesian"``: "the answer-logit slice is shifted one position earlier
so that probs[k] predicts token_ids[k] (chain rule)"; the default "observed" slice starts at the
first completion token, so each compared distribution is the one that predicts the token *after*
it and the first completion token is never supervised. ``teacher_template`` is the
recommended configuration with what GOLD 1.16 has no option for with text models: its teacher reads the
*student's* chat template as literal text (``build_teacher_inputs_from_texts`` tokenises the
decoded student prompt; only the VLM path renders the teacher's own template) and the student's
end-of-turn token as ten literal characters; the variant gives the teacher its own template and
drops that text (:class:`MeasuredGOLDTrainer`), to separate GOLD's loss from that plumbing;
``teacher_template_bayesian`` is both. Each variant gets its own validation sweep. A run that
GOLD stops with an exception (its ULD loss returns shape ``[1]`` instead of a scalar when no
completion of a batch has a token besides the end of turn on either side, and ``Trainer`` cannot
add that to its running loss; seen with ``teacher_template`` at 3e-3, step 14) is measured as it
stood and marked ``crash``.

On the demo every variant collapses on simct's grid (the student learns to stop early or to
spell numbers digit by digit) and the sweep's best is its lowest rate; ``--lrs
1e-5,3e-5,1e-4,3e-4`` extends it down (README, "Side by side with TRL's GOLD").

Throughput: GOLD, ``ctopd train --objective simct`` and ``--objective dpca`` on the same models,
the first ``steps x 32`` training prompts, the same sampling and ``--threads`` torch threads;
each measurement in a fresh process, the tools in turn, ``--throughput-rounds`` rounds, the best
round kept. Seconds per optimizer step and student tokens per second exclude the first step (a
warm-up); student tokens are the sampled completion tokens, end of turn included. Peak memory:
``peak_mib``, the rise of the process's peak resident set size (Linux ``VmHWM``, reset just
before) over its size after imports, so it holds model loading, data preparation and every
step; ``peak_rss_mib``, the whole process. (A rise over the first step alone depends on what
glibc kept from it, 0 to 60 MiB at random here, so it is not reported.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

# GOLD configurations: (patch the teacher's prompt and end text?, further GOLDConfig options).
VARIANTS = {
    "recommended": (False, {}),
    "bayesian": (False, {"uld_token_merge_strategy": "bayesian"}),
    "teacher_template": (True, {}),
    "teacher_template_bayesian": (True, {"uld_token_merge_strategy": "bayesian"}),
}
DEFAULT_VARIANTS = ("recommended", "bayesian", "teacher_template_bayesian")
OURS = ("simct", "dpca")


# --- helpers every worker shares --------------------------------------------------------------


def start_worker(threads: int) -> None:
    """The same torch thread count in every process, no progress bars, no experimental notice."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()


def status_mib(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (MiB); None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024


def reset_peak() -> float:
    """Reset the kernel's peak counter (VmHWM) and return the resident size now (MiB); off
    Linux, ``getrusage``'s peak so far (the worker is a fresh process)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return status_mib("VmRSS")


def peak_since(baseline: float) -> dict:
    import resource

    peak = status_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mib": peak - baseline, "peak_rss_mib": peak}


def read_rows(path: Path, limit: int | None = None) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit]


def end_ids(student_dir: Path) -> list[int]:
    """The student's end-of-turn ids, as the demo wrote them into its generation config."""
    from transformers import GenerationConfig

    ids = GenerationConfig.from_pretrained(student_dir).eos_token_id
    return list(ids) if isinstance(ids, list) else [ids]


# --- GOLD ---------------------------------------------------------------------------------------


def measured_gold_class():
    """:class:`MeasuredGOLDTrainer` (built on first use: the package and ctopd's own rows never
    import trl)."""
    from transformers import TrainerCallback
    from trl.experimental.gold import GOLDTrainer

    class MeasuredGOLDTrainer(GOLDTrainer):
        """``GOLDTrainer`` as shipped plus timers, a per-step clock and counts of the student's
        completion tokens. With ``teacher_prompts`` (the ``teacher_template`` variant) the
        teacher reads its own chat template instead of the student's, and the student's
        end-of-turn text is cut from what it reads (GOLD appends the teacher's own EOS)."""

        def __init__(self, *args, teacher_prompts=None, student_end_text="", **kwargs):
            self.teacher_prompts, self.student_end_text = teacher_prompts, student_end_text
            self.seconds = {"rollout": 0.0, "loss": 0.0, "training_step": 0.0}
            self.student_tokens = self.unmatched_tokens = 0
            self.clock = StepClock(self)
            super().__init__(*args, callbacks=[self.clock], **kwargs)

        def _fill_buffer(self, *args, **kwargs):  # on-policy generation, once per step
            with add_seconds(self.seconds, "rollout"):
                return super()._fill_buffer(*args, **kwargs)

        def training_step(self, *args, **kwargs):
            with add_seconds(self.seconds, "training_step"):
                return super().training_step(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            completion = inputs["input_ids"][inputs["labels"] != -100]
            self.student_tokens += completion.numel()
            self.completion_lengths = (inputs["labels"] != -100).sum(1).tolist()
            matched = torch.tensor(sorted(self.uld_loss_fn._student_matched_ids))
            self.unmatched_tokens += int((~torch.isin(completion.cpu(), matched)).sum())
            if self.teacher_prompts is not None:
                inputs = {
                    **inputs,
                    "original_prompt_text": [
                        self.teacher_prompts[p] for p in inputs["original_prompt_text"]
                    ],
                    "original_completion_text": [
                        c.removesuffix(self.student_end_text)
                        for c in inputs["original_completion_text"]
                    ],
                }
            with add_seconds(self.seconds, "loss"):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class StepClock(TrainerCallback):
        """Wall time and student tokens of every optimizer step (step end to step end), and
        the trainer's phase timers after the first step."""

        def __init__(self, trainer):
            self.trainer, self.steps, self.after_first = trainer, [], None

        def on_train_begin(self, args, state, control, **kwargs):
            self.last, self.tokens = time.perf_counter(), 0

        def on_step_end(self, args, state, control, **kwargs):
            now, tokens = time.perf_counter(), self.trainer.student_tokens
            self.steps.append({"seconds": now - self.last, "tokens": tokens - self.tokens})
            self.tokens = tokens
            if self.after_first is None:  # the steps after this one are the timed ones
                self.after_first = dict(self.trainer.seconds)
            self.last = time.perf_counter()

    return MeasuredGOLDTrainer


@contextlib.contextmanager
def add_seconds(totals: dict, key: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        totals[key] += time.perf_counter() - started


def gold_config(job: dict, output_dir: Path):
    """The ``GOLDConfig`` of one run (the options and why: the module docstring)."""
    from trl.experimental.gold import GOLDConfig

    settings, demo = job["settings"], Path(job["demo"])
    return GOLDConfig(
        output_dir=str(output_dir),
        seed=job["seed"],
        max_steps=job["steps"],
        # Cross-tokenizer GOLD, as TRL's GOLD page recommends it.
        use_uld_loss=True,
        uld_use_hybrid_loss=True,
        teacher_tokenizer_name_or_path=str(demo / "teacher"),
        lmbda=1.0,  # fully on-policy
        # The demo's budget and sampling (runs/<method>-seed<k>/config.yaml).
        per_device_train_batch_size=settings.method_batch,
        gradient_accumulation_steps=1,
        max_completion_length=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=1.0,
        top_k=0,
        # The demo's optimizer and schedule.
        learning_rate=job["lr"],
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.98,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        lr_scheduler_type="cosine",
        warmup_steps=settings.method_warmup_ratio,
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        # Plumbing: no saving or reporting inside the run, no progress bars.
        dataloader_drop_last=True,
        dataloader_pin_memory=False,
        save_strategy="no",
        report_to="none",
        logging_steps=max(1, job["steps"] // 10),
        disable_tqdm=True,
        **VARIANTS[job["variant"]][1],
    )


def build_gold(job: dict, rows: list[dict], output_dir: Path):
    """The models, the dataset and a :class:`MeasuredGOLDTrainer` for one run."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    demo = Path(job["demo"])
    tokenizer = AutoTokenizer.from_pretrained(demo / "student")
    student = AutoModelForCausalLM.from_pretrained(demo / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(demo / "teacher", dtype=torch.float32)
    # GOLD's conversational format: the prompt is everything before the last assistant turn.
    dataset = Dataset.from_list(
        [
            {"messages": row["messages"] + [{"role": "assistant", "content": row["answer"]}]}
            for row in rows
        ]
    )
    extra = {}
    if VARIANTS[job["variant"]][0]:
        extra = {
            "teacher_prompts": teacher_prompt_texts(rows, tokenizer, demo / "teacher"),
            "student_end_text": tokenizer.eos_token,
        }
    trainer = measured_gold_class()(
        model=student,
        teacher_model=teacher,
        args=gold_config(job, output_dir),
        processing_class=tokenizer,
        train_dataset=dataset,
        **extra,
    )
    return trainer, tokenizer


def teacher_prompt_texts(rows: list[dict], student_tokenizer, teacher_dir: Path) -> dict:
    """Student prompt text (as GOLD decodes it) -> the same chat under the teacher's template."""
    from transformers import AutoTokenizer

    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)

    def render(tok, m):
        return tok.apply_chat_template(
            m,
            tokenize=False,
            add_generation_prompt=True,
        )

    return {
        render(student_tokenizer, r["messages"]): render(teacher_tokenizer, r["messages"])
        for r in rows
    }


def gold_run(job: dict) -> dict:
    """Train one GOLD run, save the student and measure it as the demo does (a worker)."""
    start_worker(job["threads"])
    from ctopd.demo.measure import accuracy, sequence_kl
    from ctopd.training.checkpoint import export_student

    demo, run_dir = Path(job["demo"]), Path(job["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    trainer, tokenizer = build_gold(job, read_rows(demo / "train.jsonl"), run_dir / "trainer")
    started, crash = time.perf_counter(), None
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            trainer.train()
    except RuntimeError as err:  # see the module docstring: measured as it stood
        if "broadcast shape" not in str(err):
            raise
        crash = {
            "step": trainer.state.global_step + 1,
            "error": str(err),
            "longest_completion_tokens": max(trainer.completion_lengths),
        }
    seconds = time.perf_counter() - started
    model = run_dir / "final"
    export_student(
        trainer.accelerator, trainer.model, tokenizer, model, end_ids=end_ids(demo / "student")
    )
    data = demo / f"{job['split']}.jsonl"
    measured_at = time.perf_counter()
    result = {
        "accuracy": accuracy(model, data, job["settings"]),
        **sequence_kl(model, demo / "teacher", data, job["settings"]),
    }
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    lengths = [step["tokens"] / job["settings"].method_batch for step in trainer.clock.steps]
    uld = trainer.uld_loss_fn
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "variant": job["variant"],
        "seed": job["seed"],
        "lr": job["lr"],
        "steps": trainer.state.global_step,
        "split": job["split"],
        **result,
        "seconds": seconds,
        "eval_seconds": time.perf_counter() - measured_at,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "response_length_first": lengths[0] if lengths else None,
        "response_length_last": statistics.fmean(lengths[-5:]) if lengths else None,
        "crash": crash,
        "matched_teacher_ids": len(uld._teacher_matched_ids),
        "teacher_vocab": trainer.teacher_model.config.vocab_size,
        "unmatched_share": trainer.unmatched_tokens / max(1, trainer.student_tokens),
        "threads": __import__("torch").get_num_threads(),
    }


# --- throughput -------------------------------------------------------------------------------


def gold_throughput(job: dict) -> dict:
    """A few GOLD steps in this fresh process: seconds per step, tokens/s, peak memory."""
    start_worker(job["threads"])
    import torch
    import trl.experimental.gold  # noqa: F401  (imported before the memory baseline)

    baseline = reset_peak()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = build_gold(
            {**job, "variant": "recommended"}, read_rows(Path(job["prompts"])), Path(tmp)
        )
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            trainer.train()
    timed = trainer.clock.steps[1:]
    seconds = sum(s["seconds"] for s in timed)
    after, first = trainer.seconds, trainer.clock.after_first
    phase = {k: (after[k] - first[k]) / len(timed) for k in after}
    return {
        "tool": "gold",
        "seconds_per_step": seconds / len(timed),
        "tokens_per_second": sum(s["tokens"] for s in timed) / seconds,
        "rollout": phase["rollout"],
        "loss_side": phase["loss"],
        "backward": phase["training_step"] - phase["rollout"] - phase["loss"],
        **peak_since(baseline),
        "threads": torch.get_num_threads(),
    }


def ctopd_throughput(job: dict) -> dict:
    """A few ``ctopd train`` steps of one objective in this fresh process (same figures)."""
    start_worker(job["threads"])
    import torch

    from ctopd.demo.stages import stage_config
    from ctopd.training.loop import train
    from ctopd.training.metrics import read_metrics

    baseline = reset_peak()
    demo, settings = Path(job["demo"]), job["settings"]
    with tempfile.TemporaryDirectory() as tmp:
        config = stage_config(
            settings,
            Path(tmp),
            data=Path(job["prompts"]),
            student=demo / "student",
            teacher=demo / "teacher",
            steps=job["steps"],
            batch=settings.method_batch,
            lr=job["lr"],
            seed=job["seed"],
            schedule="cosine",
            warmup_ratio=settings.method_warmup_ratio,
        )
        config.objective = dataclasses.replace(config.objective, name=job["tool"])
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            train(config)
        rows = read_metrics(Path(tmp))[1:]
    seconds = sum(r["time_step"] for r in rows)
    mean = lambda *keys: sum(r[k] for r in rows for k in keys) / len(rows)  # noqa: E731
    return {
        "tool": job["tool"],
        "seconds_per_step": seconds / len(rows),
        "tokens_per_second": sum(r["response_tokens"] for r in rows) / seconds,
        "rollout": mean("time_rollout"),
        "loss_side": mean("time_teacher", "time_alignment", "time_student_forward", "time_loss"),
        "backward": mean("time_backward"),
        **peak_since(baseline),
        "threads": torch.get_num_threads(),
    }


def measure_throughput(args, settings, lrs: dict, log) -> dict:
    """Each tool in turn, each measurement in a fresh process; the best round per tool."""
    prompts = Path(tempfile.mkdtemp()) / "prompts.jsonl"
    rows = read_rows(args.demo_dir / "train.jsonl", args.throughput_steps * settings.method_batch)
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    base = dict(
        demo=str(args.demo_dir),
        settings=settings,
        threads=args.threads,
        seed=0,
        steps=args.throughput_steps,
        prompts=str(prompts),
    )
    jobs = {
        "gold": (gold_throughput, {**base, "lr": lrs["gold"]}),
        **{name: (ctopd_throughput, {**base, "tool": name, "lr": lrs[name]}) for name in OURS},
    }
    rounds: dict[str, list[dict]] = {name: [] for name in jobs}
    for index in range(args.throughput_rounds):
        for name, (fn, job) in jobs.items():
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                rounds[name].append(pool.submit(fn, job).result())
            r = rounds[name][-1]
            log(
                f"[gold] throughput round {index + 1} {name:<5}: {r['seconds_per_step']:.3f} s/step, "
                f"{r['tokens_per_second']:.0f} tokens/s, peak +{r['peak_mib']:.0f} MiB"
            )
    shutil.rmtree(prompts.parent, ignore_errors=True)
    best = {name: min(runs, key=lambda r: r["seconds_per_step"]) for name, runs in rounds.items()}
    for name, runs in rounds.items():  # memory: the smallest over the rounds, like the timing
        best[name] = {
            **best[name],
            "peak_mib": min(r["peak_mib"] for r in runs),
            "peak_rss_mib": min(r["peak_rss_mib"] for r in runs),
            "rounds_seconds_per_step": [r["seconds_per_step"] for r in runs],
        }
    return best


# --- diagnostics -------------------------------------------------------------------------------


def teacher_reading_student_template(demo: Path, settings) -> dict:
    """What GOLD's teacher sees: its greedy test accuracy, and its mean log-prob per token of the
    reference answers, after its own chat template and after the student's (as literal text)."""
    import torch
    from transformers import AutoTokenizer

    from ctopd.training.config import ModelConfig
    from ctopd.training.evaluate import evaluate
    from ctopd.training.models import load_causal_lm
    from ctopd.training.rollout import pad_responses, response_logits

    template = str(demo / "student" / "chat_template.jinja")
    out = {}
    for label, chat_template in (("own", None), ("student", template)):
        out[f"accuracy_{label}_template"] = evaluate(
            str(demo / "teacher"),
            None,
            demo / "test.jsonl",
            chat_template=chat_template,
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.eval_batch,
        )["accuracy"]
    tokenizers = {
        side: AutoTokenizer.from_pretrained(demo / side) for side in ("student", "teacher")
    }
    teacher = load_causal_lm(ModelConfig(name_or_path=str(demo / "teacher")), side="teacher").eval()
    rows = read_rows(demo / "test.jsonl", settings.kl_prompts)
    t_tok = tokenizers["teacher"]
    answers = [
        t_tok(r["answer"], add_special_tokens=False)["input_ids"] + [t_tok.eos_token_id]
        for r in rows
    ]
    for label, tok in (("own", t_tok), ("student", tokenizers["student"])):
        texts = [
            tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
            for r in rows
        ]
        prompts = [t_tok(text, add_special_tokens=True)["input_ids"] for text in texts]
        with torch.no_grad():
            logits = response_logits(
                teacher, prompts, answers, pad_id=t_tok.pad_token_id, device="cpu"
            )
        targets, lengths = pad_responses(answers)
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
        mask = torch.arange(targets.shape[1]) < lengths[:, None]
        out[f"answer_logprob_{label}_template"] = float((logprobs * mask).sum() / mask.sum())
    return out


# --- the run ------------------------------------------------------------------------------------


def run_all(args, log) -> dict:
    from testbed_lib.settings import FIXED_WARMUP
    from testbed_lib.studies import choose

    from ctopd.demo.methods import method_job, run_method, summarize_method
    from ctopd.demo.settings import settings_dict

    started, settings = time.perf_counter(), FIXED_WARMUP
    demo_results = json.loads((args.demo_dir / "results.json").read_text(encoding="utf-8"))
    if demo_results.get("settings") != settings_dict(settings):
        raise SystemExit(
            f"error: {args.demo_dir}/results.json was written with other settings "
            "than testbed_lib.settings.FIXED_WARMUP; rerun `ctopd demo "
            "--fixed-warmup` first"
        )
    steps = args.steps or settings.method_steps
    sweep_steps = args.sweep_steps or settings.sweep_steps
    grid = args.lrs or settings.sweep_grid("simct")
    work = Path(tempfile.mkdtemp(prefix="gold-bench-"))
    base = dict(demo=str(args.demo_dir), settings=settings, threads=args.threads)
    out = {
        "trl_version": _version("trl"),
        "demo_dir": str(args.demo_dir),
        "seeds": args.seeds,
        "steps": steps,
        "sweep_steps": sweep_steps,
        "grid": list(grid),
        "batch": settings.method_batch,
        "max_new_tokens": settings.max_new_tokens,
        "threads": args.threads,
        "variants": list(args.variants),
    }
    workers = args.workers or max(1, min(2, os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        chosen, sweep_rows = {}, []
        if len(grid) > 1:
            jobs = [
                {
                    **base,
                    "variant": v,
                    "seed": 0,
                    "lr": lr,
                    "steps": sweep_steps,
                    "split": "validation",
                    "run_dir": str(work / f"sweep-{v}-{lr:g}"),
                }
                for v in args.variants
                for lr in grid
            ]
            log(
                f"[gold] sweep: {len(jobs)} GOLD runs ({', '.join(args.variants)} x lr "
                f"{', '.join(f'{lr:g}' for lr in grid)}), {sweep_steps} steps x "
                f"{settings.method_batch} prompts, seed 0, scored on validation.jsonl"
            )
            for row in pool.map(gold_run, jobs):
                sweep_rows.append({**row, "name": row["variant"]})
                log(
                    f"[gold] sweep {row['variant']:<16} lr {row['lr']:.0e}: validation accuracy "
                    f"{row['accuracy']:.3f}, KL {row['kl']:.3f} ({row['seconds']:.0f} s)"
                )
            chosen = choose(sweep_rows)
        chosen = {v: chosen.get(v, grid[0]) for v in args.variants}
        jobs = [
            {
                **base,
                "variant": v,
                "seed": seed,
                "lr": chosen[v],
                "steps": steps,
                "split": "test",
                "run_dir": str(work / f"{v}-seed{seed}"),
            }
            for v in args.variants
            for seed in args.seeds
        ]
        log(
            f"[gold] test: {len(jobs)} GOLD runs, {steps} steps x {settings.method_batch} "
            f"prompts at the chosen rates ({chosen}), seeds {args.seeds}"
        )
        ours_jobs = (
            [
                method_job(
                    name,
                    seed,
                    args.demo_dir,
                    settings,
                    steps=steps,
                    curve=False,
                    run_dir=work / f"{name}-seed{seed}",
                )
                for name in OURS
                for seed in args.seeds
            ]
            if args.rerun_ours
            else []
        )
        gold_futures = [pool.submit(gold_run, job) for job in jobs]
        ours_runs = list(pool.map(run_method, ours_jobs))
        gold_runs = [f.result() for f in gold_futures]
    for row in gold_runs:
        log(
            f"[gold] test {row['variant']:<16} seed {row['seed']}: accuracy {row['accuracy']:.3f}"
            f", KL {row['kl']:.3f} ({row['seconds']:.0f} s)"
        )
    out["sweep"] = sweep_rows
    out["chosen_lr"] = chosen
    out["gold"] = {v: _summary([r for r in gold_runs if r["variant"] == v]) for v in args.variants}
    out["ours_source"] = "rerun" if args.rerun_ours else "results.json"
    start, teacher = demo_results["student_start_accuracy"], demo_results["teacher_accuracy"]
    out["ours"] = {}
    for name in OURS:
        runs = (
            [r for r in ours_runs if r["name"] == name]
            if args.rerun_ours
            else [r for r in demo_results["methods"][name]["runs"] if r["seed"] in args.seeds]
        )
        out["ours"][name] = {
            **summarize_method(runs, start=start, teacher=teacher),
            "per_seed": [r["accuracy"] for r in sorted(runs, key=lambda r: r["seed"])],
        }
    out["student_start"] = {
        "accuracy": start,
        "kl": demo_results["student_start_kl"],
        "noncanonical": demo_results.get("student_start_noncanonical"),
    }
    out["teacher_accuracy"] = teacher
    log("[gold] throughput: GOLD, ctopd simct, ctopd dpca, each in a fresh process")
    lrs = {
        "gold": chosen["recommended"] if "recommended" in chosen else grid[0],
        **{name: settings.lr(name) for name in OURS},
    }
    out["throughput"] = measure_throughput(args, settings, lrs, log)
    log("[gold] diagnostics: the teacher reading the student's chat template")
    start_worker(args.threads)
    out["teacher_diagnostics"] = teacher_reading_student_template(args.demo_dir, settings)
    shutil.rmtree(work, ignore_errors=True)
    out["seconds"] = time.perf_counter() - started
    return _flat_keys(out)


def _summary(runs: list[dict]) -> dict:
    runs = sorted(runs, key=lambda r: r["seed"])
    accuracies = [r["accuracy"] for r in runs]
    return {
        "accuracy_mean": statistics.fmean(accuracies),
        "accuracy_std": statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
        "per_seed": accuracies,
        "kl": statistics.fmean(r["kl"] for r in runs),
        "noncanonical": statistics.fmean(r["noncanonical"] for r in runs),
        "seconds": statistics.fmean(r["seconds"] for r in runs),
        "lr": runs[0]["lr"],
        "unmatched_share": statistics.fmean(r["unmatched_share"] for r in runs),
        "matched_teacher_ids": runs[0]["matched_teacher_ids"],
        "teacher_vocab": runs[0]["teacher_vocab"],
        "response_length_first": statistics.fmean(r["response_length_first"] for r in runs),
        "response_length_last": statistics.fmean(r["response_length_last"] for r in runs),
        "crashes": sum(r["crash"] is not None for r in runs),
        "runs": runs,
    }


def _flat_keys(out: dict) -> dict:
    """The headline figures as top-level keys (``--json`` readers)."""
    gold = out["gold"].get("recommended") or next(iter(out["gold"].values()))
    tp = out["throughput"]
    flat = {
        "gold_accuracy_mean": gold["accuracy_mean"],
        "gold_accuracy_std": gold["accuracy_std"],
        "gold_kl": gold["kl"],
        "gold_lr": gold["lr"],
        "gold_seconds_per_step": tp["gold"]["seconds_per_step"],
        "gold_tokens_per_second": tp["gold"]["tokens_per_second"],
        "gold_peak_mib": tp["gold"]["peak_mib"],
    }
    for name in OURS:
        flat.update(
            {
                f"{name}_accuracy_mean": out["ours"][name]["accuracy_mean"],
                f"{name}_accuracy_std": out["ours"][name]["accuracy_std"],
                f"{name}_kl": out["ours"][name]["kl"],
                f"ctopd_{name}_seconds_per_step": tp[name]["seconds_per_step"],
                f"ctopd_{name}_tokens_per_second": tp[name]["tokens_per_second"],
                f"ctopd_{name}_peak_mib": tp[name]["peak_mib"],
            }
        )
    for variant, summary in out["gold"].items():
        if variant != "recommended":
            flat[f"gold_{variant}_accuracy_mean"] = summary["accuracy_mean"]
    return {**flat, **out}


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# --- the table ---------------------------------------------------------------------------------

LABELS = {
    "recommended": "GOLD, hybrid ULD (TRL's recommended)",
    "bayesian": "GOLD + merge strategy bayesian",
    "teacher_template": "GOLD + teacher's template (patched)",
    "teacher_template_bayesian": "GOLD + teacher's template + bayesian",
    "simct": "ctopd simct",
    "dpca": "ctopd dpca",
}


def print_table(r: dict) -> None:
    print(
        f"GOLD (trl {r['trl_version']}) vs ctopd on {r['demo_dir']}: cross-tokenizer student, "
        f"{r['steps']} steps x {r['batch']} prompts, {r['max_new_tokens']} new tokens, "
        f"seeds {','.join(map(str, r['seeds']))}, test split"
    )
    print(
        f"{'method':<40}{'lr':>7}{'accuracy':>16}{'per seed':>20}{'KL':>7}{'noncanon':>10}"
        f"{'s/run':>7}  sampled length, first -> last steps"
    )
    s = r["student_start"]
    print(f"{'student after warm-up':<40}{'':>7}{s['accuracy']:>16.3f}{'':>20}{s['kl']:>7.3f}")
    rows = [(v, r["gold"][v]) for v in r["gold"]] + [(n, r["ours"][n]) for n in OURS]
    for name, m in rows:
        seeds = " ".join(f"{a:.3f}" for a in m["per_seed"])
        acc = f"{m['accuracy_mean']:.3f} ± {m['accuracy_std']:.3f}"
        nc = "" if m.get("noncanonical") is None else f"{m['noncanonical']:.3f}"
        length = (
            f"  {m['response_length_first']:.1f} -> {m['response_length_last']:.1f}"
            if "response_length_first" in m
            else ""
        )
        if m.get("crashes"):
            length += f" ({m['crashes']} crashed)"
        print(
            f"{LABELS[name]:<40}{m['lr']:>7.0e}{acc:>16}{seeds:>20}{m['kl']:>7.3f}{nc:>10}"
            f"{m['seconds']:>7.0f}{length}"
        )
    print(f"{'teacher':<40}{'':>7}{r['teacher_accuracy']:>16.3f}")
    print(f"(simct / dpca: {r['ours_source']})")
    if r["sweep"]:
        print(
            f"\nvalidation sweep (seed 0, {r['sweep_steps']} steps; sampled length at the "
            "last steps; chosen: *)"
        )
        for row in r["sweep"]:
            mark = "*" if r["chosen_lr"][row["variant"]] == row["lr"] else " "
            crash = f", crashed at step {row['crash']['step']}" if row["crash"] else ""
            print(
                f"  {LABELS[row['variant']]:<40}{row['lr']:>7.0e}{mark} accuracy "
                f"{row['accuracy']:.3f}, KL {row['kl']:.3f}, length "
                f"{row['response_length_last']:.1f}{crash}"
            )
    tp = r["throughput"]
    print(f"\nthroughput ({r['throughput_note']})")
    print(
        f"{'tool':<14}{'s/step':>8}{'tokens/s':>10}{'rollout s':>11}{'loss side s':>13}"
        f"{'backward s':>12}{'peak MiB':>10}{'process MiB':>13}"
    )
    for name in ("gold", *OURS):
        t = tp[name]
        print(
            f"{('GOLD' if name == 'gold' else 'ctopd ' + name):<14}{t['seconds_per_step']:>8.3f}"
            f"{t['tokens_per_second']:>10.0f}{t['rollout']:>11.3f}{t['loss_side']:>13.3f}"
            f"{t['backward']:>12.3f}{t['peak_mib']:>10.0f}{t['peak_rss_mib']:>13.0f}"
        )
    g, d = r["gold"].get("recommended") or next(iter(r["gold"].values())), r["teacher_diagnostics"]
    weight = g["matched_teacher_ids"] / g["teacher_vocab"]
    print(
        f"\nGOLD's hybrid split: {g['matched_teacher_ids']} of {g['teacher_vocab']} teacher ids "
        f"match a student token string (adaptive weights {weight:.3f} matched / "
        f"{1 - weight:.3f} unmatched); {g['unmatched_share']:.1%} of the student's sampled "
        "tokens (mean over the runs) are unmatched (only in the sorted-L1 part)"
    )
    print(
        f"GOLD's teacher reads the student's chat template: teacher test accuracy "
        f"{d['accuracy_own_template']:.3f} with its own, {d['accuracy_student_template']:.3f} "
        f"with the student's; mean log-prob per reference-answer token "
        f"{d['answer_logprob_own_template']:.3f} vs {d['answer_logprob_student_template']:.3f}"
    )
    print(f"whole run: {r['seconds']:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", default="ctopd-demo", type=Path)
    parser.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument(
        "--steps",
        type=int,
        default=0,
        help="optimizer steps per test run (default: the demo's, 100)",
    )
    parser.add_argument(
        "--sweep-steps", type=int, default=0, help="steps per sweep run (default: the demo's, 50)"
    )
    parser.add_argument(
        "--lrs",
        type=lambda s: tuple(float(x) for x in s.split(",")),
        help="GOLD's learning-rate grid (default: simct's sweep grid); one rate skips the sweep",
    )
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        type=lambda s: tuple(s.split(",")),
        help=f"GOLD configurations, recommended first ({', '.join(VARIANTS)})",
    )
    parser.add_argument(
        "--rerun-ours",
        action="store_true",
        help="rerun simct and dpca here instead of reading results.json",
    )
    parser.add_argument(
        "--throughput-steps",
        type=int,
        default=6,
        help="steps per throughput measurement (the first is not counted)",
    )
    parser.add_argument("--throughput-rounds", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in every process (the demo's: 1)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="training runs side by side (default: CPU cores, at most 2)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--output", type=Path, help="also write the JSON object to this file")
    args = parser.parse_args()
    if not set(args.variants) <= set(VARIANTS) or "recommended" not in args.variants:
        parser.error(f"--variants: recommended plus any of {', '.join(VARIANTS)}")
    if args.throughput_steps < 2:
        parser.error("--throughput-steps must be at least 2 (the first is a warm-up)")
    if _version("trl") is None:
        print('error: trl is not installed; pip install -e ".[bench]"', file=sys.stderr)
        return 2
    for name in (
        "teacher",
        "student",
        "train.jsonl",
        "validation.jsonl",
        "test.jsonl",
        "results.json",
    ):
        if not (args.demo_dir / name).exists():
            print(
                f"error: {args.demo_dir / name} is missing; run `python research/testbed.py --fixed-warmup "
                f"--output-dir {args.demo_dir}` first",
                file=sys.stderr,
            )
            return 2
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    result = run_all(args, log)
    result["throughput_note"] = (
        f"{args.throughput_steps - 1} steps after a warm-up step, {result['batch']} prompts x "
        f"{result['max_new_tokens']} new tokens, {args.threads} torch thread(s), each tool in a "
        f"fresh process, best of {args.throughput_rounds} rounds; peak MiB: rise over the "
        "process after imports"
    )
    if args.output:
        args.output.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print()
        print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
