import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def hallo_fixture_dir() -> Path:
    return Path(os.environ.get("EMO_HALLO_FIXTURE", REPO.parent / "shared" / "fixtures" / "hallo_tiny"))


def face_fixture_dir() -> Path:
    return Path(os.environ.get("EMO_FACE_FIXTURE", REPO.parent / "shared" / "fixtures" / "face"))


@pytest.fixture(scope="session")
def hallo_fixture() -> Path:
    path = hallo_fixture_dir()
    if not (path / "net.safetensors").is_file():
        pytest.fail(f"Hallo parity fixture not found at {path}; set EMO_HALLO_FIXTURE")
    return path


@pytest.fixture(scope="session")
def detector():
    """YuNet with the real weights of the face fixture."""
    from emo_core.face import YuNetDetector

    return YuNetDetector(face_fixture_dir() / "yunet_final.pth")


@pytest.fixture(scope="session")
def photo() -> torch.Tensor:
    """The face fixture's real portrait photo, (1, 3, 512, 512) in [0, 1]."""
    from emo_core.cli import load_image

    return load_image(face_fixture_dir() / "astronaut.png")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
