"""Two CPU processes under ``accelerate launch`` (gloo DDP): prompts are sharded, figures are
reduced across ranks, and both ranks end with identical weights."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest

from tests.training.tiny import subprocess_env, tiny_args


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_accelerate_launch(tiny, tmp_path):
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    out = tmp_path / "ddp"
    # `accelerate launch --cpu --num_processes 2` starts one process unless MPI is set up;
    # torchrun-style launching with ACCELERATE_USE_CPU=1 gives real gloo DDP on CPU.
    env = subprocess_env()
    env["ACCELERATE_USE_CPU"] = "1"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "-m", "ctopd", "train",
        *tiny_args(tiny, out, "--per-device-batch-size", "2", "--max-steps", "3",
                   "--objective", "simct", "--save-every", "2"),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    checksums = summary["rank_param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # 2 ranks x 2 prompts each, summed across ranks.
    assert all(r["prompts"] == 4 and r["responses"] == 4 for r in rows)
    state = out / "checkpoint-000003" / "state"
    assert (state / "random_states_0.pkl").is_file() and (state / "random_states_1.pkl").is_file()
    assert (out / "final" / "model.safetensors").is_file()
