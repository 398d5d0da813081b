"""Evidence for one image's grade (engine/model/saliency.py): Grad-CAM heat maps and their cache, and
the probabilities of the flip views (engine/model/predictor.py)."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import tiny_checkpoint
from torch import nn

from engine.data.datasets import Sample
from engine.data.images import ImageError
from engine.data.synth import Lesions, draw_fundus, plan_scene, render, sample_lesions
from engine.model import saliency
from engine.model.networks import members_of
from engine.model.predictor import predict
from engine.model.saliency import Explainer, head_layer, heat_map, layer_gradcam

SIZE = 96


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A synthetic grade-3 fundus photograph."""
    rng = np.random.default_rng(0)
    path = tmp_path / "eye.png"
    cv2.imwrite(str(path), draw_fundus(sample_lesions(3, rng), rng, 160)[..., ::-1])
    return path


@pytest.fixture
def explainer(tmp_path: Path) -> Explainer:
    return Explainer(tiny_checkpoint(tmp_path / "tiny.pth", SIZE, temperature=2.0), tmp_path / "cache")


def cached(explainer: Explainer) -> list[Path]:
    return sorted(explainer.folder.glob("*.npy"))


def test_the_heat_map_covers_the_image_the_model_saw_and_depends_on_the_grade(explainer, photo):
    maps = [explainer.saliency(photo, grade) for grade in range(4)]
    for shown in maps:
        assert shown.pixels.shape == (SIZE, SIZE, 3) and shown.pixels.dtype == np.uint8
        assert shown.heat.shape == (SIZE, SIZE) and shown.heat.dtype == np.float32
        assert shown.heat.min() >= 0 and shown.heat.max() in (0, 1)
        overlay = shown.overlay()
        assert overlay.shape == (SIZE, SIZE, 3) and overlay.dtype == np.uint8
        cold = shown.heat == 0  # no evidence: the image as it is
        assert np.array_equal(overlay[cold], shown.pixels[cold])
    assert len({shown.heat.tobytes() for shown in maps}) > 1
    assert np.array_equal(maps[0].pixels, maps[3].pixels)


def test_the_heat_map_is_cached_per_checkpoint_image_and_grade(explainer, photo, monkeypatch, tmp_path):
    first = explainer.saliency(photo, 2)
    assert len(cached(explainer)) == 1
    monkeypatch.setattr(saliency, "layer_gradcam", lambda *args: pytest.fail("recomputed"))
    again = explainer.saliency(photo, 2)
    assert np.array_equal(again.heat, first.heat) and len(cached(explainer)) == 1
    monkeypatch.undo()
    explainer.saliency(photo, 3)
    assert len(cached(explainer)) == 2
    other = Explainer(tiny_checkpoint(tmp_path / "other.pth", SIZE), explainer.cache_root)
    other.saliency(photo, 2)  # another run: its own maps
    assert other.folder != explainer.folder and len(cached(other)) == 1


class RedLesionDetector(nn.Module):
    """Raw RGB in; a feature map of dark-red pixels (synth's haemorrhages: R high against G and
    B; background, vessels, disc, exudates and the black rim all fall below 0), one cell per
    8 px; grade 3's logit grows with it, grade 0's shrinks."""

    def __init__(self) -> None:
        super().__init__()
        detector = nn.Conv2d(3, 1, 1)
        detector.weight.data = torch.tensor([1.0, -3.0, -2.0]).view(1, 3, 1, 1)
        detector.bias.data = torch.tensor([-10.0])
        self.features = nn.Sequential(detector, nn.ReLU(), nn.AvgPool2d(8))
        self.head = nn.Linear(1, 4)
        self.head.weight.data = torch.tensor([[-1.0], [0.0], [0.0], [1.0]])
        self.head.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def test_grad_cam_points_at_a_synthetic_haemorrhage():
    rng = np.random.default_rng(1)
    scene = plan_scene(Lesions(0, 0, 0, 0, False, 0), rng, 128)
    lesion = scene.centre + np.array([-0.45, -0.3]) * scene.radius  # upper left of the field
    assert scene.inside(lesion[None])[0]
    scene.haemorrhages = np.array([[*lesion, 7.0, 5.0, 30.0]])
    image = torch.from_numpy(render(scene, rng)).permute(2, 0, 1).float()
    model = RedLesionDetector().eval()
    heat = heat_map(layer_gradcam(model, model.features[-1], image, 3), image.shape[-2:])
    assert heat.shape == (128, scene.width)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert np.hypot(x - lesion[0], y - lesion[1]) < 8  # within one cell of the lesion
    far = np.hypot(np.arange(scene.width)[None] - lesion[0], np.arange(128)[:, None] - lesion[1])
    assert heat[far > 24].max() < 0.1
    no_evidence = layer_gradcam(model, model.features[-1], image, 0)  # grade 0's logit falls
    assert not heat_map(no_evidence, image.shape[-2:]).any()
    with pytest.raises(ValueError, match="no head convolution"):  # what the app looks for
        head_layer(model)


def test_an_ensembles_evidence_is_the_mean_of_its_members(photo, tmp_path):
    explainer = Explainer(tiny_checkpoint(tmp_path / "k.pth", SIZE, members=2), tmp_path / "cache")
    image = explainer._input(photo)[0]
    cams = [layer_gradcam(member, head_layer(member), image, 3) for member in members_of(explainer.model)]
    assert len(cams) == 2 and not np.allclose(cams[0], cams[1])
    expected = heat_map(np.mean(cams, 0), (SIZE, SIZE))
    assert np.allclose(explainer.saliency(photo, 3).heat, expected, atol=1e-5)
    assert explainer.views(photo).shape == (2, 4)


def test_flip_views_are_the_image_and_its_mirror_as_the_predictor_sees_them(explainer, photo):
    views = explainer.views(photo)
    assert views.shape == (2, 4) and np.allclose(views.sum(1), 1)
    alone, averaged = (
        predict(
            explainer.model,
            explainer.meta,
            [Sample(str(photo))],
            torch.device("cpu"),
            tta=tta,
            cache_root=explainer.cache_root,
        )
        for tta in (1, 2)
    )
    assert np.allclose(views[0], alone.probs[0], atol=1e-6)
    assert not np.allclose(views[0], views[1])
    # TTA averages the views' probabilities before the temperature (T = 2 here): p = softmax(l / T),
    # so softmax(T log p) is each view's uncalibrated probability.
    mean = torch.softmax(2 * torch.from_numpy(np.log(views)), 1).mean(0)
    assert np.allclose(torch.softmax(mean.log() / 2, 0).numpy(), averaged.probs[0], atol=1e-5)


def test_a_missing_image_is_an_image_error(explainer, tmp_path):
    with pytest.raises(ImageError):
        explainer.saliency(tmp_path / "gone.png", 1)


def test_the_command_line_writes_overlays(explainer, photo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DR_WORKSPACE", str(tmp_path / "ws"))
    saliency.main(
        [
            "--checkpoint",
            str(tmp_path / "tiny.pth"),
            "--out",
            str(tmp_path / "out"),
            str(photo),
            str(tmp_path / "gone.png"),
        ]
    )
    assert cv2.imread(str(tmp_path / "out" / "eye-gradcam.png")).shape == (SIZE, SIZE, 3)
    printed = capsys.readouterr()
    assert "eye.png: grade " in printed.out and " s\n" in printed.out
    assert "WARNING skipped gone.png: " in printed.err
