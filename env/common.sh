#!/usr/bin/env bash
# Helpers shared by env/npu.sh and env/cuda.sh; sourced, not run.

# _glm_default NAME VALUE SCRIPT: export NAME=VALUE unless the user already set NAME, and say which.
_glm_default() {
    local name="$1" value="$2" script="$3"
    if [ -z "${!name:-}" ]; then
        export "$name=$value"
        echo "$script: $name=$value"
    else
        echo "$script: $name=${!name} (kept)"
    fi
}
