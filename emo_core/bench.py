"""Benchmark: generation speed and memory of the clip-by-clip sampler, on random but seeded inputs.

    python -m emo_core.bench --preset tiny --size 64 --clips 2 --steps 4
    python -m emo_core.bench --checkpoint emo_core/assets/emo-demo.safetensors --clips 4 --steps 20
    python -m emo_core.bench --checkpoint ../shared/fixtures/hallo_tiny/net.safetensors \
        --vae ../shared/fixtures/hallo_tiny/vae.safetensors --size 128

Prints exactly one JSON line on stdout (progress and notes go to stderr). `wall_s` counts generation only
(ReferenceNet, audio projection, denoising, motion-frame hand-over), not loading; `load_s` is the model load.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from .checkpoint import DTYPES
from .config import PRESETS, preset
from .sampler import GenerationInputs, SamplerSettings, SamplerStats, encode_reference, generate
from .vae import random_vae


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m emo_core.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=PRESETS, default="tiny", help="random model of a preset size")
    src.add_argument("--checkpoint", help="any supported checkpoint (ours, Hallo net.pth / .safetensors)")
    p.add_argument("--vae", help="VAE weights (diffusers folder or .safetensors with its config beside it); "
                                 "default: a random VAE of SD1.5 layout (tiny layout for tiny models)")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (square); default 64 for tiny "
                                                          "models, 512 otherwise")
    p.add_argument("--frames-per-clip", type=int, default=None)
    p.add_argument("--clips", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cfg", type=float, default=3.5)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    t0 = time.perf_counter()
    if args.checkpoint:
        from .checkpoint import load_model

        model = load_model(args.checkpoint, dtype=dtype, device=device).eval()
        name = args.checkpoint
    else:
        from .models.emo import EMONet
        from .random_weights import randomize_

        with torch.device(device):
            model = randomize_(EMONet(preset(args.preset)), args.seed).to(dtype).eval()
        name = args.preset
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load_s = time.perf_counter() - t0

    cfg = model.cfg
    tiny = cfg.unet.block_out_channels[0] < 320
    size = args.size or (cfg.size if args.checkpoint else 64 if tiny else 512)
    frames = args.frames_per_clip or cfg.frames_per_clip
    bundled = {}
    if args.checkpoint and not args.vae:
        from .checkpoint import load_companions

        bundled = load_companions(args.checkpoint)
    if args.vae or bundled.get("vae"):
        from .vae import DiffusersVAE

        vae = (DiffusersVAE.from_files(args.vae, dtype=dtype, device=device, scale=cfg.latent_scale) if args.vae else
               DiffusersVAE.from_state_dict(*bundled["vae"], dtype=dtype, device=device, scale=cfg.latent_scale))
    else:
        vae = random_vae(tiny, dtype, device)  # timing only: weights do not matter

    g = torch.Generator().manual_seed(args.seed)
    image = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    total = frames * args.clips
    mask = torch.zeros(1, cfg.face_locator.in_channels, size, size)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    inputs = GenerationInputs(
        reference_latent=encode_reference(vae, image.to(device=device, dtype=dtype)),
        audio_features=torch.randn(total, cfg.audio.layers, cfg.audio.channels, generator=g),
        face_mask=mask, speed=2.0 if cfg.speed else None,
        identity_embedding=torch.randn(cfg.identity_dim, generator=g) if cfg.identity_tokens else None)
    settings = SamplerSettings(steps=args.steps, guidance_scale=args.cfg, seed=args.seed, scheduler=args.scheduler,
                               frames_per_clip=frames)
    stats = SamplerStats()

    def progress(step, total_steps, clip, clips):
        print(f"\r[bench] clip {clip + 1}/{clips} step {step}/{total_steps}", end="", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    produced = 0
    for clip in generate(model, inputs, settings, codec=vae, progress=progress, stats=stats):
        produced += clip.latents.shape[2]  # the clip is dropped here, as a streaming consumer would
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    print(file=sys.stderr)

    result = {
        "model": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "size": size, "frames": produced, "frames_per_clip": frames, "clips": args.clips, "steps": args.steps,
        "cfg": args.cfg, "scheduler": args.scheduler, "device": str(device), "dtype": args.dtype,
        "threads": torch.get_num_threads(), "wall_s": round(wall, 3), "s_per_frame": round(wall / produced, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "reference_calls": stats.reference_calls, "reference_images": stats.reference_images,
        "backbone_calls": stats.backbone_calls,
        "load_s": round(load_s, 3),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
