#!/usr/bin/env bash
# NPU vs GPU, measured: the same two workloads on each machine, then one comparison.
#
#   on the NPU machine:  source env/npu.sh;  bash scripts/compare_npu_gpu.sh record results
#   on the GPU machine:  source env/cuda.sh; bash scripts/compare_npu_gpu.sh record results
#   then, with both machines' results/ copied into one:  bash scripts/compare_npu_gpu.sh compare results
#
# Workloads (random weights in the named shapes: nothing to download, same data on both sides):
#   ptuning: ChatGLM2-6B shape, P-Tuning v2 with THUDM's lengths (64/128, prefix 128), batch 16, one card
#   full:    a 1.1B ChatGLM2-shape model, full fine-tuning with DeepSpeed ZeRO-2 on NPROC cards
# Overrides: DTYPE (default: the backend's, bf16 on A2 / H100, fp16 on 910A), STEPS, WARMUP, NPROC,
# PT_SHAPE, FULL_SHAPE, PT_BATCH, FULL_BATCH. The GPU record is the baseline of the comparison.
set -euo pipefail

MODE=${1:?usage: compare_npu_gpu.sh record|compare DIR}
DIR=${2:?usage: compare_npu_gpu.sh record|compare DIR}
STEPS=${STEPS:-50}
WARMUP=${WARMUP:-5}
NPROC=${NPROC:-8}
PT_SHAPE=${PT_SHAPE:-chatglm2-6b}
FULL_SHAPE=${FULL_SHAPE:-1b}
PT_BATCH=${PT_BATCH:-16}
FULL_BATCH=${FULL_BATCH:-4}

if [ "$MODE" = record ]; then
    DEVICE=$(glm-portable env --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["selected"]["device"])')
    mkdir -p "$DIR"
    glm-portable bench --shape "$PT_SHAPE" --method ptuning --device "$DEVICE" ${DTYPE:+--dtype "$DTYPE"} \
        --batch-size "$PT_BATCH" --source-length 64 --target-length 128 --pre-seq-len 128 \
        --steps "$STEPS" --warmup "$WARMUP" --name "$DEVICE-ptuning" --out "$DIR/$DEVICE-ptuning.json" --overwrite
    glm-portable bench --shape "$FULL_SHAPE" --method full --device "$DEVICE" ${DTYPE:+--dtype "$DTYPE"} \
        --nproc "$NPROC" --batch-size "$FULL_BATCH" --source-length 64 --target-length 128 --gradient-checkpointing \
        --steps "$STEPS" --warmup "$WARMUP" --name "$DEVICE-full-${NPROC}x" --out "$DIR/$DEVICE-full.json" --overwrite
elif [ "$MODE" = compare ]; then
    for workload in ptuning full; do
        glm-portable compare "$DIR/cuda-$workload.json" "$DIR/npu-$workload.json" --out "$DIR/compare-$workload" --overwrite
    done
else
    echo "unknown mode $MODE: expected record or compare" >&2
    exit 2
fi
