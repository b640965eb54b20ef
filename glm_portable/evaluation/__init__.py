"""Evaluation: batched generation and THUDM's BLEU-4 / ROUGE.

Names are loaded on first use (``glm_portable.lazy``), so that reading ``evaluation.options`` (the CLI does, to
build its flags) imports no model code.
"""

from glm_portable.lazy import lazy_exports

_WHERE = {"EvalOptions": "options", "evaluate": "pipeline", "load_for_inference": "pipeline",
          "evaluation_settings": "generation", "generate_batched": "generation", "METRIC_KEYS": "metrics",
          "sample_scores": "metrics", "score": "metrics"}
__all__ = sorted(_WHERE)

__getattr__ = lazy_exports(__name__, _WHERE)
