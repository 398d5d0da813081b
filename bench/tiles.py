"""Seconds to build the grading viewer's tile pyramids (engine/data/tiles.py) of a 12-Mpx photograph.

    .venv/bin/python -m bench.tiles [--photos 3] [--size 4243x2828]

Real photographs (../shared/realdata, 512 px EyePACS) upscaled to --size and written as JPEG
(quality 95) to a temporary folder, as a camera's file would be. For each, the best of REPEATS
cold builds (a fresh cache folder each time) of every view, with its parts on their own: the
decode, the eye field, the red-free and contrast views at full resolution; then a warm call
(the pyramids already cached), and the photo view alone from the decode (what a build that
published that view first would keep the first card waiting). The review card's first view can
paint within 300 ms only where the build ran ahead of it (TileCache.prefetch). Both wall and
CPU seconds (all threads) grow when other work shares the cores: measure on a quiet machine.
"""

import argparse
import csv
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2

from bench.common import REALDATA, REPEATS, read_bgr
from cli import HelpFormatter, setup_logging
from engine.data.images import load_rgb
from engine.data.preprocess import find_field
from engine.data.tiles import ENCODE_THREADS, VIEWS, TileCache, contrast, red_free, write_pyramid


def best_s(work: Callable[[int], object]) -> float:
    return min(timed(work, repeat)[0] for repeat in range(REPEATS))


def timed(work: Callable[[int], object], repeat: int) -> tuple[float, float]:
    """Wall and CPU seconds (all threads) of `work(repeat)`."""
    wall, cpu = time.perf_counter(), time.process_time()
    work(repeat)
    return time.perf_counter() - wall, time.process_time() - cpu


def photo_view_alone(photo: Path, folder: Path) -> None:
    """What a build would take if it published the photo view before making the others."""
    rgb = load_rgb(photo)
    find_field(rgb)
    folder.mkdir(parents=True)
    with ThreadPoolExecutor(ENCODE_THREADS) as pool:
        futures = write_pyramid(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), folder, "photo", pool)
        sum(future.result() for future in futures)


def upscaled(out: Path, count: int, width: int, height: int) -> list[Path]:
    """`count` EyePACS photographs resized to width x height, as JPEG files under `out`."""
    with open(REALDATA / "labels.csv") as file:
        rows = csv.DictReader(file)
        names = [row["file"] for row in rows if row["dataset"].startswith("eyepacs")]
    paths = []
    for name in names[:count]:
        img = cv2.resize(read_bgr(REALDATA / name), (width, height), interpolation=cv2.INTER_CUBIC)
        path = out / Path(name).name
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        paths.append(path)
    return paths


def measure(photo: Path, scratch: Path) -> dict[str, float]:
    rgb = load_rgb(photo)
    field = find_field(rgb)
    caches = [TileCache(scratch / f"cold{repeat}") for repeat in range(REPEATS)]
    wall, cpu = min(timed(lambda repeat: caches[repeat].pyramids(photo), repeat) for repeat in range(REPEATS))
    folder = caches[0].pyramids(photo).folder
    return {
        "build": wall,
        "cpu": cpu,
        "photo view": best_s(lambda repeat: photo_view_alone(photo, scratch / f"photo{repeat}")),
        "warm": best_s(lambda repeat: caches[0].pyramids(photo)),
        "tiles": sum(1 for _ in folder.rglob("*.jpeg")),
        "MB": sum(path.stat().st_size for path in folder.rglob("*.jpeg")) / 1e6,
        "decode": best_s(lambda _: load_rgb(photo)),
        "field": best_s(lambda _: find_field(rgb)),
        "red-free": best_s(lambda _: red_free(rgb, field)),
        "contrast": best_s(lambda _: contrast(rgb, field)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tiles", description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--photos", type=int, default=3, help="real photographs to time")
    parser.add_argument("--size", default="4243x2828", help="WIDTHxHEIGHT of the upscaled photos")
    args = parser.parse_args(argv)
    setup_logging()
    width, height = map(int, args.size.lower().split("x"))
    print(
        f"{width}x{height} px ({width * height / 1e6:.1f} Mpx), views {', '.join(VIEWS)}, "
        f"best of {REPEATS}, {cv2.getNumThreads()} OpenCV threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        photos = upscaled(Path(tmp), args.photos, width, height)
        for photo in photos:
            row = measure(photo, Path(tmp) / photo.stem)
            print(
                f"{photo.name}: build all views {row['build']:.2f} s ({row['cpu']:.2f} CPU s, "
                f"{row['tiles']} tiles, {row['MB']:.1f} MB); the photo view alone "
                f"{row['photo view']:.2f} s; decode {row['decode'] * 1000:.0f} ms, eye field "
                f"{row['field'] * 1000:.0f} ms, red-free {row['red-free'] * 1000:.0f} ms, "
                f"contrast {row['contrast'] * 1000:.0f} ms; cached {row['warm'] * 1000:.1f} ms"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
