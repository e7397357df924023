"""Command line: `python -m emo_core generate --image IMG --audio AUDIO --out OUT.mp4 [--checkpoint FILE]`.

With no --checkpoint it runs the bundled demo model (emo_core/assets/emo-demo.safetensors: a small EMO trained by
this project on synthetic faces, with its own VAE and audio encoder inside) on the bundled sample portrait and
speech. Other commands (`prepare`, `train`, `eval-synthetic`, ...) are listed by `python -m emo_core --help`.
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
DEMO_CHECKPOINT = ASSETS / "emo-demo.safetensors"


def positive(kind=int):
    """An argparse type: a number above 0 (steps, fps, sizes, counts), so that 0 or -3 is an error that names the
    option, not a failure deep inside."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    return parse


def check_video_out(path) -> Path:
    """The output video's path, checked before any work is done."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give a file name, e.g. {out / 'emo.mp4'}")
    if out.suffix.lower() not in (".mp4", ".mov", ".mkv"):
        raise ValueError(f"--out {out}: the video is H.264 + AAC, written as .mp4 (or .mov / .mkv); give a file name "
                         f"ending in .mp4")
    folder = next((parent for parent in out.parents if parent.exists()), None)
    if folder is not None and not folder.is_dir():
        raise ValueError(f"--out {out}: {folder} is a file, not a folder")
    return out


def generate_parser(sub):
    p = sub.add_parser("generate", help="portrait + audio -> mp4",
                       description="Turn a portrait and an audio clip into a lip-synced video (mp4).")
    p.add_argument("--image", default=str(ASSETS / "portrait.png"), help="portrait image (default: bundled sample)")
    p.add_argument("--audio", default=str(ASSETS / "speech.wav"), help="speech or singing (default: bundled sample)")
    p.add_argument("--out", default="out/emo.mp4", help="output mp4")
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT),
                   help="EMO checkpoint (ours or Hallo's net.pth); default: the bundled demo model")
    p.add_argument("--vae", help="VAE: diffusers folder or .safetensors with its config beside it (needed when the "
                                 "checkpoint carries none, e.g. sd-vae-ft-mse for Hallo)")
    p.add_argument("--audio-encoder", help="wav2vec2 the checkpoint was trained with: a transformers folder or a "
                                           "weights file (needed when the checkpoint carries none)")
    p.add_argument("--size", type=positive(), default=None,
                   help="square generation size in pixels (multiple of 8); default: the model's training size (512; "
                        "demo 64)")
    p.add_argument("--steps", type=positive(), default=None, help="denoising steps (default: the model's, 40)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's, 3.5)")
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "dpmpp", "unipc"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=positive(float), default=None, help="video frame rate (default: the model's, 25)")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality: 0 lossless .. 51 worst (default 18)")
    p.add_argument("--speed", type=float, default=1.0, help="head motion speed in degrees per frame (EMO models "
                                                             "with speed layers; default 1.0)")
    p.add_argument("--face-detector", help="YuNet weights (yunet_final.pth) for the face box, a face-centred crop "
                                           "of any portrait size and the paste-back; without it the portrait is "
                                           "centre-cropped and the face assumed in its middle")
    p.add_argument("--face-recognition", help="ArcFace ONNX model for checkpoints that condition on the face identity "
                                              "(Hallo: glintr100.onnx from its pretrained_models/face_analysis/"
                                              "models); needs --face-detector and onnxruntime")
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
    from .face import Crop, YuNetDetector, box_mask, centred_face_mask, crop_image, expand_box, face_crop, pick_face

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
        return centre, crop_image(original, centre), centred_face_mask(size, size), None
    faces = YuNetDetector(args.face_detector).detect(original)[0]
    if not faces and args.whole_image_fallback:
        return centre, crop_image(original, centre), torch.ones(1, 1, size, size), None
    face = pick_face(faces, args.face_index, Path(args.image).name)
    crop = face_crop(face.box, height, width, size)
    face = crop.map_face(face)
    mask = box_mask(expand_box(face.box, args.face_expand, size, size), size, size)
    return crop, crop_image(original, crop), mask, face


def warn_about_framing(crop, face, size: int, args) -> None:
    """Portraits that make a poor video without an error: a face region far smaller than the model's size (blurred
    by the enlargement), or a wide or tall image centre-cropped because its face was not located."""
    if crop.side * 2 < size:
        print(f"[emo] warning: the region of {Path(args.image).name} the model animates is {crop.side:.0f} px wide, "
              f"enlarged {size / crop.side:.1f}x to the model's {size} px: expect a blurry video; use a larger "
              f"portrait", file=sys.stderr)
    if face is None and not args.face_mask and max(crop.height, crop.width) > 1.5 * min(crop.height, crop.width):
        print(f"[emo] warning: {Path(args.image).name} is {crop.width}x{crop.height} and its face was not located "
              f"(no --face-detector, or none found): the model animates its centre square and assumes the face in "
              f"the middle of it; give --face-detector yunet_final.pth (or a --face-mask) to frame the face",
              file=sys.stderr)


def portrait_identity(args, portrait: torch.Tensor, face):
    """Hallo's face identity (ArcFace embedding) of the square portrait the model animates, as Hallo computes it
    on its 512x512 input; `face`: the face already found in it (None: detect it)."""
    from .face import YuNetDetector
    from .face_identity import ArcFace, embed_face, face_identity

    if not args.face_recognition or not args.face_detector:
        raise ValueError(f"{Path(args.checkpoint).name} conditions on the face identity (Hallo's ArcFace input): "
                         f"pass --face-recognition FILE.onnx (glintr100.onnx from Hallo's pretrained_models/"
                         f"face_analysis/models) and --face-detector yunet_final.pth")
    arcface = ArcFace(args.face_recognition)
    if face is not None:
        return embed_face(portrait, face, arcface)
    return face_identity(portrait, YuNetDetector(args.face_detector), arcface,
                         zeros_if_no_face=args.whole_image_fallback, what=Path(args.image).name)


def load_pipeline(checkpoint, vae=None, audio_encoder=None, dtype=torch.float32, device="cpu"):
    """(model, VAE codec, audio encoder) of a checkpoint; the VAE and wav2vec2 bundled inside it unless given."""
    from .audio import Wav2Vec2Features
    from .checkpoint import build_model, read_checkpoint
    from .vae import DiffusersVAE

    if not Path(checkpoint).is_file():
        hint = " (the bundled demo model is missing: check out the repository again)" if Path(
            checkpoint) == DEMO_CHECKPOINT else ""
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}{hint}")
    loaded = read_checkpoint(checkpoint)
    model = build_model(loaded.config, loaded.state_dict, Path(checkpoint).name, loaded.looks_like, dtype=dtype,
                        device=device).eval()
    bundled = loaded.companions
    scale = model.cfg.latent_scale
    if vae:
        codec = DiffusersVAE.from_files(vae, dtype=dtype, device=device, scale=scale)
    elif "vae" in bundled:
        codec = DiffusersVAE.from_state_dict(*bundled["vae"], dtype=dtype, device=device, scale=scale)
    else:
        raise ValueError(f"{Path(checkpoint).name} carries no VAE: pass --vae (the VAE it was trained with, e.g. "
                         f"sd-vae-ft-mse for Hallo)")
    if audio_encoder:
        encoder = Wav2Vec2Features.from_files(audio_encoder, device=device)
    elif "audio_encoder" in bundled:
        config, state_dict = bundled["audio_encoder"]
        encoder = Wav2Vec2Features.from_state_dict(state_dict, config, device=device)
    else:
        raise ValueError(f"{Path(checkpoint).name} carries no audio encoder: pass --audio-encoder (the wav2vec2 it "
                         f"was trained with, e.g. wav2vec2-base-960h for Hallo)")
    return model, codec, encoder


def run_generate(args) -> Path:
    from .audio import check_speech, read_audio, to_mono
    from .face import hallo_region_masks, paste_back
    from .sampler import GenerationInputs, SamplerSettings, encode_reference, generate
    from .video import VideoWriter

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this torch sees no CUDA GPU (no driver, or a CPU-only build of "
                         f"torch): use --device cpu")
    if device.type == "cpu" and dtype == torch.float16:
        print("[emo] warning: fp16 on the CPU is many times slower than fp32 (few CPU kernels for it): use --dtype "
              "fp32", file=sys.stderr)
    if args.size is not None and args.size % 8:
        raise ValueError(f"--size {args.size}: the generation size must be a multiple of 8 (the VAE's factor), e.g. "
                         f"{max(8, args.size // 8 * 8)}")
    out = check_video_out(args.out)
    # the user's files first: a wrong path or an unreadable file is reported before the model loads
    sound, rate = read_audio(args.audio)  # decoded once: 16 kHz mono for the model, as it is for the video
    waveform = to_mono(sound, rate)
    original = load_image(args.image)
    model, vae, encoder = load_pipeline(args.checkpoint, args.vae, args.audio_encoder, dtype, device)
    size = args.size or model.cfg.size
    cfg = model.cfg
    print(f"[emo] model {Path(args.checkpoint).name} ({cfg.name}), {size}x{size}, {args.steps or cfg.steps} steps, "
          f"seed {args.seed}", file=sys.stderr)
    fps = cfg.fps if args.fps is None else args.fps

    check_speech(waveform, fps)
    features, audio_length = encoder(waveform.to(encoder.model.device), fps=fps, clip_length=cfg.frames_per_clip)
    crop, portrait, mask, face = frame_portrait(original, size, args)
    warn_about_framing(crop, face, size, args)
    image = (portrait * 2 - 1).to(device=device, dtype=dtype)
    identity = portrait_identity(args, portrait, face) if cfg.identity_tokens else None
    if face is None and identity is not None:
        face = identity.face
    regions = hallo_region_masks(face, size, size) if face is not None and cfg.audio.module == "hallo" else None
    inputs = GenerationInputs(reference_latent=encode_reference(vae, image), audio_features=features,
                              face_mask=mask.expand(-1, cfg.face_locator.in_channels, -1, -1), region_masks=regions,
                              identity_embedding=None if identity is None else identity.embedding,
                              speed=args.speed if cfg.speed else None, num_frames=audio_length)
    settings = SamplerSettings(steps=args.steps, guidance_scale=args.cfg, seed=args.seed, scheduler=args.scheduler)

    started = time.perf_counter()

    tty = sys.stderr.isatty()

    def progress(step, total, clip, clips):
        if tty or step % (total // clips) == 0:  # a log file gets one line per clip
            print(f"{chr(13) if tty else ''}[emo] clip {clip + 1}/{clips}  step {step}/{total}  "
                  f"{time.perf_counter() - started:.1f}s", end="" if tty else "\n", file=sys.stderr, flush=True)

    metadata = {"comment": f"EMO for ComfyUI; seed {args.seed}; checkpoint {Path(args.checkpoint).name}"}
    # written beside --out and moved onto it when complete: an earlier video of that name is kept until then
    partial = out.with_name(f"{out.stem}.partial{out.suffix}")
    writer = VideoWriter(partial, fps, audio=sound.numpy(), sample_rate=rate, crf=args.crf, metadata=metadata)
    try:
        with writer:
            for clip in generate(model, inputs, settings, codec=vae, progress=progress):
                frames = vae.decode(clip.latents[0].transpose(0, 1)).float().cpu()  # (F, 3, size, size) in [0, 1]
                writer.write(frames if args.crop_only else paste_back(frames, original, crop))
    except KeyboardInterrupt:
        if writer.frames == 0:
            partial.unlink(missing_ok=True)
        else:  # closed, and playable: kept, but never in place of an earlier video
            kept = partial if out.exists() else partial.replace(out)
            print(f"\n[emo] the {writer.frames} frames made ({writer.frames / fps:.2f} s) are in {kept}"
                  f"{f'; {out} was left as it was' if kept == partial else ''}", file=sys.stderr)
        raise
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    replaced = out.exists()
    partial.replace(out)
    print(f"\n[emo] wrote {writer.frames} frames ({writer.frames / fps:.2f} s) to {out}"
          f"{' (replacing the earlier file)' if replaced else ''}", file=sys.stderr)
    return out


# Subcommands with their own parsers: `python -m emo_core NAME --help`.
COMMANDS = {
    "prepare": ("emo_core.data", "talking-head videos -> a prepared training set"),
    "train": ("emo_core.train", "train one stage (1 images, 2 video + audio, 3 speed) from a JSON config"),
    "train-vae": ("emo_core.train", "train a small VAE on a prepared set (for small models)"),
    "new-audio-encoder": ("emo_core.train", "write a randomly initialised small wav2vec2 (for small models)"),
    "bundle": ("emo_core.train", "one checkpoint with its VAE and audio encoder inside"),
    "eval-synthetic": ("emo_core.evaluate", "lip-sync, identity, continuity and speed metrics on synthetic faces"),
}


def main(argv=None):
    import importlib

    from .face import NoFaceError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        return module.main(argv[1:]) if argv[0] in ("prepare", "eval-synthetic") else module.main(argv)
    parser = argparse.ArgumentParser(prog="python -m emo_core", epilog="other commands: " + "; ".join(
        f"{name}: {what}" for name, (_, what) in COMMANDS.items()))
    sub = parser.add_subparsers(dest="command", required=True)
    generate_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "generate":
        try:
            run_generate(args)
        except KeyboardInterrupt:
            print("\n[emo] interrupted", file=sys.stderr)
            sys.exit(130)  # the shell's code for Ctrl-C, so that `set -e` scripts stop
        except NoFaceError as e:
            sys.exit(f"error: {e} (--face-mask FILE, or --whole-image-fallback)")
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
