"""Synthetic fundus photographs whose grade follows the Messidor rules, written in the layouts
users bring (APTOS 2019, Messidor-1, a high-quality validation set).

None of the real datasets can be downloaded here, so every importer, page and training loop is
exercised on these. Each image is drawn from its own generator seeded by (seed, split, index),
so a seed gives byte-identical files however many worker processes draw them.

    python -m engine.data.synth --out DIR [--seed N] [--train N] [--test N] [--val N]
                           [--messidor N] [--size PX]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from cli import HelpFormatter
from grades import GRADES

# Grade probabilities over the Messidor scale: APTOS-like imbalance, and Messidor-1's own.
APTOS_GRADE_P = (0.45, 0.15, 0.25, 0.15)
MESSIDOR_GRADE_P = (0.45, 0.13, 0.21, 0.21)
# Edema risk 0/1/2 by grade: hard exudates come with more advanced retinopathy.
EDEMA_P = {0: (1.0, 0.0, 0.0), 1: (0.85, 0.1, 0.05), 2: (0.45, 0.3, 0.25), 3: (0.3, 0.3, 0.4)}
# Fixed numbers in the per-image seeds, so that a split's images never depend on the others.
SPLIT_CODES = {"aptos_train": 1, "aptos_test": 2, "messidor": 3, "messidor_base": 4, "validation": 5}
BASE11_DEPARTMENT = "Service Ophtalmologie Lariboisière"
LESION_COLUMNS = [
    "path",
    "split",
    "ma",
    "haemorrhages",
    "exudates",
    "cotton_wool",
    "nv",
    "edema_risk",
    "grade",
]

RGB = tuple[float, float, float]
VESSEL_RGB: RGB = (125, 28, 22)
RED_LESION_RGB: RGB = (85, 12, 8)
EXUDATE_RGB: RGB = (255, 236, 120)
COTTON_WOOL_RGB: RGB = (245, 238, 212)


def grade_from_counts(ma: int, h: int, nv: bool) -> int:
    """Messidor grade from microaneurysm and haemorrhage counts and neovascularisation."""
    if ma < 0 or h < 0:
        raise ValueError(f"lesion counts must be >= 0, got ma={ma}, h={h}")
    if nv or ma >= 15 or h >= 5:
        return 3
    if ma > 5 or h > 0:
        return 2
    return 1 if ma > 0 else 0


@dataclass(frozen=True)
class Lesions:
    """What one eye shows; the grade follows from the counts, never the other way round."""

    ma: int
    haemorrhages: int
    exudates: int
    cotton_wool: int
    nv: bool
    edema_risk: int

    @property
    def grade(self) -> int:
        return grade_from_counts(self.ma, self.haemorrhages, self.nv)


def sample_lesions(grade: int, rng: np.random.Generator) -> Lesions:
    """Random lesion counts whose Messidor grade is `grade`."""
    nv = False
    if grade == 0:
        ma, h, cotton = 0, 0, 0
    elif grade == 1:
        # More 3-5 than 1-2, so that most mild eyes have a signal a CNN can see at 224 px.
        ma, h, cotton = int(rng.choice(5, p=(0.1, 0.15, 0.25, 0.25, 0.25))) + 1, 0, 0
    elif grade == 2:
        if rng.random() < 0.5:
            ma, h = int(rng.integers(6, 15)), int(rng.integers(0, 5))
        else:
            ma, h = int(rng.integers(2, 15)), int(rng.integers(1, 5))
        cotton = int(rng.choice(3, p=(0.6, 0.25, 0.15)))
    elif grade == 3:
        # Plenty of lesions whichever rule makes it grade 3, so the class is plain to see.
        nv = bool(rng.random() < 0.4)
        ma, h = int(rng.integers(10, 40)), int(rng.integers(3, 16))
        if not nv and ma < 15 and h < 5:
            h = int(rng.integers(5, 16))
        cotton = int(rng.integers(1, 5))
    else:
        raise ValueError(f"grade must be one of {GRADES}, got {grade}")
    edema = int(rng.choice(3, p=EDEMA_P[grade]))
    exudates = int(rng.integers(6, 30)) if edema else 0
    return Lesions(ma, h, exudates, cotton, nv, edema)


@dataclass(frozen=True)
class Style:
    """How one camera or dataset frames and degrades its photographs."""

    aspect: tuple[float, float] = (1.0, 1.5)  # width / height
    field: tuple[float, float] = (0.8, 0.98)  # field diameter / height, when not cut
    cut_p: float = 0.25  # chance of a field cut flat at top and bottom
    blur: tuple[float, float] = (0.001, 0.004)  # Gaussian sigma / field diameter
    noise: tuple[float, float] = (2.0, 6.0)  # grey levels


APTOS_STYLE = Style()
MESSIDOR_STYLE = Style(aspect=(1.5, 1.5), field=(0.9, 0.98), cut_p=0.0)
VALIDATION_STYLE = Style(cut_p=0.0, blur=(0.0, 0.001), noise=(0.5, 1.5))


@dataclass
class Scene:
    """Where everything lies in one photograph, in pixel coordinates (x, y)."""

    height: int
    width: int
    centre: np.ndarray
    radius: float
    cut: float | None  # half-height of the flat cut, measured from the centre
    disc: np.ndarray
    disc_radius: float
    fovea: np.ndarray
    blur_sigma: float
    noise_std: float
    vessels: list[tuple[np.ndarray, int, int]] = field(default_factory=list)  # path, px, 0-255
    microaneurysms: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # x, y, r
    haemorrhages: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # ellipses
    exudates: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # x, y, r
    cotton_wool: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # x, y, r
    nv: list[np.ndarray] = field(default_factory=list)  # fine polylines

    @property
    def diameter(self) -> float:
        return 2 * self.radius

    @property
    def disc_diameter(self) -> float:
        return 2 * self.disc_radius

    def inside(self, points: np.ndarray) -> np.ndarray:
        """Points well inside the visible field and off the optic disc."""
        offset = points - self.centre
        ok = np.hypot(offset[:, 0], offset[:, 1]) < 0.9 * self.radius
        if self.cut is not None:
            ok &= np.abs(offset[:, 1]) < self.cut - 0.05 * self.radius
        off_disc = points - self.disc
        return ok & (np.hypot(off_disc[:, 0], off_disc[:, 1]) > 1.4 * self.disc_radius)


def draw_fundus(
    lesions: Lesions, rng: np.random.Generator, size: int, style: Style = APTOS_STYLE
) -> np.ndarray:
    """A fundus photograph showing `lesions`: (H, W, 3) RGB uint8 with H = `size`."""
    return render(plan_scene(lesions, rng, size, style), rng)


def plan_scene(lesions: Lesions, rng: np.random.Generator, size: int, style: Style = APTOS_STYLE) -> Scene:
    """Lay out field, anatomy and lesions; all randomness of the geometry is drawn here."""
    height = size
    width = round(size * rng.uniform(*style.aspect))
    cut_flat = rng.random() < style.cut_p
    if cut_flat:
        diameter = height * rng.uniform(1.05, 1.2)
        width = max(width, math.ceil(diameter * 1.04))
    else:
        diameter = height * rng.uniform(*style.field)
    radius = diameter / 2
    centre = np.array([width / 2, height / 2]) + rng.normal(0, 0.01 * diameter, 2)
    cut = None
    if cut_flat:
        # The field is taller than the frame; the cut lies a few rows inside it, so the top and
        # bottom rows stay black as on the cameras that do this.
        cut = min(centre[1], height - centre[1]) - height * rng.uniform(0.03, 0.06)

    # Rotation and left/right eye only change the axis from the disc to the fovea.
    tilt = rng.uniform(-0.25, 0.25)
    side = 1 if rng.random() < 0.5 else -1
    axis = np.array([side * math.cos(tilt), math.sin(tilt)])
    disc_radius = diameter * rng.uniform(0.065, 0.08)
    disc_to_fovea = 2 * disc_radius * rng.uniform(2.3, 2.7)
    disc = centre - axis * disc_to_fovea * 0.55
    fovea = disc + axis * disc_to_fovea

    scene = Scene(
        height,
        width,
        centre,
        radius,
        cut,
        disc,
        disc_radius,
        fovea,
        blur_sigma=diameter * rng.uniform(*style.blur),
        noise_std=rng.uniform(*style.noise),
    )
    scene.vessels = _vessel_tree(scene, axis, rng)
    scene.microaneurysms = _spots(scene, lesions.ma, (0.007, 0.011), 0.2, rng)
    scene.haemorrhages = _blots(scene, lesions.haemorrhages, rng)
    xy = exudate_positions(scene, lesions.edema_risk, lesions.exudates, rng)
    scene.exudates = np.column_stack([xy, diameter * rng.uniform(0.004, 0.008, len(xy))])
    scene.cotton_wool = _spots(scene, lesions.cotton_wool, (0.02, 0.035), 0.22, rng)
    if lesions.nv:
        scene.nv = _nv_tangles(scene, rng)
    return scene


def _sample(
    scene: Scene,
    n: int,
    rng: np.random.Generator,
    propose: Callable[[int], np.ndarray],
    accept: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """n proposed points that lie in the field (and pass `accept`), by rejection."""
    found: list[np.ndarray] = []
    count = 0
    while count < n:
        points = propose(max(4 * n, 16))
        ok = scene.inside(points)
        if accept is not None:
            ok &= accept(points)
        found.append(points[ok])
        count += int(ok.sum())
    return np.concatenate(found)[:n] if n else np.zeros((0, 2))


def _around(point: np.ndarray, spread: float, rng: np.random.Generator) -> Callable[[int], np.ndarray]:
    return lambda k: point + rng.normal(0, spread, (k, 2))


def _spots(
    scene: Scene, n: int, radii: tuple[float, float], spread: float, rng: np.random.Generator
) -> np.ndarray:
    """Round lesions clustered on the posterior pole, where retinopathy shows first."""
    xy = _sample(scene, n, rng, _around(scene.fovea, spread * scene.diameter, rng))
    return np.column_stack([xy, scene.diameter * rng.uniform(*radii, len(xy))])


def _blots(scene: Scene, n: int, rng: np.random.Generator) -> np.ndarray:
    """Haemorrhages as irregular blots: a few overlapping ellipses each."""
    centres = _sample(scene, n, rng, _around(scene.fovea, 0.22 * scene.diameter, rng))
    ellipses = []
    for centre in centres:
        r = scene.diameter * rng.uniform(0.015, 0.03)
        for _ in range(rng.integers(2, 5)):
            x, y = centre + rng.normal(0, 0.35 * r, 2)
            ellipses.append((x, y, r * rng.uniform(0.6, 1.0), r * rng.uniform(0.4, 0.8), rng.uniform(0, 180)))
    return np.array(ellipses).reshape(-1, 5)


def exudate_positions(scene: Scene, risk: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Hard exudates in clusters; every speck obeys the edema-risk distance to the fovea:
    risk 1 farther than one disc diameter, risk 2 within one (with a margin for the speck)."""
    if risk == 0 or n == 0:
        return np.zeros((0, 2))
    dd = scene.disc_diameter
    low, high = (0.0, 0.8 * dd) if risk == 2 else (1.25 * dd, 3.0 * dd)

    def accept(points: np.ndarray) -> np.ndarray:
        dist = np.hypot(*(points - scene.fovea).T)
        return (dist >= low) & (dist <= high)

    def ring(k: int) -> np.ndarray:
        dist = rng.uniform(low, high, k)
        angle = rng.uniform(0, 2 * math.pi, k)
        return scene.fovea + np.column_stack([dist * np.cos(angle), dist * np.sin(angle)])

    clusters = _sample(scene, int(rng.integers(1, 4)), rng, ring, accept)

    def near_cluster(k: int) -> np.ndarray:
        return clusters[rng.integers(len(clusters), size=k)] + rng.normal(0, 0.3 * dd, (k, 2))

    return _sample(scene, n, rng, near_cluster, accept)


def _walk(
    start: np.ndarray,
    heading: float,
    length: float,
    turn: float,
    rng: np.random.Generator,
    steps: int = 24,
    wiggle: float = 0.04,
) -> np.ndarray:
    """A smooth path whose heading bends by `turn` radians in all, plus a random wiggle."""
    headings = heading + np.linspace(0, turn, steps) + np.cumsum(rng.normal(0, wiggle, steps))
    deltas = (length / steps) * np.column_stack([np.cos(headings), np.sin(headings)])
    return np.vstack([start, start + np.cumsum(deltas, axis=0)])


def _vessel_tree(
    scene: Scene, axis: np.ndarray, rng: np.random.Generator
) -> list[tuple[np.ndarray, int, int]]:
    """Arcades curving from the disc around the macula, nasal vessels, and their branches."""
    d = scene.diameter
    to_fovea = math.atan2(axis[1], axis[0])
    span = float(np.hypot(*(scene.fovea - scene.disc)))
    mains = []
    for up in (-1, 1):
        for thickness, opacity in ((0.011, 200), (0.008, 150)):  # vein, then artery
            start = scene.disc + rng.normal(0, 0.2 * scene.disc_radius, 2)
            mains.append(
                (
                    _walk(
                        start,
                        to_fovea + up * rng.uniform(1.1, 1.4),
                        span * 1.7,
                        -up * rng.uniform(1.5, 1.8),
                        rng,
                    ),
                    thickness * d,
                    opacity,
                )
            )
            mains.append(
                (
                    _walk(
                        start,
                        to_fovea + math.pi - up * rng.uniform(0.5, 1.0),
                        span * 0.9,
                        up * rng.uniform(0.2, 0.7),
                        rng,
                    ),
                    thickness * 0.8 * d,
                    opacity,
                )
            )
    vessels = []
    for path, thickness, opacity in mains:
        vessels += _tapered(path, thickness, opacity)
        for _ in range(rng.integers(2, 5)):
            i = int(rng.integers(len(path) // 5, len(path) - 2))
            dx, dy = path[i + 1] - path[i]
            heading = math.atan2(dy, dx) + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0)
            branch = _walk(
                path[i],
                heading,
                d * rng.uniform(0.12, 0.3),
                rng.uniform(-0.7, 0.7),
                rng,
                steps=12,
                wiggle=0.08,
            )
            vessels += _tapered(branch, thickness * 0.5, opacity)
    return vessels


def _tapered(path: np.ndarray, thickness: float, opacity: int) -> list[tuple[np.ndarray, int, int]]:
    """A vessel thinning out along its course, as three ever thinner stretches."""
    thirds = np.array_split(np.arange(len(path)), 3)
    return [
        (path[max(idx[0] - 1, 0) : idx[-1] + 1], max(1, round(thickness * scale)), opacity)
        for idx, scale in zip(thirds, (1.0, 0.75, 0.5), strict=True)
    ]


def _nv_tangles(scene: Scene, rng: np.random.Generator) -> list[np.ndarray]:
    """Fine looping vessels on the disc (NVD) or elsewhere on the retina (NVE)."""
    d = scene.diameter
    paths = []
    for _ in range(rng.integers(1, 4)):
        if rng.random() < 0.5:
            centre = scene.disc + rng.normal(0, 0.5 * scene.disc_radius, 2)
        else:
            centre = _sample(scene, 1, rng, _around(scene.centre, 0.25 * d, rng))[0]
        for _ in range(rng.integers(6, 11)):
            start = centre + rng.normal(0, 0.025 * d, 2)
            paths.append(
                _walk(
                    start,
                    rng.uniform(0, 2 * math.pi),
                    d * rng.uniform(0.06, 0.12),
                    rng.uniform(-6, 6),
                    rng,
                    steps=20,
                    wiggle=0.3,
                )
            )
    return paths


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Colour, illumination, blur and noise for a planned scene: (H, W, 3) RGB uint8."""
    h, w = scene.height, scene.width
    shade = 1 + 0.08 * _smooth_noise(h, w, rng)
    _darken_macula(shade, scene, rng.uniform(0.25, 0.4))
    base = np.array([rng.uniform(185, 225), rng.uniform(65, 105), rng.uniform(20, 45)], np.float32)
    img: np.ndarray = shade[..., None] * base

    _draw_disc(img, scene)
    _blend(img, _vessel_mask(scene), VESSEL_RGB)
    _blend(img, _red_lesion_mask(scene), RED_LESION_RGB)
    _blend(img, _circles_mask(scene, scene.exudates, 230), EXUDATE_RGB)
    _blend(img, _cotton_wool_mask(scene), COTTON_WOOL_RGB)

    # Masking before the blur softens the rim as optics do; the corners stay exactly black.
    ys, xs = np.ogrid[:h, :w]
    field = _field_mask(scene, xs, ys)
    img *= (_illumination(scene, xs, ys, rng) * field)[..., None]
    img *= rng.uniform(0.9, 1.1, 3).astype(np.float32)
    if scene.blur_sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), scene.blur_sigma)
    noise = rng.standard_normal((h, w), dtype=np.float32) * np.float32(scene.noise_std)
    img += (noise * field)[..., None]
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


def _smooth_noise(h: int, w: int, rng: np.random.Generator, cells: int = 6) -> np.ndarray:
    """Low-frequency mottling, like the choroid showing through."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _window(
    shape: tuple[int, ...], centre: np.ndarray, half: float
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The square around `centre` clipped to the image, with its pixels' x and y offsets."""
    x0, y0 = (max(int(c - half), 0) for c in centre)
    x1, y1 = min(int(centre[0] + half) + 2, shape[1]), min(int(centre[1] + half) + 2, shape[0])
    ys, xs = np.ogrid[y0:y1, x0:x1]
    return (slice(y0, y1), slice(x0, x1)), xs - centre[0], ys - centre[1]


def _darken_macula(shade: np.ndarray, scene: Scene, depth: float) -> None:
    sigma = 0.9 * scene.disc_diameter
    box, dx, dy = _window(shade.shape, scene.fovea, 3 * sigma)
    shade[box] *= 1 - depth * np.exp(-(dx**2 + dy**2) / (2 * sigma**2))


def _draw_disc(img: np.ndarray, scene: Scene) -> None:
    """A bright yellowish disc with a paler cup, both with a soft edge."""
    r = scene.disc_radius
    box, dx, dy = _window(img.shape, scene.disc, r)
    dist = np.sqrt(dx**2 + dy**2).astype(np.float32)
    edge = 0.12 * r
    _mix(img[box], np.clip((r - dist) / edge, 0, 1), (250, 215, 140))
    _mix(img[box], 0.6 * np.clip((0.45 * r - dist) / edge, 0, 1), (255, 245, 215))


def _mix(region: np.ndarray, alpha: np.ndarray, colour: RGB) -> None:
    region += (np.asarray(colour, np.float32) - region) * alpha[..., None]


def _blend(img: np.ndarray, mask: np.ndarray, colour: RGB) -> None:
    """Blend `colour` in by a uint8 opacity mask, touching only the mask's bounding box."""
    x, y, w, h = cv2.boundingRect(mask)
    if w and h:
        alpha = mask[y : y + h, x : x + w].astype(np.float32) * np.float32(1 / 255)
        _mix(img[y : y + h, x : x + w], alpha, colour)


# cv2 draws sub-pixel geometry from fixed-point coordinates with SHIFT fractional bits.
SHIFT = 3


def _points(path: np.ndarray) -> np.ndarray:
    return np.round(path * (1 << SHIFT)).astype(np.int32)


def _fixed(*values: float) -> tuple[int, ...]:
    return tuple(round(v * (1 << SHIFT)) for v in values)


def _vessel_mask(scene: Scene) -> np.ndarray:
    mask = np.zeros((scene.height, scene.width), np.uint8)
    for path, thickness, opacity in scene.vessels:
        cv2.polylines(mask, [_points(path)], False, opacity, thickness, cv2.LINE_AA, SHIFT)
    return mask


def _red_lesion_mask(scene: Scene) -> np.ndarray:
    mask = np.zeros((scene.height, scene.width), np.uint8)
    for x, y, a, b, angle in scene.haemorrhages:
        cv2.ellipse(mask, _fixed(x, y), _fixed(a, b), angle, 0, 360, 215, -1, cv2.LINE_AA, SHIFT)
    for x, y, r in scene.microaneurysms:
        cv2.circle(mask, _fixed(x, y), _fixed(r)[0], 240, -1, cv2.LINE_AA, SHIFT)
    nv_thickness = max(1, round(0.004 * scene.diameter))
    cv2.polylines(mask, [_points(p) for p in scene.nv], False, 200, nv_thickness, cv2.LINE_AA, SHIFT)
    return mask


def _circles_mask(scene: Scene, circles: np.ndarray, opacity: int) -> np.ndarray:
    mask = np.zeros((scene.height, scene.width), np.uint8)
    for x, y, r in circles:
        cv2.circle(mask, _fixed(x, y), _fixed(r)[0], opacity, -1, cv2.LINE_AA, SHIFT)
    return mask


def _cotton_wool_mask(scene: Scene) -> np.ndarray:
    """Soft-edged pale patches: blurring gives the fluffy border."""
    mask = _circles_mask(scene, scene.cotton_wool, 190)
    if len(scene.cotton_wool) == 0:
        return mask
    return cv2.GaussianBlur(mask, (0, 0), 0.012 * scene.diameter)


def _illumination(scene: Scene, xs: np.ndarray, ys: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Vignetting towards the rim plus an uneven gradient across the field."""
    dx = ((xs - scene.centre[0]) / scene.radius).astype(np.float32)
    dy = ((ys - scene.centre[1]) / scene.radius).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    gradient = np.float32(rng.uniform(0.0, 0.2)) * (dx * math.cos(angle) + dy * math.sin(angle))
    return np.float32(rng.uniform(0.85, 1.1)) * (1 - 0.35 * (dx**2 + dy**2) + gradient)


def _field_mask(scene: Scene, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """1 inside the round (maybe cut) field, 0 outside, with a one-pixel soft rim."""
    dx = (xs - scene.centre[0]).astype(np.float32)
    dy = (ys - scene.centre[1]).astype(np.float32)
    mask = np.clip(np.float32(scene.radius + 0.5) - np.sqrt(dx**2 + dy**2), 0, 1)
    if scene.cut is not None:
        mask *= np.clip(np.float32(scene.cut + 0.5) - np.abs(dy), 0, 1)
    return mask


# ---- dataset layouts ---------------------------------------------------------------------

# The demo workspace's default counts and image height: generated in seconds on two cores.
DEMO_COUNTS = {"train": 480, "test": 240, "val": 120, "messidor": 60}
DEMO_SIZE = 384
# Below this many images, starting worker processes costs more than it saves.
POOL_MIN_IMAGES = 32


@dataclass(frozen=True)
class _Job:
    """One image to draw and write; a plain value so that worker processes can take it."""

    path: Path
    split: str
    key: tuple[int, ...]
    lesions: Lesions
    size: int
    style: Style


def _hex_id(seed: int, split: str, index: int) -> str:
    return hashlib.sha1(f"{seed}:{split}:{index}".encode()).hexdigest()[:12]


def _image_path(seed: int, split: str, index: int, grade: int) -> Path:
    """Where an image goes, relative to the output folder, named as in the real datasets."""
    if split in ("aptos_train", "aptos_test"):
        folder = "train_images" if split == "aptos_train" else "test_images"
        return Path("aptos", folder, f"{_hex_id(seed, split, index)}.png")
    if split == "validation":
        return Path("validation", str(grade), f"val_{index:04d}.png")
    # Messidor style, e.g. 20051019_38557_0100_PP.tif
    day = date(2005, 10, 19) + timedelta(days=index // 20)
    number = 10000 + int(_hex_id(seed, split, index), 16) % 90000
    return Path(split, f"{day:%Y%m%d}_{number}_{index:04d}_PP.tif")


def _plan(out: Path, seed: int, split: str, n: int, size: int) -> list[_Job]:
    """Labels for a split: grades by the split's class balance, then lesions per image."""
    style = {"validation": VALIDATION_STYLE, "messidor": MESSIDOR_STYLE, "messidor_base": MESSIDOR_STYLE}.get(
        split, APTOS_STYLE
    )
    grade_p = MESSIDOR_GRADE_P if split.startswith("messidor") else APTOS_GRADE_P
    jobs = []
    for index in range(n):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
        grade = index % len(GRADES) if split == "validation" else int(rng.choice(len(GRADES), p=grade_p))
        path = out / _image_path(seed, split, index, grade)
        jobs.append(
            _Job(path, split, (seed, SPLIT_CODES[split], index, 1), sample_lesions(grade, rng), size, style)
        )
    return jobs


def _draw_and_write(job: _Job) -> None:
    image = draw_fundus(job.lesions, np.random.default_rng(job.key), job.size, job.style)
    if not cv2.imwrite(str(job.path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {job.path}")


def _run(jobs: list[_Job], workers: int) -> Iterator[None]:
    """Draw all jobs, yielding once per written image; the files do not depend on `workers`."""
    if workers <= 1 or len(jobs) < POOL_MIN_IMAGES:
        for job in jobs:
            _draw_and_write(job)
            yield
        return
    # spawn, because forking a threaded parent (Streamlit) can deadlock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_draw_and_write, jobs, chunksize=8)


def write_dataset(
    out: Path,
    seed: int = 0,
    n_train: int = DEMO_COUNTS["train"],
    n_test: int = DEMO_COUNTS["test"],
    n_val: int = DEMO_COUNTS["val"],
    n_messidor: int = DEMO_COUNTS["messidor"],
    size: int = DEMO_SIZE,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 2,
) -> dict[str, int]:
    """Write the APTOS, Messidor (both CSV styles) and validation layouts under `out`.

    `n_messidor` images go to each Messidor layout. Files of an earlier run into the same
    folder are overwritten, not removed. With workers > 1 the images are drawn in spawned
    processes, so a calling script needs the `if __name__ == "__main__":` guard.
    Returns the image count per split and the total.
    """
    out = Path(out)
    counts = {
        "aptos_train": n_train,
        "aptos_test": n_test,
        "messidor": n_messidor,
        "messidor_base": n_messidor,
        "validation": n_val,
    }
    by_split = {split: _plan(out, seed, split, n, size) for split, n in counts.items()}
    jobs = [job for split_jobs in by_split.values() for job in split_jobs]
    folders = {job.path.parent for job in jobs} | {out / "aptos", out / "messidor", out / "messidor_base"}
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)

    _aptos_csv(by_split["aptos_train"]).to_csv(out / "aptos/train.csv", index=False)
    test_labels = _aptos_csv(by_split["aptos_test"])
    test_labels[["id_code"]].to_csv(out / "aptos/test.csv", index=False)
    test_labels.to_csv(out / "test_labels.csv", index=False)
    _messidor_csv(by_split["messidor"]).to_csv(out / "messidor/Mess1_annotation_train.csv")
    _base11_csv(by_split["messidor_base"]).to_csv(out / "messidor_base/Annotation_Base11.csv", index=False)
    _lesion_table(jobs, out).to_csv(out / "lesions.csv", index=False)

    for done, _ in enumerate(_run(jobs, workers), start=1):
        if progress is not None:
            progress(done, len(jobs))
    return counts | {"total": len(jobs)}


def _aptos_csv(jobs: Iterable[_Job]) -> pd.DataFrame:
    """id_code and ICDR 0-4 diagnosis: Messidor grade 3 splits into severe (3) and
    proliferative, i.e. with neovascularisation (4)."""
    return pd.DataFrame(
        [{"id_code": j.path.stem, "diagnosis": 4 if j.lesions.nv else j.lesions.grade} for j in jobs],
        columns=["id_code", "diagnosis"],
    )


def _messidor_csv(jobs: Iterable[_Job]) -> pd.DataFrame:
    """The seed's Mess1_annotation_train.csv columns (written with its index column)."""
    return pd.DataFrame(
        [
            {
                "image": j.path.name,
                "quality": 1,
                "type": "PP",
                "Retinopathy_grade": j.lesions.grade,
                "Risk_of_macular_edema": j.lesions.edema_risk,
            }
            for j in jobs
        ],
        columns=["image", "quality", "type", "Retinopathy_grade", "Risk_of_macular_edema"],
    )


def _base11_csv(jobs: Iterable[_Job]) -> pd.DataFrame:
    """The original Messidor spreadsheet's columns, trailing space in the last one included."""
    return pd.DataFrame(
        [
            {
                "Image name": j.path.name,
                "Ophthalmologic department": BASE11_DEPARTMENT,
                "Retinopathy grade": j.lesions.grade,
                "Risk of macular edema ": j.lesions.edema_risk,
            }
            for j in jobs
        ],
        columns=["Image name", "Ophthalmologic department", "Retinopathy grade", "Risk of macular edema "],
    )


def _lesion_table(jobs: Iterable[_Job], out: Path) -> pd.DataFrame:
    rows = [
        {
            "path": job.path.relative_to(out).as_posix(),
            "split": job.split,
            **asdict(job.lesions),
            "grade": job.lesions.grade,
        }
        for job in jobs
    ]
    table = pd.DataFrame(rows, columns=LESION_COLUMNS)
    return table.astype({"nv": int})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m engine.data.synth",
        description="Write a synthetic fundus dataset.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for the APTOS, Messidor and validation layouts"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the drawings")
    for name, default in DEMO_COUNTS.items():
        parser.add_argument(f"--{name}", type=int, default=default, help=f"{name} photographs")
    parser.add_argument("--size", type=int, default=DEMO_SIZE, help="image height in px")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    start = time.perf_counter()
    counts = write_dataset(args.out, args.seed, args.train, args.test, args.val, args.messidor, args.size)
    parts = ", ".join(f"{split} {n}" for split, n in counts.items() if split != "total")
    print(f"wrote {counts['total']} images to {args.out} in {time.perf_counter() - start:.1f} s ({parts})")


if __name__ == "__main__":
    main()
