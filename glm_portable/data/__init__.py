"""Datasets: formats, prompt templates, preprocessing into Arrow shards, batch collation."""

from .collate import PADDING_MODES, TrainCollator
from .formats import FORMATS, Columns
from .manifest import check_compatible, read_manifest
from .preprocessing import PreprocessOptions, PreprocessResult, load_preprocessed, preprocess
from .templates import TEMPLATES, template_for

__all__ = [
    "FORMATS",
    "PADDING_MODES",
    "TEMPLATES",
    "Columns",
    "PreprocessOptions",
    "PreprocessResult",
    "TrainCollator",
    "check_compatible",
    "load_preprocessed",
    "preprocess",
    "read_manifest",
    "template_for",
]
