"""Datasets: every subject of a plain folder or a BIDS dataset, their outputs, and a batch runner.

Discovery rules
---------------
*Plain folder* (:func:`find_folder_subjects`):

- **flat layout** (the folder holds NIfTI files): every ``<id><image_suffix>.nii[.gz]`` is one
  subject's lesion-bright image (``image_suffix`` is empty by default, so each file is one
  subject). Files named ``<id><role>.nii[.gz]`` are not subjects but belong to subject ``<id>``:
  ``_prior`` (a prior map), ``_brainmask`` (a brain mask) and each of ``extra_suffixes`` (further
  modalities, in order, e.g. ``("_t1",)`` with ``image_suffix="_flair"``).
- **folder layout** (no NIfTI file at the top, one sub-folder per subject): the sub-folder's name
  is the id; inside, the same rule applies and must give exactly one image; role files may also
  be named plainly (``prior.nii.gz``, ``brainmask.nii.gz``).

Hidden entries and earlier outputs of this tool (names containing ``_label-lesion``) are
ignored, so a folder can be processed again after outputs were written beside the inputs.

*BIDS dataset* (:func:`find_bids_subjects`): every ``sub-<label>[/ses-<label>]/anat/`` file
``sub-<label>[_ses-<label>][_<key>-<value>...]_<suffix>.nii[.gz]`` with the chosen suffix
(``FLAIR`` by default) and matching entity filters is one job; further modalities are found by
suffix beside it. An external prior (or brain mask) is looked up in a derivatives folder given
by the caller, in the mirrored ``sub-<label>[/ses-<label>]/anat/`` folder: a NIfTI file whose
entities include all of the source's entities and whose name matches a pattern.

Output rules
------------
BIDS jobs write to ``<root>/derivatives/cgc_refine/`` (or a chosen folder) following the BIDS
1.8 derivatives layout for masks and probabilistic segmentations
(https://bids-specification.readthedocs.io/en/v1.8.0/05-derivatives/03-imaging.html#masks)::

    sub-<label>/[ses-<label>/]anat/<source entities>_label-lesion_mask.nii.gz   (+ .json)
    sub-<label>/[ses-<label>/]anat/<source entities>_label-lesion_probseg.nii.gz

where ``<source entities>`` are the source file's entities without its suffix (``FLAIR``), with
a ``dataset_description.json`` (``DatasetType: derivative``, ``GeneratedBy``, ``DatasetLinks``
with ``raw`` pointing to the source dataset so that sidecars can name their ``Sources`` as
``bids:raw:<path>`` URIs). Plain-folder jobs write beside their image as the single-subject
command does (``<stem>_label-lesion_mask.nii.gz``), or into ``output_dir`` (flat layout), or into
``output_dir/<id>/`` (folder layout, where stems such as ``FLAIR`` repeat across subjects).
The spec's ``space-orig`` is left out (the masks are on the source's own grid), as in the
issue's layout. The probability map, sidecar and report names are those of
:mod:`cgc_refine.workflow` for the same mask path (``..._probseg``, ``<mask stem>.json``,
``<mask stem>_report.png``), so :class:`OutputPaths` maps onto
``workflow.SubjectOutputs.for_mask(paths.mask, ...)``.

Running
-------
:func:`run_dataset` calls a job function per subject, logs ``[i/n] id: ok, lesion 3.21 ml
(+0.31 (+11%) ml vs prior), 12.3 s``, stops at the first failure or, with ``keep_going``,
records it and goes on, and ends with a summary table (also written as
``cgc_refine_summary.tsv`` in the output root)::

    subjects = find_bids_subjects("ds", suffix="FLAIR")
    summary = run_dataset(subjects, lambda subject, paths: refine(subject, paths), keep_going=True)
    print(summary.table)

Errors
------
A folder or dataset that cannot be processed as a whole (missing, empty, no matching image,
subject ids or outputs that collide, a role file without its image) raises
:class:`~cgc_refine.exceptions.DatasetError`; a subject that lacks an image, a modality, its
prior or brain mask raises :class:`~cgc_refine.exceptions.InvalidImageError` or
:class:`~cgc_refine.exceptions.InvalidPriorError`. Each is a
:class:`~cgc_refine.exceptions.CGCRefineError` (one line and exit code 2 on the command line).
"""

from __future__ import annotations

from ._discovery import (
    PIPELINE_NAME,
    DatasetSubject,
    find_bids_subjects,
    find_folder_subjects,
    looks_like_bids,
    parse_bids_name,
)
from ._outputs import (
    OutputPaths,
    bids_derivatives_dir,
    bids_sidecar_fields,
    dataset_description,
    output_paths,
    plan_outputs,
    write_dataset_description,
)
from ._runner import DatasetSummary, SubjectRow, format_summary, run_dataset, write_summary_tsv

__all__ = [
    "DatasetSubject",
    "OutputPaths",
    "SubjectRow",
    "DatasetSummary",
    "PIPELINE_NAME",
    "looks_like_bids",
    "parse_bids_name",
    "find_folder_subjects",
    "find_bids_subjects",
    "bids_derivatives_dir",
    "output_paths",
    "plan_outputs",
    "dataset_description",
    "write_dataset_description",
    "bids_sidecar_fields",
    "run_dataset",
    "format_summary",
    "write_summary_tsv",
]
