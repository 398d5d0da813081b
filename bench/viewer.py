"""The grading viewer's speed in Debian's chromium against `streamlit run app.py`, on real
photographs from ../shared/realdata upscaled to 12 Mpx (4243x2828, the field centred as a
camera frames it).

    .venv/bin/python -m bench.viewer [--photos 12] [--look 3] [--pause 1]
                                     [--realdata ../shared/realdata]

A reviewer works through the queue by key: on each card, after looking at it for --look
seconds (while the viewer prepares the next card), `n` zooms to native pixels, an arrow key
pans to another region, `v` switches to red-free and `shift+v` back, each looked at for
--pause seconds, and `a` accepts. Each is
timed in the browser from the key's keydown to the viewer's data-loaded: every tile that the
view needs drawn; after a decision also to the next card's name on screen (the rerun that
brings the rest of the card). Printed: the median and the slowest of each, in milliseconds.
"""

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from sqlalchemy import insert, select

from bench.common import read_bgr
from cli import HelpFormatter, setup_logging
from db.schema import Image, Prediction, Run
from db.session import migrate, session_scope
from engine.data.sources import import_source
from engine.runtime.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from browser import chromium_page, streamlit_server, wait_until_idle  # noqa: E402

SIZE = (4243, 2828)  # 12 Mpx
# Time from the last keydown until the viewer says its view is drawn; -1 until it is.
LOADED = """token => {
  const root = window.__gradingViewer?.root;
  if (!root || root.dataset.loaded !== '1' || (token && root.dataset.photo === token)) return false;
  return performance.now() - window.__keyAt;
}"""
# Time from the last keydown until the card's name (its subheader) is another.
CARD = """name => {
  const shown = document.querySelector("[data-testid='stMain'] h3");
  return shown && shown.innerText !== name && performance.now() - window.__keyAt;
}"""
MARK_KEYS = "document.addEventListener('keydown', () => { window.__keyAt = performance.now(); }, true)"


def upscaled(photo: Path, out: Path) -> None:
    img = read_bgr(photo)
    side = SIZE[1]
    field = cv2.resize(img, (side, side), interpolation=cv2.INTER_CUBIC)
    canvas = np.zeros((SIZE[1], SIZE[0], 3), np.uint8)
    left = (SIZE[0] - side) // 2
    canvas[:, left : left + side] = field
    cv2.imwrite(str(out), canvas, [cv2.IMWRITE_JPEG_QUALITY, 92])


def workspace_with_pool(root: Path, realdata: Path, count: int) -> Workspace:
    """A pool of `count` upscaled photographs and a run that predicts each at 0.9."""
    pool = root / "pool"
    pool.mkdir()
    photos = sorted((realdata / "images").glob("*.jpg"))
    for i, photo in enumerate(random.Random(0).sample(photos, count)):
        upscaled(photo, pool / f"photo{i:02d}.jpg")
    workspace = Workspace(root / "ws")
    workspace.root.mkdir()
    migrate(workspace.db_url)
    import_source(workspace.db_url, "unlabelled", pool, "unlabelled", "pool")
    with session_scope(workspace.db_url) as session:
        run = Run(
            name="bench",
            model_name="test_efficientnet",
            img_size=64,
            status="done",
            checkpoint=str(root / "none.pth"),
            active=True,
        )
        session.add(run)
        session.flush()
        ids = session.scalars(select(Image.id)).all()
        session.execute(
            insert(Prediction),
            [
                {
                    "run_id": run.id,
                    "image_id": i,
                    "p0": 0.9,
                    "p1": 0.05,
                    "p2": 0.03,
                    "p3": 0.02,
                    "grade": 0,
                    "confidence": 0.9 - i / 1000,
                }
                for i in ids
            ],
        )
    return workspace


def timed(page, key: str, token: str | None = None) -> float:
    """Milliseconds from `key` to the viewer's view drawn (of a photograph other than
    `token`, when given)."""
    page.keyboard.press(key)
    return page.wait_for_function(LOADED, arg=token, polling="raf", timeout=60_000).json_value()


def run(args: argparse.Namespace) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {
        "decision key -> next photograph drawn": [],
        "decision key -> next card's name shown": [],
        "n -> native pixels drawn": [],
        "pan at native": [],
        "v -> red-free drawn": [],
        "shift+v -> photo drawn": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        workspace = workspace_with_pool(Path(tmp), args.realdata, args.photos)
        with streamlit_server(workspace.root, Path(tmp) / "server.log") as url, chromium_page() as page:
            page.goto(f"{url}/review")
            wait_until_idle(page)
            page.evaluate(MARK_KEYS)
            page.wait_for_function(
                "() => window.__gradingViewer?.root.dataset.loaded === '1'", timeout=120_000
            )
            for _ in range(args.photos - 1):
                page.wait_for_timeout(args.look * 1000)
                token = page.evaluate("() => window.__gradingViewer.root.dataset.photo")
                for name, key in (
                    ("n -> native pixels drawn", "n"),
                    ("pan at native", "ArrowUp"),
                    ("v -> red-free drawn", "v"),
                    ("shift+v -> photo drawn", "Shift+V"),
                ):
                    times[name].append(timed(page, key))
                    page.wait_for_timeout(args.pause * 1000)  # looking at what it shows
                name = page.locator("[data-testid='stMain'] h3").first.inner_text()
                times["decision key -> next photograph drawn"].append(timed(page, "a", token))
                times["decision key -> next card's name shown"].append(
                    page.wait_for_function(CARD, arg=name, polling="raf", timeout=60_000).json_value()
                )
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.viewer", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--photos", type=int, default=12, help="cards")
    parser.add_argument("--look", type=float, default=3.0, help="seconds on each card before the keys")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds on each view before the next key")
    parser.add_argument(
        "--realdata",
        type=Path,
        default=ROOT.parent / "shared" / "realdata",
        help="the folder of labels.csv and images/ (default ../shared/realdata)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    started = time.monotonic()
    times = run(args)
    print(
        f"{args.photos} photographs of {SIZE[0]}x{SIZE[1]} px, {args.look:g} s on each card "
        f"({time.monotonic() - started:.0f} s in all)"
    )
    print(f"{'':40} {'median ms':>10} {'slowest ms':>11}")
    for name, values in times.items():
        print(f"{name:40} {statistics.median(values):10.0f} {max(values):11.0f}")


if __name__ == "__main__":
    main()
