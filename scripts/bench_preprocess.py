"""Preprocess speed on an ADGEN-sized synthetic set, against THUDM-style tokenization, in one run.

    python scripts/bench_preprocess.py [--rows 114599] [--num-proc 2] [--model DIR]

Generates attribute strings like 类型#裙*颜色#白色*风格#简约 with ~100-character Chinese answers,
then times (1) `glm-portable preprocess` end to end (read, tokenize, write Arrow shards) and
(2) the reference: `datasets` loads the JSON and `map` calls a transformers slow tokenizer row by
row and pads to max length, as THUDM's ptuning/main.py does with its SentencePiece tokenizer. Checks that both give the same ids; prints rows/s,
tokens/s and the speed ratio as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

def thudm_style_tokenizer(model_dir: Path):
    """A transformers slow (Python) tokenizer over the model's SentencePiece file with ChatGLM2's special
    tokens, as THUDM's tokenization_chatglm.py is; a stand-in so the reference needs no remote code."""
    import sentencepiece as spm
    from transformers import PreTrainedTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    specials = {t: sp.vocab_size() + i for i, t in enumerate(("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"))}

    class SentencePieceChatGLMTokenizer(PreTrainedTokenizer):
        model_input_names = ["input_ids", "attention_mask", "position_ids"]

        def __init__(self, **kwargs):
            super().__init__(padding_side="left", **kwargs)

        @property
        def vocab_size(self):
            return sp.vocab_size() + len(specials)

        @property
        def pad_token_id(self):
            return sp.unk_id()

        @property
        def eos_token_id(self):
            return sp.eos_id()

        def get_vocab(self):
            vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
            return {**vocab, **specials}

        def _tokenize(self, text, **kwargs):
            return sp.encode(text, out_type=str)

        def _convert_token_to_id(self, token):
            return specials[token] if token in specials else sp.piece_to_id(token)

        def _convert_id_to_token(self, index):
            return sp.id_to_piece(index)

        def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
            ids = [specials["[gMASK]"], specials["sop"]] + token_ids_0
            return ids + token_ids_1 + [sp.eos_id()] if token_ids_1 is not None else ids

    return SentencePieceChatGLMTokenizer()


def reference(model_dir: Path, train_file: Path, max_source: int, max_target: int):
    """THUDM's preprocess_function_train: datasets.map, the slow tokenizer called row by row, padded."""
    import datasets

    from glm_portable.modeling import chatglm2_prompt

    datasets.disable_progress_bars()
    tokenizer = thudm_style_tokenizer(model_dir)
    max_len = max_source + max_target + 1

    def process(examples):
        out = {"input_ids": [], "labels": []}
        for query, answer in zip(examples["content"], examples["summary"]):
            if not (query and answer):
                continue
            a = tokenizer.encode(text=chatglm2_prompt(query), add_special_tokens=True, truncation=True, max_length=max_source)
            b = tokenizer.encode(text=answer, add_special_tokens=False, truncation=True, max_length=max_target)
            ids = a + b + [tokenizer.eos_token_id]
            labels = [tokenizer.pad_token_id] * len(a) + b + [tokenizer.eos_token_id]
            pad = max_len - len(ids)
            out["input_ids"].append(ids + [tokenizer.pad_token_id] * pad)
            out["labels"].append([(t if t != tokenizer.pad_token_id else -100) for t in labels + [0] * pad])
        return out

    raw = datasets.load_dataset("json", data_files=str(train_file), split="train",
                                cache_dir=tempfile.mkdtemp(prefix="ref-cache-"))
    return raw.map(process, batched=True, remove_columns=raw.column_names, load_from_cache_file=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=114_599)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--model", type=Path, help="a ChatGLM2 model dir (default: a tiny one built here)")
    parser.add_argument("--max-source-length", type=int, default=64)
    parser.add_argument("--max-target-length", type=int, default=128)
    args = parser.parse_args()

    from glm_portable.data import PreprocessOptions, load_preprocessed, preprocess
    from glm_portable.data.synthetic import adgen_rows
    from glm_portable.modeling.tiny import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    model = args.model or make_tiny_model(work / "model", family="chatglm2", vocab_size=4000)
    train_file = work / "train.json"
    rows = adgen_rows(args.rows, seed=0, min_answer_chars=90, varied=True)
    train_file.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")

    start = time.perf_counter()
    result = preprocess(PreprocessOptions(model=model, train_file=train_file, out=work / "ours", num_proc=args.num_proc,
                                          max_source_length=args.max_source_length,
                                          max_target_length=args.max_target_length))
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    ref = reference(model, train_file, args.max_source_length, args.max_target_length)
    ref_s = time.perf_counter() - start

    ours = load_preprocessed(work / "ours")
    for i in range(0, len(ours), max(1, len(ours) // 50)):
        n = len(ours[i]["input_ids"])
        assert ref[i]["input_ids"][:n] == ours[i]["input_ids"], f"row {i}: ids differ from the reference"
        assert ref[i]["labels"][:n] == ours[i]["labels"], f"row {i}: labels differ from the reference"
    tokens = result.manifest["splits"]["train"]["tokens"]["total"]
    print(json.dumps({
        "rows": args.rows, "tokens": tokens, "num_proc": args.num_proc,
        "ours_s": round(ours_s, 2), "ours_rows_per_s": round(args.rows / ours_s), "ours_tokens_per_s": round(tokens / ours_s),
        "reference_s": round(ref_s, 2), "reference_rows_per_s": round(args.rows / ref_s),
        "speedup": round(ref_s / ours_s, 2),
    }))


if __name__ == "__main__":
    main()
