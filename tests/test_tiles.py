"""The grading viewer's Deep Zoom pyramids (engine/data/tiles.py): the layout OpenSeadragon reads,
native pixels, the red-free and contrast views, and the cache (reuse, eviction, atomic builds,
browser input, concurrency, the prefetcher)."""

import logging
import math
import os
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

import engine.data.tiles as tiles
from engine.data.images import ImageError
from engine.data.preprocess import PreprocessCache, PreprocessConfig, find_field, preprocess
from engine.data.synth import MESSIDOR_STYLE, draw_fundus, sample_lesions
from engine.data.tiles import (
    OVERLAP,
    TILE_SIZE,
    VIEWS,
    Prefetcher,
    Pyramids,
    TileCache,
    contrast,
    halve,
    input_box,
    photo_input_box,
    red_free,
    tile_key,
)

DZI_NS = "{http://schemas.microsoft.com/deepzoom/2008}"


def write_rgb(path: Path, rgb: np.ndarray, quality: int = 95) -> Path:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return path


def fundus(height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return draw_fundus(sample_lesions(2, rng), rng, height, MESSIDOR_STYLE)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[np.ndarray, Pyramids]:
    """A 1056 x 704 synthetic fundus (PNG, lossless) and its pyramids: 3 x 2 tiles on top."""
    root = tmp_path_factory.mktemp("tiles")
    rgb = fundus(704)
    return rgb, TileCache(root / "cache").pyramids(write_rgb(root / "eye.png", rgb))


def osd_tile_bounds(width: int, height: int, level: int, col: int, row: int) -> tuple[int, ...]:
    """OpenSeadragon's TileSource.getTileBounds(level, x, y, isSource) for a DZI of this size,
    in the level's pixels: its scaled size is fractional, a tile's is whole pixels of it."""
    max_level = math.ceil(math.log(max(width, height)) / math.log(2))
    scale = 1 / 2 ** (max_level - level)
    px = 0 if col == 0 else TILE_SIZE * col - OVERLAP
    py = 0 if row == 0 else TILE_SIZE * row - OVERLAP
    sx = min(TILE_SIZE + (1 if col == 0 else 2) * OVERLAP, width * scale - px)
    sy = min(TILE_SIZE + (1 if row == 0 else 2) * OVERLAP, height * scale - py)
    return px, py, px + math.ceil(sx), py + math.ceil(sy)


def read_tile(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def stitch(cache: TileCache, pyr: Pyramids, view: str, level: int) -> np.ndarray:
    """One level of a view from its tiles, each placed where OpenSeadragon puts it."""
    tiles_dir = pyr.folder / f"{view}_files" / str(level)
    names = sorted(path.name for path in tiles_dir.iterdir())
    cols = 1 + max(int(name.split("_")[0]) for name in names)
    rows = 1 + max(int(name.split("_")[1].split(".")[0]) for name in names)
    assert len(names) == cols * rows
    out = None
    for row in range(rows):
        for col in range(cols):
            x0, y0, x1, y1 = osd_tile_bounds(pyr.width, pyr.height, level, col, row)
            tile = read_tile(cache.tile_path(pyr.key, view, level, col, row))
            assert tile.shape[:2] == (y1 - y0, x1 - x0), (level, col, row)
            if out is None:
                width, height = tiles.level_size(pyr.width, pyr.height, level)
                out = np.zeros((height, width) + tile.shape[2:], np.uint8)
            out[y0:y1, x0:x1] = tile
    return out


# ---- the Deep Zoom layout --------------------------------------------------------------------


def test_levels_tiles_and_xml_follow_deep_zoom(built):
    rgb, pyr = built
    cache = TileCache(pyr.folder.parent)
    height, width = rgb.shape[:2]
    assert (pyr.width, pyr.height) == (width, height) == (1056, 704)
    assert pyr.max_level == 11  # 2**10 < 1056 <= 2**11
    for view in VIEWS:
        files = pyr.folder / f"{view}_files"
        assert sorted(int(p.name) for p in files.iterdir()) == list(range(12))
        for level in range(12):
            level_w = math.ceil(width / 2 ** (11 - level))
            level_h = math.ceil(height / 2 ** (11 - level))
            cols, rows = math.ceil(level_w / TILE_SIZE), math.ceil(level_h / TILE_SIZE)
            names = {p.name for p in (files / str(level)).iterdir()}
            assert names == {f"{c}_{r}.jpeg" for c in range(cols) for r in range(rows)}
            for col in range(cols):
                for row in range(rows):
                    x0, y0, x1, y1 = osd_tile_bounds(width, height, level, col, row)
                    tile = read_tile(files / str(level) / f"{col}_{row}.jpeg")
                    assert tile.shape[:2] == (y1 - y0, x1 - x0)
        root = ET.fromstring(cache.dzi_path(pyr.key, view).read_text())
        assert root.tag == f"{DZI_NS}Image"
        layout = root.get("Format"), root.get("Overlap"), root.get("TileSize")
        assert layout == ("jpeg", str(OVERLAP), str(TILE_SIZE))
        size = root.find(f"{DZI_NS}Size")
        assert (size.get("Width"), size.get("Height")) == ("1056", "704")
    # the top level: 3 x 2 tiles, inner edges one pixel wider on each side
    top = pyr.folder / "photo_files" / "11"
    assert read_tile(top / "0_0.jpeg").shape[:2] == (511, 511)
    assert read_tile(top / "1_0.jpeg").shape[:2] == (511, 512)
    assert read_tile(top / "2_1.jpeg").shape[:2] == (704 - 509, 1056 - 1019)


def test_top_level_tiles_are_the_photograph_s_own_pixels(tmp_path):
    """Blocky texture, where a shift of one pixel or a resampling shows at once."""
    rng = np.random.default_rng(1)
    # grey blocks on a fixed tint: JPEG keeps luminance at full resolution, colour at half
    blocks = rng.integers(0, 200, (240, 300, 1), dtype=np.uint8) + np.array([50, 20, 0], np.uint8)
    rgb = cv2.GaussianBlur(cv2.resize(blocks, (1200, 960), interpolation=cv2.INTER_NEAREST), (0, 0), 0.7)[
        :951, :1137
    ]
    cache = TileCache(tmp_path / "cache")
    pyr = cache.pyramids(write_rgb(tmp_path / "texture.png", rgb.copy()))
    bgr = rgb[..., ::-1].astype(int)
    for col in range(3):
        for row in range(2):  # each tile, its overlap included, against the photograph
            x0, y0, x1, y1 = osd_tile_bounds(1137, 951, pyr.max_level, col, row)
            tile = read_tile(cache.tile_path(pyr.key, "photo", pyr.max_level, col, row))
            error = np.abs(tile - bgr[y0:y1, x0:x1]).mean()
            shifted = np.abs(tile[:, 1:] - bgr[y0:y1, x0 : x1 - 1]).mean()
            assert error < 3 and shifted > 5 * error, (col, row, error, shifted)
    below = stitch(cache, pyr, "photo", pyr.max_level - 1)[..., ::-1].astype(int)
    assert below.shape[:2] == (476, 569)
    half = halve(rgb).astype(int)
    error = np.abs(below - half).mean()
    assert error < 4 and np.abs(below[:, 1:] - half[:, :-1]).mean() > 4 * error


def test_halve_averages_2x2_blocks_and_repeats_an_odd_edge():
    img = np.arange(15, dtype=np.uint8).reshape(3, 5) * 10
    out = halve(img)
    assert out.shape == (2, 3)
    assert out[0, 0] == round((0 + 10 + 50 + 60) / 4)
    assert out[0, 2] == round((40 + 90) / 2)  # the last column is repeated
    assert out[1, 0] == round((100 + 110) / 2)  # and the last row
    assert out[1, 2] == 140
    assert halve(np.zeros((1, 1, 3), np.uint8)).shape == (1, 1, 3)


# ---- the views -------------------------------------------------------------------------------


def field_mask(pyr: Pyramids, fraction: float) -> np.ndarray:
    """The pixels within `fraction` of the eye field's radius."""
    cx, cy, radius = pyr.field
    yy, xx = np.mgrid[: pyr.height, : pyr.width]
    return (xx - cx) ** 2 + (yy - cy) ** 2 < (fraction * radius) ** 2


def test_red_free_is_the_green_channel_stretched_inside_the_field(built):
    rgb, pyr = built
    cache = TileCache(pyr.folder.parent)
    grey = stitch(cache, pyr, "red-free", pyr.max_level)
    assert grey.ndim == 2  # one channel: a grey JPEG
    inside = field_mask(pyr, 1.0)
    values = grey[inside]
    assert np.percentile(values, 0.5) < 10 and np.percentile(values, 99.5) > 245
    with_green = np.corrcoef(values, rgb[..., 1][inside])[0, 1]
    assert with_green > 0.98 and with_green > np.corrcoef(values, rgb[..., 0][inside])[0, 1] + 0.05
    assert grey[~inside & (rgb.max(axis=2) < 10)].mean() < 5  # the black surround stays black


def test_red_free_maps_the_field_s_percentiles_to_black_and_white():
    rgb = np.zeros((200, 200, 3), np.uint8)
    rgb[..., 1] = np.linspace(60, 160, 200).astype(np.uint8)[None, :]
    rgb[..., 0] = 200
    rgb[:40] = rgb[160:] = 0  # a field cut flat at the top and bottom: black inside its circle
    grey = red_free(rgb, (99.5, 99.5, 141.0))
    assert grey.shape == (200, 200)
    assert grey[40:160, 0].max() == 0 and grey[40:160, -1].min() == 255
    assert np.all(np.diff(grey[100].astype(int)) >= 0)  # monotone in green
    assert 120 < grey[100, 100] < 135


def test_contrast_enhances_the_luminance_and_keeps_the_colour(built):
    rgb, pyr = built
    cache = TileCache(pyr.folder.parent)
    enhanced = stitch(cache, pyr, "contrast", pyr.max_level)[..., ::-1]
    photo = stitch(cache, pyr, "photo", pyr.max_level)[..., ::-1]
    inside = field_mask(pyr, 0.9)

    def lightness(img):
        return cv2.cvtColor(img, cv2.COLOR_RGB2Lab)[..., 0][inside].astype(float)

    assert lightness(enhanced).std() > 1.2 * lightness(photo).std()
    hue = cv2.cvtColor(enhanced, cv2.COLOR_RGB2HSV)[..., 0][inside].astype(float)
    photo_hue = cv2.cvtColor(photo, cv2.COLOR_RGB2HSV)[..., 0][inside].astype(float)
    assert abs(np.median(hue) - np.median(photo_hue)) < 5  # still orange-red, not grey


def test_contrast_touches_only_the_square_around_the_field():
    rgb = fundus(160)
    field = find_field(rgb)
    out = contrast(rgb, field)
    cx, _, radius = field
    left, right = round(cx + 0.5 - radius), round(cx + 0.5 + radius)
    assert np.array_equal(out[:, :left], rgb[:, :left])
    assert np.array_equal(out[:, right:], rgb[:, right:])
    assert np.abs(out[:, left:right].astype(int) - rgb[:, left:right]).mean() > 2
    assert not np.array_equal(contrast(rgb), rgb)  # without a field: the whole image


# ---- the cache -------------------------------------------------------------------------------


def mtimes(folder: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*.jpeg")}


def no_decode(*_args, **_kwargs):
    raise AssertionError("decoded again")


def test_a_cached_photograph_is_reused_without_decoding(tmp_path, monkeypatch):
    photo = write_rgb(tmp_path / "eye.jpg", fundus(120))
    first = TileCache(tmp_path / "cache").pyramids(photo)
    before = mtimes(first.folder)
    assert len(before) > 3 * 8
    monkeypatch.setattr(tiles, "load_rgb", no_decode)
    again = TileCache(tmp_path / "cache").pyramids(photo)  # as another process would
    assert again == first
    assert mtimes(first.folder) == before


def test_an_edited_file_gets_new_tiles(tmp_path):
    photo = write_rgb(tmp_path / "eye.png", fundus(120))
    cache = TileCache(tmp_path / "cache")
    old = cache.pyramids(photo)
    write_rgb(photo, fundus(100, seed=5))
    os.utime(photo, ns=(time.time_ns(), time.time_ns() + 10**9))
    new = cache.pyramids(photo)
    assert new.key != old.key and new.key == tile_key(photo)
    assert new.height == 100


def test_eviction_removes_the_least_recently_used_photographs(tmp_path):
    png = write_rgb(tmp_path / "a.png", fundus(100))
    photos = {}
    for name in "abc":  # the same pixels in three files: three pyramids of one size
        photos[name] = tmp_path / f"{name}.png"
        photos[name].write_bytes(png.read_bytes())
    probe = TileCache(tmp_path / "probe").pyramids(photos["a"])
    size = sum(path.stat().st_size for path in probe.folder.rglob("*.jpeg"))
    cache = TileCache(tmp_path / "cache", max_bytes=int(2.5 * size))
    a = cache.pyramids(photos["a"])
    b = cache.pyramids(photos["b"])
    assert cache.pyramids(photos["a"]) == a  # a is now used more recently than b
    c = cache.pyramids(photos["c"])
    assert a.folder.is_dir() and c.folder.is_dir()
    assert not b.folder.exists()
    assert cache.tile_path(b.key, "photo", 0, 0, 0) is None
    assert sorted(p.name for p in cache.root.iterdir()) == sorted([a.key, c.key])
    tight = TileCache(tmp_path / "cache", max_bytes=1)
    assert tight.pyramids(photos["b"]).folder.is_dir()  # the newest stays, even alone too big
    assert [p.name for p in cache.root.iterdir()] == [b.key]


def test_a_failed_build_leaves_nothing_to_serve(tmp_path, monkeypatch):
    photo = write_rgb(tmp_path / "eye.png", fundus(120))
    cache = TileCache(tmp_path / "cache")
    key = tile_key(photo)

    def broken(*_args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiles, "red_free", broken)  # after the photo view's tiles were queued
    with pytest.raises(RuntimeError, match="disk full"):
        cache.pyramids(photo)
    assert list(cache.root.iterdir()) == []
    assert cache.tile_path(key, "photo", 0, 0, 0) is None
    assert cache.dzi_path(key, "photo") is None
    monkeypatch.undo()
    assert cache.tile_path(key, "photo", 0, 0, 0) is None
    assert cache.pyramids(photo).key == key
    assert cache.tile_path(key, "red-free", 0, 0, 0) is not None


def test_a_build_left_by_a_dead_process_is_never_served_and_is_cleared(tmp_path):
    cache = TileCache(tmp_path / "cache")
    photo = write_rgb(tmp_path / "eye.png", fundus(100))
    key = tile_key(photo)
    dead = cache.root / f".build-{key}-x"
    (dead / "photo_files" / "0").mkdir(parents=True)
    (dead / "photo_files" / "0" / "0_0.jpeg").write_bytes(b"half")
    old = time.time() - 2 * tiles.STALE_BUILD_S
    os.utime(dead, (old, old))
    assert cache.tile_path(key, "photo", 0, 0, 0) is None
    cache.pyramids(photo)
    assert not dead.exists()
    assert read_tile(cache.tile_path(key, "photo", 0, 0, 0)).shape[:2] == (1, 1)


def test_unreadable_files_raise_image_error(tmp_path):
    cache = TileCache(tmp_path / "cache")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="unreadable"):
        cache.pyramids(text)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(write_rgb(tmp_path / "whole.jpg", fundus(100)).read_bytes()[:300])
    with pytest.raises(ImageError):
        cache.pyramids(truncated)
    with pytest.raises(ImageError, match="missing"):
        cache.pyramids(tmp_path / "gone.png")
    assert not cache.root.exists() or list(cache.root.iterdir()) == []


def test_tile_path_rejects_what_a_browser_may_send(built):
    _, pyr = built
    cache = TileCache(pyr.folder.parent)
    good = cache.tile_path(pyr.key, "photo", 11, 2, 1)
    assert good == pyr.folder / "photo_files" / "11" / "2_1.jpeg" and good.is_file()
    key = pyr.key
    bad_places = [
        (11, 3, 0),
        (12, 0, 0),
        (-1, 0, 0),
        ("11", 0, 0),
        (11.0, 0, 0),
        (True, 0, 0),
        (11, 0, 10**30),
        (11, "0/../1", 0),
        (None, 0, 0),
    ]
    for level, col, row in bad_places:
        assert cache.tile_path(key, "photo", level, col, row) is None, (level, col, row)
    for view in ("../photo", "photo/..", "grey", "", ["photo"], None):
        assert cache.tile_path(key, view, 0, 0, 0) is None, view
    for other in ("../" + key, key.upper(), key + "/..", "0" * 32, ".build-" + key, "", None):
        assert cache.tile_path(other, "photo", 0, 0, 0) is None, other
    assert cache.dzi_path(pyr.key, "contrast") == pyr.dzi("contrast")
    assert cache.dzi_path(pyr.key, "../photo") is None
    assert cache.dzi_path("0" * 32, "photo") is None


def counting_decoder(monkeypatch, gate: threading.Event | None = None) -> list[Path]:
    """Replace the decode with one that records its calls and waits for `gate`."""
    calls, real = [], tiles.load_rgb

    def decode(path, *args):
        calls.append(path)
        if gate is not None:
            assert gate.wait(10)
        return real(path, *args)

    monkeypatch.setattr(tiles, "load_rgb", decode)
    return calls


def test_concurrent_requests_for_one_photograph_build_it_once(tmp_path, monkeypatch):
    photo = write_rgb(tmp_path / "eye.png", fundus(120))
    cache = TileCache(tmp_path / "cache")
    gate = threading.Event()
    calls = counting_decoder(monkeypatch, gate)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(cache.pyramids, photo) for _ in range(4)]
        time.sleep(0.2)  # all four are waiting by now
        gate.set()
        results = {future.result() for future in futures}
    assert len(calls) == 1 and len(results) == 1


def test_the_prefetcher_prepares_a_card_once_in_its_own_process(tmp_path):
    photo = write_rgb(tmp_path / "eye.jpg", fundus(300))
    cfg = PreprocessConfig(size=64)
    prefetcher = Prefetcher()
    futures = [
        prefetcher.submit(tmp_path / "." / "eye.jpg", tmp_path / "tiles", tmp_path / "cache", cfg)
        for _ in range(3)
    ]
    assert futures[0] is futures[1] is futures[2]  # asked again while under way: not again
    prefetcher.wait(photo)
    assert futures[0].result(60) == pytest.approx(photo_input_box(photo, cfg))
    cache = TileCache(tmp_path / "tiles")
    assert cache.tile_path(tile_key(photo), "contrast", 0, 0, 0) is not None
    assert PreprocessCache(tmp_path / "cache").entry(photo, cfg).is_file()
    time.sleep(0.2)  # the done callback runs on the pool's thread
    again = prefetcher.submit(photo, tmp_path / "tiles", tmp_path / "cache", cfg)
    assert again is not futures[0] and again.result(60) == futures[0].result()  # done: anew


def test_a_failed_prefetch_is_logged(tmp_path, caplog):
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="engine.data.tiles"):
        future = Prefetcher().submit(
            broken, tmp_path / "tiles", tmp_path / "cache", PreprocessConfig(size=64)
        )
        with pytest.raises(ImageError):
            future.result(60)
        time.sleep(0.2)  # the done callback runs on the pool's thread
    assert "not prepared ahead" in caplog.text and "unreadable" in caplog.text


# ---- where the model's input lies on the photograph -----------------------------------------


FIELD_COLOUR = (200, 90, 40)


def dot_photo(
    width: int, height: int, field: tuple[int, int, int], dot: tuple[int, int], dot_radius: int
) -> np.ndarray:
    """An orange field on black with a dot that differs from the field in blue alone, so that
    the blue above the field's is linear in how much of a pixel the dot covers."""
    rgb = np.zeros((height, width, 3), np.uint8)
    cv2.circle(rgb, field[:2], field[2], FIELD_COLOUR, -1)
    cv2.circle(rgb, dot, dot_radius, FIELD_COLOUR[:2] + (240,), -1)
    return rgb


def dot_centre(img: np.ndarray) -> tuple[float, float]:
    """The centre of the dot, in pixel edges (pixel i spans [i, i + 1))."""
    signal = img[..., 2].astype(float) - FIELD_COLOUR[2]
    signal[signal < 20] = 0  # the black surround, and JPEG's noise
    ys, xs = np.mgrid[: img.shape[0], : img.shape[1]]
    return (xs * signal).sum() / signal.sum() + 0.5, (ys * signal).sum() / signal.sum() + 0.5


@pytest.mark.parametrize(
    "cfg",
    [
        PreprocessConfig(128, crop=True, enhance=False, mask=False),
        PreprocessConfig(128, crop=False, enhance=False, mask=False, center_crop=True),
        PreprocessConfig(128, crop=False, enhance=False, mask=False),
    ],
    ids=["crop", "center-crop", "squeeze"],
)
def test_input_box_says_where_the_model_input_lies(cfg):
    # the field reaches past the top edge, so the crop square does too
    rgb = dot_photo(500, 330, (230, 140, 150), (290, 190), 8)
    box = input_box(500, 330, find_field(rgb), cfg)
    u, v = dot_centre(preprocess(rgb, cfg))
    x, y = box[0] + u * box[2] / cfg.size, box[1] + v * box[3] / cfg.size
    # a quarter of an input pixel: a box off by one photograph pixel fails
    assert abs(x - 290.5) < 0.25 * box[2] / cfg.size, (box, x)
    assert abs(y - 190.5) < 0.25 * box[3] / cfg.size, (box, y)
    if cfg.crop:
        assert box[1] < 0 and box[2] == box[3] == 301


def test_photo_input_box_follows_a_reduced_jpeg_decode(tmp_path):
    cfg = PreprocessConfig(64, enhance=False, mask=False)
    rgb = dot_photo(1200, 900, (640, 450, 420), (800, 300), 30)
    photo = write_rgb(tmp_path / "eye.jpg", rgb)
    assert tiles.decode_for(photo, cfg).shape[:2] == (113, 150)  # 1/8, rounded up
    box = photo_input_box(photo, cfg)
    u, v = dot_centre(preprocess(tiles.decode_for(photo, cfg), cfg))
    x, y = box[0] + u * box[2] / cfg.size, box[1] + v * box[3] / cfg.size
    assert abs(x - 800.5) < 2 and abs(y - 300.5) < 2, (box, x, y)  # 1/4 of a decoded pixel
    assert abs(box[2] - 841) <= 8
