"""Padded vocabularies (issue 24): output rows past the tokenizer's ids are never sampled, never
supervised and carry no teacher mass, in process and served. The models are tiny random ones on
real tokenizers (Qwen2 byte-level BPE, Llama-2 SentencePiece) whose padded rows hold nearly all
the probability (``tests/training/padded.py``), so a softmax that lets them in is far off.
Runs when ``CTOPD_TOKENIZERS`` points at ``../shared/tokenizers``."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from ctopd.core.pair import TokenizerPair
from ctopd.objectives import TeacherRequest, teacher_needs, teacher_outputs
from ctopd.objectives.teacher import TeacherLogprobRows
from ctopd.objectives.text_events import text_tables
from ctopd.training.config import ModelConfig, TeacherServerConfig, load_config
from ctopd.training.loop import train
from ctopd.training.rollout import count_token_ids, pad_responses, response_logits
from ctopd.training.teachers.local import LocalTeacher, TeacherServerError, load_teacher
from ctopd.training.teachers.served import ServedTeacher, teacher_output_rows
from ctopd.training.teachers.server import ScoringModel, TeacherHTTPServer
from tests.training.padded import load_real_tokenizer, padded_causal_lm, save_padded
from tests.training.servers import FakeServer
from tests.training.test_real_pair import LLAMA2_TEMPLATE
from tests.training.test_served_teacher import full_request
from tests.training.tiny import problems, write_jsonl

QWEN2_IDS = 151_936  # the shared Qwen2 tokenizer's ids (tokens up to [PAD151935])
TEACHER_EXTRA_ROWS = 400
STUDENT_EXTRA_ROWS = 128


@pytest.fixture(scope="module")
def qwen2(real_tokenizers_dir):
    tokenizer = load_real_tokenizer(real_tokenizers_dir / "qwen2")
    assert count_token_ids(tokenizer) == QWEN2_IDS
    return tokenizer


@pytest.fixture(scope="module")
def padded_teacher(qwen2):
    """A Qwen2-vocabulary teacher with 400 padded rows, and a short scored batch."""
    model = padded_causal_lm(qwen2, extra_rows=TEACHER_EXTRA_ROWS, seed=1)
    prompts = [qwen2("Sam has 3 apples")["input_ids"], qwen2("How many birds")["input_ids"]]
    responses = [
        qwen2(" and 4 more.", add_special_tokens=False)["input_ids"],
        qwen2(" now?", add_special_tokens=False)["input_ids"],
    ]
    return model, prompts, responses


def _real_logsoftmax(model, tokenizer, prompts, responses) -> torch.Tensor:
    """The teacher's distribution over its real ids, computed directly: ``[B, n, ids]``."""
    with torch.no_grad():
        logits = response_logits(
            model, prompts, responses, pad_id=tokenizer.pad_token_id, device="cpu"
        )
    # The rig: over every row, the real ids would hold almost nothing.
    assert torch.logsumexp(torch.log_softmax(logits.double(), -1)[..., :QWEN2_IDS], -1).max() < -15
    return torch.log_softmax(logits[..., :QWEN2_IDS].double(), -1)


# --- the loop ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def padded_pair(qwen2, real_tokenizers_dir, tmp_path_factory):
    """A padded Qwen2 student (+128 rows) and a padded Llama-2 teacher (+64 rows) on disk."""
    folder = tmp_path_factory.mktemp("padded")
    llama = load_real_tokenizer(real_tokenizers_dir / "llama-spm")
    template = folder / "llama2.jinja"
    template.write_text(LLAMA2_TEMPLATE)
    return {
        "student": save_padded(folder / "student", qwen2, extra_rows=STUDENT_EXTRA_ROWS),
        "teacher": save_padded(folder / "teacher", llama, extra_rows=64, seed=1),
        "template": template,
        "data": write_jsonl(folder / "prompts.jsonl", problems(4)),
    }


def _train_rows(out, *args) -> list[dict]:
    summary = train(
        load_config(
            [
                *args,
                "--output-dir",
                str(out),
                "--max-steps",
                "2",
                "--per-device-batch-size",
                "2",
                "--rollout.max-new-tokens",
                "8",
                "--rollout.temperature",
                "1.0",
                "--optim.lr",
                "1e-3",
                "--progress",
                "false",
            ]
        )
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and summary["steps"] == 2
    for row in rows:
        for key in ("loss", "kl", "teacher_logprob_mean", "grad_norm"):
            assert math.isfinite(row[key]), key
        assert row["response_tokens"] > 0 and 0.0 < row["coverage"] <= 1.0
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["simct", "dpca"])
def test_padded_student_and_teacher_train(padded_pair, tmp_path, objective):
    rows = _train_rows(
        tmp_path / "run",
        "--student",
        str(padded_pair["student"]),
        "--teacher",
        str(padded_pair["teacher"]),
        "--teacher-chat-template",
        str(padded_pair["template"]),
        "--data",
        str(padded_pair["data"]),
        "--objective",
        objective,
    )
    # Over its 32,000 real ids the random teacher is near uniform (log 32000 = 10.4); with its
    # 64 padded rows in the softmax its tokens would get about -40.
    assert all(row["teacher_logprob_mean"] > -13.0 for row in rows)


@pytest.mark.parametrize("objective", ["simct", "dpca"])
def test_padded_tiny_models_train(tiny, tmp_path, objective):
    """The same on the tiny tokenizers (320 and 240 ids), fast enough for every run."""
    folders = {
        side: save_padded(
            tmp_path / side, load_real_tokenizer(tiny[side]), extra_rows=extra, seed=seed
        )
        for side, extra, seed in (("student", 128, 2), ("teacher", 400, 1))
    }
    rows = _train_rows(
        tmp_path / "run",
        "--student",
        str(folders["student"]),
        "--teacher",
        str(folders["teacher"]),
        "--data",
        str(tiny["prompts"]),
        "--objective",
        objective,
    )
    assert all(row["teacher_logprob_mean"] > -math.log(320) - 3.0 for row in rows)


# --- the teacher in process -------------------------------------------------------------------


def test_local_teacher_scores_cover_the_real_ids_only(padded_teacher, qwen2, tmp_path):
    model, prompts, responses = padded_teacher
    expected = _real_logsoftmax(model, qwen2, prompts, responses)
    outputs = (
        LocalTeacher(model, pad_id=qwen2.pad_token_id, num_ids=QWEN2_IDS)
        .submit(prompts, responses, full_request(QWEN2_IDS))
        .result()
    )
    scores = outputs.full_logprobs
    assert scores.shape == (2, max(map(len, responses)), QWEN2_IDS)
    for b, response in enumerate(responses):  # the output layer's padded rows never computed
        torch.testing.assert_close(
            scores[b, : len(response)].double(), expected[b, : len(response)], rtol=0, atol=1e-5
        )

    # load_teacher gives an in-process teacher the tokenizer's id count.
    save_padded(tmp_path / "teacher", qwen2, extra_rows=TEACHER_EXTRA_ROWS)
    config = load_config(
        ["--student", str(tmp_path / "teacher"), "--teacher", str(tmp_path / "teacher")]
    )
    teacher = load_teacher(config, qwen2)
    assert isinstance(teacher, LocalTeacher) and teacher.num_ids == QWEN2_IDS


# --- served: our server, and a vLLM-like one --------------------------------------------------


@pytest.fixture(scope="module")
def padded_server(padded_teacher, qwen2):
    """``ctopd serve-teacher``'s server over the padded teacher, in a thread."""
    model = padded_teacher[0]
    server = TeacherHTTPServer(("127.0.0.1", 0), ScoringModel(model, qwen2, name="padded"))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_our_server_normalises_over_the_real_ids(padded_server, padded_teacher, qwen2):
    model, prompts, responses = padded_teacher
    expected = _real_logsoftmax(model, qwen2, prompts, responses)
    # The whole distribution at one position: every real id, no padded row, total mass 1.
    sequence = prompts[0] + responses[0][:1]
    reply = padded_server.scorer.completions(
        {"prompt": [sequence], "prompt_logprobs": -1, "return_token_ids": True}
    )
    assert reply["choices"][0]["token_ids"][0] < QWEN2_IDS  # the greedy next token is a real id
    entry = reply["choices"][0]["prompt_logprobs"][-1]
    ids = torch.tensor([int(k) for k in entry])
    values = torch.tensor([v["logprob"] for v in entry.values()], dtype=torch.float64)
    assert sorted(ids.tolist()) == list(range(QWEN2_IDS))
    assert torch.logsumexp(values, 0).item() == pytest.approx(0.0, abs=1e-4)
    torch.testing.assert_close(values, expected[0, 0, ids], rtol=0, atol=1e-4)

    # Through HTTP, top 5: the client's scores are the teacher's distribution over real ids.
    url = f"http://127.0.0.1:{padded_server.server_port}/v1"
    client = ServedTeacher(
        TeacherServerConfig(url=url, top_k=5, retries=0),
        qwen2,
        vocab_size=QWEN2_IDS,
        model_rows=QWEN2_IDS + TEACHER_EXTRA_ROWS,
    )
    dense = client.submit(prompts, responses, full_request(QWEN2_IDS)).result()
    dense = dense.full_logprobs.double()
    assert dense.shape == expected.shape
    for b, response in enumerate(responses):
        rows = dense[b, : len(response)]
        torch.testing.assert_close(
            torch.logsumexp(rows, -1),
            torch.zeros(len(response), dtype=torch.float64),
            rtol=0,
            atol=1e-5,
        )
        realised = torch.tensor(response)[:, None]
        top = expected[b, : len(response)].topk(5, -1).indices
        for picked in (realised, top):  # what the server returned is exact
            torch.testing.assert_close(
                rows.gather(-1, picked),
                expected[b, : len(response)].gather(-1, picked),
                rtol=0,
                atol=1e-5,
            )


def _vllm_like_reply(sequence, entries):
    choice = {
        "index": 0,
        "text": "x",
        "logprobs": None,
        "finish_reason": "length",
        "stop_reason": None,
        "prompt_logprobs": [None, *entries],
        "prompt_token_ids": sequence,
    }
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 0,
        "model": "fake",
        "choices": [choice],
    }


def test_client_drops_padded_rows_of_a_vllm_like_reply():
    """vLLM normalises over every output row and may rank a padded row in its top k."""
    rows_total = QWEN2_IDS + 128
    padded_id, sequence = QWEN2_IDS + 64, [5, 7, 9]

    def lp(value):
        return {"logprob": value, "rank": 1, "decoded_token": None}

    # Position 1 (predicts 7): the padded row on top (0.82), then 7 and 3. Position 2
    # (predicts 9): real ids only.
    entries = [
        {"7": lp(-2.5), str(padded_id): lp(-0.2), "3": lp(-3.0)},
        {"9": lp(-0.1), "4": lp(-2.6)},
    ]
    server = FakeServer(lambda body: (200, _vllm_like_reply(sequence, entries)))
    try:
        config = TeacherServerConfig(url=server.url, top_k=2, retries=0)
        client = ServedTeacher(config, None, vocab_size=QWEN2_IDS, model_rows=rows_total)
        request = full_request(QWEN2_IDS)
        dense = client.submit([sequence[:1]], [sequence[1:]], request).result()
        dense = dense.full_logprobs.double()
        assert dense.shape == (1, 2, QWEN2_IDS)
        torch.testing.assert_close(
            torch.logsumexp(dense[0], -1), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-6
        )
        # Conditioned on the real ids: the returned padded mass leaves, ratios stay.
        real = 1.0 - math.exp(-0.2)
        assert dense[0, 0, 7].item() == pytest.approx(-2.5 - math.log(real), abs=1e-5)
        assert (dense[0, 0, 7] - dense[0, 0, 3]).item() == pytest.approx(0.5, abs=1e-5)
        assert dense[0, 1, 9].item() == pytest.approx(-0.1, abs=1e-5)  # nothing padded: as sent

        # An id past the model's rows is another vocabulary, and without the model's row count
        # every id past the tokenizer's is.
        entries[0]["999999"] = lp(-9.0)
        with pytest.raises(
            TeacherServerError,
            match="outside the teacher model's 152064 output "
            "rows: the server runs a model with another",
        ):
            client.submit([sequence[:1]], [sequence[1:]], request).result()
        del entries[0]["999999"]
        strict = ServedTeacher(config, None, vocab_size=QWEN2_IDS)
        with pytest.raises(
            TeacherServerError,
            match=f"token id {padded_id}, outside the teacher tokenizer's {QWEN2_IDS} ids",
        ):
            strict.submit([sequence[:1]], [sequence[1:]], request).result()
    finally:
        server.close()


def test_served_teacher_reads_the_model_rows(padded_teacher, real_tokenizers_dir, tmp_path):
    padded_teacher[0].config.save_pretrained(tmp_path)  # config.json is all it reads
    rows = teacher_output_rows(ModelConfig(name_or_path=str(tmp_path)), QWEN2_IDS)
    assert rows == QWEN2_IDS + TEACHER_EXTRA_ROWS
    tokenizer_only = ModelConfig(name_or_path=str(real_tokenizers_dir / "qwen2"))
    assert teacher_output_rows(tokenizer_only, QWEN2_IDS) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "needs",
    [
        teacher_needs("simct"),
        teacher_needs("simct", space="paper"),
        teacher_needs("uld"),
        teacher_needs("dpca"),
        teacher_needs("simct") | {"class_logprobs", "topk_probs", "full_logprobs"},
    ],
    ids=["simct", "simct_paper", "uld", "dpca", "everything"],
)
def test_local_teacher_outputs_equal_the_dense_reference(tiny, needs, dtype):
    """The in-process teacher reduces its output layer a slice at a time from its final hidden
    states (padded rows never computed): the same outputs as ``teacher_outputs`` on the model's
    own dense logits, for every need set."""
    teacher_tokenizer = load_real_tokenizer(tiny["teacher"])
    student_tokenizer = load_real_tokenizer(tiny["student"])
    pair = TokenizerPair(teacher_tokenizer, student_tokenizer)
    num_ids = pair.teacher_table.vocab_size
    model = padded_causal_lm(teacher_tokenizer, extra_rows=400, seed=3).to(dtype)
    end = int(pair.student_table.end_ids[0])
    texts = ["Ann has 12 shells and finds 345 more.", "How many now? 357", "ok"]
    student = [student_tokenizer.encode(t, add_special_tokens=False) + [end] for t in texts]
    teacher = pair.teacher_ids_for_batch(student)
    prompts = [teacher_tokenizer("Solve:")["input_ids"], [5, 6, 7], [9]]
    request = TeacherRequest(
        needs,
        pair.shared_vocab,
        slice_size=3,
        top_k=4,
        alignments=pair.align_batch(teacher, student),
        student_ids=student,
        text_tables=text_tables(pair.teacher_table, pair.student_table, pair.shared_vocab),
    )
    local = LocalTeacher(model, pad_id=teacher_tokenizer.pad_token_id, num_ids=num_ids)
    got = local.submit(prompts, teacher, request).result()
    with torch.no_grad():
        logits = response_logits(
            model, prompts, teacher, pad_id=teacher_tokenizer.pad_token_id, device="cpu"
        )
    teacher_ids, _ = pad_responses(teacher, pad_id=-1)
    want = teacher_outputs(
        logits,  # all output rows: the reference drops the padded ones itself
        teacher_ids,
        pair.shared_vocab,
        needs,
        top_k=4,
        alignments=request.alignments,
        student_ids=student,
        text_tables=request.text_tables,
    )
    tolerance = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    valid = teacher_ids >= 0
    for field in ("token_logprobs", "class_logprobs", "topk_probs", "full_logprobs"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None) == (b is None), field
        if a is not None:
            torch.testing.assert_close(a[valid], b[valid], **tolerance)
    if "text_events" in needs:
        torch.testing.assert_close(got.text_events.scores, want.text_events.scores, **tolerance)
    # Nothing of the forward is kept: every field is small, no [B, n, rows] tensor.
    kept = [getattr(got, f) for f in ("token_logprobs", "class_logprobs", "topk_probs")]
    assert all(t is None or t.shape[-1] < model.config.vocab_size for t in kept)
    if "full_logprobs" in needs:  # lazy rows: hidden states and the model's own output matrix
        rows = got.full_logprobs
        assert isinstance(rows, TeacherLogprobRows)
        assert rows.shape == (*teacher_ids.shape, num_ids)
        assert rows.hidden.shape == (*teacher_ids.shape, model.config.hidden_size)
        assert rows.head.weight is model.get_output_embeddings().weight


def test_local_teacher_refuses_logits_that_are_not_its_output_layer(tiny):
    teacher_tokenizer = load_real_tokenizer(tiny["teacher"])
    model = padded_causal_lm(teacher_tokenizer, extra_rows=4, seed=3)
    model.config.final_logit_softcapping = 2.0  # the model does not cap: our logits would
    local = LocalTeacher(model, pad_id=0, num_ids=count_token_ids(teacher_tokenizer))
    request = TeacherRequest(frozenset({"token_logprobs"}), None)
    with pytest.raises(ValueError, match="not its output layer applied to its final hidden"):
        local.submit([[5, 6]], [[7, 8]], request)
