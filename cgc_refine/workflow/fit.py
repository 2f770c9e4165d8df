"""Train one model on a cohort (no ground truth used) and save it with its sidecar."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import RefinerConfig
from ..exceptions import InvalidImageError, InvalidPriorError, OutputNotWritableError
from .inputs import check_images_and_prior, make_builtin_prior, start_run
from .models import resume_checkpoint
from .results import absolute, check_outputs, output_transaction, sidecar_path_for
from .results import sidecar_record, training_section
from .types import FitResult, PathLike, Progress, RunOptions

__all__ = ["checkpoint_path_for", "find_cohort", "fit_cohort"]

logger = logging.getLogger("cgc_refine.workflow")


def checkpoint_path_for(model: PathLike) -> Path:
    """The training checkpoint of a fit writing ``model``: ``<model>.ckpt`` next to it."""
    model = Path(model)
    return model.with_name(model.name + ".ckpt")


def find_cohort(
    *, cohort: PathLike | None = None, image_patterns: Sequence[str] = (), prior_pattern: str | None = None,
    mask_pattern: str | None = None, csv: PathLike | None = None,
) -> tuple[list[Any], str]:
    """The subjects of a cohort folder (with file patterns) or a subjects CSV.

    Returns
    -------
    (list of Subject, str)
        The subjects (:class:`cgc_refine.cohort.Subject`) and where they were found, for messages.

    Raises
    ------
    InvalidImageError
        When nothing is found, or a subject has no image.
    InvalidPriorError
        When some subjects have a prior file and others not.
    """
    from ..cohort import find_subjects, read_subjects_csv

    if cohort is not None:
        subjects = find_subjects(cohort, list(image_patterns), prior=prior_pattern, brain_mask=mask_pattern)
        where = f"cohort folder '{cohort}' (patterns {list(image_patterns)})"
    else:
        csv_path = Path(csv)  # type: ignore[arg-type]
        if not csv_path.is_file():
            raise InvalidImageError(f"subjects CSV '{csv_path}' does not exist; check the path")
        subjects = read_subjects_csv(csv_path)
        where = f"CSV '{csv_path}'"
    if not subjects:
        raise InvalidImageError(f"no subject found in {where}; check the folder and the patterns")
    for subject in subjects:
        if not subject.images:
            raise InvalidImageError(f"subject {subject.name!r} has no image in {where}")
    with_prior = [s for s in subjects if s.prior is not None]
    if with_prior and len(with_prior) != len(subjects):
        missing = [s.name for s in subjects if s.prior is None]
        raise InvalidPriorError(
            f"{len(missing)} subject(s) have no prior file ({', '.join(missing[:5])}); give every "
            "subject a prior, or none and use a built-in --prior (e.g. auto)"
        )
    return subjects, where


def _check_fit(subjects: Sequence[Any], model: Path, sidecar: Path, overwrite: bool) -> None:
    if model.is_dir():
        raise OutputNotWritableError(
            f"-o '{model}' is a folder; fit writes one model file, e.g. -o '{model / 'model.pt'}'"
        )
    inputs = [p for s in subjects for p in (*s.images, s.prior, s.brain_mask) if p is not None]
    check_outputs([], [(model, "model"), (sidecar, "sidecar")], inputs, overwrite)
    for subject in subjects:
        check_images_and_prior(subject.images, subject.prior)


def _checkpoints(model: Path, *, every: int, resume: bool, seed: int,
                 rounds: int) -> tuple[Path | None, Path | None]:
    """The checkpoint to write (with ``every``) and the one to resume from (with ``resume``)."""
    from .._utils import check_writable_target

    checkpoint = checkpoint_path_for(model)
    resume_path = resume_checkpoint(checkpoint, seed=seed, rounds=rounds) if resume else None
    if resume_path is None and checkpoint.is_file():
        logger.warning("'%s' is left from an earlier interrupted fit; this fit starts afresh (add "
                       "--resume to continue from it) and removes it when it finishes", checkpoint)
    if every:
        check_writable_target(checkpoint, True, what="checkpoint")
    return (checkpoint if every else None), resume_path


def fit_cohort(
    subjects: Sequence[Any], model: PathLike, config: RefinerConfig | None = None, *,
    prior: str | None = None, prior_kind: str = "auto", resample_prior: bool = False,
    cache_dir: PathLike | None = None, checkpoint_every: int = 0, resume: bool = False,
    sources: dict[str, Any] | None = None, options: RunOptions | None = None,
    progress: Progress | None = None,
) -> FitResult | None:
    """Train one refiner on a cohort and write the model and its sidecar.

    Parameters
    ----------
    subjects : sequence of Subject
        From :func:`find_cohort`; either every subject has a prior file or none has.
    model : path
        The model file to write; its sidecar is ``<stem>.json``.
    config : RefinerConfig, optional
        Training settings (default: the paper's).
    prior : str, optional
        Built-in prior for a cohort without prior files (default ``"gmm"``).
    prior_kind, resample_prior
        How to read prior files.
    cache_dir : path, optional
        Preprocess each subject once into this folder.
    checkpoint_every : int
        Write ``<model>.ckpt`` every N iterations (0: none); removed when the fit finishes.
    resume : bool
        Continue from ``<model>.ckpt``.
    sources : dict, optional
        Where the subjects came from (cohort folder, patterns, CSV), for the sidecar.
    options, progress
        Seed, device, threads, overwrite, modality; progress hooks.

    Returns
    -------
    FitResult or None
        None on the non-zero ranks of a ``torchrun`` launch (only rank 0 writes).

    Raises
    ------
    CGCRefineError
        Before any training, for bad inputs or outputs; ``UsageError``-like conflicts
        (prior files and a built-in prior) as :class:`InvalidPriorError`.
    """
    started = time.perf_counter()
    options, progress = options or RunOptions(), progress or Progress()
    config = (config or RefinerConfig()).validate()
    model_path = Path(model)
    sidecar_path = sidecar_path_for(model_path)
    with_files = any(s.prior is not None for s in subjects)
    if with_files and prior is not None:
        raise InvalidPriorError("the cohort has prior files; drop --prior or the prior pattern/column")
    prior_name = None if with_files else (prior or "gmm")
    _check_fit(subjects, model_path, sidecar_path, options.overwrite)
    device, threads = start_run(options.device, options.threads, warn_full_on_cpu=config)
    checkpoint, resume_path = _checkpoints(model_path, every=checkpoint_every, resume=resume,
                                           seed=options.seed, rounds=config.rounds)
    refiner, train_seconds = _train(subjects, config, prior_name, prior_kind, resample_prior, device,
                                    cache_dir, checkpoint, checkpoint_every, resume_path, options, progress)
    from ..distributed import is_main_process

    if not is_main_process():
        return None  # under torchrun only rank 0 writes
    prior_seconds = float(refiner.timings_["priors_s"])
    sidecar = sidecar_record(
        "fit", options.command_line,
        inputs={**(sources or {}), "subjects": _subject_records(subjects, refiner.priors_, prior_name)},
        outputs={"model": absolute(model_path)},
        prior={"name": prior_name or "file", "kind_requested": prior_kind},
        modality=options.modality, seed=options.seed, device=str(refiner.device_), threads=threads,
        n_channels=refiner.n_channels_in_, config=config.to_dict(),
        training={**training_section(refiner), "resumed_from": absolute(resume_path)},
        timings={"load_and_prior_s": prior_seconds, "train_s": train_seconds - prior_seconds},
        distributed={"world_size": int(refiner.timings_["world_size"])},
    )
    with output_transaction(options.overwrite) as tx:
        tx.add(refiner.save(model_path, overwrite=options.overwrite))
        sidecar["timings"]["total_s"] = time.perf_counter() - started
        tx.write_json(sidecar_path, sidecar)
    _remove_obsolete(checkpoint_path_for(model_path))
    return FitResult(model=model_path, written=tuple(tx.written), sidecar=sidecar,
                     seconds=time.perf_counter() - started)


def _train(subjects: Sequence[Any], config: RefinerConfig, prior_name: str | None, prior_kind: str,
           resample: bool, device: Any, cache_dir: PathLike | None, checkpoint: Path | None, every: int,
           resume_path: Path | None, options: RunOptions, progress: Progress) -> tuple[Any, float]:
    """Fit the refiner; subjects are read one at a time inside ``fit`` (only the preprocessed
    arrays are kept; with ``cache_dir``, not even those). Returns it and the seconds taken."""
    from ..priors import FilePrior
    from ..refiner import Refiner

    if prior_name is not None:
        if prior_kind != "auto":
            logger.warning("--prior-kind %s is ignored for the built-in prior %s", prior_kind, prior_name)
        prior_arg: Any = make_builtin_prior(prior_name, options.modality, device)
    else:
        prior_arg = [FilePrior(s.prior, kind=prior_kind, resample=resample) for s in subjects]
    volumes = [[str(p) for p in s.images] for s in subjects]
    masks = [None if s.brain_mask is None else str(s.brain_mask) for s in subjects]
    try:
        refiner = Refiner(prior_arg, config=config, modality=options.modality, device=str(device),
                          random_state=options.seed, callback=progress.training(config.iterations))
        tick = time.perf_counter()
        refiner.fit(volumes, brain_masks=masks, cache_dir=cache_dir, checkpoint_path=checkpoint,
                    checkpoint_every=every, resume_from=resume_path)
    finally:
        progress.close()
    return refiner, time.perf_counter() - tick


def _subject_records(subjects: Sequence[Any], provenances: Sequence[dict[str, Any]],
                     prior_name: str | None) -> list[dict[str, Any]]:
    """The per-subject inputs of the fit sidecar: images, brain mask, prior provenance."""
    records = []
    for subject, provenance in zip(subjects, provenances):
        params = dict(provenance.get("params") or {})
        file_record = params.pop("file", None)
        prior_record = ({"name": "file", **file_record} if file_record else
                        {"name": prior_name, "kind_requested": None, "resampled": False})
        records.append({"subject": subject.name, "images": [absolute(p) for p in subject.images],
                        "brain_mask": absolute(subject.brain_mask) if subject.brain_mask else "derived",
                        "prior": {**prior_record, "kind": provenance.get("source"), "params": params}})
    return records


def _remove_obsolete(checkpoint: Path) -> None:
    """Remove the training checkpoint of a finished model (a warning if that fails)."""
    if not checkpoint.is_file():
        return
    try:
        checkpoint.unlink()
        logger.info("removed the training checkpoint '%s'", checkpoint)
    except OSError as error:
        logger.warning("could not remove the obsolete training checkpoint '%s' (%s); delete "
                       "it by hand", checkpoint, error.strerror or error)
