"""``evaluate``'s options, each defined once (see ``glm_portable.schema``); greedy decoding unless asked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from glm_portable.errors import UserError
from glm_portable.schema import (CACHE_HELP, CHECKPOINT_HELP, DEVICE_HELP, IMPL_HELP, MODEL_DTYPE_HELP,
                                 QUANTIZATION_HELP, CacheKind, Dtype, QuantizationBit, option)

if TYPE_CHECKING:
    from glm_portable.modeling import GenerationSettings


@dataclass
class EvalOptions:
    model: Path = option(help="Base model directory.")
    data: Path = option(help="A preprocessed directory (its eval split) or a raw JSON/JSONL file.")
    output: Path = option(help="Where generated_predictions.txt and eval_results.json go.")
    checkpoint: Optional[Path] = option(None, CHECKPOINT_HELP)
    device: Optional[str] = option(None, DEVICE_HELP)
    dtype: Optional[Dtype] = option(None, MODEL_DTYPE_HELP)
    quantization_bit: Optional[QuantizationBit] = option(None, QUANTIZATION_HELP)
    batch_size: int = option(32, "Prompts generated together (left-padded, KV cache).", minimum=1)
    cache: Optional[CacheKind] = option(None, CACHE_HELP)
    max_new_tokens: int = option(128, "Tokens generated per answer at most.", minimum=1)
    sample: bool = option(False, "Sample like THUDM's scripts (top_p 0.7, temperature 0.95) instead of greedy.")
    top_p: float = option(0.7, "Top-p when sampling.")
    temperature: float = option(0.95, "Temperature when sampling.")
    seed: int = option(42, "Seed of the sampling.")
    max_source_length: int = option(64, "Prompt length for raw files.")
    max_target_length: int = option(128, "Answer tokens the references are cut to, for raw files (THUDM's scoring; "
                                    "preprocessed data carries its own).")
    limit: Optional[int] = option(None, "Evaluate the first N rows only.", minimum=1)
    impl: Literal["native", "remote"] = option("native", IMPL_HELP)
    overwrite: bool = option(False, "Replace an earlier evaluation in --output.")

    def settings(self) -> "GenerationSettings":
        from glm_portable.modeling import GenerationSettings

        return GenerationSettings(max_new_tokens=self.max_new_tokens, do_sample=self.sample, top_p=self.top_p,
                                  temperature=self.temperature, seed=self.seed)

    def check(self) -> None:
        self.settings().check()
        if not Path(self.data).is_dir() and self.max_source_length < 4:
            raise UserError(f"--max-source-length {self.max_source_length} leaves no room for the prompt (at least 4)")
        if self.max_target_length < 3:
            raise UserError(f"--max-target-length {self.max_target_length} leaves no room for the answer (at least 3)")
