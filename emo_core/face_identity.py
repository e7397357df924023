"""Face identity: the ArcFace embedding Hallo-style models condition on (Hallo's 512-d `face_emb`).

Hallo computes it with InsightFace's FaceAnalysis on the portrait: the largest face's 5 landmarks -> the face
aligned to ArcFace's 112x112 template by a similarity transform -> the recognition network (glintr100.onnx, in
Hallo's `pretrained_models/face_analysis/models/`) -> its raw, unnormalised 512-d output; zeros when there is no
face. Here the landmarks are YuNet's (the same five points; InsightFace uses SCRFD, so the embeddings agree
closely but not bit for bit) and the same ONNX file runs in onnxruntime on the CPU: one image, well under a
second, no GPU memory taken from the diffusion model.

onnxruntime and onnx are optional dependencies (only Hallo-style checkpoints need them); a clear error says how to
install them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from kornia.geometry.transform import warp_affine

from .face import Face, YuNetDetector, as_rgb, pick_face
from .sampler import EMOInputError

# InsightFace's ArcFace template (`arcface_dst`): where the 5 landmarks of an aligned 112x112 face lie, in YuNet's
# order (eye left, eye right, nose, mouth left, mouth right, as seen in the image).
ARCFACE_TEMPLATE = torch.tensor([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=torch.float64)


@dataclass
class FaceIdentity:
    embedding: torch.Tensor  # (D,) float32, the recognition network's raw output; zeros when no face was found
    face: Face | None  # the face it was computed from, in pixels of the image (None: no face)
    height: int  # size of that image
    width: int

    def face_at(self, height: int, width: int) -> Face | None:
        """The face in pixels of the same picture at another resolution (e.g. the resized reference image)."""
        if self.face is None or (height, width) == (self.height, self.width):
            return self.face
        sx, sy = width / self.width, height / self.height
        if abs(sx - sy) > 0.01 * max(sx, sy):
            raise EMOInputError(f"the face identity comes from a {self.width}x{self.height} image, the portrait is "
                                f"{width}x{height}: compute the identity on the same portrait (any size, same "
                                f"framing)")
        x0, y0, x1, y1 = self.face.box
        return Face((x0 * sx, y0 * sy, x1 * sx, y1 * sy), self.face.landmarks * torch.tensor([sx, sy]),
                    self.face.score)


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares rotation + uniform scale + translation taking points src (N, 2) to dst (N, 2) (Umeyama 1991,
    as InsightFace's alignment via scikit-image's SimilarityTransform). Returns the (2, 3) matrix."""
    src, dst = src.double(), dst.double()
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / src.shape[0]
    u, s, vh = torch.linalg.svd(cov)
    d = torch.ones(2, dtype=torch.float64)
    if torch.linalg.det(cov) < 0:
        d[-1] = -1
    rotation = u @ torch.diag(d) @ vh
    scale = (s * d).sum() / src_c.pow(2).sum(1).mean()
    return torch.cat([scale * rotation, (dst_mean - scale * rotation @ src_mean)[:, None]], dim=1)


def align_face(image: torch.Tensor, landmarks: torch.Tensor, size: int = 112) -> tuple:
    """The face of `image` (1, 3, H, W) in [0, 1] warped onto ArcFace's template at size x size (bilinear, black
    outside, as cv2.warpAffine in InsightFace's norm_crop). Returns (aligned (1, 3, size, size), matrix (2, 3))."""
    if size % 112:
        raise EMOInputError(f"ArcFace alignment needs an input size that is a multiple of 112, got {size}")
    matrix = similarity_transform(landmarks, ARCFACE_TEMPLATE * (size / 112))
    aligned = warp_affine(image.float(), matrix[None].float(), (size, size), mode="bilinear", padding_mode="zeros",
                          align_corners=True)
    return aligned, matrix


class ArcFace:
    """An InsightFace recognition model (.onnx, e.g. Hallo's glintr100.onnx or buffalo_l's w600k_r50.onnx) run by
    onnxruntime on the CPU. Pixels are normalised as InsightFace does: (x - 127.5) / 127.5 on RGB 0..255, unless
    the graph starts with its own Sub and Mul nodes (older exports), which then get 0..255 as they are."""

    def __init__(self, path: str | Path):
        try:
            import onnx
            import onnxruntime
        except ImportError as e:
            raise EMOInputError(f"face identity needs onnxruntime and onnx ({e.name} is missing): pip install "
                                f"onnxruntime onnx (or onnxruntime-gpu instead of onnxruntime) in ComfyUI's "
                                f"Python") from None
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"face recognition model not found: {path}")
        try:
            graph = onnx.load(str(path), load_external_data=False).graph
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnx and onnxruntime raise their own types for corrupt or foreign files
            raise EMOInputError(f"{path.name} is not a readable ONNX model: {str(e).splitlines()[0]}") from e
        first = [node.name for node in graph.node[:8]]
        builtin = (any(n.startswith(("Sub", "_minus")) for n in first)
                   and any(n.startswith(("Mul", "_mul")) for n in first))
        self.mean, self.std = (0.0, 1.0) if builtin else (127.5, 127.5)
        spec = self.session.get_inputs()[0]
        self.input_name = spec.name
        shape = spec.shape  # (N, 3, size, size); N may be symbolic
        if len(shape) != 4 or shape[1] != 3 or not isinstance(shape[2], int) or shape[2] != shape[3]:
            raise EMOInputError(f"{path.name} takes input of shape {shape}: a face recognition model takes "
                                f"(N, 3, 112, 112) RGB faces (e.g. glintr100.onnx from Hallo's face_analysis)")
        self.size = shape[2]
        self.name = path.name

    def __call__(self, aligned: torch.Tensor) -> torch.Tensor:
        """Aligned faces (N, 3, size, size) in [0, 1] -> embeddings (N, D) float32, unnormalised."""
        pixels = ((aligned.float() * 255 - self.mean) / self.std).cpu().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: pixels})[0]).float()


def face_identity(image: torch.Tensor, detector: YuNetDetector, arcface: ArcFace, face_index: int = 0,
                  zeros_if_no_face: bool = False, what: str = "the portrait") -> FaceIdentity:
    """Hallo's face identity of one image (1, C, H, W) in [0, 1]: the chosen face (0 = the largest) aligned and
    embedded. Without a face: an error, or with zeros_if_no_face Hallo's fallback (a zero embedding)."""
    image = as_rgb(image[:1].float())
    height, width = image.shape[-2:]
    faces = detector.detect(image)[0]
    if not faces and zeros_if_no_face:
        dim = arcface.session.get_outputs()[0].shape[-1]
        return FaceIdentity(torch.zeros(dim if isinstance(dim, int) else 512), None, height, width)
    return embed_face(image, pick_face(faces, face_index, what), arcface)


def embed_face(image: torch.Tensor, face: Face, arcface: ArcFace) -> FaceIdentity:
    """The identity of a face already found in `image` (1, 3, H, W) in [0, 1]."""
    aligned, _ = align_face(image[:1].float(), face.landmarks, arcface.size)
    return FaceIdentity(arcface(aligned)[0], face, image.shape[-2], image.shape[-1])
