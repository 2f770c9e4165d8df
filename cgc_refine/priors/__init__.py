"""Priors: the common probability-map format, adapters, and the built-in label-free priors."""

from .adapters import (
    ADAPTER_KINDS,
    FilePrior,
    as_probability_map,
    check_prior_informative,
    from_labels,
    from_logits,
    from_mask,
    from_probability,
    from_scores,
    infer_prior_kind,
)
from .base import PRIOR_KINDS, PriorInput, ProbabilityMap, prepare_prior_input
from .gmm import GMMPrior, fit_histogram_gmm, intensity_histogram
from .mumford_shah import MumfordShahPrior

__all__ = [
    "ADAPTER_KINDS",
    "PRIOR_KINDS",
    "FilePrior",
    "GMMPrior",
    "MumfordShahPrior",
    "PriorInput",
    "ProbabilityMap",
    "as_probability_map",
    "check_prior_informative",
    "fit_histogram_gmm",
    "from_labels",
    "from_logits",
    "from_mask",
    "from_probability",
    "from_scores",
    "infer_prior_kind",
    "intensity_histogram",
    "make_prior",
    "prepare_prior_input",
]


def make_prior(name: str, **options):  # type: ignore[no-untyped-def]
    """Build a built-in prior by its command-line name (``"gmm"`` or ``"mumford-shah"``)."""
    from ..exceptions import InvalidPriorError

    builders = {"gmm": GMMPrior, "mumford-shah": MumfordShahPrior}
    if name not in builders:
        raise InvalidPriorError(f"unknown built-in prior {name!r}; choose one of {sorted(builders)}")
    return builders[name](**options)
