#!/usr/bin/env bash
# Prepares the ComfyUI the integration tests run against (and the headless browser of the browser tests) and
# prints its path (nothing when there is none).
# Usage: COMFYUI_PATH=$(bash scripts/comfyui.sh PYTHON)
# Source: the unmodified snapshot in ../shared/comfyui, extracted once outside the repository
# (~/.cache/emo-comfyui/<snapshot name>); its requirements go into the given Python's environment, keeping the
# pinned torch trio. Nothing of ComfyUI is ever copied into this repository.
set -euo pipefail
py=$1
root=$(cd "$(dirname "$0")/.." && pwd)
tarball=$(ls "$root"/../shared/comfyui/ComfyUI-*.tar.gz 2>/dev/null | tail -n 1 || true)
[ -n "$tarball" ] || exit 0
dest="$HOME/.cache/emo-comfyui/$(basename "$tarball" .tar.gz)"
if [ ! -f "$dest/.extracted" ]; then
    echo "[comfyui] extracting $(basename "$tarball") to $dest" >&2
    rm -rf "$dest" && mkdir -p "$dest"
    tar -xzf "$tarball" -C "$dest"
    touch "$dest/.extracted"
fi
venv=$("$py" -c 'import sys; print(sys.prefix)')
want=$(sha256sum "$dest/ComfyUI/requirements.txt" "$root/requirements-dev.txt" | sha256sum | cut -d' ' -f1)
stamp="$venv/.comfyui-requirements.sha256"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[comfyui] installing ComfyUI's requirements (and requests, which it imports unlisted)" >&2
    grep -E '^(torch|torchvision|torchaudio)==' "$root/requirements-dev.txt" > "$venv/.torch-trio.txt"
    "$py" -m pip install -q -r "$dest/ComfyUI/requirements.txt" requests -c "$venv/.torch-trio.txt" >&2
    echo "$want" > "$stamp"
fi
# The browser tests drive Debian's chromium (Playwright's own browser download cannot work offline).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[comfyui] installing Debian's chromium for the browser tests" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >&2 ||
        echo "[comfyui] chromium could not be installed: the browser tests will be skipped" >&2
fi
echo "$dest/ComfyUI"
