"""Command line: `python -m emo_core generate --image IMG --audio AUDIO --out OUT.mp4`.

With no --checkpoint this runs the whole pipeline (audio features, ReferenceNet, clip-by-clip sampling, VAE,
mp4 writing) on a tiny *randomly initialised* model: the video shows noise-like frames, not a talking face.
That stays so until the bundled demo model exists; the command says so loudly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import DTYPES

ASSETS = Path(__file__).resolve().parent / "assets"


def generate_parser(sub):
    p = sub.add_parser("generate", help="portrait + audio -> mp4",
                       description="Turn a portrait and an audio clip into a lip-synced video (mp4).")
    p.add_argument("--image", default=str(ASSETS / "portrait.png"), help="portrait image (default: bundled sample)")
    p.add_argument("--audio", default=str(ASSETS / "speech.wav"), help="speech or singing (default: bundled sample)")
    p.add_argument("--out", default="out/emo.mp4", help="output mp4")
    p.add_argument("--checkpoint", help="EMO checkpoint (ours or Hallo's net.pth); default: tiny random model")
    p.add_argument("--vae", help="VAE: diffusers folder or .safetensors with its config beside it "
                                 "(required with --checkpoint)")
    p.add_argument("--audio-encoder", help="wav2vec2 the checkpoint was trained with: a transformers folder or a "
                                           "weights file (required with --checkpoint)")
    p.add_argument("--size", type=int, default=None, help="square generation size in pixels (multiple of 8); "
                                                          "default 512, 64 for the tiny random model")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 40)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's, 3.5)")
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "dpmpp", "unipc"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=None, help="video frame rate (default: the model's, 25)")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality: 0 lossless .. 51 worst (default 18)")
    p.add_argument("--speed", type=float, default=None, help="head motion speed in degrees per frame (EMO models)")
    p.add_argument("--face-detector", help="YuNet weights (yunet_final.pth) for the face box, a face-centred crop "
                                           "of any portrait size and the paste-back; without it the portrait is "
                                           "centre-cropped and the face assumed in its middle")
    p.add_argument("--face-mask", help="an image of the portrait's size, white where the face is; always wins over "
                                       "detection, and frames the crop")
    p.add_argument("--face-expand", type=float, default=1.2, help="face box expansion for the face-locator mask")
    p.add_argument("--face-index", type=int, default=0, help="which face when there are several (0 = largest)")
    p.add_argument("--whole-image-fallback", action="store_true",
                   help="when no face is found, use the whole image as face region instead of stopping")
    p.add_argument("--crop-only", action="store_true",
                   help="write the generated square crop instead of pasting it back into the full portrait")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    return p


def load_image(path) -> torch.Tensor:
    """Any image PIL reads (8/16-bit grey, RGB, RGBA composited on black, any size) -> (1, 3, H, W) in [0, 1]."""
    from PIL import Image, ImageOps

    from .face import as_rgb

    try:
        image = ImageOps.exif_transpose(Image.open(path))
        if image.mode.startswith("I"):  # 16-bit grey (or 32-bit holding 8- or 16-bit values)
            pixels = np.array(image, dtype=np.float32)[..., None]
            pixels /= 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        elif image.mode == "F":
            pixels = np.clip(np.array(image, dtype=np.float32), 0, 1)[..., None]
        else:
            pixels = np.array(image.convert("RGBA"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return as_rgb(torch.from_numpy(pixels).permute(2, 0, 1)[None].clamp(0, 1))


def frame_portrait(original: torch.Tensor, size: int, args):
    """The square the model animates: around the detected face (any portrait size), or the centre square.
    Returns (crop geometry, portrait (1, 3, size, size) in [0, 1], face-locator mask (1, 1, size, size), the face
    in crop pixels or None)."""
    from .face import Crop, YuNetDetector, box_mask, crop_image, expand_box, face_crop, pick_face

    height, width = original.shape[-2:]
    centre = Crop(width / 2, height / 2, float(min(height, width)), size, height, width)
    if args.face_mask:  # the user's mask wins
        user = load_image(args.face_mask)[:, :1]
        if user.shape[-2:] != original.shape[-2:]:
            raise ValueError(f"face mask {args.face_mask} is {user.shape[-1]}x{user.shape[-2]}, the portrait "
                             f"{width}x{height}: give a mask of the portrait's size")
        ys, xs = torch.nonzero(user[0, 0] > 0.5, as_tuple=True)
        if len(xs) == 0:
            raise ValueError(f"face mask {args.face_mask} is empty: paint the face white")
        crop = face_crop((float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1), height, width,
                         size)
        return crop, crop_image(original, crop), (crop_image(user, crop) > 0.5).float(), None
    if not args.face_detector:
        mask = torch.zeros(1, 1, size, size)
        mask[..., size // 8: size * 7 // 8, size // 6: size * 5 // 6] = 1  # a centred face box
        return centre, crop_image(original, centre), mask, None
    faces = YuNetDetector(args.face_detector).detect(original)[0]
    if not faces and args.whole_image_fallback:
        return centre, crop_image(original, centre), torch.ones(1, 1, size, size), None
    face = pick_face(faces, args.face_index, Path(args.image).name)
    crop = face_crop(face.box, height, width, size)
    face = crop.map_face(face)
    mask = box_mask(expand_box(face.box, args.face_expand, size, size), size, size)
    return crop, crop_image(original, crop), mask, face


def run_generate(args) -> Path:
    from .audio import Wav2Vec2Features, random_audio_encoder, read_audio, to_mono
    from .face import hallo_region_masks, paste_back
    from .sampler import GenerationInputs, SamplerSettings, encode_reference, generate
    from .video import VideoWriter
    from .vae import DiffusersVAE, random_vae

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.checkpoint:
        from .checkpoint import load_model

        if not (args.vae and args.audio_encoder):
            raise SystemExit("--checkpoint needs --vae and --audio-encoder (the VAE and wav2vec2 it was trained with)")
        model = load_model(args.checkpoint, dtype=dtype, device=device).eval()
        vae = DiffusersVAE.from_files(args.vae, dtype=dtype, device=device)
        encoder = Wav2Vec2Features.from_files(args.audio_encoder, device=device)
        size = args.size or 512
    else:
        from .config import preset
        from .models.emo import EMONet
        from .random_weights import randomize_

        print("=" * 78 + "\nNOTE: no --checkpoint given and no bundled demo model exists yet: running the full\n"
              "pipeline on a tiny RANDOMLY INITIALISED model. The video will not show a talking face.\n" + "=" * 78,
              file=sys.stderr)
        cfg = preset("tiny")
        model = randomize_(EMONet(cfg), args.seed).to(device=device, dtype=dtype).eval()
        vae = random_vae(tiny=True, dtype=dtype, device=device)
        encoder = random_audio_encoder(cfg.audio.layers, cfg.audio.channels)
        size = args.size or 64
    cfg = model.cfg
    fps = cfg.fps if args.fps is None else args.fps

    sound, rate = read_audio(args.audio)  # decoded once: 16 kHz mono for the model, as it is for the video
    waveform = to_mono(sound, rate)
    features, audio_length = encoder(waveform.to(encoder.model.device), fps=fps, clip_length=cfg.frames_per_clip)
    original = load_image(args.image)
    crop, portrait, mask, face = frame_portrait(original, size, args)
    image = (portrait * 2 - 1).to(device=device, dtype=dtype)
    regions = hallo_region_masks(face, size, size) if face is not None and cfg.audio.module == "hallo" else None
    inputs = GenerationInputs(reference_latent=encode_reference(vae, image), audio_features=features,
                              face_mask=mask.expand(-1, cfg.face_locator.in_channels, -1, -1), region_masks=regions,
                              speed=args.speed if cfg.speed else None, num_frames=audio_length)
    settings = SamplerSettings(steps=args.steps, guidance_scale=args.cfg, seed=args.seed, scheduler=args.scheduler)

    started = time.perf_counter()

    tty = sys.stderr.isatty()

    def progress(step, total, clip, clips):
        if tty or step % (total // clips) == 0:  # a log file gets one line per clip
            print(f"{chr(13) if tty else ''}[emo] clip {clip + 1}/{clips}  step {step}/{total}  "
                  f"{time.perf_counter() - started:.1f}s", end="" if tty else "\n", file=sys.stderr, flush=True)

    metadata = {"comment": f"EMO for ComfyUI; seed {args.seed}; checkpoint {args.checkpoint or 'tiny random'}"}
    with VideoWriter(args.out, fps, audio=sound.numpy(), sample_rate=rate, crf=args.crf, metadata=metadata) as writer:
        for clip in generate(model, inputs, settings, codec=vae, progress=progress):
            frames = vae.decode(clip.latents[0].transpose(0, 1)).float().cpu()  # (F, 3, size, size) in [0, 1]
            writer.write(frames if args.crop_only else paste_back(frames, original, crop))
    print(f"\n[emo] wrote {writer.frames} frames ({writer.frames / fps:.2f} s) to {args.out}", file=sys.stderr)
    return Path(args.out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m emo_core")
    sub = parser.add_subparsers(dest="command", required=True)
    generate_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "generate":
        try:
            run_generate(args)
        except KeyboardInterrupt:
            sys.exit("\n[emo] interrupted; the partial video was closed")
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
