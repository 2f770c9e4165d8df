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


@pytest.fixture(autouse=True)
def _restore_library_logger():
    """Give every test the ``cgc_refine`` logger as it was (a CLI run sets its level)."""
    import logging

    logger = logging.getLogger("cgc_refine")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    for handler in list(logger.handlers):
        if handler not in handlers:
            logger.removeHandler(handler)
