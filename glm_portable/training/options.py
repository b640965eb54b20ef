"""Everything a training run is configured by, with THUDM's P-Tuning v2 defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from glm_portable.errors import UserError
from glm_portable.schema import DEVICE_HELP, IMPL_HELP, QUANTIZATION_HELP, Dtype, QuantizationBit, option

MethodName = Literal["ptuning", "lora", "full"]
# The recipes users come from (docs/thudm-compatibility.md): THUDM's P-Tuning train.sh, the ChatGLM-6B LoRA
# repositories' finetune scripts, THUDM's ds_train_finetune.sh. ``training.methods`` reads them from here.
DEFAULT_LR = {"ptuning": 2e-2, "lora": 1e-4, "full": 1e-4}
LR_HELP = "Learning rate (default by method: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")."


Deepspeed = Literal["zero2", "zero3"]
Padding = Literal["fixed", "dynamic"]


@dataclass
class TrainOptions:
    """``train``'s options, each defined once (see ``glm_portable.schema``); THUDM's train.sh defaults."""

    model: Path = option(help="Base model directory.")
    data: Path = option(help="Directory written by `glm-portable preprocess` for this model.")
    output: Path = option(help="Run directory (checkpoints, metrics.jsonl, run.json, loss.png).")
    method: MethodName = option("ptuning", "P-Tuning v2, LoRA, or full fine-tuning (with --deepspeed).")
    impl: Literal["native", "remote"] = option("native", IMPL_HELP)
    device: Optional[str] = option(None, DEVICE_HELP)
    dtype: Optional[Dtype] = option(None, "Base model dtype (default: the backend's: bf16, fp16 or fp32 on CPU).")
    quantization_bit: Optional[QuantizationBit] = option(None, QUANTIZATION_HELP + " P-Tuning and LoRA only.")
    pre_seq_len: int = option(128, "P-Tuning prefix length.", minimum=1)
    prefix_projection: bool = option(False, "P-Tuning with the two-layer prefix projection.")
    lora_rank: int = option(8, "LoRA rank.", minimum=1)
    lora_alpha: int = option(32, "LoRA scaling numerator.")
    lora_dropout: float = option(0.1, "LoRA dropout, in [0, 1).", minimum=0)
    lora_target: list[str] = option(["query_key_value"], "Module names LoRA adapts.")
    deepspeed: Optional[Deepspeed] = option(None, "DeepSpeed ZeRO stage for --method full.")
    deepspeed_config: Optional[Path] = option(None, "A DeepSpeed JSON merged over the generated config.")
    offload: bool = option(False, "ZeRO optimizer state offloaded to CPU memory.")
    lr: Optional[float] = option(None, LR_HELP)
    batch_size: int = option(1, "Per-process batch size.", minimum=1)
    grad_accum: int = option(16, "Gradient accumulation steps.", minimum=1)
    max_steps: int = option(3000, "Optimizer steps; a larger value extends a finished run.", minimum=1)
    warmup_steps: int = option(0, "Linear warmup steps.", minimum=0)
    logging_steps: int = option(10, "Steps between loss records.", minimum=1)
    save_steps: int = option(1000, "Steps between checkpoints.", minimum=1)
    save_total_limit: Optional[int] = option(None, "Keep only the newest K checkpoints.", minimum=1)
    seed: int = option(42, "Seed of the prefix / adapter initialisation, the data order and dropout.")
    padding: Optional[Padding] = option(None, "Static shapes (the NPU's default) or each batch's longest row (the "
                                        "others' default).")
    packing: bool = option(False, "Pack whole rows into fixed-length sequences (no padding; positions restart and "
                           "attention stays inside each row). ChatGLM2/3, native.")
    pack_length: Optional[int] = option(None, "Tokens per packed sequence (default: the data's longest row, "
                                        "max_source + max_target + 1); longer ones fill better.", minimum=1)
    group_by_length: bool = option(False, "Batch rows of similar length together (less padding without packing).")
    gradient_checkpointing: bool = option(False, "Recompute activations to save memory.")
    compile: bool = option(False, "torch.compile the model (inductor: fused norm, rotary and SwiGLU kernels; the "
                           "first steps pay for compiling). CPU and CUDA.")
    nproc: int = option(1, "Processes (cards) on this node.", minimum=1)
    nnodes: int = option(1, "Nodes.", minimum=1)
    node_rank: int = option(0, "This node's index.", minimum=0)
    master_addr: str = option("127.0.0.1", "Address of node 0.")
    master_port: int = option(29500, "Port of node 0's rendezvous.", minimum=1, maximum=65535)
    resume: Optional[str] = option(None, "auto (newest complete checkpoint of --output) or a checkpoint directory.")
    overwrite: bool = option(False, "Replace an existing run in --output.")
    dry_run: bool = option(False, "Print the plan (processes, devices, environment, precision, data) and exit.")

    def __post_init__(self) -> None:
        if self.lr is None and self.method in DEFAULT_LR:
            self.lr = DEFAULT_LR[self.method]

    def check(self) -> None:
        """What one field's bounds cannot say (run by ``glm_portable.schema.validate``)."""
        from .methods import get_method

        method = get_method(self.method)
        if method.distributed_optimizer and self.deepspeed is None:
            raise UserError(f"--method {self.method} needs --deepspeed zero2 or zero3 (ZeRO keeps the optimizer state "
                            "sharded)")
        if self.quantization_bit and not method.trains_on_quantized_base:
            raise UserError(f"--quantization-bit with --method {self.method}: it trains every weight, and quantized "
                            "weights cannot train; use --method ptuning or lora")
        if self.packing and self.impl == "remote":
            raise UserError("--packing with --impl remote: a model directory's own code cannot keep attention inside "
                            "each packed row; use --impl native")
        if self.pack_length is not None and not self.packing:
            raise UserError("--pack-length needs --packing")
        if self.packing and self.group_by_length:
            raise UserError("--packing and --group-by-length: packed sequences all have one length; choose one")
        if self.deepspeed is not None and not method.distributed_optimizer:
            raise UserError(f"--deepspeed is for --method full; {self.method} trains too few parameters to need it")
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            raise UserError(f"--deepspeed-config {self.deepspeed_config}: no such file")
        if not self.lr > 0 or self.lr == float("inf"):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if not self.lora_dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target:
            raise UserError("--lora-target names no module")
        if Path(self.output).exists() and not Path(self.output).is_dir():
            raise UserError(f"--output {self.output}: exists and is a file, not a run directory")
        if not self.node_rank < self.nnodes:
            raise UserError(f"--node-rank {self.node_rank} must be in 0..{self.nnodes - 1}")
        if self.resume not in (None, "auto") and not (Path(self.resume).is_dir()
                                                     and Path(self.resume).name.startswith("checkpoint-")):
            raise UserError(f"--resume {self.resume}: not a checkpoint-<step> directory (or use --resume auto)")

    def as_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
