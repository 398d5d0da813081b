"""A page for tests/test_literal.py: each text of $LITERAL_TEXTS (a JSON list) through
engine.runtime.markdown.literal into every kind of element that draws markdown, one element a container
keyed <kind>-<index>."""

import json
import os

import numpy as np
import streamlit as st

from engine.runtime.markdown import literal


def draw_every_kind(shown: str, i: int) -> None:
    """`shown` in every kind of element, each in its container <kind>-<i>."""
    kinds = {
        "markdown": lambda: st.markdown(shown),
        "bold": lambda: st.markdown(f"**{shown}**"),
        "caption": lambda: st.caption(shown),
        "alert": lambda: st.warning(shown),
        "subheader": lambda: st.subheader(shown, anchor=False),
        "metric": lambda: st.metric(shown, 1),
        "expander": lambda: st.expander(shown),
        "button": lambda: st.button(shown, key=f"press-{i}"),
        "image": lambda: st.image(np.zeros((8, 8, 3), np.uint8), caption=shown),
        "progress": lambda: st.progress(0.5, text=shown),
        "radio": lambda: st.radio("Choice", [shown], key=f"choose-{i}"),
    }
    for kind, draw in kinds.items():
        with st.container(key=f"{kind}-{i}"):
            draw()


for i, text in enumerate(json.loads(os.environ["LITERAL_TEXTS"])):
    draw_every_kind(literal(text), i)
