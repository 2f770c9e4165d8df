"""Single-subject jobs: refine a prior, apply a saved model, write a built-in prior."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import RefinerConfig
from ..exceptions import CheckpointError, InvalidImageError
from .inputs import (
    check_images_and_prior,
    load_brain_mask,
    load_image,
    load_truth,
    make_builtin_prior,
    refinement_facts,
    start_run,
    subject_prior,
    volume_change_warning,
)
from .results import (
    ReportSpec,
    absolute,
    check_outputs,
    finish_subject,
    output_transaction,
    sidecar_path_for,
    sidecar_record,
    training_section,
    voxel_volume_mm3,
)
from .types import PathLike, PriorSpec, Progress, RunOptions, SubjectOutputs, SubjectResult

__all__ = ["compute_prior", "predict_subject", "refine_subject"]

logger = logging.getLogger("cgc_refine.workflow")


def _image_paths(images: Sequence[PathLike]) -> tuple[Path, ...]:
    """The image files as paths; at least one.

    Raises
    ------
    InvalidImageError
    """
    if isinstance(images, (str, Path)) or not images:
        raise InvalidImageError(f"pass a list of image files (the lesion-bright one first), got {images!r}")
    return tuple(Path(p) for p in images)


def _inputs(images: Sequence[Path], *extra: PathLike | None) -> list[Path]:
    return [*images, *(Path(p) for p in extra if p is not None)]


def _brain_record(brain_mask: PathLike | None) -> str | None:
    return absolute(brain_mask) if brain_mask else "derived"


def _truth_record(truth: PathLike | None) -> dict[str, str | None]:
    return {"truth": absolute(truth)} if truth else {}


# --------------------------------------------------------------------------------------------
# Single subject: prior -> refiner -> mask
# --------------------------------------------------------------------------------------------


def refine_subject(
    images: Sequence[PathLike], prior: PriorSpec | PathLike, outputs: SubjectOutputs,
    config: RefinerConfig | None = None, *, brain_mask: PathLike | None = None,
    truth: PathLike | None = None, options: RunOptions | None = None, progress: Progress | None = None,
) -> SubjectResult | None:
    """Refine the prior of one subject into a lesion mask and write the outputs.

    Parameters
    ----------
    images : sequence of path
        The subject's image files, the lesion-bright one (FLAIR, CT) first.
    prior : PriorSpec, str or Path
        The prior: a built-in name, a prior file, or a :class:`PriorSpec`.
    outputs : SubjectOutputs
        Where to write.
    config : RefinerConfig, optional
        Training and inference settings (default: the paper's).
    brain_mask : path, optional
        Brain mask on the image grid (default: derived from the image).
    truth : path, optional
        Ground-truth mask: Dice and other scores go to the sidecar (and the report).
    options : RunOptions, optional
        Seed, device, threads, overwrite, modality.
    progress : Progress, optional
        Progress hooks (default: silent).

    Returns
    -------
    SubjectResult or None
        None on the non-zero ranks of a ``torchrun`` launch (only rank 0 predicts and writes).

    Raises
    ------
    CGCRefineError
        Any anticipated failure (unreadable input, existing output, uninformative prior...),
        raised before any output is written.
    """
    started = time.perf_counter()
    options, progress = options or RunOptions(), progress or Progress()
    config = (config or RefinerConfig()).validate()
    spec = (prior if isinstance(prior, PriorSpec) else PriorSpec(prior)).check()
    image_paths = _image_paths(images)
    outputs.check(_inputs(image_paths, spec.path, brain_mask, truth), options.overwrite)
    check_images_and_prior(image_paths, spec.path)
    device, threads = start_run(options.device, options.threads, warn_full_on_cpu=config)
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    volume = load_image(image_paths)
    brain = load_brain_mask(brain_mask, volume, options.modality)
    truth_mask = load_truth(truth, volume) if truth else None
    timings["load_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    pmap, prior_record = subject_prior(spec, volume, brain, modality=options.modality, device=device)
    timings["prior_s"] = time.perf_counter() - tick
    progress.note(f"prior{_prior_reading(pmap.params)}: {_diagnostics_line(prior_record['diagnostics'])}")
    fitted = _fit_and_predict(pmap, volume, brain, config, options, device, progress, timings)
    if fitted is None:
        return None
    refiner, probability, mask, refinement = fitted
    sidecar = sidecar_record(
        "segment", options.command_line,
        inputs={"images": [absolute(p) for p in image_paths],
                "prior": prior_record.get("path", str(spec.source)),
                "brain_mask": _brain_record(brain_mask), **_truth_record(truth)},
        outputs={"mask": absolute(outputs.mask), "probability": absolute(outputs.probability),
                 "model": absolute(outputs.model)},
        prior=prior_record, modality=options.modality, seed=options.seed, device=str(refiner.device_),
        threads=threads, threshold=float(config.threshold), min_size_mm3=float(config.min_size_mm3),
        config=config.to_dict(), training=training_section(refiner),
        lesion=_lesion(mask, volume, prior_record["foreground_voxels"]), refinement=refinement,
        timings=timings,
    )
    report = _report_spec(outputs, options.modality, f"refined lesion mask (prior: {spec.label})",
                          image_paths[0], {"prior": spec.label, "modality": options.modality,
                                           "network widths": "-".join(map(str, config.channels)),
                                           "iterations": int(refiner.n_iter_),
                                           "threshold": float(config.threshold),
                                           "min lesion size (mm^3)": float(config.min_size_mm3),
                                           "seed": options.seed, "device": str(refiner.device_)})
    return _finish(volume, mask, probability, sidecar, outputs, options, progress, started,
                   prior=pmap.data, truth=truth_mask, report=report, refiner=refiner)


def _fit_and_predict(
    pmap: Any, volume: Any, brain: Any, config: RefinerConfig, options: RunOptions, device: Any,
    progress: Progress, timings: dict[str, float],
) -> tuple[Any, Any, Any, dict[str, Any]] | None:
    """Train on the subject, predict, post-process and guard; None on a non-zero torchrun rank."""
    from ..distributed import is_main_process
    from ..refiner import Refiner

    try:
        refiner = Refiner([pmap], config=config, prior_kind="auto", modality=options.modality,
                          device=str(device), random_state=options.seed,
                          callback=progress.training(config.iterations))
        tick = time.perf_counter()
        refiner.fit([volume], brain_masks=[brain])
        timings["train_s"] = time.perf_counter() - tick
        if not is_main_process():
            return None  # under torchrun only rank 0 predicts and writes
        tick = time.perf_counter()
        probability = refiner.predict_proba(volume, brain, prior=pmap, progress=progress.inference())
        mask = refiner.postprocess(probability, volume.spacing, affine=volume.affine, brain_mask=brain)
        timings["inference_s"] = time.perf_counter() - tick
    finally:
        progress.close()
    mask, refinement = _guarded(refiner, pmap, probability, mask, volume, brain)
    return refiner, probability, mask, refinement


def _guarded(refiner: Any, pmap: Any, probability: Any, mask: Any, volume: Any, brain: Any) -> tuple[Any, dict[str, Any]]:
    """The label-free facts of a refinement (the sidecar's ``refinement`` block), then the
    collapse guard on the mask: what both the single-subject job and ``predict --prior`` do."""
    refinement = refinement_facts(refiner, refiner.config_, pmap.data, probability, mask)
    mask, refinement["guard"] = refiner.guard(mask, _guard_reference(refiner, refiner.config_, pmap, volume, brain))
    return mask, refinement


def _guard_reference(refiner: Any, config: RefinerConfig, pmap: Any, volume: Any, brain: Any) -> Any:
    """The mask the guard compares with: the cleaned prior the output was blended with (the
    prior itself when there was no blend or no clean-up)."""
    import numpy as np

    from ..cleanup import CleanupSettings, clean_probability

    reference = getattr(refiner, "blend_reference_", None)
    if reference is None and config.cleanup != "none":
        reference = clean_probability(pmap.data, volume.spacing, CleanupSettings(pattern=config.cleanup),
                                      brain_mask=brain, affine=volume.affine).probability
    if reference is None:
        reference = pmap.data
    return (reference >= 0.5).astype(np.uint8)


def _lesion(mask: Any, volume: Any, prior_voxels: int | None) -> dict[str, Any]:
    """The sidecar's ``lesion`` section; warns when the mask is far from the prior's size."""
    voxels = int(mask.sum())
    lesion: dict[str, Any] = {"voxels": voxels, "volume_mm3": voxels * voxel_volume_mm3(volume)}
    if prior_voxels is not None:
        lesion["fraction_of_prior"] = voxels / prior_voxels if prior_voxels else None
        lesion["prior_volume_mm3"] = prior_voxels * voxel_volume_mm3(volume)
        change = volume_change_warning(prior_voxels, voxels)
        if change:
            logger.warning(change)
    return lesion


def _report_spec(outputs: SubjectOutputs, modality: str, what: str, image: Path,
                 settings: dict[str, Any]) -> ReportSpec | None:
    if not outputs.report:
        return None
    png, html = outputs.report_paths
    return ReportSpec(png=png, html=html, title=f"{image.name}: {what}", modality=modality,
                      settings={"image": image.name, **settings})


def _finish(
    volume: Any, mask: Any, probability: Any, sidecar: dict[str, Any], outputs: SubjectOutputs,
    options: RunOptions, progress: Progress, started: float, *, prior: Any | None, truth: Any | None,
    report: ReportSpec | None, refiner: Any,
) -> SubjectResult:
    """Score, report and write a segmented subject (:func:`cgc_refine.results.finish_subject`)."""

    def save_model(tx: Any) -> None:
        if outputs.model is not None:
            tx.add(refiner.save(outputs.model, overwrite=options.overwrite))

    for key, value in (outputs.sidecar_fields or {}).items():
        sidecar.setdefault(key, value)  # placed after the head by the schema's ordering
    written, _ = finish_subject(
        volume=volume, mask=mask, probability=probability, sidecar=sidecar,
        sidecar_path=outputs.sidecar, mask_path=outputs.mask,  # type: ignore[arg-type]
        probability_path=outputs.probability, overwrite=options.overwrite, started=started,
        prior=prior, truth=truth, report=report, before_mask=save_model,
        announce=progress.note,
    )
    lesion = sidecar["lesion"]
    prior_mm3 = lesion.get("prior_volume_mm3")
    return SubjectResult(
        outputs=outputs, written=tuple(written), sidecar=sidecar,
        lesion_ml=lesion["volume_mm3"] / 1000.0,
        prior_ml=None if prior_mm3 is None else prior_mm3 / 1000.0,
        seconds=time.perf_counter() - started,
    )


def _prior_reading(params: dict[str, Any]) -> str:
    """`` (read as percent)`` for a prior file whose kind was inferred from its values, so the
    result line says how it was read (the adapters' warning gives the reason); else ``""``."""
    kind = params.get("kind_inferred")
    return f" (read as {kind})" if kind else ""


def _diagnostics_line(diagnostics: dict[str, Any]) -> str:
    from ..priors.diagnostics import diagnostics_summary

    return diagnostics_summary(diagnostics)


# --------------------------------------------------------------------------------------------
# Saved model: apply it to one subject
# --------------------------------------------------------------------------------------------


def predict_subject(
    model: PathLike, images: Sequence[PathLike], outputs: SubjectOutputs, *,
    prior: PriorSpec | PathLike | None = None,
    brain_mask: PathLike | None = None, truth: PathLike | None = None, threshold: float | None = None,
    min_size_mm3: float | None = None, options: RunOptions | None = None, progress: Progress | None = None,
    loaded_models: dict[tuple[str, str], Any] | None = None,
) -> SubjectResult:
    """Segment one subject with a saved model (``fit`` or ``--save-model``) and write the outputs.

    Parameters
    ----------
    model : path
        The model file.
    images : sequence of path
        The subject's images, the modalities of the model in its order.
    outputs : SubjectOutputs
        Where to write (``outputs.model`` is ignored).
    prior : PriorSpec, str or Path, optional
        This subject's prior (built-in name or file). With it the output is what the
        single-subject job gives: the network blended with the cleaned prior
        (``output_blend``), guarded against collapse; a model trained with
        ``intensity_alignment="prior"`` needs it. Without it, the network's output alone.
    brain_mask, truth : path, optional
        As for :func:`refine_subject`.
    threshold, min_size_mm3 : float, optional
        Post-processing settings (default: the model's configuration).
    options : RunOptions, optional
        Device, threads, overwrite (the seed and modality are the model's).
    progress : Progress, optional
        Progress hooks.
    loaded_models : dict, optional
        Models already read, by (resolved path, device); a run over many subjects passes one
        dict so that the model file is read once, not once per subject.

    Returns
    -------
    SubjectResult

    Raises
    ------
    CheckpointError
        When the model cannot be read, is a training checkpoint, or has other channels.
    """
    from .models import load_model

    started = time.perf_counter()
    options, progress = options or RunOptions(), progress or Progress()
    image_paths = _image_paths(images)
    spec = None if prior is None else (prior if isinstance(prior, PriorSpec) else PriorSpec(prior)).check()
    prior_path = None if spec is None else spec.path
    outputs.check(_inputs(image_paths, model, brain_mask, truth, prior_path), options.overwrite)
    check_images_and_prior(image_paths, prior_path)
    device, threads = start_run(options.device, options.threads)
    tick = time.perf_counter()
    key = (str(Path(model).resolve()), str(device))
    refiner = None if loaded_models is None else loaded_models.get(key)
    if refiner is None:
        refiner = load_model(Path(model), str(device))
        if loaded_models is not None:
            loaded_models[key] = refiner
    volume = load_image(image_paths)
    if volume.n_channels != refiner.n_channels_in_:
        raise CheckpointError(
            f"the model '{model}' was trained on {refiner.n_channels_in_} channel(s) but "
            f"{volume.n_channels} image(s) were given; pass the same modalities, in the same order"
        )
    brain = load_brain_mask(brain_mask, volume, refiner.modality)
    truth_mask = load_truth(truth, volume) if truth else None
    timings = {"load_s": time.perf_counter() - tick}
    pmap, prior_record = None, None
    if spec is not None:
        tick = time.perf_counter()
        pmap, prior_record = subject_prior(spec, volume, brain, modality=refiner.modality, device=device)
        timings["prior_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    try:
        probability = refiner.predict_proba(volume, brain, prior=pmap, progress=progress.inference())
        mask = refiner.postprocess(probability, volume.spacing, threshold=threshold,
                                   min_size_mm3=min_size_mm3, affine=volume.affine, brain_mask=brain)
    finally:
        progress.close()
    timings["inference_s"] = time.perf_counter() - tick
    refinement = None
    if pmap is not None:
        mask, refinement = _guarded(refiner, pmap, probability, mask, volume, brain)
    used_threshold = float(refiner.config_.threshold if threshold is None else threshold)
    used_min_size = float(refiner.config_.min_size_mm3 if min_size_mm3 is None else min_size_mm3)
    sidecar = sidecar_record(
        "predict", options.command_line,
        inputs={"model": absolute(model), "images": [absolute(p) for p in image_paths],
                **({} if spec is None else {"prior": prior_record.get("path", str(spec.source))}),
                "brain_mask": _brain_record(brain_mask), **_truth_record(truth)},
        outputs={"mask": absolute(outputs.mask), "probability": absolute(outputs.probability)},
        model={"n_iter": int(refiner.n_iter_), "n_channels": int(refiner.n_channels_in_),
               "crop_size": list(refiner.crop_size_),
               "inference_window": training_section(refiner)["inference_window"],
               "priors": refiner.priors_},
        modality=refiner.modality, seed=int(refiner.random_state), device=str(refiner.device_),
        threads=threads, threshold=used_threshold, min_size_mm3=used_min_size,
        config=refiner.config_.to_dict(), timings=timings,
        lesion=_lesion(mask, volume, None if prior_record is None else prior_record["foreground_voxels"]),
        **({} if pmap is None else {"prior": prior_record, "refinement": refinement}),
    )
    report = _report_spec(outputs, refiner.modality, f"lesion mask (model: {Path(model).name})",
                          image_paths[0], {"model": Path(model).name, "modality": refiner.modality,
                                           "training iterations": int(refiner.n_iter_),
                                           "threshold": used_threshold,
                                           "min lesion size (mm^3)": used_min_size,
                                           "device": str(refiner.device_)})
    return _finish(volume, mask, probability, sidecar, outputs, options, progress, started,
                   prior=None if pmap is None else pmap.data, truth=truth_mask, report=report, refiner=None)


# --------------------------------------------------------------------------------------------
# A built-in prior on its own
# --------------------------------------------------------------------------------------------


def compute_prior(
    name: str, images: Sequence[PathLike], output: PathLike, *, brain_mask: PathLike | None = None,
    cleanup: str = "auto", options: RunOptions | None = None, progress: Progress | None = None,
) -> tuple[Path, ...]:
    """Compute a built-in prior, clean it up, and write it as a float32 map.

    Parameters
    ----------
    name : str
        One of :data:`cgc_refine.priors.BUILTIN_PRIORS`.
    images : sequence of path
        The subject's images, the lesion-bright one first.
    output : path
        The prior map (``.nii.gz``); its sidecar is ``<stem>.json`` next to it.
    brain_mask : path, optional
        Brain mask (default: derived).
    cleanup : {"auto", "focal", "multifocal", "none"}
        Lesion pattern of the label-free clean-up applied to the prior (:mod:`cgc_refine.cleanup`;
        the default, ``"auto"``, is what the single-subject job applies to its training target);
        ``"none"`` writes the prior as computed.
    options, progress
        As for :func:`refine_subject`.

    Returns
    -------
    tuple of Path
        The files written (the map, then the sidecar).
    """
    from ..io import save_probability_map
    from ..priors import prior_diagnostics, resolve_prior_name

    started = time.perf_counter()
    options, progress = options or RunOptions(), progress or Progress()
    image_paths, out_path = _image_paths(images), Path(output)
    sidecar_path = sidecar_path_for(out_path)
    check_outputs([out_path], [(sidecar_path, "sidecar")], _inputs(image_paths, brain_mask),
                  options.overwrite)
    device, threads = start_run(options.device, options.threads)
    volume = load_image(image_paths)
    brain = load_brain_mask(brain_mask, volume, options.modality)
    tick = time.perf_counter()
    pmap = make_builtin_prior(name, options.modality, device).compute(volume, brain)
    pmap, cleanup_info = _clean_prior(pmap, volume, brain, cleanup, progress)
    prior_seconds = time.perf_counter() - tick
    diagnostics = prior_diagnostics(pmap, brain, volume.spacing)  # warns on an empty or huge prior
    resolved = resolve_prior_name(name, options.modality)
    shown = f"{name} ({resolved})" if name == "auto" else name
    progress.note(f"prior {shown}: {_diagnostics_line(diagnostics)}")
    sidecar = sidecar_record(
        "prior", options.command_line,
        inputs={"images": [absolute(p) for p in image_paths], "brain_mask": _brain_record(brain_mask)},
        outputs={"prior": absolute(out_path)},
        prior={"name": name, "resolved_name": resolved, "kind": pmap.source, "params": pmap.params,
               "foreground_voxels": int((pmap.data[brain] >= 0.5).sum()),
               "diagnostics": diagnostics, "cleanup": cleanup_info},
        modality=options.modality, device=str(device), threads=threads,
        timings={"prior_s": prior_seconds},
    )
    with output_transaction(options.overwrite) as tx:
        tx.add(save_probability_map(pmap.data, volume, out_path, overwrite=options.overwrite))
        sidecar["timings"]["total_s"] = time.perf_counter() - started
        tx.write_json(sidecar_path, sidecar)
    return tuple(tx.written)


def _clean_prior(pmap: Any, volume: Any, brain: Any, cleanup: str,
                 progress: Progress) -> tuple[Any, dict[str, Any] | None]:
    """The prior after the label-free clean-up ``cleanup`` (unchanged for ``"none"``)."""
    if cleanup == "none":
        return pmap, None
    from ..cleanup import CleanupSettings, clean_probability

    cleaned = clean_probability(pmap.data, volume.spacing, CleanupSettings(pattern=cleanup),
                                brain_mask=brain, affine=volume.affine)
    info = cleaned.info
    progress.note(f"clean-up ({info['pattern']}): {info['voxels_before']} -> {info['voxels_after']} voxels")
    return type(pmap)(cleaned.probability, pmap.affine, pmap.source, pmap.params), info
