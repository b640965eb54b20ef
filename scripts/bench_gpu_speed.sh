#!/usr/bin/env bash
# The GPU records issue "training speed" asks for, in one go (on a CUDA machine, from the repository root):
#   P-Tuning v2 and LoRA on the chatglm2-6b shape, batch 16, lengths 64/128 of varied rows: THUDM's way
#   (the directory's own code, static padding), fixed, dynamic and packed, in alternating rounds;
#   the quantized base at 16/8/4 bits on the same shape; full fine-tuning MFU on the 1b shape (ZeRO-2).
#
#   bash scripts/bench_gpu_speed.sh OUT_DIR        (needs about 15 GB of disk for the shaped directory)
# Overrides: ROUNDS, STEPS, WARMUP, CODE (model code for THUDM's way), MODEL_DIR (an existing directory).
set -euo pipefail
OUT=${1:?usage: bench_gpu_speed.sh OUT_DIR}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-3}
CODE=${CODE:-tests/fixtures/remote_chatglm}
MODEL_DIR=${MODEL_DIR:-$OUT/chatglm2-6b-shaped}
mkdir -p "$OUT"
[ -f "$MODEL_DIR/config.json" ] || python scripts/make_shaped_model_dir.py --shape chatglm2-6b --code "$CODE" --out "$MODEL_DIR"
for method in ptuning lora; do
    python scripts/bench_speed.py --model "$MODEL_DIR" --method "$method" --device cuda --batch-size 16 \
        --source-length 64 --target-length 128 --pre-seq-len 128 --steps "$STEPS" --warmup "$WARMUP" \
        --rounds "$ROUNDS" --out "$OUT/speed-$method.json"
done
python scripts/bench_quantization.py --shape chatglm2-6b --device cuda --batch-size 16 --source-length 64 \
    --target-length 128 --pre-seq-len 128 --steps "$STEPS" --warmup "$WARMUP" --rounds 1 --out "$OUT/quantization.json"
glm-portable bench --shape 1b --method full --device cuda --batch-size 8 --source-length 64 --target-length 128 \
    --steps "$STEPS" --warmup "$WARMUP" --name cuda-full-1b --out "$OUT/full-1b.json" --overwrite
