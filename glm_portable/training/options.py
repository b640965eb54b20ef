"""Everything a training run is configured by, with THUDM's P-Tuning v2 defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from glm_portable.errors import UserError
from glm_portable.modeling.remote import check_impl

from .methods import METHODS, get_method


@dataclass
class TrainOptions:
    model: Path
    data: Path
    output: Path
    method: str = "ptuning"
    impl: str = "native"
    device: Optional[str] = None
    dtype: Optional[str] = None
    pre_seq_len: int = 128
    prefix_projection: bool = False
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target: list[str] = field(default_factory=lambda: ["query_key_value"])
    deepspeed: Optional[str] = None
    deepspeed_config: Optional[Path] = None
    offload: bool = False
    lr: Optional[float] = None
    batch_size: int = 1
    grad_accum: int = 16
    max_steps: int = 3000
    warmup_steps: int = 0
    logging_steps: int = 10
    save_steps: int = 1000
    save_total_limit: Optional[int] = None
    seed: int = 42
    padding: Optional[str] = None
    gradient_checkpointing: bool = False
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    resume: Optional[str] = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.lr is None and self.method in METHODS:
            self.lr = METHODS[self.method].default_lr

    def validate(self) -> None:
        method = get_method(self.method)
        check_impl(self.impl)
        if method.distributed_optimizer and self.deepspeed is None:
            raise UserError(f"--method {self.method} needs --deepspeed zero2 or zero3 (ZeRO keeps the optimizer state "
                            "sharded)")
        if self.deepspeed is not None and not method.distributed_optimizer:
            raise UserError(f"--deepspeed is for --method full; {self.method} trains too few parameters to need it")
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            raise UserError(f"--deepspeed-config {self.deepspeed_config}: no such file")
        positive = {"--batch-size": self.batch_size, "--grad-accum": self.grad_accum, "--max-steps": self.max_steps,
                    "--logging-steps": self.logging_steps, "--save-steps": self.save_steps, "--nproc": self.nproc,
                    "--nnodes": self.nnodes, "--pre-seq-len": self.pre_seq_len, "--lora-rank": self.lora_rank}
        for name, value in positive.items():
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if not self.lr > 0 or self.lr == float("inf"):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if self.warmup_steps < 0:
            raise UserError(f"--warmup-steps must be at least 0, got {self.warmup_steps}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if Path(self.output).exists() and not Path(self.output).is_dir():
            raise UserError(f"--output {self.output}: exists and is a file, not a run directory")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise UserError(f"--save-total-limit must be at least 1, got {self.save_total_limit}")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank {self.node_rank} must be in 0..{self.nnodes - 1}")
        if self.padding not in (None, "fixed", "dynamic"):
            raise UserError(f"--padding {self.padding!r}: expected fixed or dynamic")
        if self.resume not in (None, "auto") and not (Path(self.resume).is_dir()
                                                     and Path(self.resume).name.startswith("checkpoint-")):
            raise UserError(f"--resume {self.resume}: not a checkpoint-<step> directory (or use --resume auto)")

    def as_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
