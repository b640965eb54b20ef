"""Read JSON-lines or JSON-array files into records that remember their line numbers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from glm_portable.errors import UserError


@dataclass(frozen=True)
class Record:
    path: str
    line: int
    value: Any

    def where(self) -> str:
        return f"{self.path}:{self.line}"


class BadRow(UserError):
    """One row cannot be used; ``--skip-bad-rows`` turns these into counted, listed skips."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def _is_array(text: str) -> bool:
    stripped = text.lstrip(" \t\r\n")
    return stripped.startswith("[")


def _array_records(path: str, text: str) -> Iterator[Record | BadRow]:
    decoder = json.JSONDecoder()
    index = text.index("[") + 1
    line = text.count("\n", 0, index) + 1
    length = len(text)
    while True:
        while index < length and text[index] in " \t\r\n,":
            if text[index] == "\n":
                line += 1
            index += 1
        if index >= length:
            raise UserError(f"{path}:{line}: the JSON array is not closed (expected ']')")
        if text[index] == "]":
            return
        try:
            value, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        yield Record(path, line, value)
        line += text.count("\n", index, end)
        index = end


def read_records(path: str | Path) -> Iterator[Record | BadRow]:
    """Yield each row as a Record, or a BadRow for a line that is not valid JSON (JSON-lines only).

    A JSON array that does not parse is an error for the whole file, since rows cannot be told apart.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark, as Windows editors write, for both layouts
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    if _is_array(text):
        yield from _array_records(str(path), text)
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield Record(str(path), number, json.loads(line))
        except json.JSONDecodeError as exc:
            yield BadRow(f"{path}:{number}", f"invalid JSON: {exc.msg} (column {exc.colno})")
