import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from db.session import migrate  # noqa: E402


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'test.sqlite'}"
    migrate(url)
    return url


def write_image(path: Path, size: tuple[int, int] = (64, 48), value: int = 120) -> Path:
    """A small valid image; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), value, np.uint8)
    pixels[::7] = 30  # some structure, so that compressed files have real content
    PILImage.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic dataset in every layout, generated once per test session."""
    from engine.synth import write_dataset

    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, seed=3, n_train=24, n_test=8, n_val=16, n_messidor=4, size=128)
    return out
