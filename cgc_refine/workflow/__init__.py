"""The jobs of the toolkit as library functions: the command line is a thin shell over them.

:func:`refine_subject` is the whole single-subject job: load the image(s), compute or read
the prior, clean it, fit a CGC refiner on this subject, predict, post-process, and write the
mask, the optional probability map, model and report, and the JSON sidecar.
:func:`predict_subject` applies a saved model, :func:`compute_prior` writes a built-in prior
and :func:`fit_cohort` trains one model on a cohort. ``cgc-refine``,
``examples/refine_one_subject.py`` and ``benchmarks/cli_real_case.py`` all call them, so
Python and the command line cannot drift.

Each job checks every input and output before any compute, writes its outputs all or nothing
(:func:`~cgc_refine.workflow.results.output_transaction`), describes them in one sidecar
schema (:func:`~cgc_refine.workflow.results.sidecar_record`), reports progress through a
:class:`Progress` hook rather than printing, and returns what it wrote with its summary facts.

Modules: :mod:`.types` (inputs, options, result), :mod:`.inputs` (reading and checking),
:mod:`.subject` (single-subject jobs), :mod:`.fit` (cohort training), :mod:`.models` (saved
models and checkpoints), :mod:`.results` (output names, writing, sidecar, report).

Example
-------
>>> from cgc_refine import RefinerConfig
>>> from cgc_refine.workflow import SubjectOutputs, refine_subject
>>> result = refine_subject(["sub-01_FLAIR.nii.gz"], "auto",
...                         SubjectOutputs.next_to("sub-01_FLAIR.nii.gz"),
...                         RefinerConfig.fast())  # doctest: +SKIP
>>> result.lesion_ml, result.change_ml  # doctest: +SKIP
"""

from __future__ import annotations

from .fit import checkpoint_path_for, find_cohort, fit_cohort
from .subject import compute_prior, predict_subject, refine_subject
from .types import (
    MASK_SUFFIX,
    FitResult,
    PROBSEG_SUFFIX,
    PriorSpec,
    Progress,
    RunOptions,
    SubjectOutputs,
    SubjectResult,
)

__all__ = [
    "MASK_SUFFIX",
    "PROBSEG_SUFFIX",
    "FitResult",
    "PriorSpec",
    "Progress",
    "RunOptions",
    "SubjectOutputs",
    "SubjectResult",
    "checkpoint_path_for",
    "compute_prior",
    "find_cohort",
    "fit_cohort",
    "predict_subject",
    "refine_subject",
]
