"""Config: YAML + flags merge, aliases, type coercion, and the promised error messages."""

from __future__ import annotations

import time

import pytest
import yaml

from ctopd.training.config import ConfigError, TrainConfig, load_config


def test_short_aliases_work_without_yaml():
    config = load_config(
        [
            "--student",
            "org/s",
            "--teacher",
            "org/t",
            "--data",
            "p.jsonl",
            "--objective",
            "dpca",
            "--max-steps",
            "20",
            "--output-dir",
            "runs/x",
        ]
    )
    assert config.student.name_or_path == "org/s"
    assert config.teacher.name_or_path == "org/t"
    assert config.data.path == "p.jsonl"
    assert config.objective.name == "dpca"
    assert config.max_steps == 20
    assert config.output_dir == "runs/x"


def test_dotted_flags_dashes_and_underscores():
    config = load_config(
        [
            "--rollout.temperature",
            "0.7",
            "--rollout.max-new-tokens",
            "64",
            "--rollout.samples_per_prompt",
            "2",
            "--optim.lr",
            "1e-6",
            "--gradient-checkpointing",
            "--data.shuffle",
            "false",
            "--chat-template",
            "t.jinja",
            "--resume",
        ]
    )
    assert config.rollout.temperature == 0.7
    assert config.rollout.max_new_tokens == 64
    assert config.rollout.samples_per_prompt == 2
    assert config.optim.lr == 1e-6
    assert config.gradient_checkpointing is True
    assert config.data.shuffle is False
    assert config.student.chat_template == "t.jinja"
    assert config.resume == "latest"


def test_defaults_follow_algorithms_section_8():
    config = TrainConfig()
    assert config.optim.lr == 5e-7
    assert (config.optim.beta1, config.optim.beta2) == (0.9, 0.98)
    assert config.optim.schedule == "cosine" and config.optim.min_lr == 1e-8
    assert config.optim.warmup_ratio == 0.05
    assert config.rollout.temperature == 0.6
    resolved = config.objective.arguments()
    assert resolved["divergence"] == "reverse_kl" and resolved["temperature"] == 1.0
    # float32 master weights for the student, the checkpoint's dtype for the frozen teacher
    assert config.student.dtype == "float32" and config.teacher.dtype == "auto"
    assert load_config(["--student", "s"]).student.dtype == "float32"
    assert load_config(["--student.dtype", "bfloat16"]).student.dtype == "bfloat16"


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "student": "org/s",  # shorthand for student.name_or_path
                "teacher": {"name_or_path": "org/t", "dtype": "bfloat16"},
                "optim": {"lr": "5e-7"},  # YAML reads this as a string
                "rollout": {"temperature": 0.9, "max_new_tokens": 128},
                "max_steps": 10,
            }
        )
    )
    config = load_config(["--config", str(path), "--rollout.temperature", "0.5"])
    assert config.student.name_or_path == "org/s"
    assert config.teacher.dtype == "bfloat16"
    assert config.optim.lr == 5e-7
    assert config.rollout.temperature == 0.5  # the flag wins
    assert config.rollout.max_new_tokens == 128  # the YAML value stays
    assert config.max_steps == 10
    assert TrainConfig.from_yaml(path).rollout.temperature == 0.9


def test_resolved_config_round_trips(tmp_path):
    config = load_config(["--student", "s", "--objective", "uld", "--objective.top_k", "8"])
    config.to_yaml(tmp_path / "config.yaml")
    assert TrainConfig.from_yaml(tmp_path / "config.yaml") == config


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--objective", "simtc"], "objective.name must be one of simct"),
        (["--objective.divergence", "kl"], "objective.divergence must be one of"),
        (["--rollout.temperature", "-1"], "rollout.temperature must be >= 0"),
        (["--rollout.top-p", "1.5"], "rollout.top_p must be in (0, 1]"),
        (["--optim.lr", "fast"], "optim.lr must be float"),
        (["--max-steps", "0"], "max_steps must be > 0"),
        (["--max-steps", "2.5"], "max_steps must be int"),
        (["--mixed-precision", "fp8"], "mixed_precision must be one of no, bf16, fp16"),
        (["--student.dtype", "float8"], "dtype must be one of"),
        (["--objective.beta", "1"], "objective.beta must be strictly between 0 and 1"),
    ],
)
def test_bad_values_name_the_field(argv, message):
    with pytest.raises(
        ConfigError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]"),
    ):
        load_config(argv)


def test_unknown_yaml_field_suggests_the_right_one(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rollout:\n  temprature: 0.7\n")
    with pytest.raises(
        ConfigError, match="unknown config field 'rollout.temprature'; did you mean 'temperature'"
    ):
        load_config(["--config", str(path)])
    path.write_text("max_step: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        TrainConfig.from_yaml(path)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["--config", str(tmp_path / "missing.yaml")])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(["--config", str(tmp_path / "list.yaml")])
    (tmp_path / "broken.yaml").write_text("student: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(["--config", str(tmp_path / "broken.yaml")])


def test_validate_names_what_is_missing(tmp_path, tiny):
    with pytest.raises(ConfigError, match="no student model: pass --student"):
        TrainConfig().validate()
    config = load_config(["--student", str(tiny["student"])])
    with pytest.raises(ConfigError, match="no teacher model: pass --teacher"):
        config.validate()
    config = load_config(["--student", str(tiny["student"]), "--teacher", str(tiny["teacher"])])
    with pytest.raises(ConfigError, match="no prompts: pass --data"):
        config.validate()
    config.data.path = str(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="data file .*nope.jsonl' does not exist"):
        config.validate()
    config.data.path = str(tiny["prompts"])
    config.validate()
    config.teacher.name_or_path = str(tmp_path / "missing" / "teacher")
    with pytest.raises(ConfigError, match="teacher model folder .* does not exist"):
        config.validate()
    config.teacher.name_or_path = "Qwen/Qwen2.5-7B-Instruct"  # a hub id is not checked locally
    config.validate()
    config.objective.name = "sft"
    with pytest.raises(ConfigError, match="run `ctopd sft`"):
        config.validate()
    config = load_config(["--student", str(tiny["student"]), "--data", str(tiny["prompts"])])
    config.validate("sft")  # the SFT baseline from data needs no teacher


def test_example_configs_parse_and_open_with_their_command():
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples"
    configs = sorted(examples.glob("*.yaml"))
    assert configs
    for path in configs:
        first_lines = path.read_text().splitlines()[:4]
        assert any(f"--config examples/{path.name}" in line for line in first_lines), path.name
        config = load_config(["--config", str(path), "--max-steps", "3"])
        assert config.student.name_or_path and config.teacher.name_or_path
        assert config.max_steps == 3


def test_a_gguf_file_as_a_model_location(tmp_path):
    from ctopd.training.config import ModelConfig

    assert ModelConfig(name_or_path="org/model").location() == ("org/model", None)
    assert ModelConfig(name_or_path=str(tmp_path / "m.gguf")).location() == (
        str(tmp_path),
        "m.gguf",
    )
    assert ModelConfig(name_or_path="folder", gguf_file="w.gguf").location() == ("folder", "w.gguf")
    with pytest.raises(ConfigError, match="must name a .gguf file"):
        ModelConfig(name_or_path="folder", gguf_file="weights.bin")
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    config = TrainConfig(
        student=ModelConfig(name_or_path=str(tmp_path / "missing.gguf")),
        teacher=ModelConfig(name_or_path=str(tmp_path)),
    )
    config.data.path = str(data)
    with pytest.raises(
        ConfigError, match="student GGUF checkpoint .*missing.gguf.* does not exist"
    ):
        config.validate("train")
    (tmp_path / "missing.gguf").write_bytes(b"")
    config.validate("train")  # a file that exists passes; transformers reads it at load time


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "data: /path/train.jsonl\n",
            "data must be a mapping, e.g. `data: {path: /path/train.jsonl}`; got '/path/train.jsonl'",
        ),
        ("optim: 3\n", "optim must be a mapping, e.g. `optim: {lr: ...}`; got 3"),
        ("rollout: [0.7]\n", "rollout must be a mapping, e.g. `rollout: {temperature: ...}`"),
        ("student: 7\n", "student must be a mapping, e.g. `student: {name_or_path: ...}`; got 7"),
    ],
)
def test_a_section_given_as_a_plain_value_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    escaped = (
        message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]")
        .replace("{", r"\{")
        .replace("}", r"\}")
    )
    with pytest.raises(ConfigError, match=escaped):
        load_config(["--config", str(path)])
    with pytest.raises(ConfigError, match=escaped):  # flags into that section merge after it
        load_config(["--config", str(path), "--data.limit", "3", "--optim.lr", "1e-6"])
    with pytest.raises(ConfigError, match=escaped):
        TrainConfig.from_yaml(path)


def test_objective_and_models_accept_a_name_as_shorthand(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("student: org/s\nteacher: org/t\nobjective: dpca\n")
    config = load_config(["--config", str(path), "--objective.advantage-clip", "5"])
    assert (config.student.name_or_path, config.teacher.name_or_path) == ("org/s", "org/t")
    assert config.objective.name == "dpca" and config.objective.options == {"advantage_clip": 5.0}


def test_a_bare_model_name_fails_at_once(tmp_path, tiny, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder called mystudent here
    config = load_config(["--student", "mystudent", "--data", str(tiny["prompts"])])
    started = time.perf_counter()
    with pytest.raises(
        ConfigError,
        match="student model 'mystudent' is neither a local folder "
        "nor a hub id of the form org/name; pass the folder's "
        r"path \(e.g. ./mystudent\) or the full hub id",
    ):
        config.validate("sft")
    assert time.perf_counter() - started < 1.0  # no hub retries
    (tmp_path / "mystudent").mkdir()
    config.validate("sft")  # a folder of that name is a local model


def test_resume_flags_that_contradict_each_other(tiny):
    base = ["--student", str(tiny["student"]), "--data", str(tiny["prompts"])]
    with pytest.raises(
        ConfigError,
        match="--resume continues the run in output_dir and "
        "--overwrite removes it; give one of them",
    ):
        load_config([*base, "--resume", "--overwrite"]).validate("sft")
    with pytest.raises(ConfigError, match="--resume-changed only applies together with --resume"):
        load_config([*base, "--resume-changed"]).validate("sft")


def test_eval_data_without_answers_is_refused_before_training(tiny, tmp_path):
    data = tmp_path / "questions.jsonl"
    data.write_text('{"prompt": "What is 2+2?"}\n')
    config = load_config(
        [
            "--student",
            str(tiny["student"]),
            "--data",
            str(tiny["prompts"]),
            "--eval-data",
            str(data),
        ]
    )
    with pytest.raises(
        ConfigError,
        match="questions.jsonl' has no `answer` field in any row, so its accuracy cannot be scored",
    ):
        config.validate("sft")
