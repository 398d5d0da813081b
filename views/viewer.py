"""The grading viewer on a page: a photograph fitted to a large area, zoom to its native pixels
and beyond, pan, and views of the same image that keep the zoom and position (views/viewer.js
draws it with OpenSeadragon; views/tile_server.py serves its tiles).

Keys (none while a text field has the focus): arrows pan, + and - zoom, n native pixels,
f fit, v the next view (shift+v the one before)."""

from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import streamlit as st

from db.runs import run_checkpoint, run_preprocess
from engine.data.images import ImageError, image_size
from engine.data.preprocess import PreprocessCache, PreprocessConfig
from engine.data.tiles import OVERLAP, TILE_SIZE, photo_input_box
from engine.runtime.markdown import literal
from views.common import explainer, get_workspace
from views.tile_server import LIBRARY, PREFETCHER, PREFIX, REGISTRY, tile_cache

HEIGHT = 620  # px: the photograph and the grading buttons fit one 1000-px screen
KEYS = """
| key | does |
|---|---|
| arrows | pan |
| `+` `-` | zoom in, out (also the mouse wheel, a pinch, a double click) |
| `n` | native pixels: one pixel of the file per pixel of the screen |
| `f` | fit the photograph |
| `v`, `shift+v` | the next view, the one before |
"""
_COMPONENT = st.components.v2.component(
    "grading_viewer",
    html='<div class="grading-viewer"><div class="toolbar"></div><div class="osd"></div></div>',
    css="""
.grading-viewer { display: flex; flex-direction: column; width: 100%; }
.osd { flex: 1; background: #000; border-radius: 0.5rem; min-height: 0; }
.toolbar { display: flex; flex-wrap: wrap; gap: 0.25rem; align-items: center;
           padding-bottom: 0.35rem; font-family: var(--st-font, sans-serif); font-size: 0.85rem; }
.toolbar .gap { flex: 1; }
.toolbar .zoom { min-width: 3.5rem; text-align: center; }
.toolbar button { border: 1px solid rgba(128, 128, 128, 0.4); border-radius: 0.4rem;
                  background: transparent; color: inherit; padding: 0.15rem 0.6rem;
                  cursor: pointer; font: inherit; }
.toolbar button.active { background: rgba(255, 75, 75, 0.15); border-color: #ff4b4b; }
""",
    js=Path(__file__).with_name("viewer.js").read_text(),
)


@dataclass(frozen=True)
class View:
    name: str
    label: str
    layers: tuple[str, ...]
    help: str


PHOTO_VIEWS = (
    View("photo", "Photo", ("photo",), "The photograph as taken"),
    View(
        "red-free",
        "Red-free",
        ("red-free",),
        "The green channel, contrast-stretched: microaneurysms and haemorrhages are darkest",
    ),
    View("contrast", "Contrast", ("contrast",), "Contrast-enhanced (CLAHE on the luminance)"),
)
INPUT_VIEW = View("input", "Model input", ("input",), "What the model saw, laid on the photograph")
GRADCAM_VIEW = View(
    "gradcam", "Grad-CAM", ("photo", "gradcam"), "Where the model saw its grade, over the photograph"
)


def heat_layer(heat: np.ndarray) -> np.ndarray:
    """A Grad-CAM heat map as RGBA: colour where the evidence is, clear where there is none."""
    colours = cv2.applyColorMap(np.round(255 * heat).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = np.round(200 * np.clip(heat, 0, 1)).astype(np.uint8)
    return np.dstack([colours[..., ::-1], alpha])


def model_preprocess(run_id: int) -> PreprocessConfig:
    """How the run's model cut and prepared its input."""
    return PreprocessConfig.from_dict(
        run_preprocess(get_workspace().db_url, run_id) or PreprocessConfig().to_dict()
    )


def _overlays(
    path: Path, run_id: int, preprocess: PreprocessConfig, gradcam_of: int | None
) -> list[tuple[View, np.ndarray]]:
    """The run's model input of the photograph and, for a grade, that grade's Grad-CAM, both
    as the model saw the image (a square that engine.data.tiles.input_box places)."""
    workspace = get_workspace()
    overlays = [(INPUT_VIEW, PreprocessCache(workspace.cache).load(path, preprocess))]
    if gradcam_of is not None:
        model = explainer(run_checkpoint(workspace.db_url, run_id))
        if model:
            overlays.append((GRADCAM_VIEW, heat_layer(model.saliency(path, gradcam_of).heat)))
    return overlays


def _next(upcoming: str | None) -> dict | None:
    """The photograph the viewer will most likely show next, for the browser to fetch ahead."""
    if not upcoming:
        return None
    try:
        width, height = image_size(Path(upcoming))
    except ImageError:
        return None  # its card will say why
    token = REGISTRY.show(Path(upcoming))
    return {"token": token, "base": f"{PREFIX}/{token}", "width": width, "height": height}


def grading_viewer(
    photo: str,
    run_id: int | None = None,
    gradcam_of: int | None = None,
    key: str = "viewer",
    height: int = HEIGHT,
    decides: bool = False,
    upcoming: str | None = None,
) -> None:
    """The photograph at `photo` in the viewer, in the views of PHOTO_VIEWS; with a run, also
    as its model's input and, for a grade, with that grade's Grad-CAM over it. A sentence
    instead when the file cannot be shown.

    `decides`: the page's decision keys (views/viewer.js DECISION_KEYS) grade the photograph,
    so the viewer holds them back between a decision and the next card, and shows `upcoming`,
    the photograph likely next, at the key (prefetch makes its tiles; the browser fetches
    what it shows of them ahead)."""
    if not (LIBRARY / "openseadragon.min.js").is_file():
        st.error(f"The viewer's library is missing from {LIBRARY}: run `make install`.")
        return
    path = Path(photo)
    try:
        width, height_px = image_size(path)
        overlays: list[tuple[View, np.ndarray]] = []
        box: tuple[float, ...] = ()  # where the model's input lies; no overlays without a run
        if run_id is not None:
            preprocess = model_preprocess(run_id)
            overlays = _overlays(path, run_id, preprocess, gradcam_of)
            box = _input_box(path, preprocess)
    except (OSError, ImageError) as exc:
        st.warning(literal(f"{path.name}: cannot show this image ({exc})."))
        return
    token = REGISTRY.show(path)
    layers = [
        {
            "name": view.layers[-1],
            "box": list(box),
            "url": f"{PREFIX}/{token}/layer/{view.layers[-1]}.png?v="
            f"{REGISTRY.add_layer(token, view.layers[-1], pixels)}",
        }
        for view, pixels in overlays
    ]
    views = [*PHOTO_VIEWS, *(view for view, _ in overlays)]
    _COMPONENT(
        key=key,
        data={
            "token": token,
            "base": f"{PREFIX}/{token}",
            "lib": f"{PREFIX}/lib",
            "width": width,
            "height": height_px,
            "tileSize": TILE_SIZE,
            "overlap": OVERLAP,
            "pyramids": [v.name for v in PHOTO_VIEWS],
            "layers": layers,
            "height_px": height,
            "decides": decides,
            "next": _next(upcoming),
            "views": [
                {"name": v.name, "label": v.label, "layers": list(v.layers), "help": v.help} for v in views
            ],
        },
    )


_boxes: dict[tuple, tuple[float, ...]] = {}  # (photo, mtime, preprocessing) -> input box
MAX_BOXES = 1024


def _box_key(photo: Path, cfg: PreprocessConfig) -> tuple:
    return str(photo.resolve()), photo.stat().st_mtime_ns, cfg


def _remember(key: tuple, box: tuple[float, ...]) -> None:
    if len(_boxes) >= MAX_BOXES:
        _boxes.clear()
    _boxes[key] = box


def _input_box(photo: Path, cfg: PreprocessConfig) -> tuple[float, ...]:
    """Where the model's input was cut from the photograph, in the photograph's pixels."""
    key = _box_key(photo, cfg)
    if key not in _boxes:
        _remember(key, photo_input_box(photo, cfg))
    return _boxes[key]


def prefetch(photo: str | None, run_id: int) -> None:
    """Make the next photograph's tiles, the run's model input and its place while the
    reviewer grades this one (engine.data.tiles.Prefetcher): the next card then only reads them."""
    if not photo:
        return
    path, preprocess = Path(photo), model_preprocess(run_id)
    key = _box_key(path, preprocess)
    future = PREFETCHER.submit(path, tile_cache().root, get_workspace().cache, preprocess)

    def remember(done: Future) -> None:
        if done.exception() is None:
            _remember(key, done.result())

    future.add_done_callback(remember)
