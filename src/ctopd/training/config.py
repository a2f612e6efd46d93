"""Typed run configuration: flat dataclasses, loaded from YAML, every field overridable by a flag.

One parser (TRL style) serves ``ctopd train``, ``ctopd sft`` and :func:`load_config`:

* ``--config run.yaml`` is read first; its sections mirror the dataclasses below
  (``student:``, ``teacher:``, ``teacher_server:``, ``data:``, ``objective:``, ``rollout:``,
  ``optim:``, ``lora:``, ``sft:``) plus top-level fields (``max_steps``, ``output_dir``, ...).
* every field is also a flag: ``--rollout.temperature 0.7``, ``--optim.lr 1e-6``,
  ``--max-steps 20`` (dashes and underscores both work);
* short aliases: ``--student``, ``--teacher``, ``--data``, ``--objective``, ``--chat-template``
  (the student's), ``--teacher-chat-template``, ``--teacher-url`` (a served teacher),
  ``--output-dir``, ``--max-steps``, ``--seed``, ``--resume`` (alone: the latest checkpoint in the
  output dir), ``--overwrite`` (start over in a folder that holds a run), ``--resume-changed``.
* a section given as one plain value is an error that shows the mapping form, except the
  shorthands ``student: org/model``, ``teacher: org/model`` and ``objective: dpca``.

Values are checked when a section is built (``__post_init__``: choices and ranges) and when a run
starts (:meth:`TrainConfig.validate`: required fields, files that must exist). Both raise
:class:`ConfigError` with a message that names the field and how to fix it.

Defaults follow docs/concepts/defaults.md (the SimCT paper's settings): AdamW lr 5e-7, betas (0.9, 0.98),
cosine decay to 1e-8 after a 5% warm-up, sampling temperature 0.6, reverse KL, τ = 1, one sample per
prompt. The student's weights load in float32 (its AdamW updates at lr 5e-7 would vanish in
bfloat16 weights; use ``mixed_precision: bf16`` for bf16 compute), the teacher's in the checkpoint's
dtype. The paper used 64 prompts per step and 4096 new tokens; the defaults here (8 prompts per
device, 512 new tokens) are sized for one GPU and are raised in ``examples/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

OBJECTIVE_NAMES = ("simct", "dpca", "shared_only", "uld", "opd", "sft")


def objective_names() -> tuple[str, ...]:
    """The built-in objectives, then any added with
    :func:`ctopd.objectives.registry.register_objective`."""
    from ctopd.objectives.registry import OBJECTIVES

    return OBJECTIVE_NAMES + tuple(n for n in OBJECTIVES if n not in OBJECTIVE_NAMES)


DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "tv")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MIXED_PRECISION = ("no", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")
REPORTERS = ("none", "tensorboard", "wandb")


class ConfigError(ValueError):
    """A configuration value is missing, malformed or inconsistent."""


def _help(text: str, default: Any = None, **kwargs: Any) -> Any:
    """A dataclass field whose help text is written once, here."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text})
    return field(default=default, metadata={"help": text}, **kwargs)


def _choice(section: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name} must be one of {', '.join(choices)}; got {value!r}")


def _positive(section: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        relation = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{name} must be {relation}; got {value!r}")


@dataclass
class ModelConfig:
    """One model: the student (trained) or the teacher (frozen)."""

    name_or_path: str = _help(
        "local folder or hub id of the model (and its tokenizer), or a .gguf file", ""
    )
    gguf_file: str | None = _help(
        "a GGUF checkpoint inside name_or_path (transformers' GGUF loading, dequantised to "
        "float; needs `pip install 'ctopd[gguf]'`); a name_or_path ending in .gguf sets it",
        None,
    )
    dtype: str = _help("weight dtype: auto, float32, bfloat16 or float16", "auto")
    trust_remote_code: bool = _help("allow model code from the hub (off unless you ask)", False)
    chat_template: str | None = _help(
        "chat template (a .jinja file or the template text) for a tokenizer that has none", None
    )
    revision: str | None = _help("hub revision (branch, tag or commit)", None)
    attn_implementation: str | None = _help("e.g. sdpa, flash_attention_2, eager", None)

    def __post_init__(self) -> None:
        _choice("model", "dtype", self.dtype, DTYPES)
        if self.gguf_file is not None and not str(self.gguf_file).endswith(".gguf"):
            raise ConfigError(f"model.gguf_file must name a .gguf file; got {self.gguf_file!r}")

    def location(self) -> tuple[str, str | None]:
        """``(folder or hub id, GGUF file name or None)``: where ``from_pretrained`` reads the
        model and its tokenizer (a ``name_or_path`` that is a ``.gguf`` file is split)."""
        if self.gguf_file:
            return self.name_or_path, self.gguf_file
        if self.name_or_path.endswith(".gguf"):
            path = Path(self.name_or_path).expanduser()
            return str(path.parent), path.name
        return self.name_or_path, None


@dataclass
class TeacherServerConfig:
    """A served teacher: an OpenAI-compatible completions server (vLLM, ``ctopd serve-teacher``)
    scores instead of a model in this process. The teacher's tokenizer and chat template still
    come from ``teacher.name_or_path``, so the tokenisation and the alignment stay ours; the
    server only reads token ids (``ctopd.training.teachers.served``)."""

    url: str | None = _help(
        "base URL of the server's OpenAI API, e.g. http://host:8000/v1 "
        "(unset: the teacher runs in this process)",
        None,
    )
    model: str | None = _help(
        "served model name sent with each request (unset: the server's default model)", None
    )
    api_key_env: str = _help(
        "environment variable that holds the server's API key (the key "
        "itself is never written to config.yaml)",
        "CTOPD_TEACHER_API_KEY",
    )
    top_k: int = _help(
        "log-probs per position asked for (vLLM prompt_logprobs; -1 = the whole "
        "vocabulary); the mass outside them is spread evenly over the other ids",
        20,
    )
    sequences_per_request: int = _help("sequences sent in one HTTP request", 8)
    max_concurrency: int = _help("HTTP requests in flight at once (per process)", 4)
    timeout_seconds: float = _help("seconds to wait for one reply", 300.0)
    retries: int = _help("retries of a request after a connection error, a timeout or a 5xx", 8)
    backoff_seconds: float = _help(
        "wait before the first retry; doubles with each retry, at most 60 s", 1.0
    )
    overlap: bool = _help("keep the request in flight while the student runs its forward", True)

    def __post_init__(self) -> None:
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ConfigError(
                f"teacher_server.url must start with http:// or https://; got {self.url!r}"
            )
        if self.top_k < -1:
            raise ConfigError(f"teacher_server.top_k must be >= 0 or -1 (all); got {self.top_k!r}")
        _positive("teacher_server", "sequences_per_request", self.sequences_per_request)
        _positive("teacher_server", "max_concurrency", self.max_concurrency)
        _positive("teacher_server", "timeout_seconds", self.timeout_seconds)
        _positive("teacher_server", "retries", self.retries, allow_zero=True)
        _positive("teacher_server", "backoff_seconds", self.backoff_seconds, allow_zero=True)


@dataclass
class DataConfig:
    """Prompts: a JSONL file or a ``datasets`` name. Each row has a ``messages`` list (chat
    messages) or a ``prompt`` string, and optionally a reference ``answer``."""

    path: str | None = _help("JSONL file of prompts", None)
    dataset: str | None = _help("a `datasets` name, used when `path` is not set", None)
    dataset_config: str | None = _help("the `datasets` configuration name (e.g. main)", None)
    split: str = _help("the `datasets` split", "train")
    messages_field: str = _help("field holding a list of chat messages", "messages")
    prompt_field: str = _help("field holding a prompt string (used when no messages)", "prompt")
    answer_field: str = _help("field holding the reference answer (optional)", "answer")
    system_prompt: str | None = _help("system message put before every prompt", None)
    max_prompt_tokens: int = _help("prompts longer than this (either tokenizer) are skipped", 1024)
    limit: int | None = _help("use only the first N prompts", None)
    shuffle: bool = _help("shuffle prompts each epoch (seeded)", True)

    def __post_init__(self) -> None:
        _positive("data", "max_prompt_tokens", self.max_prompt_tokens)
        if self.limit is not None:
            _positive("data", "limit", self.limit)


# Options of a built-in objective that `ctopd train` cannot honour, and why; setting one in the
# config is an error (the library function keeps them for callers that can use them).
_NO_ROLLOUT_LOGPROBS = (
    "DPCA's PPO ratio clip acts on the ratio to rollout-time log-probs, and ctopd train makes "
    "one update per rollout, so the ratio is 1 and the clip never acts; remove it "
    "(ctopd.objectives.dpca keeps it for callers that pass student_old_logprobs)"
)
NOT_UNDER_TRAIN: dict[tuple[str, str], str] = {
    ("dpca", "clip_low"): _NO_ROLLOUT_LOGPROBS,
    ("dpca", "clip_high"): _NO_ROLLOUT_LOGPROBS,
}

# What the teacher side keeps when the objective has no such option of its own (the defaults of
# ctopd.objectives.teacher_outputs).
TEACHER_SLICE_SIZE = 256
TEACHER_TOP_K = 256


@dataclass(init=False, eq=False)
class ObjectiveConfig:
    """The objective (the loss) by name, and its options.

    Passed to ``ctopd.objectives.compute_objective``.

    The ``objective:`` section is ``name`` plus any keyword the objective's signature takes
    (``temperature: 2.0``); an option left out keeps the signature's default. ``name`` is a
    built-in objective, one added with ``register_objective``, or a user's function by import
    path (``my_package.my_module:my_loss``). In Python:
    ``ObjectiveConfig("dpca", advantage_clip=5.0)``.
    """

    name: str = _help(
        "simct, dpca, shared_only, uld, opd (same-tokenizer OPD), or a function of yours as "
        "package.module:function (it declares `teacher_needs`; its options come from its "
        "signature)",
        "simct",
    )
    options: dict[str, Any] = _help("the options given (the rest keep the signature's)", {})

    def __init__(self, name: str = "simct", options: dict | None = None, **more: Any) -> None:
        self.name = name
        self.options = {str(k).replace("-", "_"): v for k, v in {**(options or {}), **more}.items()}
        self.__post_init__()

    def __eq__(self, other: object) -> bool:
        """Equal when they run the same objective with the same resolved options."""
        if not isinstance(other, ObjectiveConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    @classmethod
    def from_mapping(cls, values: dict) -> ObjectiveConfig:
        """From the YAML section: ``name`` plus the options, side by side."""
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        name = coerce(values.pop("name", "simct"), str, "objective.name")
        return cls(name, options=values)

    def __post_init__(self) -> None:
        from ctopd.objectives.registry import (
            is_import_path,
            load_objective,
            objective_options,
            option_types,
        )

        if not isinstance(self.name, str):
            raise ConfigError(f"objective.name must be a name or an import path; got {self.name!r}")
        if is_import_path(self.name):
            try:
                load_objective(self.name)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        else:
            names = objective_names()
            if self.name not in names:
                raise ConfigError(
                    f"objective.name must be one of {', '.join(names)} or an import path "
                    f"package.module:function; got {self.name!r}"
                )
        for option in self.options:
            if (self.name, option) in NOT_UNDER_TRAIN:
                raise ConfigError(
                    f"objective.{option} cannot be set: {NOT_UNDER_TRAIN[self.name, option]}"
                )
        valid = self._valid_options(objective_options(self.name))
        unknown = sorted(set(self.options) - set(valid))
        if unknown:
            raise ConfigError(
                f"objective {self.name!r} takes no option {', '.join(unknown)}; its options: "
                f"{', '.join(valid) or 'none'}"
            )
        missing = sorted(
            o for o, d in valid.items() if d is inspect.Parameter.empty and o not in self.options
        )
        if missing:
            raise ConfigError(
                f"objective {self.name!r} needs the option(s) {', '.join(missing)} "
                "(its signature gives no default)"
            )
        types_ = option_types(self.name)
        for option, value in self.options.items():
            if types_[option] is not None:
                self.options[option] = coerce(value, types_[option], f"objective.{option}")
        self._check_values()

    def _valid_options(self, signature_options: dict[str, Any]) -> dict[str, Any]:
        return {o: d for o, d in signature_options.items() if (self.name, o) not in NOT_UNDER_TRAIN}

    def _check_values(self) -> None:
        """The built-in objectives' option rules (``ctopd.objectives.checks.OPTION_RULES``),
        checked here so a bad value fails before any model loads. A user's objective checks
        its own."""
        from ctopd.objectives.checks import invalid_option

        if self.name not in OBJECTIVE_NAMES:
            return
        for option, value in self.options.items():
            expected = invalid_option(option, value)
            if expected is not None:
                raise ConfigError(f"objective.{option} must be {expected}; got {value!r}")

    def arguments(self) -> dict[str, Any]:
        """The options passed to the objective: every keyword it takes, the signature's
        default overridden by ``options``."""
        from ctopd.objectives.registry import objective_options

        return {**self._valid_options(objective_options(self.name)), **self.options}

    def __getattr__(self, option: str) -> Any:
        """``config.objective.temperature``: an option's resolved value (the signature's default
        when the section leaves it out).

        Raises:
            AttributeError: the objective takes no such option.
        """
        if option.startswith("_") or "name" not in self.__dict__:  # copy, pickle: not options
            raise AttributeError(option)
        arguments = self.arguments()
        if option not in arguments:
            raise AttributeError(f"objective {self.name!r} takes no option {option!r}")
        return arguments[option]

    def to_dict(self) -> dict[str, Any]:
        """The resolved section, as ``config.yaml`` holds it: ``name`` and every option."""
        return {"name": self.name, **self.arguments()}

    @property
    def slice_size(self) -> int:
        """Teacher positions reduced at once (memory): the objective's ``slice_size`` option,
        or :data:`TEACHER_SLICE_SIZE` when it has none."""
        value = self.arguments().get("slice_size")
        return TEACHER_SLICE_SIZE if value is None else value

    @property
    def top_k(self) -> int:
        """Largest teacher probabilities kept for ``topk_probs`` (ULD): the objective's
        ``top_k`` option, or :data:`TEACHER_TOP_K` when it has none or leaves it ``None``."""
        value = self.arguments().get("top_k")
        return TEACHER_TOP_K if value is None else value


@dataclass
class RolloutConfig:
    """Student sampling (and teacher sampling for ``ctopd sft --sft.source teacher``)."""

    samples_per_prompt: int = _help("responses sampled per prompt", 1)
    temperature: float = _help("sampling temperature (0 = greedy)", 0.6)
    top_p: float = _help("nucleus sampling threshold (1 = off)", 1.0)
    top_k: int = _help("sample among the k most likely tokens (0 = off)", 0)
    max_new_tokens: int = _help("longest response; longer ones are cut (no end token)", 512)
    engine: str = _help(
        "what generates rollouts: hf (transformers generate on the live weights) or hf_static "
        "(the same with a static KV cache; docs/rollout.md)",
        "hf",
    )

    def __post_init__(self) -> None:
        _choice("rollout", "engine", self.engine, ("hf", "hf_static"))  # training.rollout_engine
        _positive("rollout", "samples_per_prompt", self.samples_per_prompt)
        _positive("rollout", "temperature", self.temperature, allow_zero=True)
        _positive("rollout", "top_k", self.top_k, allow_zero=True)
        _positive("rollout", "max_new_tokens", self.max_new_tokens)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.top_p must be in (0, 1]; got {self.top_p!r}")


@dataclass
class OptimConfig:
    """AdamW and its schedule (defaults: docs/concepts/defaults.md)."""

    lr: float = _help("peak learning rate", 5e-7)
    beta1: float = _help("AdamW beta1", 0.9)
    beta2: float = _help("AdamW beta2", 0.98)
    eps: float = _help("AdamW epsilon", 1e-8)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    schedule: str = _help("cosine, linear or constant (after warm-up)", "cosine")
    warmup_ratio: float = _help("share of steps with linear warm-up", 0.05)
    min_lr: float = _help("learning rate at the end of the decay", 1e-8)
    max_grad_norm: float = _help("gradient clipping norm (0 = off)", 1.0)

    def __post_init__(self) -> None:
        _positive("optim", "lr", self.lr)
        _positive("optim", "min_lr", self.min_lr, allow_zero=True)
        _positive("optim", "max_grad_norm", self.max_grad_norm, allow_zero=True)
        _choice("optim", "schedule", self.schedule, SCHEDULES)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1); got {self.warmup_ratio!r}")
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr ({self.min_lr}) is above optim.lr ({self.lr})")


@dataclass
class LoraConfig:
    """LoRA adapters on the student through ``peft`` (merged into the saved final model)."""

    enabled: bool = _help("train LoRA adapters instead of all weights", False)
    r: int = _help("adapter rank", 16)
    alpha: int = _help("adapter scaling alpha", 32)
    dropout: float = _help("adapter dropout", 0.0)
    target_modules: str = _help("comma-separated module names, or all-linear", "all-linear")

    def __post_init__(self) -> None:
        _positive("lora", "r", self.r)


@dataclass
class SftConfig:
    """The SFT baseline (``ctopd sft``)."""

    source: str = _help(
        "data: responses from the data file; teacher: sampled by the teacher", "data"
    )
    response_field: str = _help(
        "field with the response text when source=data (falls back to `response`, then `answer`)",
        "response",
    )

    def __post_init__(self) -> None:
        _choice("sft", "source", self.source, ("data", "teacher"))


@dataclass
class TrainConfig:
    """A whole run. Sections are flat dataclasses; the rest are top-level fields."""

    # The student keeps float32 master weights by default: AdamW steps of lr 5e-7 vanish in
    # bfloat16 weights. Compute can still run in bf16 (mixed_precision).
    student: ModelConfig = field(default_factory=lambda: ModelConfig(dtype="float32"))
    teacher: ModelConfig = field(default_factory=ModelConfig)
    teacher_server: TeacherServerConfig = field(default_factory=TeacherServerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sft: SftConfig = field(default_factory=SftConfig)

    output_dir: str = _help("where metrics.jsonl, checkpoints and final/ go", "runs/ctopd")
    seed: int = _help("seed of sampling, data order and initialisation", 0)
    max_steps: int | None = _help("optimiser steps (default: from epochs)", None)
    epochs: float = _help("passes over the prompts when max_steps is not set", 1.0)
    per_device_batch_size: int = _help("prompts per process per micro-step", 8)
    gradient_accumulation_steps: int = _help("micro-steps per optimiser step", 1)
    mixed_precision: str = _help("no, bf16 or fp16 (autocast through accelerate)", "no")
    gradient_checkpointing: bool = _help("recompute activations in backward (saves memory)", False)
    save_every: int = _help("checkpoint every N steps (0 = only at the end)", 0)
    keep_checkpoints: int = _help("checkpoints kept (older ones are deleted)", 2)
    resume: str | None = _help(
        "`latest` (or a checkpoint folder) to continue a run; refused "
        "when there is no checkpoint or when settings that change what "
        "the run computes differ from its config.yaml",
        None,
    )
    resume_changed: bool = _help(
        "with resume: continue although settings that change what the "
        "run computes differ from the saved config.yaml (they are "
        "listed; the new ones apply from the next step)",
        False,
    )
    overwrite: bool = _help(
        "start a new run in an output_dir that holds one: its config.yaml, "
        "metrics.jsonl, summary.json, checkpoints and final/ are removed "
        "first (each is listed)",
        False,
    )
    eval_data: str | None = _help("JSONL test set evaluated during training", None)
    eval_every: int = _help("evaluate every N steps (0 = only at the end when eval_data)", 0)
    eval_max_new_tokens: int = _help("longest evaluation response", 256)
    eval_limit: int | None = _help("evaluate on the first N examples only", None)
    log_every: int = _help(
        "print a line to the console every N steps (metrics.jsonl: every step)", 10
    )
    report_to: str = _help("none, tensorboard, wandb, or a comma-separated list", "none")
    run_name: str | None = _help("name shown in TensorBoard / W&B", None)
    progress: bool = _help("show a progress bar", True)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _build_section(cls, value, name))
        _positive("train", "epochs", self.epochs)
        _positive("train", "per_device_batch_size", self.per_device_batch_size)
        _positive("train", "gradient_accumulation_steps", self.gradient_accumulation_steps)
        _positive("train", "save_every", self.save_every, allow_zero=True)
        _positive("train", "eval_every", self.eval_every, allow_zero=True)
        _positive("train", "keep_checkpoints", self.keep_checkpoints)
        _positive("train", "log_every", self.log_every)
        if self.max_steps is not None:
            _positive("train", "max_steps", self.max_steps)
        _choice("train", "mixed_precision", self.mixed_precision, MIXED_PRECISION)
        for reporter in self.reporters:
            _choice("train", "report_to", reporter, REPORTERS)

    @property
    def reporters(self) -> list[str]:
        """The trackers asked for (``report_to`` split on commas, ``none`` dropped)."""
        names = [r.strip() for r in self.report_to.split(",") if r.strip()]
        return [r for r in names if r != "none"] if names else []

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a YAML config (sections as nested mappings)."""
        return cls.from_dict(_read_yaml(path))

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build from a nested mapping; unknown keys are errors with a suggestion."""
        return _build_section(cls, values, "")

    def to_dict(self) -> dict:
        """Every field, sections as mappings; ``objective`` resolved (``name`` and every option
        of that objective, defaults included)."""
        values = dataclasses.asdict(self)
        values["objective"] = self.objective.to_dict()
        return values

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Write the resolved config (every field, defaults included)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")

    def validate(self, mode: str = "train") -> None:
        """Checks that need the whole config and the file system; run before any model loads.

        Args:
            mode: ``train`` (on-policy distillation) or ``sft`` (the baseline).

        Raises:
            ConfigError: with the field to set and how.
        """
        if not self.student.name_or_path:
            raise ConfigError(
                "no student model: pass --student PATH_OR_HUB_ID "
                "(or student.name_or_path in the YAML)"
            )
        _check_model_location("student", self.student)
        needs_teacher = mode == "train" or self.sft.source == "teacher"
        if mode == "train" and self.objective.name == "sft":
            raise ConfigError("objective sft is the SFT baseline; run `ctopd sft` instead")
        if needs_teacher:
            if not self.teacher.name_or_path:
                raise ConfigError(
                    "no teacher model: pass --teacher PATH_OR_HUB_ID "
                    "(or teacher.name_or_path in the YAML)"
                )
            _check_model_location("teacher", self.teacher)
        if mode == "sft" and self.sft.source == "teacher" and self.teacher_server.url:
            raise ConfigError(
                "teacher_server.url serves scores only; `ctopd sft --sft.source "
                "teacher` samples from the teacher, which needs it in process"
            )
        if not self.data.path and not self.data.dataset:
            raise ConfigError("no prompts: pass --data FILE.jsonl (or data.dataset NAME)")
        if self.data.path and not Path(self.data.path).is_file():
            raise ConfigError(f"data file {self.data.path!r} does not exist")
        if self.eval_data and not Path(self.eval_data).is_file():
            raise ConfigError(f"eval_data file {self.eval_data!r} does not exist")
        for side in ("student", "teacher"):
            template = getattr(self, side).chat_template
            if (
                template
                and template.endswith((".jinja", ".j2", ".txt"))
                and not Path(template).is_file()
            ):
                raise ConfigError(f"{side}.chat_template file {template!r} does not exist")
        if self.resume and self.overwrite:
            raise ConfigError(
                "--resume continues the run in output_dir and --overwrite removes "
                "it; give one of them"
            )
        if self.resume_changed and not self.resume:
            raise ConfigError("--resume-changed only applies together with --resume")
        if self.eval_data:
            _check_eval_answers(self)
        if self.lora.enabled and self.mixed_precision == "fp16":
            raise ConfigError("LoRA with fp16 mixed precision is not supported; use bf16 or no")


def _check_eval_answers(config: TrainConfig) -> None:
    """eval_data must hold reference answers, or its accuracy would read 0 for a good model."""
    from ctopd.training.data import read_rows

    rows = read_rows(config.eval_data)
    field = config.data.answer_field
    if not any(row.get(field) is not None for row in rows):
        raise ConfigError(
            f"eval_data {config.eval_data!r} has no `{field}` field in any row, so "
            "its accuracy cannot be scored; add the reference answers or set "
            "data.answer_field to the field that holds them"
        )


_SECTIONS: dict[str, type] = {
    "student": ModelConfig,
    "teacher": ModelConfig,
    "teacher_server": TeacherServerConfig,
    "data": DataConfig,
    "objective": ObjectiveConfig,
    "rollout": RolloutConfig,
    "optim": OptimConfig,
    "lora": LoraConfig,
    "sft": SftConfig,
}

# Section defaults that differ from the dataclass's own (see TrainConfig.student).
_SECTION_DEFAULTS: dict[str, dict] = {"student": {"dtype": "float32"}}

# Short flags for the fields users set most.
ALIASES: dict[str, str] = {
    "--student": "student.name_or_path",
    "--teacher": "teacher.name_or_path",
    "--data": "data.path",
    "--objective": "objective.name",
    "--chat-template": "student.chat_template",
    "--student-chat-template": "student.chat_template",
    "--teacher-chat-template": "teacher.chat_template",
    "--teacher-url": "teacher_server.url",
}


# Sections that may be given as one plain value in YAML: `student: org/model` and
# `teacher: org/model` name the model, `objective: dpca` names the objective (its options keep
# their defaults). Every other plain value is an error that shows the mapping form.
SHORTHANDS: dict[str, str] = {
    "student": "name_or_path",
    "teacher": "name_or_path",
    "objective": "name",
}
_EXAMPLE_FIELDS: dict[str, str] = {
    "student": "name_or_path",
    "teacher": "name_or_path",
    "teacher_server": "url",
    "data": "path",
    "objective": "name",
    "rollout": "temperature",
    "optim": "lr",
    "lora": "enabled",
    "sft": "source",
}


def section_mapping(name: str, value: Any) -> dict:
    """A YAML section as a mapping: ``None`` is empty, the shorthands above are expanded.

    Raises:
        ConfigError: a plain value (a string, a number, a list) where a mapping is expected,
            e.g. ``data: train.jsonl``; the message shows the mapping form.
    """
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if name in SHORTHANDS and isinstance(value, str):
        return {SHORTHANDS[name]: value}
    example = value if isinstance(value, str) and name == "data" else "..."
    raise ConfigError(
        f"{name} must be a mapping, e.g. `{name}: {{{_EXAMPLE_FIELDS[name]}: "
        f"{example}}}`; got {value!r}"
    )


def _check_model_location(side: str, model: ModelConfig) -> None:
    """A path that looks local must exist; anything else is taken for a hub id. A GGUF
    checkpoint must be a local file."""
    name, gguf_file = model.location()
    if gguf_file is not None:
        path = Path(name).expanduser() / gguf_file
        if not path.is_file():
            raise ConfigError(f"{side} GGUF checkpoint {str(path)!r} does not exist")
        return
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name[:1]
    if Path(name).expanduser().exists():
        if not Path(name).expanduser().is_dir():
            raise ConfigError(f"{side} model {name!r} is a file; pass its folder")
        return
    if looks_local:
        raise ConfigError(f"{side} model folder {name!r} does not exist")
    # A bare name (no slash) that is no folder here: transformers would spend a minute on hub
    # retries offline before failing. Hub ids have the form org/name; the few legacy ones
    # without an org (gpt2) are accepted when they are already in the local hub cache.
    if "/" not in name and not _in_hub_cache(name):
        raise ConfigError(
            f"{side} model {name!r} is neither a local folder nor a hub id of the "
            f"form org/name; pass the folder's path (e.g. ./{name}) or the full "
            "hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct)"
        )


def _in_hub_cache(name: str) -> bool:
    """Whether the Hugging Face cache holds a model repository called ``name``."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    return (Path(HF_HUB_CACHE) / f"models--{name}").is_dir()


def _read_yaml(path: str | os.PathLike) -> dict:
    if not Path(path).is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of fields")
    return values


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
    return ConfigError(f"unknown config field '{where}{key}'{hint}")


def _build_section(cls: type, values: dict, prefix: str) -> Any:
    """Construct ``cls`` from a mapping, coercing values to the declared field types."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix!r} must be a mapping; got {values!r}")
    if cls is ObjectiveConfig:  # name plus the options of that objective's signature
        return ObjectiveConfig.from_mapping(values)
    types_ = _field_types(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    where = f"{prefix}." if prefix else ""
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in types_:
            raise _unknown(name, known, where)
        if not prefix and name in _SECTIONS:
            value = {**_SECTION_DEFAULTS.get(name, {}), **section_mapping(name, value)}
            kwargs[name] = _build_section(_SECTIONS[name], value, name)
        else:
            kwargs[name] = coerce(value, types_[name], f"{where}{name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as err:  # pragma: no cover - defensive
        raise ConfigError(f"bad config section {prefix or 'top-level'}: {err}") from err


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML or command-line value to a field's type (``int``, ``float``, ``bool``,
    ``str`` or ``X | None``). YAML reads ``5e-7`` as a string; that is a float here."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional, annotation = True, args[0]
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name} cannot be empty")
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return (
                int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
            )
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if annotation is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        kind = getattr(annotation, "__name__", str(annotation))
        raise ConfigError(f"{name} must be {kind}; got {value!r}") from None
    return value


# ---------------------------------------------------------------------------------------------
# The command-line parser


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per field (plus the short aliases) to ``parser``.

    Flags default to ``argparse.SUPPRESS`` so only the ones given override the YAML. Options
    of a user's objective are not listed: parse with ``parse_known_args`` and pass the rest
    through :func:`objective_flags` (as ``args.objective_flags``).
    """
    parser.add_argument("--config", default=None, help="YAML file with the run's fields")
    alias_of = {dest: [a for a, d in ALIASES.items() if d == dest] for dest in ALIASES.values()}
    top_types = _field_types(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SECTIONS:
            group = parser.add_argument_group(
                f"{f.name} ({_SECTIONS[f.name].__doc__.split('.')[0]})"
            )
            if f.name == "objective":
                _add_objective_flags(group, alias_of)
                continue
            section_types = _field_types(_SECTIONS[f.name])
            for sub in dataclasses.fields(_SECTIONS[f.name]):
                dest = f"{f.name}.{sub.name}"
                _add_flag(group, dest, section_types[sub.name], sub, alias_of.get(dest, []))
        else:
            _add_flag(parser, f.name, top_types[f.name], f, [])


def _add_objective_flags(group, alias_of: dict[str, list[str]]) -> None:
    """``--objective.name`` and one flag per option of the built-in objectives (and of any
    registered by name), its help read from the objectives' docstrings. Values stay text here:
    they are converted once the objective is known (:class:`ObjectiveConfig`)."""
    from ctopd.objectives.registry import (
        OBJECTIVES,
        is_import_path,
        objective_options,
        option_docs,
    )

    name = next(f for f in dataclasses.fields(ObjectiveConfig) if f.name == "name")
    _add_flag(group, "objective.name", str, name, alias_of.get("objective.name", []))
    takers: dict[str, list[str]] = {}
    defaults: dict[str, dict[str, Any]] = {}
    docs: dict[str, str] = {}
    for objective in OBJECTIVES:
        if is_import_path(objective):  # loaded by an earlier config: not part of the CLI
            continue
        signature = objective_options(objective)
        for option, text in option_docs(objective).items():
            docs.setdefault(option, text)
        for option, default in signature.items():
            if (objective, option) not in NOT_UNDER_TRAIN:
                takers.setdefault(option, []).append(objective)
                defaults.setdefault(option, {})[objective] = default
    # Accepted but not listed, so that setting one reaches ObjectiveConfig's error saying why.
    for _, option in NOT_UNDER_TRAIN:
        if option not in takers and f"--objective.{option}" not in group._option_string_actions:
            group.add_argument(
                f"--objective.{option}",
                f"--objective.{option.replace('_', '-')}",
                dest=f"objective.{option}",
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
    for option, objectives in takers.items():
        values = set(map(repr, defaults[option].values()))
        default = (
            next(iter(defaults[option].values()))
            if len(values) == 1
            else ", ".join(f"{v} ({o})" for o, v in defaults[option].items())
        )
        help_text = f"{docs.get(option, '')} [{', '.join(objectives)}]"
        is_bool = any(isinstance(d, bool) for d in defaults[option].values())
        _add_flag(
            group,
            f"objective.{option}",
            bool if is_bool else Any,
            None,
            [],
            help_text=help_text,
            default=default,
        )


def _add_flag(
    parser,
    dest: str,
    annotation: Any,
    f: dataclasses.Field | None,
    aliases: list[str],
    *,
    help_text: str = "",
    default: Any = None,
):
    flags = [f"--{dest.replace('_', '-')}"]
    if "_" in dest:
        flags.append(f"--{dest}")
    flags = aliases + flags
    if f is not None:
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
    help_text = f"{help_text} (default: {default})".replace("%", "%%")
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
    base = annotation
    if isinstance(base, types.UnionType):
        base = [a for a in typing.get_args(base) if a is not type(None)][0]
    if base is bool:
        kwargs.update(nargs="?", const="true", metavar="BOOL")
    elif dest == "resume":
        kwargs.update(nargs="?", const="latest", metavar="CHECKPOINT")
    elif base is Any:
        kwargs["metavar"] = "VALUE"
    else:
        kwargs["metavar"] = getattr(base, "__name__", "VALUE").upper()
    parser.add_argument(*flags, **kwargs)


def objective_flags(extra: list[str]) -> dict[str, str]:
    """Options of a user's objective from flags the parser does not list: ``--objective.NAME
    VALUE`` or ``--objective.NAME=VALUE`` (converted once the objective is known).

    Raises:
        ConfigError: anything else, e.g. a misspelt flag.
    """
    options, rest = {}, list(extra)
    while rest:
        flag = rest.pop(0)
        key, has_value, value = flag.partition("=")
        if not key.startswith("--objective.") or (not has_value and not rest):
            raise ConfigError(f"unrecognized arguments: {' '.join(extra)}")
        if not has_value:
            value = rest.pop(0)
        options[key.removeprefix("--objective.").replace("-", "_")] = value
    return options


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge ``args.config`` (YAML) with the flags given, then build and check the config."""
    values = _read_yaml(args.config) if getattr(args, "config", None) else {}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    for section in _SECTIONS:
        if section in values:
            values[section] = dict(section_mapping(section, values[section]))
    section_fields = {
        name: {f.name for f in dataclasses.fields(cls)} for name, cls in _SECTIONS.items()
    }
    for name, value in getattr(args, "objective_flags", {}).items():
        values.setdefault("objective", {})[name] = value
    for dest, value in vars(args).items():
        if dest.startswith("objective."):  # name and options; checked against the signature
            values.setdefault("objective", {})[dest.split(".", 1)[1]] = value
        elif "." in dest:
            section, name = dest.split(".", 1)
            if name in section_fields.get(section, ()):
                values.setdefault(section, {})[name] = value
        elif dest in {f.name for f in dataclasses.fields(TrainConfig)} and dest not in _SECTIONS:
            values[dest] = value
    return TrainConfig.from_dict(values)


def build_parser(prog: str = "ctopd train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False, description="Cross-tokenizer on-policy distillation."
    )
    add_config_arguments(parser)
    return parser


def load_config(argv: list[str]) -> TrainConfig:
    """Parse ``argv`` (``--config run.yaml`` plus field flags) into a :class:`TrainConfig`.

    Example:
        >>> load_config(["--student", "s", "--teacher", "t", "--rollout.temperature", "0.7"])
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.objective_flags = objective_flags(extra)
    return config_from_args(args)
