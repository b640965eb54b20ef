#!/usr/bin/env bash
# Source this file (`source env/cuda.sh`) before running glm-portable on NVIDIA GPUs.
# It checks for a driver and exports defaults for multi-GPU runs. Values already set are kept.

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "env/cuda.sh: nvidia-smi not found: install the NVIDIA driver first." >&2
    return 1 2>/dev/null || exit 1
fi
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | sed 's/^/env\/cuda.sh: GPU /'

# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

_glm_default DS_ACCELERATOR cuda env/cuda.sh
_glm_default GLM_PORTABLE_DEVICE cuda env/cuda.sh
_glm_default NCCL_ASYNC_ERROR_HANDLING 1 env/cuda.sh
_glm_default TORCH_DEVICE_BACKEND_AUTOLOAD 0 env/cuda.sh

unset -f _glm_default
