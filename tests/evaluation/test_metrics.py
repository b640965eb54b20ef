"""THUDM's metrics against an independent computation: BLEU-4 written out, ROUGE-N on jieba word sets."""

import math
from collections import Counter

import jieba
import pytest

from glm_portable.evaluation import score
from glm_portable.evaluation.metrics import sample_scores


def bleu4_method3(prediction: str, label: str) -> float:
    """Character BLEU-4: clipped n-gram precisions, zero ones replaced by 1/(2^k * count) (NIST, method3),
    geometric mean with equal weights, brevity penalty; 0 when not even one character matches."""
    hyp, ref = list(prediction), list(label)
    if not set(hyp) & set(ref):
        return 0.0
    precisions, k = [], 0
    for n in range(1, 5):
        hyp_ngrams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        ref_ngrams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        total = max(sum(hyp_ngrams.values()), 1)
        matched = sum(min(c, ref_ngrams[g]) for g, c in hyp_ngrams.items())
        if matched == 0:
            k += 1
            precisions.append(1 / (2**k * total))
        else:
            precisions.append(matched / total)
    bp = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return 100 * bp * math.exp(sum(math.log(p) for p in precisions) / 4)


def rouge_n_f(prediction: str, label: str, n: int) -> float:
    """rouge_chinese's ROUGE-N: sets of word n-grams from jieba, F1 of their overlap."""
    def grams(text):
        words = " ".join(jieba.cut(text)).split()
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}

    hyp, ref = grams(prediction), grams(label)
    overlap = len(hyp & ref)
    if not overlap:
        return 0.0
    p, r = overlap / len(hyp), overlap / len(ref)
    return 100 * 2 * p * r / (p + r)


PAIRS = [
    ("这条裙子简约大方，适合日常穿着。", "这条裙子简约大方，适合日常穿着。"),
    ("今天天气很好", "模型需要数据"),
    ("这款红色连衣裙 looks great in summer", "这款白色连衣裙 looks nice in summer"),
    ("宽松的版型修饰身材，显得轻松随性", "宽松的版型包容身材，显得随性自然"),
]


@pytest.mark.parametrize("prediction,label", PAIRS)
def test_bleu_and_rouge_n_equal_the_independent_computation(prediction, label):
    scores = sample_scores(prediction, label)
    assert scores["bleu-4"] == pytest.approx(bleu4_method3(prediction, label), abs=1e-3)
    assert scores["rouge-1"] == pytest.approx(rouge_n_f(prediction, label, 1), abs=1e-3)
    assert scores["rouge-2"] == pytest.approx(rouge_n_f(prediction, label, 2), abs=1e-3)


def test_identical_scores_100_and_disjoint_scores_zero_rouge():
    same = sample_scores(*PAIRS[0])
    assert all(v == 100.0 for v in same.values())
    disjoint = sample_scores(*PAIRS[1])
    assert disjoint["rouge-1"] == disjoint["rouge-2"] == disjoint["rouge-l"] == 0.0
    assert disjoint["bleu-4"] == 0.0


def test_empty_prediction_scores_zero_and_is_counted():
    result = score(["", "这条裙子简约大方，适合日常穿着。", "   "], [PAIRS[0][1]] * 3)
    summary = result.summary()
    assert summary["empty_predictions"] == 2 and summary["samples"] == 3
    assert summary["bleu-4"] == pytest.approx(100 / 3, abs=1e-3)
    assert result.per_sample["rouge-l"] == [0.0, 100.0, 0.0]
