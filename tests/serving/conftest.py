"""Serving tests share one tiny pipeline and one Grounding DINO + SAM pair, loaded once, single-threaded."""

from __future__ import annotations

import io
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests.threads import torch_threads


@pytest.fixture(autouse=True, scope="package")
def _single_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="package")
def tiny_pipeline(tiny_zoo):
    from inference.pipeline import LARGenPipeline

    pipe = LARGenPipeline.from_pretrained(str(tiny_zoo / "largen-pipeline"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="package")
def masker(tiny_zoo, repo_root):
    from serving.masks import Masker

    return Masker(tiny_zoo / "grounding-dino", tiny_zoo / "sam")


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def noise_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="package")
def live_server(tiny_pipeline, masker):
    """(url, app): one uvicorn server for the package, on 127.0.0.1 and a free port, in a thread here."""
    import uvicorn

    from serving.app import ServeSettings, create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY: see serving.cli
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    app = create_app(tiny_pipeline, ServeSettings(default_steps=2), masker)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the test server did not start in 30 s"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()
