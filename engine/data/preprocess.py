"""Fundus preprocessing after Ben Graham (Kaggle 2015): crop to the eye, enhance, mask, resize.

Each of the three steps is optional (PreprocessConfig); the output is always an RGB uint8
square of `size` pixels. The eye is cropped and scaled down first, so the blur runs at the
output size and its cost does not grow with the photograph's megapixels.

Command line, for a whole folder tree:
    python -m engine.data.preprocess --in DIR --out DIR [--size PX]
                                [--no-crop] [--no-enhance] [--no-mask]
"""

import argparse
import contextlib
import hashlib
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cli import HelpFormatter, setup_logging
from engine.data.images import IMAGE_SUFFIXES, ImageError, load_rgb

log = logging.getLogger(__name__)

# Bump when the pipeline's output changes, so that cached results made by the old code miss.
PIPELINE_VERSION = 2
# Background is black up to sensor and JPEG noise (< 10); the field's darkest rim is well above.
FIELD_THRESHOLD = 15
# Flare can lift the background of a bright photograph to 20-40: the field is also what is
# brighter than this share of its median brightness.
FIELD_SHARE = 0.25
# A "field" smaller than this share of the image is a label or a speck, not the eye.
MIN_FIELD_FRACTION = 0.01
# The field is located on a copy about this size: 1 px there is < 0.3% of a 2-9 Mpx
# photograph's radius, and the cost barely grows with the photograph's megapixels.
DETECT_SIDE = 1024
MASK_FRACTION = 0.9
# A large JPEG is decoded reduced (1/2, 1/4, 1/8) while its shorter side stays this many times
# the output size, so that an eye field narrower than the frame still fills the output. The
# output then differs from the full decode's as much as after an area resize of the full
# decode to the reduced size: on 50 real photographs upscaled to 2048 px, by 0.8 grey levels
# on average at 1/2 (at most 1.5), where a shift by 1 px changes it by 0.6 (at most 2.2).
DECODE_MARGIN = 1.5


@dataclass(frozen=True)
class PreprocessConfig:
    size: int = 384
    crop: bool = True
    enhance: bool = True
    mask: bool = True
    # Without crop: the shorter side scaled to size and the centre square kept (the seed's
    # evaluation transform, Resize + CenterCrop) instead of the whole image squeezed.
    center_crop: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 8:
            raise ValueError(f"size must be an integer of at least 8 pixels, got {self.size!r}")

    def key(self) -> str:
        """Short stable text of the parameters and pipeline version, for cache keys."""
        flags = f"c{int(self.crop)}e{int(self.enhance)}m{int(self.mask)}"
        flags += "z" if self.center_crop else ""  # absent by default: older entries stay valid
        return f"v{PIPELINE_VERSION}-{self.size}-{flags}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        """Inverse of to_dict; missing keys take the defaults, unknown keys raise TypeError."""
        return cls(**data)


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    # INTER_AREA averages the pixels it drops (no aliasing); it is blocky when enlarging.
    shrinking = width * height < img.shape[0] * img.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(img, (width, height), interpolation=interpolation)


def find_field(img: np.ndarray) -> tuple[float, float, float]:
    """Centre (cx, cy) and radius in pixels of the round eye field of an RGB uint8 image.

    Coordinates are of pixel centres (the top-left pixel is at 0, 0). Cameras may cut the
    field flat at the top and bottom, so the radius comes from the wider of the two extents
    and the centre from the middle of each extent. With no field found (a black image), the
    circle around the whole image is returned.
    """
    height, width = img.shape[:2]
    # An integer factor keeps INTER_AREA on its fast path and maps pixels back exactly.
    factor = max(1, math.ceil(max(height, width) / DETECT_SIDE))
    small = img
    if factor > 1:
        trimmed = img[: height // factor * factor, : width // factor * factor]
        small_size = (width // factor, height // factor)
        small = cv2.resize(trimmed, small_size, interpolation=cv2.INTER_AREA)
    # The red channel is the brightest in a fundus; the maximum also copes with colour casts.
    # (cv2.max: numpy's max over the channel axis is twenty times slower.)
    brightest = cv2.max(cv2.max(small[..., 0], small[..., 1]), small[..., 2])
    lit = brightest[brightest > FIELD_THRESHOLD]
    threshold = max(FIELD_THRESHOLD, FIELD_SHARE * float(np.median(lit))) if lit.size else FIELD_THRESHOLD
    inside = (brightest > threshold).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(inside, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    if count < 2 or areas.max() < MIN_FIELD_FRACTION * inside.size:
        return (width - 1) / 2, (height - 1) / 2, max(width, height) / 2
    left, top, box_w, box_h = stats[1 + int(np.argmax(areas)), :4]
    cx = (left + box_w / 2) * factor - 0.5
    cy = (top + box_h / 2) * factor - 0.5
    radius = max(box_w, box_h) * factor / 2
    return float(cx), float(cy), float(radius)


def _square_crop(img: np.ndarray, cx: float, cy: float, radius: float) -> np.ndarray:
    side = max(1, round(2 * radius))
    x0 = round(cx + 0.5 - side / 2)
    y0 = round(cy + 0.5 - side / 2)
    out = np.zeros((side, side, 3), dtype=img.dtype)
    # Paste the part of the square that lies inside the image; the rest stays black.
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, img.shape[1]), min(y0 + side, img.shape[0])
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[sy0:sy1, sx0:sx1]
    return out


def _center_square(img: np.ndarray, size: int) -> np.ndarray:
    """torchvision's Resize(size) then CenterCrop(size): the shorter side to `size`, the
    middle square of it."""
    height, width = img.shape[:2]
    scale = size / min(height, width)
    img = _resize(img, max(size, int(width * scale)), max(size, int(height * scale)))
    top, left = round((img.shape[0] - size) / 2), round((img.shape[1] - size) / 2)
    return img[top : top + size, left : left + size]


def crop_to_eye(img: np.ndarray) -> np.ndarray:
    """Square of side 2r centred on the eye field; black where the circle leaves the image."""
    return _square_crop(img, *find_field(img))


def enhance(img: np.ndarray, radius: float) -> np.ndarray:
    """Ben Graham's local contrast: 4 * (image - Gaussian blur) + 128, sigma = radius / 30.

    `radius` is the eye's radius in pixels of `img`, so the result does not depend on the
    photograph's resolution. Flat areas, the black background included, come out at 128.
    """
    sigma = max(radius / 30, 0.5)
    blurred = cv2.GaussianBlur(img, (0, 0), sigma)
    return cv2.addWeighted(img, 4, blurred, -4, 128)


def apply_mask(
    img: np.ndarray,
    radius_fraction: float = MASK_FRACTION,
    *,
    fill: int = 128,
    field: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """Keep the circle of radius_fraction x radius around the centre; set the rest to `fill`.

    The default fill 128 is the grey of an enhanced image's flat areas (Ben Graham's choice);
    the pipeline uses 0 for images that are not enhanced, matching their black background.
    The 0.9 cuts off the bright ring that enhancement draws along the field's edge. `field` is
    (cx, cy, radius); by default the circle inscribed in the image, as after crop_to_eye.
    """
    height, width = img.shape[:2]
    if field is None:
        field = ((width - 1) / 2, (height - 1) / 2, min(width, height) / 2)
    cx, cy, radius = field
    yy, xx = np.ogrid[:height, :width]
    outside = (xx - cx) ** 2 + (yy - cy) ** 2 > (radius_fraction * radius) ** 2
    out = img.copy()
    out[outside] = fill
    return out


def preprocess(img: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """The pipeline on an RGB uint8 photograph; returns RGB uint8 of cfg.size x cfg.size."""
    size = cfg.size
    if cfg.crop:
        img = _resize(crop_to_eye(img), size, size)
        field = ((size - 1) / 2, (size - 1) / 2, size / 2)
    else:
        img = _center_square(img, size) if cfg.center_crop else _resize(img, size, size)
        field = find_field(img)
    if cfg.enhance:
        img = enhance(img, field[2])
    if cfg.mask:
        img = apply_mask(img, fill=128 if cfg.enhance else 0, field=field)
    return img


def decode_for(path: Path, cfg: PreprocessConfig) -> np.ndarray:
    """The photograph at `path` as RGB, decoded no larger than `cfg` needs (DECODE_MARGIN)."""
    return load_rgb(path, min_side=math.ceil(DECODE_MARGIN * cfg.size))


def preprocess_file(path: Path, cfg: PreprocessConfig) -> np.ndarray:
    """The pipeline on the photograph at `path`."""
    return preprocess(decode_for(path, cfg), cfg)


class PreprocessCache:
    """Preprocessed images on disk, keyed by the source file's identity and the config.

    Entries are .npy files (a 384 px entry loads several times faster than the same PNG) in
    256 sharded folders. Holds only its root path, so it pickles into DataLoader workers;
    several processes may fill it at once, since every entry is written whole and renamed.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, path: Path, cfg: PreprocessConfig) -> Path:
        """Where the entry for `path` under `cfg` lives; a changed source file gets a new one."""
        digest = cache_digest(file_identity(path), cfg.key())
        return self.root / digest[:2] / f"{digest}.npy"

    def load(self, path: Path, cfg: PreprocessConfig) -> np.ndarray:
        """The preprocessed image; the source is decoded only when the cache misses."""
        entry = self.entry(path, cfg)
        try:
            return np.load(entry)
        except (OSError, ValueError):
            pass  # missing, or damaged by a crash or a full disk: make it again
        img = preprocess_file(path, cfg)
        save_whole(entry, img)
        return img


def file_identity(path: Path) -> str:
    """What changes when the file at `path` is replaced or edited: its absolute path, modification
    time and size."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ImageError(f"{path}: missing file") from None
    return f"{path.resolve()}\0{stat.st_mtime_ns}\0{stat.st_size}"


def cache_digest(*parts: str) -> str:
    """A short hex name for a cache entry keyed by `parts`."""
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=16).hexdigest()


def save_whole(entry: Path, array: np.ndarray) -> None:
    """`array` as the .npy file `entry`, written beside it and renamed: a reader sees the whole
    file or none, however many processes write at once."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            np.save(file, array)
        os.replace(tmp, entry)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fill_cache(
    paths: list[Path],
    cfg: PreprocessConfig,
    cache: PreprocessCache,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Decode and preprocess every file the cache lacks, on all cores (OpenCV releases the
    GIL). Unreadable files are left for the dataset to report when it meets them."""

    def fill(path: Path) -> None:
        with contextlib.suppress(ImageError):
            cache.load(path, cfg)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for done, _ in enumerate(pool.map(fill, paths), start=1):
            if progress and (done % 50 == 0 or done == len(paths)):
                progress(done, len(paths))


def load_preprocessed(path: Path, cfg: PreprocessConfig, cache: PreprocessCache | None = None) -> np.ndarray:
    """The preprocessed image of the file at `path`, through `cache` when one is given."""
    if cache is None:
        return preprocess_file(path, cfg)
    return cache.load(path, cfg)


# ---- command line -------------------------------------------------------------------------


def _write_image(path: Path, img: np.ndarray) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix.lower() in (".jpg", ".jpeg") else []
    if not cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), params):
        raise OSError(f"could not write {path}")


def _convert(src: Path, dst: Path, cfg: PreprocessConfig) -> str | None:
    """Preprocess one file; returns why it failed, or None."""
    try:
        img = preprocess_file(src, cfg)
        dst.parent.mkdir(parents=True, exist_ok=True)
        _write_image(dst, img)
    except (ImageError, OSError, cv2.error) as exc:
        return str(exc).removeprefix(f"{src}: ")
    return None


def _init_worker() -> None:
    # One process per core already; OpenCV's own threads would only contend with them.
    cv2.setNumThreads(1)


def _process_tree(sources: list[Path], src_root: Path, dst_root: Path, cfg: PreprocessConfig) -> int:
    started = time.perf_counter()
    targets = [dst_root / src.relative_to(src_root) for src in sources]
    workers = min(os.cpu_count() or 1, len(sources))
    step = max(1, len(sources) // 20)
    failed = 0
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
        results = pool.map(_convert, sources, targets, repeat(cfg), chunksize=4)
        for done, (src, error) in enumerate(zip(sources, results, strict=True), start=1):
            if error is not None:
                failed += 1
                log.warning("skipped %s: %s", src.relative_to(src_root), error)
            if done % step == 0 or done == len(sources):
                log.info("%d/%d images", done, len(sources))
    seconds = time.perf_counter() - started
    print(
        f"done: {len(sources) - failed} written to {dst_root}, {failed} skipped, "
        f"{seconds:.1f} s with {workers} workers ({cfg.key()})"
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Preprocess every image under --in into the same relative path and name under --out.

    The output keeps each file's name and extension, so the CSVs that name the files work on
    the output tree as they are; JPEGs are written at quality 95, other formats losslessly.
    Files of other kinds are ignored. Exit status: 0 all written, 1 some skipped (each named
    on stderr with its reason), 2 bad arguments.
    """
    parser = argparse.ArgumentParser(
        prog="python -m engine.data.preprocess",
        description="Preprocess every fundus photograph under a folder (Ben Graham).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--in",
        dest="src",
        metavar="DIR",
        type=Path,
        required=True,
        help="the folder of photographs (read recursively)",
    )
    parser.add_argument(
        "--out",
        dest="dst",
        metavar="DIR",
        type=Path,
        required=True,
        help="where the preprocessed images go, in the same sub-folders",
    )
    parser.add_argument(
        "--size", metavar="PX", type=int, default=PreprocessConfig.size, help="side of the square output"
    )
    parser.add_argument("--no-crop", action="store_true", help="squeeze the whole image instead")
    parser.add_argument("--no-enhance", action="store_true", help="skip Ben Graham's contrast")
    parser.add_argument("--no-mask", action="store_true", help="keep the field's rim")
    args = parser.parse_args(argv)
    setup_logging()

    src_root, dst_root = args.src.resolve(), args.dst.resolve()
    if not src_root.is_dir():
        what = "is not a folder" if src_root.exists() else "does not exist"
        parser.exit(2, f"error: input folder {args.src} {what}\n")
    if dst_root == src_root or src_root in dst_root.parents:
        parser.exit(2, "error: --out must lie outside --in, or the sources would be mixed in\n")
    try:
        cfg = PreprocessConfig(args.size, not args.no_crop, not args.no_enhance, not args.no_mask)
    except ValueError as exc:
        parser.error(str(exc))
    sources = sorted(
        path for path in src_root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )
    if not sources:
        log.error("no images (%s) found under %s", ", ".join(IMAGE_SUFFIXES), args.src)
        return 1
    return _process_tree(sources, src_root, dst_root, cfg)


if __name__ == "__main__":
    sys.exit(main())
