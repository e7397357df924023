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


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
