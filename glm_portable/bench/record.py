"""The bench record (a stable JSON format, see README): written by `bench`, read back by `compare`."""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path
from typing import Any

from glm_portable import __version__
from glm_portable.environment import toolkit_versions
from glm_portable.versions import library_versions
from glm_portable.errors import UserError
from glm_portable.jsonfile import read_json_object

from .options import Workload

RECORD_FORMAT = "glm-portable-bench/1"
REQUIRED = ("name", "workload", "device.backend", "device.name", "device.count", "dtype", "versions.torch",
            "results.samples_per_s", "results.tokens_per_s", "results.step_time_s", "results.peak_memory_bytes",
            "results.losses")
NUMBERS = ("device.count", "results.samples_per_s", "results.tokens_per_s")
NUMBER_LISTS = ("results.losses", "results.peak_memory_bytes")


def code_version() -> str:
    """The package version, plus the git commit (and "-dirty") when run from a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{commit}{'-dirty' if dirty else ''}"


def build_record(name: str | None, workload: Workload, measured: dict[str, Any], patches: list[str]) -> dict[str, Any]:
    """``measured`` is the runner's output (device, dtype, parameters, results)."""
    device = measured["device"]
    return {
        "format": RECORD_FORMAT,
        "name": name or f"{device['backend']}-{measured['dtype']}-{device['count']}x",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "workload": workload.as_record(),
        **measured,
        "versions": {"python": platform.python_version(), **library_versions(), **toolkit_versions()},
        "code": code_version(),
        "patches": patches,
    }


def _field(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def read_record(path: Path) -> dict[str, Any]:
    """A record, checked for the fields `compare` reads; a clear error names the file and the field."""
    record = read_json_object(path)
    if record.get("format") != RECORD_FORMAT:
        raise UserError(f"{path}: field format is {record.get('format')!r}, expected {RECORD_FORMAT!r} "
                        "(a file written by `glm-portable bench`)")
    for dotted in REQUIRED:
        try:
            _field(record, dotted)
        except KeyError:
            raise UserError(f"{path}: field {dotted} is missing (a file written by `glm-portable bench`)") from None
    for dotted in NUMBERS:
        value = _field(record, dotted)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{path}: field {dotted} is {value!r}; expected a number")
    for dotted in NUMBER_LISTS:
        values = _field(record, dotted)
        if not isinstance(values, list) or not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                                                   for v in values):
            raise UserError(f"{path}: field {dotted} must be a list of numbers")
    step_times = _field(record, "results.step_time_s")
    if not isinstance(step_times, dict) or not all(isinstance(v, (int, float)) for v in step_times.values()):
        raise UserError(f"{path}: field results.step_time_s must map p50 / p90 / mean to numbers")
    return record


def workload_differences(first: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """Workload fields whose values differ between two records (empty when they ran the same work)."""
    a, b = first["workload"], other["workload"]
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
