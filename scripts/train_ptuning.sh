#!/usr/bin/env bash
# THUDM's ptuning/train.sh (ChatGLM2-6B P-Tuning v2 on ADGEN) with the glm-portable CLI.
# The same command runs on a GPU, an Ascend NPU (`source env/npu.sh` first; static shapes) or the CPU.
#
#   MODEL=/path/to/chatglm2-6b TRAIN=AdvertiseGen/train.json DEV=AdvertiseGen/dev.json bash scripts/train_ptuning.sh
#
# Differences from THUDM's script: no int4 quantization (the base is frozen in bf16 / fp16),
# data are tokenized once into Arrow shards and reused by later runs.
set -euo pipefail

MODEL=${MODEL:?set MODEL to a ChatGLM2/3 model directory}
TRAIN=${TRAIN:?set TRAIN to the ADGEN train.json}
DEV=${DEV:-}
PRE_SEQ_LEN=${PRE_SEQ_LEN:-128}
LR=${LR:-2e-2}
DEVICE=${DEVICE:-auto}
DATA=${DATA:-data/adgen-$(basename "$MODEL")}
OUTPUT=${OUTPUT:-output/adgen-$(basename "$MODEL")-pt-$PRE_SEQ_LEN-$LR}

glm-portable preprocess --model "$MODEL" --train-file "$TRAIN" ${DEV:+--eval-file "$DEV"} --out "$DATA" \
    --prompt-column content --response-column summary --max-source-length 64 --max-target-length 128

glm-portable train --model "$MODEL" --data "$DATA" --output "$OUTPUT" --device "$DEVICE" \
    --method ptuning --pre-seq-len "$PRE_SEQ_LEN" --lr "$LR" \
    --batch-size 1 --grad-accum 16 --max-steps 3000 --logging-steps 10 --save-steps 1000 \
    ${RESUME:+--resume auto} "$@"
