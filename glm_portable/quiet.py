"""Third-party messages that tell a glm-portable user nothing, filtered by logger (or warning) and text.

Each entry names why the message does not apply, so that nothing else those libraries say is lost.
"""

from __future__ import annotations

import logging
import warnings

QUIET_LOGS: dict[str, tuple[str, ...]] = {
    # Full fine-tuning sets DeepSpeed's accumulation from --grad-accum; accelerate's own plugin keeps its default.
    "accelerate.accelerator": ("Gradient accumulation steps mismatch",),
    # Model directories' own stream_chat passes top_p / temperature even when decoding greedily.
    "transformers.generation.configuration_utils": ("The following generation flags are not valid",),
    # Model directories' own code builds outputs with the cache field's pre-5.24 name.
    "transformers.utils.generic": ("`past_key_values`/`cache_params` are deprecated",),
}
QUIET_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # peft asks the model for the old name of a property on every LoRA build.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    # peft wraps a quantized base's layers as registered (training.methods), reading their in/out features.
    (r"Unsupported layer type .*QuantizedLinear", UserWarning),
)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Install the filters (idempotent: a logger gets one filter, the warning filters are deduplicated)."""
    for name, prefixes in QUIET_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
