"""The app: `create_app(pipeline, settings, masker)` → a FastAPI app with the API under /v1 and the editor at /.

Every input goes through the same checks as `largen inpaint` (`inference.cli`); a bad one is a
4xx with a one-line JSON `{"detail": ...}` naming the form field. Uploads are decoded by PIL only
(no pickle anywhere); the pipeline runs on one worker thread behind a bounded queue
(`serving.queue`).
"""

from __future__ import annotations

import argparse
import base64
import functools
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image

from inference import cli
from inference.cli import CLIError, ImageTooLarge
from serving.queue import Abandoned, Cancelled, InferenceQueue, QueueFull

STATIC = Path(__file__).resolve().parent / "static"
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Responses that are not a success all look alike: JSON with a one-line "detail".
_ERRORS = {code: {"description": text, "content": {"application/json": {"example": {"detail": "..."}}}}
           for code, text in [(401, "missing or wrong bearer token"), (404, "no such session"),
                              (413, "upload or image too large"), (422, "bad input (the reason names the field)"),
                              (503, "queue full (see Retry-After) or models not loaded"), (504, "timed out")]}


@dataclass
class ServeSettings:
    """What the server allows; the defaults suit one CPU or GPU serving a handful of users.

    Attributes:
        token: bearer token every /v1 request must carry; None: no token.
        max_queue: jobs queued or running before the server answers 503 + Retry-After.
        timeout_s: per-request limit on the model work (queue wait included); 504 after it.
        max_upload_bytes: largest request body (413 above).
        max_pixels: largest image, width x height, checked from the header before decoding (413).
        max_sessions: editing sessions kept in memory (the least recently used goes first).
        default_steps: denoising steps when a request gives none.
        device: the torch device the pipeline runs on.
    """

    token: str | None = None
    max_queue: int = 8
    timeout_s: float = 300.0
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 4096 * 4096
    max_sessions: int = 32
    default_steps: int = 50
    device: str = "cpu"


class _Problem(Exception):
    def __init__(self, status: int, detail: str, headers: dict | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "bad request"


def _option(name: str, text: str | None, default):
    """A numeric form field parsed by the same type function as the CLI flag of that name."""
    if text is None or text == "":
        return default
    try:
        return cli.OPTION_TYPES[name](text)
    except argparse.ArgumentTypeError as err:
        raise _Problem(422, f"{name} {err}") from err


def _flag(name: str, text: str | None, default: bool) -> bool:
    if text is None or text == "":
        return default
    value = text.strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise _Problem(422, f"{name} must be true or false, got {text!r}")


class _Uploads:
    """Reads and decodes uploaded files within the settings' limits."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings

    async def image(self, upload: UploadFile | None, name: str) -> Image.Image | None:
        if upload is None:
            return None
        data = await upload.read(self.settings.max_upload_bytes + 1)
        if len(data) > self.settings.max_upload_bytes:
            raise _Problem(413, f"{name} is over the upload limit of {self.settings.max_upload_bytes:,} bytes")
        if not data:
            raise _Problem(422, f"{name} is an empty file")
        try:
            return cli.decode_image(BytesIO(data), name, max_pixels=self.settings.max_pixels)
        except ImageTooLarge as err:
            raise _Problem(413, str(err)) from err
        except CLIError as err:
            raise _Problem(422, str(err)) from err


def _png(image: Image.Image) -> bytes:
    buf = BytesIO()
    # Level 1: several times faster than PIL's default 6 on large images, for somewhat bigger files.
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "image/png" not in accept


def _image_response(request: Request, image: Image.Image, info: dict) -> Response:
    """PNG bytes, or JSON with the PNG in base64 plus `info`, as the Accept header asks."""
    data = _png(image)
    if _wants_json(request):
        return JSONResponse({"image": base64.b64encode(data).decode(), "width": image.width,
                             "height": image.height, **info})
    return Response(data, media_type="image/png")


class _Sessions:
    """Editing sessions by id, the least recently used dropped past `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, session) -> str:
        sid = uuid.uuid4().hex
        with self._lock:
            self._items[sid] = session
            while len(self._items) > self.limit:
                self._items.popitem(last=False)
        return sid

    def get(self, sid: str):
        with self._lock:
            if sid not in self._items:
                raise _Problem(404, f"no session {sid!r} (it may have expired: the server keeps {self.limit})")
            self._items.move_to_end(sid)
            return self._items[sid]

    def delete(self, sid: str) -> None:
        with self._lock:
            if self._items.pop(sid, None) is None:
                raise _Problem(404, f"no session {sid!r}")


def _turn_info(index: int, turn) -> dict:
    options = {k: v for k, v in turn.options.items() if isinstance(v, int | float | bool | str | None)}
    mask = list(turn.mask) if isinstance(turn.mask, tuple | list) else "image"
    return {"turn": index, "prompt": turn.prompt, "subject": turn.subject is not None, "mask": mask, **options}


class _Guard:
    """Pure ASGI middleware: refuse an oversized body from its declared length, and a /v1 request
    without the bearer token, before a byte of the body is read. (Not BaseHTTPMiddleware: that
    wraps `receive`, and the routes could then no longer see a client go away.)"""

    def __init__(self, app, settings: ServeSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            refusal = self._refusal(scope["path"], headers)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, path: str, headers: dict) -> Response | None:
        limit = self.settings.max_upload_bytes
        length = headers.get("content-length", "")
        # The limit is on each file; the form's other fields and boundaries get 64 KiB on top.
        if length.isdigit() and int(length) > limit + 64 * 1024:
            return JSONResponse({"detail": f"request body of {int(length):,} bytes is over the limit of {limit:,}"},
                                status_code=413)
        if self.settings.token and path.startswith("/v1/"):
            given = headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.settings.token}".encode()):
                return JSONResponse({"detail": "missing or wrong bearer token (Authorization: Bearer TOKEN)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return None


def create_app(pipeline, settings: ServeSettings | None = None, masker=None) -> FastAPI:
    """Build the app around an already loaded pipeline (and optionally a `serving.masks.Masker`).

    Args:
        pipeline: a `LARGenPipeline`, moved to `settings.device` already.
        settings: limits, token, queue size; defaults when None.
        masker: Grounding DINO + SAM for `/v1/mask` and the editor's click / word masks; None turns
            those off (503).

    Returns:
        The FastAPI app; `app.state.queue` is its `InferenceQueue`.
    """
    import torch

    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        queue.shutdown()

    app = FastAPI(
        lifespan=lifespan,
        title="LAR-Gen",
        version=cli._version(),
        description="Promptable inpainting (text, subject image, or both). Errors are JSON "
        '`{"detail": "one line"}`; /v1 routes need `Authorization: Bearer TOKEN` when the server has a token.',
    )
    queue = InferenceQueue(settings.max_queue)
    sessions = _Sessions(settings.max_sessions)
    uploads = _Uploads(settings)
    jobs: OrderedDict[str, Any] = OrderedDict()  # request id -> Job, for /v1/progress
    app.state.queue, app.state.settings, app.state.sessions = queue, settings, sessions

    @app.exception_handler(_Problem)
    async def _problem(_: Request, err: _Problem):
        return JSONResponse({"detail": err.detail}, status_code=err.status, headers=err.headers)

    @app.exception_handler(CLIError)
    async def _bad_input(_: Request, err: CLIError):
        return JSONResponse({"detail": _one_line(str(err))}, status_code=413 if isinstance(err, ImageTooLarge) else 422)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return JSONResponse({"detail": _one_line(f"{where}: {first.get('msg', 'invalid')}")}, status_code=422)

    @app.exception_handler(Exception)
    async def _failed(_: Request, err: Exception):
        # Starlette still logs the traceback; the client gets one line, like every other error.
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return JSONResponse({"detail": f"internal error: {type(err).__name__}: {first}".rstrip(": ")}, status_code=500)

    app.add_middleware(_Guard, settings=settings)

    async def run_job(request: Request, fn):
        try:
            job = queue.submit(fn)
        except QueueFull as err:
            raise _Problem(503, f"{err}; retry after {err.retry_after} s", {"Retry-After": str(err.retry_after)}) from err
        rid = request.headers.get("x-request-id", "")
        if REQUEST_ID.match(rid):
            jobs[rid] = job
            while len(jobs) > 256:
                jobs.popitem(last=False)
        try:
            return await queue.run(job, settings.timeout_s, request.is_disconnected)
        except Abandoned as err:
            if err.reason == "timeout":
                raise _Problem(504, f"the request took longer than {settings.timeout_s:g} s and was cancelled") from err
            raise _Problem(499, "the client went away; the work was cancelled") from err
        except Cancelled as err:
            raise _Problem(503, "the work was cancelled (the server is shutting down)") from err
        except CLIError as err:
            raise _Problem(422, str(err)) from err
        except ValueError as err:
            raise _Problem(422, f"cannot inpaint: {str(err).splitlines()[0]}") from err

    def step_callback(job, steps: int):
        def callback(_pipe, i, _t, tensors):
            job.step(i + 1, steps)
            return tensors

        return callback

    async def inpaint_inputs(image, mask, box, prompt, subject, subject_mask, beta, steps, guidance, seed, zoom, refine):
        """The checked pipeline arguments of a request (the CLI's checks, with form field names)."""
        has_text = cli.check_guidance_inputs(prompt, subject is not None, subject_mask is not None,
                                             ("prompt", "subject", "subject_mask"))
        if (mask is None) == (box is None or box == ""):
            raise _Problem(422, "give exactly one of mask (an image) or box (x0,y0,x1,y1)")
        options = {
            "beta": _option("beta", beta, None),
            "num_inference_steps": _option("steps", steps, settings.default_steps),
            "guidance_scale": _option("guidance", guidance, 7.5),
            "seed": _option("seed", seed, 0),
            "zoom_in": _flag("zoom", zoom, True),
            "use_refine": _flag("refine", refine, True),
        }
        cli.check_steps(pipeline, options["num_inference_steps"], "steps")
        src = image if isinstance(image, Image.Image) else await uploads.image(image, "image")
        if mask is not None:
            where = cli.check_mask(await uploads.image(mask, "mask"), src, "mask", "mask", "image")
        else:
            where = cli.parse_box(box, src.size, "box")
        subj = None
        if subject is not None:
            subj = cli.check_subject(await uploads.image(subject, "subject"),
                                     await uploads.image(subject_mask, "subject_mask"),
                                     "subject", "subject_mask", "subject", "subject_mask")
        return src, where, (prompt if has_text else None), subj, options

    def pipeline_kwargs(job, options: dict) -> dict:
        kwargs = {k: v for k, v in options.items() if k != "seed"}
        kwargs["generator"] = torch.Generator(device=settings.device).manual_seed(options["seed"])
        kwargs["callback_on_step_end"] = step_callback(job, options["num_inference_steps"])
        return kwargs

    def info(result_or_turn, options: dict, prompt) -> dict:
        used = {k: options[k] for k in ("num_inference_steps", "guidance_scale", "seed", "zoom_in", "use_refine")}
        return {"prompt": prompt, "parameters": {**used, "beta": getattr(result_or_turn, "beta", options["beta"])}}

    # ------------------------------------------------------------------ health
    @app.get("/healthz", tags=["health"], summary="the process is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="the models are loaded", responses={503: _ERRORS[503]})
    async def readyz():
        body = {"pipeline": pipeline is not None, "masks": masker is not None, "queue": queue.pending,
                "max_queue": settings.max_queue}
        return JSONResponse({"status": "ready" if pipeline is not None else "loading", **body},
                            status_code=200 if pipeline is not None else 503)

    # ------------------------------------------------------------------ inpainting
    @app.post("/v1/inpaint", tags=["inpaint"], summary="inpaint a region (PNG, or JSON with Accept: application/json)",
              responses={200: {"content": {"image/png": {}}}, **_ERRORS})
    async def inpaint(
        request: Request,
        image: UploadFile = File(..., description="source image"),
        mask: UploadFile | None = File(None, description="mask, same size as image (white = inpaint)"),
        box: str | None = Form(None, description="or the region as x0,y0,x1,y1 pixels"),
        prompt: str | None = Form(None),
        subject: UploadFile | None = File(None, description="subject image (RGBA: alpha = subject)"),
        subject_mask: UploadFile | None = File(None, description="mask of the subject (white = subject)"),
        beta: str | None = Form(None, description="image prompt strength in [0, 2] (default: the mode's)"),
        steps: str | None = Form(None),
        guidance: str | None = Form(None),
        seed: str | None = Form(None),
        zoom: str | None = Form(None, description="true (default) / false"),
        refine: str | None = Form(None, description="true (default) / false"),
    ):
        src, where, text, subj, options = await inpaint_inputs(
            image, mask, box, prompt, subject, subject_mask, beta, steps, guidance, seed, zoom, refine)

        def work(job):
            return pipeline(cli._to_rgb(src), where, prompt=text, subject_image=subj, **pipeline_kwargs(job, options))

        result = await run_job(request, work)
        return _image_response(request, result.images[0],
                               {"mode": result.mode, "crop_box": list(result.crop_box), **info(result, options, text)})

    @app.get("/v1/progress/{request_id}", tags=["inpaint"], summary="progress of the request sent with X-Request-Id")
    async def progress(request_id: str):
        job = jobs.get(request_id)
        if job is None:
            raise _Problem(404, f"no request {request_id!r} (send X-Request-Id with the request)")
        return {"state": job.state, "step": job.steps_done, "steps": job.steps_total}

    # ------------------------------------------------------------------ masks
    @app.post("/v1/mask", tags=["mask"], summary="a mask from clicks (SAM) or words (Grounding DINO → SAM)",
              responses={200: {"content": {"image/png": {}}}, **_ERRORS})
    async def mask_from_prompt(
        request: Request,
        image: UploadFile = File(...),
        points: str | None = Form(None, description="clicks as x,y;x,y (pixels)"),
        labels: str | None = Form(None, description="1 (object) or 0 (background) per click, as 1,0 (default all 1)"),
        text: str | None = Form(None, description="what to find, e.g. 'cat' or 'cat . dog'"),
        box_threshold: str | None = Form(None),
        text_threshold: str | None = Form(None),
    ):
        if masker is None:
            raise _Problem(503, "this server has no mask models: start it with --profile tiny|full")
        has_points, has_text = bool(points and points.strip()), bool(text and text.strip())
        if has_points == has_text:
            raise _Problem(422, "give exactly one of points (x,y;x,y) or text")
        src = await uploads.image(image, "image")
        if has_points:
            clicks = _points(points, src.size)
            marks = _labels(labels, len(clicks))

            def work(_job):
                return masker.from_points(src, clicks, marks)
        else:
            from serving.masks import NothingFound

            thresholds = (_unit("box_threshold", box_threshold, 0.25), _unit("text_threshold", text_threshold, 0.2))

            def work(_job):
                try:
                    return masker.from_text(src, text, *thresholds)
                except NothingFound as err:
                    raise CLIError(str(err)) from err
                except ValueError as err:
                    # e.g. the tiny zoo's Grounding DINO on a square image: its smallest feature map
                    # is 1x1 and GroupNorm refuses it. Say which model refused which input.
                    raise CLIError(f"image: Grounding DINO cannot process this {src.width}x{src.height} image "
                                   f"({str(err).splitlines()[0]})") from err

        result = await run_job(request, work)
        return _image_response(request, result.mask, {"score": result.score, "boxes": result.boxes})

    # ------------------------------------------------------------------ sessions
    @app.post("/v1/sessions", tags=["sessions"], status_code=201, summary="start a multi-turn editing session",
              responses=_ERRORS)
    async def create_session(image: UploadFile = File(...)):
        from inference.session import EditingSession

        src = await uploads.image(image, "image")
        sid = sessions.add(EditingSession(pipeline, cli._to_rgb(src)))
        return {"id": sid, "turns": 0, "width": src.width, "height": src.height}

    @app.get("/v1/sessions/{sid}", tags=["sessions"], summary="the session's history", responses=_ERRORS)
    async def session_history(sid: str):
        session = sessions.get(sid)
        return {"id": sid, "turns": len(session), "width": session.initial.width, "height": session.initial.height,
                "history": [_turn_info(i + 1, t) for i, t in enumerate(session.history)]}

    @app.get("/v1/sessions/{sid}/image", tags=["sessions"], summary="the current image (or after turn N)",
             responses={200: {"content": {"image/png": {}}}, **_ERRORS})
    async def session_image(request: Request, sid: str, turn: int | None = None):
        session = sessions.get(sid)
        if turn is None:
            image = session.current
        elif 0 <= turn <= len(session):
            image = session.history[turn - 1].output if turn else session.initial
        else:
            raise _Problem(422, f"turn must be in [0, {len(session)}], got {turn}")
        return _image_response(request, image, {"turns": len(session)})

    @app.post("/v1/sessions/{sid}/turns", tags=["sessions"], summary="apply one turn to the current image",
              responses={200: {"content": {"image/png": {}}}, **_ERRORS})
    async def session_turn(
        request: Request,
        sid: str,
        mask: UploadFile | None = File(None),
        box: str | None = Form(None),
        prompt: str | None = Form(None),
        subject: UploadFile | None = File(None),
        subject_mask: UploadFile | None = File(None),
        beta: str | None = Form(None),
        steps: str | None = Form(None),
        guidance: str | None = Form(None),
        seed: str | None = Form(None),
        zoom: str | None = Form(None),
        refine: str | None = Form(None),
    ):
        session = sessions.get(sid)
        src, where, text, subj, options = await inpaint_inputs(
            session.current, mask, box, prompt, subject, subject_mask, beta, steps, guidance, seed, zoom, refine)

        def work(job):
            kwargs = pipeline_kwargs(job, options)
            out = session.edit(where, prompt=text, subject_image=subj, **kwargs)
            # The callback and generator served this turn only; the history keeps plain values.
            turn = session.history[-1]
            turn.options.pop("callback_on_step_end", None)
            turn.options.pop("generator", None)
            turn.options["seed"] = options["seed"]
            return out, turn

        out, turn = await run_job(request, work)
        body = info(turn, options, text)
        body["parameters"]["beta"] = turn.options.get("beta")
        return _image_response(request, out, {"turns": len(session), **body})

    @app.post("/v1/sessions/{sid}/undo", tags=["sessions"], summary="drop the last turn; returns the restored image",
              responses={200: {"content": {"image/png": {}}}, **_ERRORS})
    async def session_undo(request: Request, sid: str):
        session = sessions.get(sid)
        try:
            image = session.undo()
        except IndexError as err:
            raise _Problem(409, "nothing to undo: the session has no turns") from err
        return _image_response(request, image, {"turns": len(session)})

    @app.delete("/v1/sessions/{sid}", tags=["sessions"], status_code=204, summary="forget a session")
    async def session_delete(sid: str):
        sessions.delete(sid)
        return Response(status_code=204)

    # ------------------------------------------------------------------ editor
    @app.get("/", include_in_schema=False)
    async def editor():
        return FileResponse(STATIC / "editor.html", media_type="text/html")

    @app.get("/examples/{name}.png", include_in_schema=False)
    async def example(name: str):
        if name not in EXAMPLES:
            raise _Problem(404, f"no example {name!r}; there are {', '.join(EXAMPLES)}")
        return Response(_example_png(name), media_type="image/png", headers={"Cache-Control": "max-age=86400"})

    app.state.started = time.time()
    return app


# Pictures the editor offers to pick (scikit-image's bundled photos, so they work offline).
EXAMPLES = ("astronaut", "chelsea", "coffee", "rocket")


@functools.lru_cache(maxsize=len(EXAMPLES))
def _example_png(name: str) -> bytes:
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    image.thumbnail((512, 512))
    return _png(image)


def _points(text: str, size: tuple[int, int]) -> list[tuple[float, float]]:
    w, h = size
    clicks = []
    for part in text.replace(" ", "").split(";"):
        try:
            x, y = (float(v) for v in part.split(","))
        except ValueError:
            raise _Problem(422, f"points must be x,y;x,y (pixels), got {text!r}") from None
        if not (0 <= x < w and 0 <= y < h):
            raise _Problem(422, f"points: ({x:g}, {y:g}) is outside the {w}x{h} image")
        clicks.append((x, y))
    if len(clicks) > 64:
        raise _Problem(422, f"points: at most 64 clicks, got {len(clicks)}")
    return clicks


def _labels(text: str | None, n: int) -> list[int]:
    if not text:
        return [1] * n
    values = [v.strip() for v in text.split(",")]
    if len(values) != n or any(v not in ("0", "1") for v in values):
        raise _Problem(422, f"labels must be {n} values of 1 (object) or 0 (background), got {text!r}")
    return [int(v) for v in values]


def _unit(name: str, text: str | None, default: float) -> float:
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise _Problem(422, f"{name} must be a number in [0, 1], got {text!r}")
    return value
