"""Text that users or files wrote (a name, a path, a value, a message), for use inside
Markdown, where it shows as written: the pages' (views.common) and the model card's."""

import re
import string

# CommonMark turns a backslash before any ASCII punctuation mark into that plain mark, and
# Streamlit's own markdown ($ math, :red[...] colours, :material/...: icons) starts at one of
# them too; it looks up :emoji: names only in a text that holds an unescaped :name:.
_PUNCTUATION = re.compile(f"([{re.escape(string.punctuation)}])")
_LINE_BREAKS = re.compile(r"\r\n|\r|\n")


def literal(text: object) -> str:
    """`text` for Markdown (Streamlit's st.markdown, captions, alerts and labels, or a file's
    table cells), where it shows as written: no emphasis, heading, list, table, HTML, math,
    emoji, colour, icon or link text that hides its address. A bare web address or e-mail
    still links to itself (GFM finds them after the escapes are read; only an invisible
    character, which a copy would carry, could stop it). Line breaks become spaces, so that
    it stays on the line it is put in; show text whose lines matter as code."""
    return _LINE_BREAKS.sub(" ", _PUNCTUATION.sub(r"\\\1", str(text)))
