"""A model directory of a benchmark shape (random weights) carrying modeling code of its own, so that THUDM's way
(``--impl remote``) can be measured on the 6B shape without downloading weights.

    python scripts/make_shaped_model_dir.py --shape chatglm2-6b --code tests/fixtures/remote_chatglm --out DIR

The weights are drawn in bf16 on the CPU (about 12.5 GB of memory and disk for the 6B shape); the tokenizer is
a tiny one (benchmarks train on synthetic ids, never on text). ``--code`` is a directory of ChatGLM2/3 model
code in upstream's layout (THUDM's own files, or the repository's test fixture written in their structure).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from glm_portable.bench.options import SHAPES, Workload
from glm_portable.modeling import load_tokenizer, random_model, save_model
from glm_portable.modeling.tiny import make_tiny_model

AUTO_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True, choices=[name for name, (cls, _) in SHAPES.items()
                                                           if cls == "ChatGLMConfig"])
    parser.add_argument("--code", required=True, type=Path, help="directory with configuration/modeling/tokenization")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = random_model(Workload(shape=args.shape).config(), dtype=torch.bfloat16, device="cpu")
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = load_tokenizer(make_tiny_model(Path(scratch) / "tok", family="chatglm2"))
        save_model(model, args.out, tokenizer=tokenizer)
    for source in args.code.glob("*.py"):
        shutil.copy(source, args.out / source.name)
    config = json.loads((args.out / "config.json").read_text())
    (args.out / "config.json").write_text(json.dumps({**config, "auto_map": AUTO_MAP}, indent=2))
    tokenizer_config = json.loads((args.out / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
    (args.out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    print(args.out)


if __name__ == "__main__":
    main()
