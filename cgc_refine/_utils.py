"""Small helpers shared by several modules."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["jsonable"]


def jsonable(value: Any) -> Any:
    """Convert NumPy scalars/arrays and tuples inside containers to plain JSON types.

    The result holds only dict, list, str, int, float, bool and None, which both
    ``json.dumps`` and ``torch.load(weights_only=True)`` accept.
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
