"""The HTML page of a report: the montage and a table of numbers, self-contained and escaped."""

from __future__ import annotations

import datetime
import html
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from .._utils import jsonable, write_text_atomic
from .._version import __version__

__all__ = ["write_html_report"]

logger = logging.getLogger("cgc_refine.report")


def _format_value(value: Any) -> str:
    """A table cell's text: numbers rounded for reading, NaN and None as ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isnan(number):
            return "n/a"
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        if number != 0 and (abs(number) >= 1e6 or abs(number) < 1e-3):
            return f"{number:.3e}"
        if abs(number) >= 1000:
            return f"{number:.1f}"
        return f"{number:.4g}"
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return json.dumps(jsonable(value, strict=True))


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em;
       color: #222; max-width: 70em; }
h1 { font-size: 1.3em; }
img { max-width: 100%; height: auto; background: #000; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.8em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f5f5f5; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #666; font-size: 0.85em; }
"""


def write_html_report(
    path: str | os.PathLike[str],
    *,
    title: str,
    numbers: Mapping[str, object],
    image_name: str,
    sidecar: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a short self-contained HTML page: the montage and a table of numbers.

    Parameters
    ----------
    path : path
        The HTML file to write (atomically).
    title : str
        The page title and heading.
    numbers : mapping of str to object
        Rows of the table (e.g. lesion volumes in ml, Dice, settings), in order; floats are
        rounded for display, NaN shows as ``n/a``.
    image_name : str
        The montage PNG, linked relative to the page (normally its file name in the same
        folder).
    sidecar : mapping, optional
        Provenance (e.g. the JSON sidecar) shown as JSON in a collapsed section.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    pathlib.Path
        The HTML file, as a :class:`~pathlib.Path`.

    Raises
    ------
    OutputExistsError, OutputNotWritableError
        If the file exists (without ``overwrite``) or cannot be written.

    Notes
    -----
    Every text is escaped with :func:`html.escape`; the page has no script and loads nothing
    but the PNG.
    """
    out = Path(os.fspath(path))
    esc = html.escape
    rows = []
    for key, value in numbers.items():
        text = _format_value(value)
        numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        cell = f'<td class="num">{esc(text)}</td>' if numeric else f"<td>{esc(text)}</td>"
        rows.append(f"<tr><th scope=\"row\">{esc(str(key))}</th>{cell}</tr>")
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
        f'<p><img src="{esc(quote(image_name))}" alt="{esc("slice montage: " + title)}"></p>',
        ('<p class="note">Contours at 0.5: prior yellow, refined red, ground truth green. '
         "Panels are in voxel order, drawn in millimetres.</p>"),
        "<table>",
        "<tbody>",
        *rows,
        "</tbody>",
        "</table>",
    ]
    if sidecar is not None:
        text = json.dumps(jsonable(dict(sidecar), strict=True), indent=2, allow_nan=False)
        parts += ["<details>", "<summary>Settings and provenance</summary>",
                  f"<pre>{esc(text)}</pre>", "</details>"]
    parts += [
        f'<p class="note">cgc_refine {esc(__version__)}, {esc(created)}</p>',
        "</body>",
        "</html>",
        "",
    ]
    document = "\n".join(parts)
    write_text_atomic(out, document, overwrite=overwrite)
    logger.info("wrote HTML report %s", out)
    return out
