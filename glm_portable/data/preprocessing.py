"""``glm-portable preprocess``: raw JSON/JSONL -> tokenized Arrow shards + manifest.json, once.

Rows are stored unpadded (padding happens at batch time); the directory is written under a
temporary name and renamed at the end; a re-run with the same inputs and options reuses it.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from glm_portable import __version__
from glm_portable.atomic import atomic_directory, refuse_to_replace
from glm_portable.errors import UserError
from glm_portable.jsonfile import write_json_object
from glm_portable.locking import exclusive
from glm_portable.modeling import load_config, load_tokenizer
from glm_portable.schema import validate

from .formats import Columns, Example, detect_format, to_example
from .options import PreprocessOptions
from .manifest import FORMAT_VERSION, MANIFEST, cache_key, file_sha256, read_manifest
from .reader import BadRow, Record, read_records
from .templates import Encoded, template_for

CHUNK_ROWS = 16384
BAD_ROWS_LISTED = 100
DETECT_ROWS = 20
Progress = Callable[[str, int, int], None]


@dataclass
class PreprocessResult:
    manifest: dict[str, Any]
    reused: bool
    format_reason: str = ""


@dataclass
class SplitRows:
    examples: list[Example] = field(default_factory=list)
    rows: int = 0
    empty: int = 0
    bad: list[str] = field(default_factory=list)


def _collect(records: list[Record | BadRow], fmt: str, columns: Columns, skip_bad: bool) -> SplitRows:
    out = SplitRows()
    for record in records:
        out.rows += 1
        try:
            if isinstance(record, BadRow):
                raise record
            example = to_example(record, fmt, columns)
        except BadRow as bad:
            if not skip_bad:
                raise UserError(f"{bad} (use --skip-bad-rows to skip and count such rows)") from None
            out.bad.append(str(bad))
            continue
        if example is None:
            out.empty += 1
        else:
            out.examples.append(example)
    return out


def _encode(template, tokenizer, examples: list[Example], options: PreprocessOptions, train: bool,
            progress: Optional[Progress], stage: str) -> Encoded:
    total = Encoded()
    encode = template.encode_train if train else template.encode_eval
    for start in range(0, len(examples), CHUNK_ROWS):
        part = encode(tokenizer, examples[start:start + CHUNK_ROWS], options.max_source_length,
                      options.max_target_length, options.source_prefix, options.num_proc)
        total.input_ids += part.input_ids
        total.labels += part.labels
        total.references += part.references
        total.full_references += part.full_references
        total.source_truncated += part.source_truncated
        total.target_truncated += part.target_truncated
        if progress:
            progress(stage, min(start + CHUNK_ROWS, len(examples)), len(examples))
    return total


def _length_stats(rows: list[list[int]]) -> dict[str, Any]:
    lengths = sorted(len(r) for r in rows)
    if not lengths:
        return {}
    return {"min": lengths[0], "max": lengths[-1], "mean": round(statistics.fmean(lengths), 2),
            "p50": lengths[len(lengths) // 2], "p95": lengths[min(len(lengths) - 1, int(len(lengths) * 0.95))],
            "total": sum(lengths)}


def _int_lists(rows: list[list[int]]):
    """A pyarrow list<int32> array built from one flat buffer, not row by row."""
    import numpy as np
    import pyarrow as pa

    lengths = np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)), values


def _save_split(encoded: Encoded, train: bool, directory: Path, num_shards: int, fingerprint: str) -> tuple[int, int | None]:
    """Write the split as Arrow shards; returns (shards, number of trained label tokens)."""
    import datasets
    import pyarrow as pa

    datasets.disable_progress_bars()
    ids, _ = _int_lists(encoded.input_ids)
    if train:
        labels, label_values = _int_lists(encoded.labels)
        table = pa.table({"input_ids": ids, "labels": labels})
        label_tokens = int((label_values >= 0).sum())
    else:
        table = pa.table({"input_ids": ids, "reference": pa.array(encoded.references, type=pa.string()),
                          "reference_full": pa.array(encoded.full_references, type=pa.string())})
        label_tokens = None
    dataset = datasets.Dataset(datasets.table.InMemoryTable(table), fingerprint=fingerprint)
    shards = max(1, min(num_shards, len(dataset)))
    dataset.save_to_disk(str(directory), num_shards=shards)
    return shards, label_tokens


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Millions of short lists would make the cyclic GC rescan the heap again and again (2-3x slower);
    none of them form cycles, so collection waits until the work is done."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def preprocess(options: PreprocessOptions, progress: Optional[Progress] = None) -> PreprocessResult:
    """Tokenize the train (and eval) file for the model's family; see the module docstring."""
    with exclusive(Path(options.out), "preprocess"), _gc_paused():
        return _preprocess(options, progress)


def _preprocess(options: PreprocessOptions, progress: Optional[Progress]) -> PreprocessResult:
    validate(options)
    load_config(options.model)  # the directory must be a model this tool trains, before any work
    tokenizer = load_tokenizer(options.model)
    template = template_for(tokenizer)
    splits = {"train": options.train_file}
    if options.eval_file:
        splits["eval"] = options.eval_file
    for name, path in splits.items():
        if not Path(path).is_file():
            raise UserError(f"--{name}-file {path}: no such file")
    sources = [{"split": name, "path": str(path), "sha256": file_sha256(path)} for name, path in splits.items()]
    settings = {"format": options.format, "columns": vars(options.columns), "max_source_length": options.max_source_length,
                "max_target_length": options.max_target_length, "source_prefix": options.source_prefix,
                "num_shards": options.num_shards}
    key = cache_key({"sources": [s["sha256"] for s in sources], "tokenizer": tokenizer.fingerprint(),
                     "template": template.name, **settings})
    out = Path(options.out)
    if (out / MANIFEST).is_file() and not options.overwrite:
        existing = read_manifest(out)
        if existing.get("cache_key") == key:
            return PreprocessResult(existing, reused=True, format_reason="reused")
        raise UserError(f"{out}: already holds data made from other inputs or options (use --overwrite to replace it)")
    refuse_to_replace(out, options.overwrite)

    started = time.perf_counter()
    records = {name: list(read_records(path)) for name, path in splits.items()}
    if not records["train"]:
        raise UserError(f"{options.train_file}: no rows")
    fmt, reason = options.format, "given by --format"
    if fmt is None:
        sample = [r.value for r in records["train"] if isinstance(r, Record)][:DETECT_ROWS]
        fmt, reason = detect_format(sample, options.columns, str(options.train_file))
    collected = {name: _collect(recs, fmt, options.columns, options.skip_bad_rows) for name, recs in records.items()}
    if not collected["train"].examples:
        raise UserError(f"{options.train_file}: no usable rows ({collected['train'].empty} with an empty prompt or answer, "
                        f"{len(collected['train'].bad)} bad)")
    encoded = {name: _encode(template, tokenizer, rows.examples, options, name == "train", progress, f"tokenizing {name}")
               for name, rows in collected.items()}

    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "glm_portable_version": __version__, "cache_key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"path": str(options.model), "family": tokenizer.family},
        "template": template.name,
        "tokenizer": {"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
                      "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id},
        "format": fmt, "format_reason": reason, "settings": settings,
        "limits": {"max_source_length": options.max_source_length, "max_target_length": options.max_target_length,
                   "fixed_length": template.fixed_length(options.max_source_length, options.max_target_length)},
        "sources": [], "splits": {},
    }
    with atomic_directory(out, overwrite=options.overwrite) as tmp:
        for name, rows in collected.items():
            enc = encoded[name]
            if progress:
                progress(f"writing {name}", 0, 1)
            shards, label_tokens = _save_split(enc, name == "train", tmp / name, options.num_shards, f"{key[:16]}-{name}") if enc.input_ids else (0, None)
            if progress:
                progress(f"writing {name}", 1, 1)
            source = next(s for s in sources if s["split"] == name)
            manifest["sources"].append({**source, "rows": rows.rows})
            manifest["splits"][name] = {
                "rows": len(enc.input_ids), "num_shards": shards, "skipped_empty": rows.empty,
                "bad_rows": len(rows.bad), "bad_row_list": rows.bad[:BAD_ROWS_LISTED],
                "source_truncated": enc.source_truncated, "target_truncated": enc.target_truncated,
                "tokens": _length_stats(enc.input_ids),
                "label_tokens": label_tokens,
            }
        manifest["seconds"] = round(time.perf_counter() - started, 3)
        write_json_object(tmp / MANIFEST, manifest)
    return PreprocessResult(manifest, reused=False, format_reason=reason)


def encode_eval_file(path: Path, tokenizer, fmt: Optional[str] = None, columns: Columns = Columns(),
                     max_source_length: int = 64, max_target_length: int = 128) -> Encoded:
    """Prompt ids and reference texts of a raw JSON/JSONL file, for evaluating without a preprocess step."""
    records = list(read_records(path))
    if fmt is None:
        fmt, _ = detect_format([r.value for r in records if isinstance(r, Record)][:DETECT_ROWS], columns, str(path))
    rows = _collect(records, fmt, columns, skip_bad=False)
    if not rows.examples:
        raise UserError(f"{path}: no usable rows")
    with _gc_paused():
        return template_for(tokenizer).encode_eval(tokenizer, rows.examples, max_source_length, max_target_length)


def load_preprocessed(data_dir: str | Path, split: str = "train"):
    """The Arrow dataset of one split (memory-mapped, not copied)."""
    import datasets

    manifest = read_manifest(data_dir)
    if split not in manifest["splits"] or not manifest["splits"][split]["rows"]:
        raise UserError(f"{data_dir}: no {split!r} split (preprocess with --{split}-file)")
    return datasets.load_from_disk(str(Path(data_dir) / split))
