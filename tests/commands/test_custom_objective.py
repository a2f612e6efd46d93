"""A user's objective by import path: ``ctopd train --objective package.module:function`` imports
the function (no registration), passes it the options its signature names, and says in one
line what is wrong with a path that does not lead to a usable objective."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ctopd.cli import main
from ctopd.objectives.dpca import dpca
from ctopd.objectives.registry import OBJECTIVES, TEACHER_NEEDS, is_import_path
from ctopd.training.config import ConfigError, load_config
from tests.training.tiny import build_assets, final_weights, tiny_args

CALLS: list[tuple[int, float, int]] = []


def scaled_dpca(
    *,
    student_logits,
    student_ids,
    alignments,
    shared_vocab,
    teacher,
    student_old_logprobs=None,
    scale: float = 1.0,
    slice_size: int = 256,
):
    """DPCA times ``scale``: a user's objective with an option of its own."""
    CALLS.append((student_logits.shape[0], scale, slice_size))
    loss, metrics = dpca(
        student_logits=student_logits,
        student_ids=student_ids,
        alignments=alignments,
        shared_vocab=shared_vocab,
        teacher=teacher,
        slice_size=slice_size,
    )
    return scale * loss, {**metrics, "scale": scale}


scaled_dpca.teacher_needs = {"token_logprobs"}


def no_needs(*, student_logits, student_ids, alignments, shared_vocab, teacher, **rest):
    return student_logits.sum(), {}


def unknown_needs(**keywords):
    return None


unknown_needs.teacher_needs = {"logits"}


def too_few_keywords(student_logits):
    return None


too_few_keywords.teacher_needs = set()

PATH = f"{__name__}:scaled_dpca"


@pytest.fixture(autouse=True)
def forget_loaded_objectives():
    """Loading a path registers it in the process-wide registry; other tests list the
    registry, so the paths loaded here are dropped after each test."""
    yield
    for name in [n for n in OBJECTIVES if is_import_path(n)]:
        del OBJECTIVES[name]
        TEACHER_NEEDS.pop(name, None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return build_assets(tmp_path_factory.mktemp("tiny_custom_objective"))


def test_ctopd_train_runs_a_users_objective_named_by_import_path(tiny, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"objective": {"name": PATH, "scale": 0.25}}))
    out = tmp_path / "run"
    CALLS.clear()
    initial = load_file(str(tiny["student"] / "model.safetensors"))
    # Its own option as a flag (not in --help, which lists the built-ins' options), over the YAML.
    flags = ("--objective.scale", "0.5", "--objective.slice-size=8")
    argv = ["train", "--config", str(config), *tiny_args(tiny, out, *flags)]
    assert main(argv) == 0, capsys.readouterr().err
    # Two steps of four responses; the options converted by the signature's types, passed
    # through, nothing else.
    assert CALLS == [(4, 0.5, 8)] * 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["scale"] == 0.5 for r in rows)
    changed = final_weights(out)
    assert any(not torch.equal(initial[k], changed[k]) for k in initial)
    # The run folder's config.yaml names it by its path and holds its resolved options, and
    # reads back into the same objective (what --resume does).
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["objective"] == {"name": PATH, "scale": 0.5, "slice_size": 8}
    assert load_config(["--config", str(out / "config.yaml")]).objective.to_dict() == {
        "name": PATH,
        "scale": 0.5,
        "slice_size": 8,
    }


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "tests.commands.no_such_module:loss",
            "objective 'tests.commands.no_such_module:loss': cannot import module "
            "'tests.commands.no_such_module' (No module named 'tests.commands.no_such_module'); "
            "is it installed or on PYTHONPATH?",
        ),
        (f"{__name__}:missing", f"module '{__name__}' has no function 'missing'"),
        (f"{__name__}:no_needs", "needs a `teacher_needs` attribute"),
        (f"{__name__}:unknown_needs", "unknown teacher field(s) logits; valid: class_logprobs"),
        (
            f"{__name__}:too_few_keywords",
            "must accept the keyword(s) alignments, shared_vocab, student_ids, "
            "student_old_logprobs, teacher",
        ),
        ("no_colon_here", "objective.name must be one of simct"),
        (f"{__name__}:", "is not an import path of the form package.module:function"),
    ],
)
def test_a_path_that_is_no_objective_is_one_line(tmp_path, capsys, name, message):
    argv = ["train", "--student", "org/s", "--teacher", "org/t", "--objective", name]
    assert main([*argv, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_an_option_the_users_objective_does_not_take_lists_its_own(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"objective": {"name": PATH, "temperature": 2.0}}))
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"objective '{PATH}' takes no option temperature; its options: scale, slice_size" in err


def test_a_misspelt_flag_is_still_refused(capsys):
    for argv, extra in (
        (["train", "--max-step", "3"], "--max-step 3"),
        (["train", "--objective.scale"], "--objective.scale"),
        (["plot", "runs/x", "--objective.scale", "1"], "--objective.scale 1"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        assert f"unrecognized arguments: {extra}" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unrecognized arguments: --max-step 3"):
        load_config(["--max-step", "3"])
