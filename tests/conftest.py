"""Shared test fixtures and the ``slow`` marking.

Quick local runs: ``python -m pytest -m "not slow"`` skips the tests that start other
processes (torchrun jobs, the installed console script) or run the example scripts end to
end; CI runs everything.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch

#: A test that calls one of these helpers runs the installed ``cgc-refine`` console script
#: (or torchrun) in a subprocess, and is marked ``slow`` wherever it lives.
_SUBPROCESS_HELPERS = ("_console_script", "_torchrun")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that runs the console script or torchrun in a subprocess as ``slow``."""
    for item in items:
        function = getattr(item, "function", None)
        names = getattr(getattr(function, "__code__", None), "co_names", ())
        if any(helper in names for helper in _SUBPROCESS_HELPERS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def keep_torch_threads() -> Iterator[None]:
    """Restore torch's intra-op thread count after the test (the CLI and fits change it)."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def one_torch_thread(keep_torch_threads: None) -> Iterator[None]:
    """Run a test on one torch thread (restored afterwards).

    On the 2-core CI machine, small tensor operations with two threads spend most of their
    time waiting for each other; one thread keeps the model tests several times faster.
    """
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def phantom() -> Any:
    """The 40 x 40 x 20 phantom (2 mm slices, 3 lesions, seed 1) that the refiner, data and
    sampling tests share; one per test module, so a test that edits it cannot leak."""
    from cgc_refine.phantom import make_phantom

    return make_phantom((40, 40, 20), spacing=(1.0, 1.0, 2.0), n_lesions=3, seed=1)


@pytest.fixture(autouse=True)
def _restore_library_logger() -> Iterator[None]:
    """Give every test the ``cgc_refine`` logger as it was (a CLI run sets its level)."""
    logger = logging.getLogger("cgc_refine")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    for handler in list(logger.handlers):
        if handler not in handlers:
            logger.removeHandler(handler)
