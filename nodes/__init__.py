"""ComfyUI nodes of the EMO pack: thin adapters over `emo_core` (see ../shared/DESIGN.md section 3).

Importing this package only declares node schemas and model folders; torch-heavy modules (emo_core, diffusers,
transformers, kornia) are imported inside `execute`, so that loading the pack stays fast and touches no GPU.
"""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import ComfyExtension, io

from .nodes import (EMODecodeSaveVideo, EMOEncodeAudio, EMOFaceIdentity, EMOFaceMask, EMOLoader, EMOReferenceNet,
                    EMOSampleInputs, EMOSampler, EMOVideoCombine)

MODEL_FOLDERS = {
    "emo": "EMO-family checkpoints: our .safetensors and Hallo's net.pth",
    "face_detection": "YuNet face-detector weights (yunet_final.pth)",
    "insightface": "InsightFace models (.onnx); the face identity of Hallo-style checkpoints uses a recognition "
                   "model such as glintr100.onnx (the folder other face packs share: models/insightface)",
}
EXTENSIONS = {"emo": folder_paths.supported_pt_extensions, "face_detection": folder_paths.supported_pt_extensions,
              "insightface": {".onnx"}}


# The bundled demo model lives in the pack (emo_core/assets/emo-demo.safetensors): listed by Load EMO after the
# files of models/emo.
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "emo_core", "assets")


def register_model_folders() -> None:
    """models/emo, models/face_detection and models/insightface, added so that paths from extra_model_paths.yaml
    (and other packs' registrations) are kept; the pack's assets folder is one more place for `emo` (the demo
    model)."""
    for key in MODEL_FOLDERS:
        folder_paths.add_model_folder_path(key, os.path.join(folder_paths.models_dir, key))
        paths, extensions = folder_paths.folder_names_and_paths[key]
        folder_paths.folder_names_and_paths[key] = (paths, set(extensions) | set(EXTENSIONS[key]))
    folder_paths.add_model_folder_path("emo", ASSETS)


class EMOExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [EMOLoader, EMOSampleInputs, EMOEncodeAudio, EMOFaceMask, EMOFaceIdentity, EMOReferenceNet, EMOSampler,
                EMOVideoCombine, EMODecodeSaveVideo]


register_model_folders()
