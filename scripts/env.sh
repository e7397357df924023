#!/usr/bin/env bash
# Creates (once) and refreshes the pinned development venv, then prints its python.
# Usage: PY=$(bash scripts/env.sh)
# The venv lives outside the repository (default ~/.cache/emo-comfyui/venv; override with EMO_VENV)
# so fresh clones and CI runs reuse it. It is rebuilt only when requirements-dev.txt changes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${EMO_VENV:-$HOME/.cache/emo-comfyui/venv}
req="$root/requirements-dev.txt"
stamp="$venv/.emo-requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
    echo "[env] creating venv at $venv" >&2
    python3 -m venv "$venv" >&2
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[env] installing requirements-dev.txt into $venv (torch is ~4 GB the first time)" >&2
    # torch, torchvision and torchaudio must come as one matching trio: install them first.
    grep -E '^(torch|torchvision|torchaudio)==' "$req" > "$venv/.torch-trio.txt"
    "$venv/bin/python" -m pip install -q -r "$venv/.torch-trio.txt" >&2
    "$venv/bin/python" -m pip install -q -r "$req" -c "$venv/.torch-trio.txt" >&2
    echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
