"""One definition per option: a dataclass field carries its type, default, help, choices and bounds.

A command's options are a dataclass whose fields are made with ``option()``; ``typer_command``
derives the command-line flags from it and ``validate`` checks bounds and choices, so an option
is written once and the CLI, ``--config`` YAML keys and library callers all see the same thing.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional, TypeVar, get_args, get_origin

import typer

from glm_portable.errors import UserError

T = TypeVar("T")
Dtype = Literal["float32", "bfloat16", "float16"]
_REQUIRED = dataclasses.MISSING
DEVICE_HELP = "auto|cpu|cuda|npu (default: $GLM_PORTABLE_DEVICE, else auto: NPU, then GPU, then CPU)"
CHECKPOINT_HELP = "A run directory or checkpoint: prefix, LoRA adapter or full model."
MODEL_DTYPE_HELP = "Model dtype (default: the backend's)."
CacheKind = Literal["dynamic", "static"]
CACHE_HELP = ("The decoding cache: growing, or preallocated (one shape every step; ChatGLM2/3 native). Default: "
              "static where the backend compiles per shape (NPU), else dynamic.")
QuantizationBit = Literal[4, 8]
QUANTIZATION_HELP = ("Quantize the frozen base's block linear layers to 4 or 8 bits at load (THUDM's weight-only "
                     "scheme; docs/quantization.md). Default: unquantized, or a pre-quantized model's own bits.")
IMPL_HELP = ("native (glm-portable's model) or remote (the model directory's own modeling_chatglm.py, patched for "
             "this transformers and device).")


def option(default: Any = _REQUIRED, help: str = "", *, minimum: Optional[float] = None,
           maximum: Optional[float] = None, envvar: Optional[str] = None, internal: bool = False,
           positional: bool = False) -> Any:
    """A dataclass field that is also a command-line option (``--field-name``).

    ``minimum`` / ``maximum`` are inclusive bounds checked by ``validate``; ``envvar`` lets the
    environment supply the value (for secrets that should not appear in a process list);
    ``internal`` fields are set by the program, never by a flag; a ``positional`` one is an argument
    (``make-tiny-model OUT``), not a flag.
    """
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, "envvar": envvar, "internal": internal,
                "positional": positional}
    if default is _REQUIRED:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_types(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0], True
    return annotation, False


def choices_of(annotation: Any) -> Optional[tuple[Any, ...]]:
    """The allowed values of a ``Literal[...]`` (or ``Optional[Literal[...]]``) field, else None."""
    inner, _ = _unwrap_optional(annotation)
    return get_args(inner) if get_origin(inner) is Literal else None


def _is_text_list(annotation: Any) -> bool:
    return get_origin(annotation) is list and get_args(annotation) == (str,)


def validate(options: Any) -> None:
    """Check every field's choices and bounds, then the schema's own ``check()``; one UserError naming the flag
    and what was expected. Library entry points call it too, so options built in code are held to the CLI's rules."""
    hints = _field_types(type(options))
    for spec in dataclasses.fields(options):
        value = getattr(options, spec.name)
        if value is None:
            continue
        allowed = choices_of(hints[spec.name])
        if allowed is not None and value not in allowed:
            raise UserError(f"{flag(spec.name)} {value!r}: expected one of {', '.join(map(str, allowed))}")
        if isinstance(value, float) and math.isnan(value):
            raise UserError(f"{flag(spec.name)} must be a number, got nan")
        low, high = spec.metadata.get("minimum"), spec.metadata.get("maximum")
        if low is not None and value < low:
            raise UserError(f"{flag(spec.name)} must be at least {low}, got {value}")
        if high is not None and value > high:
            raise UserError(f"{flag(spec.name)} must be at most {high}, got {value}")
    check = getattr(options, "check", None)
    if check is not None:
        check()


def _parameter(spec: dataclasses.Field, annotation: Any) -> inspect.Parameter:
    if spec.default is not _REQUIRED:
        default = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        default = spec.default_factory()
    else:
        default = ...
    help_text = spec.metadata.get("help", "")
    allowed = choices_of(annotation)
    extra: dict[str, Any] = {}
    if allowed is not None:
        kind = int if all(isinstance(choice, int) for choice in allowed) else str
        annotation = Optional[kind] if _unwrap_optional(annotation)[1] else kind
        help_text = f"{help_text} ({'|'.join(map(str, allowed))})"
    if _is_text_list(annotation):
        annotation = str
        default = ",".join(default) if isinstance(default, list) else default
        help_text = f"{help_text} (comma-separated)"
    if spec.metadata.get("envvar"):
        extra["envvar"] = spec.metadata["envvar"]
    if spec.metadata.get("positional"):
        value = typer.Argument(default, help=help_text, metavar=spec.name.upper())
    elif annotation is bool:
        value = typer.Option(default, f"{flag(spec.name)}/{flag('no_' + spec.name)}", help=help_text, **extra)
    else:
        value = typer.Option(default, flag(spec.name), help=help_text, **extra)
    return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=annotation)


def typer_command(schema: type[T], run: Callable[[T], None], doc: str) -> Callable[..., None]:
    """A function typer turns into a command with one flag per field of ``schema``; it builds the
    options, validates them (bounds, choices, the schema's own ``check()``) and calls ``run``."""
    hints = _field_types(schema)
    parameters = [_parameter(spec, hints[spec.name]) for spec in dataclasses.fields(schema)
                  if not spec.metadata.get("internal")]

    def command(**values: Any) -> None:
        converted = {name: _convert(hints[name], value) for name, value in values.items()}
        options = schema(**converted)
        validate(options)
        run(options)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = doc
    command.__name__ = schema.__name__
    return command


def to_argv(options: Any, leave_out: tuple[str, ...] = ()) -> list[str]:
    """The flags that rebuild ``options`` (every field that differs from its default), for a command re-run in
    other processes: a launcher's children get the options themselves, not the parent's command line or YAML."""
    argv: list[str] = []
    for spec in dataclasses.fields(options):
        value = getattr(options, spec.name)
        if spec.name in leave_out or value is None or spec.metadata.get("internal"):
            continue
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        if value == default:
            continue
        if spec.metadata.get("positional"):
            argv.append(str(value))
        elif isinstance(value, bool):
            argv.append(flag(spec.name) if value else flag("no_" + spec.name))
        else:
            argv += [flag(spec.name), ",".join(value) if isinstance(value, list) else str(value)]
    return argv


def _convert(annotation: Any, value: Any) -> Any:
    """Path fields given as strings (YAML) become Paths, comma-separated text a list of names (a list
    stays one); everything else is as click parsed it."""
    inner, _ = _unwrap_optional(annotation)
    if inner is Path and isinstance(value, str):
        return Path(value)
    if _is_text_list(inner) and isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value
