"""A served teacher: ``ctopd serve-teacher`` as a real subprocess gives the in-process teacher's
losses; a server killed mid-run and restarted changes nothing; replies that do not match the
request are refused naming the field; the top-k remainder rule; the API key."""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM

from ctopd.core.pair import load_tokenizer
from ctopd.objectives import TeacherRequest
from ctopd.training.config import ConfigError, TeacherServerConfig, load_config
from ctopd.training.loop import train
from ctopd.training.teachers.local import LocalTeacher, TeacherServerError
from ctopd.training.teachers.served import ServedTeacher, dense_logprobs, parse_prompt_logprobs
from ctopd.training.teachers.server import ScoringModel, TeacherHTTPServer
from tests.objectives.reference import make_shared_vocab
from tests.training.servers import API_KEY, FakeServer, ServerProcess, kill_after_first_step
from tests.training.tiny import final_weights, tiny_args

TEACHER_VOCAB = 320  # tiny.py's byte-level BPE teacher
STEPS = 3


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """``ctopd serve-teacher`` over the tiny teacher, with an API key, for this module."""
    process = ServerProcess(tiny["teacher"], tmp_path_factory.mktemp("server") / "stderr.log")
    process.start()
    yield process
    process.kill()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("CTOPD_TEACHER_API_KEY", API_KEY)


def _served(url: str, *extra: str) -> list[str]:
    return [
        "--teacher-url",
        url,
        "--teacher-server.top-k",
        str(TEACHER_VOCAB),
        "--teacher-server.retries",
        "12",
        "--teacher-server.backoff-seconds",
        "0.1",
        *extra,
    ]


def _train(tiny, out, *extra):
    train(load_config(tiny_args(tiny, out, "--max-steps", str(STEPS), *extra)))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def served_dpca(tiny, server, tmp_path_factory):
    """An uninterrupted served ``dpca`` run: ``(run dir, rows)``."""
    out = tmp_path_factory.mktemp("served_dpca") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTOPD_TEACHER_API_KEY", API_KEY)
        rows = _train(tiny, out, "--objective", "dpca", *_served(server.url))
    return out, rows


@pytest.mark.parametrize("objective", ["dpca", "simct"])
def test_served_losses_equal_in_process(tiny, server, served_dpca, tmp_path, api_key, objective):
    local = _train(tiny, tmp_path / "local", "--objective", objective)
    if objective == "dpca":
        out, served = served_dpca
    else:
        out = tmp_path / "served"
        served = _train(tiny, out, "--objective", objective, *_served(server.url))
    assert [r["step"] for r in served] == list(range(1, STEPS + 1))
    for ours, theirs in zip(local, served):
        for key in ("loss", "kl", "coverage", "teacher_logprob_mean", "response_tokens"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    # Adam (lr 1e-3) turns float noise in a near-zero gradient into ~1e-6 weight differences.
    expected = final_weights(tmp_path / "local")
    for name, value in final_weights(out).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_server_killed_mid_run_and_restarted(tiny, server, served_dpca, tmp_path, api_key, caplog):
    caplog.set_level(logging.WARNING, logger="ctopd.training.teachers.served")
    out = tmp_path / "run"
    watcher = kill_after_first_step(server, out, restart_after=1.0)
    rows = _train(tiny, out, "--objective", "dpca", *_served(server.url))
    watcher.join(timeout=120)
    assert watcher.rows_at_kill is not None and watcher.rows_at_kill < STEPS
    assert "retry 1/12" in caplog.text  # the server was down for a request and came back
    # No step lost or counted twice, and the weights of an uninterrupted run, exactly.
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    reference_dir, reference_rows = served_dpca
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference_rows]
    expected = final_weights(reference_dir)
    assert all(torch.equal(value, expected[name]) for name, value in final_weights(out).items())


# --- the client against scripted replies ------------------------------------------------------

SEQUENCE, PROMPT_LENGTH, VOCAB = [5, 7, 9, 11], 2, 16


def _vllm_reply(**changes) -> dict:
    """A reply in vLLM's shape to ``SEQUENCE`` with ``prompt_logprobs=2``: entry 0 null; the
    realised token 9 outside the top 2 at position 2 (listed first, ranked 5); token 11 inside
    them at position 3."""

    def lp(value, rank, text):
        return {"logprob": value, "rank": rank, "decoded_token": text}

    entries = [
        None,
        {"7": lp(-0.5, 1, "a"), "3": lp(-1.5, 2, "b")},
        {"9": lp(-3.0, 5, "c"), "1": lp(-0.3, 1, "d"), "2": lp(-2.0, 2, "e")},
        {"4": lp(-0.3, 1, "f"), "11": lp(-1.6, 2, "g")},
    ]
    choice = {
        "index": 0,
        "text": "x",
        "logprobs": None,
        "finish_reason": "length",
        "stop_reason": None,
        "prompt_logprobs": entries,
        "prompt_token_ids": SEQUENCE,
    }
    choice.update(changes)
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 0,
        "model": "fake",
        "choices": [choice],
        "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5},
    }


def _client(url: str, **options) -> ServedTeacher:
    config = TeacherServerConfig(
        url=url, top_k=options.pop("top_k", 2), backoff_seconds=0.0, **{"retries": 0, **options}
    )
    return ServedTeacher(config, None, vocab_size=VOCAB)


def full_request(vocab_size: int, needs=("token_logprobs", "full_logprobs")) -> TeacherRequest:
    """A request for the whole distribution (``opd``'s need: the one dense field), over a shared
    vocabulary of ``vocab_size`` teacher ids."""
    vocab = make_shared_vocab([[0], [1]], [[0], [1]], 2, vocab_size)
    return TeacherRequest(frozenset(needs), vocab)


def _score(teacher: ServedTeacher) -> torch.Tensor:
    """The client's full distribution ``[1, n, V]`` (the remainder rule made visible)."""
    return (
        teacher.submit([SEQUENCE[:PROMPT_LENGTH]], [SEQUENCE[PROMPT_LENGTH:]], full_request(VOCAB))
        .result()
        .full_logprobs
    )


@pytest.fixture
def fake():
    servers = []

    def start(answer):
        servers.append(FakeServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_vllm_shaped_reply_and_the_remainder_rule(fake):
    server = fake(lambda body: (200, _vllm_reply()))
    dense = _score(_client(server.url))
    body = server.bodies[0]
    assert body["prompt"] == [SEQUENCE] and body["prompt_logprobs"] == 2
    assert body["max_tokens"] == 1 and "model" not in body
    assert dense.shape == (1, 2, VOCAB)
    first, second = dense[0, 0].double(), dense[0, 1].double()
    # Returned ids keep their log-probs (the realised one outside the top 2 included) ...
    assert first[9].item() == pytest.approx(-3.0) and first[1].item() == pytest.approx(-0.3)
    assert second[11].item() == pytest.approx(-1.6) and second[4].item() == pytest.approx(-0.3)
    # ... and the rest share the remainder evenly.
    remainder = 1 - math.exp(-3.0) - math.exp(-0.3) - math.exp(-2.0)
    others = [i for i in range(VOCAB) if i not in (9, 1, 2)]
    assert torch.allclose(
        first[others].exp(), torch.full((13,), remainder / 13, dtype=torch.float64)
    )
    assert torch.allclose(dense.double().exp().sum(-1), torch.ones(1, 2, dtype=torch.float64))


def test_realised_tokens_only_when_that_is_all_the_objective_needs(fake):
    def answer(body):
        reply = _vllm_reply()
        for entry in reply["choices"][0]["prompt_logprobs"][1:]:
            for key in [k for k in entry if int(k) not in SEQUENCE]:
                del entry[key]
        return 200, reply

    server = fake(answer)
    teacher = _client(server.url, top_k=5)
    outputs = teacher.submit(
        [SEQUENCE[:2]], [SEQUENCE[2:]], full_request(VOCAB, ["token_logprobs"])
    ).result()
    assert server.bodies[0]["prompt_logprobs"] == 0  # dpca: no top-k, whatever top_k says
    assert outputs.full_logprobs is None and outputs.class_logprobs is None
    assert outputs.token_logprobs[0].tolist() == pytest.approx([-3.0, -1.6])
    with pytest.raises(TeacherServerError, match="asked for the top 5"):
        teacher.submit(
            [SEQUENCE[:2]],
            [SEQUENCE[2:]],
            full_request(VOCAB, ["token_logprobs", "class_logprobs"]),
        ).result()
    assert server.bodies[1]["prompt_logprobs"] == 5


def test_the_cap_is_the_smallest_top_k_log_prob_not_the_realised_token():
    choice = _vllm_reply()["choices"][0]
    _, _, counts, caps = parse_prompt_logprobs(
        choice, SEQUENCE, PROMPT_LENGTH, where="c", vocab_size=VOCAB, top_k=2
    )
    assert counts.tolist() == [3, 2]  # the realised token 9 came on top of the top 2; 11 was too
    assert caps.tolist() == [-2.0, -1.6]


def test_replies_are_read_without_orjson_too(fake, monkeypatch):
    monkeypatch.setitem(sys.modules, "orjson", None)  # import orjson raises ImportError
    server = fake(lambda body: (200, _vllm_reply()))
    assert _score(_client(server.url))[0, 1, 11].item() == pytest.approx(-1.6)


def test_dense_logprobs_floors_and_caps_the_remainder_and_fills_padding_rows():
    rows = torch.tensor([0, 0, 1])
    ids = torch.tensor([1, 2, 0])
    logprobs = torch.tensor([math.log(0.5), math.log(0.5), math.log(0.9)], dtype=torch.float64)
    caps = torch.tensor([0.0, math.log(0.01), 0.0], dtype=torch.float64)
    dense = dense_logprobs(rows, ids, logprobs, rows_total=3, vocab_size=4, caps=caps)
    assert dense[0, 0].item() == pytest.approx(math.log(1e-12 / 2), rel=1e-6)  # nothing left
    # 0.1 left for 3 ids, but none may be likelier than the smallest top-k probability; the
    # row (0.9 + 3 x 0.01) is then renormalised.
    assert torch.allclose(dense[1, 1:], torch.full((3,), math.log(0.01 / 0.93)))
    assert dense[1, 0].item() == pytest.approx(math.log(0.9 / 0.93), rel=1e-6)
    assert torch.allclose(dense.double().exp().sum(-1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(dense[2], torch.full((4,), math.log(0.25)))  # a padding row: uniform


def _drop_last_position(reply):
    reply["choices"][0]["prompt_logprobs"].pop()
    return reply


def _set(position, key, value):
    def change(reply):
        reply["choices"][0]["prompt_logprobs"][position][key] = value
        return reply

    return change


def _delete(position, key):
    def change(reply):
        del reply["choices"][0]["prompt_logprobs"][position][key]
        return reply

    return change


def _change_choice(**fields):
    def change(reply):
        reply["choices"][0].update(fields)
        return reply

    return change


BROKEN = {
    "positions": (
        _drop_last_position,
        r"choices\[0\].prompt_logprobs has 3 positions for a "
        "4-token sequence",
    ),
    "missing": (_change_choice(prompt_logprobs=None), r"choices\[0\].prompt_logprobs is missing"),
    "nan": (_set(2, "1", {"logprob": float("nan")}), r"prompt_logprobs\[2\]\['1'\].logprob is nan"),
    "no logprob": (_set(3, "4", {"rank": 1}), r"prompt_logprobs\[3\]\['4'\].logprob is missing"),
    "vocabulary": (
        _set(3, "999", {"logprob": -9.0}),
        "token id 999, outside the teacher "
        "tokenizer's 16 ids: the server runs a model with another vocabulary",
    ),
    "realised": (_delete(2, "9"), r"prompt_logprobs\[2\] has no entry for the realised token 9"),
    "null position": (
        _change_choice(prompt_logprobs=[None, None, None, None]),
        r"prompt_logprobs\[2\] is null",
    ),
    "too few": (_delete(3, "4"), r"prompt_logprobs\[3\] has 1 log-probs; asked for the top 2"),
    "other ids": (_change_choice(prompt_token_ids=[5, 7, 9, 12]), "prompt_token_ids differs"),
    "over one": (_set(3, "4", {"logprob": -0.01}), "add up to 1.19"),
    "choices": (
        lambda reply: {**reply, "choices": reply["choices"] * 2},
        "choices has 2 entries for 1 prompts",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_replies_name_the_field(fake, case):
    change, message = BROKEN[case]
    server = fake(lambda body: (200, change(_vllm_reply())))
    with pytest.raises(TeacherServerError, match=message):
        _score(_client(server.url))
    assert server.requests == 1  # a wrong reply is not retried


def test_http_errors(fake, monkeypatch):
    server = fake(lambda body: (400, {"error": {"message": "prompt_logprobs must be <= 20"}}))
    with pytest.raises(TeacherServerError, match="answered 400: prompt_logprobs must be <= 20"):
        _score(_client(server.url))
    server = fake(lambda body: (200, b"<html>busy</html>"))
    with pytest.raises(TeacherServerError, match="not JSON"):
        _score(_client(server.url))
    server = fake(lambda body: (401, {"error": {"message": "Unauthorized"}}))
    monkeypatch.delenv("CTOPD_TEACHER_API_KEY", raising=False)
    with pytest.raises(TeacherServerError, match=r"answered 401.*CTOPD_TEACHER_API_KEY"):
        _score(_client(server.url, retries=3))
    assert server.requests == 1


def test_5xx_is_retried_with_backoff(fake, caplog):
    caplog.set_level(logging.WARNING, logger="ctopd.training.teachers.served")
    server = fake(
        lambda body: (
            (503, {"error": {"message": "loading"}})
            if server.requests <= 2
            else (200, _vllm_reply())
        )
    )
    teacher = _client(server.url, retries=3)
    dense = _score(teacher)
    assert server.requests == 3 and teacher.retried == 2
    assert dense[0, 0, 9].item() == pytest.approx(-3.0)
    assert "HTTP 503 loading; retry 2/3" in caplog.text


def test_timeouts_are_retried_then_reported(fake):
    server = fake(lambda body: (time.sleep(1.0), (200, _vllm_reply()))[1])
    with pytest.raises(TeacherServerError, match="unreachable after 1 retries .*timed out"):
        _score(_client(server.url, retries=1, timeout_seconds=0.2))
    assert server.requests == 2


def test_requests_are_chunked_in_order_and_bounded(fake):
    in_flight, most = [0], [0]
    lock = threading.Lock()

    def answer(body):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.05)
        with lock:
            in_flight[0] -= 1
        choices = [_vllm_reply(index=i)["choices"][0] for i in range(len(body["prompt"]))]
        return 200, {**_vllm_reply(), "choices": choices}

    server = fake(answer)
    teacher = _client(server.url, sequences_per_request=2, max_concurrency=2)
    prompts, responses = [SEQUENCE[:2]] * 7, [SEQUENCE[2:]] * 7
    dense = teacher.submit(prompts, responses, full_request(VOCAB)).result().full_logprobs
    assert dense.shape == (7, 2, VOCAB)
    assert sorted(len(b["prompt"]) for b in server.bodies) == [1, 2, 2, 2]
    assert most[0] == 2


# --- the server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def in_thread_server(tiny):
    """The tiny teacher behind a ``TeacherHTTPServer`` in this process (with an API key)."""
    tokenizer = load_tokenizer(str(tiny["teacher"]))
    model = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    server = TeacherHTTPServer(
        ("127.0.0.1", 0), ScoringModel(model, tokenizer, name="tiny"), api_key=API_KEY
    )
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server, model, tokenizer
    server.shutdown()
    server.server_close()


def _http(url, body=None, key=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def test_api_key_is_required_except_for_health(in_thread_server):
    server, _, _ = in_thread_server
    root = f"http://127.0.0.1:{server.server_port}"
    body = {"prompt": [1, 2, 3], "prompt_logprobs": 1}
    assert _http(f"{root}/health")[0] == 200
    assert _http(f"{root}/v1/models")[0] == 401
    status, reply = _http(f"{root}/v1/completions", body, key="wrong")
    assert status == 401 and "API key" in reply["error"]["message"]
    status, reply = _http(f"{root}/v1/completions", body, key=API_KEY)
    assert status == 200 and len(reply["choices"][0]["prompt_logprobs"]) == 3
    status, reply = _http(f"{root}/v1/completions", {**body, "stream": True}, key=API_KEY)
    assert status == 400 and reply["error"]["param"] == "stream"


def test_server_prompt_logprobs_follow_vllm(in_thread_server, tiny):
    server, model, tokenizer = in_thread_server
    prompts = [tokenizer("Sam has 3 apples")["input_ids"], tokenizer("How many")["input_ids"]]
    responses = [
        tokenizer(" and 4 more.", add_special_tokens=False)["input_ids"],
        tokenizer(" birds", add_special_tokens=False)["input_ids"],
    ]
    reply = server.scorer.completions(
        {
            "prompt": [p + r for p, r in zip(prompts, responses)],
            "prompt_logprobs": 2,
            "return_token_ids": True,
        }
    )
    local = LocalTeacher(model, pad_id=tokenizer.pad_token_id).submit(
        prompts, responses, full_request(TEACHER_VOCAB)
    )
    logp = local.result().full_logprobs.float()
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        entries = reply["choices"][b]["prompt_logprobs"]
        assert entries[0] is None and len(entries) == len(prompt) + len(response)
        for j, token in enumerate(response):
            entry = entries[len(prompt) + j]
            assert next(iter(entry)) == str(token)  # the realised token first, as vLLM lists it
            top = logp[b, j].topk(2)
            assert len(entry) == 2 + (token not in top.indices.tolist())
            assert entry[str(token)]["rank"] == int((logp[b, j] > logp[b, j, token]).sum()) + 1
            assert entry[str(token)]["logprob"] == pytest.approx(logp[b, j, token].item(), abs=1e-5)
            assert [entry[str(i)]["rank"] for i in top.indices.tolist()] == [1, 2]


def test_tokenizer_probe_catches_another_model(in_thread_server, tiny, monkeypatch):
    server, _, tokenizer = in_thread_server
    monkeypatch.setenv("CTOPD_TEACHER_API_KEY", API_KEY)
    url = f"http://127.0.0.1:{server.server_port}/v1"
    ServedTeacher(TeacherServerConfig(url=url), tokenizer, vocab_size=TEACHER_VOCAB).check()
    student_tokenizer = load_tokenizer(str(tiny["student"]))
    with pytest.raises(ConfigError, match="tokenizes a probe text as"):
        ServedTeacher(TeacherServerConfig(url=url), student_tokenizer, vocab_size=300).check()
    with pytest.raises(ConfigError, match="teacher_server.model 'other' is not served"):
        ServedTeacher(
            TeacherServerConfig(url=url, model="other"), tokenizer, vocab_size=TEACHER_VOCAB
        ).check()


def test_config_section_and_flags():
    config = load_config(
        [
            "--student",
            "s",
            "--teacher",
            "t",
            "--teacher-url",
            "http://h:8000/v1",
            "--teacher-server.top-k",
            "-1",
            "--teacher-server.overlap",
            "false",
        ]
    )
    assert config.teacher_server.url == "http://h:8000/v1" and config.teacher_server.top_k == -1
    assert config.teacher_server.overlap is False
    with pytest.raises(ConfigError, match="teacher_server.url must start with http"):
        load_config(["--teacher-url", "h:8000"])
    with pytest.raises(ConfigError, match="teacher_server.top_k must be >= 0 or -1"):
        load_config(["--teacher-server.top-k", "-2"])
    with pytest.raises(ConfigError, match="teacher_server.retries must be >= 0"):
        load_config(["--teacher-server.retries", "-1"])


def test_a_url_without_v1_gets_the_hint(fake):
    server = fake(lambda body: (200, _vllm_reply()))
    root = server.url[: -len("/v1")]
    with pytest.raises(
        TeacherServerError,
        match=f"{root}/models answered 404: no route GET "
        "/models; teacher_server.url must be the base "
        "of the server's OpenAI API, which usually ends "
        f"in /v1: try --teacher-url {server.url}$",
    ):
        _client(root).check()
    _client(server.url).check()  # with /v1 the handshake passes
