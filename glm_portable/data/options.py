"""``preprocess``'s options, each defined once (see ``glm_portable.schema``); THUDM's ADGEN lengths by default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from glm_portable.errors import UserError
from glm_portable.schema import option

from .formats import Columns, Format


@dataclass
class PreprocessOptions:
    model: Path = option(help="Model directory (its tokenizer and family decide the template).")
    train_file: Path = option(help="Training data: JSON lines or a JSON array.")
    out: Path = option(help="Output directory (Arrow shards + manifest.json).")
    eval_file: Optional[Path] = option(None, "Evaluation data, same format.")
    format: Optional[Format] = option(None, "The rows' format (default: detected).")
    prompt_column: Optional[str] = option(None, "Prompt column (adgen: content).")
    response_column: Optional[str] = option(None, "Answer column (adgen: summary).")
    history_column: Optional[str] = option(None, "Column of earlier [query, response] pairs.")
    max_source_length: int = option(64, "Prompt tokens kept, [gMASK] sop included.", minimum=1)
    max_target_length: int = option(128, "Answer tokens kept.", minimum=1)
    source_prefix: str = option("", "Text put before every prompt.")
    num_shards: int = option(8, "Arrow shards per split.", minimum=1)
    num_proc: int = option(1, "Tokenizer threads.", minimum=1)
    overwrite: bool = option(False, "Replace OUT even if it holds data.")
    skip_bad_rows: bool = option(False, "Skip malformed rows (counted and listed in the manifest) instead of failing.")

    @property
    def columns(self) -> Columns:
        return Columns(self.prompt_column, self.response_column, self.history_column)

    def check(self) -> None:
        if self.max_source_length < 4:
            raise UserError(f"--max-source-length {self.max_source_length} leaves no room for the prompt")
