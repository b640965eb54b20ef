"""Fine-tuning methods as objects: what each trains, how its checkpoints look, and what a trained token costs.

``METHODS`` holds P-Tuning v2, LoRA and full fine-tuning; everything that differs between them is
asked of the method (building the trainable model, saving and loading what it trains, recognising
its checkpoints, loading one for inference, counting parameters and FLOPs), so no caller switches on
a method's name.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from glm_portable.backends import Backend
from glm_portable.errors import UserError
from glm_portable.jsonfile import read_json_object, write_json_object
from glm_portable.modeling import ChatGLMConfig, load_model, load_prefix, new_model, random_model
from glm_portable.modeling.checkpoint import copy_model_files, load_weights, write_weights
from glm_portable.modeling.prefix import PREFIX_KEY, freeze_all_but_prefix, reset_prefix_encoder
from glm_portable.modeling.quantization import QuantizedLinear, quantization_bits
from glm_portable.modeling.remote import load_remote

from .options import DEFAULT_LR

if TYPE_CHECKING:
    from .options import TrainOptions

ADAPTER_CONFIG = "adapter_config.json"
Loader = Callable[..., torch.nn.Module]  # (dtype=None, path=None, pre_seq_len=…, prefix_projection=…) -> base model


class Method:
    """One fine-tuning method. ``default_lr`` comes from the recipe users know it by (``options.DEFAULT_LR``).
    ``distributed_optimizer``: it trains every weight, so ZeRO must shard the optimizer state.
    ``record_fields``: the workload options a benchmark record keeps for it. ``trains_on_quantized_base``: it
    leaves the base frozen, so the base may be quantized (``--quantization-bit``)."""

    name: str
    default_lr: float
    distributed_optimizer = False
    trains_on_quantized_base = True
    record_fields: tuple[str, ...] = ()

    def build(self, options: "TrainOptions", base: Loader, backend: Backend) -> torch.nn.Module:
        raise NotImplementedError

    def save(self, model: torch.nn.Module, directory: Path, state_dict: Optional[dict[str, torch.Tensor]] = None,
             base_dir: Optional[Path] = None) -> None:
        """Write what the method trains; ``state_dict`` is the gathered one under ZeRO-3."""
        raise NotImplementedError

    def load(self, model: torch.nn.Module, directory: Path) -> None:
        """Load a checkpoint written by ``save`` into a model built by ``build`` (resuming)."""
        raise NotImplementedError

    def holds(self, checkpoint: Path) -> bool:
        raise NotImplementedError

    def for_inference(self, base: Loader, checkpoint: Path) -> torch.nn.Module:
        raise NotImplementedError

    def merged(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model with the trained part folded into plain weights, for export."""
        return model

    def meta_config(self, config: ChatGLMConfig, options: "TrainOptions") -> ChatGLMConfig:
        return config

    def trainable_count(self, model: torch.nn.Module, options: "TrainOptions") -> int:
        raise NotImplementedError

    def count_parameters(self, config: ChatGLMConfig, options: "TrainOptions") -> tuple[int, int]:
        """(trainable, total) from the config alone (meta tensors, no weights read)."""
        with torch.device("meta"):
            model = new_model(self.meta_config(copy.deepcopy(config), options))
        total = sum(p.numel() for p in model.parameters())
        trainable = self.trainable_count(model, options)
        return trainable, total + self.added_parameters(trainable)

    def added_parameters(self, trainable: int) -> int:
        """Parameters the method adds beside the base that the meta model does not hold (LoRA's adapters)."""
        return 0

    def weight_flops(self, base_parameters: int, trainable: int) -> int:
        """Matmul FLOPs per trained token: forward 2N, and backward 2N for the input gradients through a frozen
        base, plus 4 per trained parameter for its weight gradients (6N when everything trains)."""
        return 4 * base_parameters + 6 * self.added_parameters(trainable)

    def prefix_length(self, options: "TrainOptions") -> int:
        """Extra keys every query attends to."""
        return 0


class PTuning(Method):
    name = "ptuning"
    default_lr = DEFAULT_LR[name]
    record_fields = ("pre_seq_len",)

    def build(self, options, base, backend):
        model = base(pre_seq_len=options.pre_seq_len, prefix_projection=options.prefix_projection)
        backend.seed(options.seed)  # the same prefix whichever implementation built the model, and however
        reset_prefix_encoder(model)  # much randomness its loading consumed
        freeze_all_but_prefix(model)
        return model

    def save(self, model, directory, state_dict=None, base_dir=None):
        directory.mkdir(parents=True, exist_ok=True)
        _save_config(model.config, directory)
        write_weights({k: v for k, v in model.state_dict().items() if k.startswith(PREFIX_KEY)}, directory)

    def load(self, model, directory):
        load_prefix(model, directory)

    def holds(self, checkpoint):
        config_file = checkpoint / "config.json"
        return config_file.is_file() and bool(read_json_object(config_file).get("pre_seq_len"))

    def for_inference(self, base, checkpoint):
        config = read_json_object(checkpoint / "config.json")
        model = base(pre_seq_len=config["pre_seq_len"], prefix_projection=bool(config.get("prefix_projection")))
        load_prefix(model, checkpoint)
        return model.eval()

    def meta_config(self, config, options):
        config.pre_seq_len, config.prefix_projection = options.pre_seq_len, options.prefix_projection
        return config

    def trainable_count(self, model, options):
        return sum(p.numel() for p in model.transformer.prefix_encoder.parameters())

    def prefix_length(self, options):
        return options.pre_seq_len


class LoRA(Method):
    name = "lora"
    default_lr = DEFAULT_LR[name]
    record_fields = ("lora_rank",)

    def build(self, options, base, backend):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                            target_modules=list(options.lora_target), task_type="CAUSAL_LM")
        _adapt_quantized_layers(config)
        try:
            model = get_peft_model(base(), config)
        except ValueError as exc:
            raise UserError(f"--lora-target {','.join(options.lora_target)}: {exc}") from None
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        return model

    def save(self, model, directory, state_dict=None, base_dir=None):
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(directory), safe_serialization=True)
        base = model.get_base_model().config
        values = base.upstream_dict() if isinstance(base, ChatGLMConfig) else base.to_dict()
        write_json_object(directory / BASE_CONFIG, architecture(values))

    def load(self, model, directory):
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = directory / "adapter_model.safetensors"
        if not path.is_file():
            raise UserError(f"{directory}: no adapter_model.safetensors (not a LoRA checkpoint)")
        set_peft_model_state_dict(model, load_file(str(path)))

    def holds(self, checkpoint):
        return (checkpoint / ADAPTER_CONFIG).is_file()

    def for_inference(self, base, checkpoint):
        from peft import LoraConfig, PeftModel

        config = LoraConfig.from_pretrained(str(checkpoint))
        _adapt_quantized_layers(config)
        return PeftModel.from_pretrained(base(), str(checkpoint), config=config).eval()

    def merged(self, model):
        return model.merge_and_unload()

    def trainable_count(self, model, options):
        per_layer = sum(m.in_features + m.out_features for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in options.lora_target)
        return per_layer * options.lora_rank

    def added_parameters(self, trainable):
        return trainable


def _adapt_quantized_layers(config: Any) -> None:
    """Let peft wrap a quantized base's layers with its own LoRA linear layer (``base(x) + B(A(x))``, reading only
    ``in_features`` / ``out_features`` of the base layer): peft knows no QuantizedLinear by itself."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    config._register_custom_module({QuantizedLinear: LoraLinear})


class Full(Method):
    name = "full"
    default_lr = DEFAULT_LR[name]
    distributed_optimizer = True
    trains_on_quantized_base = False

    def build(self, options, base, backend):
        model = base(torch.float32)  # fp32 master weights; DeepSpeed runs them in the run's dtype
        if quantization_bits(model):
            raise UserError(f"{options.model}: the weights are quantized (quantization_bit in config.json) and cannot "
                            "train; fine-tune the 16-bit model, or use --method ptuning or lora on this one")
        return model

    def save(self, model, directory, state_dict=None, base_dir=None):
        """The whole model, with ``base_dir``'s tokenizer and code files: a model directory of its own (what
        `chat --model`, `--impl remote` and upstream loaders expect)."""
        directory.mkdir(parents=True, exist_ok=True)
        _save_config(model.config, directory, dtype="float32")
        write_weights(state_dict if state_dict is not None else model.state_dict(), directory)
        if base_dir is not None:
            copy_model_files(base_dir, directory)

    def load(self, model, directory):
        load_weights(model, directory)

    def holds(self, checkpoint):
        return True

    def for_inference(self, base, checkpoint):
        return base(path=checkpoint)

    def trainable_count(self, model, options):
        return sum(p.numel() for p in model.parameters())

    def weight_flops(self, base_parameters, trainable):
        return 6 * base_parameters


METHODS: dict[str, Method] = {m.name: m for m in (PTuning(), LoRA(), Full())}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"--method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


def detect_method(checkpoint: Path) -> Method:
    """What a checkpoint holds: a LoRA adapter (adapter_config.json), a P-Tuning prefix (a config that sets
    pre_seq_len, ours and THUDM's alike), else a whole model directory."""
    checkpoint = Path(checkpoint)
    return next(m for m in (METHODS["lora"], METHODS["ptuning"], METHODS["full"]) if m.holds(checkpoint))


def build_model(options: "TrainOptions", backend: Backend, dtype: torch.dtype, local_rank: int = 0,
                shape: Optional[ChatGLMConfig] = None) -> torch.nn.Module:
    """The model with only the method's parameters trainable (fp32), the base frozen in ``dtype``.

    With ``shape`` the base gets random weights of that shape instead of ``options.model``'s (benchmarks).
    """
    def base(base_dtype: Optional[torch.dtype] = None, path: Optional[Path] = None, **prefix) -> torch.nn.Module:
        base_dtype = dtype if base_dtype is None else base_dtype
        bits = options.quantization_bit
        if options.impl == "remote":
            return load_remote(options.model, backend, base_dtype, local_rank=local_rank, quantization_bit=bits,
                               **prefix).model
        if shape is not None:
            return random_model(shape, dtype=base_dtype, device=backend, local_rank=local_rank, quantization_bit=bits,
                                **prefix)
        return load_model(options.model, dtype=base_dtype, device=backend, local_rank=local_rank,
                          quantization_bit=bits, **prefix)

    return get_method(options.method).build(options, base, backend)


ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "inner_hidden_size", "kv_channels",
                     "num_attention_heads", "multi_query_group_num", "padded_vocab_size", "vocab_size", "seq_length",
                     "rope_ratio")
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
