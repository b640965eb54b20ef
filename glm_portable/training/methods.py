"""Fine-tuning methods: how each builds its trainable model, and saves / loads what it trains."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import torch

from glm_portable.backends import Backend
from glm_portable.errors import UserError
from glm_portable.jsonfile import read_json_object, write_json_object
from glm_portable.modeling import ChatGLMConfig, load_model, load_prefix, random_model
from glm_portable.modeling.checkpoint import copy_model_files, load_weights, write_weights
from glm_portable.modeling.prefix import PREFIX_KEY, freeze_all_but_prefix, reset_prefix_encoder
from glm_portable.modeling.remote import load_remote

from .options import TrainOptions

ADAPTER_CONFIG = "adapter_config.json"


def build_model(options: TrainOptions, backend: Backend, dtype: torch.dtype, local_rank: int = 0,
                shape: Optional[ChatGLMConfig] = None) -> torch.nn.Module:
    """The model with only the method's parameters trainable (fp32), the base frozen in ``dtype``.

    Full fine-tuning loads fp32 master weights; DeepSpeed runs them in ``dtype`` (its bf16 / fp16 config).
    With ``shape`` the base gets random weights of that shape instead of ``options.model``'s (benchmarks).
    """
    def base(dtype: torch.dtype, **prefix) -> torch.nn.Module:
        if options.impl == "remote":
            return load_remote(options.model, backend, dtype, local_rank=local_rank, **prefix).model
        if shape is not None:
            return random_model(shape, dtype=dtype, device=backend, local_rank=local_rank, **prefix)
        return load_model(options.model, dtype=dtype, device=backend, local_rank=local_rank, **prefix)

    if options.method == "ptuning":
        model = base(dtype, pre_seq_len=options.pre_seq_len, prefix_projection=options.prefix_projection)
        backend.seed(options.seed)  # the same prefix whichever implementation built the model, and however
        reset_prefix_encoder(model)  # much randomness its loading consumed
        freeze_all_but_prefix(model)
        return model
    if options.method == "full":
        return base(torch.float32)
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                        target_modules=list(options.lora_target), task_type="CAUSAL_LM")
    try:
        model = get_peft_model(base(dtype), config)
    except ValueError as exc:
        raise UserError(f"--lora-target {','.join(options.lora_target)}: {exc}") from None
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model


def detect_method(checkpoint: Path) -> str:
    """What a checkpoint holds: "lora" (an adapter_config.json), "ptuning" (a config that sets pre_seq_len,
    ours and THUDM's alike) or "full" (a whole model directory)."""
    checkpoint = Path(checkpoint)
    if (checkpoint / ADAPTER_CONFIG).is_file():
        return "lora"
    config_file = checkpoint / "config.json"
    if config_file.is_file() and read_json_object(config_file).get("pre_seq_len"):
        return "ptuning"
    return "full"


ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "kv_channels", "num_attention_heads",
                     "multi_query_group_num", "padded_vocab_size", "seq_length", "rope_ratio")
BASE_CONFIG = "base_config.json"  # beside a LoRA adapter: the architecture it was trained on


def architecture(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in ARCHITECTURE_KEYS if k in config}


def check_same_architecture(model_dir: Path, checkpoint: Path) -> None:
    """Refuse a prefix or adapter trained on another model: same-shaped tensors would load and generate nonsense."""
    source = checkpoint / (BASE_CONFIG if (checkpoint / BASE_CONFIG).is_file() else "config.json")
    base_file = Path(model_dir) / "config.json"
    if not source.is_file() or not base_file.is_file():
        return
    trained, base = architecture(read_json_object(source)), architecture(read_json_object(base_file))
    differing = sorted(k for k in trained if k in base and trained[k] != base[k])
    if differing:
        details = ", ".join(f"{k} {trained[k]} vs {base[k]}" for k in differing)
        raise UserError(f"{checkpoint}: trained on another model than {model_dir} ({details})")


def save_trained(model: torch.nn.Module, method: str, directory: Path,
                 state_dict: Optional[dict[str, torch.Tensor]] = None, base_dir: Optional[Path] = None) -> None:
    """Write only what the method trains: the prefix encoder, the LoRA adapter, or the whole model.

    ``state_dict`` is the gathered one under ZeRO-3, where the module's own parameters are shards.
    A whole model also gets ``base_dir``'s tokenizer and code files, so that the checkpoint is a
    model directory of its own (what `chat --model`, `--impl remote` and upstream loaders expect).
    """
    directory.mkdir(parents=True, exist_ok=True)
    if method == "ptuning":
        state = {k: v for k, v in model.state_dict().items() if k.startswith(PREFIX_KEY)}
        _save_config(model.config, directory)
        write_weights(state, directory)
    elif method == "full":
        _save_config(model.config, directory, dtype="float32")
        write_weights(state_dict if state_dict is not None else model.state_dict(), directory)
        if base_dir is not None:
            copy_model_files(base_dir, directory)
    else:
        model.save_pretrained(str(directory), safe_serialization=True)
        base = model.get_base_model().config
        values = base.upstream_dict() if isinstance(base, ChatGLMConfig) else base.to_dict()
        write_json_object(directory / BASE_CONFIG, architecture(values))


def _save_config(config: Any, directory: Path, dtype: Optional[str] = None) -> None:
    """Ours writes upstream's config.json verbatim; a remote model's config class writes its own.

    use_cache is written true: the Trainer turns it off while training, and upstream code that
    loads the checkpoint would otherwise generate without its cache, seeing one token a step.
    """
    config = copy.deepcopy(config)
    config.use_cache = True
    if isinstance(config, ChatGLMConfig):
        config.save(directory, dtype=dtype)
    else:
        config.save_pretrained(str(directory))


def load_trained(model: torch.nn.Module, method: str, directory: Path) -> None:
    """Load a checkpoint written by ``save_trained`` into a model built by ``build_model``."""
    if method == "ptuning":
        load_prefix(model, directory)
        return
    if method == "full":
        load_weights(model, directory)
        return
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        raise UserError(f"{directory}: no adapter_model.safetensors (not a LoRA checkpoint)")
    set_peft_model_state_dict(model, load_file(str(path)))
