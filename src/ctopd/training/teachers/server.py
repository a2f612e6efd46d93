"""``ctopd serve-teacher``: the subset of vLLM's OpenAI-compatible API that a served teacher uses,
in front of a ``transformers`` model (CPU or GPU), for tests, development and small teachers.

Endpoints (replies shaped as vLLM shapes them; see ``ctopd.training.teachers.served``):

* ``POST /v1/completions`` — ``prompt``: token ids (one list or a list of lists) or text;
  ``prompt_logprobs``: ``K`` top log-probs per position plus the realised token's (``-1`` = the
  whole vocabulary; ``null`` = none); ``max_tokens`` 0 or 1 (default 1: the greedy next token is
  the completion's text); ``return_token_ids``. Streaming, ``n > 1``, ``echo`` and sampled-token
  ``logprobs`` are refused with 400 (this server scores, it does not generate).
* ``POST /tokenize`` — ``{"prompt": text, "add_special_tokens": bool}`` → ``{"tokens", "count",
  "max_model_len"}``.
* ``GET /v1/models``; ``GET /health`` (never needs the key).

Log-probabilities are over the tokenizer's ids only: output rows past the last id (a padded
embedding matrix, Qwen2.5-7B's 152,064 rows for 151,665 ids) are no token, so they are left out of
the log-softmax, never returned and never the greedy next token; ``prompt_logprobs=-1`` returns
every real id. (vLLM normalises over all rows; the client handles both.)

Batched and deterministic: the sequences of one request are scored in fixed chunks of
``batch_size``, in order, and one forward runs at a time; requests are never merged, so a request
sent twice gets the same numbers (what a retried training step relies on). Binds 127.0.0.1 by
default; with an API key every endpoint but ``/health`` answers 401 without
``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from ctopd.training.rollout import count_token_ids

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20
SLICE_POSITIONS = 1024  # positions log-softmaxed at once (memory)


class RequestError(ValueError):
    """A request this server refuses (HTTP 400), naming the parameter."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ScoringModel:
    """A causal LM that scores token sequences (the work behind the endpoints).

    Args:
        model: a causal LM (eval mode; put on its device before).
        tokenizer: its tokenizer (text prompts, ``/tokenize``, decoded tokens).
        name: the served model name.
        batch_size: sequences per forward pass.
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, *, name: str, batch_size: int = 8
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]  # output rows
        # The tokenizer's ids; rows from here on are padding, never scored.
        self.num_ids = min(count_token_ids(tokenizer), self.vocab_size)
        self.token_strings = tokenizer.convert_ids_to_tokens(list(range(self.num_ids)))
        self.max_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.pad_id = next(
            i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None
        )
        self.lock = threading.Lock()  # one forward at a time

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "ctopd",
                    "root": self.name,
                    "max_model_len": self.max_length,
                }
            ],
        }

    def tokenize(self, body: dict) -> dict:
        text = body.get("prompt")
        if not isinstance(text, str):
            raise RequestError("prompt must be a string", "prompt")
        ids = self.tokenizer(text, add_special_tokens=bool(body.get("add_special_tokens", True)))
        tokens = list(ids["input_ids"])
        return {
            "count": len(tokens),
            "max_model_len": self.max_length,
            "tokens": tokens,
            "token_strs": None,
        }

    def completions(self, body: dict) -> dict:
        """A ``/v1/completions`` reply for ``body`` (see the module docstring)."""
        sequences, top_k, max_tokens = self._read_completion_request(body)
        prompt_logprobs, next_ids = self.score(sequences, top_k)
        with_ids = bool(body.get("return_token_ids"))
        choices = []
        for index, (sequence, entries, next_id) in enumerate(
            zip(sequences, prompt_logprobs, next_ids)
        ):
            generated = [next_id] if max_tokens else []
            choices.append(
                {
                    "index": index,
                    "text": self.tokenizer.decode(generated),
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                    "token_ids": generated if with_ids else None,
                    "prompt_logprobs": entries if top_k is not None else None,
                    "prompt_token_ids": sequence if with_ids else None,
                }
            )
        prompt_tokens = sum(len(s) for s in sequences)
        completion_tokens = len(sequences) if max_tokens else 0
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _read_completion_request(self, body: dict) -> tuple[list[list[int]], int | None, int]:
        model = body.get("model")
        if model is not None and model != self.name:
            raise RequestError(
                f"model {model!r} is not served here; this server serves {self.name!r}", "model"
            )
        for name, allowed in (
            ("stream", (None, False)),
            ("echo", (None, False)),
            ("n", (None, 1)),
            ("logprobs", (None,)),
        ):
            if body.get(name) not in allowed:
                raise RequestError(
                    f"{name}={body.get(name)!r} is not supported by ctopd "
                    "serve-teacher (it scores prompts)",
                    name,
                )
        max_tokens = body.get("max_tokens", 1)
        max_tokens = 1 if max_tokens is None else max_tokens
        if max_tokens not in (0, 1) or isinstance(max_tokens, bool):
            raise RequestError(
                "max_tokens must be 0 or 1 (ctopd serve-teacher scores prompts)", "max_tokens"
            )
        top_k = body.get("prompt_logprobs")
        if top_k is not None and (
            not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < -1
        ):
            raise RequestError("prompt_logprobs must be a positive value or -1", "prompt_logprobs")
        sequences = self._read_prompts(body.get("prompt"))
        for sequence in sequences:
            if self.max_length and len(sequence) + max_tokens > self.max_length:
                raise RequestError(
                    f"This model's maximum context length is {self.max_length} "
                    f"tokens; a prompt has {len(sequence)}",
                    "prompt",
                )
        return sequences, top_k, max_tokens

    def _read_prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise RequestError("prompt must be token ids, a list of them, or text", "prompt")
        sequences = []
        for item in prompt:
            if isinstance(item, str):
                item = list(self.tokenizer(item)["input_ids"])
            if (
                not isinstance(item, list)
                or not item
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in item)
            ):
                raise RequestError(
                    "each prompt must be a non-empty list of token ids or text", "prompt"
                )
            if min(item) < 0 or max(item) >= self.num_ids:
                raise RequestError(f"token id out of range [0, {self.num_ids})", "prompt")
            sequences.append(item)
        return sequences

    @torch.no_grad()
    def score(self, sequences: list[list[int]], top_k: int | None) -> tuple[list, list[int]]:
        """Prompt log-probs (vLLM's layout: ``None`` first, then ``{id: {"logprob", "rank",
        "decoded_token"}}`` with the realised token first and the top ``top_k`` after) and the
        greedy next id, per sequence; all over the tokenizer's ids only."""
        entries: list = []
        next_ids: list[int] = []
        for lo in range(0, len(sequences), self.batch_size):
            chunk = sequences[lo : lo + self.batch_size]
            with self.lock:
                logits = self._forward(chunk)[..., : self.num_ids]  # padded rows: no token
                for row, sequence in enumerate(chunk):
                    next_ids.append(int(logits[row, len(sequence) - 1].argmax()))
                    entries.append(self._row_entries(logits[row], sequence, top_k))
                del logits
        return entries, next_ids

    def _forward(self, chunk: list[list[int]]) -> torch.Tensor:
        """Right-padded batch forward: ``[b, L, rows]`` logits (every output row)."""
        width = max(len(s) for s in chunk)
        input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, sequence in enumerate(chunk):
            input_ids[row, : len(sequence)] = torch.as_tensor(sequence)
            mask[row, : len(sequence)] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=position_ids.to(self.device),
            use_cache=False,
        ).logits

    def _row_entries(self, logits: torch.Tensor, sequence: list[int], top_k: int | None) -> list:
        if top_k is None:
            return []
        out: list = [None]
        k = self.num_ids if top_k < 0 else min(top_k, self.num_ids)
        targets = torch.as_tensor(sequence[1:], device=logits.device)
        for lo in range(0, len(sequence) - 1, SLICE_POSITIONS):
            hi = min(lo + SLICE_POSITIONS, len(sequence) - 1)
            logp = torch.log_softmax(logits[lo:hi].float(), dim=-1)
            realised = logp.gather(-1, targets[lo:hi, None])
            ranks = ((logp > realised).sum(-1) + 1).tolist()
            values, ids = logp.topk(k, dim=-1)
            for token, logprob, rank, top_values, top_ids in zip(
                targets[lo:hi].tolist(),
                realised[:, 0].tolist(),
                ranks,
                values.tolist(),
                ids.tolist(),
            ):
                entry = {str(token): self._logprob(token, logprob, rank)}
                for position, (top_id, top_value) in enumerate(zip(top_ids, top_values)):
                    entry[str(top_id)] = self._logprob(top_id, top_value, position + 1)
                out.append(entry)
        return out

    def _logprob(self, token: int, logprob: float, rank: int) -> dict:
        return {
            "logprob": max(logprob, -9999.0),
            "rank": rank,
            "decoded_token": self.token_strings[token],
        }


def _dumps(payload: Any) -> bytes:
    """JSON bytes, with ``orjson`` when it is installed (several times faster on megabytes of
    log-probs)."""
    try:
        import orjson
    except ImportError:
        return json.dumps(payload).encode("utf-8")
    return orjson.dumps(payload)


class TeacherHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server holding the :class:`ScoringModel` and the API key."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], scorer: ScoringModel, *, api_key: str | None = None
    ) -> None:
        super().__init__(address, _Handler)
        self.scorer = scorer
        self.api_key = api_key or None


class _Handler(BaseHTTPRequestHandler):
    server: TeacherHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "ctopd-serve-teacher"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/health":
            return self._send(HTTPStatus.OK, None)
        if not self._authorized():
            return None
        if self.path == "/v1/models":
            return self._send(HTTPStatus.OK, self.server.scorer.models())
        return self._error(HTTPStatus.NOT_FOUND, f"no route GET {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():
            return None
        routes = {
            "/v1/completions": self.server.scorer.completions,
            "/tokenize": self.server.scorer.tokenize,
        }
        if self.path not in routes:
            return self._error(HTTPStatus.NOT_FOUND, f"no route POST {self.path}")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
        try:
            body = json.loads(self.rfile.read(length) or b"null")
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            started = time.perf_counter()
            reply = routes[self.path](body)
        except (RequestError, ValueError) as err:
            return self._error(HTTPStatus.BAD_REQUEST, str(err), getattr(err, "param", None))
        except Exception as err:  # the server stays up; the client may retry a 500
            logger.exception("ctopd serve-teacher: %s failed", self.path)
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(err).__name__}: {err}")
        logger.info(
            "%s %s: %.3f s", self.path, self.address_string(), time.perf_counter() - started
        )
        return self._send(HTTPStatus.OK, reply)

    def _authorized(self) -> bool:
        key = self.server.api_key
        given = self.headers.get("Authorization", "")
        if key is None or hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return True
        self._error(HTTPStatus.UNAUTHORIZED, "Unauthorized: a valid API key is required")
        return False

    def _error(self, status: HTTPStatus, message: str, param: str | None = None) -> None:
        kind = "BadRequestError" if status == HTTPStatus.BAD_REQUEST else status.phrase
        self._send(
            status,
            {"error": {"message": message, "type": kind, "param": param, "code": int(status)}},
        )

    def _send(self, status: HTTPStatus, payload: Any) -> None:
        data = b"" if payload is None else _dumps(payload)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        logger.debug("%s - %s", self.address_string(), format % args)
