"""The command line: parses flags, calls the modules, turns user mistakes into exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from glm_portable.errors import UserError

app = typer.Typer(
    name="glm-portable",
    help="Fine-tune ChatGLM models on CUDA GPUs, Ascend NPUs or CPUs with the same commands.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

@app.callback()
def _root() -> None:
    """Fine-tune ChatGLM models on CUDA GPUs, Ascend NPUs or CPUs with the same commands."""


DeviceOption = typer.Option(
    None, "--device", help="auto|cpu|cuda|npu (default: $GLM_PORTABLE_DEVICE, else auto: NPU, then GPU, then CPU)"
)


@app.command("env")
def env_command(
    device: Optional[str] = DeviceOption,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Show the selected backend and why, every backend's availability, devices, dtypes and versions."""
    from glm_portable.environment import environment_report

    report = environment_report(device)
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return
    selected = report["selected"]
    console.print(f"[bold]selected device:[/] {selected['device']}  ({selected['reason']})")
    table = Table("backend", "available", "devices", "bf16", "default dtype", "dist", "kernels / reason")
    for name, entry in report["backends"].items():
        if entry["available"]:
            names = ", ".join(sorted(set(entry["device_names"])))
            table.add_row(
                name, "yes", f"{entry['device_count']} × {names}", "yes" if entry["bf16"] else "no",
                entry["default_dtype"], entry["dist_backend"], entry["kernels"],
            )
        else:
            table.add_row(name, "[red]no[/]", "-", "-", "-", "-", entry["reason"])
    console.print(table)
    versions = Table("library", "version")
    versions.add_row("python", report["python"])
    for name, version in report["versions"].items():
        versions.add_row(name, version or "[dim]not installed[/]")
    console.print(versions)
    if report["environment"]:
        env_table = Table("variable", "value")
        for key, value in report["environment"].items():
            env_table.add_row(key, value)
        console.print(env_table)


@app.command("make-tiny-model")
def make_tiny_model_command(
    out: Path = typer.Argument(..., help="Directory to create."),
    family: str = typer.Option("chatglm3", help="chatglm2 or chatglm3 (prompt format and special tokens)."),
    layers: int = typer.Option(2, help="Number of transformer layers."),
    hidden_size: int = typer.Option(64, help="Hidden size."),
    heads: int = typer.Option(4, help="Attention heads (head size = hidden / heads)."),
    kv_groups: int = typer.Option(2, help="Key/value groups (multi-query attention)."),
    vocab_size: int = typer.Option(1000, help="SentencePiece vocabulary size before the special tokens."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    shards: int = typer.Option(1, help="Number of safetensors shards (more than one writes an index json)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Build a small ChatGLM2/3 directory in upstream layout (tokenizer, config, random weights) in seconds."""
    from glm_portable.modeling.tiny import make_tiny_model

    with console.status(f"training a {vocab_size}-piece tokenizer and writing a {layers}-layer {family} model"):
        path = make_tiny_model(out, family, layers, hidden_size, heads, kv_groups, vocab_size, seed, shards, overwrite)
    console.print(f"wrote {family} tiny model to [bold]{path}[/]")


@app.command("preprocess")
def preprocess_command(
    model: Path = typer.Option(..., help="Model directory (its tokenizer and family decide the template)."),
    train_file: Path = typer.Option(..., help="Training data: JSON lines or a JSON array."),
    out: Path = typer.Option(..., help="Output directory (Arrow shards + manifest.json)."),
    eval_file: Optional[Path] = typer.Option(None, help="Evaluation data, same format."),
    format: Optional[str] = typer.Option(None, help="adgen|prompt-completion|context-target|alpaca|conversations (default: detected)."),
    prompt_column: Optional[str] = typer.Option(None, help="Prompt column (adgen: content)."),
    response_column: Optional[str] = typer.Option(None, help="Answer column (adgen: summary)."),
    history_column: Optional[str] = typer.Option(None, help="Column of earlier [query, response] pairs."),
    max_source_length: int = typer.Option(64, help="Prompt tokens kept, [gMASK] sop included."),
    max_target_length: int = typer.Option(128, help="Answer tokens kept."),
    source_prefix: str = typer.Option("", help="Text put before every prompt."),
    num_shards: int = typer.Option(8, help="Arrow shards per split."),
    num_proc: int = typer.Option(1, help="Tokenizer threads."),
    overwrite: bool = typer.Option(False, help="Replace OUT even if it holds data."),
    skip_bad_rows: bool = typer.Option(False, help="Skip malformed rows (counted and listed in the manifest) instead of failing."),
) -> None:
    """Tokenize a dataset once into Arrow shards that every backend trains from."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from glm_portable.data import Columns, PreprocessOptions, preprocess

    options = PreprocessOptions(
        model=model, train_file=train_file, out=out, eval_file=eval_file, format=format,
        columns=Columns(prompt_column, response_column, history_column), max_source_length=max_source_length,
        max_target_length=max_target_length, source_prefix=source_prefix, num_shards=num_shards, num_proc=num_proc,
        overwrite=overwrite, skip_bad_rows=skip_bad_rows,
    )
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bars:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        result = preprocess(options, report)
    manifest = result.manifest
    if result.reused:
        console.print(f"[bold]{out}[/] already holds this data (same inputs, tokenizer and options): reused")
        return
    console.print(f"format: {manifest['format']} ({manifest['format_reason']}); template: {manifest['template']}")
    for name, split in manifest["splits"].items():
        tokens = split["tokens"]
        console.print(
            f"{name}: {split['rows']} rows in {split['num_shards']} shards; skipped {split['skipped_empty']} empty, "
            f"{split['bad_rows']} bad; truncated {split['source_truncated']} prompts, {split['target_truncated']} answers; "
            f"tokens/row mean {tokens.get('mean')} max {tokens.get('max')}"
        )
    console.print(f"wrote [bold]{out}[/] in {manifest['seconds']} s")


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: one message and exit code 2 for user mistakes, never a traceback.

    Usage errors are click's own (exit 2); anything that is neither is an internal error (exit 1).
    """
    try:
        app(args=argv)
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
