"""ctopd: cross-tokenizer on-policy distillation (SimCT, DPCA and baselines)."""

from ctopd.core.alignment import Alignment
from ctopd.core.byte_table import ByteTable, UnsupportedTokenizerError, build_byte_table
from ctopd.core.pair import TokenizerPair, load_tokenizer
from ctopd.core.shared_vocab import SharedVocab, build_shared_vocab

__version__ = "0.1.0"
__all__ = [
    "Alignment",
    "ByteTable",
    "SharedVocab",
    "TokenizerPair",
    "UnsupportedTokenizerError",
    "build_byte_table",
    "build_shared_vocab",
    "load_tokenizer",
]
