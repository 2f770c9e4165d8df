"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread (restored afterwards).

    On the 2-core CI machine, small tensor operations with two threads spend most of their
    time waiting for each other; one thread keeps the model tests several times faster.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
