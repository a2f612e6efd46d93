"""Train small tokenizers of different families locally, in about a second.

Used by the demo (teacher and student must cut digits differently) and by the tests (three
families for the alignment property tests). Each function returns a
``transformers.PreTrainedTokenizerFast`` with a chat template and an end-of-turn token, so it
can be saved with ``save_pretrained`` and loaded back like a hub tokenizer.

Families:
    * :func:`train_byte_level_bpe` — GPT-2 / Qwen2 style byte-level BPE; optionally one digit per
      token like Qwen2; ChatML template ending turns with ``<|im_end|>``.
    * :func:`train_digit_group_bpe` — Llama-3 style byte-level BPE: numbers cut into groups of
      up to three digits (``140`` is one token, ``1405`` is ``140`` + ``5``); Llama-3 style
      header template ending turns with ``<|eot_id|>``.
    * :func:`train_sentencepiece_bpe` — Llama-2 style: Metaspace ``▁`` with a dummy-prefix space,
      byte fallback ``<0xNN>``, multi-digit merges; Gemma-style template ending turns with
      ``<end_of_turn>``.
    * :func:`train_sentencepiece_unigram` — T5 / ALBERT style Unigram with Metaspace and byte
      fallback.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TURN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
HEADER_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content']"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]


def train_byte_level_bpe(
    texts: Iterable[str], vocab_size: int = 512, *, split_digits: bool = True
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (ChatML template, end of turn ``<|im_end|>``).

    Args:
        texts: training corpus.
        vocab_size: target vocabulary size, special tokens included.
        split_digits: isolate every digit as its own pre-token (Qwen2 / Llama-3 style).
    """
    tokenizer = Tokenizer(models.BPE())
    steps = [pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated")] if split_digits else []
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return _wrap(
        tokenizer, CHATML_TEMPLATE, bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None
    )


def train_digit_group_bpe(texts: Iterable[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A Llama-3 style byte-level BPE: digits are pre-split into runs of at most three (the
    ``\\p{N}{1,3}`` rule of Llama-3's pre-tokenizer), so numbers up to 999 can be one token and
    a space before a number stays its own token; header-style template ending turns with
    ``<|eot_id|>``.

    Args:
        texts: training corpus.
        vocab_size: target vocabulary size, special tokens included.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return _wrap(
        tokenizer,
        HEADER_TEMPLATE,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|end_of_text|>",
        unk=None,
    )


def train_sentencepiece_bpe(texts: Iterable[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A Llama-2 style SentencePiece BPE: Metaspace with a dummy-prefix space, byte fallback,
    numbers merged into multi-digit pieces; Gemma-style turn template ending with
    ``<end_of_turn>``."""
    specials = ["<unk>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(BYTE_PIECES),
        special_tokens=specials + BYTE_PIECES,
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    spec = json.loads(tokenizer.to_str())
    spec["model"]["byte_fallback"] = True
    spec["model"]["fuse_unk"] = True
    return _sentencepiece_finish(spec, specials)


def train_sentencepiece_unigram(
    texts: Iterable[str], vocab_size: int = 400
) -> PreTrainedTokenizerFast:
    """A T5 / ALBERT style Unigram tokenizer with Metaspace, dummy prefix and byte fallback."""
    specials = ["<unk>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>"]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        unk_token="<unk>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    spec = json.loads(tokenizer.to_str())
    pieces = spec["model"]["vocab"]
    known = {piece for piece, _ in pieces}
    lowest = min(score for _, score in pieces) - 1.0
    pieces.extend([piece, lowest] for piece in BYTE_PIECES if piece not in known)
    spec["model"]["byte_fallback"] = True
    return _sentencepiece_finish(spec, specials)


def _sentencepiece_finish(spec: dict, specials: list[str]) -> PreTrainedTokenizerFast:
    """Keep only the real specials as added tokens (byte pieces are ordinary vocabulary) and
    give the tokenizer SentencePiece's decoder (``▁`` -> space, byte fallback, strip the
    dummy-prefix space)."""
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in specials]
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    return _wrap(tokenizer, TURN_TEMPLATE, bos="<s>", eos="</s>", pad="</s>", unk="<unk>")


def _wrap(tokenizer: Tokenizer, template: str, *, bos, eos, pad, unk) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk
    )
    wrapped.chat_template = template
    return wrapped
