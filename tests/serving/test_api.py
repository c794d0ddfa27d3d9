"""The HTTP API on the tiny pipeline through the ASGI test client: every route, every 4xx, queue, token, limits."""

from __future__ import annotations

import base64
import io
import threading

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serving.app import ServeSettings, create_app
from tests.serving.conftest import noise_image, png_bytes

IMAGE = png_bytes(noise_image())  # 64x48
JSON = {"accept": "application/json"}


@pytest.fixture(scope="module")
def client(tiny_pipeline, masker):
    app = create_app(tiny_pipeline, ServeSettings(default_steps=2, max_pixels=200 * 200, max_upload_bytes=200_000), masker)
    with TestClient(app) as c:
        yield c


def inpaint(client, data=None, files=None, headers=None):
    files = {"image": ("a.png", IMAGE, "image/png"), **(files or {})}
    return client.post("/v1/inpaint", files=files, data={"steps": "2", **(data or {})}, headers=headers)


def png(response) -> Image.Image:
    assert response.headers["content-type"] == "image/png", response.text
    return Image.open(io.BytesIO(response.content))


def test_health_ready_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["pipeline"] and ready["masks"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/inpaint", "/v1/mask", "/v1/sessions", "/v1/sessions/{sid}/turns", "/v1/sessions/{sid}/undo"} <= set(paths)
    assert client.get("/docs").status_code == 200
    assert "LAR-Gen editor" in client.get("/").text
    example = png(client.get("/examples/chelsea.png"))
    assert example.size == (451, 300) and example.mode == "RGB"  # within 512 px: kept as it is
    assert client.get("/examples/nope.png").status_code == 404


def test_inpaint_png_and_json(client):
    out = png(inpaint(client, {"box": "10,10,30,30", "prompt": "a cat"}))
    assert out.size == (64, 48)
    body = inpaint(client, {"box": "10,10,30,30", "prompt": "a cat", "seed": "3", "refine": "false"}, headers=JSON).json()
    assert (body["width"], body["height"], body["mode"]) == (64, 48, "text")
    assert body["parameters"] == {"num_inference_steps": 2, "guidance_scale": 7.5, "seed": 3, "zoom_in": True,
                                  "use_refine": False, "beta": 0.3}
    assert Image.open(io.BytesIO(base64.b64decode(body["image"]))).size == (64, 48)


def test_inpaint_with_mask_and_subject(client):
    mask = Image.new("L", (64, 48))
    mask.paste(255, (20, 10, 40, 30))
    subject = Image.new("RGBA", (32, 32), (200, 30, 30, 255))
    body = inpaint(client, {}, {"mask": ("m.png", png_bytes(mask), "image/png"),
                                "subject": ("s.png", png_bytes(subject), "image/png")}, headers=JSON).json()
    assert body["mode"] == "subject" and body["parameters"]["beta"] == 1.0


@pytest.mark.parametrize(
    ("data", "files", "words"),
    [
        ({"box": "10,10,300,30", "prompt": "x"}, {}, "box '10,10,300,30' goes outside the 64x48 image"),
        ({"box": "1,2,3", "prompt": "x"}, {}, "box must be x0,y0,x1,y1"),
        ({"box": "10,10,30,30"}, {}, "nothing to inpaint with: give prompt, subject, or both"),
        ({"prompt": "x"}, {}, "give exactly one of mask"),
        ({"box": "10,10,30,30", "prompt": "x", "beta": "3"}, {}, "beta must be a number in [0, 2], got '3'"),
        ({"box": "10,10,30,30", "prompt": "x", "steps": "0"}, {}, "steps must be a whole number >= 1"),
        ({"box": "10,10,30,30", "prompt": "x", "steps": "5000"}, {}, "steps must be <= 1000"),
        ({"box": "10,10,30,30", "prompt": "x", "seed": "-1"}, {}, "seed must be a whole number"),
        ({"box": "10,10,30,30", "prompt": "x", "guidance": "nan"}, {}, "guidance must be a finite number"),
        ({"box": "10,10,30,30", "prompt": "x", "refine": "maybe"}, {}, "refine must be true or false"),
        ({"prompt": "x"}, {"mask": ("m.png", png_bytes(Image.new("L", (64, 48))), "image/png")}, "mask is empty"),
        ({"prompt": "x"}, {"mask": ("m.png", png_bytes(Image.new("L", (8, 8), 255)), "image/png")},
         "mask is 8x8 but image is 64x48"),
        ({"box": "10,10,30,30", "prompt": "x"}, {"image": ("a.png", b"not an image", "image/png")},
         "image is not a readable image"),
        ({"box": "10,10,30,30"}, {"subject": ("s.png", png_bytes(Image.new("RGBA", (8, 8))), "image/png")},
         "subject is fully transparent"),
        ({"box": "10,10,30,30", "prompt": "x"}, {"subject_mask": ("s.png", IMAGE, "image/png")},
         "subject_mask needs subject"),
    ],
)
def test_inpaint_bad_input_is_422_with_one_line(client, data, files, words):
    response = inpaint(client, data, files)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert words in detail and "\n" not in detail


def test_missing_field_is_one_line_422(client):
    response = client.post("/v1/inpaint", data={"box": "1,1,2,2", "prompt": "x"})
    assert response.status_code == 422 and response.json() == {"detail": "image: Field required"}


def test_upload_and_pixel_limits_are_413(client):
    big = png_bytes(noise_image(400, 400))  # ~480 kB: the declared body length is over the limit
    response = client.post("/v1/inpaint", files={"image": ("a.png", big, "image/png")}, data={"box": "1,1,9,9", "prompt": "x"})
    assert response.status_code == 413 and "bytes is over the limit of 200,000" in response.json()["detail"]
    # A body within the allowance for form fields whose file alone is over the limit: refused by the upload reader.
    response = client.post("/v1/inpaint", files={"image": ("a.png", b"x" * 210_000, "image/png")},
                           data={"box": "1,1,9,9", "prompt": "x"})
    assert response.status_code == 413
    assert response.json()["detail"] == "image is over the upload limit of 200,000 bytes"
    # A small file that declares many pixels (a decompression bomb in miniature): refused from its header.
    bomb = png_bytes(Image.new("L", (1000, 1000)))
    assert len(bomb) < 200_000
    response = client.post("/v1/inpaint", files={"image": ("a.png", bomb, "image/png")}, data={"box": "1,1,9,9", "prompt": "x"})
    assert response.status_code == 413
    assert response.json()["detail"] == "image is 1000x1000 = 1,000,000 pixels; the limit is 40,000"


def test_mask_from_a_click_and_from_words(client):
    out = png(client.post("/v1/mask", files={"image": ("a.png", IMAGE, "image/png")}, data={"points": "20,20;30,30",
                                                                                           "labels": "1,0"}))
    assert out.size == (64, 48) and out.mode == "L" and set(out.getdata()) <= {0, 255}
    body = client.post("/v1/mask", files={"image": ("a.png", IMAGE, "image/png")},
                       data={"text": "cat", "box_threshold": "0", "text_threshold": "0"}, headers=JSON).json()
    assert 1 <= len(body["boxes"]) <= 8  # the best boxes after NMS, at most 8
    assert all(0 <= b[0] < b[2] <= 64 and 0 <= b[1] < b[3] <= 48 for b in body["boxes"])


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        ({}, 422, "give exactly one of points"),
        ({"points": "1,1", "text": "cat"}, 422, "give exactly one of points"),
        ({"points": "100,1"}, 422, "points: (100, 1) is outside the 64x48 image"),
        ({"points": "a,b"}, 422, "points must be x,y;x,y"),
        ({"points": "1,1", "labels": "2"}, 422, "labels must be 1 values"),
        ({"text": "cat", "box_threshold": "1.5"}, 422, "box_threshold must be a number in [0, 1]"),
        ({"text": "cat", "box_threshold": "1", "text_threshold": "1"}, 422, "no box for 'cat'"),
        ({"text": " . , "}, 422, "names nothing to look for"),
    ],
)
def test_mask_bad_input(client, data, status, words):
    response = client.post("/v1/mask", files={"image": ("a.png", IMAGE, "image/png")}, data=data)
    assert response.status_code == status and words in response.json()["detail"], response.text


def test_mask_without_mask_models_is_503(tiny_pipeline):
    with TestClient(create_app(tiny_pipeline, ServeSettings())) as c:
        response = c.post("/v1/mask", files={"image": ("a.png", IMAGE, "image/png")}, data={"points": "1,1"})
    assert response.status_code == 503 and "--profile" in response.json()["detail"]


def test_session_turns_history_undo(client):
    created = client.post("/v1/sessions", files={"image": ("a.png", IMAGE, "image/png")})
    assert created.status_code == 201
    sid = created.json()["id"]
    assert client.post(f"/v1/sessions/{sid}/undo").status_code == 409
    first = png(client.post(f"/v1/sessions/{sid}/turns", data={"box": "0,0,20,20", "prompt": "a", "steps": "2"}))
    second = client.post(f"/v1/sessions/{sid}/turns", data={"box": "30,20,60,40", "prompt": "b", "steps": "2", "seed": "7"},
                         headers=JSON).json()
    assert second["turns"] == 2 and second["parameters"]["seed"] == 7
    history = client.get(f"/v1/sessions/{sid}").json()
    assert [t["prompt"] for t in history["history"]] == ["a", "b"] and history["history"][1]["seed"] == 7
    restored = png(client.post(f"/v1/sessions/{sid}/undo"))
    assert list(restored.getdata()) == list(first.getdata())  # back to turn 1's output
    assert client.get(f"/v1/sessions/{sid}").json()["turns"] == 1
    assert list(png(client.get(f"/v1/sessions/{sid}/image", params={"turn": 0})).getdata()) == list(
        Image.open(io.BytesIO(IMAGE)).getdata())
    assert client.get(f"/v1/sessions/{sid}/image", params={"turn": 5}).status_code == 422
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert client.get(f"/v1/sessions/{sid}").status_code == 404
    assert client.post(f"/v1/sessions/{sid}/turns", data={"box": "0,0,2,2", "prompt": "a"}).status_code == 404


def test_progress_of_a_request(client):
    assert client.get("/v1/progress/nope").status_code == 404
    assert inpaint(client, {"box": "10,10,30,30", "prompt": "x"}, headers={"x-request-id": "r1"}).status_code == 200
    assert client.get("/v1/progress/r1").json() == {"state": "done", "step": 2, "steps": 2}


def test_full_queue_is_503_with_retry_after(tiny_pipeline):
    app = create_app(tiny_pipeline, ServeSettings(max_queue=1, default_steps=2))
    release = threading.Event()
    with TestClient(app) as c:
        blocker = app.state.queue.submit(lambda job: release.wait(30))  # holds the only place
        try:
            response = inpaint(c, {"box": "10,10,30,30", "prompt": "x"})
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) >= 1 and "busy" in response.json()["detail"]
        finally:
            release.set()
        blocker.future.result(timeout=30)
        assert inpaint(c, {"box": "10,10,30,30", "prompt": "x"}).status_code == 200


def test_timeout_is_504_and_cancels_the_work(tiny_pipeline):
    app = create_app(tiny_pipeline, ServeSettings(timeout_s=0.2, default_steps=2))
    release = threading.Event()
    with TestClient(app) as c:
        blocker = app.state.queue.submit(lambda job: release.wait(30))
        try:
            response = inpaint(c, {"box": "10,10,30,30", "prompt": "x"}, headers={"x-request-id": "slow"})
            assert response.status_code == 504 and "0.2 s" in response.json()["detail"]
        finally:
            release.set()
        blocker.future.result(timeout=30)
        job = None
        for _ in range(100):  # the abandoned job reaches the worker and stops before its first step
            job = c.get("/v1/progress/slow").json()
            if job["state"] == "done":
                break
            threading.Event().wait(0.05)
        assert job == {"state": "done", "step": 0, "steps": 0}


def test_token_is_required_when_set(tiny_pipeline):
    with TestClient(create_app(tiny_pipeline, ServeSettings(token="s3cret", default_steps=2))) as c:
        assert c.get("/healthz").status_code == 200  # probes need no token
        for headers in ({}, {"authorization": "Bearer wrong"}):
            response = inpaint(c, {"box": "10,10,30,30", "prompt": "x"}, headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert inpaint(c, {"box": "10,10,30,30", "prompt": "x"}, headers={"authorization": "Bearer s3cret"}).status_code == 200


def test_a_model_failure_is_a_one_line_500(tiny_pipeline, monkeypatch):
    app = create_app(tiny_pipeline, ServeSettings(default_steps=2))

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory.\nTried to allocate ...")

    monkeypatch.setattr(type(tiny_pipeline), "__call__", broken)
    with TestClient(app, raise_server_exceptions=False) as c:
        response = inpaint(c, {"box": "10,10,30,30", "prompt": "x"})
        assert response.status_code == 500
        assert response.json() == {"detail": "internal error: RuntimeError: CUDA out of memory."}
        assert c.get("/readyz").json()["queue"] == 0  # the failed job gave its place back
