"""A teacher/student tokenizer pair with its cached byte tables and shared vocabulary."""

from __future__ import annotations

import warnings
from functools import cached_property
from typing import Any

import numpy as np

from ctopd.core.alignment import Alignment, align_ids_batch, response_bytes_batch
from ctopd.core.byte_table import ByteTable, build_byte_table
from ctopd.core.shared_vocab import SharedVocab, build_shared_vocab


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, **kwargs: Any):
    """Load a fast tokenizer from a local folder or hub id.

    A folder that holds only ``tokenizer.json`` files is loaded with ``PreTrainedTokenizerFast``
    (AutoTokenizer can swap in a model-specific class when a ``config.json`` sits beside it).
    """
    from pathlib import Path

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(name_or_path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"tokenizer path {name_or_path!r} is a file; pass its folder")
    if folder.is_dir() and not (folder / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"no tokenizer.json in {folder}; ctopd needs a fast tokenizer (save one with "
            "tokenizer.save_pretrained(folder) after loading it with use_fast=True)"
        )
    if folder.is_dir() and not (folder / "config.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(folder), **kwargs)
    looks_local = str(name_or_path).startswith(("/", ".", "~")) or folder.suffix == ".json"
    if looks_local and not folder.exists():
        raise FileNotFoundError(f"tokenizer folder {name_or_path} does not exist")
    try:
        return AutoTokenizer.from_pretrained(
            str(name_or_path), use_fast=True, trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as err:
        raise FileNotFoundError(
            f"could not load tokenizer {name_or_path!r}: it is not a local folder and could not "
            f"be loaded as a hub id ({str(err).splitlines()[0]})"
        ) from err


class TokenizerPair:
    """The teacher's and the student's tokenizers, ready to align responses.

    Args:
        teacher_tokenizer: a transformers fast tokenizer (or ``tokenizers.Tokenizer``).
        student_tokenizer: the same for the student.
        teacher_end_ids: ids that end the teacher's turn (default: EOS plus the end-of-turn
            marker its chat template writes).
        student_end_ids: the same for the student.
    """

    def __init__(
        self,
        teacher_tokenizer: Any,
        student_tokenizer: Any,
        *,
        teacher_end_ids: list[int] | None = None,
        student_end_ids: list[int] | None = None,
    ) -> None:
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        self.teacher_table: ByteTable = build_byte_table(teacher_tokenizer, end_ids=teacher_end_ids)
        self.student_table: ByteTable = build_byte_table(student_tokenizer, end_ids=student_end_ids)
        for side, table in (("teacher", self.teacher_table), ("student", self.student_table)):
            if table.rewrites_text:
                warnings.warn(
                    f"the {side} tokenizer's normaliser ({', '.join(table.rewrites_text)}) can "
                    "rewrite text; chunks where it does are marked unaligned and get no loss",
                    stacklevel=2,
                )
        self._teacher_encoder = _text_encoder(teacher_tokenizer)

    @classmethod
    def from_pretrained(
        cls, teacher: str, student: str, *, trust_remote_code: bool = False, **kwargs: Any
    ) -> TokenizerPair:
        """Load both tokenizers (folders or hub ids) and build the pair."""
        return cls(
            load_tokenizer(teacher, trust_remote_code=trust_remote_code),
            load_tokenizer(student, trust_remote_code=trust_remote_code),
            **kwargs,
        )

    @cached_property
    def shared_vocab(self) -> SharedVocab:
        """``V∩`` of this pair (built on first use)."""
        return build_shared_vocab(self.teacher_table, self.student_table)

    @cached_property
    def identical(self) -> bool:
        """True when both tokenizers give every id the same bytes and specials."""
        t, s = self.teacher_table, self.student_table
        return (
            t.vocab_size == s.vocab_size
            and np.array_equal(t.lengths, s.lengths)
            and np.array_equal(t.flat_bytes, s.flat_bytes)
            and np.array_equal(t.special, s.special)
            and t.prefix_rule == s.prefix_rule
            and t.decoder_strips_space == s.decoder_strips_space
        )

    def align(self, teacher_ids, student_ids, *, text: str | None = None) -> Alignment:
        """Minimal aligned chunks of one response (see :class:`Alignment`); ``text`` as in
        :meth:`align_batch`."""
        return self.align_batch(
            [teacher_ids], [student_ids], texts=None if text is None else [text]
        )[0]

    def align_batch(
        self, teacher_ids: list, student_ids: list, *, texts: list[str] | None = None
    ) -> list[Alignment]:
        """Align ``B`` responses at once (vectorised over the batch).

        Without ``texts`` the student ids are sampled responses (their text is
        :meth:`student_text`) and the teacher ids come from :meth:`teacher_ids_for_batch`.
        With ``texts``, both are each tokenizer's own encoding of ``texts[b]``
        (:meth:`encode_batch`); each side's first token then loses a dummy-prefix space exactly
        where its tokenizer puts one before that text (see ``align_ids_batch``).
        """
        return align_ids_batch(
            self.teacher_table,
            self.student_table,
            teacher_ids,
            student_ids,
            texts=texts,
            teacher_sampled=texts is None and self.identical,
        )

    def encode_batch(self, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Each tokenizer's own ids of each text, ``tokenizer(text, add_special_tokens=False)``:
        ``(teacher_ids, student_ids)``, to align with ``align_batch(..., texts=texts)``."""
        return _own_ids(self.teacher_tokenizer, texts), _own_ids(self.student_tokenizer, texts)

    def student_response_bytes(self, student_ids) -> bytes:
        """The bytes of a sampled student response's text: its tokens' bytes back to back,
        without a trailing end token or specials, less the leading space the student's decoder
        drops (the rule is written out in ``alignment.response_bytes_batch``)."""
        return response_bytes_batch(self.student_table, [student_ids])[0][0]

    def student_text(self, student_ids) -> str:
        """A sampled student response as text: what ``student_tokenizer.decode(ids,
        skip_special_tokens=True)`` gives for it (invalid UTF-8 replaced by U+FFFD)."""
        return self.student_response_bytes(student_ids).decode("utf-8", errors="replace")

    def ended_turn(self, student_ids) -> bool:
        """Whether the student response ends with one of its end ids."""
        ids = np.asarray(student_ids, dtype=np.int64).reshape(-1)
        return bool(ids.size and np.isin(ids[-1], self.student_table.end_ids))

    def teacher_ids_for(self, student_ids) -> list[int]:
        """The teacher's tokenisation of a sampled student response (docs/concepts/one-step.md): the
        teacher encodes the response's text (:meth:`student_text`) with no special tokens
        added and special-token strings treated as plain text, exactly as it would encode that
        text itself, then its end-of-turn id is appended if the student ended its turn. With
        identical tokenizers: the student's ids themselves."""
        return self.teacher_ids_for_batch([student_ids])[0]

    def teacher_ids_for_batch(self, student_ids: list) -> list[list[int]]:
        """:meth:`teacher_ids_for` over a batch, with one batched encode call.

        With identical tokenizers the student's sampled ids are returned as they are: standard
        same-tokenizer OPD scores exactly the sampled ids, and re-encoding would split a
        non-canonical sample differently.
        """
        if self.identical:
            return [np.asarray(ids, dtype=np.int64).reshape(-1).tolist() for ids in student_ids]
        responses, ended = response_bytes_batch(self.student_table, student_ids)
        texts = [b.decode("utf-8", errors="replace") for b in responses]
        # The teacher's own ids of the text. A teacher whose dummy prefix skips a text that
        # starts with a space gives " x" and "x" the same ids; align_batch reads its first
        # space as content or as the prefix from the text's first byte.
        encoded = self._teacher_encoder(texts)
        end_id = self.teacher_end_of_turn_id
        return [ids + [end_id] if end else ids for ids, end in zip(encoded, ended.tolist())]

    @property
    def teacher_end_of_turn_id(self) -> int:
        """The id the teacher writes to end its turn: the chat template's end-of-turn marker
        when it has one, else EOS."""
        end_ids = self.teacher_table.end_ids.tolist()
        eos = getattr(self.teacher_tokenizer, "eos_token_id", None)
        others = [i for i in end_ids if i != eos]
        return others[0] if others else end_ids[0]


def _own_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=False)["input_ids"]``, also for a raw
    ``tokenizers.Tokenizer``."""
    if not texts:
        return []
    if hasattr(tokenizer, "backend_tokenizer"):
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    from ctopd.core.byte_table import _backend

    return [e.ids for e in _backend(tokenizer).encode_batch(texts, add_special_tokens=False)]


def _text_encoder(tokenizer: Any):
    """A function ``list[str] -> list[list[int]]`` that encodes without adding special tokens and
    without turning special-token strings in the text into special ids (a response that says
    "<|im_end|>" is text, not an end of turn)."""
    from ctopd.core.byte_table import _backend

    backend = _backend(tokenizer)

    def encode(texts: list[str]) -> list[list[int]]:
        # Toggled per call and restored, rather than copying a large tokenizer.
        before = getattr(backend, "encode_special_tokens", None)
        if before is not None:
            backend.encode_special_tokens = True
        try:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        finally:
            if before is not None:
                backend.encode_special_tokens = before

    return encode
