"""Inference tests run torch single-threaded: tiny models on a shared 2-core machine are far faster that way."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _single_torch_thread():
    # Tiny convolutions gain nothing from intra-op threads, and on a loaded machine the thread
    # pool's spin-waits made these tests ~6x slower; restore the setting for other packages.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
