"""Evidence for one image's grade: a Grad-CAM heat map (Selvaraju et al. 2017, computed by
captum) over the image as the checkpoint saw it, and the probabilities of its flip views.

Grad-CAM weighs the last feature map before the global pooling by the gradient of one grade's
logit: where it is high, the features there raised that grade. Heat maps are cached on disk
per (checkpoint, image, grade) at the feature map's resolution, a few hundred bytes each.

    python -m engine.model.saliency --checkpoint FILE [--grade G] [--out DIR] IMAGE...
writes DIR/<image>-gradcam.png and the seconds each overlay took (caches in the workspace).
"""

import argparse
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from cli import HelpFormatter, setup_logging
from engine.data.datasets import Sample
from engine.data.images import ImageError
from engine.data.preprocess import cache_digest, file_identity, save_whole
from engine.model.networks import load_checkpoint, members_of
from engine.model.predictor import dataset_for, view_probabilities
from engine.runtime.workspace import Workspace

log = logging.getLogger(__name__)


def head_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM looks at: the activated head convolution of an EfficientNet (timm's
    `bn2`), the last feature map before the global pooling."""
    layer = getattr(model, "bn2", None)
    if not isinstance(layer, nn.Module) or isinstance(layer, nn.Identity):
        raise ValueError(f"{type(model).__name__} has no head convolution (bn2) to explain")
    return layer


def layer_gradcam(model: nn.Module, layer: nn.Module, image: torch.Tensor, grade: int) -> np.ndarray:
    """Grad-CAM of `grade` for one normalised CHW image, at `layer`'s resolution (h, w): only
    the evidence for the grade (negative values are cut to 0)."""
    cam = LayerGradCam(model, layer).attribute(image[None], target=grade, relu_attributions=True)
    return cam[0, 0].detach().float().numpy()


def heat_map(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A layer's Grad-CAM upsampled to `size` (h, w), scaled to [0, 1]; all 0 when the layer
    holds no evidence for the grade."""
    heat = LayerAttribution.interpolate(torch.from_numpy(cam)[None, None], size, "bilinear")[0, 0]
    top = heat.max()
    return (heat / top if top > 0 else heat).numpy().astype(np.float32)


@dataclass(frozen=True)
class Saliency:
    pixels: np.ndarray  # (H, W, 3) uint8: the image as the model saw it
    heat: np.ndarray  # (H, W) float32 in [0, 1]: where the evidence for the grade lies

    def overlay(self, strength: float = 0.6) -> np.ndarray:
        """The heat map in colour (blue to red) over the image; where there is no evidence
        the image shows as it is."""
        colours = cv2.applyColorMap(np.round(255 * self.heat).astype(np.uint8), cv2.COLORMAP_JET)
        weight = strength * self.heat[..., None]
        blended = (1 - weight) * self.pixels + weight * colours[..., ::-1]
        return np.round(blended).astype(np.uint8)


class Explainer:
    """One checkpoint's evidence for single images, on the CPU, with its own preprocessing.

    One instance can serve every session of the app: a lock lets one image at a time through
    the model, since Grad-CAM hooks into it while it runs. Each image is computed on one
    thread: while a training job keeps the cores busy, two threads that wait for each other
    took up to 4 s for an overlay that one thread makes in 0.1-0.3 s (README)."""

    def __init__(self, checkpoint: Path, cache_root: Path) -> None:
        self.model, self.meta = load_checkpoint(checkpoint)
        # An Ensemble's evidence is the mean of its members' (one architecture, one resolution).
        self.layers = [(member, head_layer(member)) for member in members_of(self.model)]
        self.cache_root = cache_root
        self.folder = cache_root / "saliency" / cache_digest(file_identity(checkpoint))
        self.lock = threading.Lock()

    def _input(self, path: Path) -> tuple[torch.Tensor, np.ndarray]:
        """The model's input tensor for the image at `path`, and its pixels."""
        dataset = dataset_for(self.meta, [Sample(str(path))], self.cache_root)
        image, message, _ = dataset[0]
        if image is None:
            raise ImageError(message)
        pixels = (image * dataset.std + dataset.mean).clamp(0, 255).round().to(torch.uint8)
        return image, pixels.permute(1, 2, 0).numpy()

    def saliency(self, path: Path, grade: int) -> Saliency:
        """Grad-CAM of `grade` for the image at `path`; computed once, then read from disk."""
        with self._alone():
            image, pixels = self._input(path)
            entry = self.folder / f"{cache_digest(file_identity(path))}-{grade}.npy"
            try:
                cam = np.load(entry)
            except (OSError, ValueError):  # missing, or damaged by a crash: make it again
                cam = np.mean([layer_gradcam(net, layer, image, grade) for net, layer in self.layers], 0)
                save_whole(entry, cam)
            return Saliency(pixels, heat_map(cam, pixels.shape[:2]))

    def views(self, path: Path) -> np.ndarray:
        """Calibrated probabilities of each test-time view of the image at `path`: (views, 4)."""
        with self._alone():
            return view_probabilities(self.model, self.meta, self._input(path)[0])

    @contextmanager
    def _alone(self) -> Iterator[None]:
        """The model to this thread alone, computing on one CPU thread."""
        with self.lock:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                yield
            finally:
                torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m engine.model.saliency", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a run's best.pth")
    parser.add_argument("--out", type=Path, default=Path("saliency"), help="folder for the heat-map images")
    parser.add_argument("--grade", type=int, help="default: the grade the model predicts")
    parser.add_argument("images", type=Path, nargs="+", help="photographs to explain")
    args = parser.parse_args(argv)
    setup_logging()
    explainer = Explainer(args.checkpoint, Workspace.from_env().cache)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        try:
            grade = int(explainer.views(path)[0].argmax()) if args.grade is None else args.grade
            started = time.perf_counter()
            overlay = explainer.saliency(path, grade).overlay()
            seconds = time.perf_counter() - started
        except ImageError as exc:
            log.warning("skipped %s: %s", path.name, exc)
            continue
        cv2.imwrite(str(args.out / f"{path.stem}-gradcam.png"), overlay[..., ::-1])
        print(f"{path.name}: grade {grade}, overlay in {seconds:.3f} s")


if __name__ == "__main__":
    main()
