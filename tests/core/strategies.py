"""Hypothesis strategies shared by the core tests."""

from hypothesis import strategies as st

# Pieces that stress byte boundaries: multi-byte UTF-8, ZWJ emoji sequences, flags, combining
# marks, CJK, whitespace and newline runs, tabs, CRLF, digits.
TRICKY_PIECES = [
    "😀", "👩‍👩‍👧", "🇫🇷", "中", "文", "東京", "e\u0301", "a\u0308", "\u0301", " ", "  ", "   ",
    "\n", "\n\n", "\t", "\r\n", "x", "12", "345", "1,234", "abc", " the", "ß", "Ω", "é", "$",
]
texts = st.lists(
    st.one_of(st.sampled_from(TRICKY_PIECES), st.text(max_size=6)), max_size=24
).map("".join)
