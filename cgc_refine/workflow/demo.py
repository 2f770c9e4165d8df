"""The demo job: refine the GMM prior of a synthetic phantom, optionally writing every file.

Synthetic phantoms exercise the code; they say nothing about accuracy on real data.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RefinerConfig
from ..exceptions import OutputNotWritableError
from .results import ReportSpec, absolute, check_outputs, finish_subject, report_paths_for, sidecar_record
from .types import MASK_SUFFIX, PROBSEG_SUFFIX, Progress, RunOptions

__all__ = ["DEMO_NOISE", "DEMO_SHAPE", "DemoResult", "check_demo_folder", "run_demo"]

DEMO_SHAPE = (48, 48, 24)
#: Image noise of the demo phantom (standard deviation; tissue contrasts are 0.15-0.5), high
#: enough that a voxel-wise GMM leaves speckle for the network's spatial context to remove.
DEMO_NOISE = 0.15

_NAMES = {
    "image": "phantom_FLAIR.nii.gz",
    "truth": "phantom_label-lesion_truth.nii.gz",
    "prior": "phantom_FLAIR_label-lesion_desc-gmm_probseg.nii.gz",
    "mask": f"phantom_FLAIR_{MASK_SUFFIX}.nii.gz",
    "probability": f"phantom_FLAIR_{PROBSEG_SUFFIX}.nii.gz",
}


@dataclass(frozen=True)
class DemoResult:
    """The demo's facts: Dice of prior and refined mask, lesion voxels, timings, files."""

    prior_dice: float
    refined_dice: float
    lesion_voxels: int
    device: str
    timings: dict[str, float]
    written: tuple[Path, ...] = ()


def check_demo_folder(folder: Path | None, *, report: bool, overwrite: bool) -> None:
    """Check the demo's output folder (an existing one, or one that can be created) before compute."""
    if report:
        from ..report import require_matplotlib

        require_matplotlib("--report")
    if folder is None:
        return
    if folder.exists() and not folder.is_dir():
        raise OutputNotWritableError(f"-o '{folder}' is a file; the demo writes into a folder")
    if folder.is_dir():
        paths = [folder / name for name in _NAMES.values()]
        plain = [(folder / f"phantom_FLAIR_{MASK_SUFFIX}.json", "sidecar")]
        if report:
            png, html = report_paths_for(folder / _NAMES["mask"])
            plain += [(png, "report image"), (html, "report page")]
        check_outputs(paths, plain, [], overwrite)
        return
    parent = folder.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputNotWritableError(
            f"cannot create output folder '{folder}': '{parent}' is missing or not "
            "writable; choose another folder"
        )


def run_demo(
    config: RefinerConfig, *, shape: tuple[int, int, int] = DEMO_SHAPE, folder: Path | None = None,
    report: bool = False, options: RunOptions | None = None, progress: Progress | None = None,
) -> DemoResult:
    """Refine the GMM prior of a synthetic phantom; write every file into ``folder`` when given.

    Returns
    -------
    DemoResult
    """
    from ..metrics import dice
    from ..phantom import make_phantom
    from ..priors import GMMPrior
    from ..refiner import Refiner
    from .inputs import start_run

    started = time.perf_counter()
    options, progress = options or RunOptions(), progress or Progress()
    check_demo_folder(folder, report=report, overwrite=options.overwrite)
    device, threads = start_run(options.device, options.threads)
    grid = tuple(int(s) for s in shape)
    phantom = make_phantom(grid, seed=options.seed, noise=DEMO_NOISE)  # type: ignore[arg-type]
    volume, timings = phantom.volume, {}
    tick = time.perf_counter()
    pmap = GMMPrior(modality="mri").compute(volume)
    timings["prior_s"] = time.perf_counter() - tick
    try:
        refiner = Refiner([pmap], config=config, modality="mri", device=str(device),
                          random_state=options.seed, callback=progress.training(config.iterations))
        tick = time.perf_counter()
        refiner.fit([volume])
        timings["train_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        probability = refiner.predict_proba(volume, progress=progress.inference())
        mask = refiner.postprocess(probability, volume.spacing)
        timings["inference_s"] = time.perf_counter() - tick
    finally:
        progress.close()
    result = DemoResult(prior_dice=dice(pmap.data >= 0.5, phantom.truth),
                        refined_dice=dice(mask, phantom.truth),
                        lesion_voxels=int(phantom.truth.sum()), device=str(device), timings=timings)
    if folder is None:
        return result
    sidecar = sidecar_record(
        "demo", options.command_line, inputs={"phantom": {"shape": list(shape), "seed": options.seed}},
        outputs={k: absolute(folder / v) for k, v in _NAMES.items()},
        prior={"name": "gmm", "kind": pmap.source, "params": pmap.params}, modality="mri",
        seed=options.seed, device=str(refiner.device_), threads=threads, config=config.to_dict(),
        dice={"prior": result.prior_dice, "refined": result.refined_dice}, timings=dict(timings),
    )
    written = _write_demo(folder, phantom, pmap, mask, probability, sidecar, config, report, options, started)
    return DemoResult(**{**result.__dict__, "written": tuple(written)})


def _write_demo(folder: Path, phantom: Any, pmap: Any, mask: Any, probability: Any, sidecar: dict[str, Any],
                config: RefinerConfig, report: bool, options: RunOptions, started: float) -> list[Path]:
    """Write the phantom, its truth and prior, the refined mask and map (and report), all or nothing."""
    import numpy as np

    from ..io import save_array, save_mask, save_probability_map

    volume, overwrite = phantom.volume, options.overwrite
    paths = {k: folder / v for k, v in _NAMES.items()}
    spec = None
    if report:
        png, html = report_paths_for(paths["mask"])
        spec = ReportSpec(png=png, html=html, modality="mri",
                          title=f"synthetic phantom (seed {options.seed}): GMM prior refined, "
                                f"{config.iterations} iterations",
                          settings={"data": "synthetic phantom (exercises the code; says nothing about "
                                            "accuracy on real data)",
                                    "prior": "gmm", "network widths": "-".join(map(str, config.channels)),
                                    "iterations": int(config.iterations), "seed": options.seed,
                                    "device": sidecar["device"]})

    def inputs(tx: Any) -> None:
        tx.add(save_array(volume.data[0], volume, paths["image"], np.float32, overwrite))
        tx.add(save_mask(phantom.truth, volume, paths["truth"], overwrite=overwrite))
        tx.add(save_probability_map(pmap.data, volume, paths["prior"], overwrite=overwrite))

    created = not folder.exists()
    if created:
        folder.mkdir()
    try:
        written, _ = finish_subject(
            volume=volume, mask=mask, probability=probability, sidecar=sidecar,
            sidecar_path=folder / f"phantom_FLAIR_{MASK_SUFFIX}.json", mask_path=paths["mask"],
            probability_path=paths["probability"], overwrite=overwrite, started=started,
            prior=pmap.data, truth=phantom.truth if report else None, report=spec, before_mask=inputs,
        )
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return written
