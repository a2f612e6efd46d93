"""``ctopd serve-teacher`` and ``ctopd train --teacher-url`` through the command line: a server
that dies for good stops the run with a clear error, a non-zero exit and the last checkpoint
kept; a server that is not there at all fails fast."""

from __future__ import annotations

import json
import re
import socket

import pytest
import torch

from ctopd.cli import main
from ctopd.training.checkpoint import resolve_resume
from tests.training.servers import API_KEY, ServerProcess, kill_after_first_step
from tests.training.tiny import build_assets, tiny_args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return build_assets(tmp_path_factory.mktemp("tiny_serve"))


def _served(url: str, retries: int) -> list[str]:
    return [
        "--objective",
        "dpca",
        "--teacher-url",
        url,
        "--teacher-server.retries",
        str(retries),
        "--teacher-server.backoff-seconds",
        "0.05",
    ]


def test_server_gone_for_good_exits_1_keeping_the_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CTOPD_TEACHER_API_KEY", API_KEY)
    server = ServerProcess(tiny["teacher"], tmp_path / "server.log")
    out = tmp_path / "run"
    try:
        server.start()
        watcher = kill_after_first_step(server, out, restart_after=None)
        code = main(
            [
                "train",
                *tiny_args(tiny, out, "--max-steps", "40", "--save-every", "1"),
                *_served(server.url, retries=2),
            ]
        )
        watcher.join(timeout=60)
    finally:
        server.kill()
    err = capsys.readouterr().err
    assert code == 1, err
    match = re.search(
        r"error: teacher failed at step (\d+): .*/v1/completions unreachable "
        r"after 2 retries .*; stopping, checkpoint of step (\d+) kept",
        err,
    )
    assert match, err
    failed, kept = int(match.group(1)), int(match.group(2))
    assert kept == failed - 1 and failed < 40
    checkpoint = resolve_resume("latest", out)
    assert checkpoint is not None and checkpoint.name == f"checkpoint-{kept:06d}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == kept
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(1, kept + 1))


def test_no_server_fails_fast(tiny, tmp_path, capsys):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = main(
        [
            "train",
            *tiny_args(tiny, tmp_path / "run"),
            *_served(f"http://127.0.0.1:{port}/v1", retries=1),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert f"http://127.0.0.1:{port}/v1/models unreachable after 1 retries" in err
    assert "ConnectionRefusedError" in err


def test_serve_teacher_refuses_a_missing_model(tmp_path, capsys):
    assert main(["serve-teacher", "--model", str(tmp_path / "nothing")]) == 2
    assert "ctopd serve-teacher: error:" in capsys.readouterr().err
