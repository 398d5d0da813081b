"""DR grading: `streamlit run app.py`.

`streamlit run` finds `app` below and serves it: the pages, and beside them the routes of the
grading viewer (its library and tiles, views/tile_server.py) and of the sign-in cookie
(views/sign_in_cookie.py). Each browser session's script run executes this file as __main__,
which draws the page (views/shell.py)."""

import streamlit as st

if __name__ == "__main__":
    from views.shell import main

    main()
else:
    from views import sign_in_cookie, tile_server

    app = st.App("app.py", routes=tile_server.ROUTES + sign_in_cookie.ROUTES)
