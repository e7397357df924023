#!/usr/bin/env bash
# Reproduces the bundled demo model (emo_core/assets/emo-demo.safetensors) from nothing with the project's own
# commands, on CPU: synthetic talking faces -> data preparation -> small VAE -> stages 1, 2, 3 -> one bundled file.
# About 51 minutes on 2 cores at this machine's morning speed of 2026-12-02, about 70 in a slow hour (the end-to-end
# run of that afternoon took 66 min = synthetic clips 4.1, prepare 6.5, VAE 18.7, stages 12.0 + 14.2 + 9.5, with
# the stage-2 recipe of then, which trained only the new modules: the whole network trains now, ~4 min more). The
# shipped file is that run's data, VAE and stage 1 with stages 2 and 3 run again by these configs on 2026-12-03.
# The closing eval-synthetic adds 7-18.
# Work files go to out/demo-train/ (ignored by git).
#   bash scripts/train_demo.sh [YUNET_WEIGHTS]     (default: ../shared/fixtures/face/yunet_final.pth)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=$(bash "$root/scripts/env.sh")
cd "$root"
face=${1:-$root/../shared/fixtures/face/yunet_final.pth}
work=out/demo-train
rm -rf "$work"
mkdir -p "$work"
# 200 people x 2 s at 128 px, head speeds cycling 0 / 0.5 / 1 / 2 / 3 degrees per frame (seeds 1000-1199)
"$py" -m emo_core.synthetic "$work/videos" --count 200 --seconds 2 --size 128 --speeds 0 0.5 1 2 3 --seed 1000
"$py" -m emo_core new-audio-encoder --out "$work/audio_encoder" --layers 4 --hidden 32 --seed 0
# at least 2 workers: each prepares its videos on one thread, so the files are the same on any machine
workers=$(( $(nproc) > 2 ? $(nproc) : 2 ))
"$py" -m emo_core prepare "$work/videos" "$work/prepared" --audio-encoder "$work/audio_encoder" \
    --face-detector "$face" --confidence 0.3 --size 64 --clip-frames 10 --max-speed 4 --workers "$workers"
"$py" -m emo_core train-vae "$work/prepared" --out "$work/vae" --steps 1300 --batch-size 8 --lr 1e-3 --seed 0
for stage in 1 2 3; do
    "$py" -m emo_core train "configs/train/demo_stage$stage.json"
done
"$py" -m emo_core bundle --checkpoint "$work/stage3/model.safetensors" --vae "$work/vae" \
    --audio-encoder "$work/audio_encoder" --out emo_core/assets/emo-demo.safetensors --dtype fp16 --overwrite
"$py" -m emo_core eval-synthetic --face-detector "$face" --seed 0
