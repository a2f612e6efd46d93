"""Exact byte strings of every token id of a Hugging Face fast tokenizer.

Alignment works on bytes, never on decoded text: decoding one token at a time is not exact (a
token holding part of a UTF-8 character decodes to U+FFFD, and SentencePiece decoders strip the
leading space of each piece). This module reads the tokenizer's own model description
(``tokenizer.json``) and gives each id the bytes it contributes to the text:

* byte-level BPE (GPT-2, Qwen2, Llama-3): each character of the token string maps back to one
  byte through the inverse of the GPT-2 byte<->unicode table;
* SentencePiece / Metaspace (Llama-2, Mistral, Phi-3, T5-style Unigram): ``▁`` is a space and
  byte-fallback pieces ``<0xNN>`` are the byte ``NN``;
* added tokens: their literal content; special added tokens are flagged ``special``.

A tokenizer that throws text away (WordPiece drops whitespace, a BPE with an end-of-word suffix)
cannot be represented exactly and raises :class:`UnsupportedTokenizerError` saying why.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import numpy as np

METASPACE = "\u2581"
_BYTE_FALLBACK_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# Lower-case ASCII: unchanged by every normaliser that keeps the tokenizer usable (NFC, Lowercase).
# Digits and punctuation catch a prefix space added to every pre-token, not once per text.
_PROBE_TEXTS = ("ab", "hello world", "the cat sat.", "x", "a1 b22.c")


# A special id has no text. In an alignment it occupies one position holding this byte.
SPECIAL_PLACEHOLDER = 0xFF


class UnsupportedTokenizerError(ValueError):
    """The tokenizer's tokens cannot be mapped to exact byte strings."""


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    """Inverse of the GPT-2 byte->unicode table used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(byte_values, code_points)}


@dataclass(frozen=True)
class ByteTable:
    """Per-id byte strings of one tokenizer, stored flat for vectorised gathers.

    Attributes:
        name: a label for messages (the tokenizer's path or class).
        flat_bytes: uint8 ``[total_bytes]``, the bytes of every id back to back.
        starts: int64 ``[vocab_size]``, where each id's bytes begin in ``flat_bytes``.
        lengths: int64 ``[vocab_size]``, each id's byte length (0 for special ids).
        special: bool ``[vocab_size]``, True for special (control) ids; their bytes are not text.
        end_ids: int64 ``[E]``, ids that end the assistant's turn (EOS, end-of-turn marker).
        dummy_prefix: True when encoding prepends a space that is not in the text to some texts
            (``prefix_rule != "never"``).
        kind: ``"byte_level"`` or ``"metaspace"``.
        rewrites_text: names of normalizers that can change the text (NFC, Lowercase, ...):
            where they do, chunks come out unaligned.
        prefix_rule: when encoding a text adds a dummy-prefix space (see :func:`adds_dummy_prefix`):
            ``"always"``, before every text, even one that starts with a space (a ``Prepend("▁")``
            normaliser: Phi-3, legacy Llama fast tokenizers); ``"unless_space"``, only before a
            text that does not already start with a space (HF ``Metaspace`` with
            ``prepend_scheme`` ``"first"``, and ``"always"`` too, which at the start of a text
            also skips one that begins with ``▁``; ``ByteLevel(add_prefix_space=True)``), so
            ``" x"`` and ``"x"`` get the same ids; ``"never"``.
        decoder_strips_space: the tokenizer's decoder drops one leading space at the start of
            what it decodes (a ``Strip(" ", 1, 0)`` decoder, a ``Metaspace`` decoder): the rule by
            which the text of sampled ids is read (see ``alignment.response_bytes_batch``).
    """

    name: str
    flat_bytes: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    special: np.ndarray
    end_ids: np.ndarray
    dummy_prefix: bool
    kind: str
    rewrites_text: tuple[str, ...] = field(default=())
    prefix_rule: str = "never"
    decoder_strips_space: bool = False

    @property
    def prefix_only_if_no_space(self) -> bool:
        """The dummy prefix is added only to a text that does not start with a space."""
        return self.prefix_rule == "unless_space"

    @property
    def vocab_size(self) -> int:
        return int(self.lengths.shape[0])

    @cached_property
    def placeholder_lengths(self) -> np.ndarray:
        """int64 ``[vocab_size]``: bytes each id occupies in an alignment: its byte length, and
        one placeholder byte for a special id (it has no text but takes a position)."""
        return np.where(self.special, 1, self.lengths).astype(np.int64)

    @cached_property
    def is_end(self) -> np.ndarray:
        """bool ``[vocab_size]``: True for the ids in ``end_ids``."""
        flags = np.zeros(self.vocab_size, dtype=bool)
        flags[self.end_ids] = True
        return flags

    @cached_property
    def words(self) -> np.ndarray:
        """uint64 ``[vocab_size]``: each id's first (up to) 8 bytes packed little-endian, byte
        ``j`` in bits ``8j..8j+7``, zero above its length; a special id holds the placeholder
        byte ``0xFF``. Two byte strings of at most 8 bytes are equal iff their lengths and
        words are."""
        words = pack_words(self.flat_bytes, self.starts, self.lengths)
        words[self.special] = SPECIAL_PLACEHOLDER
        return words

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes of one id (empty for special ids)."""
        start = int(self.starts[token_id])
        return self.flat_bytes[start : start + int(self.lengths[token_id])].tobytes()

    def ids_to_bytes(self, ids: np.ndarray | list[int]) -> bytes:
        """Concatenated bytes of a sequence of ids, as the tokenizer spells them (no dummy-prefix
        removal, specials contribute nothing)."""
        ids = np.asarray(ids, dtype=np.int64)
        check_ids_in_range(ids, self.vocab_size, self.name)
        return gather_bytes(self, ids).tobytes()


def check_ids_in_range(ids: np.ndarray, vocab_size: int, name: str) -> None:
    """Raise ``ValueError`` naming the bad id when any id is outside ``[0, vocab_size)``."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0]
        raise ValueError(
            f"token id {int(bad)} is out of range for tokenizer {name} "
            f"(vocabulary size {vocab_size}); were these ids produced by the other model?"
        )


def pack_words(flat_bytes: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """uint64 ``[n]``: the first ``min(length, 8)`` bytes of each ``flat_bytes[start:start +
    length]`` packed little-endian (see :attr:`ByteTable.words`)."""
    padded = np.concatenate([flat_bytes, np.zeros(8, dtype=np.uint8)])
    words = np.zeros(starts.shape[0], dtype=np.uint64)
    safe_starts = np.clip(starts, 0, flat_bytes.shape[0])
    for j in range(8):
        byte = np.where(lengths > j, padded[safe_starts + j], 0).astype(np.uint64)
        words |= byte << np.uint64(8 * j)
    return words


def gather_bytes(table: ByteTable, ids: np.ndarray) -> np.ndarray:
    """uint8 ``[sum of lengths]``: the bytes of ``ids`` back to back, gathered without a loop."""
    lengths = table.lengths[ids]
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.uint8)
    token_of_byte = np.repeat(np.arange(ids.shape[0]), lengths)
    token_first_byte = np.cumsum(lengths) - lengths
    index = table.starts[ids][token_of_byte] + (np.arange(total) - token_first_byte[token_of_byte])
    return table.flat_bytes[index]


def _backend(tokenizer: Any):
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer (or the object itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    if backend is None and hasattr(tokenizer, "to_str"):
        backend = tokenizer
    if backend is None or not hasattr(backend, "to_str"):
        raise UnsupportedTokenizerError(
            f"{type(tokenizer).__name__} is not a Hugging Face *fast* tokenizer; load it with "
            "transformers.AutoTokenizer.from_pretrained(..., use_fast=True) or "
            "PreTrainedTokenizerFast.from_pretrained(folder)"
        )
    return backend


def _components(node: dict | None, kind_key: str = "type") -> list[dict]:
    """Flatten a (possibly nested) ``Sequence`` component of tokenizer.json into a list."""
    if not node:
        return []
    if node.get(kind_key) == "Sequence":
        children = (
            node.get("pretokenizers") or node.get("normalizers") or node.get("decoders") or []
        )
        out: list[dict] = []
        for child in children:
            out.extend(_components(child, kind_key))
        return out
    return [node]


_TEXT_REWRITING_NORMALIZERS = {
    "NFC",
    "NFD",
    "NFKC",
    "NFKD",
    "Lowercase",
    "Strip",
    "StripAccents",
    "BertNormalizer",
    "Precompiled",
    "Nmt",
}


def _detect_kind(spec: dict) -> str:
    model = spec["model"]
    pre = [c.get("type") for c in _components(spec.get("pre_tokenizer"))]
    dec = _components(spec.get("decoder"))
    dec_types = [c.get("type") for c in dec]
    norm = _components(spec.get("normalizer"))
    if model["type"] == "WordPiece" or "WordPiece" in dec_types:
        raise UnsupportedTokenizerError(
            "WordPiece tokenizers drop whitespace between words, so token bytes cannot spell the "
            "text exactly; cross-tokenizer alignment needs a byte-level BPE or SentencePiece model"
        )
    if model.get("end_of_word_suffix"):
        raise UnsupportedTokenizerError(
            f"BPE with end-of-word suffix {model['end_of_word_suffix']!r} does not spell spaces "
            "exactly; cannot align it byte for byte"
        )
    if "ByteLevel" in pre or "ByteLevel" in dec_types:
        return "byte_level"
    replaces_metaspace = any(
        c.get("type") == "Replace" and c.get("pattern", {}).get("String") == METASPACE for c in dec
    )
    prepends = any(c.get("type") == "Prepend" for c in norm)
    if "Metaspace" in pre or "Metaspace" in dec_types or replaces_metaspace or prepends:
        return "metaspace"
    raise UnsupportedTokenizerError(
        f"unrecognised tokenizer layout (model {model['type']}, pre-tokenizers {pre}, decoders "
        f"{dec_types}): only byte-level BPE and SentencePiece/Metaspace tokenizers are supported"
    )


def _piece_bytes(piece: str, kind: str, byte_fallback: bool, byte_map: dict[str, int]) -> bytes:
    if kind == "byte_level":
        try:
            return bytes(byte_map[ch] for ch in piece)
        except KeyError as err:
            raise UnsupportedTokenizerError(
                f"byte-level token {piece!r} holds character {err.args[0]!r} that is not in the "
                "byte<->unicode table; the vocabulary is not a byte-level BPE vocabulary"
            ) from None
    if byte_fallback:
        match = _BYTE_FALLBACK_PIECE.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
    return piece.replace(METASPACE, " ").encode("utf-8")


def _model_vocab(model: dict) -> dict[str, int]:
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        return vocab
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        return {piece: i for i, (piece, _score) in enumerate(vocab)}
    raise UnsupportedTokenizerError(f"tokenizer model {model.get('type')} has no readable vocab")


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Ids that end an assistant turn: ``eos_token`` plus the first special token the chat
    template writes after an assistant message's content (``<|im_end|>``, ``<end_of_turn>``,
    ``<|end|>``, ``<|eot_id|>``...). Works on transformers tokenizers; a raw
    ``tokenizers.Tokenizer`` has no such metadata and returns ``[]``."""
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.append(eos)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        marker = "XQZJ content marker XQZJ"
        try:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                tokenize=False,
            )
        except Exception:  # a template may reject this shape; EOS alone is still right
            rendered = ""
        tail = rendered.split(marker, 1)[1] if marker in rendered else ""
        special_contents = {
            t.content: t_id
            for t_id, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
            if t.special
        }
        first = None
        for content, t_id in special_contents.items():
            pos = tail.find(content)
            if pos >= 0 and (first is None or pos < first[0]):
                first = (pos, t_id)
        if first is not None and first[1] not in ids:
            ids.append(first[1])
    return ids


def build_byte_table(tokenizer: Any, *, end_ids: list[int] | None = None) -> ByteTable:
    """Build the exact byte table of a Hugging Face fast tokenizer.

    Args:
        tokenizer: a ``transformers`` fast tokenizer or a ``tokenizers.Tokenizer``.
        end_ids: ids that end a turn; default: :func:`end_of_turn_ids`.

    Returns:
        A :class:`ByteTable` covering ``len(tokenizer)`` ids (model vocabulary plus added
        tokens; ids no token uses get zero length and are flagged special).

    Raises:
        UnsupportedTokenizerError: the tokenizer cannot be represented exactly.
    """
    backend = _backend(tokenizer)
    spec = json.loads(backend.to_str())
    kind = _detect_kind(spec)
    model = spec["model"]
    byte_fallback = bool(model.get("byte_fallback"))
    byte_map = unicode_to_byte()

    pieces: dict[int, bytes] = {}
    for piece, token_id in _model_vocab(model).items():
        pieces[token_id] = _piece_bytes(piece, kind, byte_fallback, byte_map)
    special_ids: set[int] = set()
    for added in spec.get("added_tokens", []):
        pieces[added["id"]] = added["content"].encode("utf-8")
        if added.get("special"):
            special_ids.add(added["id"])
    if model.get("type") == "Unigram" and model.get("unk_id") is not None:
        special_ids.add(int(model["unk_id"]))
    unk = model.get("unk_token")
    if unk is not None and unk in _model_vocab(model):
        special_ids.add(_model_vocab(model)[unk])

    size = max(max(pieces) + 1, backend.get_vocab_size(with_added_tokens=True))
    if hasattr(tokenizer, "__len__"):
        size = max(size, len(tokenizer))
    # Model embedding matrices are often padded past the tokenizer (Qwen2: 151,936 rows for
    # 151,665 tokens). Padding ids never occur in text, so they are flagged special.
    lengths = np.zeros(size, dtype=np.int64)
    special = np.ones(size, dtype=bool)
    chunks: list[bytes] = []
    for token_id in range(size):
        b = pieces.get(token_id)
        if b is None or token_id in special_ids:
            chunks.append(b"")
            continue
        special[token_id] = False
        lengths[token_id] = len(b)
        chunks.append(b)
    flat = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    starts = np.cumsum(lengths) - lengths

    rewrites = tuple(
        sorted(
            {c["type"] for c in _components(spec.get("normalizer"))} & _TEXT_REWRITING_NORMALIZERS
        )
    )
    if end_ids is None:
        end_ids = end_of_turn_ids(tokenizer)
    table = ByteTable(
        name=str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        flat_bytes=flat,
        starts=starts.astype(np.int64),
        lengths=lengths,
        special=special,
        end_ids=np.asarray(sorted(set(end_ids)), dtype=np.int64),
        dummy_prefix=False,
        kind=kind,
        rewrites_text=rewrites,
    )
    return _with_probed_prefix(table, backend)


def adds_dummy_prefix(table: ByteTable, first_bytes: np.ndarray) -> np.ndarray:
    """Whether the tokenizer's own encoding of each text puts a dummy-prefix space before it.

    Args:
        table: the tokenizer's byte table.
        first_bytes: int ``[B]``: each text's first byte, ``-1`` for an empty text.

    Returns:
        bool ``[B]``: True where the encoded ids spell one space more than the text at its
        start; that space is the tokenizer's artefact, not content (docs/concepts/alignment.md).
    """
    first_bytes = np.asarray(first_bytes, dtype=np.int64)
    if table.prefix_rule == "always":
        return first_bytes >= 0
    if table.prefix_rule == "unless_space":
        return (first_bytes >= 0) & (first_bytes != 0x20)
    return np.zeros(first_bytes.shape, dtype=bool)


def first_bytes_of(texts: list[str]) -> np.ndarray:
    """int64 ``[B]``: the first UTF-8 byte of each text, ``-1`` for an empty one."""
    return np.fromiter((t.encode("utf-8")[0] if t else -1 for t in texts), np.int64, len(texts))


def _with_probed_prefix(table: ByteTable, backend) -> ByteTable:
    """Learn the tokenizer's dummy-prefix rules by running its own normaliser, pre-tokenizer and
    decoder on probe texts, and check that the table spells plain ASCII exactly (a cheap guard
    against layouts we misread).

    Running the tokenizer rather than reading ``tokenizer.json`` catches how the parts combine:
    HF's ``Metaspace`` with ``prepend_scheme`` ``"always"`` or ``"first"`` skips the prefix for
    a text that starts with a space, a ``Prepend("▁")`` normaliser does not, and a Strip
    decoder drops a leading space whichever rule encoded it.
    """

    def spell(text: str) -> tuple[list[int], bytes]:
        ids = backend.encode(text, add_special_tokens=False).ids
        return ids, gather_bytes(table, np.asarray(ids, dtype=np.int64)).tobytes()

    prefixed = []
    for text in _PROBE_TEXTS:
        spelled = spell(text)[1]
        if spelled == text.encode():
            prefixed.append(False)
        elif spelled == b" " + text.encode():
            prefixed.append(True)
        else:
            raise UnsupportedTokenizerError(
                f"tokenizer {table.name}: the byte table spells {text!r} as {spelled!r}; this "
                "tokenizer's layout is not one ctopd can represent exactly"
            )
    if len(set(prefixed)) != 1:
        raise UnsupportedTokenizerError(
            f"tokenizer {table.name} adds a leading space to some texts and not others; "
            "cannot model its dummy prefix exactly"
        )
    ids, spelled = spell(" ab")
    if spelled == b" ab":
        rule = "unless_space" if prefixed[0] else "never"
    elif prefixed[0] and spelled == b"  ab":
        rule = "always"
    else:
        raise UnsupportedTokenizerError(
            f"tokenizer {table.name}: the byte table spells ' ab' as {spelled!r}; cannot model "
            "how its dummy prefix treats a leading space"
        )
    decoded = backend.decode(ids, skip_special_tokens=False).encode("utf-8")
    if decoded not in (spelled, spelled[1:]):
        raise UnsupportedTokenizerError(
            f"tokenizer {table.name}: its decoder turns the ids of ' ab' into {decoded!r}, not "
            "their bytes with or without the leading space; cannot read sampled ids exactly"
        )
    return dataclasses.replace(
        table, dummy_prefix=prefixed[0], prefix_rule=rule, decoder_strips_space=decoded != spelled
    )
