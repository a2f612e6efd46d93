"""Checkpoints: atomic, resumable exactly after SIGKILL, loadable with from_pretrained."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from ctopd.training.checkpoint import CheckpointError, list_checkpoints, resolve_resume
from ctopd.training.config import load_config
from ctopd.training.loop import train
from tests.training.tiny import final_weights, subprocess_env, tiny_args


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if line.strip()]


def test_checkpoints_are_complete_and_pruned(tiny, tmp_path):
    out = tmp_path / "run"
    train(
        load_config(
            tiny_args(tiny, out, "--max-steps", "5", "--save-every", "2", "--keep-checkpoints", "2")
        )
    )
    names = [p.name for p in list_checkpoints(out)]
    assert names == ["checkpoint-000004", "checkpoint-000005"]  # 2 is pruned, 5 is the end
    last = out / "checkpoint-000005"
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["position"] == 20 and state["epoch"] == 0
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= {
        p.name for p in (last / "state").iterdir()
    }
    AutoModelForCausalLM.from_pretrained(last / "student")  # every checkpoint is a model folder
    assert not list(out.glob("*.tmp"))
    assert resolve_resume("latest", out) == last
    assert resolve_resume(None, out) is None
    with pytest.raises(
        CheckpointError, match="fresh holds no checkpoint to continue from; drop --resume"
    ):
        resolve_resume("latest", tmp_path / "fresh")  # never quietly a fresh start
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        resolve_resume(str(tmp_path), out)


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny, tmp_path):
    args = tiny_args(
        tiny, tmp_path / "killed", "--max-steps", "8", "--save-every", "2", "--objective", "dpca"
    )
    command = [sys.executable, "-m", "ctopd", "train", *args]
    child = subprocess.Popen(
        command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    first = tmp_path / "killed" / "checkpoint-000002"
    deadline = time.time() + 120
    while not first.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert child.poll() is None, f"the run ended before it could be killed: {child.stderr.read()}"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (tmp_path / "killed" / "final").exists()

    resumed = subprocess.run(
        command + ["--resume"], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout

    # The uninterrupted reference, in this process (same single-threaded CPU arithmetic).
    train(
        load_config(
            tiny_args(
                tiny,
                tmp_path / "whole",
                "--max-steps",
                "8",
                "--save-every",
                "2",
                "--objective",
                "dpca",
            )
        )
    )
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl: rows the killed run wrote after its checkpoint were replaced, one per step.
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "whole")
