"""Dataset formats, their detection, and their conversion to one form: a list of chat messages.

Every row becomes ``messages`` (``{"role", "content"}`` dicts) ending with the assistant answer,
so templates never need to know which format a file was in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence, get_args

from glm_portable.errors import UserError

from .reader import BadRow, Record

Format = Literal["adgen", "prompt-completion", "context-target", "alpaca", "conversations"]
FORMATS: tuple[str, ...] = get_args(Format)
CHAT_ROLES = ("system", "user", "assistant", "observation")


@dataclass(frozen=True)
class Columns:
    """Column names of the single-turn formats; ``prompt``/``response`` default per format."""

    prompt: str | None = None
    response: str | None = None
    history: str | None = None


@dataclass(frozen=True)
class Example:
    """``history_given``: the row came with a history column (ChatGLM-6B's prompt then takes the round form)."""

    where: str
    messages: tuple[dict, ...]
    history_given: bool = False


FORMAT_COLUMNS = {
    "adgen": ("content", "summary"),
    "prompt-completion": ("prompt", "completion"),
    "context-target": ("context", "target"),
}


def detect_format(values: Sequence[Any], columns: Columns, source: str) -> tuple[str, str]:
    """Guess the format from the first rows' keys; returns (format, why)."""
    keys: set[str] = set()
    for value in values:
        if isinstance(value, dict):
            keys |= set(value)
    found = ", ".join(sorted(keys)) or "none"
    if "conversations" in keys:
        return "conversations", "rows have a 'conversations' list"
    if {"instruction", "output"} <= keys:
        return "alpaca", "rows have 'instruction' and 'output'"
    if columns.prompt and columns.response and {columns.prompt, columns.response} <= keys:
        return "adgen", f"rows have the given columns '{columns.prompt}' and '{columns.response}'"
    for name, (prompt, response) in FORMAT_COLUMNS.items():
        if {prompt, response} <= keys:
            return name, f"rows have '{prompt}' and '{response}'"
    raise UserError(
        f"{source}: cannot tell the format from the columns found ({found}); expected one of: "
        "content/summary (adgen), prompt/completion, context/target, instruction/input/output (alpaca), "
        "conversations — or name them with --format / --prompt-column / --response-column"
    )


def _text(row: dict, key: str, where: str, required: bool = True) -> str:
    if key not in row:
        if not required:
            return ""
        raise BadRow(where, f"missing field '{key}' (fields found: {', '.join(sorted(row)) or 'none'})")
    value = row[key]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise BadRow(where, f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _history(row: dict, key: str | None, where: str) -> list[dict]:
    if not key or row.get(key) is None:
        return []
    value = row[key]
    if not isinstance(value, list):
        raise BadRow(where, f"field '{key}' must be a list of [query, response] pairs, got {type(value).__name__}")
    messages = []
    for i, turn in enumerate(value):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise BadRow(where, f"field '{key}' item {i} must be a [query, response] pair of strings")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return messages


def _conversation(row: dict, where: str) -> list[dict]:
    value = row.get("conversations")
    if not isinstance(value, list) or not value:
        raise BadRow(where, "field 'conversations' must be a non-empty list of {role, content} messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRow(where, f"conversations[{i}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise BadRow(where, f"conversations[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise BadRow(where, f"conversations[{i}].content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def to_example(record: Record, fmt: str, columns: Columns) -> Example | None:
    """The row as messages, or None when its prompt or answer is empty (skipped and counted, as THUDM does).

    Raises BadRow for rows that are not what the format expects.
    """
    row, where = record.value, record.where()
    if not isinstance(row, dict):
        raise BadRow(where, f"expected a JSON object, got {type(row).__name__}")
    if fmt == "conversations":
        messages = _conversation(row, where)
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        if not messages or not messages[-1]["content"] or not any(m["role"] == "user" and m["content"] for m in messages):
            return None
        return Example(where, tuple(messages))
    history = _history(row, columns.history, where)
    if fmt == "alpaca":
        instruction = _text(row, "instruction", where)
        extra = _text(row, "input", where, required=False)
        prompt = f"{instruction}\n{extra}" if extra else instruction
        answer = _text(row, "output", where)
        history = history or _history(row, "history", where)
    else:
        default_prompt, default_response = FORMAT_COLUMNS[fmt]
        prompt = _text(row, columns.prompt or default_prompt, where)
        answer = _text(row, columns.response or default_response, where)
    if not prompt or not answer:
        return None
    return Example(where, tuple(history + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]),
                   history_given=columns.history is not None)
