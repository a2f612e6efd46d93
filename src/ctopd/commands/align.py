"""``ctopd align`` and ``ctopd coverage``: look at the chunks of a tokenizer pair.

    ctopd align --teacher T --student S --input texts.jsonl [--field text] [--output out.jsonl]
    ctopd align --teacher T --student S --text "Natalia sold 48/2 = 24 clips."
    ctopd coverage --teacher T --student S --input texts.jsonl [--field text] [--json]

T and S are tokenizer folders or hub ids. Each text gets each tokenizer's own ids,
``tokenizer(text, add_special_tokens=False)["input_ids"]`` (a special-token string in the text
becomes that special id, as the tokenizer would have it), and the chunks are exact over the
text's bytes: a leading ``▁`` counts as the tokenizer's dummy prefix exactly where its own rules
put one before that text.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path

BATCH_LINES = 512


def add_parser(subparsers) -> None:
    for name, func, help_text in (
        ("align", run_align, "write the minimal aligned chunks of texts (JSONL) or show one text"),
        ("coverage", run_coverage, "how much of the student's tokens get teacher supervision"),
    ):
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("--teacher", required=True, help="teacher tokenizer folder or hub id")
        parser.add_argument("--student", required=True, help="student tokenizer folder or hub id")
        parser.add_argument("--input", type=Path, help="JSONL file, one text per line")
        parser.add_argument("--field", default="text", help="JSON key holding the text")
        parser.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="allow custom tokenizer code from the hub (off by default)",
        )
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "align":
            parser.add_argument("--output", type=Path, help="JSONL output (default: stdout)")
            parser.add_argument("--text", help="show one text as a coloured chunk view")
        else:
            parser.add_argument("--text", help="measure one text instead of a file")
            parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.set_defaults(func=func)


def _load_pair(args):
    from ctopd import TokenizerPair

    return TokenizerPair.from_pretrained(
        args.teacher, args.student, trust_remote_code=args.trust_remote_code
    )


def read_texts(path: Path, field: str) -> Iterator[str]:
    """Texts of a JSONL file; raises ``ValueError`` naming the line of a bad record."""
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{path}:{number}: no string field {field!r} (found {keys}); "
                    "choose the field with --field"
                )
            yield record[field]


def _batches(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokenise(pair, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Each tokenizer's own ids of each text (teacher's, student's)."""
    return pair.encode_batch(texts)


def _count_lines(path: Path) -> int:
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def _progress(args, path: Path):
    from tqdm import tqdm

    return tqdm(
        total=_count_lines(path), unit="text", disable=args.no_progress or None, file=sys.stderr
    )


def run_align(args: argparse.Namespace) -> int:
    if (args.input is None) == (args.text is None):
        print("ctopd align: give exactly one of --input FILE.jsonl or --text TEXT", file=sys.stderr)
        return 2
    pair = _load_pair(args)
    if args.text is not None:
        teacher_ids, student_ids = _tokenise(pair, [args.text])
        show_chunks(pair, teacher_ids[0], student_ids[0], text=args.text)
        return 0
    out = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    try:
        with _progress(args, args.input) as bar:
            for texts in _batches(read_texts(args.input, args.field), BATCH_LINES):
                for record in align_records(pair, texts):
                    out.write(json.dumps(record) + "\n")
                bar.update(len(texts))
    finally:
        if args.output:
            out.close()
    return 0


def align_records(pair, texts: list[str]) -> list[dict]:
    """One output record per text: each tokenizer's own ids and the chunks between them.

    Returns:
        Dicts with ``teacher_ids`` and ``student_ids`` (``tokenizer(text,
        add_special_tokens=False)["input_ids"]`` of each side), ``chunks`` (``[K, 4]`` token
        ranges, see ``Alignment``) and ``aligned`` (``[K]``).
    """
    teacher_ids, student_ids = _tokenise(pair, texts)
    return [
        {
            "teacher_ids": t_ids,
            "student_ids": s_ids,
            "chunks": al.chunks.tolist(),
            "aligned": al.aligned.tolist(),
        }
        for t_ids, s_ids, al in zip(
            teacher_ids, student_ids, pair.align_batch(teacher_ids, student_ids, texts=texts)
        )
    ]


def run_coverage(args: argparse.Namespace) -> int:
    from ctopd.core.coverage import coverage_counts, coverage_summary

    if (args.input is None) == (args.text is None):
        print(
            "ctopd coverage: give exactly one of --input FILE.jsonl or --text TEXT", file=sys.stderr
        )
        return 2
    pair = _load_pair(args)
    totals: dict[str, int] = {}
    texts = iter([args.text]) if args.text is not None else read_texts(args.input, args.field)
    bar = _progress(args, args.input) if args.input else None
    for batch in _batches(texts, BATCH_LINES):
        teacher_ids, student_ids = _tokenise(pair, batch)
        counts = coverage_counts(
            pair.align_batch(teacher_ids, student_ids, texts=batch), student_ids, pair.shared_vocab
        )
        totals = {k: totals.get(k, 0) + v for k, v in counts.items()}
        if bar:
            bar.update(len(batch))
    if bar:
        bar.close()
    if not totals:
        print("ctopd coverage: the input holds no texts", file=sys.stderr)
        return 2
    summary = coverage_summary(totals, pair.shared_vocab)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_coverage(summary, args.teacher, args.student)
    return 0


def _print_coverage(summary: dict, teacher: str, student: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"teacher {teacher}  ->  student {student}")
    table.add_column("supervision")
    table.add_column("student tokens", justify="right")
    table.add_column("coverage", justify="right")
    table.add_row(
        "shared vocabulary only (exact token match)",
        f"{summary['shared_only_tokens']:,}",
        f"{summary['shared_only_coverage']:.1%}",
    )
    table.add_row(
        "minimal aligned units (SimCT / DPCA)",
        f"{summary['aligned_tokens']:,}",
        f"{summary['aligned_coverage']:.1%}",
    )
    console = Console()
    console.print(table)
    console.print(
        f"student tokens {summary['student_tokens']:,}; chunks: 1:1 "
        f"{summary['chunks_one_to_one']:,}, multi-token {summary['chunks_multi']:,}, unaligned "
        f"{summary['chunks_unaligned']:,} ({summary['unaligned_bytes']:,} bytes); shared "
        f"vocabulary {summary['shared_vocab_size']:,} classes"
    )


def show_chunks(
    pair, teacher_ids: list[int], student_ids: list[int], *, text: str | None = None
) -> None:
    """Print a text coloured chunk by chunk, then each chunk's teacher and student pieces.

    With ``text`` both id lists are the tokenizers' own ids of it; without, the student ids are
    a sampled response and the teacher ids its teacher tokenisation."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ctopd.core.byte_table import adds_dummy_prefix, first_bytes_of

    al = pair.align(teacher_ids, student_ids, text=text)
    t_table, s_table = pair.teacher_table, pair.student_table

    def pieces(table, ids, lo, hi):
        return [
            table.token_bytes(i).decode("utf-8", "backslashreplace")
            if not table.special[i]
            else f"<special {i}>"
            for i in ids[lo:hi]
        ]

    # Byte offset of each student token in the text (a dummy-prefix space left out).
    lengths = [0 if s_table.special[i] else int(s_table.lengths[i]) for i in student_ids]
    response = b"".join(s_table.token_bytes(i) for i in student_ids)
    prefixed = (
        s_table.decoder_strips_space
        if text is None
        else bool(adds_dummy_prefix(s_table, first_bytes_of([text]))[0])
    )
    if prefixed and response[:1] == b" " and lengths and lengths[0]:
        response, lengths[0] = response[1:], lengths[0] - 1
    byte_offsets = [0, *itertools.accumulate(lengths)]
    colours = ["on blue", "on dark_green"]
    text = Text()
    rows = Table(show_lines=False)
    for column in ("#", "kind", "teacher pieces", "student pieces"):
        rows.add_column(column)
    for k, (ta, tb, sa, sb) in enumerate(al.chunks.tolist()):
        kind = (
            "end"
            if al.is_end[k]
            else "unaligned"
            if not al.aligned[k]
            else "1:1"
            if tb - ta == 1 and sb - sa == 1
            else "multi"
        )
        s_pieces = pieces(s_table, student_ids, sa, sb)
        style = "on red" if kind == "unaligned" else colours[k % 2]
        chunk_text = response[byte_offsets[sa] : byte_offsets[sb]].decode("utf-8", "replace")
        text.append(chunk_text if kind != "end" else "⏎", style=style)
        rows.add_row(
            str(k),
            kind,
            " | ".join(map(repr, pieces(t_table, teacher_ids, ta, tb))),
            " | ".join(map(repr, s_pieces)),
        )
    console = Console()
    console.print(text)
    console.print(rows)
    console.print(
        f"{al.num_chunks} chunks: {int(al.one_to_one.sum())} one-to-one, "
        f"{int((al.aligned & ~al.one_to_one).sum())} multi-token, "
        f"{int((~al.aligned).sum())} unaligned"
    )
