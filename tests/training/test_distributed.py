"""Two CPU processes under ``accelerate launch`` (gloo DDP): prompts are sharded, figures are
reduced across ranks, and both ranks end with identical weights; a non-finite figure on one rank
or a SIGTERM stops both together (``ctopd.training.runtime``)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.training.tiny import subprocess_env, tiny_args, write_jsonl


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
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "ctopd",
        "train",
        *tiny_args(
            tiny,
            out,
            "--per-device-batch-size",
            "2",
            "--max-steps",
            "3",
            "--objective",
            "simct",
            "--save-every",
            "2",
        ),
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


def _launch(args: list[str], command: str = "train") -> list[str]:
    """The two-process CPU launch of ``ctopd COMMAND ARGS`` (gloo DDP)."""
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "ctopd",
        command,
        *args,
    ]


def _env() -> dict[str, str]:
    env = subprocess_env()
    env["ACCELERATE_USE_CPU"] = "1"
    return env


def _our_lines(stderr: str, start: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(start)]


@pytest.mark.slow
def test_two_processes_stop_together_when_one_rank_s_loss_is_nan(tiny, tmp_path):
    """``ctopd sft``: rank 1's example reads a NaN embedding row, rank 0's does not. Both ranks
    stop at once, exit 1, with one line from the main process (before, rank 1 raised alone and
    rank 0, already in the gradient all-reduce, died with gloo's "Connection closed by peer"
    traceback; NCCL may wait there until its timeout instead)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = tmp_path / "nan-student"
    model = AutoModelForCausalLM.from_pretrained(tiny["student"])
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    rows = [
        {"prompt": "Sam has 3 apples.", "response": "Sam has 3 apples. #### 3"},
        {"prompt": "Sam has 4 birds.", "response": "#### 4"},
    ]
    first = tokenizer.apply_chat_template(
        [{"role": "user", "content": rows[0]["prompt"]}], add_generation_prompt=True, tokenize=False
    )
    seen = set(tokenizer(first + rows[0]["response"], add_special_tokens=False)["input_ids"])
    poisoned = next(
        i for i in tokenizer(" birds", add_special_tokens=False)["input_ids"] if i not in seen
    )
    # Untie the output layer so only inputs holding the poisoned token go non-finite.
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    with torch.no_grad():
        model.model.embed_tokens.weight[poisoned] = float("nan")
    model.save_pretrained(student)
    tokenizer.save_pretrained(student)
    data = write_jsonl(tmp_path / "two.jsonl", rows)
    out = tmp_path / "sft"
    args = tiny_args(
        {**tiny, "student": student},
        out,
        "--data",
        str(data),
        "--data.shuffle",
        "false",
        "--per-device-batch-size",
        "1",
        "--max-steps",
        "1",
    )
    # The two ranks started by hand (the environment a launcher gives them), so each one's own
    # exit and output are seen: under torchrun the agent kills the rest when one fails.
    port, ranks = _free_port(), []
    for rank in (0, 1):
        env = {
            **_env(),
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        ranks.append(
            subprocess.Popen(
                [sys.executable, "-m", "ctopd", "sft", *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        outputs = [rank.communicate(timeout=120) for rank in ranks]  # a hang times out here
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [1, 1], outputs[1][1][-3000:]
    assert _our_lines(outputs[1][1], "ctopd sft: stopped") == []  # the main process speaks
    lines = _our_lines(outputs[0][1], "ctopd sft: stopped")
    assert lines == [
        "ctopd sft: stopped at step 1: the loss is nan, so the step was not applied and "
        "nothing was saved. Likely cause: the student is non-finite before any update: check "
        "its weights and student.dtype (float16 weights overflow; use float32 or bfloat16). No "
        "checkpoint was saved before it (--save-every N keeps some); start again with "
        "--overwrite"
    ], outputs[0][1][-3000:]
    assert all("Traceback" not in err for _, err in outputs)
    assert not (out / "final").exists()


@pytest.mark.slow
def test_two_processes_lr_1e6_stop_before_a_non_finite_step(tiny, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    args = tiny_args(
        tiny,
        out,
        "--per-device-batch-size",
        "2",
        "--objective",
        "dpca",
        "--optim.lr",
        "1e6",
        "--save-every",
        "1",
        "--max-steps",
        "4",
    )
    result = subprocess.run(_launch(args), env=_env(), capture_output=True, text=True, timeout=150)
    assert result.returncode != 0
    lines = _our_lines(result.stderr, "ctopd train: stopped")
    assert len(lines) == 1, result.stderr[-3000:]  # the main process speaks for both
    assert lines[0].startswith(
        "ctopd train: stopped at step 2: the gradient norm is nan, so the step was not applied"
    )
    assert f"Last checkpoint kept: {out / 'checkpoint-000001'}" in lines[0]
    assert "accelerate launch --num_processes 2 -m ctopd train --config" in lines[0]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000001"]
    for name in ("state/model.safetensors", "student/model.safetensors"):
        tensors = load_file(str(out / "checkpoint-000001" / name))
        assert all(torch.isfinite(t).all() for t in tensors.values())
    assert not (out / "final").exists()


@pytest.mark.slow
def test_two_processes_sigterm_saves_both_ranks_and_resume_finishes(tiny, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(
        tiny,
        out,
        "--per-device-batch-size",
        "2",
        "--max-steps",
        "30",
        "--rollout.max-new-tokens",
        "8",
    )
    child = subprocess.Popen(
        _launch(args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics, deadline = out / "metrics.jsonl", time.time() + 150
    while (
        child.poll() is None
        and time.time() < deadline
        and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
    ):
        time.sleep(0.01)
    assert child.poll() is None, f"the run ended before the signal: {child.communicate()[1]}"
    child.send_signal(signal.SIGTERM)  # the launcher passes it on to both ranks
    _, stderr = child.communicate(timeout=150)
    assert child.returncode != 0
    lines = _our_lines(stderr, "ctopd train: stopped by SIGTERM")
    assert len(lines) == 1, stderr[-3000:]
    step = int(lines[0].split("after step ")[1].split(" ")[0])
    assert 3 <= step < 30
    assert lines[0].endswith(
        f"checkpoint saved: {out / f'checkpoint-{step:06d}'}; continue "
        "with: accelerate launch --num_processes 2 -m ctopd train --config "
        f"{out / 'config.yaml'} --resume"
    )
    state = out / f"checkpoint-{step:06d}" / "state"  # each rank wrote its own RNG state
    assert (state / "random_states_0.pkl").is_file() and (state / "random_states_1.pkl").is_file()

    resumed = subprocess.run(
        _launch(["--config", str(out / "config.yaml"), "--resume"]),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    checksums = json.loads((out / "summary.json").read_text())["rank_param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
