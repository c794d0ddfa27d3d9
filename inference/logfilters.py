"""Silences one known, harmless transformers warning that every lar-gen command would otherwise print.

lar-gen installs no torchvision on purpose (it comes only with a multi-GB CUDA torch build), so
transformers' `CLIPImageProcessor` / `SiglipImageProcessor` names resolve to their PIL backends,
which are the backends lar-gen's preprocessing is written and tested against. diffusers imports
those names at module import, and transformers then warns once per name on every command. The
filter drops exactly that message, so a warning that does show up means something.
"""

from __future__ import annotations

import logging

_LOGGER = "transformers.utils.import_utils"


class _PilFallbackFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("requires torchvision (not installed); falling back to" in message
                    and "ImageProcessorPil" in message)


def silence_pil_fallback_warning() -> None:
    """Install the filter once on transformers' import-utils logger (idempotent)."""
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(f, _PilFallbackFilter) for f in logger.filters):
        logger.addFilter(_PilFallbackFilter())
