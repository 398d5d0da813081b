"""Strings from users and files shown as written: the markdown escape every page uses
(engine.runtime.markdown.literal), and what Streamlit draws of it in a real browser."""

import json
import re
import string
from pathlib import Path

from browser import chromium_page, require_chromium, streamlit_server, wait_until_idle

from engine.runtime.markdown import literal

# Each starts a markdown construct of CommonMark, GFM or Streamlit's own.
TEXTS = [
    "**bold** _x_ [link](http://e) <b>hi</b> <script>alert(1)</script>",
    "$x^2$ and $$y$$ cost $5",
    ":red[x] :material/home: :smile: :+1: :blue-badge[b]",
    "`code` ~~strike~~ a|b # not a heading",
    "# heading\n- item\n1. one\n> quote\n| a | b |\n|---|---|",
    "- 1. 2) + * *** ---",
    "a\\*b \\ &amp; &lt; ![img](http://e/x.png) [^1] {#id}",
    "x\n\n    indented\n===\r\ny",
]
# Where each element of tests/literal_page.py shows its text.
SHOWN_IN = {
    "markdown": "[data-testid='stMarkdownContainer']",
    "bold": "[data-testid='stMarkdownContainer']",
    "caption": "[data-testid='stCaptionContainer']",
    "alert": "[data-testid='stAlert']",
    "subheader": "[data-testid='stHeading']",
    "metric": "[data-testid='stMetricLabel']",
    "expander": "summary [data-testid='stMarkdownContainer']",
    "button": "[data-testid='stButton']",
    "image": "[data-testid='stImageCaption']",
    "progress": "[data-testid='stProgress'] [data-testid='stMarkdownContainer']",
    "radio": "[role='radiogroup'] [data-testid='stMarkdownContainer']",
}
# What markdown would have made of the texts.
MARKUP = "a, em, strong, code, del, img, ul, ol, li, blockquote, table, hr, h1, h2, h4, .katex"


def test_every_ascii_punctuation_mark_is_escaped():
    assert literal(string.punctuation) == "".join(f"\\{mark}" for mark in string.punctuation)
    assert literal("**bold** _x_ [link](http://e) <b>") == r"\*\*bold\*\* \_x\_ \[link\]\(http\:\/\/e\) \<b\>"
    assert literal("$x^2$") == r"\$x\^2\$"  # LaTeX
    assert literal(":red[x] :material/home: :smile:") == r"\:red\[x\] \:material\/home\: \:smile\:"
    assert literal("`code` a|b") == r"\`code\` a\|b"
    assert literal("# title") == r"\# title"


def test_letters_digits_spaces_and_other_scripts_stay_as_they_are():
    text = "Ana Lee 2024 café · grade ≥ 2 → 中文 ✓"
    assert literal(text) == text


def test_line_breaks_become_spaces_so_that_no_line_starts_a_block():
    assert literal("a\nb\r\nc\rd") == "a b c d"
    assert literal("x\n# y\n- z\n\n    code") == r"x \# y \- z      code"


def test_anything_is_shown_as_its_text():
    assert literal(ValueError("no_such file")) == r"no\_such file"
    assert literal(Path("/data/a.png")) == r"\/data\/a\.png"


def test_the_browser_shows_escaped_text_as_written(tmp_path):
    """Streamlit's front end (react-markdown with GFM, math, emoji and its directives) draws
    each text in every kind of element as the text itself, with no markup."""
    require_chromium()
    with (
        streamlit_server(
            tmp_path / "ws", tmp_path / "server.log", "tests/literal_page.py", LITERAL_TEXTS=json.dumps(TEXTS)
        ) as url,
        chromium_page() as page,
    ):
        page.goto(url)
        page.locator(f".st-key-radio-{len(TEXTS) - 1}").wait_for()
        wait_until_idle(page)
        for i, text in enumerate(TEXTS):
            for kind, where in SHOWN_IN.items():
                element = page.locator(f".st-key-{kind}-{i} {where}").first
                shown = re.sub(r"\s+", " ", element.inner_text()).strip()
                assert shown == " ".join(text.split()), (kind, text)
                markup = element.locator(MARKUP).count() - (kind == "bold")
                assert markup == 0, (kind, text, element.inner_html())
