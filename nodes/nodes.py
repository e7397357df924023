"""The EMO nodes (V3 schema). Each one converts ComfyUI types, asks ComfyUI's memory manager for the model, and
calls emo_core. Heavy imports happen inside `execute`."""

from __future__ import annotations

import json
import os

import folder_paths
from comfy_api.latest import io, ui
from comfy_execution.graph_utils import ExecutionBlocker

from .types import EMO_AUDIO, EMO_FACE_IDENTITY, EMO_MODEL, EMO_REFERENCE, EMOAudio, EMOModel, EMOReference

CATEGORY = "EMO"
SCHEDULERS = ["ddim", "dpmpp", "unipc"]
PRECISIONS = ["auto", "fp16", "bf16", "fp32"]

# what goes in each face-model folder, and where it comes from
FACE_MODELS = {"face_detection": "YuNet's yunet_final.pth (kornia's face detector weights, from "
                                  "github.com/kornia/data)",
               "insightface": "Hallo's glintr100.onnx (huggingface.co/fudan-generative-vision/hallo, "
                              "face_analysis/models)"}


def model_file(folder: str, name: str) -> str:
    """The full path of a face-model file chosen in a node, or an error that says what to put where."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise FileNotFoundError(f"{name!r} not found in models/{folder} ({folder_paths.get_folder_paths(folder)}): "
                                f"put {FACE_MODELS[folder]} there")
    return path


class EMOLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EMOLoader", display_name="Load EMO", category=CATEGORY,
            description="Loads an EMO-family checkpoint from models/emo: this pack's .safetensors or Hallo's net.pth "
                        "(format detected). ComfyUI decides where it lives and when it is offloaded. The bundled demo "
                        "model (emo-demo.safetensors) carries its own VAE and audio encoder.",
            inputs=[
                io.Combo.Input("checkpoint", options=folder_paths.get_filename_list("emo"),
                               tooltip="A file in models/emo: an EMO checkpoint of this pack or Hallo's net.pth."),
                io.Combo.Input("precision", options=PRECISIONS, default="auto",
                               tooltip="Weight precision; auto picks what this device runs best."),
            ],
            outputs=[EMO_MODEL.Output(display_name="emo_model"),
                     io.Vae.Output(display_name="vae", tooltip="The VAE inside the checkpoint (the demo model has "
                                   "one); empty for checkpoints without one, e.g. Hallo: use Load VAE then.")],
        )

    @classmethod
    def fingerprint_inputs(cls, checkpoint, precision):
        """The file's size and time: a checkpoint trained again under the same name is loaded again, not taken
        from ComfyUI's cache."""
        path = folder_paths.get_full_path("emo", checkpoint)
        if path is None:
            return None  # execute says what is missing
        stat = os.stat(path)
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    @classmethod
    def execute(cls, checkpoint, precision) -> io.NodeOutput:
        from .runtime import load_emo_model

        path = folder_paths.get_full_path("emo", checkpoint)
        if path is None:
            raise FileNotFoundError(f"EMO checkpoint {checkpoint!r} not found in models/emo "
                                    f"({folder_paths.get_folder_paths('emo')}). Put this pack's checkpoint or "
                                    f"Hallo's net.pth (from the fudan-generative-vision/hallo release) there.")
        model, vae = load_emo_model(path, precision)
        if vae is None:  # a clear message where the empty output is used (core VAE Decode), not a NoneType error
            vae = ExecutionBlocker(f"{checkpoint} carries no VAE, so Load EMO's vae output is empty: connect Load "
                                   f"VAE (e.g. sd-vae-ft-mse for Hallo, in models/vae) to EMO ReferenceNet and to VAE "
                                   f"Decode instead")
        return io.NodeOutput(model, vae)


class EMOSampleInputs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EMOSampleInputs", display_name="EMO Sample Portrait + Speech", category=CATEGORY,
            description="The pack's own sample portrait and speech (made by emo_core.synthetic), so the example "
                        "workflow runs with nothing to download. Use Load Image and Load Audio for your own.",
            inputs=[io.Combo.Input("sample", options=["synthetic speaker"], default="synthetic speaker",
                                   tooltip="Which bundled sample (portrait + speech) to output.")],
            outputs=[io.Image.Output(display_name="portrait"), io.Audio.Output(display_name="speech")],
        )

    @classmethod
    def execute(cls, sample) -> io.NodeOutput:
        from .runtime import sample_inputs

        return io.NodeOutput(*sample_inputs())


class EMOEncodeAudio(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EMOEncodeAudio", display_name="EMO Encode Audio", category=CATEGORY,
            description="Speech or singing -> one wav2vec2 feature vector per video frame, computed the way the "
                        "loaded checkpoint expects (for Hallo-style models exactly Hallo's way).",
            inputs=[
                EMO_MODEL.Input("emo_model", tooltip="The model the features are for (layers, clip length)."),
                io.Audio.Input("audio", tooltip="Any sample rate, mono or stereo."),
                io.Float.Input("fps", default=25.0, min=1.0, max=120.0, step=0.01,
                               tooltip="Frame rate of the video to generate."),
                io.AudioEncoder.Input("audio_encoder", optional=True,
                                      tooltip="wav2vec2 from Load Audio Encoder (models/audio_encoders), e.g. "
                                      "wav2vec2-base-960h for Hallo; only its weights are used, not ComfyUI's "
                                      "encoding. Leave empty for checkpoints that carry their own (the demo)."),
            ],
            outputs=[EMO_AUDIO.Output(display_name="emo_audio"),
                     io.Audio.Output(display_name="audio", tooltip="The audio cut or padded to the video's length."),
                     io.Float.Output(display_name="fps", tooltip="The frame rate the features are for: connect it to "
                                     "the fps of EMO Video Combine (or EMO Decode + Save Video), so that picture "
                                     "and sound stay in sync.")],
        )

    @classmethod
    def execute(cls, emo_model: EMOModel, audio, fps, audio_encoder=None) -> io.NodeOutput:
        from .runtime import encode_audio

        return io.NodeOutput(*encode_audio(emo_model, audio_encoder, audio, fps), fps)


class EMOFaceMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EMOFaceMask", display_name="EMO Face Mask", category=CATEGORY,
            description="Finds the face (YuNet) and returns the face-locator mask: the expanded face box.",
            inputs=[
                io.Image.Input("image", tooltip="The portrait (or video frames)."),
                io.Combo.Input("detector", options=folder_paths.get_filename_list("face_detection"),
                               tooltip="YuNet weights (yunet_final.pth, from github.com/kornia/data) in "
                                       "models/face_detection."),
                io.Float.Input("expand", default=1.2, min=1.0, max=3.0, step=0.05,
                               tooltip="Scale of the face box about its centre."),
                io.Int.Input("face_index", default=0, min=0, max=31,
                             tooltip="Which face when there are several: 0 = the largest."),
                io.Boolean.Input("whole_image_if_no_face", default=False,
                                 tooltip="Without a face: use the whole image instead of stopping with an error."),
                io.Float.Input("confidence", default=0.6, min=0.05, max=0.99, step=0.05,
                               tooltip="Detection threshold: lower it (e.g. 0.3) for drawn or stylised faces."),
            ],
            outputs=[io.Mask.Output(display_name="face_mask")],
        )

    @classmethod
    def execute(cls, image, detector, expand, face_index, whole_image_if_no_face, confidence=0.6) -> io.NodeOutput:
        from .runtime import face_masks

        path = model_file("face_detection", detector)
        return io.NodeOutput(face_masks(path, image, expand, face_index, whole_image_if_no_face, confidence))


class EMOFaceIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EMOFaceIdentity", display_name="EMO Face Identity (ArcFace)", category=CATEGORY,
            description="The face-identity embedding Hallo-style checkpoints condition on, computed as Hallo does: "
                        "the face aligned to ArcFace's template and embedded by an InsightFace recognition model "
                        "(Hallo's glintr100.onnx). Runs on the CPU with onnxruntime (pip install onnxruntime onnx).",
            inputs=[
                io.Image.Input("image", tooltip="The portrait (the first image of a batch is used); the same picture "
                                                "as EMO ReferenceNet's, at any resolution."),
                io.Combo.Input("detector", options=folder_paths.get_filename_list("face_detection"),
                               tooltip="YuNet weights (yunet_final.pth, from github.com/kornia/data) in "
                                       "models/face_detection: the face's five landmarks for the alignment."),
                io.Combo.Input("recognition_model", options=folder_paths.get_filename_list("insightface"),
                               tooltip="An InsightFace recognition model (.onnx) in models/insightface: for Hallo, "
                                       "glintr100.onnx from its weights (huggingface.co/fudan-generative-vision/"
                                       "hallo, face_analysis/models)."),
                io.Int.Input("face_index", default=0, min=0, max=31,
                             tooltip="Which face when there are several: 0 = the largest (as Hallo)."),
                io.Boolean.Input("zeros_if_no_face", default=False,
                                 tooltip="Without a face: Hallo's fallback, a zero embedding (likeness then rests on "
                                         "ReferenceNet alone), instead of stopping with an error."),
                io.Float.Input("confidence", default=0.6, min=0.05, max=0.99, step=0.05,
                               tooltip="Detection threshold: lower it (e.g. 0.3) for drawn or stylised faces."),
            ],
            outputs=[EMO_FACE_IDENTITY.Output(display_name="face_identity")],
        )

    @classmethod
    def execute(cls, image, detector, recognition_model, face_index, zeros_if_no_face, confidence) -> io.NodeOutput:
        from .runtime import face_identity

        return io.NodeOutput(face_identity(model_file("face_detection", detector),
                                           model_file("insightface", recognition_model), image, face_index,
                                           zeros_if_no_face, confidence))


class EMOReferenceNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EMOReferenceNet", display_name="EMO ReferenceNet", category=CATEGORY,
            description="Encodes the portrait with the VAE for ReferenceNet: identity and appearance of the video.",
            inputs=[
                EMO_MODEL.Input("emo_model", tooltip="The EMO model."),
                io.Image.Input("image", tooltip="The portrait; width and height must be multiples of 8 (the "
                                                "first image of a batch is used)."),
                io.Vae.Input("vae", tooltip="The VAE the model was trained with: Load EMO's own for the demo "
                                            "model, Load VAE with sd-vae-ft-mse for Hallo."),
            ],
            outputs=[EMO_REFERENCE.Output(display_name="reference")],
        )

    @classmethod
    def execute(cls, emo_model: EMOModel, image, vae) -> io.NodeOutput:
        from .runtime import encode_reference

        return io.NodeOutput(encode_reference(emo_model, image, vae))


class EMOSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EMOSampler", display_name="EMO Audio-Driven Sampler", category=CATEGORY,
            description="Generates the video clip by clip from the portrait and the audio. Outputs the latents of "
                        "all frames (decode them with VAE Decode).",
            inputs=[
                EMO_MODEL.Input("emo_model", tooltip="The EMO model."),
                EMO_REFERENCE.Input("reference", tooltip="The portrait from EMO ReferenceNet."),
                EMO_AUDIO.Input("emo_audio", tooltip="The audio from EMO Encode Audio."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=True,
                             tooltip="Noise seed: the same seed gives the same video."),
                io.Int.Input("steps", default=40, min=1, max=200, tooltip="Denoising steps per clip."),
                io.Float.Input("cfg", default=3.5, min=1.0, max=20.0, step=0.1,
                               tooltip="Guidance scale; 1 disables classifier-free guidance (twice as fast)."),
                io.Combo.Input("scheduler", options=SCHEDULERS, default="ddim",
                               tooltip="ddim (the papers'), dpmpp (DPM-Solver++) or unipc."),
                io.Int.Input("frames_per_clip", default=0, min=0, max=32,
                             tooltip="Frames generated per clip; 0 = the model's own (EMO 12, Hallo 16)."),
                io.Int.Input("motion_frames", default=-1, min=-1, max=16,
                             tooltip="Frames of the previous clip carried into the next; -1 = the model's own."),
                io.Float.Input("speed", default=2.0, min=0.0, max=10.0, step=0.1,
                               tooltip="Head motion speed in degrees per frame (EMO models with speed layers)."),
                io.Mask.Input("face_mask", optional=True,
                              tooltip="Face region (EMO Face Mask): one mask, or one per frame. Empty: a centred "
                                      "box, for portraits framed around the face."),
                EMO_FACE_IDENTITY.Input("face_identity", optional=True,
                                        tooltip="Hallo-style checkpoints (required there): the portrait's face "
                                                "identity from EMO Face Identity; its landmarks also place "
                                                "Hallo's face and lip audio regions. EMO models do not use it."),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, emo_model: EMOModel, reference: EMOReference, emo_audio: EMOAudio, seed, steps, cfg, scheduler,
                frames_per_clip, motion_frames, speed, face_mask=None, face_identity=None) -> io.NodeOutput:
        from .runtime import sample

        latents = sample(emo_model, reference, emo_audio, face_mask, face_identity, seed=seed, steps=steps, cfg=cfg,
                         scheduler=scheduler, frames_per_clip=frames_per_clip or None,
                         motion_frames=None if motion_frames < 0 else motion_frames, speed=speed,
                         decoded_whole=not streamed_only(cls.hidden.prompt, cls.hidden.unique_id))
        return io.NodeOutput({"samples": latents})


def takers(prompt: dict, node_id: str) -> list[str]:
    """The ids of the nodes of an API prompt that take an output of node `node_id`."""
    return [taker for taker, node in prompt.items()
            if any(isinstance(value, list) and len(value) == 2 and str(value[0]) == str(node_id)
                   for value in node.get("inputs", {}).values())]


def streamed_only(prompt: dict | None, node_id: str | None) -> bool:
    """Whether the latents of this node only ever reach the mp4 a few frames at a time: every node that takes them
    is EMO Decode + Save Video, and its video goes nowhere or to core Save Video (which copies the file's streams;
    Get Video Components, say, would decode every frame again). Then the sampler need not check that the decoded
    video fits in memory. (A sampler output ComfyUI cached from such a run is not checked again when a VAE Decode
    is added later: that decode can run out of memory, but no sampling is lost.)"""
    if not prompt or node_id is None:
        return False
    streamers = takers(prompt, node_id)
    return bool(streamers) and all(
        prompt[streamer]["class_type"] == "EMODecodeSaveVideo"
        and all(prompt[taker]["class_type"] == "SaveVideo" for taker in takers(prompt, streamer))
        for streamer in streamers)


def save_path(filename_prefix: str, width: int, height: int) -> tuple[str, str, str]:
    """(full path, file name, subfolder) of the next mp4 with this prefix in ComfyUI's output folder."""
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        filename_prefix, folder_paths.get_output_directory(), width, height)
    file = f"{filename}_{counter:05}_.mp4"
    return os.path.join(folder, file), file, subfolder


def workflow_metadata(hidden) -> dict:
    """The prompt and the workflow (as ComfyUI stores them in its images), so the mp4 loads back as a graph."""
    metadata = {}
    if hidden.prompt is not None:
        metadata["prompt"] = json.dumps(hidden.prompt)
    for key, value in (hidden.extra_pnginfo or {}).items():
        metadata[key] = json.dumps(value)
    return metadata


def saved_video(path: str, file: str, subfolder: str) -> io.NodeOutput:
    from comfy_api.latest import InputImpl

    return io.NodeOutput(InputImpl.VideoFromFile(path),
                         ui=ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)]))


class EMOVideoCombine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EMOVideoCombine", display_name="EMO Video Combine", category=CATEGORY,
            description="Frames + audio -> an mp4 (H.264 + AAC) in the output folder, with the workflow inside.",
            inputs=[
                io.Image.Input("images", tooltip="The video frames (e.g. from VAE Decode)."),
                io.Float.Input("fps", default=25.0, min=1.0, max=120.0, step=0.01,
                               tooltip="Frame rate: for EMO frames, connect EMO Encode Audio's fps."),
                io.String.Input("filename_prefix", default="EMO/emo", tooltip="Output file name prefix."),
                io.Int.Input("crf", default=18, min=0, max=51, tooltip="H.264 quality: 0 lossless .. 51 worst."),
                io.Audio.Input("audio", optional=True, tooltip="The sound track (cut or padded to the video)."),
            ],
            outputs=[io.Video.Output(display_name="video")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, fps, filename_prefix, crf, audio=None) -> io.NodeOutput:
        from .runtime import write_video

        path, file, subfolder = save_path(filename_prefix, images.shape[2], images.shape[1])
        write_video(path, images, fps, audio, crf, workflow_metadata(cls.hidden))
        return saved_video(path, file, subfolder)


class EMODecodeSaveVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EMODecodeSaveVideo", display_name="EMO Decode + Save Video", category=CATEGORY,
            description="Latents + VAE + audio -> an mp4 (H.264 + AAC) in the output folder, decoded a few frames at "
                        "a time straight into the file: for videos of any length, where VAE Decode would hold every "
                        "frame in memory. No image nodes in between (use VAE Decode -> ... -> EMO Video Combine for "
                        "upscalers and face restorers).",
            inputs=[
                io.Latent.Input("latent", tooltip="The video's latents (from EMO Audio-Driven Sampler)."),
                io.Vae.Input("vae", tooltip="The VAE that decodes them (Load EMO's vae for the demo model)."),
                io.Float.Input("fps", default=25.0, min=1.0, max=120.0, step=0.01,
                               tooltip="Frame rate: connect EMO Encode Audio's fps."),
                io.String.Input("filename_prefix", default="EMO/emo", tooltip="Output file name prefix."),
                io.Int.Input("crf", default=18, min=0, max=51, tooltip="H.264 quality: 0 lossless .. 51 worst."),
                io.Int.Input("frames_per_batch", default=8, min=1, max=256,
                             tooltip="Frames decoded at once (at most; ComfyUI splits them further when memory is "
                                     "short): fewer holds less memory."),
                io.Audio.Input("audio", optional=True, tooltip="The sound track (cut or padded to the video)."),
            ],
            outputs=[io.Video.Output(display_name="video")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, latent, vae, fps, filename_prefix, crf, frames_per_batch, audio=None) -> io.NodeOutput:
        from .runtime import check_latents, decode_video

        samples = latent["samples"]
        check_latents(samples, vae)  # before a file or folder is made
        scale = vae.spacial_compression_decode() if hasattr(vae, "spacial_compression_decode") else 8
        scale = scale if isinstance(scale, int) else 8
        path, file, subfolder = save_path(filename_prefix, samples.shape[-1] * scale, samples.shape[-2] * scale)
        decode_video(path, samples, vae, fps, audio, crf, workflow_metadata(cls.hidden), frames_per_batch)
        return saved_video(path, file, subfolder)
