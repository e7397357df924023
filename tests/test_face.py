"""Face detection (real YuNet weights, real photo), face-locator masks, head pose, crop and paste-back."""

import pytest
import torch
import torch.nn.functional as F
from kornia.geometry.transform import rotate

from emo_core.face import (NoFaceError, as_rgb, crop_image, face_crop, face_locator_masks, head_pose,
                           hallo_region_masks, paste_back, pick_face, portrait_face_mask, rotation_speed,
                           track_faces)
from emo_core.sampler import EMOInputError


def near(box, expected, tol):
    return all(abs(a - b) <= tol for a, b in zip(box, expected))


def test_detects_the_face_in_a_real_photo(detector, photo):
    faces = detector.detect(photo)[0]
    assert len(faces) == 1 and faces[0].score > 0.99
    assert near(faces[0].box, (180, 58, 271, 176), 6)  # the fixture README's box


def test_many_frames_are_detected_a_few_at_a_time(detector, photo):
    frames = torch.cat([photo, photo.flip(-1), photo * 0.2] * 3)  # 9 frames
    calls = []
    found = detector.detect(frames, batch=4, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(4, 9), (8, 9), (9, 9)]
    at_once = detector.detect(frames, batch=16)
    assert [[f.box for f in faces] for faces in found] == [[f.box for f in faces] for faces in at_once]
    assert [len(faces) for faces in found[:2]] == [1, 1]
    pixels = (frames * 255).round().to(torch.uint8)  # video frames stay uint8 until a batch is detected
    from_bytes = detector.detect(pixels, batch=4)
    assert [[f.box for f in faces] for faces in from_bytes] == [
        [f.box for f in faces] for faces in detector.detect(pixels.float() / 255, batch=4)]


@pytest.mark.parametrize("kind", ["grey", "rgba", "4k"])
def test_any_image_format_and_size(detector, photo, kind):
    if kind == "grey":
        image, scale, offset = photo.mean(1, keepdim=True), 1, (0, 0)
    elif kind == "rgba":
        image, scale, offset = torch.cat([photo, torch.ones_like(photo[:, :1])], 1), 1, (0, 0)
    else:  # the photo at 4x inside a 3840x2160 frame
        image, scale, offset = torch.zeros(1, 3, 2160, 3840), 4, (900, 100)
        image[..., 100:2148, 900:2948] = F.interpolate(photo, scale_factor=4, mode="bilinear")
    faces = detector.detect(image)[0]
    assert len(faces) == 1
    x, y = offset
    expected = (180 * scale + x, 58 * scale + y, 271 * scale + x, 176 * scale + y)
    assert near(faces[0].box, expected, 8 * scale)


def test_no_face_is_a_clear_error_or_the_documented_fallback(detector):
    grey = torch.full((1, 3, 256, 256), 0.5)
    with pytest.raises(NoFaceError, match="no face found"):
        portrait_face_mask(detector, grey)
    assert torch.equal(portrait_face_mask(detector, grey, fallback="whole_image"), torch.ones(1, 1, 256, 256))


def test_two_faces_largest_or_by_index(detector, photo):
    canvas = torch.full((1, 3, 512, 1024), 0.8)
    canvas[..., :, :512] = photo
    canvas[..., 100:356, 600:856] = F.interpolate(photo, size=(256, 256), mode="area")
    faces = detector.detect(canvas)[0]
    assert len(faces) == 2
    assert pick_face(faces).box[0] < 512 and pick_face(faces, 1).box[0] > 600
    for bad in (2, -1):
        with pytest.raises(EMOInputError, match="but 2 face"):
            pick_face(faces, bad)


def test_tracking_follows_one_person(detector, photo):
    """Two people of about the same size: the one picked first is followed even when the other grows larger."""
    def frame(left, right):
        canvas = torch.full((1, 3, 300, 640), 0.8)
        canvas[..., 20:20 + left, 10:10 + left] = F.interpolate(photo, size=(left, left), mode="area")
        canvas[..., 20:20 + right, 330:330 + right] = F.interpolate(photo, size=(right, right), mode="area")
        return canvas
    boxes, _, found = track_faces(detector, torch.cat([frame(270, 240), frame(250, 260), frame(240, 270)]))
    assert found.all() and all(box[0] < 320 for box in boxes)


def test_face_at_the_border(detector, photo):
    image = photo[..., :, 200:]  # the face is cut by the left border
    faces = detector.detect(image)[0]
    assert faces, "a face cut by the border is still found"
    crop = face_crop(faces[0].box, *image.shape[-2:], size=128)
    out = crop_image(image, crop)
    assert out.shape == (1, 3, 128, 128) and torch.isfinite(out).all()


def test_user_mask_wins(detector, photo):
    user = torch.zeros(512, 512)
    user[:10, :10] = 1
    assert torch.equal(portrait_face_mask(detector, photo, user_mask=user)[0, 0], user)
    with pytest.raises(EMOInputError, match="mask"):
        portrait_face_mask(detector, photo, user_mask=torch.zeros(100, 100))


def test_face_locator_mask_is_the_union_over_each_clip():
    boxes = [(10, 10, 20, 20), (30, 10, 40, 20), (50, 50, 60, 60)]
    masks = face_locator_masks(boxes, 64, 64, clip_length=2, expand=1.0)
    assert masks.shape == (3, 1, 64, 64)
    assert torch.equal(masks[0], masks[1]) and masks[0, 0, 15, 25] == 1  # between the two boxes of clip 1
    assert masks[2, 0, 15, 25] == 0 and masks[2, 0, 55, 55] == 1


def test_head_pose_and_speed(detector, photo):
    frontal = head_pose(detector.detect(photo)[0][0].landmarks)
    assert frontal.abs().max() < 8  # the astronaut looks at the camera
    tilted = head_pose(detector.detect(rotate(photo, torch.tensor([20.0])))[0][0].landmarks)
    assert 12 < abs(tilted[2]) < 30  # roll follows the in-plane rotation
    # a steady turn: the fitted slope is its speed, at the video's ends too
    poses = torch.stack([torch.arange(20.0) * 2, torch.arange(20.0) * -1, torch.zeros(20)], 1)
    assert torch.allclose(rotation_speed(poses), torch.full((20,), 5 ** 0.5), atol=1e-5)
    # label noise: landmarks jitter by a degree or so. Fitted slopes average it out; summing |frame-to-frame change|
    # (what a still head's jitter looks like to a naive estimate) would report ~1.6 deg/frame for a still head
    g = torch.Generator().manual_seed(0)
    jitter = torch.randn(100, 3, generator=g)
    assert float(rotation_speed(jitter).mean()) < 0.25
    assert float((jitter[1:] - jitter[:-1]).norm(dim=1).mean()) > 1.5
    turning = torch.stack([torch.arange(100.0) * 2, torch.zeros(100), torch.zeros(100)], 1) + jitter
    assert abs(float(rotation_speed(turning).mean()) - 2) < 0.1 and float(rotation_speed(turning).std()) < 0.2
    with pytest.raises(ValueError, match="odd number"):
        rotation_speed(poses, window=4)


def test_the_landmarks_of_a_small_face_are_read_again_larger(detector, photo):
    """A 32 px face rolling by 1 degree per frame: the landmarks track_faces reads again on its scaled-up crop give
    that roll speed; the detector's own landmarks at that size all but miss the turn."""
    small = F.interpolate(photo, scale_factor=0.35, mode="bilinear", antialias=True)
    frames = torch.cat([rotate(small, torch.tensor([1.0 * i])) for i in range(15)])
    boxes, refined, _ = track_faces(detector, frames)

    def centre(box):
        return torch.tensor([box[0] + box[2], box[1] + box[3]]) / 2

    # the detector's own landmarks of the tracked face (it also reports a few faint false faces at this size)
    whole = torch.stack([min(faces, key=lambda f: float((centre(f.box) - centre(box)).norm())).landmarks
                         for faces, box in zip(detector.detect(frames), boxes)])
    t = torch.arange(15.0) - 7

    def roll_slope(landmarks):
        roll = torch.stack([head_pose(lm) for lm in landmarks])[:, 2]
        return abs(float((t * (roll - roll.mean())).sum() / (t * t).sum()))

    assert 0.7 < roll_slope(refined) < 1.3 and roll_slope(whole) < 0.5  # measured 0.86 and 0.22
    assert (refined - whole).abs().max() < 4  # the same points, in the frame's pixels


def test_crop_and_paste_back_keep_the_original_outside_the_face(detector, photo):
    image = torch.cat([photo, photo.flip(-1)], dim=-1)[..., :400, :]  # 400x1024, not square
    face = pick_face(detector.detect(image)[0])
    crop = face_crop(face.box, *image.shape[-2:], size=256)
    frames = crop_image(image, crop).expand(3, -1, -1, -1)
    back = paste_back(frames, image, crop)
    assert back.shape == (3, 3, 400, 1024)
    x0 = int(crop.cx - crop.side / 2)
    assert torch.equal(back[..., :, x0 + int(crop.side) + 2:], image.expand(3, -1, -1, -1)[..., :, x0 + int(crop.side) + 2:])
    inside = back[..., int(face.box[1]):int(face.box[3]), int(face.box[0]):int(face.box[2])]
    original = image[..., int(face.box[1]):int(face.box[3]), int(face.box[0]):int(face.box[2])]
    assert (inside - original).abs().mean() < 0.02  # crop -> paste is close to the identity
    edited = paste_back(torch.zeros_like(frames), image, crop)  # a black face shows, feathered
    assert edited[..., int(crop.cy), int(crop.cx)].abs().max() < 1e-6


def test_as_rgb_rejects_other_layouts():
    with pytest.raises(EMOInputError):
        as_rgb(torch.zeros(1, 2, 8, 8))


def test_tiny_image(detector, photo):
    tiny = F.interpolate(photo, size=(24, 24), mode="area")
    faces = detector.detect(tiny)[0]  # too small to find a face reliably, but no crash
    mask = portrait_face_mask(detector, tiny, fallback="whole_image")
    assert mask.shape == (1, 1, 24, 24) and (len(faces) > 0 or bool(mask.all()))


def test_head_speed_of_a_turning_video(detector, photo):
    """'Videos' of the photo rolling by 0, 1, 2 and 4 degrees per frame: the measured speed follows."""
    measured = []
    for step in (0.0, 1.0, 2.0, 4.0):
        frames = torch.cat([rotate(photo, torch.tensor([step * i])) for i in range(12)])
        boxes, landmarks, found = track_faces(detector, frames)
        assert found.all() and len(boxes) == 12
        speed = rotation_speed(torch.stack([head_pose(p) for p in landmarks])).median().item()
        assert speed < 0.5 if step == 0 else step / 2 < speed < step * 2
        measured.append(speed)
    assert measured == sorted(measured)


def test_tracking_fills_frames_without_a_face(detector, photo):
    frames = torch.cat([photo, torch.full_like(photo, 0.5), photo])
    boxes, _, found = track_faces(detector, frames)
    assert found.tolist() == [True, False, True] and boxes[1] == boxes[0]
    with pytest.raises(NoFaceError, match="any of the 2 frames"):
        track_faces(detector, torch.full((2, 3, 128, 128), 0.5))
    with pytest.raises(EMOInputError, match="no frames") as empty:  # an empty video is not a video without a face
        track_faces(detector, torch.zeros(0, 3, 128, 128))
    assert not isinstance(empty.value, NoFaceError)


def test_hallo_region_masks(detector, photo):
    face = pick_face(detector.detect(photo)[0])
    masks = hallo_region_masks(face, 512, 512)
    assert [m.numel() for m in masks["lip"]] == [64 * 64, 32 * 32, 16 * 16, 8 * 8]  # the sampler's levels
    lip, face_map, full = (masks[k][0].reshape(64, 64) for k in ("lip", "face", "full"))
    at = lambda grid, point: float(grid[int(point[1] / 8), int(point[0] / 8)])  # noqa: E731 (64x64 latent grid)
    mouth, eye = (face.landmarks[3] + face.landmarks[4]) / 2, face.landmarks[0]
    assert at(lip, mouth) > 0.9 and at(lip, mouth) > at(lip, eye) and lip[5, 5] < 0.05  # lips: the mouth
    assert at(face_map, eye) > 0.2 > at(face_map, mouth)  # face: the face without the lips
    assert at(full, eye) < 0.1 and full[2, 60] > 0.9  # full: the background
    for kind in masks.values():
        assert all(float(m.min()) >= 0 and float(m.max()) <= 1 for m in kind)
