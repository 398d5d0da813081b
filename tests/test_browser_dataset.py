"""First start in a real browser: the demo workspace builds while the server answers, then
the Dataset page shows its class balance and gallery. A small demo (DR_DEMO=60): the full one
differs only in its counts (engine.loop.demo.demo_args)."""

from browser import (
    chromium_page,
    require_chromium,
    screenshot,
    streamlit_server,
    wait_for_count,
    wait_until_idle,
)


def test_first_start_builds_and_shows_the_demo(tmp_path):
    require_chromium()
    with (
        streamlit_server(tmp_path / "ws", tmp_path / "server.log", DR_DEMO="60") as url,
        chromium_page() as page,
    ):
        page.goto(url)
        page.get_by_text("Building the demo workspace").wait_for()
        screenshot(page, "dataset-demo-building")
        page.get_by_text("Train sources").wait_for(timeout=120_000)
        wait_until_idle(page)
        wait_for_count(page.locator("[data-testid='stPlotlyChart']"), 2, "charts (train, validation)")
        assert page.get_by_text("demo APTOS train").first.is_visible()
        page.get_by_text("Gallery").scroll_into_view_if_needed()
        page.locator("[data-testid='stImage']").first.wait_for()
        screenshot(page, "dataset-demo")
