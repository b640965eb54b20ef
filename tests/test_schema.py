"""Options defined once: the flags, their defaults, choices, bounds and environment come from the dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import pytest
import typer
from typer.testing import CliRunner

from glm_portable.errors import UserError
from glm_portable.schema import option, to_argv, typer_command, validate


@dataclass
class Example:
    model: Path = option(help="A directory.")
    impl: Literal["native", "remote"] = option("native", "Which code.")
    dtype: Optional[Literal["float32", "bfloat16"]] = option(None, "A dtype.")
    batch: int = option(16, "Rows.", minimum=1)
    rate: float = option(0.8, "A rate.", minimum=0, maximum=2)
    secret: Optional[str] = option(None, "A key.", envvar="EXAMPLE_SECRET")
    loud: bool = option(False, "Say more.")


def run(args, env=None):
    seen = []
    app = typer.Typer()
    app.command("go")(typer_command(Example, seen.append, "Do it."))
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["go", *args], env=env)
    return result, seen


def test_flags_defaults_and_environment_come_from_the_fields():
    result, seen = run(["--model", "m", "--impl", "remote", "--batch", "4", "--loud"], env={"EXAMPLE_SECRET": "k"})
    assert result.exit_code == 0, result.output
    assert seen == [Example(model=Path("m"), impl="remote", batch=4, secret="k", loud=True)]
    help_text = run(["--help"])[0].output
    for text in ("--model", "--impl", "(native|remote)", "--batch", "--rate", "--no-loud", "EXAMPLE_SECRET", "Do it."):
        assert text in help_text, text


@pytest.mark.parametrize("args,message", [
    (["--batch", "0"], "--batch must be at least 1, got 0"),
    (["--rate", "3"], "--rate must be at most 2, got 3.0"),
    (["--rate", "nan"], "--rate must be a number, got nan"),
    (["--impl", "other"], "--impl 'other': expected one of native, remote"),
    (["--dtype", "int8"], "--dtype 'int8': expected one of float32, bfloat16"),
])
def test_bounds_and_choices_are_one_user_error(args, message):
    result, seen = run(["--model", "m", *args])
    assert isinstance(result.exception, UserError) and str(result.exception) == message and not seen


def test_a_missing_required_option_is_click_s_usage_error():
    result, _ = run([])
    assert result.exit_code == 2 and "--model" in result.output


def test_validate_serves_library_callers_too():
    with pytest.raises(UserError, match="--batch must be at least 1"):
        validate(Example(model=Path("m"), batch=0))


@dataclass
class Launched:
    out: Path = option(help="Where.", positional=True)
    names: list[str] = option(["a"], "Names.")
    steps: int = option(3, "Steps.", minimum=1)
    loud: bool = option(True, "Say more.")
    note: Optional[str] = option(None, "A note.")
    rank: int = option(0, internal=True)


def test_to_argv_rebuilds_the_options_a_launched_process_needs():
    """Children get the options themselves: parsing to_argv's flags gives back equal options (internal fields
    and left-out ones excepted), and list fields travel as comma-separated text."""
    original = Launched(out=Path("o"), names=["x", "y"], steps=5, loud=False, note="n", rank=3)
    argv = to_argv(original, leave_out=("note",))
    assert argv == ["o", "--names", "x,y", "--steps", "5", "--no-loud"]
    seen = []
    app = typer.Typer()
    app.command("go")(typer_command(Launched, seen.append, "Do it."))
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["go", *argv])
    assert result.exit_code == 0, result.output
    assert seen == [Launched(out=Path("o"), names=["x", "y"], steps=5, loud=False)]
    assert "--rank" not in CliRunner().invoke(app, ["go", "--help"]).output
