"""The command line: parses flags, calls the modules, turns user mistakes into exit code 2."""

from __future__ import annotations

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
from glm_portable.schema import DEVICE_HELP, IMPL_HELP, typer_command
from glm_portable.serving.options import ExportOptions, ServeOptions

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
ImplOption = typer.Option("native", "--impl", help=IMPL_HELP)


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


@app.command("make-tiny-model")
def make_tiny_model_command(
    out: Path = typer.Argument(..., help="Directory to create."),
    family: str = typer.Option("chatglm3", help="chatglm (ChatGLM-6B), chatglm2 or chatglm3 (architecture, "
                               "prompt format and special tokens)."),
    layers: int = typer.Option(2, help="Number of transformer layers."),
    hidden_size: int = typer.Option(64, help="Hidden size."),
    heads: int = typer.Option(4, help="Attention heads (head size = hidden / heads)."),
    kv_groups: Optional[int] = typer.Option(None, help="Key/value groups (multi-query attention; default 2; "
                                            "not for chatglm)."),
    vocab_size: int = typer.Option(1000, help="SentencePiece vocabulary size before the special tokens."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    shards: int = typer.Option(1, help="Number of safetensors shards (more than one writes an index json)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Build a small ChatGLM-6B, ChatGLM2 or ChatGLM3 directory in upstream layout (tokenizer, config, random
    weights) in seconds."""
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


@app.command("train")
def train_command(
    model: Path = typer.Option(..., help="Base model directory."),
    data: Path = typer.Option(..., help="Directory written by `glm-portable preprocess` for this model."),
    output: Path = typer.Option(..., help="Run directory (checkpoints, metrics.jsonl, run.json, loss.png)."),
    method: str = typer.Option("ptuning", help="ptuning (P-Tuning v2), lora, or full (with --deepspeed)."),
    impl: str = ImplOption,
    deepspeed: Optional[str] = typer.Option(None, help="zero2 or zero3: DeepSpeed ZeRO for --method full."),
    deepspeed_config: Optional[Path] = typer.Option(None, help="A DeepSpeed JSON merged over the generated config."),
    offload: bool = typer.Option(False, help="ZeRO optimizer state offloaded to CPU memory."),
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = typer.Option(None, help="Base model dtype (default: the backend's: bf16, fp16 or fp32 on CPU)."),
    pre_seq_len: int = typer.Option(128, help="P-Tuning prefix length."),
    prefix_projection: bool = typer.Option(False, help="P-Tuning with the two-layer prefix projection."),
    lora_rank: int = typer.Option(8), lora_alpha: int = typer.Option(32), lora_dropout: float = typer.Option(0.1),
    lora_target: str = typer.Option("query_key_value", help="Comma-separated module names LoRA adapts."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default by method: ptuning 2e-2, lora 1e-4, full 1e-4)."),
    batch_size: int = typer.Option(1, help="Per-process batch size."),
    grad_accum: int = typer.Option(16, help="Gradient accumulation steps."),
    max_steps: int = typer.Option(3000), warmup_steps: int = typer.Option(0),
    logging_steps: int = typer.Option(10), save_steps: int = typer.Option(1000),
    save_total_limit: Optional[int] = typer.Option(None, help="Keep only the newest K checkpoints."),
    seed: int = typer.Option(42),
    padding: Optional[str] = typer.Option(None, help="fixed (static shapes; NPU default) or dynamic (others' default)."),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute activations to save memory."),
    nproc: int = typer.Option(1, help="Processes (cards) on this node."),
    nnodes: int = typer.Option(1), node_rank: int = typer.Option(0),
    master_addr: str = typer.Option("127.0.0.1"), master_port: int = typer.Option(29500),
    resume: Optional[str] = typer.Option(None, help="auto (newest complete checkpoint of --output) or a checkpoint dir."),
    overwrite: bool = typer.Option(False, help="Replace an existing run in --output."),
    dry_run: bool = typer.Option(False, help="Print the plan (processes, devices, environment, precision, data) and exit."),
) -> None:
    """Fine-tune with P-Tuning v2, LoRA or full fine-tuning on one card or many (same command on CPU, GPU and NPU).

    Options may also come from a YAML file: --config run.yaml, or `glm-portable train run.yaml`; flags win.
    """
    from glm_portable.backends import select_backend
    from glm_portable.training.launcher import dry_run_plan, is_launched_child, launch, plan
    from glm_portable.training.options import TrainOptions
    from glm_portable.training.run_dir import refuse_finished, resolve_resume
    from glm_portable.training.trainer import run_identity, run_training

    options = TrainOptions(
        model=model, data=data, output=output, method=method, impl=impl, deepspeed=deepspeed, deepspeed_config=deepspeed_config,
        offload=offload, device=device, dtype=dtype, pre_seq_len=pre_seq_len,
        prefix_projection=prefix_projection, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_target=[t.strip() for t in lora_target.split(",") if t.strip()], lr=lr, batch_size=batch_size,
        grad_accum=grad_accum, max_steps=max_steps, warmup_steps=warmup_steps, logging_steps=logging_steps,
        save_steps=save_steps, save_total_limit=save_total_limit, seed=seed, padding=padding,
        gradient_checkpointing=gradient_checkpointing, nproc=nproc, nnodes=nnodes, node_rank=node_rank,
        master_addr=master_addr, master_port=master_port, resume=resume, overwrite=overwrite,
    )
    options.validate()
    if dry_run:
        print(json.dumps(dry_run_plan(options), indent=2, ensure_ascii=False))
        return
    selection = select_backend(device)
    if (nproc > 1 or nnodes > 1 or options.deepspeed) and not is_launched_child():
        plan(options, selection.backend, selection.reason)
        checkpoint = resolve_resume(options.output, run_identity(options), options.resume, options.overwrite,
                                    nproc * nnodes, verify=False)  # rank 0 verifies the checksums once
        refuse_finished(options.output, checkpoint, options.max_steps)
        console.print(f"launching {nproc} × {nnodes} processes on {selection.backend.name}")
        raise typer.Exit(launch(options, selection.backend, sys.argv[1:]))
    result = run_training(options, selection.backend, selection.reason)
    if int(os.environ.get("RANK", 0)) == 0:
        console.print(f"done: {json.dumps(result.metrics)}; run directory [bold]{output}[/]")


@app.command("evaluate")
def evaluate_command(
    model: Path = typer.Option(..., help="Base model directory."),
    data: Path = typer.Option(..., help="A preprocessed directory (its eval split) or a raw JSON/JSONL file."),
    output: Path = typer.Option(..., help="Where generated_predictions.txt and eval_results.json go."),
    checkpoint: Optional[Path] = typer.Option(None, help="A run directory or checkpoint: prefix, LoRA adapter or full model."),
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = typer.Option(None, help="Model dtype (default: the backend's)."),
    batch_size: int = typer.Option(32, help="Prompts generated together (left-padded, KV cache)."),
    max_new_tokens: int = typer.Option(128),
    sample: bool = typer.Option(False, help="Sample like THUDM's scripts (top_p 0.7, temperature 0.95) instead of greedy."),
    top_p: float = typer.Option(0.7), temperature: float = typer.Option(0.95), seed: int = typer.Option(42),
    max_source_length: int = typer.Option(64, help="Prompt length for raw files."),
    max_target_length: int = typer.Option(128, help="Answer tokens the references are cut to, for raw files "
                                          "(THUDM's scoring; preprocessed data carries its own)."),
    limit: Optional[int] = typer.Option(None, help="Evaluate the first N rows only."),
    impl: str = ImplOption,
    overwrite: bool = typer.Option(False, help="Replace an earlier evaluation in --output."),
) -> None:
    """Generate answers for held-out prompts and score them with THUDM's BLEU-4 and ROUGE."""
    from glm_portable.process import start_process
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from glm_portable.backends import select_backend
    from glm_portable.evaluation import METRIC_KEYS, EvalOptions, evaluate, evaluation_settings
    from glm_portable.modeling.remote import check_impl

    check_impl(impl)
    selection = select_backend(device)
    start_process(selection.backend)
    options = EvalOptions(model=model, data=data, output=output, checkpoint=checkpoint, batch_size=batch_size,
                          sampling=evaluation_settings(max_new_tokens, sample, top_p, temperature, seed), dtype=dtype,
                          max_source_length=max_source_length, max_target_length=max_target_length, limit=limit,
                          impl=impl, overwrite=overwrite)
    with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bars:
        task = bars.add_task("generating", total=None)
        results = evaluate(options, selection.backend, on_start=lambda n: bars.update(task, total=n),
                           on_batch=lambda n: bars.advance(task, n))
    console.print(" ".join(f"{k} {results[k]:.2f}" for k in METRIC_KEYS)
                  + f"  ({results['samples']} samples, {results['empty_predictions']} empty; "
                  f"{results['samples_per_second']} samples/s on {selection.backend.name})")
    console.print(f"wrote [bold]{output}[/]")


@app.command("chat")
def chat_command(
    model: Path = typer.Option(..., help="Base model directory."),
    checkpoint: Optional[Path] = typer.Option(None, help="A run directory or checkpoint: prefix, LoRA adapter or full model."),
    query: Optional[str] = typer.Option(None, help="Answer this one question, print the answer and exit."),
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = typer.Option(None),
    max_new_tokens: int = typer.Option(256),
    greedy: bool = typer.Option(False, help="Greedy decoding instead of ChatGLM's sampling (top_p 0.8, temperature 0.8)."),
    top_p: float = typer.Option(0.8), temperature: float = typer.Option(0.8),
    impl: str = ImplOption,
) -> None:
    """Chat in the terminal (streaming, history, /clear, /exit), or answer one --query for scripts."""
    from glm_portable.process import start_process
    from glm_portable.backends import select_backend
    from glm_portable.evaluation import load_for_inference
    from glm_portable.modeling import GenerationSettings, load_tokenizer, stream_chat
    from glm_portable.modeling.remote import check_impl, load_remote_tokenizer

    check_impl(impl)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=not greedy, top_p=top_p, temperature=temperature)
    settings.check()
    if query is not None and not query.strip():
        raise UserError("--query is empty: give the question to answer")
    selection = select_backend(device)
    start_process(selection.backend)
    loaded = load_for_inference(model, checkpoint, selection.backend, dtype, impl)
    if impl == "remote":
        tokenizer = load_remote_tokenizer(model, selection.backend)
        family = type(tokenizer).__name__

        def turns(text: str, history: list):
            """The directory's own stream_chat, as its README runs it."""
            yield from loaded.stream_chat(tokenizer, text, history, max_new_tokens=max_new_tokens,
                                          do_sample=not greedy, top_p=top_p, temperature=temperature)
    else:
        tokenizer = load_tokenizer(model)
        family = tokenizer.family

        def turns(text: str, history: list):
            yield from stream_chat(loaded, tokenizer, text, history, settings)

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
    console.print(f"{family} ({impl}) on {selection.backend.name}. Type /clear to forget the conversation, /exit "
                  "to leave; Ctrl-C stops an answer, and quits at the prompt.")
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


@app.command("demo")
def demo_command(
    output: Path = typer.Option(Path("glm-portable-demo"), help="Directory for everything the demo makes (an earlier demo there is replaced)."),
    method: str = typer.Option("lora", help="lora or ptuning."),
    family: str = typer.Option("chatglm3", help="chatglm (ChatGLM-6B), chatglm2 or chatglm3."),
    device: Optional[str] = DeviceOption,
    steps: int = typer.Option(200, help="Training steps."),
) -> None:
    """The whole pipeline on a tiny model: build, preprocess, evaluate, fine-tune, evaluate again, report."""
    from glm_portable.backends import select_backend
    from glm_portable.demo import run_demo
    from glm_portable.evaluation import METRIC_KEYS

    selection = select_backend(device)
    console.print(f"device: [bold]{selection.backend.name}[/] ({selection.reason})")
    with console.status("starting") as status:
        report = run_demo(output, method, selection, steps, stage=lambda text: status.update(text), family=family)
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


@app.command("bench")
def bench_command(
    shape: str = typer.Option(..., help="tiny, 1b, chatglm-6b, chatglm2-6b, chatglm3-6b (random weights, no download) or a model directory."),
    out: Path = typer.Option(..., help="The record to write (JSON)."),
    method: str = typer.Option("ptuning", help="ptuning, lora, or full (DeepSpeed ZeRO-2)."),
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = typer.Option(None, help="bfloat16, float16 or float32 (default: the backend's)."),
    steps: int = typer.Option(20, help="Measured optimizer steps."),
    warmup: int = typer.Option(3, help="Steps run first and not timed (their losses are kept)."),
    batch_size: int = typer.Option(4, help="Per-device batch size."),
    grad_accum: int = typer.Option(1, help="Gradient accumulation steps."),
    source_length: int = typer.Option(64, help="Prompt tokens per sample (THUDM: 64)."),
    target_length: int = typer.Option(128, help="Answer tokens per sample (THUDM: 128)."),
    pre_seq_len: int = typer.Option(128, help="P-Tuning prefix length."),
    lora_rank: int = typer.Option(8, help="LoRA rank."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default by method: ptuning 2e-2, lora 1e-4, full 1e-4)."),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute activations to save memory."),
    nproc: int = typer.Option(1, help="Processes (cards) on this node."),
    master_port: int = typer.Option(29500),
    seed: int = typer.Option(42, help="Seeds the weights, the synthetic data and the run."),
    peak_tflops: Optional[float] = typer.Option(None, help="Device peak TFLOP/s for MFU (default: the backend's table)."),
    name: Optional[str] = typer.Option(None, help="The record's name in comparisons (default: backend-dtype-Nx)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Measure a standard fine-tuning workload: samples/s, tokens/s, step times, MFU, peak memory, losses."""
    from glm_portable.backends import select_backend
    from glm_portable.bench.runner import bench
    from glm_portable.bench.workload import Workload

    workload = Workload(shape=shape, method=method, batch_size=batch_size, grad_accum=grad_accum,
                        source_length=source_length, target_length=target_length, pre_seq_len=pre_seq_len,
                        lora_rank=lora_rank, lr=lr, steps=steps, warmup=warmup, seed=seed,
                        gradient_checkpointing=gradient_checkpointing)
    workload.validate()
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if peak_tflops is not None and not peak_tflops > 0:
        raise UserError(f"--peak-tflops must be a positive number, got {peak_tflops}")
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give the record's file name")
    selection = select_backend(device)
    record = bench(workload, selection.backend, dtype, out, name, peak_tflops, nproc, master_port, overwrite,
                   sys.argv[1:])
    if record is None:
        return
    res = record["results"]
    mfu = f"{res['mfu'] * 100:.1f} %" if res["mfu"] is not None else "unknown (no peak for this device: --peak-tflops)"
    console.print(f"{record['name']}: {res['samples_per_s']:.2f} samples/s, {res['tokens_per_s']:.0f} tokens/s, "
                  f"step p50 {res['step_time_s']['p50'] * 1000:.1f} ms p90 {res['step_time_s']['p90'] * 1000:.1f} ms, "
                  f"MFU {mfu}, peak memory {max(res['peak_memory_bytes']) / 2**30:.2f} GiB")
    console.print(f"wrote [bold]{out}[/]")


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
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
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
