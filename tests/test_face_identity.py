"""Hallo's face identity: alignment to ArcFace's template (real YuNet, real photo) and the recognition model run
from an ONNX file with InsightFace's normalisation (tiny stand-in networks made here)."""

import pytest
import torch
import torch.nn.functional as F

from emo_core.face_identity import ARCFACE_TEMPLATE, ArcFace, align_face, face_identity, similarity_transform
from emo_core.sampler import EMOInputError

from .comfy_models import write_tiny_arcface
from .conftest import face_fixture_dir

FACE_DIR = face_fixture_dir()


def test_similarity_transform_recovers_a_known_one():
    angle, scale, shift = 0.3, 1.7, torch.tensor([5.0, -3.0], dtype=torch.float64)
    rot = torch.tensor([[torch.cos(torch.tensor(angle)), -torch.sin(torch.tensor(angle))],
                        [torch.sin(torch.tensor(angle)), torch.cos(torch.tensor(angle))]], dtype=torch.float64)
    dst = ARCFACE_TEMPLATE @ (scale * rot).T + shift
    matrix = similarity_transform(ARCFACE_TEMPLATE, dst)
    assert torch.allclose(matrix[:, :2], scale * rot, atol=1e-9) and torch.allclose(matrix[:, 2], shift, atol=1e-9)


def test_alignment_puts_the_face_on_arcfaces_template(detector, photo):
    face = detector.detect(photo)[0][0]
    aligned, _ = align_face(photo, face.landmarks)
    assert aligned.shape == (1, 3, 112, 112)
    again = detector.detect(F.interpolate(aligned, scale_factor=4, mode="bilinear"))[0]
    assert len(again) == 1  # still a face, upright and centred ...
    assert (again[0].landmarks / 4 - ARCFACE_TEMPLATE.float()).norm(dim=1).max() < 6  # ... on the template


@pytest.mark.parametrize("builtin", [False, True])
def test_embedding_is_the_networks_output_on_the_aligned_face(tmp_path, detector, photo, builtin):
    """InsightFace's normalisation: (x - 127.5) / 127.5 on RGB 0..255, or raw 0..255 when the graph starts with
    its own Sub and Mul nodes. Both stand-ins compute the same function, so both give the same embedding."""
    weight = write_tiny_arcface(tmp_path / "arcface.onnx", builtin_normalisation=builtin)
    arcface = ArcFace(tmp_path / "arcface.onnx")
    assert (arcface.mean, arcface.std) == ((0.0, 1.0) if builtin else (127.5, 127.5))
    identity = face_identity(photo, detector, arcface)
    aligned, _ = align_face(photo, identity.face.landmarks)
    expected = F.avg_pool2d(aligned * 2 - 1, 8).flatten(1) @ weight
    assert identity.embedding.shape == (512,)
    assert torch.allclose(identity.embedding, expected[0], atol=1e-4)
    assert (identity.height, identity.width) == (512, 512)


def test_another_face_gives_another_embedding(tmp_path, detector, photo):
    write_tiny_arcface(tmp_path / "arcface.onnx")
    arcface = ArcFace(tmp_path / "arcface.onnx")
    a = face_identity(photo, detector, arcface).embedding
    b = face_identity(photo.flip(-1), detector, arcface).embedding  # the mirrored person
    c = face_identity(F.interpolate(photo, size=(384, 384), mode="bilinear", antialias=True), detector,
                      arcface).embedding  # the same person at another size
    assert F.cosine_similarity(a, c, dim=0) > F.cosine_similarity(a, b, dim=0) + 0.2


def test_no_face_is_an_error_or_hallos_zero_embedding(tmp_path, detector):
    write_tiny_arcface(tmp_path / "arcface.onnx")
    arcface = ArcFace(tmp_path / "arcface.onnx")
    grey = torch.full((1, 3, 256, 256), 0.5)
    with pytest.raises(EMOInputError, match="no face found"):
        face_identity(grey, detector, arcface)
    identity = face_identity(grey, detector, arcface, zeros_if_no_face=True)
    assert identity.face is None and identity.embedding.shape == (512,) and not identity.embedding.any()


def test_face_follows_the_portrait_to_another_resolution(tmp_path, detector, photo):
    write_tiny_arcface(tmp_path / "arcface.onnx")
    identity = face_identity(photo, detector, ArcFace(tmp_path / "arcface.onnx"))
    half = identity.face_at(256, 256)
    assert torch.allclose(half.landmarks, identity.face.landmarks / 2)
    assert half.box == tuple(v / 2 for v in identity.face.box)
    with pytest.raises(EMOInputError, match="same portrait"):
        identity.face_at(256, 512)


def test_files_that_are_not_recognition_models_are_clear_errors(tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(EMOInputError, match="not a readable ONNX model"):
        ArcFace(tmp_path / "broken.onnx")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        ArcFace(tmp_path / "missing.onnx")


def test_main_command_runs_a_hallo_checkpoint_with_its_face_identity(tmp_path, hallo_fixture):
    """`generate` on a Hallo-style checkpoint: without a recognition model it says what to pass; with one the face
    identity of the animated square conditions the video."""
    import subprocess
    import sys

    import av

    from .comfy_models import make_tiny_hallo
    from .conftest import REPO

    checkpoint = make_tiny_hallo(tmp_path / "tiny-hallo.safetensors")
    write_tiny_arcface(tmp_path / "arcface.onnx")
    out = tmp_path / "hallo.mp4"
    args = [sys.executable, "-m", "emo_core", "generate", "--checkpoint", str(checkpoint), "--vae",
            str(hallo_fixture / "vae.safetensors"), "--image", str(FACE_DIR / "astronaut.png"), "--face-detector",
            str(FACE_DIR / "yunet_final.pth"), "--size", "64", "--steps", "1", "--out", str(out)]
    run = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "--face-recognition" in run.stderr and not out.exists()
    run = subprocess.run(args + ["--face-recognition", str(tmp_path / "arcface.onnx")], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 100  # the 4 s sample speech at 25 fps
