"""The run around the step (``ctopd.training.runtime``), for ``train`` and ``sft`` alike: a run
folder belongs to one run, nothing non-finite is stepped or saved, SIGTERM and SIGINT save the
last finished step, and ``--resume`` continues the same computation or says why not."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import ctopd.training.loop as loop
import ctopd.training.sft as sft
from ctopd.training.checkpoint import CheckpointError, list_checkpoints
from ctopd.training.config import ConfigError, load_config
from ctopd.training.loop import train
from ctopd.training.runtime import RunStopped, Runtime
from ctopd.training.sft import run_sft
from tests.training.tiny import final_weights, subprocess_env, tiny_args


def _run(tiny, out, *extra):
    return train(load_config(tiny_args(tiny, out, *extra)))


def _steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def refuse_models(monkeypatch) -> None:
    """From now on loading a tokenizer or a model fails the test: what is checked must be
    checked before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model loaded before the check")

    for module in (loop, sft):
        monkeypatch.setattr(module, "load_model_tokenizer", refuse)
        monkeypatch.setattr(module, "load_causal_lm", refuse)


# --- a run folder belongs to one run ----------------------------------------------------------


def test_a_finished_run_folder_is_refused_and_survives(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _run(tiny, out, "--max-steps", "3", "--save-every", "2")
    metrics, weights = (out / "metrics.jsonl").read_text(), final_weights(out)
    config = (out / "config.yaml").read_text()
    refuse_models(monkeypatch)
    message = (
        f"{re.escape(str(out))} already holds a run \\(config.yaml, metrics.jsonl, "
        "summary.json, final, checkpoint-000002, checkpoint-000003\\); pass --resume to "
        "continue it, or --overwrite to start over"
    )
    with pytest.raises(ConfigError, match=message):
        _run(tiny, out, "--max-steps", "3")
    with pytest.raises(ConfigError, match=message):
        run_sft(load_config(tiny_args(tiny, out)))
    assert (out / "metrics.jsonl").read_text() == metrics
    assert (out / "config.yaml").read_text() == config
    assert all(torch.equal(weights[k], v) for k, v in final_weights(out).items())


def test_overwrite_says_what_it_removes_and_keeps_other_files(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    _run(tiny, out, "--max-steps", "3", "--save-every", "1", "--report-to", "tensorboard")
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    _run(tiny, out, "--max-steps", "1", "--overwrite")
    assert (
        f"ctopd train: --overwrite: removing config.yaml, metrics.jsonl, summary.json, "
        f"final, checkpoint-000002, checkpoint-000003, tensorboard from {out}"
        in capsys.readouterr().out
    )
    assert _steps(out) == [1]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000001"]
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "tensorboard").exists()
    with pytest.raises(ConfigError, match="give one of them"):
        _run(tiny, out, "--resume", "--overwrite")


HOLD_LOCK = """
import fcntl, os, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.truncate(0)
handle.write(f"{os.getpid()}\\n")
handle.flush()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_live_run_holds_the_folder_until_it_dies(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = load_config(tiny_args(tiny, out))
    refuse_models(monkeypatch)
    # In one process: a second run into the folder while the first holds it.
    with Runtime(config, "train"):
        with pytest.raises(
            ConfigError,
            match=f"{re.escape(str(out))} is in use by another "
            f"ctopd run \\(process {os.getpid()}\\); wait",
        ):
            Runtime(config, "train")
    Runtime(config, "train").close()  # released when the first run ended
    # Another process holds it (as a live `ctopd train` does) and is then killed: the kernel
    # drops its lock, no stale lock file stays in the way.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            ConfigError, match=f"in use by another ctopd run \\(process {holder.pid}\\)"
        ):
            _run(tiny, out)
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.undo()
    _run(tiny, out, "--max-steps", "1")
    assert _steps(out) == [1]


# --- nothing non-finite is stepped or saved ---------------------------------------------------


def _checkpoint_tensors(folder):
    """Every tensor of a checkpoint: both weight files and the optimiser state."""
    tensors = list(load_file(str(folder / "state" / "model.safetensors")).values())
    tensors += list(load_file(str(folder / "student" / "model.safetensors")).values())

    def walk(value):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(torch.load(folder / "state" / "optimizer.bin", weights_only=True))
    return tensors


def test_a_nan_gradient_norm_is_never_stepped(tiny, tmp_path, monkeypatch):
    real, calls = loop.compute_objective, {"n": 0}

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # a finite loss with a NaN gradient: d√u/du = inf at 0, times 0
            loss = loss + torch.sqrt(0.0 * loss)
        return loss, metrics

    monkeypatch.setattr(loop, "compute_objective", poisoned)
    out = tmp_path / "run"
    with pytest.raises(
        RunStopped,
        match=(
            "ctopd train: stopped at step 2: the gradient norm is nan, so the "
            "step was not applied and nothing was saved. Likely cause: a learning rate too high "
            "for this model \\(optim.lr 0.001\\); lower it. Last checkpoint kept: "
            f"{re.escape(str(out))}/checkpoint-000001; continue from it with `ctopd train "
            f"--config {re.escape(str(out))}/config.yaml --resume --resume-changed --optim.lr "
            "0.0001`$"
        ),
    ) as stop:
        _run(tiny, out, "--save-every", "1", "--max-steps", "3")
    assert stop.value.exit_code == 1
    assert _steps(out) == [1]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000001"]
    assert not (out / "final").exists()


@pytest.mark.parametrize("objective", ["simct", "dpca"])
def test_lr_1e6_stops_in_one_line_and_every_checkpoint_is_finite(tiny, tmp_path, objective):
    out = tmp_path / "run"
    with pytest.raises(
        RunStopped,
        match="stopped at step 2: the gradient norm is nan, so the "
        "step was not applied.*optim.lr 1e\\+06",
    ):
        _run(
            tiny,
            out,
            "--objective",
            objective,
            "--optim.lr",
            "1e6",
            "--save-every",
            "1",
            "--max-steps",
            "4",
        )
    checkpoints = list_checkpoints(out)
    assert [p.name for p in checkpoints] == ["checkpoint-000001"]
    assert all(torch.isfinite(t).all() for c in checkpoints for t in _checkpoint_tensors(c))
    assert not (out / "final").exists()


def test_sft_stops_on_a_non_finite_loss_too(tiny, tmp_path, monkeypatch):
    calls = {"n": 0}

    real = sft.mean_token_nll

    def mean_token_nll(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(sft, "mean_token_nll", mean_token_nll)
    out = tmp_path / "sft"
    with pytest.raises(
        RunStopped,
        match="ctopd sft: stopped at step 2: the loss is nan, so the "
        "step was not applied.*Last checkpoint kept: "
        ".*checkpoint-000001; continue from it with `ctopd sft "
        "--config",
    ):
        run_sft(load_config(tiny_args(tiny, out, "--save-every", "1", "--max-steps", "3")))
    assert _steps(out) == [1]


def test_non_finite_weights_are_not_saved(tiny, tmp_path, monkeypatch):
    """An update that makes a weight non-finite (finite gradients, an overflowing step) stops
    before the checkpoint that would hold it."""
    real_step = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        if self.state and next(iter(self.state.values()))["step"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    out = tmp_path / "run"
    with pytest.raises(
        RunStopped,
        match="stopped at step 2: the weight .* is not finite, so its weights were not saved",
    ):
        _run(tiny, out, "--save-every", "1", "--max-steps", "3")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000001"]


# --- SIGTERM and SIGINT -----------------------------------------------------------------------


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_last_finished_step(tiny, tmp_path, monkeypatch, signum, code):
    real, calls = loop.compute_objective, {"n": 0}

    def signalled(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # in the middle of step 3
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "compute_objective", signalled)
    out = tmp_path / "run"
    name = signal.Signals(signum).name
    with pytest.raises(
        RunStopped,
        match=(
            f"^ctopd train: stopped by {name} after step 3 of 6; checkpoint saved: "
            f"{re.escape(str(out))}/checkpoint-000003; continue with: ctopd train --config "
            f"{re.escape(str(out))}/config.yaml --resume$"
        ),
    ) as stop:
        _run(tiny, out, "--max-steps", "6")
    assert stop.value.exit_code == code
    assert _steps(out) == [1, 2, 3] and not (out / "final").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.setattr(loop, "compute_objective", real)
    summary = train(load_config(["--config", str(out / "config.yaml"), "--resume"]))
    assert summary["steps"] == 6 and _steps(out) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_sigterm_to_ctopd_train_then_resume_matches_an_uninterrupted_run(tiny, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(
        tiny,
        out,
        "--max-steps",
        "40",
        "--per-device-batch-size",
        "2",
        "--rollout.max-new-tokens",
        "8",
        "--objective",
        "dpca",
    )
    child = subprocess.Popen(
        [sys.executable, "-m", "ctopd", "train", *args],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while (
        child.poll() is None
        and time.time() < deadline
        and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
    ):
        time.sleep(0.01)
    assert child.poll() is None, f"the run ended before the signal: {child.communicate()[1]}"
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    found = re.fullmatch(
        r"ctopd train: stopped by SIGTERM after step (\d+) of 40; checkpoint "
        r"saved: (\S+); continue with: (ctopd train .* --resume)",
        line,
    )
    assert found, line
    step = int(found.group(1))
    assert 3 <= step < 40 and found.group(2) == str(out / f"checkpoint-{step:06d}")
    assert (out / f"checkpoint-{step:06d}" / "state" / "model.safetensors").is_file()
    assert _steps(out) == list(range(1, step + 1))

    command = found.group(3).split()  # the printed command, run as printed
    resumed = subprocess.run(
        [sys.executable, "-m", "ctopd", *command[1:]],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {out / f'checkpoint-{step:06d}'} at step {step}" in resumed.stdout
    assert _steps(out) == list(range(1, 41))
    # Saved at a step boundary, so the resumed run is the uninterrupted one, bit for bit.
    _run(
        tiny,
        tmp_path / "whole",
        "--max-steps",
        "40",
        "--per-device-batch-size",
        "2",
        "--rollout.max-new-tokens",
        "8",
        "--objective",
        "dpca",
    )
    expected = final_weights(tmp_path / "whole")
    assert all(torch.equal(expected[k], v) for k, v in final_weights(out).items())


# --- --resume continues the same computation --------------------------------------------------


def test_resume_refuses_changed_settings_unless_told(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    constant = ("--optim.schedule", "constant", "--optim.warmup-ratio", "0")
    _run(tiny, out, "--max-steps", "2", "--save-every", "1", *constant)
    refuse_models(monkeypatch)
    with pytest.raises(
        ConfigError,
        match="^--resume: .*checkpoint-000002 was made with other "
        "settings that change what the run computes: ",
    ) as err:
        _run(
            tiny,
            out,
            "--max-steps",
            "3",
            "--resume",
            *constant,
            "--objective",
            "dpca",
            "--per-device-batch-size",
            "2",
            "--seed",
            "3",
            "--optim.lr",
            "1e-4",
        )
    for change in (
        "objective.name: simct → dpca",
        "per_device_batch_size: 4 → 2",
        "seed: 0 → 3",
        "optim.lr: 0.001 → 0.0001",
    ):
        assert change in str(err.value)
    assert str(err.value).endswith(
        "put them back, or pass --resume-changed to continue with the new ones"
    )
    with pytest.raises(ConfigError, match="command: ctopd train → ctopd sft"):
        run_sft(load_config(tiny_args(tiny, out, "--resume", *constant)))
    monkeypatch.undo()
    capsys.readouterr()
    # A longer run is no change; a new rate with --resume-changed is, and it applies.
    _run(
        tiny,
        out,
        "--max-steps",
        "3",
        "--resume",
        *constant,
        "--optim.lr",
        "1e-4",
        "--resume-changed",
    )
    assert (
        "ctopd train: resuming with changed settings: optim.lr: 0.001 → 0.0001"
        in capsys.readouterr().out
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-3, 1e-4])


def test_resume_with_nothing_to_resume_says_so(tiny, tmp_path, monkeypatch):
    refuse_models(monkeypatch)
    with pytest.raises(
        CheckpointError,
        match="empty holds no checkpoint to continue from; drop --resume to start a new run there",
    ):
        _run(tiny, tmp_path / "empty", "--resume")


def test_a_truncated_checkpoint_is_named_before_models_load(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _run(tiny, out, "--max-steps", "2", "--save-every", "1")
    refuse_models(monkeypatch)
    for name, error in (
        ("model.safetensors", "incomplete metadata, file not fully covered"),
        ("optimizer.bin", "File is not a zip file"),
    ):
        path = out / "checkpoint-000002" / "state" / name
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
        with pytest.raises(
            CheckpointError,
            match=(
                f"checkpoint {re.escape(str(out))}/checkpoint-000002 is damaged: state/{name}: "
                f".*{error}; resume from an earlier one with --resume "
                f"{re.escape(str(out))}/checkpoint-000001$"
            ),
        ):
            _run(tiny, out, "--max-steps", "3", "--resume")
        path.write_bytes(whole)


def test_nan_sampling_probabilities_stop_like_a_nan_loss(tiny, tmp_path, monkeypatch):
    """``generate`` refuses NaN probabilities (weights blown up by a step); that goes through
    the same every-rank stop instead of a traceback on one rank."""
    from ctopd.training.rollout_engine import HFRolloutEngine

    real, calls = HFRolloutEngine.generate, {"n": 0}

    def sample(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(*args, **kwargs)

    monkeypatch.setattr(HFRolloutEngine, "generate", sample)
    with pytest.raises(
        RunStopped,
        match="stopped at step 2: the student's sampling "
        "probabilities are not finite, so the step was not "
        "applied",
    ):
        _run(tiny, tmp_path / "run", "--max-steps", "3")


def test_a_full_disk_while_checkpointing_names_the_checkpoint_kept(tiny, tmp_path, monkeypatch):
    import errno

    import ctopd.training.runtime as runtime

    real, calls = runtime.save_checkpoint, {"n": 0}

    def save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime, "save_checkpoint", save)
    out = tmp_path / "run"
    with pytest.raises(
        RunStopped,
        match=(
            "^ctopd train: could not write the checkpoint of step 2 \\(No space left on "
            f"device\\); {re.escape(str(out))}/checkpoint-000001 is kept; free space and "
            "continue with `ctopd train --config .*config.yaml --resume`$"
        ),
    ):
        _run(tiny, out, "--max-steps", "3", "--save-every", "1")
