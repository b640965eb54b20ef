#!/usr/bin/env bash
# THUDM's ChatGLM-6B ptuning/train.sh (P-Tuning v2 on ADGEN) with the glm-portable CLI.
# The same command runs on a GPU, an Ascend NPU (`source env/npu.sh` first; static shapes) or the CPU.
#
#   MODEL=/path/to/chatglm-6b TRAIN=AdvertiseGen/train.json DEV=AdvertiseGen/dev.json bash scripts/train_ptuning_v1.sh
#
# THUDM's settings: PRE_SEQ_LEN 128, LR 2e-2, source 64 / target 64, batch 1 x accumulation 16, 3000 steps.
# Differences: no int4 quantization (the base is frozen in bf16 / fp16); data are tokenized once.
set -euo pipefail

MODEL=${MODEL:?set MODEL to a ChatGLM-6B model directory}
TRAIN=${TRAIN:?set TRAIN to the ADGEN train.json}
DEV=${DEV:-}
PRE_SEQ_LEN=${PRE_SEQ_LEN:-128}
LR=${LR:-2e-2}
DEVICE=${DEVICE:-auto}
DATA=${DATA:-data/adgen-$(basename "$MODEL")}
OUTPUT=${OUTPUT:-output/adgen-$(basename "$MODEL")-pt-$PRE_SEQ_LEN-$LR}

glm-portable preprocess --model "$MODEL" --train-file "$TRAIN" ${DEV:+--eval-file "$DEV"} --out "$DATA" \
    --prompt-column content --response-column summary --max-source-length 64 --max-target-length 64

glm-portable train --model "$MODEL" --data "$DATA" --output "$OUTPUT" --device "$DEVICE" \
    --method ptuning --pre-seq-len "$PRE_SEQ_LEN" --lr "$LR" \
    --batch-size 1 --grad-accum 16 --max-steps 3000 --logging-steps 10 --save-steps 1000 \
    ${RESUME:+--resume auto} "$@"
