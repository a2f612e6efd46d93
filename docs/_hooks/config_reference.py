"""mkdocs hook: writes the configuration reference from ``ctopd.training.config`` itself.

``docs/guides/configuration.md`` holds the marker ``<!-- config-reference -->``; at build time it
is replaced by one table per section (every field, its YAML key, its flag, its default and its
help text, each written once in the dataclasses), so the page cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

MARKER = "<!-- config-reference -->"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{value!r}`"


def _rows(instance: object, prefix: str, aliases: dict[str, list[str]]) -> list[str]:
    rows = []
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            continue
        key = f"{prefix}{f.name}"
        flags = [f"`--{key.replace('_', '-')}`", *(f"`{a}`" for a in aliases.get(key, []))]
        help_text = f.metadata.get("help", "")
        rows.append(
            f"| `{f.name}` | {', '.join(flags)} | {_cell(_default(value))} | {_cell(help_text)} |"
        )
    return rows


def render_reference() -> str:
    """Markdown tables of every run setting (top-level fields, then one section each)."""
    src = Path(__file__).resolve().parents[2] / "src"
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    from ctopd.training import config as cfg

    aliases: dict[str, list[str]] = {}
    for flag, dest in getattr(cfg, "ALIASES", {}).items():
        aliases.setdefault(dest, []).append(flag)
    run = cfg.TrainConfig()
    header = "| key | flag | default | what it is |\n| --- | --- | --- | --- |"
    parts = ["## Top-level fields", "", header, *_rows(run, "", aliases), ""]
    for f in dataclasses.fields(run):
        section = getattr(run, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        doc = " ".join((type(section).__doc__ or "").split())
        parts += [f"## `{f.name}:`", "", doc, "", header]
        parts += _rows(section, f"{f.name}.", aliases)
        parts.append("")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, render_reference())
    return markdown
