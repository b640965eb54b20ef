"""ADGEN-style rows whose answers follow from the attributes, so a model can learn them.

Used by `glm-portable demo` (short answers) and by the preprocess benchmark (ADGEN-length answers).
"""

from __future__ import annotations

import random

ATTRIBUTES: dict[str, list[str]] = {
    "类型": ["裙", "上衣", "裤", "外套", "衬衫", "毛衣"],
    "颜色": ["白色", "黑色", "红色", "蓝色", "粉色", "灰色", "绿色"],
    "风格": ["简约", "复古", "休闲", "通勤", "甜美", "街头"],
    "图案": ["条纹", "碎花", "格子", "纯色", "印花"],
    "材质": ["棉", "雪纺", "牛仔布", "针织", "羊毛"],
}
TEMPLATE = "这款{颜色}的{类型}采用{材质}面料，{图案}图案，{风格}风格。"
EXTRA_PHRASES = [
    "{颜色}的配色简单大方，", "{图案}的设计增添了几分{风格}气息，", "{材质}面料穿着舒适透气，",
    "搭配小白鞋就能穿出时尚感，", "适合日常通勤和周末出游，", "是衣橱里不可缺少的百搭{类型}。",
]


def adgen_rows(count: int, seed: int = 0, min_answer_chars: int = 0, varied: bool = False) -> list[dict[str, str]]:
    """``{"content": "类型#裙*颜色#红色*...", "summary": ...}`` rows.

    The summary is a function of the attributes (learnable), padded to ``min_answer_chars`` with
    phrases chosen by the attributes, or at random with ``varied`` so that, as in ADGEN itself,
    almost no two answers repeat.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        values = {key: rng.choice(options) for key, options in ATTRIBUTES.items()}
        keys = ["类型"] + rng.sample([k for k in ATTRIBUTES if k != "类型"], len(ATTRIBUTES) - 1)
        summary = TEMPLATE.format(**values)
        phrase = sum(map(ord, "".join(values.values())))
        while len(summary) < min_answer_chars:
            index = rng.randrange(len(EXTRA_PHRASES)) if varied else phrase % len(EXTRA_PHRASES)
            summary += EXTRA_PHRASES[index].format(**values)
            phrase += 1
        rows.append({"content": "*".join(f"{k}#{values[k]}" for k in keys), "summary": summary})
    return rows
