"""LAR-Gen inference: the model (Locate, Assign, Refine), the diffusers pipeline, multi-turn editing, CLI.

`from inference import LARGenPipeline` works; the heavy modules (torch, diffusers) are imported only
when one of these names is first used, so `import inference` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from inference.logfilters import silence_pil_fallback_warning

silence_pil_fallback_warning()

_LAZY = {
    "LARGenPipeline": "inference.pipeline",
    "LARGenPipelineOutput": "inference.pipeline",
    "LARGenXLPipeline": "inference.sdxl",
    "load_largen_pipeline": "inference.sdxl",
    "EditingSession": "inference.session",
    "LARGenModel": "inference.model",
    "AssignAdapter": "inference.model",
    "DetailEncoder": "inference.model",
    "refinenet_from_unet": "inference.model",
    "prepare_subject": "inference.subject",
    "SubjectInputs": "inference.subject",
}

__all__ = [
    "AssignAdapter",
    "DetailEncoder",
    "EditingSession",
    "LARGenModel",
    "LARGenPipeline",
    "LARGenPipelineOutput",
    "LARGenXLPipeline",
    "SubjectInputs",
    "load_largen_pipeline",
    "prepare_subject",
    "refinenet_from_unet",
]

if TYPE_CHECKING:
    from inference.model import AssignAdapter, DetailEncoder, LARGenModel, refinenet_from_unet
    from inference.pipeline import LARGenPipeline, LARGenPipelineOutput
    from inference.sdxl import LARGenXLPipeline, load_largen_pipeline
    from inference.session import EditingSession
    from inference.subject import SubjectInputs, prepare_subject


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'inference' has no attribute {name!r}")
