"""Inference tests run torch single-threaded: tiny models on a shared 2-core machine are far faster that way."""

from __future__ import annotations

import pytest

from tests.threads import torch_threads


@pytest.fixture(autouse=True, scope="package")
def _single_torch_thread():
    with torch_threads(1):
        yield
