"""Serving LAR-Gen: `largen serve` — an HTTP API (FastAPI + uvicorn) and a web editor, one app.

`serving` may import `inference` (the pipeline, the CLI's input checks) and `dataengine` (the
Grounding DINO + SAM loaders and profiles for masks); neither imports `serving`. The app factory
is `serving.app.create_app(pipeline, settings, masker)`.
"""
