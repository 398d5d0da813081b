"""Deep Zoom tile pyramids of a fundus photograph, for the review card's zoomable viewer.

Grade 1 against 0 is decided on microaneurysms of 2-20 pixels, at native resolution, in the
red-free view and with contrast enhancement (DESIGN.md, "What a grader needs to see"). The
browser's viewer (OpenSeadragon) therefore shows the photograph at its own pixels and beyond, in
three views of the same pixels that keep zoom and position when switched (VIEWS). Each view is a
standard Deep Zoom (DZI) pyramid, which OpenSeadragon reads unchanged: `<view>.dzi` and
`<view>_files/<level>/<col>_<row>.jpeg`, where level `max_level` is the photograph's own size and
each level below is half the one above, rounded up.

TileCache keeps the pyramids of each photograph in one folder named by the file's identity (so an
edited file gets new tiles). A photograph's views are made from one decode, in a temporary folder
that is renamed into place when whole: a crash never leaves half a pyramid to serve. Past a size
cap, whole photographs are evicted least recently used. Levels are halved with INTER_AREA and
the tiles JPEG-encoded on a small thread pool, since OpenCV releases the GIL.
"""

import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from engine.data.images import load_rgb
from engine.data.preprocess import (
    FIELD_THRESHOLD,
    PreprocessCache,
    PreprocessConfig,
    cache_digest,
    decode_for,
    file_identity,
    find_field,
)

VIEWS = ("photo", "red-free", "contrast")
# 512-px tiles with their overlap: a screen at native pixels needs 4-9 of them per view.
TILE_SIZE = 510
OVERLAP = 1
FORMAT = "jpeg"
JPEG_QUALITY = 88
# Bump when the tiles' pixels or layout change, so that pyramids made by the old code miss.
TILES_VERSION = 1
# Red-free: these percentiles of the green values inside the eye field become black and white.
RED_FREE_PERCENTILES = (0.5, 99.5)
HISTOGRAM_SAMPLES = 1_000_000
CLAHE_CLIP = 2.0
CLAHE_GRID = (8, 8)
ENCODE_THREADS = 2
MANIFEST = "pyramid.json"
BUILD_PREFIX = ".build-"
EVICT_PREFIX = ".evict-"
# A build folder this old was left by a process that died while building.
STALE_BUILD_S = 3600
# Far above any real level or tile index (a 50-Mpx photograph has 15 levels, 36 tiles a row).
MAX_INDEX = 100_000
_KEY = re.compile(r"[0-9a-f]{32}")

log = logging.getLogger(__name__)


# ---- geometry --------------------------------------------------------------------------------


def max_level(width: int, height: int) -> int:
    """ceil(log2(max(width, height))), exactly: the level where the photograph has its own size."""
    return (max(width, height) - 1).bit_length()


def level_size(width: int, height: int, level: int) -> tuple[int, int]:
    """(width, height) of `level`: the full size divided by 2**(max_level - level), rounded up."""
    shift = max_level(width, height) - level
    return (width + (1 << shift) - 1) >> shift, (height + (1 << shift) - 1) >> shift


def tile_counts(level_width: int, level_height: int) -> tuple[int, int]:
    """(columns, rows) of tiles of a level of this size."""
    return -(-level_width // TILE_SIZE), -(-level_height // TILE_SIZE)


def tile_bounds(level_width: int, level_height: int, col: int, row: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a tile in its level's pixels: the TILE_SIZE cell plus OVERLAP pixels
    on each inner edge (OpenSeadragon's TileSource.getTileBounds)."""
    x0, y0 = max(col * TILE_SIZE - OVERLAP, 0), max(row * TILE_SIZE - OVERLAP, 0)
    x1 = min((col + 1) * TILE_SIZE + OVERLAP, level_width)
    y1 = min((row + 1) * TILE_SIZE + OVERLAP, level_height)
    return x0, y0, x1, y1


def dzi_xml(width: int, height: int) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
        f'Format="{FORMAT}" Overlap="{OVERLAP}" TileSize="{TILE_SIZE}">'
        f'<Size Width="{width}" Height="{height}"/></Image>\n'
    )


def input_box(
    width: int, height: int, field: tuple[float, float, float], cfg: PreprocessConfig
) -> tuple[float, float, float, float]:
    """(x, y, w, h) in pixels of an image `width` x `height` (pixel i spans [i, i + 1)) of the
    part that engine.data.preprocess.preprocess(img, cfg) turns into its output square; `field` is
    find_field(img). With cfg.crop the box may reach past the image, where the input is black.

    Mirrors preprocess's _square_crop and _center_square (tests/test_tiles.py checks a dot)."""
    if cfg.crop:
        cx, cy, radius = field
        side = max(1, round(2 * radius))
        return (
            float(round(cx + 0.5 - side / 2)),
            float(round(cy + 0.5 - side / 2)),
            float(side),
            float(side),
        )
    if cfg.center_crop:
        size = cfg.size
        scale = size / min(height, width)
        resized_w, resized_h = max(size, int(width * scale)), max(size, int(height * scale))
        left, top = round((resized_w - size) / 2), round((resized_h - size) / 2)
        sx, sy = width / resized_w, height / resized_h
        return left * sx, top * sy, size * sx, size * sy
    return 0.0, 0.0, float(width), float(height)


def photo_input_box(photo: Path, cfg: PreprocessConfig) -> tuple[float, float, float, float]:
    """input_box of the file at `photo` as the pipeline reads it, in the photograph's own pixels.

    engine.data.preprocess.decode_for may decode a JPEG at 1/2, 1/4 or 1/8 of its size (libjpeg
    rounds the reduced size up), so the box is found there and scaled by that factor."""
    img = decode_for(photo, cfg)
    with Image.open(photo) as header:
        full_side = max(header.size)  # the longer side: OpenCV turns a photo its EXIF rotates
    height, width = img.shape[:2]
    factor = round(full_side / max(height, width))
    return tuple(v * factor for v in input_box(width, height, find_field(img), cfg))


# ---- views -----------------------------------------------------------------------------------


def red_free(img: np.ndarray, field: tuple[float, float, float]) -> np.ndarray:
    """The green channel (index 1 in RGB and BGR alike) as grey, RED_FREE_PERCENTILES of its
    values inside the eye field `field` (cx, cy, radius) stretched to 0-255."""
    green = cv2.extractChannel(img, 1)
    counts = _field_histogram(img, field)
    share = np.cumsum(counts) / max(counts.sum(), 1) * 100
    low, high = (int(np.searchsorted(share, p)) for p in RED_FREE_PERCENTILES)
    high = max(high, low + 1)
    lut = np.clip((np.arange(256) - low) * 255 / (high - low), 0, 255).round().astype(np.uint8)
    return cv2.LUT(green, lut)


def _field_histogram(img: np.ndarray, field: tuple[float, float, float]) -> np.ndarray:
    """Counts of the green values of lit pixels inside the field's circle, from about
    HISTOGRAM_SAMPLES pixels of an even grid (plenty for a percentile). Lit, because the circle
    found is a pixel off here and there, and a cut field is black at the top and bottom: the
    black would take the lowest percentiles."""
    step = max(1, math.isqrt(img.shape[0] * img.shape[1] // HISTOGRAM_SAMPLES))
    sample = np.ascontiguousarray(img[::step, ::step])
    channels = cv2.split(sample)
    lit = cv2.max(cv2.max(channels[0], channels[1]), channels[2]) > FIELD_THRESHOLD
    inside = np.zeros(lit.shape, np.uint8)
    cx, cy, radius = field
    cv2.circle(inside, (round(cx / step), round(cy / step)), max(1, round(radius / step)), 1, -1)
    mask = (inside.astype(bool) & lit).astype(np.uint8)
    if not mask.any():
        mask[:] = 1
    return cv2.calcHist([channels[1]], [0], mask, [256], [0, 256]).ravel()


def contrast(rgb: np.ndarray, field: tuple[float, float, float] | None = None) -> np.ndarray:
    """CLAHE on the luminance (L of Lab) of an RGB image, colour kept; RGB out. With the eye
    `field` (cx, cy, radius), only the square around it is enhanced (and CLAHE's grid laid on
    it): the black beyond needs none, and a 3:2 photograph's field square is 2/3 of it."""
    return _contrast(rgb, field, cv2.COLOR_RGB2Lab, cv2.COLOR_Lab2RGB)


def _contrast(
    img: np.ndarray, field: tuple[float, float, float] | None, to_lab: int, from_lab: int
) -> np.ndarray:
    height, width = img.shape[:2]
    x0, y0, x1, y1 = 0, 0, width, height
    if field is not None:
        cx, cy, radius = field
        x0, y0 = max(0, round(cx + 0.5 - radius)), max(0, round(cy + 0.5 - radius))
        x1, y1 = min(width, round(cx + 0.5 + radius)), min(height, round(cy + 0.5 + radius))
    out = img.copy()
    if x1 - x0 < 2 or y1 - y0 < 2:
        return out
    lab = cv2.cvtColor(img[y0:y1, x0:x1], to_lab)
    clahe = cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=CLAHE_GRID)
    cv2.insertChannel(clahe.apply(cv2.extractChannel(lab, 0)), lab, 0)
    cv2.cvtColor(lab, from_lab, dst=out[y0:y1, x0:x1])  # writes into the view, no copy
    return out


def _views_bgr(rgb: np.ndarray, field: tuple[float, float, float]) -> Iterator[tuple[str, np.ndarray]]:
    """Each view at full resolution as cv2.imencode takes it (BGR or grey), made only when
    asked for, so that the photo view's tiles are encoding while the next view is computed."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    yield "photo", bgr
    yield "red-free", red_free(bgr, field)
    yield "contrast", _contrast(bgr, field, cv2.COLOR_BGR2Lab, cv2.COLOR_Lab2BGR)


# ---- pyramids --------------------------------------------------------------------------------


def halve(img: np.ndarray) -> np.ndarray:
    """The next level down: each pixel the mean of a 2x2 block; an odd last row or column is
    repeated first, so that pixel i still covers 2i and 2i + 1 (the size rounds up)."""
    height, width = img.shape[:2]
    if width % 2 or height % 2:
        img = cv2.copyMakeBorder(img, 0, height % 2, 0, width % 2, cv2.BORDER_REPLICATE)
    return cv2.resize(img, ((width + 1) // 2, (height + 1) // 2), interpolation=cv2.INTER_AREA)


def _write_tile(path: Path, tile: np.ndarray) -> int:
    ok, data = cv2.imencode(f".{FORMAT}", tile, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(data.tobytes())
    return data.size


def write_pyramid(img: np.ndarray, folder: Path, view: str, pool: ThreadPoolExecutor) -> list[Future[int]]:
    """Queue the tiles of every level of `img` (BGR or grey) on `pool`, top level first;
    returns the futures of their byte sizes."""
    height, width = img.shape[:2]
    (folder / f"{view}.dzi").write_text(dzi_xml(width, height))
    futures = []
    for level in range(max_level(width, height), -1, -1):
        level_dir = folder / f"{view}_files" / str(level)
        level_dir.mkdir(parents=True)
        level_h, level_w = img.shape[:2]
        cols, rows = tile_counts(level_w, level_h)
        for row in range(rows):
            for col in range(cols):
                x0, y0, x1, y1 = tile_bounds(level_w, level_h, col, row)
                futures.append(
                    pool.submit(_write_tile, level_dir / f"{col}_{row}.{FORMAT}", img[y0:y1, x0:x1])
                )
        if level:
            img = halve(img)
    return futures


def write_views(rgb: np.ndarray, folder: Path, field: tuple[float, float, float]) -> int:
    """Every view's pyramid of the RGB photograph in `folder`; returns the bytes written."""
    pool = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="tile-encode")
    try:
        futures = []
        for view, img in _views_bgr(rgb, field):
            futures += write_pyramid(img, folder, view, pool)
        return sum(future.result() for future in futures)
    finally:
        pool.shutdown(cancel_futures=True)


@dataclass(frozen=True)
class Pyramids:
    """Where the pyramids of one photograph are: `folder`/<view>.dzi and <view>_files/."""

    key: str
    width: int
    height: int
    folder: Path
    # The eye field (cx, cy, radius) in the photograph's pixels, from engine.data.preprocess.find_field.
    field: tuple[float, float, float]

    @property
    def max_level(self) -> int:
        return max_level(self.width, self.height)

    def dzi(self, view: str) -> Path:
        return self.folder / f"{view}.dzi"


def tile_key(photo: Path) -> str:
    """The cache key of the photograph at `photo`: a changed file gets another."""
    layout = f"tiles-v{TILES_VERSION}-{TILE_SIZE}-{OVERLAP}-{FORMAT}{JPEG_QUALITY}"
    return cache_digest(file_identity(Path(photo)), layout)


class TileCache:
    """The pyramids of each photograph under `root`, one folder per photograph, made once and
    reused by every process that opens the same root, evicted least recently used past
    `max_bytes`.

    Each folder holds MANIFEST (size, eye field and byte count), whose modification time is the
    photograph's last use: eviction reads one small file per photograph, not every tile. Two
    processes that miss the same photograph at once both build it; the first rename wins.
    """

    def __init__(self, root: Path, max_bytes: int = 2 * 2**30) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._guard = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}

    def pyramids(self, photo: Path) -> Pyramids:
        """The pyramids of the photograph at `photo`, built from one decode on a miss; marks
        them used. Raises ImageError (with the reason in words) for an unreadable file."""
        key = tile_key(photo)
        with self._lock(key):
            found = self._open(key)
            if found is None:
                found = self._build(Path(photo), key)
                self._evict(keep=key)
        return found

    def tile_path(self, key: str, view: str, level: int, col: int, row: int) -> Path | None:
        """The file of one tile, or None for a key, view, level or tile that does not exist.
        Safe on a browser's input: only a path inside a photograph's folder is ever made."""
        if not (self._valid(key, view) and all(map(_is_index, (level, col, row)))):
            return None
        path = self.root / key / f"{view}_files" / str(level) / f"{col}_{row}.{FORMAT}"
        return path if path.is_file() else None

    def dzi_path(self, key: str, view: str) -> Path | None:
        """The `<view>.dzi` file of a photograph's pyramid, or None, as tile_path."""
        if not self._valid(key, view):
            return None
        path = self.root / key / f"{view}.dzi"
        return path if path.is_file() else None

    # ---- inside ------------------------------------------------------------------------------

    def _lock(self, key: str) -> threading.Lock:
        # One lock per photograph ever asked for: a few bytes each, so they are never dropped.
        with self._guard:
            return self._key_locks.setdefault(key, threading.Lock())

    @staticmethod
    def _valid(key: object, view: object) -> bool:
        return isinstance(key, str) and _KEY.fullmatch(key) is not None and view in VIEWS

    def _open(self, key: str) -> Pyramids | None:
        """The cached pyramids of `key`, marked used now; None if there are none."""
        manifest = self.root / key / MANIFEST
        try:
            info = json.loads(manifest.read_text())
            now = time.time_ns()
            os.utime(manifest, ns=(now, now))
        except (OSError, ValueError):
            return None
        return Pyramids(key, info["width"], info["height"], manifest.parent, tuple(info["field"]))

    def _build(self, photo: Path, key: str) -> Pyramids:
        rgb = load_rgb(photo)
        height, width = rgb.shape[:2]
        field = find_field(rgb)
        self.root.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f"{BUILD_PREFIX}{key}-", dir=self.root))
        try:
            size = write_views(rgb, build, field)
            info = {
                "width": width,
                "height": height,
                "field": list(field),
                "bytes": size,
                "source": str(photo),
            }
            (build / MANIFEST).write_text(json.dumps(info))
            _publish(build, self.root / key)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        found = self._open(key)
        if found is None:
            raise OSError(f"tiles of {photo} vanished from {self.root} as they were written")
        return found

    def _evict(self, keep: str) -> None:
        """Remove the least recently used photographs but `keep` until the rest fit max_bytes;
        clear what dead builds and evictions left."""
        entries, total = [], 0
        for child in self.root.iterdir():
            if _KEY.fullmatch(child.name):
                try:
                    used = (child / MANIFEST).stat().st_mtime_ns
                    size = json.loads((child / MANIFEST).read_text())["bytes"]
                except (OSError, ValueError, KeyError):
                    continue  # being evicted by another thread or process
                entries.append((used, size, child))
                total += size
            elif child.name.startswith(EVICT_PREFIX) or (
                child.name.startswith(BUILD_PREFIX) and _age_s(child) > STALE_BUILD_S
            ):
                shutil.rmtree(child, ignore_errors=True)
        for _, size, child in sorted(entries):
            if total <= self.max_bytes:
                break
            if child.name != keep:
                _remove(child)
                total -= size


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INDEX


def _publish(build: Path, target: Path) -> None:
    """Rename the finished `build` folder to `target`, unless another process got there first."""
    try:
        build.rename(target)
    except OSError:
        if not (target / MANIFEST).is_file():
            raise


def _remove(folder: Path) -> None:
    """Take `folder` out of use at once (a rename), then delete it."""
    doomed = folder.with_name(f"{EVICT_PREFIX}{folder.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        folder.rename(doomed)
    except OSError:
        return  # gone already
    shutil.rmtree(doomed, ignore_errors=True)


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


# ---- made ahead, while the reviewer grades the card before ----------------------------------


def prepare(
    photo: Path, tiles: Path, cache: Path, cfg: PreprocessConfig
) -> tuple[float, float, float, float]:
    """What a card of `photo` shows, made ahead: its pyramids under `tiles`, the model's input
    that `cfg` cuts (in the preprocessing cache under `cache`), and where that input lies in the
    photograph (photo_input_box), which is returned."""
    TileCache(tiles).pyramids(photo)
    PreprocessCache(cache).load(photo, cfg)
    return photo_input_box(photo, cfg)


class Prefetcher:
    """prepare() on a process of its own at the lowest CPU priority, one photograph at a time.

    A process, not a thread: building a pyramid runs Python between the OpenCV calls, and on
    the server's interpreter that holds up every reply that waits for the GIL (tiles took
    0.5 s instead of 5 ms while a thread built the next photograph). A photograph already
    asked for is not asked again; its Future is returned instead."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._pending: dict[Path, Future] = {}
        self._guard = threading.Lock()

    def submit(self, photo: Path, tiles: Path, cache: Path, cfg: PreprocessConfig) -> Future:
        photo = Path(photo).resolve()
        with self._guard:
            if photo in self._pending:
                return self._pending[photo]
            if self._pool is None:
                self._pool = ProcessPoolExecutor(1, get_context("spawn"), initializer=os.nice, initargs=(19,))
            future = self._pool.submit(prepare, photo, tiles, cache, cfg)
            self._pending[photo] = future
        future.add_done_callback(lambda done: self._finished(photo, done))
        return future

    def wait(self, photo: Path) -> None:
        """Until a prepare() of `photo` under way has ended, so that its caller does not make
        the same pyramids a second time."""
        with self._guard:
            future = self._pending.get(Path(photo).resolve())
        if future is not None:
            wait([future])

    def _finished(self, photo: Path, future: Future) -> None:
        with self._guard:
            self._pending.pop(photo, None)
        if future.exception() is not None:  # the card says why, in words, when it comes
            log.warning("%s not prepared ahead: %s", photo, future.exception())
