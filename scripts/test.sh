#!/usr/bin/env bash
# The project's test command (README, .ci/run): pinned venv, then the whole pytest suite on CPU.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=$(bash "$root/scripts/env.sh")
cd "$root"
export EMO_HALLO_FIXTURE=${EMO_HALLO_FIXTURE:-$root/../shared/fixtures/hallo_tiny}
export EMO_FACE_FIXTURE=${EMO_FACE_FIXTURE:-$root/../shared/fixtures/face}
# A real ComfyUI for the integration tests: $COMFYUI_PATH, else the shared snapshot (skipped loudly if neither).
if [ -z "${COMFYUI_PATH:-}" ]; then
    COMFYUI_PATH=$(bash "$root/scripts/comfyui.sh" "$py")
    [ -n "$COMFYUI_PATH" ] && export COMFYUI_PATH
fi
exec "$py" -m pytest -q "$@" tests
