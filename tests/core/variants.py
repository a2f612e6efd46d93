"""Variants of the locally trained tokenizers that differ only in their dummy-prefix rules."""

from __future__ import annotations

import json

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

METASPACE = "\u2581"


def _rebuilt(tokenizer: PreTrainedTokenizerFast, spec: dict) -> PreTrainedTokenizerFast:
    specials = {
        k: getattr(tokenizer, k)
        for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        if getattr(tokenizer, k)
    }
    out = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **specials)
    out.chat_template = tokenizer.chat_template
    return out


def with_prepend_scheme(tokenizer: PreTrainedTokenizerFast, scheme: str) -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer with its Metaspace pre-tokenizer's ``prepend_scheme`` set
    (``"first"``, ``"always"``, ``"never"``), or, for ``"prepend"``, the legacy layout of Llama
    and Phi-3 fast tokenizers: a ``Prepend("▁")`` + ``Replace(" ", "▁")`` normaliser and no
    pre-tokenizer, which puts a dummy prefix before every text, one that starts with a space
    too."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert spec["pre_tokenizer"]["type"] == "Metaspace"
    if scheme == "prepend":
        spec["normalizer"] = {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": METASPACE},
                {"type": "Replace", "pattern": {"String": " "}, "content": METASPACE},
            ],
        }
        spec["pre_tokenizer"] = None
    else:
        spec["pre_tokenizer"]["prepend_scheme"] = scheme
    return _rebuilt(tokenizer, spec)


def with_prefix_space(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer whose ByteLevel pre-tokenizer adds a prefix space (RoBERTa style):
    a dummy prefix before a text that does not start with a space, which its decoder keeps."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec["pre_tokenizer"]
    steps = pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
    for step in steps:
        if step["type"] == "ByteLevel":
            step["add_prefix_space"] = True
    return _rebuilt(tokenizer, spec)
