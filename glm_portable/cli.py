"""The command line: parses flags, calls the modules, turns user mistakes into exit code 2."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from glm_portable.errors import GlmPortableError, UserError
from glm_portable.schema import DEVICE_HELP, typer_command
from glm_portable.bench.options import BenchOptions
from glm_portable.data.options import PreprocessOptions
from glm_portable.demo import DemoOptions
from glm_portable.evaluation.options import EvalOptions
from glm_portable.modeling.options import TinyModelOptions
from glm_portable.serving.options import ChatOptions, ExportOptions, ServeOptions
from glm_portable.training.options import TrainOptions

CONFIG_HELP = ("Every command's options may also come from a YAML file: --config FILE.yaml (or the file right after "
               "the command, `glm-portable train run.yaml`), with keys named as the options (max-steps: 100); "
               "options given on the command line win.")
app = typer.Typer(
    name="glm-portable",
    help="Fine-tune ChatGLM models on CUDA GPUs, Ascend NPUs or CPUs with the same commands. " + CONFIG_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

@app.callback()
def _root() -> None:
    """Fine-tune ChatGLM models on CUDA GPUs, Ascend NPUs or CPUs with the same commands."""


DeviceOption = typer.Option(None, "--device", help=DEVICE_HELP)


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
    cpu = report["cpu"]
    console.print(f"cpu: {cpu['torch_threads']} torch threads, {cpu['cores']} cores, load {cpu['load_1min']}")
    if cpu["warning"]:
        err_console.print(f"[yellow]warning:[/] {escape(cpu['warning'])}")


def _make_tiny_model(options: TinyModelOptions) -> None:
    from glm_portable.modeling.tiny import make_tiny_model

    choices = {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name != "out"}
    with console.status(f"training a {options.vocab_size}-piece tokenizer and writing a {options.layers}-layer "
                        f"{options.family} model"):
        path = make_tiny_model(options.out, **choices)
    console.print(f"wrote {options.family} tiny model to [bold]{path}[/]")


def _preprocess(options: "PreprocessOptions") -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from glm_portable.data import preprocess

    out = options.out
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


def _train(options: "TrainOptions") -> None:
    from glm_portable.entry import train

    outcome = train(options, announce=console.print)
    if outcome.plan is not None:
        print(json.dumps(outcome.plan, indent=2, ensure_ascii=False))
    elif outcome.exit_code is not None:
        raise typer.Exit(outcome.exit_code)
    elif outcome.rank == 0:
        console.print(f"done: {json.dumps(outcome.metrics)}; run directory [bold]{options.output}[/]")


def _evaluate(options: "EvalOptions") -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from glm_portable.entry import evaluate
    from glm_portable.evaluation import METRIC_KEYS

    with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bars:
        task = bars.add_task("generating", total=None)
        results = evaluate(options, on_start=lambda n: bars.update(task, total=n),
                           on_batch=lambda n: bars.advance(task, n))
    console.print(" ".join(f"{k} {results[k]:.2f}" for k in METRIC_KEYS)
                  + f"  ({results['samples']} samples, {results['empty_predictions']} empty; "
                  f"{results['samples_per_second']} samples/s on {results['settings']['device']})")
    console.print(f"wrote [bold]{options.output}[/]")


def _chat(options: ChatOptions) -> None:
    from glm_portable.entry import open_chat

    session = open_chat(options)
    turns, query = session.turns, options.query
    if query is not None:
        answer = ""
        for answer, _ in turns(query, []):
            pass
        print(answer)
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    console.print(f"{session.description}. Type /clear to forget the conversation, /exit to leave; Ctrl-C stops an "
                  "answer, and quits at the prompt.")
    history: list = []
    while True:
        try:
            text = console.input("[bold]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/clear":
            history = []
            console.print("[dim](history cleared)[/]")
            continue
        if not text:
            continue
        shown, stream = "", turns(text, history)
        try:
            for answer, updated in stream:
                print(answer[len(shown):] if answer.startswith(shown) else "\n" + answer, end="", flush=True)
                shown, history = answer, updated
        except KeyboardInterrupt:
            stream.close()  # ends the generation before the next question starts one
            print(" [stopped]", end="", flush=True)
        print()


def _demo(options: DemoOptions) -> None:
    from glm_portable.backends import select_backend
    from glm_portable.demo import run_demo
    from glm_portable.evaluation import METRIC_KEYS

    selection = select_backend(options.device)
    console.print(f"device: [bold]{selection.backend.name}[/] ({selection.reason})")
    with console.status("starting") as status:
        report = run_demo(options, selection, stage=lambda text: status.update(text))
    losses = report.losses
    console.print(f"trained {report.method} for {report.steps} steps; loss "
                  + " → ".join(f"{loss:.2f}" for _, loss in losses[:: max(1, len(losses) // 6)] + losses[-1:]))
    table = Table("metric", "before", "after")
    for key in METRIC_KEYS:
        table.add_row(key, f"{report.before[key]:.2f}", f"{report.after[key]:.2f}")
    console.print(table)
    example = (report.output / "eval-after" / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()[0]
    console.print(f"example: {json.loads(example)}")
    console.print(f"{report.seconds:.0f} s. Files in [bold]{report.output}[/]: model/, data/, run/ (checkpoints, "
                  "metrics.jsonl, loss.png), eval-before/, eval-after/ (generated_predictions.txt, eval_results.json)")


def _bench(options: "BenchOptions") -> None:
    from glm_portable.entry import bench

    record = bench(options)
    if record is None:
        return
    res = record["results"]
    mfu = f"{res['mfu'] * 100:.1f} %" if res["mfu"] is not None else "unknown (no peak for this device: --peak-tflops)"
    console.print(f"{record['name']}: {res['samples_per_s']:.2f} samples/s, {res['tokens_per_s']:.0f} tokens/s, "
                  f"step p50 {res['step_time_s']['p50'] * 1000:.1f} ms p90 {res['step_time_s']['p90'] * 1000:.1f} ms, "
                  f"MFU {mfu}, peak memory {max(res['peak_memory_bytes']) / 2**30:.2f} GiB")
    console.print(f"wrote [bold]{options.out}[/]")


@app.command("compare")
def compare_command(
    records: list[Path] = typer.Argument(..., help="Bench records; the first is the baseline."),
    out: Path = typer.Option(..., help="Directory for report.md, compare.json and the plots."),
    force: bool = typer.Option(False, help="Compare records whose workloads differ (marked in the report)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it holds files."),
) -> None:
    """Compare bench records: throughput table, loss curves, and the loss-alignment verdict (mean error < 2 %)."""
    from glm_portable.bench.compare import REPORT, compare

    summary = compare(records, out, force, overwrite)
    console.print(escape((out / REPORT).read_text(encoding="utf-8").split("## Records")[0]), highlight=False)
    console.print(f"wrote [bold]{out}[/]")
    for entry in summary["alignment"]:
        if not entry["passed"]:
            err_console.print(f"[yellow]{entry['name']} does not align with {summary['baseline']}[/]")


def _serve(options: ServeOptions) -> None:
    from glm_portable.serving.server import serve

    def ready(url: str, description: str) -> None:
        print(f"serving {description} at {url} (chat page {url}/, OpenAI API {url}/v1); Ctrl-C stops", flush=True)

    serve(options, ready)
    console.print("server stopped")


def _export(options: ExportOptions) -> None:
    from glm_portable.serving.export import export

    with console.status(f"exporting {options.checkpoint} onto {options.model}"):
        out, method = export(options)
    console.print(f"wrote {method} model directory [bold]{out}[/] (upstream layout)")


app.command("preprocess")(typer_command(PreprocessOptions, _preprocess, "Tokenize a dataset once into Arrow shards "
                                        "that every backend trains from."))
app.command("evaluate")(typer_command(EvalOptions, _evaluate, "Generate answers for held-out prompts and score them "
                                      "with THUDM's BLEU-4 and ROUGE."))
app.command("make-tiny-model")(typer_command(TinyModelOptions, _make_tiny_model, "Build a small ChatGLM-6B, ChatGLM2 "
                                             "or ChatGLM3 directory in upstream layout (tokenizer, config, random "
                                             "weights) in seconds."))
app.command("demo")(typer_command(DemoOptions, _demo, "The whole pipeline on a tiny model: build, preprocess, evaluate, "
                                  "fine-tune, evaluate again, report."))
app.command("chat")(typer_command(ChatOptions, _chat, "Chat in the terminal (streaming, history, /clear, /exit), or "
                                  "answer one --query for scripts."))
app.command("train")(typer_command(TrainOptions, _train, """Fine-tune with P-Tuning v2, LoRA or full fine-tuning on \
one card or many (same command on CPU, GPU and NPU).

    Options may also come from a YAML file: --config run.yaml, or `glm-portable train run.yaml`; flags win.
    """))
app.command("bench")(typer_command(BenchOptions, _bench, "Measure a standard fine-tuning workload: samples/s, "
                                   "tokens/s, step times, MFU, peak memory, losses."))
app.command("serve")(typer_command(ServeOptions, _serve,
                                   "Serve a model (and its checkpoint) over an OpenAI-compatible API and a chat page."))
app.command("export")(typer_command(ExportOptions, _export,
                                    "Merge a LoRA adapter or add a P-Tuning prefix: one model directory in upstream "
                                    "layout."))


@app.command("patches")
def patches_command(
    model: Optional[Path] = typer.Option(None, help="A model directory whose own code (auto_map) is checked too."),
    impl: str = typer.Option("native", "--impl", help="remote: import the directory's code (it runs) to decide its "
                             "patches; native (default): read its files as text only."),
    device: Optional[str] = DeviceOption,
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    """Every patch for the installed stack: needed?, applied?, why (library ones, and a model directory's code)."""
    from glm_portable.modeling.remote import check_impl, check_remote_dir
    from glm_portable.process import start_process
    from glm_portable.patches import Context, patch_table

    check_impl(impl)
    backend, note = _backend_for_planning(device)
    ctx = Context.current(backend.name, backend.kernels(None))
    start_process(backend)
    report = None
    if model is not None and impl == "remote":
        report = _import_remote_code(model, ctx)
    elif model is not None:
        references = [r[0] if isinstance(r, list) else r for r in check_remote_dir(model).values()]
        files = sorted({str(r).split(".")[0] + ".py" for r in references if r})
        note += f"; {model}'s code ({', '.join(files)}) was read, not run: --impl remote decides its patches"
    rows = patch_table(ctx, report, model)
    if as_json:
        print(json.dumps({"device": backend.name, "note": note, "versions": ctx.versions, "patches": rows},
                         indent=2, ensure_ascii=False))
        return
    console.print(f"device: [bold]{backend.name}[/] ({note}); transformers {ctx.versions['transformers']}, "
                  f"deepspeed {ctx.versions['deepspeed']}, torch {ctx.versions['torch']}")
    table = Table("kind", "needed", "applied", "why")
    table.columns.insert(0, Column("patch", no_wrap=True))
    marks = {True: "[green]yes[/]", False: "no", None: "-"}
    for row in rows:
        table.add_row(row["name"], row["kind"], marks[row["needed"]], marks[row["applied"]], escape(row["why"]))
    console.print(table)


def _backend_for_planning(device: Optional[str]):
    """The selected backend, or the named one even where it is absent (to see what it would need)."""
    from glm_portable.backends import DEVICE_ENV, BackendUnavailable, get_backend, select_backend

    try:
        selection = select_backend(device)
        return selection.backend, selection.reason
    except BackendUnavailable as exc:
        name = (device or os.environ.get(DEVICE_ENV, "")).strip().lower()
        return get_backend(name), f"not available here, decisions for {name}: {str(exc).splitlines()[0]}"


def _import_remote_code(model: Path, ctx):
    """Import the directory's own classes (no weights) under the patch hook; the hook's decisions."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from glm_portable.modeling.remote import check_remote_dir
    from glm_portable.patches import remote_code_patched

    with remote_code_patched(ctx) as report:
        for reference in check_remote_dir(model).values():
            if isinstance(reference, str):
                get_class_from_dynamic_module(reference, str(model))
    return report


def config_defaults(argv: list[str]) -> dict[str, dict]:
    """``--config FILE.yaml`` anywhere on the line: its keys become the command's defaults, so flags win.

    Keys are option names with dashes or underscores (``max-steps`` or ``max_steps``). A YAML file
    right after the command (``glm-portable train run.yaml``, as LLaMA-Factory users type) is read the same way.
    """
    command_at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise UserError("--config needs a YAML file")
        path = Path(argv[index + 1])
        del argv[index:index + 2]
    elif (command_at is not None and command_at + 1 < len(argv) and argv[command_at + 1].endswith((".yaml", ".yml"))
          and Path(argv[command_at + 1]).is_file()):
        path = Path(argv.pop(command_at + 1))
    else:
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise UserError(f"--config {path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise UserError(f"--config {path}:{mark.line + 1 if mark else '?'}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values")
    command = next((a for a in argv if not a.startswith("-")), None)
    commands = typer.main.get_command(app).commands
    if command not in commands:
        return {}
    # A YAML list is a list option's comma-separated text (lora-target: [query_key_value, dense]).
    values = {str(k).replace("-", "_"): ",".join(map(str, v)) if isinstance(v, list) else v for k, v in data.items()}
    known = {p.name for p in commands[command].params}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"--config {path}: unknown options for {command}: {', '.join(unknown)}")
    return {command: values}


# A path the user gave that cannot be written (permissions, read-only, full disk, a file where a folder
# goes): their environment, not our bug, so one message and exit 2 rather than a traceback.
USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
                  errno.EEXIST}


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: one message and exit code 2 for user mistakes, never a traceback.

    Usage errors are click's own (exit 2); anything that is neither is an internal error (exit 1).
    """
    try:
        args = list(sys.argv[1:] if argv is None else argv)
        app(args=args, default_map=config_defaults(args))
    except GlmPortableError as exc:
        label = "" if exc.exit_code == 0 else "[bold red]error:[/] "
        err_console.print(f"{label}{escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in USER_OS_ERRORS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        err_console.print(f"[bold red]error:[/] {escape(where + (exc.strerror or str(exc)))}", highlight=False,
                          soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
