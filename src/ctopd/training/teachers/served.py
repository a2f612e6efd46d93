"""A served teacher: the client of an OpenAI-compatible completions endpoint as vLLM serves it.

**Protocol** (vLLM's ``/v1/completions`` with its ``prompt_logprobs`` extension; ``ctopd
serve-teacher`` answers the same subset). Each sequence goes as token ids, the teacher's own
chat-template prompt followed by the teacher's tokenisation of the response::

    POST {url}/completions
    {"prompt": [[ids of sequence 1], [ids of sequence 2], ...], "max_tokens": 1,
     "temperature": 1.0, "prompt_logprobs": K, "return_token_ids": true, ["model": NAME]}

vLLM answers one choice per prompt, in order (``index``). ``choices[i].prompt_logprobs`` has one
entry per token of sequence ``i``: entry 0 is ``null`` (the first token has no context); entry
``p`` maps token ids (JSON object keys, so strings) to ``{"logprob", "rank", "decoded_token"}`` for
the ``K`` most likely next tokens given tokens ``< p`` *plus the realised token* ``p`` (one entry
more, ranked after the top K, when it is not among them). ``-inf`` arrives clamped to ``-9999``.
``K = -1`` asks for the whole vocabulary (newer vLLM; the server needs ``--max-logprobs`` at least
``K``, or ``-1``). Response token ``j`` of a sequence with a ``P``-token prompt is read from entry
``P + j``. When the reply carries ``prompt_token_ids`` they must be the ids sent.

**What we keep.** At each response position the realised token's log-prob (exact: all ``dpca``
needs) and the returned top-K log-probs; the rest of the distribution follows the **remainder
rule**: ``R = 1 - Σ_returned p`` is spread **evenly over the ids not returned**, each getting
``log(R / (V_T - #returned))`` but never more than the smallest returned top-K log-prob (no
unreturned id can be likelier than that). Among the distributions that agree with what the server
returned this is the one of largest entropy. ``R`` is floored at ``1e-12`` so no id gets ``-inf``;
it is only known to about ``1e-7`` (the server's float32 normalisation), so a tail below that is a
guess, and the cap is what keeps it sane when few ids are left out. With ``K = V_T`` nothing is
left to spread and the distribution is the teacher's log-softmax. ``dpca`` reads only realised
tokens, which are always returned: it is exact for every ``K`` (``K = 0`` sends least). The
objectives' measured error for several ``K`` is in ``benchmarks/served_teacher.py`` and the
README.

The reply is never re-densified: the client parses it into flat arrays (numpy, vectorised), and
the fields the objective needs are sums over the returned entries plus ``count × share`` for the
ids not returned (:class:`~ctopd.objectives.sparse_rows.SparseRows`, reduced by
:func:`~ctopd.objectives.teacher.reduce_teacher`), equal to what the dense rebuild
(:func:`dense_logprobs`, kept as the reference) gives. ``opd``'s ``full_logprobs`` alone is
dense, by definition.

**Padded output rows.** ``V_T`` is the teacher *tokenizer's* id count. A checkpoint often has more
output rows (Qwen2.5-7B: 152,064 rows for 151,665 ids), and a server such as vLLM normalises over
all of them and may return a row past the last id among its top K. Such an entry is dropped from
the scores, and the distribution is conditioned on the real ids: every real id's probability is
divided by the real ids' total. The mass the server gave the *returned* padded rows is therefore
known and removed exactly; the *unreturned* padded rows are taken to hold nothing (the remainder
is spread over the unreturned real ids only): a padded row is never a training target, so it sits
at the bottom of the tail, far below the average unreturned id that an even spread over all rows
would give it. With ``K = -1`` every row is returned and the scores are exactly the teacher's
log-softmax over its real ids; ``ctopd serve-teacher`` normalises over the real ids itself and
never returns a padded row. An id at or beyond the model's rows (``model_rows``, read from the
model's config) belongs to another vocabulary and is refused.

**Faults.** At most ``max_concurrency`` requests are in flight (``sequences_per_request`` sequences
each, split in a fixed order, so a retried request is the same request). Connection errors,
timeouts, 408, 429 and 5xx are retried ``retries`` times with a doubling back-off; anything else,
or a reply that does not match the request, raises :class:`TeacherServerError` naming the field.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ctopd.objectives.sparse_rows import SparseRows
from ctopd.objectives.teacher import TeacherOutputs, TeacherRequest, reduce_teacher
from ctopd.training.config import ConfigError, ModelConfig, TeacherServerConfig
from ctopd.training.rollout import pad_responses
from ctopd.training.teachers.local import TeacherServerError

logger = logging.getLogger(__name__)

# Retried: the server is busy, restarting or gone for a moment.
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_BACKOFF_SECONDS = 60.0
# The least remainder mass spread over the unreturned ids (no id gets -inf).
REMAINDER_FLOOR = 1e-12
# vLLM writes -inf log-probs as -9999; anything below is read as that.
LOGPROB_FLOOR = -9999.0
# Returned probabilities may add up to a little over 1 in float32.
MASS_TOLERANCE = 1e-3
# Text the server's tokenizer must encode exactly as ours does (digits, spaces, newlines, tabs,
# punctuation, non-ASCII).
PROBE_TEXT = "Sam has 12 apples and gets 345 more.\n\tHow many now? 357 = 12 + 345; ça va — 好"


class ServedOutputs:
    """A teacher's outputs on their way from the server: one background request per chunk of
    sequences, reduced to ``request.needs`` when :meth:`result` is called."""

    def __init__(
        self,
        chunks: list[tuple[list[int], Future]],
        teacher_ids: Tensor,
        request: TeacherRequest,
        device: torch.device,
    ) -> None:
        self.chunks, self.teacher_ids, self.request, self.device = (
            chunks,
            teacher_ids,
            request,
            device,
        )

    def done(self) -> bool:
        return all(future.done() for _, future in self.chunks)

    def result(self) -> TeacherOutputs:
        """The :class:`~ctopd.objectives.teacher.TeacherOutputs` ``request`` asked for, from
        the sparse replies (the module docstring's remainder rule)."""
        batch, width = self.teacher_ids.shape
        rows, ids, logprobs = [], [], []
        caps = np.zeros(batch * width, dtype=np.float64)
        for rows_of_chunk, future in self.chunks:
            for b, (position_ids, position_logprobs, counts, position_caps) in zip(
                rows_of_chunk, future.result()
            ):
                rows.append(b * width + np.repeat(np.arange(counts.size), counts))
                ids.append(position_ids)
                logprobs.append(position_logprobs)
                caps[b * width : b * width + counts.size] = position_caps
        flat = [
            torch.as_tensor(
                np.concatenate(parts) if parts else np.zeros(0, dtype), device=self.device
            )
            for parts, dtype in ((rows, np.int64), (ids, np.int64), (logprobs, np.float64))
        ]
        sparse = sparse_logprobs(
            *flat,
            rows_total=batch * width,
            vocab_size=self.request.vocab_size,
            caps=torch.as_tensor(caps, device=self.device),
        )
        return reduce_teacher(
            lambda b, p: sparse.select(b * width + p), self.teacher_ids, self.request
        )


def sparse_logprobs(
    rows: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    *,
    rows_total: int,
    vocab_size: int,
    caps: Tensor | None = None,
) -> SparseRows:
    """The distributions :func:`dense_logprobs` rebuilds, kept sparse: the returned real ids
    with their renormalised log-probs and one share for every id not returned (arguments as
    :func:`dense_logprobs`)."""
    fill, log_total, returned = _remainder_rule(rows, ids, logprobs, rows_total, vocab_size, caps)
    real = ids < vocab_size
    kept = rows[real]
    return SparseRows(
        row=kept,
        ids=ids[real],
        logprobs=logprobs[real] - log_total[kept],
        fill=fill - log_total,
        unlisted=vocab_size - returned,
        vocab_size=vocab_size,
    )


def _remainder_rule(rows, ids, logprobs, rows_total, vocab_size, caps):
    """Per row: the log-share of an unreturned id, the log of the real ids' total (before
    renormalising), and the count of returned real ids (float64 ``[rows_total]`` each)."""
    device = rows.device
    probs = logprobs.exp()
    real = ids < vocab_size
    mass = torch.zeros(rows_total, dtype=torch.float64, device=device)
    mass.index_add_(0, rows, probs)  # padded entries included: the server's normalisation
    real_mass = torch.zeros(rows_total, dtype=torch.float64, device=device)
    real_mass.index_add_(0, rows[real], probs[real])
    returned = torch.bincount(rows[real], minlength=rows_total).to(torch.float64)
    rest = vocab_size - returned
    remainder = (1.0 - mass).clamp(min=REMAINDER_FLOOR)
    fill = remainder.log() - rest.clamp(min=1.0).log()
    fill = fill if caps is None else torch.minimum(fill, caps)
    log_total = (real_mass + rest * fill.exp()).log()  # the real ids' share of the row
    return fill, log_total, returned


def dense_logprobs(
    rows: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    *,
    rows_total: int,
    vocab_size: int,
    caps: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Dense log-probabilities over the real ids from sparse ``(row, id, log-prob)`` entries:
    the reference the sparse path (:func:`sparse_logprobs`) is tested against.

    Each row's returned ids keep their log-probs; the real ids not returned share the remainder
    ``max(1 - Σ exp(returned), 1e-12)`` evenly, each at most its row's cap (the smallest top-k
    log-prob: no unreturned id can be likelier). Entries with ``id >= vocab_size`` are padded
    output rows: their mass counts in the remainder (the server normalised over them) but they
    get no column, and unreturned padded rows get nothing (see the module docstring). Every row
    is then divided by its total over the real ids, so it is a distribution over them: without
    padded entries and without a binding cap or floor that total is 1 and nothing changes. A
    row with no entries is uniform.

    Args:
        rows: int64 ``[E]`` row of each entry (``0 <= row < rows_total``).
        ids: int64 ``[E]`` token id of each entry (unique within a row; ``>= vocab_size`` for a
            padded output row).
        logprobs: float64 ``[E]`` log-probabilities as the server normalised them.
        rows_total: number of rows.
        vocab_size: ``V_T``, the tokenizer's id count.
        caps: float64 ``[rows_total]`` largest log-prob of an unreturned id per row (``0``: no
            cap), or None.
        dtype: of the result.

    Returns:
        ``[rows_total, vocab_size]`` (float32 by default) on ``rows``' device; each row's
        log-sum-exp is 0.
    """
    fill, log_total, _ = _remainder_rule(rows, ids, logprobs, rows_total, vocab_size, caps)
    real = ids < vocab_size
    dense = (fill - log_total).to(dtype)[:, None].expand(rows_total, vocab_size).clone()
    kept = rows[real]
    dense[kept, ids[real]] = (logprobs[real] - log_total[kept]).to(dtype)
    return dense


def parse_prompt_logprobs(
    choice: Any,
    sequence: Sequence[int],
    prompt_length: int,
    *,
    where: str,
    vocab_size: int,
    top_k: int,
    model_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The response positions of one choice, parsed with numpy: flat ``(ids, log-probs)``
    (int64 / float64 ``[E]``), entries per position (int64 ``[n]``), and per position the
    smallest top-k log-prob (float64 ``[n]``) (``0`` when no top-k was asked for), which
    caps the ids not returned. Entries of padded output rows (``vocab_size <= id <
    model_rows``) are kept: :func:`dense_logprobs` removes their mass.

    Args:
        choice: ``choices[i]`` of the reply (a JSON object).
        sequence: the ids sent (prompt + response).
        prompt_length: ``P``; response token ``j`` is read from ``prompt_logprobs[P + j]``.
        where: how the error messages name the choice, e.g. ``choices[3]``.
        vocab_size: ``V_T``, the tokenizer's id count.
        top_k: the ``prompt_logprobs`` asked for (``-1`` = all).
        model_rows: the model's output rows (``>= vocab_size``); ids at or above it belong to
            another vocabulary. ``None``: ``vocab_size`` (no padded rows).

    Raises:
        TeacherServerError: naming the field that does not match the request.
    """
    if not isinstance(choice, dict):
        raise TeacherServerError(f"reply field {where} is not an object")
    sent = choice.get("prompt_token_ids")
    if sent is not None and list(sent) != list(sequence):
        raise TeacherServerError(
            f"reply field {where}.prompt_token_ids differs from the {len(sequence)} ids sent"
        )
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list):
        raise TeacherServerError(
            f"reply field {where}.prompt_logprobs is missing: the server returned no prompt "
            "log-probabilities (it must support vLLM's prompt_logprobs extension)"
        )
    if len(entries) != len(sequence):
        raise TeacherServerError(
            f"reply field {where}.prompt_logprobs has {len(entries)} "
            f"positions for a {len(sequence)}-token sequence"
        )
    model_rows = max(model_rows or 0, vocab_size)
    # A server normalising over every row ranks padded rows too; ours returns real ids only.
    top_count = model_rows if top_k < 0 else min(top_k, model_rows)
    least = max(1, min(top_count, vocab_size))
    positions = entries[prompt_length:]
    realised = np.asarray(sequence[prompt_length:], dtype=np.int64)
    for offset, entry in enumerate(positions):
        if not isinstance(entry, dict):
            raise TeacherServerError(
                f"reply field {where}.prompt_logprobs[{prompt_length + offset}] is "
                f"{json.dumps(entry)[:40]}, not the log-probs of a response position"
            )
    counts = np.fromiter((len(e) for e in positions), dtype=np.int64, count=len(positions))
    short = np.flatnonzero(counts < least)
    if short.size:
        raise TeacherServerError(
            f"reply field {where}.prompt_logprobs[{prompt_length + short[0]}] has "
            f"{counts[short[0]]} log-probs; asked for the top {least}"
        )
    for offset, (entry, token) in enumerate(zip(positions, realised.tolist())):
        if str(token) not in entry:
            raise TeacherServerError(
                f"reply field {where}.prompt_logprobs[{prompt_length + offset}] has no entry "
                f"for the realised token {token}"
            )
    keys = [key for entry in positions for key in entry]
    values = [
        value.get("logprob") if isinstance(value, dict) else value
        for entry in positions
        for value in entry.values()
    ]
    starts = np.cumsum(counts) - counts
    position_of = np.repeat(np.arange(counts.size), counts)
    ids, logprobs = _entries(keys, values, positions, position_of, where, prompt_length)
    bad = np.flatnonzero((ids < 0) | (ids >= model_rows))
    if bad.size:
        limit = (
            f"the teacher tokenizer's {vocab_size} ids"
            if model_rows == vocab_size
            else f"the teacher model's {model_rows} output rows"
        )
        field = f"{where}.prompt_logprobs[{prompt_length + position_of[bad[0]]}]"
        raise TeacherServerError(
            f"reply field {field} has token id {ids[bad[0]]}, outside {limit}: "
            "the server runs a model with another vocabulary"
        )
    bad = np.flatnonzero(np.isnan(logprobs) | (logprobs > MASS_TOLERANCE))
    if bad.size:
        field = f"{where}.prompt_logprobs[{prompt_length + position_of[bad[0]]}]"
        raise TeacherServerError(
            f"reply field {field}[{keys[bad[0]]!r}].logprob is {logprobs[bad[0]]}, not a "
            "log-probability"
        )
    logprobs = np.maximum(logprobs, LOGPROB_FLOOR)
    if counts.size:
        mass = np.add.reduceat(np.exp(logprobs), starts)
        over = np.flatnonzero(mass > 1.0 + MASS_TOLERANCE)
        if over.size:
            raise TeacherServerError(
                f"reply field {where}.prompt_logprobs[{prompt_length + over[0]}]: the returned "
                f"probabilities add up to {mass[over[0]]:.4f} > 1"
            )
    caps = np.zeros(counts.size, dtype=np.float64)
    if top_count and counts.size:
        # With one entry more than the top k, the extra one is the realised token, ranked below
        # them: it does not bound the ids that were not returned.
        extra = (ids == realised[position_of]) & (counts > top_count)[position_of]
        caps = np.minimum(np.minimum.reduceat(np.where(extra, 0.0, logprobs), starts), 0.0)
    return ids, logprobs, counts, caps


def _entries(keys, values, positions, position_of, where, prompt_length):
    """int64 ids and float64 log-probs of the flat entries; a bad one is named."""
    try:
        ids = np.asarray(keys).astype(np.int64) if keys else np.zeros(0, dtype=np.int64)
        numbers = all(type(v) in (float, int) for v in values)
    except ValueError:
        numbers = False
        ids = None
    if ids is not None and numbers:
        return ids, np.asarray(values, dtype=np.float64)
    # Slow path, only to name the field.
    for index, (key, value) in enumerate(zip(keys, values)):
        field = f"{where}.prompt_logprobs[{prompt_length + position_of[index]}]"
        try:
            int(key)
        except ValueError:
            raise TeacherServerError(
                f"reply field {field} has key {key!r}, not a token id"
            ) from None
        if type(value) not in (float, int):
            raw = positions[position_of[index]][key]
            raise TeacherServerError(
                f"reply field {field}[{key!r}].logprob is missing or not a "
                f"number: {json.dumps(raw)[:60]}"
            )
    raise AssertionError("unreachable")


class ServedTeacher:
    """The teacher behind ``config.url`` (see the module docstring).

    Args:
        config: the ``teacher_server`` section.
        tokenizer: the teacher's tokenizer (checked against the server's in :meth:`check`).
        vocab_size: ``V_T``, the width of the scores: the tokenizer's id count.
        model_rows: the served model's output rows (:func:`teacher_output_rows`); returned ids
            in ``[vocab_size, model_rows)`` are padded rows and dropped, ids beyond refused.
            ``None``: no padded rows (every id ``>= vocab_size`` is refused).
    """

    def __init__(
        self,
        config: TeacherServerConfig,
        tokenizer: Any,
        *,
        vocab_size: int,
        model_rows: int | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.model_rows = max(model_rows or 0, vocab_size)
        self.device = torch.device("cpu")
        self.url = config.url.rstrip("/")
        self.root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        self.api_key = os.environ.get(config.api_key_env) or None
        self.slots = threading.BoundedSemaphore(config.max_concurrency)
        self.retried = 0  # requests sent again after a failure (all calls together)
        # Direct connections: a proxy from the environment has no business between a trainer
        # and its teacher.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def to(self, device: torch.device | str) -> ServedTeacher:
        self.device = torch.device(device)
        return self

    def submit(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        request: TeacherRequest,
    ) -> ServedOutputs:
        """Send the sequences; with ``config.overlap`` off, return once the replies are in.

        When ``request.needs`` holds only ``token_logprobs`` (``dpca``) no top-k is asked for
        (``prompt_logprobs=0``: the realised tokens' log-probs alone), whatever
        ``config.top_k`` says.

        Raises:
            TeacherServerError: an empty prompt.
            ValueError: a request for another teacher vocabulary.
        """
        if any(len(p) == 0 for p in prompt_ids):
            raise TeacherServerError(
                "a teacher prompt is empty: its first response token would "
                "have no prediction (prompt_logprobs[0] is null)"
            )
        if request.vocab_size != self.vocab_size:
            raise ValueError(
                f"the request's shared vocabulary has {request.vocab_size} teacher ids but this "
                f"teacher's tokenizer {self.vocab_size}"
            )
        scored = [b for b, r in enumerate(response_ids) if len(r)]
        top_k = 0 if request.needs <= {"token_logprobs"} else self.config.top_k
        step = self.config.sequences_per_request
        chunks = []
        for lo in range(0, len(scored), step):
            rows = scored[lo : lo + step]
            sequences = [list(prompt_ids[b]) + list(response_ids[b]) for b in rows]
            lengths = [len(prompt_ids[b]) for b in rows]
            chunks.append((rows, _in_background(self._score, sequences, lengths, top_k)))
        teacher_ids, _ = pad_responses(response_ids, pad_id=-1, device=self.device)
        pending = ServedOutputs(chunks, teacher_ids, request, self.device)
        if not self.config.overlap:
            wait_futures([future for _, future in chunks])
        return pending

    def _score(self, sequences: list[list[int]], prompt_lengths: list[int], top_k: int) -> list:
        """One request: per sequence, ``(ids, log-probs, entries per position)``."""
        body: dict[str, Any] = {
            "prompt": sequences,
            "max_tokens": 1,
            "temperature": 1.0,
            "prompt_logprobs": top_k,
            "return_token_ids": True,
        }
        if self.config.model:
            body["model"] = self.config.model
        reply = self._request(f"{self.url}/completions", body)
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or len(choices) != len(sequences):
            count = len(choices) if isinstance(choices, list) else "no"
            raise TeacherServerError(
                f"reply field choices has {count} entries for {len(sequences)} prompts"
            )
        if all(isinstance(c, dict) and isinstance(c.get("index"), int) for c in choices):
            choices = sorted(choices, key=lambda c: c["index"])
            if [c["index"] for c in choices] != list(range(len(sequences))):
                raise TeacherServerError("reply field choices[].index is not 0..N-1")
        return [
            parse_prompt_logprobs(
                choice,
                sequence,
                length,
                where=f"choices[{i}]",
                vocab_size=self.vocab_size,
                top_k=top_k,
                model_rows=self.model_rows,
            )
            for i, (choice, sequence, length) in enumerate(zip(choices, sequences, prompt_lengths))
        ]

    def check(self) -> None:
        """Reach the server (within the retry budget), find the model, and check that the
        server's tokenizer encodes a probe text as ours does (skipped, with a warning, where the
        server has no ``/tokenize``).

        Raises:
            TeacherServerError: unreachable, or an HTTP error.
            ConfigError: the model name is not served, or the server's tokenizer differs.
        """
        try:
            reply = self._request(f"{self.url}/models", None)
        except TeacherServerError as err:
            if "answered 404" in str(err) and not self.url.endswith("/v1"):
                raise TeacherServerError(
                    f"{err}; teacher_server.url must be the base of the server's OpenAI API, "
                    f"which usually ends in /v1: try --teacher-url {self.url}/v1"
                ) from None
            raise
        served = [m.get("id") for m in reply.get("data", []) if isinstance(m, dict)]
        if self.config.model and self.config.model not in served:
            raise ConfigError(
                f"teacher_server.model {self.config.model!r} is not served at "
                f"{self.url}; it serves {served}"
            )
        body: dict[str, Any] = {"prompt": PROBE_TEXT, "add_special_tokens": False}
        if self.config.model:
            body["model"] = self.config.model
        try:
            tokens = self._request(f"{self.root}/tokenize", body).get("tokens")
        except TeacherServerError as err:
            if "answered 404" not in str(err):
                raise
            logger.warning(
                "teacher server %s has no /tokenize; its tokenizer is not checked "
                "against the teacher's",
                self.root,
            )
            return
        ours = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        if tokens != ours:
            raise ConfigError(
                f"the server at {self.url} tokenizes a probe text as {tokens} but the teacher "
                f"tokenizer ({self.tokenizer.name_or_path}) as {ours}: it serves another model, "
                "or --teacher names another tokenizer"
            )

    def _request(self, url: str, body: dict | None) -> Any:
        """GET (``body`` None) or POST JSON; retries as the module docstring says."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        retries, waited = self.config.retries, 0.0
        for attempt in range(retries + 1):
            try:
                with self.slots:
                    request = urllib.request.Request(url, data=data, headers=headers)
                    with self.opener.open(request, timeout=self.config.timeout_seconds) as reply:
                        payload = reply.read()
                break
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                if err.code not in RETRY_STATUS:
                    hint = (
                        " (set the key in $" + self.config.api_key_env + ")"
                        if (err.code == 401)
                        else ""
                    )
                    raise TeacherServerError(
                        f"{url} answered {err.code}: {message}{hint}"
                    ) from None
                reason = f"HTTP {err.code} {message}"
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                reason = _reason(err)
            if attempt == retries:
                raise TeacherServerError(
                    f"{url} unreachable after {retries} retries over {waited:.1f} s: {reason}"
                ) from None
            wait = min(self.config.backoff_seconds * 2**attempt, MAX_BACKOFF_SECONDS)
            logger.warning(
                "teacher server %s: %s; retry %d/%d in %.2f s",
                url,
                reason,
                attempt + 1,
                retries,
                wait,
            )
            self.retried += 1
            waited += wait
            time.sleep(wait)
        return read_json(payload, url)


def read_json(payload: bytes, url: str) -> Any:
    """Parse a reply, with ``orjson`` when it is installed (replies of top-k log-probs run to
    megabytes; it reads them 1.5-3x faster). ``json`` reads what orjson refuses (``NaN``), so
    the checks can name the field."""
    try:
        import orjson

        return orjson.loads(payload)
    except ImportError:
        pass
    except ValueError:  # orjson.JSONDecodeError
        pass
    try:
        return json.loads(payload)
    except ValueError:
        raise TeacherServerError(f"{url} sent a reply that is not JSON: {payload[:80]!r}") from None


def teacher_output_rows(config: ModelConfig, num_ids: int) -> int | None:
    """The served model's output rows as its config's ``vocab_size`` says (often more than the
    tokenizer's ``num_ids``: padded rows), at least ``num_ids``; ``None`` when there is no
    readable config beside the tokenizer."""
    from transformers import AutoConfig

    source, gguf_file = config.location()
    options = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model_config = AutoConfig.from_pretrained(
            source, revision=config.revision, trust_remote_code=config.trust_remote_code, **options
        )
        text_config = getattr(model_config, "get_text_config", lambda: model_config)()
        rows = int(getattr(text_config, "vocab_size", 0) or 0)
    except (OSError, ValueError, TypeError):
        return None
    return max(num_ids, rows) if rows else None


def _in_background(fn: Callable, *args: Any) -> Future:
    """Run ``fn(*args)`` on a daemon thread (a dead server must not keep the process alive at
    exit); the future holds its result or exception."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # handed to whoever waits on the future
            future.set_exception(err)

    threading.Thread(target=run, name="ctopd-teacher-request", daemon=True).start()
    return future


def _error_message(err: urllib.error.HTTPError) -> str:
    """The message of an OpenAI / vLLM error body (``{"error": {"message": ...}}`` or
    ``{"message": ...}``), else the body's start."""
    try:
        body = err.read().decode("utf-8", "replace")
    except OSError:
        return err.reason or ""
    try:
        parsed = json.loads(body)
        inner = parsed.get("error", parsed) if isinstance(parsed, dict) else {}
        return str(inner.get("message", body) if isinstance(inner, dict) else inner)[:300]
    except ValueError:
        return body[:300]


def _reason(err: BaseException) -> str:
    inner = getattr(err, "reason", None)
    if isinstance(inner, (socket.timeout, TimeoutError)) or isinstance(
        err, (socket.timeout, TimeoutError)
    ):
        return "timed out"
    return f"{type(inner or err).__name__}: {inner or err}"
