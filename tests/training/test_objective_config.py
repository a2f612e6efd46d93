"""The ``objective:`` section: ``name`` plus the options of that objective's signature, converted
by the signature's types, checked by the objectives' own rules; the resolved section in
``config.yaml`` and in ``--resume``'s comparison; options ``ctopd train`` cannot honour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ctopd.objectives.registry import objective_options
from ctopd.training.checkpoint import STATE_FILE
from ctopd.training.config import (
    ConfigError,
    ObjectiveConfig,
    TrainConfig,
    build_parser,
    load_config,
)
from ctopd.training.run_folder import changed_settings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_options_from_yaml_and_flags_are_converted_by_the_signature(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("objective:\n  name: simct\n  temperature: '2'\n  slice_size: 1e3\n")
    config = load_config(
        ["--config", str(path), "--objective.weight_by_tokens", "true", "--objective.beta", "0.25"]
    )
    assert config.objective.options == {
        "temperature": 2.0,
        "slice_size": 1000,
        "weight_by_tokens": True,
        "beta": 0.25,
    }
    # The rest keep simct's defaults, read from its signature.
    resolved = config.objective.arguments()
    assert set(resolved) == set(objective_options("simct"))
    assert resolved["divergence"] == "reverse_kl" and resolved["space"] == "text"
    assert type(resolved["temperature"]) is float and type(resolved["slice_size"]) is int
    bare = load_config(["--objective.weight-by-tokens"])  # a bare bool flag means true
    assert bare.objective.options == {"weight_by_tokens": True}


def test_each_objective_gets_exactly_its_own_options():
    for name in ("simct", "dpca", "shared_only", "uld", "opd", "sft"):
        resolved = ObjectiveConfig(name).arguments()
        expected = set(objective_options(name)) - (
            {"clip_low", "clip_high"} if name == "dpca" else set()
        )
        assert set(resolved) == expected, name
    # ULD leaves top_k to the teacher's count; the teacher side then keeps its default 256.
    uld = ObjectiveConfig("uld")
    assert uld.arguments()["top_k"] is None and uld.top_k == 256 and uld.slice_size == 256
    assert ObjectiveConfig("uld", top_k=64).top_k == 64
    assert ObjectiveConfig("dpca", slice_size=32).slice_size == 32
    assert ObjectiveConfig("sft").top_k == 256  # no top_k option: the teacher's default


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--objective", "dpca", "--objective.temperature", "2"],
            "objective 'dpca' takes no option temperature; its options: advantage_clip, "
            "epsilon, slice_size",
        ),
        (["--objective.slice-size", "2.5"], "objective.slice_size must be int; got '2.5'"),
        (["--objective.weight_by_tokens", "maybe"], "objective.weight_by_tokens must be bool"),
        (["--objective.temperature", "0"], "objective.temperature must be > 0; got 0.0"),
        (["--objective.space", "words"], "objective.space must be one of text, paper"),
        (["--objective.cells", "some"], "objective.cells must be one of none, boundary, all"),
        (["--objective", "uld", "--objective.top-k", "0"], "objective.top_k must be None or"),
        (
            ["--objective", "dpca", "--objective.advantage_clip", "-1"],
            "objective.advantage_clip must be > 0",
        ),
    ],
)
def test_bad_options_name_the_option_and_what_is_valid(argv, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        load_config(argv)


def test_unknown_yaml_options_are_all_named_at_once(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("objective: {name: opd, space: text, cells: none, divergence: jsd}\n")
    with pytest.raises(
        ConfigError,
        match="^objective 'opd' takes no option cells, space; its options: divergence, beta, "
        "temperature, slice_size$",
    ):
        load_config(["--config", str(path)])


@pytest.mark.parametrize("option", ["clip_low", "clip_high"])
def test_dpca_ratio_clips_cannot_be_set_under_train_and_the_error_says_why(option):
    flag = f"--objective.{option.replace('_', '-')}"
    with pytest.raises(ConfigError, match=f"^objective.{option} cannot be set: .*ratio is 1"):
        load_config(["--objective", "dpca", flag, "0.1"])
    with pytest.raises(ConfigError, match="never acts"):
        TrainConfig.from_dict({"objective": {"name": "dpca", option: 0.1}})
    # Not passed by the loop, not written to config.yaml, not in the help.
    assert option not in ObjectiveConfig("dpca").to_dict()
    assert f"--objective.{option.replace('_', '-')}" not in build_parser().format_help()


def test_help_lists_every_option_with_its_objectives_and_default():
    text = " ".join(build_parser().format_help().split())
    for option in ("divergence", "beta", "temperature", "slice-size", "space", "cells", "top-k"):
        assert f"--objective.{option}" in text, option
    assert (
        "--objective.advantage_clip VALUE C in the advantage clamp. [dpca] (default: 10.0)" in text
    )
    assert "[simct, shared_only, opd] (default: reverse_kl)" in text
    assert "(default k_T; capped at V_S). [uld] (default: None)" in text  # uld's own default
    assert "cells at a chunk's first position (cell_eligible)" in text  # roles made plain


def test_options_read_as_attributes():
    config = load_config(["--objective.temperature", "2"])
    assert config.objective.temperature == 2.0 and config.objective.cells == "none"
    with pytest.raises(AttributeError, match="objective 'dpca' takes no option 'temperature'"):
        _ = ObjectiveConfig("dpca").temperature
    import copy

    assert copy.deepcopy(config.objective) == config.objective


def test_the_yaml_shorthand_and_dataclass_replace_keep_working(tmp_path):
    import dataclasses

    path = tmp_path / "run.yaml"
    path.write_text("objective: uld\n")
    assert load_config(["--config", str(path)]).objective == ObjectiveConfig("uld")
    dpca = ObjectiveConfig("dpca", advantage_clip=5.0)
    assert dataclasses.replace(dpca, epsilon=0.1).options == {"advantage_clip": 5.0, "epsilon": 0.1}
    assert dataclasses.replace(ObjectiveConfig(), name="uld").to_dict()["name"] == "uld"
    with pytest.raises(ConfigError, match="takes no option"):
        dataclasses.replace(dpca, name="uld")


@pytest.mark.parametrize("example", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load_unchanged(example):
    values = yaml.safe_load(example.read_text(encoding="utf-8"))
    config = TrainConfig.from_dict(values)
    given = {k: v for k, v in values["objective"].items() if k != "name"}
    assert config.objective.name == values["objective"]["name"]
    assert {k: config.objective.arguments()[k] for k in given} == given


def test_resolved_config_yaml_round_trips(tmp_path):
    config = load_config(["--objective", "dpca", "--objective.advantage-clip", "4"])
    config.to_yaml(tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    # Flat, like the section a user writes: name and every option of dpca, defaults included.
    assert saved["objective"] == {
        "name": "dpca",
        "advantage_clip": 4.0,
        "epsilon": 1e-6,
        "slice_size": 256,
    }
    again = load_config(["--config", str(tmp_path / "config.yaml")])
    assert again.objective == config.objective and again.to_dict() == config.to_dict()


def _checkpoint(folder: Path, config: TrainConfig) -> Path:
    """A checkpoint folder as changed_settings reads it: config.yaml beside it, its state."""
    folder.mkdir(parents=True)
    config.to_yaml(folder / "config.yaml")
    checkpoint = folder / "checkpoint-000002"
    checkpoint.mkdir()
    state = {"command": "train", "num_processes": 1}
    (checkpoint / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    return checkpoint


def test_resume_compares_the_resolved_objective(tmp_path):
    checkpoint = _checkpoint(tmp_path / "run", load_config(["--objective.temperature", "1.5"]))

    def changes(*argv):
        return changed_settings(load_config(list(argv)), "train", checkpoint, num_processes=1)

    assert changes("--objective.temperature", "1.5") == []
    # A default written out is the same setting as the default left out, and the reverse.
    assert changes("--objective.temperature", "1.5", "--objective.beta", "0.5") == []
    assert changes() == ["objective.temperature: 1.5 → 1.0"]
    assert changes("--objective.temperature", "1.5", "--objective.divergence", "jsd") == [
        "objective.divergence: reverse_kl → jsd"
    ]
    # slice_size changes only memory; a new objective is named (its options are its own).
    assert changes("--objective.temperature", "1.5", "--objective.slice-size", "8") == []
    assert changes("--objective", "dpca") == ["objective.name: simct → dpca"]


def test_resume_reads_a_config_yaml_of_the_older_shape(tmp_path):
    """An older ctopd wrote every option of every objective; only shared keys are compared."""
    checkpoint = _checkpoint(tmp_path / "run", load_config(["--objective", "dpca"]))
    saved = yaml.safe_load((checkpoint.parent / "config.yaml").read_text())
    saved["objective"].update(divergence="reverse_kl", beta=0.5, clip_low=0.2, clip_high=0.28)
    (checkpoint.parent / "config.yaml").write_text(yaml.safe_dump(saved))
    config = load_config(["--objective", "dpca"])
    assert changed_settings(config, "train", checkpoint, num_processes=1) == []
    config = load_config(["--objective", "dpca", "--objective.epsilon", "0.5"])
    assert changed_settings(config, "train", checkpoint, num_processes=1) == [
        "objective.epsilon: 1e-06 → 0.5"
    ]
