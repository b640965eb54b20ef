"""``glm-portable evaluate``: generate for held-out prompts, score THUDM's way, write THUDM's files."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from glm_portable.atomic import write_text_atomic
from glm_portable.backends import Backend
from glm_portable.data import check_compatible, load_preprocessed, template_for
from glm_portable.data.preprocessing import encode_eval_file
from glm_portable.errors import UserError
from glm_portable.jsonfile import write_json_object
from glm_portable.modeling import load_model, load_tokenizer
from glm_portable.modeling.quantization import quantization_bits
from glm_portable.modeling.remote import load_remote
from glm_portable.patches import APPLIED
from glm_portable.schema import validate
from glm_portable.training.methods import check_same_architecture, detect_method
from glm_portable.training.run_dir import complete_checkpoints

from .generation import generate_batched
from .metrics import METRIC_KEYS, score
from .options import EvalOptions

PREDICTIONS = "generated_predictions.txt"
RESULTS = "eval_results.json"
THUDM_RESULTS = ("predict_results.json", "all_results.json")


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse, before generating, an output that is a file, or that holds an earlier evaluation (without --overwrite)."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output}: exists and is a file, not a directory")
    earlier = [name for name in (PREDICTIONS, RESULTS, *THUDM_RESULTS) if (output / name).exists()]
    if earlier and not overwrite:
        raise UserError(f"--output {output}: holds an earlier evaluation ({', '.join(earlier)}); "
                        "use another directory or --overwrite")


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory's newest complete checkpoint."""
    if not path.is_dir():
        raise UserError(f"--checkpoint {path}: no such directory")
    if (path / "run.json").is_file():
        checkpoints = complete_checkpoints(path)
        if not checkpoints:
            raise UserError(f"--checkpoint {path}: the run has no complete checkpoint yet")
        return checkpoints[-1]
    return path


def load_for_inference(model_dir: Path, checkpoint: Optional[Path], backend: Backend,
                       dtype: Optional[str | torch.dtype], impl: str = "native",
                       quantization_bit: Optional[int] = None) -> torch.nn.Module:
    """The base model plus what the checkpoint trained: a LoRA adapter, a P-Tuning prefix, or full weights
    (``detect_method``). ``impl`` "remote" runs the directory's own model code (patched) instead of the native one.
    With ``quantization_bit`` the base's block layers are quantized (a prefix or adapter trained on a 16-bit
    base loads onto a quantized one, and the reverse).
    """
    def base(path: Path = model_dir, **prefix) -> torch.nn.Module:
        """The base in the inference dtype, from ``model_dir`` or (a full checkpoint) another directory."""
        if impl == "remote":
            return load_remote(path, backend, dtype, quantization_bit=quantization_bit, **prefix).model
        return load_model(path, dtype=dtype, device=backend, quantization_bit=quantization_bit, **prefix)

    if checkpoint is None:
        return base()
    checkpoint = resolve_checkpoint(checkpoint)
    check_same_architecture(model_dir, checkpoint)
    return detect_method(checkpoint).for_inference(base, checkpoint)


@dataclass
class EvalRows:
    prompts: list[list[int]]
    references: list[str]
    full_references: list[str]


def evaluation_rows(options: EvalOptions, tokenizer) -> EvalRows:
    if options.data.is_dir():
        check_compatible(options.data, tokenizer, template_for(tokenizer).name, options.model)
        dataset = load_preprocessed(options.data, "eval")
        rows = EvalRows(dataset["input_ids"], dataset["reference"], dataset["reference_full"])
    else:
        encoded = encode_eval_file(options.data, tokenizer, max_source_length=options.max_source_length,
                                   max_target_length=options.max_target_length)
        rows = EvalRows(encoded.input_ids, encoded.references, encoded.full_references)
    end = options.limit or None
    return EvalRows([list(p) for p in rows.prompts[:end]], list(rows.references[:end]),
                    list(rows.full_references[:end]))


def write_outputs(output: Path, predictions: list[str], references: list[str], results: dict[str, Any]) -> None:
    """THUDM's files (generated_predictions.txt, one {"labels", "predict"} object a line; predict_results.json
    and all_results.json with ``predict_``-prefixed keys) and ours (eval_results.json)."""
    output.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"labels": l, "predict": p}, ensure_ascii=False) + "\n" for p, l in zip(predictions, references))
    write_text_atomic(output / PREDICTIONS, lines)
    thudm = {f"predict_{k}": results[k] for k in METRIC_KEYS}
    thudm.update(predict_runtime=results["generation_seconds"], predict_samples=results["samples"],
                 predict_samples_per_second=results["samples_per_second"])
    for name in THUDM_RESULTS:
        write_json_object(output / name, thudm)
    write_json_object(output / RESULTS, results)


def evaluate(options: EvalOptions, backend: Backend, model: Optional[torch.nn.Module] = None,
             on_batch: Optional[Callable[[int], None]] = None, on_start: Optional[Callable[[int], None]] = None
             ) -> dict[str, Any]:
    """Generate, score and write; ``model`` skips loading (to evaluate a model already in memory).

    The scores at the top level are THUDM's (references cut to max_target_length tokens, as published
    tables were computed); ``full_reference`` holds the same scores against the answers as written.
    """
    validate(options)
    settings = options.settings()
    check_output(Path(options.output), options.overwrite)
    tokenizer = load_tokenizer(options.model)
    rows = evaluation_rows(options, tokenizer)
    if model is None:
        model = load_for_inference(options.model, options.checkpoint, backend, options.dtype, options.impl,
                                   options.quantization_bit)
    model.eval()
    if on_start:
        on_start(len(rows.prompts))
    started = time.perf_counter()
    cache = options.cache or backend.default_cache()
    predictions = generate_batched(model, tokenizer, rows.prompts, options.batch_size, settings, on_batch,
                                   static_cache=cache == "static")
    seconds = time.perf_counter() - started
    full = score(predictions, rows.full_references).summary()
    results = {**score(predictions, rows.references).summary(),
               "references": "THUDM's: the answer cut to max_target_length tokens (special tokens counted), decoded",
               "full_reference": {k: full[k] for k in METRIC_KEYS},
               "generation_seconds": round(seconds, 3), "samples_per_second": round(len(rows.prompts) / seconds, 3),
               "settings": {"model": str(options.model), "checkpoint": str(options.checkpoint) if options.checkpoint else None,
                            "data": str(options.data), "device": backend.name, "impl": options.impl,
                            "quantization_bit": options.quantization_bit or quantization_bits(model),
                            "batch_size": options.batch_size, "cache": cache, "patches": list(APPLIED.names),
                            **asdict(settings)}}
    write_outputs(options.output, predictions, rows.references, results)
    return results
