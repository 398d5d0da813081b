"""The grading viewer's HTTP side, served by Streamlit's own server (st.App in app.py): the
OpenSeadragon library that `make install` fetched from npm, the Deep Zoom tiles of the
photographs that pages have shown (engine.data.tiles makes and caches them), and the small layers
laid over a photograph (the model's input, Grad-CAM).

A page names a photograph to the browser by a token, an HMAC of its path under a key made
when the server starts: only a page that showed the photograph hands out its URLs, the same
photograph keeps its URLs across reruns (the browser caches its tiles), and no URL outlives
the server."""

import hashlib
import hmac
import secrets
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from engine.data.images import ImageError
from engine.data.tiles import VIEWS, Prefetcher, Pyramids, TileCache
from engine.runtime.workspace import Workspace

PREFIX = "/viewer"
LIBRARY = Path(__file__).resolve().parents[1] / "node_modules" / "openseadragon" / "build" / "openseadragon"
MAX_SHOWN = 2048  # photographs whose tokens stay valid; the oldest shown go first
CACHE_FOR = "private, max-age=3600"
_KEY = secrets.token_bytes(32)


@dataclass
class Shown:
    """A photograph a page has shown, and the layers it laid over it (name -> version, PNG)."""

    photo: Path
    layers: dict[str, tuple[str, bytes]] = field(default_factory=dict)


class Registry:
    """Tokens of the photographs shown, shared by the pages' script threads and the routes."""

    def __init__(self, limit: int = MAX_SHOWN) -> None:
        self.limit = limit
        self.shown: OrderedDict[str, Shown] = OrderedDict()
        self.lock = threading.Lock()

    def show(self, photo: Path) -> str:
        token = hmac.new(_KEY, str(photo.resolve()).encode(), hashlib.sha256).hexdigest()[:32]
        with self.lock:
            self.shown.setdefault(token, Shown(photo))
            self.shown.move_to_end(token)
            while len(self.shown) > self.limit:
                self.shown.popitem(last=False)
        return token

    def add_layer(self, token: str, name: str, pixels: np.ndarray) -> str:
        """Lay an RGB or RGBA image over a shown photograph; returns its version, for the URL,
        so that the browser fetches it again only when it changed."""
        version = f"{zlib.crc32(pixels.tobytes()):08x}"
        with self.lock:
            if self.shown[token].layers.get(name, (None,))[0] == version:
                return version
        png = cv2.imencode(
            ".png", cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGRA if pixels.shape[2] == 4 else cv2.COLOR_RGB2BGR)
        )[1]
        with self.lock:
            self.shown[token].layers[name] = (version, png.tobytes())
        return version

    def get(self, token: str) -> Shown | None:
        with self.lock:
            return self.shown.get(token)


REGISTRY = Registry()
PREFETCHER = Prefetcher()  # the next card's photograph, made while this one is graded


@lru_cache(maxsize=1)
def tile_cache() -> TileCache:
    """The tiles of this server's workspace, one cache for every page and route."""
    return TileCache(Workspace.from_env().cache / "tiles")


def _not_found(what: str) -> Response:
    return Response(f"{what} not found", status_code=404, media_type="text/plain")


def library(request: Request) -> Response:
    """openseadragon.min.js and its images, from node_modules."""
    path = (LIBRARY / request.path_params["path"]).resolve()
    if not path.is_relative_to(LIBRARY) or not path.is_file():
        return _not_found("file")
    return FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})


def _pyramids(token: str) -> Pyramids | Response:
    """The pyramids of a shown photograph, made on the first request unless they were made
    ahead (a prefetch under way is waited for rather than done twice); else the reply that
    says why not."""
    shown = REGISTRY.get(token)
    if shown is None:
        return _not_found("photograph")
    PREFETCHER.wait(shown.photo)
    try:
        return tile_cache().pyramids(shown.photo)
    except ImageError as exc:
        return Response(str(exc), status_code=422, media_type="text/plain")


def ready(request: Request) -> Response:
    """204 once the photograph's tiles are made: the browser asks before it fetches the next
    card's tiles ahead, so that they do not hold its few connections while being made."""
    found = _pyramids(request.path_params["token"])
    return found if isinstance(found, Response) else Response(status_code=204)


def tile(request: Request) -> Response:
    """One Deep Zoom tile."""
    params = request.path_params
    if params["view"] not in VIEWS:
        return _not_found("view")
    found = _pyramids(params["token"])
    if isinstance(found, Response):
        return found
    path = tile_cache().tile_path(found.key, params["view"], params["level"], params["col"], params["row"])
    if path is None:
        return _not_found("tile")
    # A tile is a few kB: read whole here, rather than streamed in chunks by FileResponse.
    return Response(path.read_bytes(), media_type="image/jpeg", headers={"Cache-Control": CACHE_FOR})


def layer(request: Request) -> Response:
    """A layer a page laid over a photograph, as PNG."""
    shown = REGISTRY.get(request.path_params["token"])
    layer = shown and shown.layers.get(request.path_params["name"])
    if not layer:
        return _not_found("layer")
    return Response(layer[1], media_type="image/png", headers={"Cache-Control": CACHE_FOR})


# Sync endpoints: Starlette runs them in its thread pool, so a pyramid being made never
# holds up the server's event loop.
ROUTES = [
    Route(f"{PREFIX}/lib/{{path:path}}", library),
    Route(f"{PREFIX}/{{token}}/{{view}}_files/{{level:int}}/{{col:int}}_{{row:int}}.jpeg", tile),
    Route(f"{PREFIX}/{{token}}/layer/{{name}}.png", layer),
    Route(f"{PREFIX}/{{token}}/ready", ready),
]
