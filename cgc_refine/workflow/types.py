"""The inputs, options, outputs and result of a job: small frozen dataclasses.

:class:`PriorSpec` (where the prior comes from), :class:`SubjectOutputs` (the files of one
segmented subject), :class:`RunOptions` (seed, device, threads, overwrite, modality),
:class:`SubjectResult` (what was written, with the summary facts) and :class:`Progress`
(the hooks through which a job reports progress instead of printing).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ..exceptions import InvalidPriorError
from ..priors import BUILTIN_PRIORS
from .results import check_outputs, is_nifti_name, probseg_path_for, report_paths_for, sidecar_path_for

__all__ = [
    "FitResult",
    "MASK_SUFFIX",
    "PROBSEG_SUFFIX",
    "PathLike",
    "PriorSpec",
    "Progress",
    "RunOptions",
    "SubjectOutputs",
    "SubjectResult",
]

logger = logging.getLogger("cgc_refine.workflow")

PathLike = Union[str, Path]

#: BIDS-style suffix of the refined mask (``<image stem>_label-lesion_mask.nii.gz``).
MASK_SUFFIX = "label-lesion_mask"
#: BIDS-style suffix of the refined probability map.
PROBSEG_SUFFIX = "label-lesion_probseg"


class Progress:
    """Progress hooks of a job; this default shows nothing and logs notes at INFO.

    The command line passes one that draws progress bars (or log lines) and prints notes.
    """

    def training(self, total: int) -> Callable[[dict[str, float]], None] | None:
        """A Refiner ``callback`` advanced once per training step, or None."""
        return None

    def inference(self) -> Callable[[int, int], None] | None:
        """A ``progress(done, total)`` function for sliding-window inference, or None."""
        return None

    def note(self, message: str) -> None:
        """A result line for the user (the prior's summary, the Dice against a truth)."""
        logger.info("%s", message)

    def close(self) -> None:
        """Close any open progress display."""


@dataclass(frozen=True)
class PriorSpec:
    """Where the prior of a subject comes from.

    Parameters
    ----------
    source : str or Path
        A built-in prior name (:data:`cgc_refine.priors.BUILTIN_PRIORS`) or a NIfTI prior file.
    kind : str
        How to read a prior file (``"auto"`` or one of
        :data:`cgc_refine.priors.ADAPTER_KINDS`); ignored for a built-in prior.
    resample : bool
        Resample a prior file on another grid onto the image grid.
    on_image_grid : bool
        Take a prior file with the image's shape but another affine as on the image grid.
    """

    source: PathLike = "auto"
    kind: str = "auto"
    resample: bool = False
    on_image_grid: bool = False

    @property
    def builtin(self) -> bool:
        """Whether :attr:`source` names a built-in prior."""
        return isinstance(self.source, str) and self.source in BUILTIN_PRIORS

    @property
    def path(self) -> Path | None:
        """The prior file, or None for a built-in prior."""
        return None if self.builtin else Path(self.source)

    @property
    def label(self) -> str:
        """A short name: the built-in prior's, or the file's name."""
        return str(self.source) if self.builtin else Path(self.source).name

    def check(self) -> "PriorSpec":
        """Refuse a source that is neither a built-in name nor something like a NIfTI file.

        Raises
        ------
        InvalidPriorError
        """
        if self.builtin:
            return self
        path = Path(self.source)
        if not path.exists() and not is_nifti_name(path) and os.sep not in str(self.source):
            raise InvalidPriorError(
                f"--prior {str(self.source)!r} is neither a built-in prior ({', '.join(BUILTIN_PRIORS)}) "
                f"nor an existing file; pass {', '.join(BUILTIN_PRIORS)} or the path of a .nii.gz prior map"
            )
        return self


@dataclass(frozen=True)
class SubjectOutputs:
    """The output files of one segmented subject.

    Parameters
    ----------
    mask : Path
        The refined mask (uint8 NIfTI).
    probability : Path, optional
        The refined probability map (float32 NIfTI); not written when None.
    model : Path, optional
        The trained model; not written when None.
    report : bool
        Also write ``<mask stem>_report.png`` and ``.html`` next to the mask (needs matplotlib).
    sidecar : Path, optional
        The JSON sidecar; ``<mask stem>.json`` when None.
    sidecar_fields : mapping, optional
        Further top-level fields of the sidecar, written with it (e.g. the BIDS ``Type`` and
        ``Sources`` of a derivatives mask, :func:`cgc_refine.datasets.bids_sidecar_fields`);
        fields the sidecar has already are not replaced.
    """

    mask: Path
    probability: Path | None = None
    model: Path | None = None
    report: bool = False
    sidecar: Path | None = None
    sidecar_fields: Mapping[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask", Path(self.mask))
        if self.sidecar is None:
            object.__setattr__(self, "sidecar", sidecar_path_for(self.mask))

    @classmethod
    def next_to(cls, image: PathLike, *, folder: PathLike | None = None, probability: bool = False,
                model: PathLike | None = None, report: bool = False) -> "SubjectOutputs":
        """BIDS-style outputs named after ``image``, next to it or in ``folder``."""
        from ..io import default_output_path

        mask = default_output_path(Path(image), MASK_SUFFIX, out_dir=folder)
        return cls.for_mask(mask, probability=probability, model=model, report=report)

    @classmethod
    def for_mask(cls, mask: PathLike, *, probability: bool = False, model: PathLike | None = None,
                 report: bool = False,
                 sidecar_fields: Mapping[str, Any] | None = None) -> "SubjectOutputs":
        """Outputs around the mask file ``mask`` (probability map as ``..._probseg``)."""
        mask = Path(mask)
        return cls(mask=mask, probability=probseg_path_for(mask) if probability else None,
                   model=None if model is None else Path(model), report=report,
                   sidecar_fields=sidecar_fields)

    @property
    def report_paths(self) -> tuple[Path, Path]:
        """The report's PNG and HTML files (written only with :attr:`report`)."""
        return report_paths_for(self.mask)

    def check(self, inputs: Sequence[Path], overwrite: bool) -> None:
        """Check every output before any compute (see :func:`cgc_refine.results.check_outputs`)."""
        if self.report:
            from ..report import require_matplotlib

            require_matplotlib("--report")
        plain = [(self.sidecar, "sidecar")] + ([(self.model, "model")] if self.model else [])
        if self.report:
            png, html = self.report_paths
            plain += [(png, "report image"), (html, "report page")]
        nifti = [self.mask] + ([self.probability] if self.probability else [])
        check_outputs(nifti, plain, inputs, overwrite)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RunOptions:
    """How a job runs, as opposed to what it computes (:class:`RefinerConfig`).

    Parameters
    ----------
    seed : int
        Random seed (weights, crops, flips), 0 to 2**32 - 1.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    threads : int, optional
        CPU threads of torch (see :func:`cgc_refine.device.configure_threads`).
    overwrite : bool
        Replace existing outputs.
    modality : {"mri", "ct"}
        Skull-stripped MRI (FLAIR first) or head CT in HU.
    command_line : tuple of str
        Recorded in the sidecar (the command line passes its arguments).
    """

    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    overwrite: bool = False
    modality: str = "mri"
    command_line: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class SubjectResult:
    """What a single-subject job wrote and its summary facts.

    Attributes
    ----------
    outputs : SubjectOutputs
        The output paths asked for.
    written : tuple of Path
        The files written, in order (the sidecar last).
    sidecar : dict
        The sidecar's content.
    lesion_ml : float
        Volume of the lesion mask (ml).
    prior_ml : float or None
        Volume of the prior (p >= 0.5, ml); None when the job had no prior (a saved model).
    seconds : float
        Wall time of the whole job.
    """

    outputs: SubjectOutputs
    written: tuple[Path, ...]
    sidecar: dict[str, Any]
    lesion_ml: float
    prior_ml: float | None
    seconds: float

    @property
    def change_ml(self) -> float | None:
        """Lesion volume minus prior volume (ml), or None without a prior."""
        return None if self.prior_ml is None else self.lesion_ml - self.prior_ml

    @property
    def evaluation(self) -> dict[str, dict[str, float]] | None:
        """Scores against the ground truth (``"refined"``, ``"prior"``) when one was given."""
        return self.sidecar.get("evaluation")


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit_cohort` wrote.

    Attributes
    ----------
    model : Path
        The model file.
    written : tuple of Path
        The model and its sidecar.
    sidecar : dict
        The sidecar's content.
    seconds : float
        Wall time of the job.
    """

    model: Path
    written: tuple[Path, ...]
    sidecar: dict[str, Any]
    seconds: float
