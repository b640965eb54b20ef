"""What a benchmark runs (``Workload``) and ``bench``'s options around it, each defined once (``glm_portable.schema``).

Two records can be compared only when their workloads are equal, so everything that changes the
work done or the losses seen is a workload field; the device, its count's placement and the dtype
are not. Model code is imported only when a workload's architecture is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from glm_portable.errors import UserError
from glm_portable.schema import DEVICE_HELP, IMPL_HELP, QUANTIZATION_HELP, Dtype, QuantizationBit, option
from glm_portable.training.options import DEFAULT_LR, LR_HELP, MethodName, Padding

if TYPE_CHECKING:
    from glm_portable.modeling import ChatGLMConfig

# Named shapes: (config class in glm_portable.modeling, fields); "1b" is a 1.1B-parameter cut of the ChatGLM2
# architecture for full fine-tuning on one card. Data, so that reading the options imports no model code.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "chatglm-6b": ("ChatGLM1Config", {}),
    "chatglm2-6b": ("ChatGLMConfig", {}),
    "chatglm3-6b": ("ChatGLMConfig", {"seq_length": 8192}),
    "1b": ("ChatGLMConfig", {"num_layers": 16, "hidden_size": 2048, "ffn_hidden_size": 6848, "num_attention_heads": 16}),
}
TINY = "tiny"
SHAPE_NAMES = (TINY, *SHAPES)
ARCHITECTURE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
                       "multi_query_group_num", "inner_hidden_size", "padded_vocab_size")  # each as the shape has it


@dataclass
class Workload:
    """What a benchmark runs; a record stores it, and two records compare only when their workloads match."""

    shape: str = option(help=f"{', '.join(SHAPE_NAMES)} (random weights, no download) or a model directory.")
    method: MethodName = option("ptuning", "The fine-tuning method (full: DeepSpeed ZeRO-2).")
    batch_size: int = option(4, "Per-device batch size.", minimum=1)
    grad_accum: int = option(1, "Gradient accumulation steps.", minimum=1)
    source_length: int = option(64, "Prompt tokens per sample (THUDM: 64).", minimum=1)
    target_length: int = option(128, "Answer tokens per sample (THUDM: 128).", minimum=1)
    varied_lengths: bool = option(False, "Rows of varied length, as real data has: prompts uniform in [source/2, "
                                  "source] tokens, answers in [target/4, target] (seeded).")
    padding: Padding = option("fixed", "Batches padded to source + target (THUDM's and the NPU's static shapes) or "
                              "to each batch's longest row.")
    packing: bool = option(False, "Whole rows packed into sequences (--pack-length) instead of padding.")
    pack_length: Optional[int] = option(None, "Tokens per packed sequence (default: source + target).", minimum=1)
    impl: Literal["native", "remote"] = option("native", IMPL_HELP + " Remote needs a model directory.")
    pre_seq_len: int = option(128, "P-Tuning prefix length.", minimum=1)
    lora_rank: int = option(8, "LoRA rank.", minimum=1)
    quantization_bit: Optional[QuantizationBit] = option(None, QUANTIZATION_HELP)
    lr: Optional[float] = option(None, LR_HELP)
    steps: int = option(20, "Measured optimizer steps.", minimum=1)
    warmup: int = option(3, "Steps run first and not timed (their losses are kept).", minimum=0)
    seed: int = option(42, "Seeds the weights, the synthetic data and the run.")
    world_size: int = option(1, internal=True)
    gradient_checkpointing: bool = option(False, "Recompute activations to save memory.")

    def check(self) -> None:
        if self.shape not in SHAPE_NAMES and not (Path(self.shape) / "config.json").is_file():
            raise UserError(f"--shape {self.shape}: expected {', '.join(SHAPE_NAMES)} or a model directory with config.json")
        if self.impl == "remote" and not self.from_directory:
            raise UserError(f"--impl remote: --shape {self.shape} has no model code of its own; give a model directory")
        if self.pack_length is not None and (not self.packing or self.pack_length < self.seq_length):
            raise UserError(f"--pack-length {self.pack_length}: needs --packing and room for the longest row "
                            f"({self.seq_length} tokens)")
        if self.packing and self.impl == "remote":
            raise UserError("--packing with --impl remote: a model directory's own code cannot keep attention inside "
                            "each packed row")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def seq_length(self) -> int:
        return self.source_length + self.target_length

    @property
    def packed_length(self) -> int:
        return self.pack_length or self.seq_length

    @property
    def from_directory(self) -> bool:
        """A model directory's own weights, rather than random weights in a named shape."""
        return self.shape not in SHAPE_NAMES

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    def config(self) -> "ChatGLMConfig":
        """The architecture: a named shape, or a model directory's config.json."""
        from glm_portable import modeling
        from glm_portable.modeling.tiny import tiny_config

        if self.shape == TINY:
            return tiny_config("chatglm3", 1000, layers=2, hidden_size=128, heads=4, kv_groups=2)
        if self.shape in SHAPES:
            config_class, values = SHAPES[self.shape]
            return getattr(modeling, config_class)(**values)
        return modeling.load_config(self.shape)

    def as_record(self) -> dict[str, Any]:
        """What a record stores: a directory by its name and architecture, since paths differ between machines."""
        data = {spec.name: getattr(self, spec.name) for spec in fields(Workload)}
        data["lr"] = self.learning_rate
        if self.from_directory:
            data["shape"] = f"dir:{Path(self.shape).resolve().name}"
        config = self.config()
        data["architecture"] = {k: getattr(config, k) for k in ARCHITECTURE_FIELDS if hasattr(config, k)}
        from glm_portable.training.methods import METHODS

        kept = METHODS[self.method].record_fields
        for key in {field for m in METHODS.values() for field in m.record_fields} - set(kept):
            data.pop(key)
        return data



@dataclass(kw_only=True)
class BenchOptions(Workload):
    """``bench``'s options: the workload, and how and where this run of it is measured."""

    out: Path = option(help="The record to write (JSON).")
    device: Optional[str] = option(None, DEVICE_HELP)
    dtype: Optional[Dtype] = option(None, "Base model dtype (default: the backend's).")
    nproc: int = option(1, "Processes (cards) on this node.", minimum=1)
    master_port: int = option(29500, "Port of the launched processes' rendezvous.", minimum=1, maximum=65535)
    peak_tflops: Optional[float] = option(None, "Device peak TFLOP/s for MFU (default: the backend's table).")
    name: Optional[str] = option(None, "The record's name in comparisons (default: backend-dtype-Nx).")
    compare_thudm: bool = option(False, "Also run THUDM's way on the same rows (the directory's own code, batches "
                                 "padded to source + target) and record the ratio.")
    overwrite: bool = option(False, "Replace OUT if it exists.")

    def check(self) -> None:
        super().check()
        if self.compare_thudm and (not self.from_directory or self.impl == "remote" or self.nproc > 1
                                   or self.method == "full"):
            raise UserError("--compare-thudm: give a model directory with its own code (--shape DIR), --impl native, "
                            "one process and --method ptuning or lora")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise UserError(f"--peak-tflops must be a positive number, got {self.peak_tflops}")
        if Path(self.out).is_dir():
            raise UserError(f"--out {self.out}: is a directory; give the record's file name")
