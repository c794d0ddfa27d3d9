"""The API over a real socket (uvicorn): a client that goes away has its queued work cancelled."""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlsplit

import requests

from tests.serving.conftest import noise_image, png_bytes


def _progress(url: str, rid: str) -> dict:
    response = requests.get(f"{url}/v1/progress/{rid}", timeout=10)
    return response.json() if response.status_code == 200 else {}


def _wait_for(url: str, rid: str, state: str) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        seen = _progress(url, rid)
        if seen.get("state") == state:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"request {rid} never reached {state!r}; last seen {seen}")


def test_a_client_that_goes_away_has_its_work_cancelled(live_server):
    url, app = live_server
    release = threading.Event()
    blocker = app.state.queue.submit(lambda job: release.wait(30))  # keeps the request below queued
    try:
        body = requests.Request(
            "POST", f"{url}/v1/inpaint", files={"image": ("a.png", png_bytes(noise_image()), "image/png")},
            data={"box": "10,10,30,30", "prompt": "x", "steps": "2"}, headers={"X-Request-Id": "gone"},
        ).prepare()
        parts = urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port)) as sock:
            head = "".join(f"{k}: {v}\r\n" for k, v in body.headers.items())
            sock.sendall(f"POST /v1/inpaint HTTP/1.1\r\nHost: {parts.netloc}\r\n{head}\r\n".encode() + body.body)
            _wait_for(url, "gone", "queued")
        # The socket is closed: the server notices within its 0.1 s poll and cancels the job.
        time.sleep(0.5)
    finally:
        release.set()
    blocker.future.result(timeout=30)
    assert _wait_for(url, "gone", "done") == {"state": "done", "step": 0, "steps": 0}  # never ran a step
    # and the server is still fine
    ok = requests.post(f"{url}/v1/inpaint", files={"image": ("a.png", png_bytes(noise_image()), "image/png")},
                       data={"box": "10,10,30,30", "prompt": "x", "steps": "2"}, timeout=60)
    assert ok.status_code == 200
