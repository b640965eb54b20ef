"""JSON objects in files: read with one UserError naming file and line, written whole or not at all."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from glm_portable.atomic import write_text_atomic
from glm_portable.errors import UserError


def finite_or_null(value: Any) -> Any:
    """The value with every NaN / infinity replaced by None, so that the JSON is strict (readable everywhere)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def strict_json(data: Any, **kwargs: Any) -> str:
    return json.dumps(finite_or_null(data), allow_nan=False, **kwargs)


def write_json_object(path: str | Path, data: dict[str, Any]) -> None:
    """Indented UTF-8 JSON (Chinese stays readable, non-finite numbers as null), written atomically."""
    write_text_atomic(path, strict_json(data, indent=2, ensure_ascii=False) + "\n")


def read_json_object(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
