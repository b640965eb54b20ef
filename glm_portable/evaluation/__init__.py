"""Evaluation: batched generation and THUDM's BLEU-4 / ROUGE."""

from .evaluate import EvalOptions, evaluate, load_for_inference
from .generation import evaluation_settings, generate_batched
from .metrics import METRIC_KEYS, sample_scores, score

__all__ = ["EvalOptions", "METRIC_KEYS", "evaluate", "evaluation_settings", "generate_batched", "load_for_inference",
           "sample_scores", "score"]
