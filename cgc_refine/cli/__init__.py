"""The ``cgc-refine`` command line: a thin shell over :mod:`cgc_refine.workflow`.

Single subject (no subcommand)::

    cgc-refine --prior PRIOR --image FLAIR.nii.gz [--image T1.nii.gz ...] [--brain-mask M] [-o OUT]

``PRIOR`` is a NIfTI map (a probability map, a mask, a label map, logits or anomaly scores,
see ``--prior-kind``) or the name of a built-in prior (``gmm``, ``mumford-shah``...). The prior
is refined by a CGC U-Net trained on this one subject, and the refined mask is written next
to the first image as ``<stem>_label-lesion_mask.nii.gz`` with a JSON sidecar. ``--image FOLDER``
or ``--bids DATASET`` runs the same job on every subject found (see :mod:`.dataset`).

Subcommands: ``prior`` (write a built-in prior), ``fit`` (train one model on a cohort),
``predict`` (apply a saved model), ``evaluate`` (score masks against ground truth) and
``demo`` (a synthetic phantom end to end).

Every failure the toolkit anticipates ends in one line ``cgc-refine: error: <message>`` on
standard error and exit code 2, before any output is written; unexpected failures exit with
1 (traceback with ``-v``); an interrupt exits with 130 and leaves no partial output.

Modules: :mod:`.app` (the group's error handling and exit codes), :mod:`.console` (log lines,
progress, result lines), :mod:`.options` (shared options and those built from
:class:`~cgc_refine.config.RefinerConfig`), :mod:`.outputs` (``-o``), :mod:`.dataset`
(``--image FOLDER`` and ``--bids DATASET``: every subject of a folder or BIDS dataset), and
one module per command: :mod:`.segment` (the group: one subject), :mod:`.prior`, :mod:`.fit`,
:mod:`.predict`, :mod:`.evaluate`, :mod:`.demo`. Heavy modules (torch, nibabel, numpy) are
imported inside the commands, so ``cgc-refine --help`` answers at once.
"""

from __future__ import annotations

from ..workflow.inputs import volume_change_warning
from . import console
from .demo import demo_command
from .evaluate import METRIC_NAMES, evaluate_command
from .fit import fit_command
from .options import PRIOR_FILE_KINDS
from .predict import predict_command
from .prior import prior_command
from .segment import main

__all__ = ["main"]

for _command in (prior_command, fit_command, predict_command, evaluate_command, demo_command):
    main.add_command(_command)
del _command

# Names kept for callers of the former single-module CLI.
__all__ += ["METRIC_NAMES", "PRIOR_FILE_KINDS", "console", "volume_change_warning"]
