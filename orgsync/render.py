"""Output for the command line: aligned text tables for people, JSON arrays for programs."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

Column = tuple[str, str]
"""(heading, key): ``key`` is a dotted path into the row mapping, e.g. ``public_user_data.user_id``."""

EMPTY = "-"


def to_json(rows: Iterable[Mapping[str, Any]]) -> str:
    """A JSON array, one object per row, keys in the order the row gives them."""
    return json.dumps(list(rows), indent=2, ensure_ascii=False, default=str)


def format_millis(value: int | None) -> str:
    """Epoch milliseconds as a UTC timestamp to the second; people do not read milliseconds."""
    if value is None:
        return EMPTY
    try:
        return datetime.fromtimestamp(value / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        # A corrupt or absurd timestamp must not break a listing: show it raw.
        return str(value)


def lookup(row: Mapping[str, Any], key: str) -> Any:
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def format_cell(key: str, value: Any) -> str:
    if value is None or value == "":
        return EMPTY
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and key.rsplit(".", 1)[-1].endswith("_at"):
        return format_millis(value)
    if isinstance(value, list | tuple):
        # Lists of objects (a role's permissions) read best as their keys.
        items = [item.get("key", item.get("id")) if isinstance(item, Mapping) else item for item in value]
        return ",".join(str(item) for item in items) or EMPTY
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    # Newlines and tabs inside a cell would break the alignment of every later row.
    return " ".join(str(value).split())


def display_width(text: str) -> int:
    """Terminal columns taken by ``text``: wide East Asian characters take two, combining marks none."""
    width = 0
    for char in text:
        if unicodedata.combining(char):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def truncate(text: str, limit: int) -> str:
    if display_width(text) <= limit:
        return text
    kept = ""
    for char in text:
        if display_width(kept + char) > limit - 1:
            break
        kept += char
    return kept + "…"


def render_table(
    columns: Sequence[Column],
    rows: Iterable[Mapping[str, Any]],
    *,
    max_cell: int = 60,
    empty_message: str = "(none)",
) -> str:
    """Rows as left-aligned columns separated by two spaces, headings in capitals."""
    headings = [heading.upper() for heading, _ in columns]
    cells = [[truncate(format_cell(key, lookup(row, key)), max_cell) for _, key in columns] for row in rows]
    if not cells:
        return empty_message
    widths = [display_width(heading) for heading in headings]
    for line in cells:
        for index, cell in enumerate(line):
            widths[index] = max(widths[index], display_width(cell))

    def join(values: Sequence[str]) -> str:
        padded = [value + " " * (widths[i] - display_width(value)) for i, value in enumerate(values)]
        return "  ".join(padded).rstrip()

    return "\n".join([join(headings), *(join(line) for line in cells)])
