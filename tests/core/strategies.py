"""Hypothesis strategies shared by the core tests."""

from hypothesis import strategies as st

# Pieces that stress byte boundaries: multi-byte UTF-8, ZWJ emoji sequences, flags, combining
# marks, CJK, whitespace and newline runs, tabs, CRLF, digits.
TRICKY_PIECES = [
    "😀",
    "👩‍👩‍👧",
    "🇫🇷",
    "中",
    "文",
    "東京",
    "e\u0301",
    "a\u0308",
    "\u0301",
    " ",
    "  ",
    "   ",
    "\n",
    "\n\n",
    "\t",
    "\r\n",
    "x",
    "12",
    "345",
    "1,234",
    "abc",
    " the",
    "ß",
    "Ω",
    "é",
    "$",
]
texts = st.lists(st.one_of(st.sampled_from(TRICKY_PIECES), st.text(max_size=6)), max_size=24).map(
    "".join
)

# Runs of whitespace at either end of a text: where a dummy-prefix space and a real space meet.
WHITESPACE_PIECES = [" ", " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n", "\u00a0", "\u3000"]
whitespace_runs = st.lists(st.sampled_from(WHITESPACE_PIECES), max_size=4).map("".join)
texts_with_whitespace_ends = st.builds(
    lambda head, body, tail: head + body + tail, whitespace_runs, texts, whitespace_runs
)
