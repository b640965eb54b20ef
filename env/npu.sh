#!/usr/bin/env bash
# Source this file (`source env/npu.sh`) before running glm-portable on Ascend NPUs.
# It finds CANN's set_env.sh, loads it, and exports the defaults the Ascend recipes use.
# Values already set in your shell are kept.

_glm_find_cann() {
    local candidates=()
    [ -n "${ASCEND_TOOLKIT_HOME:-}" ] && candidates+=("${ASCEND_TOOLKIT_HOME}/set_env.sh" "${ASCEND_TOOLKIT_HOME}/../set_env.sh")
    candidates+=(
        /usr/local/Ascend/ascend-toolkit/set_env.sh
        /usr/local/Ascend/ascend-toolkit/latest/set_env.sh
        /opt/Ascend/ascend-toolkit/set_env.sh
        "${HOME}/Ascend/ascend-toolkit/set_env.sh"
    )
    local f
    for f in "${candidates[@]}"; do
        if [ -f "$f" ]; then echo "$f"; return 0; fi
    done
    return 1
}

if ! _glm_cann_env="$(_glm_find_cann)"; then
    echo "env/npu.sh: CANN not found (looked in \$ASCEND_TOOLKIT_HOME, /usr/local/Ascend, /opt/Ascend, ~/Ascend)." >&2
    echo "Install the CANN toolkit matching your torch_npu (see env/versions-npu.txt) or set ASCEND_TOOLKIT_HOME." >&2
    return 1 2>/dev/null || exit 1
fi

# shellcheck disable=SC1090
source "$_glm_cann_env"
echo "env/npu.sh: loaded CANN from $_glm_cann_env"

# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

_glm_default TASK_QUEUE_ENABLE 1 env/npu.sh
_glm_default COMBINED_ENABLE 1 env/npu.sh
_glm_default HCCL_WHITELIST_DISABLE 1 env/npu.sh
_glm_default HCCL_CONNECT_TIMEOUT 7200 env/npu.sh
_glm_default ASCEND_GLOBAL_LOG_LEVEL 3 env/npu.sh
_glm_default ACL_OP_COMPILER_CACHE_MODE enable env/npu.sh
_glm_default ACL_OP_COMPILER_CACHE_DIR "${HOME}/.cache/glm-portable/op-cache" env/npu.sh
_glm_default DS_ACCELERATOR npu env/npu.sh
_glm_default GLM_PORTABLE_DEVICE npu env/npu.sh

unset -f _glm_find_cann _glm_default
unset _glm_cann_env
