"""Priors: the common probability-map format, adapters, and the built-in label-free priors.

The names of the built-in priors live here, in one registry (:data:`BUILTIN_PRIORS`,
:func:`make_prior`) that the command line and :class:`~cgc_refine.refiner.Refiner` read.
Submodules are imported on first use (PEP 562), so reading the registry does not import
numpy, scikit-learn or torch (``cgc-refine --help`` stays instant).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FilePrior": "adapters", "as_probability_map": "adapters",
    "check_prior_informative": "adapters", "from_labels": "adapters", "from_logits": "adapters",
    "from_mask": "adapters", "from_probability": "adapters", "from_scores": "adapters",
    "infer_prior_kind": "encodings",
    "PRIOR_KINDS": "base", "Prior": "base", "PriorInput": "base", "ProbabilityMap": "base",
    "prepare_prior_input": "base",
    "GMMPrior": "gmm", "fit_histogram_gmm": "gmm", "intensity_histogram": "gmm",
    "MumfordShahPrior": "mumford_shah",
    "OutlierPrior": "outlier",
    "prior_diagnostics": "diagnostics",
}

#: The public names: the registry below and the lazily imported ones above.
__all__ = sorted(
    ["ADAPTER_KINDS", "AUTO_PRIOR", "AUTO_PRIOR_CT", "BUILTIN_PRIORS", "make_prior", "resolve_prior_name",
     *_LAZY]
)

#: How a prior file can be encoded, besides ``"auto"`` (inferred from its values): the kinds of
#: :func:`~cgc_refine.priors.adapters.as_probability_map`. Kept here, with no import, so that the
#: command line's ``--prior-kind`` choices need no numpy.
ADAPTER_KINDS: tuple[str, ...] = ("probability", "percent", "probability-255", "mask", "labels", "logits",
                                  "scores")

#: The built-in prior that ``"auto"`` names for MRI: the one with the best mean Dice averaged
#: over the three development sources (z-scored BraTS, raw BraTS, clinical WMH) of
#: ``benchmarks/priors.py`` -- the outlier prior, 0.739 against 0.725 for
#: ``mumford-shah-bias``, 0.693 for ``mumford-shah`` and 0.670 for ``gmm``
#: (benchmarks/RESULTS.md, section 1). Disclosure: by the definition of ``auto`` this choice
#: is made after seeing those Dice scores.
AUTO_PRIOR = "outlier"
#: What ``"auto"`` names for CT, which the outlier prior does not model (no CT case with a
#: lesion mask exists in the development data; the GMM on the brain window was the default).
AUTO_PRIOR_CT = "gmm"

#: Every built-in prior by its command-line / API name: (module, class, preset options).
_REGISTRY: dict[str, tuple[str, str, dict[str, object]]] = {
    "gmm": ("gmm", "GMMPrior", {}),
    "gmm-brightest": ("gmm", "GMMPrior", {"foreground_rule": "brightest"}),
    "mumford-shah": ("mumford_shah", "MumfordShahPrior", {}),
    "mumford-shah-bias": ("mumford_shah", "MumfordShahPrior", {"bias_correction": True}),
    "outlier": ("outlier", "OutlierPrior", {}),
}

#: Names accepted by :func:`make_prior`, ``cgc-refine prior NAME``, ``--prior NAME`` and
#: ``Refiner(NAME)``; ``"auto"`` is :data:`AUTO_PRIOR`.
BUILTIN_PRIORS: tuple[str, ...] = ("auto", *_REGISTRY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def resolve_prior_name(name: str, modality: str = "mri") -> str:
    """The registry name a built-in prior name stands for (``"auto"`` resolved).

    Parameters
    ----------
    name : str
        A name of :data:`BUILTIN_PRIORS`.
    modality : {"mri", "ct"}
        ``"auto"`` is :data:`AUTO_PRIOR` for MRI and :data:`AUTO_PRIOR_CT` for CT.

    Returns
    -------
    str
    """
    if name == "auto":
        return AUTO_PRIOR_CT if modality == "ct" else AUTO_PRIOR
    return name


def make_prior(name: str, **options: Any) -> Any:
    """Build a built-in prior by its name.

    Parameters
    ----------
    name : str
        One of :data:`BUILTIN_PRIORS`: ``"auto"`` (the default prior, :data:`AUTO_PRIOR`;
        :data:`AUTO_PRIOR_CT` when ``modality="ct"``),
        ``"gmm"`` (Gaussian mixture, plausible-brightest-component rule), ``"gmm-brightest"``
        (always the brightest component), ``"mumford-shah"``, ``"mumford-shah-bias"``
        (Mumford-Shah after bias-field correction) or ``"outlier"`` (hyperintensity outlier).
    **options
        Constructor options of the prior class (e.g. ``modality``, ``device`` for
        Mumford-Shah, ``strictness`` for the outlier prior); they override the name's
        presets. Options a class does not take are dropped (logged at DEBUG), so callers
        can pass ``modality``/``device`` whatever the prior.

    Returns
    -------
    object
        A prior with a ``compute(volume, brain_mask)`` method returning a
        :class:`~cgc_refine.priors.base.ProbabilityMap`.

    Raises
    ------
    InvalidPriorError
        For an unknown name.
    """
    import inspect
    import logging

    from ..exceptions import InvalidPriorError

    name = resolve_prior_name(name, str(options.get("modality", "mri")))
    if name not in _REGISTRY:
        raise InvalidPriorError(
            f"unknown built-in prior {name!r}; choose one of {', '.join(BUILTIN_PRIORS)}"
        )
    module, class_name, presets = _REGISTRY[name]
    cls = getattr(importlib.import_module(f".{module}", __name__), class_name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    dropped = sorted(set(options) - accepted)
    if dropped:
        logging.getLogger(__name__).debug("prior %s ignores options %s", name, dropped)
    kwargs = {**presets, **{k: v for k, v in options.items() if k in accepted}}
    return cls(**kwargs)
