"""The cookie that keeps a local sign-in across reloads and tabs, set and cleared by two routes
of Streamlit's own server (st.App in app.py): a script run cannot set a cookie, since it talks
to the browser over a websocket, so after a sign-in the page sends the browser to
/auth/begin with a one-time code, and that response sets the cookie and sends it back to the
page it was on.

The cookie is HttpOnly (no script of the page reads it), SameSite=Strict (no other site's page
sends it) and Secure when the page is served over HTTPS. The token itself never travels in a
URL: the code stands for it, once, for a minute, inside this server process."""

import secrets
import threading
import time
from urllib.parse import urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

COOKIE = "dr_sign_in"
PREFIX = "/auth"
CODE_LASTS = 60.0  # seconds between the sign-in and the browser's visit to /auth/begin
LOOPBACK = ("localhost", "127.0.0.1", "::1")


class Handovers:
    """Tokens waiting for their browser's visit, by one-time code."""

    def __init__(self) -> None:
        self.waiting: dict[str, tuple[str, int, float]] = {}
        self.lock = threading.Lock()

    def put(self, token: str, max_age: int) -> str:
        code, now = secrets.token_urlsafe(24), time.monotonic()
        with self.lock:
            self.waiting = {c: w for c, w in self.waiting.items() if w[2] > now}
            self.waiting[code] = (token, max_age, now + CODE_LASTS)
        return code

    def take(self, code: str) -> tuple[str, int] | None:
        with self.lock:
            token, max_age, until = self.waiting.pop(code, (None, 0, 0.0))
        return (token, max_age) if token and until > time.monotonic() else None


HANDOVERS = Handovers()


def can_keep(page_url: str | None) -> bool:
    """Whether a browser on this page keeps the cookie: over HTTPS, or plain HTTP to this
    machine. A Secure cookie is refused over plain HTTP, and an insecure one would carry the
    sign-in in clear over the network."""
    parts = urlsplit(page_url or "")
    return parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in LOOPBACK)


def _local_path(target: str | None) -> str:
    """A path on this server to return to, never another site (`//evil`, `https://evil`)."""
    target = target or "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


def begin_url(code: str) -> str:
    return f"{PREFIX}/begin?" + urlencode({"code": code})


END_URL = f"{PREFIX}/end"


def _secure(request: Request) -> bool:
    forwarded = request.headers.get("x-forwarded-proto", "")
    return request.url.scheme == "https" or forwarded.split(",")[0].strip() == "https"


def begin(request: Request) -> Response:
    """Set the cookie of a code's token, then back to the page; an unknown or late code sets
    nothing (the page then asks for the sign-in again)."""
    response = RedirectResponse(_local_path(request.query_params.get("next")), status_code=303)
    found = HANDOVERS.take(request.query_params.get("code", ""))
    if found:
        token, max_age = found
        response.set_cookie(
            COOKIE,
            token,
            max_age=max_age,
            path="/",
            httponly=True,
            samesite="strict",
            secure=_secure(request),
        )
    response.headers["Cache-Control"] = "no-store"
    return response


def end(request: Request) -> Response:
    """Clear the cookie (the page has already ended the sign-in in the database)."""
    response = RedirectResponse(_local_path(request.query_params.get("next")), status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=_secure(request))
    response.headers["Cache-Control"] = "no-store"
    return response


ROUTES = [Route(f"{PREFIX}/begin", begin), Route(f"{PREFIX}/end", end)]
