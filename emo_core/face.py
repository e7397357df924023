"""Faces: detection (kornia's YuNet, local weights), face-locator masks, head pose and its speed, and the
face-centred crop that lets any portrait size in (with the generated face pasted back, feathered).

Images are (N, 3, H, W) float in [0, 1] unless said otherwise; boxes are (x0, y0, x1, y1) in pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.contrib import FaceDetector
from kornia.contrib.face_detection import YuNet, nms_kornia
from kornia.geometry.transform import warp_affine
from torch import nn

from .sampler import EMOInputError, level_sizes

DETECT_SIZE = 640  # detection runs on the image scaled so that its longer side is at most this ...
MIN_DETECT_SIZE = 64  # ... and its shorter side at least this
LANDMARK_FACE_SIZE = 192  # track_faces reads the landmarks again on a crop where the face is this wide ...
LANDMARK_CROP_MAX = 1024  # ... unless that crop would be larger than this
SPEED_WINDOW = 15  # frames over which rotation_speed fits each angle's slope
# how the head speed is measured, recorded with prepared data (a changed method prepares the videos again)
HEAD_SPEED_METHOD = (f"YuNet landmarks at {LANDMARK_FACE_SIZE} px faces, polar pose fit, slope over {SPEED_WINDOW} "
                     f"frames")


class NoFaceError(EMOInputError):
    pass


@dataclass
class Face:
    box: tuple  # (x0, y0, x1, y1) pixels in the image given to the detector
    landmarks: torch.Tensor  # (5, 2): eye left, eye right, nose, mouth left, mouth right (image left/right)
    score: float

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


class YuNetDetector(FaceDetector):
    """kornia's FaceDetector with YuNet weights from a local file (its own constructor would download them).
    Only construction differs; preprocessing, decoding and NMS are kornia's."""

    def __init__(self, weights, confidence: float = 0.6, nms: float = 0.3):
        nn.Module.__init__(self)
        from .checkpoint import read_state_dict

        self.top_k, self.keep_top_k = 5000, 750
        self.confidence_threshold, self.nms_threshold = confidence, nms
        self.min_sizes = [[10, 16, 24], [32, 48], [64, 96], [128, 192, 256]]
        self.steps, self.variance, self.clip = [8, 16, 32, 64], [0.1, 0.2], False
        self.config = {"name": "YuNet", "min_sizes": self.min_sizes, "steps": self.steps,
                       "variance": self.variance, "clip": self.clip}
        self.nms = nms_kornia
        self.model = YuNet("test", pretrained=False)
        state_dict, _ = read_state_dict(weights)
        try:
            self.model.load_state_dict(state_dict)
        except RuntimeError as e:
            raise EMOInputError(f"{weights} is not a YuNet face-detector state dict (yunet_final.pth): "
                                f"{str(e).splitlines()[0]}") from e
        self.model.eval()

    @torch.no_grad()
    def detect(self, images: torch.Tensor, batch: int = 16, progress=None) -> list:
        """images: (N, C, H, W) in [0, 1], or uint8 (C = 1, 3 or 4) -> per image a list of Face, largest first. The
        images go through the detector `batch` at a time (memory stays flat for long videos); `progress(done,
        total)` is called after each batch and may raise to interrupt."""
        if images.ndim != 4:
            as_rgb(images)  # the error message for a wrong shape
        height, width = images.shape[-2:]
        scale = min(1.0, DETECT_SIZE / max(height, width))
        scale = max(scale, MIN_DETECT_SIZE / min(height, width))  # YuNet needs a few pooling levels' worth
        param = next(self.model.parameters())
        out = []
        for start in range(0, images.shape[0], batch):
            chunk = as_rgb(unit_float(images[start:start + batch]))
            small = chunk if scale == 1.0 else F.interpolate(chunk, scale_factor=scale, mode="bilinear",
                                                             antialias=scale < 1)
            for rows in self(small.to(param) * 255):  # RGB in [0, 255], as kornia's detector expects
                faces = [Face(tuple((r[:4] / scale).tolist()), r[4:14].reshape(5, 2).cpu() / scale, float(r[14]))
                         for r in rows.float()]
                out.append(sorted(faces, key=lambda f: f.area, reverse=True))
            if progress is not None:
                progress(len(out), images.shape[0])
        return out


def unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1]; float images unchanged. Video frames stay uint8 (a quarter of the memory)
    until a few at a time are needed as floats."""
    return images.float() / 255 if images.dtype == torch.uint8 else images


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) with C = 1 (grey), 3 (RGB) or 4 (RGBA, composited on black) -> (N, 3, H, W)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        raise EMOInputError(f"images must be (N, C, H, W) with 1, 3 or 4 channels, got {tuple(images.shape)}")
    if images.shape[1] == 4:
        images = images[:, :3] * images[:, 3:]
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def pick_face(faces: list, index: int = 0, what: str = "the image") -> Face:
    """The face to animate: the largest (index 0) or the index-th largest."""
    if not faces:
        raise NoFaceError(f"no face found in {what}: use a portrait with a clearly visible face, give a face mask "
                          f"yourself, or allow the whole-image fallback")
    if not 0 <= index < len(faces):
        raise EMOInputError(f"face index {index} asked for, but {len(faces)} face(s) were found in {what} "
                            f"(0 = the largest)")
    return faces[index]


def expand_box(box: tuple, ratio: float, height: int, width: int) -> tuple:
    """Scale a box about its centre by `ratio` and clip it to the image."""
    x0, y0, x1, y1 = box
    cx, cy, half_w, half_h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * ratio / 2, (y1 - y0) * ratio / 2
    return (max(0.0, cx - half_w), max(0.0, cy - half_h), min(float(width), cx + half_w),
            min(float(height), cy + half_h))


def union_box(boxes: list) -> tuple:
    xs0, ys0, xs1, ys1 = zip(*boxes)
    return (min(xs0), min(ys0), max(xs1), max(ys1))


def box_mask(box: tuple, height: int, width: int) -> torch.Tensor:
    """(1, 1, H, W) mask: 1 inside the box."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask = torch.zeros(1, 1, height, width)
    mask[..., max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = 1
    return mask


def face_locator_masks(boxes: list, height: int, width: int, clip_length: int, expand: float = 1.2) -> torch.Tensor:
    """The paper's face-locator mask: per clip, the union of the (expanded) face boxes of its frames.
    boxes: one box per frame. Returns (frames, 1, H, W)."""
    if not boxes or clip_length < 1:
        raise EMOInputError(f"need one face box per frame and a clip length >= 1, got {len(boxes)} boxes and "
                            f"clip length {clip_length}")
    masks = []
    for start in range(0, len(boxes), clip_length):
        clip = union_box([expand_box(b, expand, height, width) for b in boxes[start:start + clip_length]])
        masks += [box_mask(clip, height, width)] * len(boxes[start:start + clip_length])
    return torch.cat(masks)


def centred_face_mask(height: int, width: int) -> torch.Tensor:
    """(1, 1, H, W) face-locator mask for a portrait framed around the face (as face-centred crops are): the
    middle 2/3 of the width and 3/4 of the height. Used when neither a mask nor a detector is given."""
    mask = torch.zeros(1, 1, height, width)
    mask[..., height // 8: height * 7 // 8, width // 6: width * 5 // 6] = 1
    return mask


def portrait_face_mask(detector: YuNetDetector | None, image: torch.Tensor, expand: float = 1.2,
                       face_index: int = 0, fallback: str = "error", user_mask: torch.Tensor | None = None):
    """Face-locator mask (1, 1, H, W) for one portrait (1, C, H, W). A user-supplied mask (H, W) or (1, 1, H, W)
    always wins. No face: an error, or with fallback="whole_image" a mask of the whole image."""
    height, width = image.shape[-2:]
    if user_mask is not None:
        if user_mask.numel() != height * width:
            raise EMOInputError(f"face mask has shape {tuple(user_mask.shape)}, the image is {height}x{width}: give "
                                f"one mask of the image's size")
        return (user_mask.reshape(1, 1, height, width).float() > 0.5).float()
    if detector is None:
        raise EMOInputError("no face mask given and no face detector loaded: give one of them")
    if fallback not in ("error", "whole_image"):
        raise EMOInputError(f"fallback must be 'error' or 'whole_image', got {fallback!r}")
    return face_box_mask(detector.detect(image)[0], height, width, expand, face_index, fallback == "whole_image")


def face_box_mask(faces: list, height: int, width: int, expand: float = 1.2, face_index: int = 0,
                  whole_image_if_none: bool = False, what: str = "the portrait") -> torch.Tensor:
    """(1, 1, H, W) mask of the chosen face's expanded box; without a face the whole image, or an error."""
    if not faces and whole_image_if_none:
        return torch.ones(1, 1, height, width)
    face = pick_face(faces, face_index, what)
    return box_mask(expand_box(face.box, expand, height, width), height, width)


def _batches(frames, batch: int):
    """A (S, C, H, W) tensor `batch` frames at a time, or the batches of a re-iterable source such as VideoFrames
    (a long video decoded again on each pass rather than held whole)."""
    return frames.split(batch) if isinstance(frames, torch.Tensor) else iter(frames)


def track_faces(detector: YuNetDetector, frames, face_index: int = 0, batch: int = 16):
    """Per video frame: the chosen face's box and landmarks. `frames`: (S, C, H, W), float in [0, 1] or uint8, or
    a re-iterable of such batches (VideoFrames with channels_first; it is read twice). The face is chosen by size
    rank in the first frame that has one, then followed by overlap (so two people never swap). Frames where it is
    not found take the nearest earlier (else later) detection. The landmarks are then read again at a steady face
    size (refine_landmarks). Returns (boxes [S x (x0, y0, x1, y1)], landmarks (S, 5, 2), found (S,) bool)."""
    picked, previous = [], None
    for chunk in _batches(frames, batch):
        for faces in detector.detect(chunk, batch):
            if previous is None:
                face = faces[face_index] if len(faces) > face_index else None
            else:
                face = _overlapping(faces, previous.box, 0.1)
            picked.append(face)
            previous = face or previous
    if not picked:
        raise EMOInputError("there are no frames to find a face in")
    found = torch.tensor([f is not None for f in picked])
    if not found.any():
        raise NoFaceError(f"no face found in any of the {len(picked)} frames")
    known = [i for i, f in enumerate(picked) if f is not None]
    filled = [picked[i] if picked[i] is not None else picked[max([k for k in known if k < i], default=known[0])]
              for i in range(len(picked))]
    landmarks = refine_landmarks(detector, frames, filled, batch)
    return [f.box for f in filled], landmarks, found


def refine_landmarks(detector: YuNetDetector, frames, faces: list, batch: int = 16) -> torch.Tensor:
    """(S, 5, 2) landmarks of the given per-frame faces of one video (frames as for track_faces), read again on
    one crop around all of them, scaled so that the face is LANDMARK_FACE_SIZE pixels wide. YuNet's landmarks are
    far steadier on faces of ~200 px than on small ones, and one crop and scale for the whole video keeps their
    small biases the same from frame to frame (a crop per frame, following the jittering box, adds jitter). On the
    demo's synthetic heads (53 px faces in 128 px videos) the per-video head speed measured from these landmarks
    correlates 0.91 with the true speed (pose fit and slopes as below), against about 0.8 from the whole-frame
    landmarks. A frame where the crop shows no face overlapping the expected one keeps its whole-frame landmarks."""
    x0, y0, x1, y1 = union_box([f.box for f in faces])
    face_side = float(torch.tensor([max(f.box[2] - f.box[0], f.box[3] - f.box[1]) for f in faces]).median())
    side = 1.5 * max(x1 - x0, y1 - y0)
    # a head that wanders over a large frame would make a huge crop: then the face is read smaller
    size = int(min(side * LANDMARK_FACE_SIZE / max(face_side, 1.0), LANDMARK_CROP_MAX))
    refined, seen = [], 0
    for chunk in _batches(frames, batch):
        crop = Crop((x0 + x1) / 2, (y0 + y1) / 2, side, size, *chunk.shape[-2:])
        detected = detector.detect(crop_image(unit_float(chunk), crop), batch)
        for face, found in zip(faces[seen:seen + len(chunk)], detected):
            best = _overlapping(found, crop.map_face(face).box, 0.3)
            refined.append(face.landmarks if best is None else crop.unmap_face(best).landmarks)
        seen += len(chunk)
    if seen != len(faces):
        raise EMOInputError(f"{len(faces)} faces for {seen} frames: the frames changed between two readings")
    return torch.stack(refined)


def hallo_region_masks(face: Face, height: int, width: int, levels: int = 4, face_expand: float = 1.2,
                       lip_expand: float = 2.0) -> dict:
    """Hallo's full / face / lip attention weights for its audio modules, per UNet level, from a YuNet face.

    As Hallo's preprocessing: the face box (x1.2) and the lip box (x2.0) as masks at 64x64, Gaussian-blurred
    (kernels 51 and 31) and min-max normalised; full = 1 - blurred face (the background), face = blurred face -
    lip, lip = blurred lip; each resized to every level's latent grid (h/8, w/8 halved per level). Hallo takes
    the boxes from mediapipe's silhouette and lip landmarks; here the face box is YuNet's and the lip box is built
    from the two mouth corners (height half the mouth width), so the regions are close but not identical.
    Returns {"full"|"face"|"lip": [per level (h_l * w_l,)]}, ready for GenerationInputs.region_masks."""
    from kornia.filters import gaussian_blur2d

    def blurred(box, kernel):
        grid = F.interpolate(box_mask(box, height, width), size=(64, 64), mode="area")
        sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8  # OpenCV's default sigma for this kernel size
        grid = gaussian_blur2d(grid, (kernel, kernel), (sigma, sigma), border_type="reflect")
        return (grid - grid.min()) / (grid.max() - grid.min()).clamp_min(1e-6)

    (mlx, mly), (mrx, mry) = face.landmarks[3].tolist(), face.landmarks[4].tolist()
    half = 0.25 * math.hypot(mrx - mlx, mry - mly)
    lip_box = (min(mlx, mrx), min(mly, mry) - half, max(mlx, mrx), max(mly, mry) + half)
    face_map = blurred(expand_box(face.box, face_expand, height, width), 51)
    lip_map = blurred(expand_box(lip_box, lip_expand, height, width), 31)
    maps = {"full": 1 - face_map, "face": (face_map - lip_map).clamp_min(0), "lip": lip_map}
    sizes = level_sizes((math.ceil(height / 8), math.ceil(width / 8)), levels)
    return {k: [F.interpolate(m, size=size, mode="bilinear", antialias=True).clamp(0, 1).flatten() for size in sizes]
            for k, m in maps.items()}


def _overlapping(faces: list, box: tuple, min_iou: float) -> Face | None:
    """The face overlapping `box` most, if by more than `min_iou`; else None."""
    best = max(faces, key=lambda f: _iou(f.box, box), default=None)
    return best if best is not None and _iou(best.box, box) > min_iou else None


def _iou(a: tuple, b: tuple) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ---- head pose -------------------------------------------------------------------------------------------------

# A mean face's 5 landmarks in millimetres, in right-handed camera axes (x right, y down, z away from the
# camera; nose tip at the origin), in YuNet's order: eye left, eye right, nose, mouth left, mouth right (left /
# right as seen in the image). The proportions are those of YuNet's landmarks on a frontal photo (eye line 36 mm
# above the nose tip, mouth corners 22 mm below it), so a frontal face reads close to (0, 0, 0).
FACE_MODEL_3D = torch.tensor([[-32.0, -36.0, 30.0], [32.0, -36.0, 30.0], [0.0, 0.0, 0.0],
                              [-28.0, 22.0, 22.0], [28.0, 22.0, 22.0]])


def head_pose(landmarks: torch.Tensor) -> torch.Tensor:
    """(5, 2) landmarks -> (yaw, pitch, roll) in degrees, by fitting a weak-perspective projection of the mean 3-D
    face: a least-squares affine fit, then the nearest matrix with orthonormal rows (polar decomposition, which
    turns with the image: an in-plane rotation changes the roll only). Frontal is about (0, 0, 0); good to a few
    degrees."""
    p = landmarks.double() - landmarks.double().mean(0)
    m = FACE_MODEL_3D.double() - FACE_MODEL_3D.double().mean(0)
    a = torch.linalg.lstsq(m, p).solution.T  # (2, 3): p ≈ m @ a.T
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    rows = u @ vh  # (2, 3) orthonormal rows
    rot = torch.cat([rows, torch.linalg.cross(rows[0], rows[1])[None]])
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, float(-rot[2, 0])))))
    pitch = math.degrees(math.atan2(float(rot[2, 1]), float(rot[2, 2])))
    roll = math.degrees(math.atan2(float(rot[1, 0]), float(rot[0, 0])))
    return torch.tensor([yaw, pitch, roll])


def rotation_speed(poses: torch.Tensor, window: int = SPEED_WINDOW) -> torch.Tensor:
    """(S, 3) yaw/pitch/roll per frame -> (S,) head rotation speed in degrees per frame, the quantity the speed
    layers are conditioned on: the norm of the three angles' slopes, each the least-squares line through the
    `window` frames centred on the frame (0.6 s at 25 fps; fewer at the video's ends). Per-frame poses from 5
    landmarks jitter by a few degrees; a fitted slope averages that jitter out instead of adding it up (the mean
    of |pose[i+1] - pose[i]| grows with the jitter: a still head would seem to move)."""
    if window < 3 or window % 2 == 0:
        raise ValueError(f"window must be an odd number of frames, at least 3, got {window}")
    count, half = poses.shape[0], window // 2
    if count < 2:
        return torch.zeros(count)
    poses = poses.double()
    speed = torch.empty(count, dtype=torch.float64)
    for i in range(count):
        segment = poses[max(0, i - half): i + half + 1]
        t = torch.arange(segment.shape[0], dtype=torch.float64)
        t = t - t.mean()
        slope = (t[:, None] * (segment - segment.mean(0))).sum(0) / (t * t).sum()  # (3,) degrees per frame
        speed[i] = slope.norm()
    return speed.float()


# ---- any portrait size: face-centred crop and paste-back ------------------------------------------------------

@dataclass
class Crop:
    """A square crop of side `side` centred at (cx, cy) of an image of size (height, width), resized to `size`."""

    cx: float
    cy: float
    side: float
    size: int
    height: int
    width: int

    def matrix(self) -> torch.Tensor:
        """(1, 2, 3) affine from image pixels to crop pixels."""
        s = self.size / self.side
        return torch.tensor([[[s, 0.0, -s * (self.cx - self.side / 2)], [0.0, s, -s * (self.cy - self.side / 2)]]])

    def map_face(self, face: Face) -> Face:
        """The same face in crop pixels."""
        s = self.size / self.side
        offset = torch.tensor([self.cx - self.side / 2, self.cy - self.side / 2])
        corners = (torch.tensor(face.box).reshape(2, 2) - offset) * s
        return Face(tuple(corners.flatten().tolist()), (face.landmarks - offset) * s, face.score)

    def unmap_face(self, face: Face) -> Face:
        """A face found in crop pixels, in image pixels."""
        s = self.size / self.side
        offset = torch.tensor([self.cx - self.side / 2, self.cy - self.side / 2])
        corners = torch.tensor(face.box).reshape(2, 2) / s + offset
        return Face(tuple(corners.flatten().tolist()), face.landmarks / s + offset, face.score)


def face_crop(box: tuple, height: int, width: int, size: int, scale: float = 2.2) -> Crop:
    """A square crop around a face box: `scale` times the face's larger side (head, hair and shoulders), moved to
    stay inside the image where it fits, centred a little below the face centre."""
    x0, y0, x1, y1 = box
    side = min(max(x1 - x0, y1 - y0) * scale, float(max(height, width)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + 0.1 * (y1 - y0)
    if side <= width:
        cx = min(max(cx, side / 2), width - side / 2)
    if side <= height:
        cy = min(max(cy, side / 2), height - side / 2)
    return Crop(cx, cy, side, size, height, width)


def crop_image(images: torch.Tensor, crop: Crop) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, size, size); outside the image the border pixels are repeated. A crop that shrinks
    the image by more than 1.5x first resizes the whole image with antialiasing, so fine detail does not alias."""
    shrink = crop.side / crop.size
    if shrink > 1.5:
        small = F.interpolate(images, scale_factor=1 / shrink, mode="bilinear", antialias=True)
        scale_y, scale_x = small.shape[-2] / images.shape[-2], small.shape[-1] / images.shape[-1]
        crop = Crop(crop.cx * scale_x, crop.cy * scale_y, crop.side * scale_x, crop.size, *small.shape[-2:])
        images = small
    m = crop.matrix().to(images).expand(images.shape[0], -1, -1)
    return warp_affine(images, m, (crop.size, crop.size), mode="bilinear", padding_mode="border", align_corners=False)


def paste_back(frames: torch.Tensor, original: torch.Tensor, crop: Crop, feather: float = 0.08) -> torch.Tensor:
    """Generated crops (N, 3, size, size) back into the original image (1 or N, 3, H, W), blended through a mask
    whose edges fall off smoothly over `feather` of the crop side. Returns (N, 3, H, W)."""
    n = frames.shape[0]
    inverse = torch.linalg.inv(torch.cat([crop.matrix()[0], torch.tensor([[0.0, 0.0, 1.0]])]))[:2][None]
    inverse = inverse.to(frames).expand(n, -1, -1)
    size = (crop.height, crop.width)
    warped = warp_affine(frames, inverse, size, mode="bilinear", padding_mode="zeros", align_corners=False)
    ramp = torch.linspace(0, 1, crop.size, device=frames.device, dtype=frames.dtype)
    edge = torch.minimum(ramp, ramp.flip(0)) / max(feather / 2, 1e-6)  # 0 at the crop border, >=1 inside
    weight = edge.clamp(0, 1)
    weight = (weight[None, :] * weight[:, None])[None, None].expand(n, 1, -1, -1)
    alpha = warp_affine(weight, inverse, size, mode="bilinear", padding_mode="zeros", align_corners=False)
    return alpha * warped + (1 - alpha) * original.to(frames).expand(n, -1, -1, -1)
