"""Synthetic talking faces: deterministic, the mouth follows the sound, the head turns at the requested speed."""

import json

import av
import numpy as np

from emo_core.synthetic import make_clip, write_clip


def mouth_darkness(frames: np.ndarray) -> np.ndarray:
    """How dark the mouth region is per frame (an open mouth shows its dark inside)."""
    h, w = frames.shape[1:3]
    region = frames[:, int(0.55 * h):int(0.72 * h), int(0.35 * w):int(0.65 * w)].astype(np.float32)
    return -region.mean(axis=(1, 2, 3))


def test_deterministic_and_the_mouth_follows_the_sound():
    a, wave_a, truth = make_clip(5, seconds=2.0, size=96, speed=1.0)
    b, wave_b, _ = make_clip(5, seconds=2.0, size=96, speed=1.0)
    assert np.array_equal(a, b) and np.array_equal(wave_a, wave_b)
    assert a.shape == (50, 96, 96, 3) and wave_a.shape == (32000,)
    corr = np.corrcoef(mouth_darkness(a), truth.mouth)[0, 1]
    assert corr > 0.8, corr
    other, _, _ = make_clip(6, seconds=2.0, size=96)
    assert not np.array_equal(a[0], other[0])  # another seed, another person


def test_head_speed_is_the_requested_one():
    for speed in (0.5, 2.0):
        _, _, truth = make_clip(1, seconds=2.0, size=64, speed=speed)
        angles = np.stack([truth.yaw, truth.pitch, truth.roll])
        measured = np.linalg.norm(np.diff(angles, axis=1), axis=0).mean()
        assert abs(measured - speed) < 1e-6


def test_written_as_an_ordinary_video(tmp_path):
    truth = write_clip(tmp_path / "clip.mp4", seed=2, seconds=1.0, size=64, speed=1.0)
    with av.open(str(tmp_path / "clip.mp4")) as c:
        assert sum(1 for _ in c.decode(c.streams.video[0])) == 25
        assert [s.codec_context.name for s in c.streams.audio] == ["aac"]
    saved = json.loads((tmp_path / "clip.json").read_text())
    assert saved["mouth"] == truth.mouth and saved["speed"] == 1.0


def test_parallel_writing_gives_the_same_files(tmp_path):
    import torch

    from emo_core.synthetic import main

    threads = torch.get_num_threads()
    args = ["--count", "3", "--seconds", "0.4", "--size", "64", "--speeds", "0", "2", "--seed", "40"]
    main([str(tmp_path / "one"), "--workers", "1", *args])
    main([str(tmp_path / "two"), "--workers", "2", *args])
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == 6  # mp4 + json each
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert json.loads((tmp_path / "two" / "synthetic_00041.json").read_text())["speed"] == 2.0
    assert torch.get_num_threads() == threads  # only the worker processes run on one thread


def test_the_turn_is_what_the_landmark_measurement_sees():
    """Data preparation measures the head speed from YuNet's five landmarks (face.head_pose): the rendered turn must
    be one that measurement reads, with about its true size, and a faster head must read faster."""
    import torch
    from .conftest import face_fixture_dir

    from emo_core.evaluate import head_speed
    from emo_core.face import YuNetDetector, head_pose
    from emo_core.synthetic import Identity, render

    detector = YuNetDetector(face_fixture_dir() / "yunet_final.pth", confidence=0.3)  # as the demo recipe prepares

    identity = Identity.sample(np.random.default_rng(7))
    angles = (-20.0, -10.0, 0.0, 10.0, 20.0)
    for axis in ("yaw", "roll"):
        measured = []
        for angle in angles:
            pose = {"yaw": 0.0, "pitch": 0.0, "roll": 0.0, axis: angle}
            image = torch.from_numpy(np.array(render(identity, 128, 0.1, blink=0.0, **pose)))
            face = detector.detect(image.permute(2, 0, 1)[None].float() / 255)[0][0]
            measured.append(float(head_pose(face.landmarks)[("yaw", "pitch", "roll").index(axis)]))
        steps = np.diff(measured)
        assert (steps > 0).all() or (steps < 0).all(), (axis, measured)  # monotonic (yaw's sign is a convention)
        assert 24 < abs(measured[-1] - measured[0]) < 70, (axis, measured)  # 40 degrees rendered: 0.6x-1.75x

    def speed(requested):
        frames = make_clip(7, seconds=1.2, size=128, speed=requested)[0]
        return head_speed(detector, torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255)

    slow, fast = speed(0.5), speed(3.0)
    assert fast > 3 * slow and fast > 1.2, (slow, fast)
