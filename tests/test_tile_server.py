"""The grading viewer's routes (views/tile_server.py) through Starlette's test client: the
library from node_modules, tiles only of photographs a page has shown, the layers laid over
them, and nothing outside either."""

import cv2
import numpy as np
import pytest
from conftest import write_image
from starlette.applications import Starlette
from starlette.testclient import TestClient

import views.tile_server as server
from engine.data.tiles import TileCache, tile_key
from views.tile_server import LIBRARY, PREFIX, ROUTES, Registry


@pytest.fixture
def client(tmp_path, monkeypatch) -> TestClient:
    monkeypatch.setattr(server, "REGISTRY", Registry(limit=2))
    monkeypatch.setattr(server, "tile_cache", lambda: TileCache(tmp_path / "tiles"))
    return TestClient(Starlette(routes=ROUTES))


def test_the_library_comes_from_node_modules_and_nothing_else(client):
    if not (LIBRARY / "openseadragon.min.js").is_file():
        pytest.fail(f"{LIBRARY} is missing: `make install` runs npm ci")
    reply = client.get(f"{PREFIX}/lib/openseadragon.min.js")
    assert reply.status_code == 200 and "OpenSeadragon" in reply.text
    assert "javascript" in reply.headers["content-type"]
    assert client.get(f"{PREFIX}/lib/../../../package.json").status_code == 404
    assert client.get(f"{PREFIX}/lib/%2e%2e/%2e%2e/package.json").status_code == 404


def test_tiles_of_a_shown_photograph_and_of_no_other(client, tmp_path):
    photo = write_image(tmp_path / "eye.png", (700, 400))
    token = server.REGISTRY.show(photo)
    assert server.REGISTRY.show(tmp_path / "." / "eye.png") == token  # one photograph, one URL
    top = f"{PREFIX}/{token}/photo_files/10/1_0.jpeg"  # 2**9 < 700 <= 2**10
    reply = client.get(top)
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/jpeg"
    tile = cv2.imdecode(np.frombuffer(reply.content, np.uint8), cv2.IMREAD_COLOR)
    assert tile.shape[:2] == (400, 700 - 509)  # the last column of native pixels, overlap in
    assert client.get(f"{PREFIX}/{token}/red-free_files/0/0_0.jpeg").status_code == 200
    assert client.get(f"{PREFIX}/{token}/ready").status_code == 204
    for missing in (
        f"{PREFIX}/{token}/photo_files/10/5_0.jpeg",
        f"{PREFIX}/{token}/grey_files/0/0_0.jpeg",
        f"{PREFIX}/{'0' * 32}/photo_files/0/0_0.jpeg",
    ):
        assert client.get(missing).status_code == 404, missing
    assert (tmp_path / "tiles" / tile_key(photo)).is_dir()


def test_an_unreadable_photograph_is_said_in_words(client, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    token = server.REGISTRY.show(broken)
    for url in (f"{PREFIX}/{token}/photo_files/0/0_0.jpeg", f"{PREFIX}/{token}/ready"):
        reply = client.get(url)
        assert reply.status_code == 422 and "unreadable" in reply.text


def test_layers_are_served_and_old_tokens_expire(client, tmp_path):
    first, second, third = (write_image(tmp_path / f"{n}.png") for n in "abc")
    token = server.REGISTRY.show(first)
    heat = np.zeros((32, 32, 4), np.uint8)
    heat[8:16, 8:16] = (255, 0, 0, 200)  # red where the evidence is, clear elsewhere
    version = server.REGISTRY.add_layer(token, "gradcam", heat)
    assert server.REGISTRY.add_layer(token, "gradcam", heat.copy()) == version
    reply = client.get(f"{PREFIX}/{token}/layer/gradcam.png?v={version}")
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    png = cv2.imdecode(np.frombuffer(reply.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert (png[..., [2, 1, 0, 3]] == heat).all()  # BGRA on disk, the same pixels
    heat[0, 0, 3] = 1
    assert server.REGISTRY.add_layer(token, "gradcam", heat) != version  # a new URL
    assert client.get(f"{PREFIX}/{token}/layer/input.png").status_code == 404
    server.REGISTRY.show(second)
    server.REGISTRY.show(third)  # the registry holds two: the first shown goes
    assert client.get(f"{PREFIX}/{token}/layer/gradcam.png").status_code == 404
