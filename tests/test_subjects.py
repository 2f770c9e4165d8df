"""The estimator's training subjects (cgc_refine.subjects): priors, checks, the reader."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cgc_refine.data import PreparedSubject
from cgc_refine.distributed import DistributedContext
from cgc_refine.exceptions import EmptyMaskError, InvalidImageError, InvalidPriorError
from cgc_refine.io import Volume
from cgc_refine.phantom import make_phantom
from cgc_refine.subjects import SubjectReader, builtin_prior, check_priors, per_volume_priors


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((32, 32, 16), spacing=(1.0, 1.0, 2.0), n_lesions=2, seed=2)


def test_builtin_prior_from_a_name_an_object_or_none() -> None:
    gmm = builtin_prior("gmm", "mri")
    assert hasattr(gmm, "compute")
    assert builtin_prior(gmm, "mri") is gmm
    assert builtin_prior([np.zeros((2, 2, 2))], "mri") is None
    with pytest.raises(InvalidPriorError, match="unknown built-in prior 'otsu'"):
        builtin_prior("otsu", "mri")


def test_one_external_prior_per_volume() -> None:
    assert per_volume_priors("gmm", object(), 3) == [None, None, None]
    assert per_volume_priors("a.nii.gz", None, 1) == ["a.nii.gz"]
    with pytest.raises(InvalidPriorError, match="2 prior map"):
        per_volume_priors(["a", "b"], None, 3)


def _with_problem(problem: str | None) -> PreparedSubject:
    return PreparedSubject(None, None, None, (slice(0, 1),) * 3, (1, 1, 1), None, {"prior_problem": problem})


def test_check_priors_refuses_what_cannot_teach(caplog: pytest.LogCaptureFixture) -> None:
    context = DistributedContext()
    with pytest.raises(InvalidPriorError, match="empty"):
        check_priors([_with_problem("empty")], context)
    with pytest.raises(InvalidPriorError, match="no subject has an informative prior"):
        check_priors([_with_problem("empty"), _with_problem("full")], context)
    with caplog.at_level(logging.WARNING, logger="cgc_refine.subjects"):
        check_priors([_with_problem(None), _with_problem("full")], context)
    assert "subject 1: full" in caplog.text


def test_reader_records_provenance_and_checks(phantom) -> None:
    reader = SubjectReader(None, "mri", "probability", random_state=3, cleanup="none")
    prior = phantom.truth.astype(np.float32)
    subject = reader.prepare(0, phantom.volume, phantom.brain, prior)
    assert subject.info["prior_problem"] is None and subject.info["cleanup"] is None
    assert subject.info["spacing"] == [1.0, 1.0, 2.0] and len(subject.info["affine"]) == 4
    assert reader.prior_of(phantom.volume, phantom.brain, prior).shape == phantom.brain.shape
    flat = Volume.from_array(np.ones(phantom.brain.shape, np.float32))
    with pytest.raises(InvalidImageError, match="subject 2: .* is constant"):
        reader.prepare(2, flat, None, prior)
    with pytest.raises(EmptyMaskError, match="subject 1: the brain mask is empty"):
        reader.prepare(1, phantom.volume, np.zeros_like(phantom.brain), prior)


def test_reader_cleans_the_prior_with_a_derived_mask(phantom) -> None:
    reader = SubjectReader(None, "mri", "probability", random_state=0, cleanup="auto")
    subject = reader.prepare(0, phantom.volume, None, phantom.truth.astype(np.float32))
    assert subject.info["cleanup"]["pattern_requested"] == "auto"
