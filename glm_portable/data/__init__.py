"""Datasets: formats, prompt templates, preprocessing into Arrow shards, batch collation.

Names are loaded on first use (``glm_portable.lazy``), so that reading ``data.options`` (the CLI does, to build
its flags) imports no model code.
"""

from glm_portable.lazy import lazy_exports

_WHERE = {"PADDING_MODES": "collate", "TrainCollator": "collate", "FORMATS": "formats", "Columns": "formats",
          "check_compatible": "manifest", "read_manifest": "manifest", "PreprocessOptions": "options",
          "PreprocessResult": "preprocessing", "load_preprocessed": "preprocessing", "preprocess": "preprocessing",
          "TEMPLATES": "templates", "template_for": "templates"}
__all__ = sorted(_WHERE)

__getattr__ = lazy_exports(__name__, _WHERE)
