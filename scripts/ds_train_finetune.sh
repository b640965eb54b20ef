#!/usr/bin/env bash
# THUDM's ptuning/ds_train_finetune.sh (full fine-tuning, DeepSpeed ZeRO-2; 4 GPUs) and the Ascend
# recipe's 8-NPU variant, with the glm-portable CLI. No deepspeed_npu plugin, no patched files.
#
#   MODEL=/path/to/chatglm2-6b TRAIN=AdvertiseGen/train.json NPROC=4 bash scripts/ds_train_finetune.sh   # 4 GPUs
#   source env/npu.sh && MODEL=... TRAIN=... NPROC=8 bash scripts/ds_train_finetune.sh                   # 8 NPUs
#
# Multi-node: add --nnodes N --node-rank R --master-addr HOST (same command on every node).
# Precision follows the device: bf16 where supported, else fp16 with THUDM's dynamic loss scale.
set -euo pipefail

MODEL=${MODEL:?set MODEL to a ChatGLM2/3 model directory}
TRAIN=${TRAIN:?set TRAIN to the ADGEN train.json}
DEV=${DEV:-}
NPROC=${NPROC:-4}
LR=${LR:-1e-4}
DEVICE=${DEVICE:-auto}
DATA=${DATA:-data/adgen-$(basename "$MODEL")}
OUTPUT=${OUTPUT:-output/adgen-$(basename "$MODEL")-ft-$LR}

glm-portable preprocess --model "$MODEL" --train-file "$TRAIN" ${DEV:+--eval-file "$DEV"} --out "$DATA" \
    --prompt-column content --response-column summary --max-source-length 64 --max-target-length 64

glm-portable train --model "$MODEL" --data "$DATA" --output "$OUTPUT" --device "$DEVICE" \
    --method full --deepspeed zero2 --nproc "$NPROC" --lr "$LR" \
    --batch-size 4 --grad-accum 1 --max-steps 5000 --logging-steps 10 --save-steps 1000 \
    ${RESUME:+--resume auto} "$@"
