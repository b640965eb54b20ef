"""BLEU-4 and ROUGE exactly as THUDM's P-Tuning evaluation computes them (docs/thudm-compatibility.md).

ROUGE-1/2/L: rouge_chinese on jieba words joined by spaces, F-measure x 100. BLEU-4: nltk
sentence_bleu on characters with smoothing method3, x 100. Per-sample scores rounded to 4 places
as upstream does, then averaged. Where upstream crashes on an empty prediction we score it 0 and
count it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

METRIC_KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


@dataclass
class Scores:
    per_sample: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in METRIC_KEYS})
    empty_predictions: int = 0

    def summary(self) -> dict[str, float | int]:
        count = len(self.per_sample["bleu-4"])
        out: dict[str, float | int] = {k: (sum(v) / count if count else 0.0) for k, v in self.per_sample.items()}
        out.update(samples=count, empty_predictions=self.empty_predictions)
        return out


def _segmenter():
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def sample_scores(prediction: str, label: str) -> dict[str, float]:
    """The four scores of one pair; all 0 when the prediction (or the label) has nothing to score."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    if not prediction.strip() or not label.strip():
        return {k: 0.0 for k in METRIC_KEYS}
    jieba = _segmenter()
    hypothesis, reference = " ".join(jieba.cut(prediction)), " ".join(jieba.cut(label))
    try:
        rouge = Rouge().get_scores(hypothesis, reference)[0]
        scores = {f"rouge-{k[-1]}": round(v["f"] * 100, 4) for k, v in rouge.items()}
    except ValueError:
        scores = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    bleu = sentence_bleu([list(label)], list(prediction), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(float(bleu) * 100, 4)
    return scores


def score(predictions: Sequence[str], labels: Sequence[str]) -> Scores:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    result = Scores()
    for prediction, label in zip(predictions, labels):
        if not prediction.strip():
            result.empty_predictions += 1
        for key, value in sample_scores(prediction, label).items():
            result.per_sample[key].append(value)
    return result
