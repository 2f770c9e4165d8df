"""Small helpers shared by several modules."""

from __future__ import annotations

import math
import os
from typing import Any

__all__ = ["jsonable"]


def jsonable(value: Any, *, strict: bool = False) -> Any:
    """Convert a nested value to plain JSON types.

    NumPy scalars and arrays (and torch tensors) become Python numbers and lists, tuples and
    sets become lists, paths become strings, dictionary keys become strings. The result holds
    only dict, list, str, int, float, bool and None, which both ``json.dumps`` and
    ``torch.load(weights_only=True)`` accept. With ``strict``, NaN and infinities become
    None (strict JSON has no such numbers) and unknown objects their ``str``.
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v, strict=strict) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v, strict=strict) for v in value]
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return None if strict and not math.isfinite(value) else value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return jsonable(value.tolist(), strict=strict)
    return str(value) if strict else value
