"""Review in a real browser: Debian's chromium against `streamlit run app.py`. A reviewer opens
a 4752x3168 photograph in the grading viewer, zooms to its native pixels, switches to red-free
and back, shows the keys and the evidence, and grades with the keyboard only, with the focus in
the viewer; the database holds one appended row per key, and keys typed into a field do
nothing but type."""

import shutil
from pathlib import Path

import cv2
import numpy as np
from browser import (
    chromium_page,
    press_on_body,
    require_chromium,
    screenshot,
    streamlit_server,
    wait_for,
    wait_until_idle,
)
from sqlalchemy import select
from test_review import add_predictions, image_ids, register_run

from db.schema import Image, Review
from db.session import migrate, session_scope
from engine.data.sources import import_source
from engine.data.synth import MESSIDOR_STYLE, draw_fundus, sample_lesions
from engine.runtime.workspace import Workspace

BIG = (4752, 3168)  # an EyePACS photograph's size: 13 Deep Zoom levels above the 1-px one
VIEWER = ".grading-viewer"


def reviews(db_url: str) -> list[tuple]:
    with session_scope(db_url) as session:
        return [
            tuple(row)
            for row in session.execute(
                select(Review.image_id, Review.decision, Review.grade, Review.reviewer).order_by(Review.id)
            )
        ]


def image_name(db_url: str, image_id: int) -> str:
    with session_scope(db_url) as session:
        return session.get(Image, image_id).name


def on_screen(page) -> str:
    """The name of the candidate on screen (the card's subheader)."""
    return page.locator("[data-testid='stMain'] h3").first.inner_text().strip()


def viewer(page, name: str) -> str | None:
    """One of the viewer's data-* attributes (it lives in a shadow root: a locator pierces)."""
    return page.locator(VIEWER).get_attribute(f"data-{name}")


def wait_viewer(page, **wanted: str) -> None:
    """Until the viewer's data-* attributes say `wanted` (data-loaded: every tile the view
    needs is drawn)."""
    selector = VIEWER + "".join(f"[data-{k.replace('_', '-')}='{v}']" for k, v in wanted.items())
    page.locator(selector).wait_for(timeout=60_000)


def focus_viewer(page) -> None:
    """A click into the photograph, as a reviewer's before a key: the focus is the viewer's."""
    box = page.locator(f"{VIEWER} .osd").bounding_box()
    page.mouse.click(box["x"] + 10, box["y"] + 10)


def decide_by_key(page, db_url: str, key: str, rows: int) -> None:
    """Press `key` with the focus in the viewer, then wait for the database's `rows`-th
    review and the page's next image."""
    before = on_screen(page)
    focus_viewer(page)
    page.keyboard.press(key)
    wait_for(lambda: len(reviews(db_url)) >= rows, 30, f"review row {rows} after {key!r}")
    wait_until_idle(page)
    wait_for(lambda: on_screen(page) != before, 30, f"the next image after {key!r}")


def pool_with_a_big_photograph(tiny_data: Path, folder: Path) -> Path:
    """The tiny APTOS test images and, first by name, one 4752x3168 synthetic photograph."""
    shutil.copytree(tiny_data / "aptos" / "test_images", folder)
    rng = np.random.default_rng(0)
    big = draw_fundus(sample_lesions(1, rng), rng, BIG[1], MESSIDOR_STYLE)
    cv2.imwrite(str(folder / "000-big.jpg"), big[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


def test_the_viewer_and_the_keys_in_a_browser(tmp_path: Path, tiny_data: Path):
    require_chromium()
    workspace = Workspace(tmp_path / "ws")
    db = workspace.db_url
    migrate(db)
    import_source(
        db, "unlabelled", pool_with_a_big_photograph(tiny_data, tmp_path / "pool"), "unlabelled", "pool"
    )
    run_id = register_run(workspace)
    pool = image_ids(db, "pool")
    # least confident first: the big photograph, then grades 1, 0, 3, 2, 1
    add_predictions(db, run_id, pool[:6], [(0.70, 0), (0.95, 2), (0.85, 3), (0.80, 0), (0.75, 1), (0.72, 1)])

    with streamlit_server(workspace.root, tmp_path / "server.log") as url, chromium_page() as page:
        page.goto(f"{url}/review")  # a bookmark, on a fresh server: app.py still runs
        page.get_by_role("heading", name="Review", level=1).wait_for()
        wait_until_idle(page)
        sidebar = page.locator("[data-testid='stSidebar']")
        assert sidebar.get_by_role("link", name="Dataset").is_visible()
        assert sidebar.get_by_text("Candidates").is_visible()  # the loop overview
        page.get_by_text("Reviewing as").wait_for()  # the one local user: no accounts
        assert page.get_by_text("0 of 6 candidates reviewed").is_visible()
        assert on_screen(page) == image_name(db, pool[0])
        wait_viewer(page, loaded="1", view="photo")
        assert viewer(page, "levels") == "13"  # 2**12 < 4752 <= 2**13
        # The card comes first: photograph and buttons within the 1400x1000 window.
        assert page.locator(f"{VIEWER} .osd").bounding_box()["y"] < 400
        accept = page.get_by_role("button", name="Accept grade 0").bounding_box()
        assert accept["y"] + accept["height"] < 1000
        screenshot(page, "review-viewer")

        focus_viewer(page)
        page.keyboard.press("n")  # native pixels: the file's own, from its deepest level
        wait_viewer(page, loaded="1", image_zoom="1.000", max_level_drawn="13")
        page.keyboard.press("ArrowRight")  # pan to another region, still at native pixels
        wait_viewer(page, loaded="1", image_zoom="1.000")
        page.keyboard.press("v")
        wait_viewer(page, loaded="1", view="red-free", image_zoom="1.000")
        screenshot(page, "review-red-free-native")
        page.keyboard.press("Shift+V")
        wait_viewer(page, loaded="1", view="photo", image_zoom="1.000")
        page.keyboard.press("f")
        wait_viewer(page, loaded="1")
        assert float(viewer(page, "image-zoom")) < 0.25  # fitted again
        assert reviews(db) == []  # the viewer's keys decide nothing

        focus_viewer(page)
        page.keyboard.press("h")  # the keys list, the viewer's keys in it
        page.get_by_text("undo your last decision").wait_for()
        page.get_by_text("native pixels: one pixel of the file").wait_for()
        wait_until_idle(page)

        focus_viewer(page)
        page.keyboard.press("g")  # the evidence: Grad-CAM as a view, the flip views
        page.locator(f"{VIEWER} button[data-view='gradcam']").wait_for()
        page.locator(".js-plotly-plot").filter(has_text="Test-time views").wait_for()
        wait_until_idle(page)
        page.locator(f"{VIEWER} button[data-view='gradcam']").click()
        wait_viewer(page, loaded="1", view="gradcam")
        screenshot(page, "review-evidence")
        focus_viewer(page)
        page.keyboard.press("g")  # and hidden again
        page.locator(f"{VIEWER} button[data-view='gradcam']").wait_for(state="detached")
        wait_until_idle(page)
        wait_viewer(page, view="photo")
        assert reviews(db) == []

        decide_by_key(page, db, "a", 1)
        wait_viewer(page, loaded="1")
        page.wait_for_timeout(1500)  # the next photograph is fetched ahead meanwhile
        before, photo = on_screen(page), viewer(page, "photo")
        focus_viewer(page)
        page.keyboard.press("x")
        page.keyboard.press("x")  # a double press decides once
        wait_for(lambda: viewer(page, "photo") != photo, 5, "the next photograph at the key")
        wait_for(lambda: on_screen(page) != before, 30, "the next card")
        wait_until_idle(page)
        page.wait_for_timeout(1000)
        assert len(reviews(db)) == 2 and not page.get_by_text("was decided by").count()
        decide_by_key(page, db, "2", 3)
        assert reviews(db) == [
            (pool[0], "accept", 0, "local"),
            (pool[5], "reject", None, "local"),
            (pool[4], "relabel", 2, "local"),
        ]
        page.get_by_text("3 of 6 candidates reviewed").wait_for()
        decide_by_key(page, db, "Backspace", 4)
        assert reviews(db)[3] == (pool[4], "undo", None, "local")
        assert on_screen(page) == image_name(db, pool[4])  # back on screen to decide again
        page.get_by_text("2 of 6 candidates reviewed").wait_for()
        before = on_screen(page)
        focus_viewer(page)
        page.keyboard.press("Space")  # skip: the next image, no row
        wait_for(lambda: on_screen(page) != before, 30, "the next image after a skip")
        wait_until_idle(page)
        screenshot(page, "review-after")

        zoom = viewer(page, "image-zoom")
        folder = page.get_by_label("Class folders 0-3 into")
        typed = folder.input_value() + "nvax2"
        folder.press("End")
        page.keyboard.type("nvax2")  # typed into a field: neither a grading nor a viewer key
        page.wait_for_timeout(1000)
        assert folder.input_value() == typed
        assert viewer(page, "image-zoom") == zoom and viewer(page, "view") == "photo"
        press_on_body(page, "n")  # and outside the field the viewer's keys work again
        wait_viewer(page, image_zoom="1.000")
    assert len(reviews(db)) == 4
