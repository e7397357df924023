#!/usr/bin/env bash
# The project's test command (README, .ci/run): pinned venv, then the whole pytest suite on CPU.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=$(bash "$root/scripts/env.sh")
cd "$root"
export EMO_HALLO_FIXTURE=${EMO_HALLO_FIXTURE:-$root/../shared/fixtures/hallo_tiny}
export EMO_FACE_FIXTURE=${EMO_FACE_FIXTURE:-$root/../shared/fixtures/face}
exec "$py" -m pytest -q "$@" tests
