"""Preprocessing a real fundus photograph (scikit-image's retina), placed and cut as cameras do."""

import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

import engine.data.preprocess as pp
from engine.data.images import load_rgb
from engine.data.preprocess import (
    PreprocessCache,
    PreprocessConfig,
    apply_mask,
    crop_to_eye,
    enhance,
    find_field,
    load_preprocessed,
    preprocess,
    preprocess_file,
)

REPO = Path(__file__).resolve().parents[1]
PHOTO_SIDE = 900
OFFSET_X, OFFSET_Y = 300, 150
CUT = 0.12


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return cv2.resize(data.retina(), (PHOTO_SIDE, PHOTO_SIDE), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def truth(photo) -> tuple[float, float, float]:
    """The photo's field circle by another method than find_field's: centroid and area."""
    ys, xs = np.nonzero(photo.max(axis=2) > 30)
    return xs.mean(), ys.mean(), np.sqrt(len(xs) / np.pi)


def on_canvas(photo: np.ndarray) -> np.ndarray:
    canvas = np.zeros((1300, 1600, 3), np.uint8)
    canvas[OFFSET_Y : OFFSET_Y + PHOTO_SIDE, OFFSET_X : OFFSET_X + PHOTO_SIDE] = photo
    return canvas


def cut_flat(img: np.ndarray, truth) -> np.ndarray:
    """Black out the top and bottom CUT share of the field's rows, as some cameras do."""
    _, cy, r = truth
    cy += OFFSET_Y
    out = img.copy()
    out[: round(cy - r + CUT * 2 * r)] = 0
    out[round(cy + r - CUT * 2 * r) :] = 0
    return out


def assert_circle(found, expected, tolerance=0.03):
    (cx, cy, r), (ex, ey, er) = found, expected
    assert abs(r - er) <= tolerance * er, (found, expected)
    assert abs(cx - ex) <= tolerance * er, (found, expected)
    assert abs(cy - ey) <= tolerance * er, (found, expected)


def shifted(truth):
    return truth[0] + OFFSET_X, truth[1] + OFFSET_Y, truth[2]


def test_find_field_off_centre(photo, truth):
    assert_circle(find_field(on_canvas(photo)), shifted(truth))


def test_find_field_cut_flat_top_and_bottom(photo, truth):
    img = cut_flat(on_canvas(photo), truth)
    assert np.count_nonzero(img.max(axis=(1, 2))) < 0.8 * 2 * truth[2]  # really cut
    assert_circle(find_field(img), shifted(truth))


def test_find_field_cut_at_the_sides(photo, truth):
    cx, cy, r = find_field(cut_flat(on_canvas(photo), truth).transpose(1, 0, 2))
    assert_circle((cy, cx, r), shifted(truth))


def test_find_field_falls_back_to_whole_image():
    assert find_field(np.zeros((100, 200, 3), np.uint8)) == (99.5, 49.5, 100.0)


def test_crop_is_square_and_centred(photo, truth):
    crop = crop_to_eye(on_canvas(photo))
    side = crop.shape[0]
    assert crop.shape == (side, side, 3)
    assert abs(side - 2 * truth[2]) <= 0.03 * truth[2]
    assert_circle(find_field(crop), ((side - 1) / 2, (side - 1) / 2, side / 2), tolerance=0.01)


def test_crop_pads_a_field_cut_by_the_image_border(photo, truth):
    cut = cut_flat(on_canvas(photo), truth)
    rows = np.flatnonzero(cut.max(axis=(1, 2)))
    tight = cut[rows[0] : rows[-1] + 1]  # the flat cuts are now the image's own edges
    crop = crop_to_eye(tight)
    side = crop.shape[0]
    assert crop.shape == (side, side, 3) and side > tight.shape[0]
    assert abs(side - 2 * truth[2]) <= 0.03 * truth[2]
    assert not crop[:5].any() and not crop[-5:].any()  # black padding above and below
    assert_circle(find_field(crop), ((side - 1) / 2, (side - 1) / 2, side / 2), tolerance=0.01)


@pytest.mark.parametrize("crop", [True, False])
@pytest.mark.parametrize("enhanced", [True, False])
@pytest.mark.parametrize("mask", [True, False])
def test_preprocess_shape_and_dtype(photo, crop, enhanced, mask):
    cfg = PreprocessConfig(size=96, crop=crop, enhance=enhanced, mask=mask)
    out = preprocess(on_canvas(photo), cfg)
    assert out.shape == (96, 96, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("enhanced, fill", [(True, 128), (False, 0)])
def test_mask_makes_corners_uniform(photo, enhanced, fill):
    out = preprocess(on_canvas(photo), PreprocessConfig(size=128, enhance=enhanced))
    corners = np.concatenate([out[:12, :12], out[:12, -12:], out[-12:, :12], out[-12:, -12:]])
    assert (corners == fill).all()
    assert out[64, 64].any()  # the middle of the eye is kept


def test_mask_keeps_the_given_circle():
    img = np.full((50, 80, 3), 200, np.uint8)
    out = apply_mask(img, 0.5, fill=7, field=(20.0, 25.0, 20.0))
    assert (out[25, 20] == 200).all() and (out[25, 31] == 7).all() and (out[25, 29] == 200).all()


def test_enhancement_centres_the_field_on_grey(photo):
    crop = cv2.resize(crop_to_eye(on_canvas(photo)), (256, 256), interpolation=cv2.INTER_AREA)
    out = apply_mask(enhance(crop, 128.0), fill=128)
    assert abs(out.mean() - 128) < 6
    assert out.std() > 5  # detail survives: not a flat grey image


def test_config_round_trip_and_key():
    cfg = PreprocessConfig(size=300, mask=False)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.key() != PreprocessConfig(size=300).key() != PreprocessConfig().key()
    assert cfg.key() == PreprocessConfig(size=300, mask=False).key()
    with pytest.raises(ValueError):
        PreprocessConfig(size=0)


@pytest.fixture
def photo_file(tmp_path, photo) -> Path:
    path = tmp_path / "eye.png"
    cv2.imwrite(str(path), cv2.cvtColor(on_canvas(photo), cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture
def decodes(monkeypatch) -> list[Path]:
    """Every source decode the preprocess module makes, by path."""
    calls: list[Path] = []
    real = pp.load_rgb

    def counting(path, **kwargs):
        calls.append(path)
        return real(path, **kwargs)

    monkeypatch.setattr(pp, "load_rgb", counting)
    return calls


def test_cache_hit_does_not_decode(tmp_path, photo_file, decodes):
    cache = PreprocessCache(tmp_path / "cache")
    cfg = PreprocessConfig(size=128)
    first = cache.load(photo_file, cfg)
    second = cache.load(photo_file, cfg)
    assert len(decodes) == 1
    assert np.array_equal(first, second)
    assert np.array_equal(first, load_preprocessed(photo_file, cfg, cache=None))
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_cache_misses_on_touched_file_or_new_config(tmp_path, photo_file, decodes):
    cache = PreprocessCache(tmp_path / "cache")
    cfg = PreprocessConfig(size=128)
    cache.load(photo_file, cfg)
    stat = photo_file.stat()
    os.utime(photo_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    cache.load(photo_file, cfg)
    assert len(decodes) == 2
    other = cache.load(photo_file, PreprocessConfig(size=128, enhance=False))
    assert len(decodes) == 3 and other.shape == (128, 128, 3)


def test_cache_recovers_from_a_damaged_entry(tmp_path, photo_file, decodes):
    cache = PreprocessCache(tmp_path / "cache")
    cfg = PreprocessConfig(size=64)
    good = cache.load(photo_file, cfg)
    cache.entry(photo_file, cfg).write_bytes(b"not an array")
    assert np.array_equal(cache.load(photo_file, cfg), good)
    assert np.array_equal(cache.load(photo_file, cfg), good)
    assert len(decodes) == 2


def test_reduced_jpeg_decoding_changes_only_resampling_noise(tmp_path, photo_file):
    """A large JPEG is decoded at 1/2 or 1/4 of its size when its shorter side stays
    DECODE_MARGIN x the output size. The output then differs from the full decode's by at most
    3 grey levels (of 255) on average, by no more than after an area resize of the full decode
    to the same size (+0.25), and by at most 0.5 in mean brightness."""
    side = 1800
    big = cv2.resize(data.retina(), (side, side), interpolation=cv2.INTER_CUBIC)
    path = tmp_path / "eye.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(big, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    full = load_rgb(path)
    for size, factor in ((448, 2), (256, 4)):
        cfg = PreprocessConfig(size=size)
        reduced = load_rgb(path, min_side=math.ceil(pp.DECODE_MARGIN * size))
        assert reduced.shape == (side // factor, side // factor, 3)
        expected = preprocess(full, cfg).astype(int)
        diff = preprocess_file(path, cfg).astype(int) - expected
        area = cv2.resize(full, reduced.shape[1::-1], interpolation=cv2.INTER_AREA)
        resampled = np.abs(preprocess(area, cfg).astype(int) - expected).mean()
        assert np.abs(diff).mean() <= min(3, resampled + 0.25), (size, np.abs(diff).mean())
        assert abs(diff.mean()) <= 0.5
    assert load_rgb(photo_file, min_side=100).shape == (1300, 1600, 3)  # a PNG: always whole


def test_cache_pickles_and_reports_missing_source(tmp_path):
    cache = pickle.loads(pickle.dumps(PreprocessCache(tmp_path / "cache")))
    assert cache.root == tmp_path / "cache"
    with pytest.raises(pp.ImageError, match="missing"):
        cache.load(tmp_path / "nope.png", PreprocessConfig())


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.data.preprocess", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_keeps_tree_and_skips_bad_files(tmp_path, photo):
    src, dst = tmp_path / "in", tmp_path / "out"
    small = cv2.cvtColor(cv2.resize(photo, (300, 300)), cv2.COLOR_RGB2BGR)
    (src / "train" / "0").mkdir(parents=True)
    cv2.imwrite(str(src / "train" / "0" / "a.png"), small)
    cv2.imwrite(str(src / "train" / "b.jpg"), small)
    cv2.imwrite(str(src / "c.tif"), small)
    (src / "train" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (src / "labels.csv").write_text("id,grade\n")

    result = run_cli("--in", str(src), "--out", str(dst), "--size", "64", "--no-mask")

    assert result.returncode == 1, result.stderr
    assert "broken.png" in result.stderr
    assert "INFO 4/4 images" in result.stderr and "3 written" in result.stdout
    written = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert written == ["c.tif", "train/0/a.png", "train/b.jpg"]
    for name in written:
        assert cv2.imread(str(dst / name)).shape == (64, 64, 3)


def test_cli_missing_input_folder(tmp_path):
    result = run_cli("--in", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert not (tmp_path / "out").exists()
