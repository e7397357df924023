#!/usr/bin/env bash
# The project's main job (README): portrait + audio -> mp4, on the bundled defaults.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=$(bash "$root/scripts/env.sh")
cd "$root"
mkdir -p out
exec "$py" -m emo_core generate --out out/demo.mp4 "$@"
