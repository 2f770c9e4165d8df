"""The model file (cgc_refine.checkpoint): layout, compatibility with older files, resuming."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cgc_refine.checkpoint import (
    CHECKPOINT_FORMAT,
    check_compatible,
    checkpoint_state,
    read_checkpoint,
    resume_training,
    write_checkpoint,
)
from cgc_refine.config import RefinerConfig
from cgc_refine.exceptions import CheckpointError, OutputExistsError
from cgc_refine.phantom import make_phantom
from cgc_refine.priors import ProbabilityMap
from cgc_refine.refiner import Refiner
from cgc_refine.sampling import CropSampler
from cgc_refine.training import build_network, prepare_subject

TINY = RefinerConfig(
    channels=(4, 8, 16, 32), crop_size=(32, 32, 16), iterations=3, batch_size=2,
    learning_rate=3e-3, log_every=1, proj_dim=8,
)

#: The keys of a format-1 file, as every cgc_refine release so far has written them.
FORMAT_1_KEYS = {
    "format", "cgc_refine_version", "config", "state_dict", "n_channels_in", "strides", "spacing",
    "crop_size", "window_size", "modality", "random_state", "n_iter", "priors", "history",
    "optimizer_state", "sampler_state",
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _format_1_file(path: Path, *, drop: tuple[str, ...] = (), **changes: object) -> dict[str, torch.Tensor]:
    """Write, by hand, a model file in the format-1 layout; return its weights."""
    torch.manual_seed(0)
    strides = [[2, 2, 1], [2, 2, 2], [2, 2, 2]]
    weights = {k: v.clone() for k, v in build_network(TINY, 1, strides=strides).state_dict().items()}
    state = {
        "format": 1, "cgc_refine_version": "0.1.0", "config": TINY.to_dict(), "state_dict": weights,
        "n_channels_in": 1, "strides": strides, "spacing": [1.0, 1.0, 4.0], "crop_size": [32, 32, 8],
        "window_size": [48, 48, 8], "modality": "mri", "random_state": 4, "n_iter": 3,
        "priors": [{"source": "gmm", "params": {}}], "history": [{"iteration": 1.0, "total": 0.5}],
        "optimizer_state": None, "sampler_state": None,
    }
    state.update(changes)
    for key in drop:
        state.pop(key)
    torch.save(state, path)
    return weights


def test_a_format_1_file_written_by_hand_loads(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    weights = _format_1_file(path)
    refiner = Refiner.load(path, device="cpu")
    assert refiner.n_channels_in_ == 1 and refiner.strides_ == [[2, 2, 1], [2, 2, 2], [2, 2, 2]]
    assert refiner.spacing_ == (1.0, 1.0, 4.0) and refiner.crop_size_ == (32, 32, 8)
    assert refiner.window_size_ == (48, 48, 8) and refiner.n_iter_ == 3 and refiner.random_state == 4
    assert refiner.config_ == TINY and refiner.modality == "mri" and refiner.prior is None
    assert refiner.priors_ == [{"source": "gmm", "params": {}}] and refiner.history_[0]["total"] == 0.5
    loaded = refiner.network_.state_dict()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert not refiner.network_.training


def test_a_file_without_the_later_keys_gets_their_defaults(tmp_path: Path) -> None:
    path = tmp_path / "older.pt"
    torch.manual_seed(0)
    weights = build_network(TINY, 1).state_dict()
    torch.save({"format": 1, "config": TINY.to_dict(), "state_dict": weights, "n_channels_in": 1,
                "crop_size": [32, 32, 16], "modality": "mri", "random_state": 0, "n_iter": 3}, path)
    refiner = Refiner.load(path, device="cpu")
    assert refiner.strides_ is None and refiner.spacing_ == (1.0, 1.0, 1.0)
    assert refiner.window_size_ == refiner.crop_size_ == (32, 32, 16)
    assert refiner.priors_ == [] and refiner.history_ == []


def test_newer_and_foreign_files_are_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer.pt"
    _format_1_file(newer, format=CHECKPOINT_FORMAT + 1)
    with pytest.raises(CheckpointError, match="newer cgc_refine"):
        Refiner.load(newer)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="missing weights or configuration"):
        read_checkpoint(foreign)
    unusable = tmp_path / "unusable.pt"
    _format_1_file(unusable, drop=("n_channels_in",))
    with pytest.raises(CheckpointError, match="not a usable cgc_refine model"):
        Refiner.load(unusable)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_state_writes_the_format_1_layout(tmp_path: Path) -> None:
    network = build_network(TINY, 2)
    fitted = SimpleNamespace(
        config_=TINY, network_=network, n_channels_in_=2, crop_size_=(32, 32, 16), window_size_=(32, 32, 16),
        modality="ct", random_state=9, n_iter_=7, priors_=[{"source": "file", "params": {"path": Path("p")}}],
        history_=[{"iteration": 1.0}],
    )
    state = checkpoint_state(fitted, optimizer_state={"state": {}}, sampler_state={"pos": np.int64(3)})
    assert set(state) == FORMAT_1_KEYS and state["format"] == CHECKPOINT_FORMAT == 1
    assert state["strides"] is None and state["spacing"] == [1.0, 1.0, 1.0]  # not set: isotropic defaults
    target = write_checkpoint(tmp_path / "m.pt", state, overwrite=False)
    with pytest.raises(OutputExistsError):
        write_checkpoint(target, state, overwrite=False)
    back = read_checkpoint(target)
    assert back["priors"] == [{"source": "file", "params": {"path": "p"}}] and back["sampler_state"] == {"pos": 3}
    assert back["modality"] == "ct" and back["n_iter"] == 7 and back["optimizer_state"] == {"state": {}}


def test_check_compatible_names_what_differs() -> None:
    state = {"config": TINY.to_dict(), "strides": [[2, 2, 1]], "n_channels_in": 1}
    check_compatible(state, TINY, 1)
    with pytest.raises(CheckpointError, match="network settings differ"):
        check_compatible(state, dataclasses.replace(TINY, proj_dim=16), 1)
    with pytest.raises(CheckpointError, match="anisotropic=True"):
        check_compatible(state, dataclasses.replace(TINY, anisotropic=False), 1)
    with pytest.raises(CheckpointError, match="1 channel"):
        check_compatible(state, TINY, 2)


def test_resume_training_restores_weights_iteration_and_sampler() -> None:
    phantom = make_phantom((32, 32, 16), n_lesions=2, seed=1)
    subject = prepare_subject(phantom.volume, ProbabilityMap(phantom.truth.astype(np.float32)), phantom.brain)
    torch.manual_seed(1)
    saved_network = build_network(TINY, 1)
    saved_sampler = CropSampler([subject], (16, 16, 8), seed=2)
    saved_sampler.batch(1)  # advance the generators
    state = {"config": TINY.to_dict(), "strides": None, "n_channels_in": 1, "n_iter": 5,
             "state_dict": saved_network.state_dict(), "optimizer_state": {"x": 1},
             "sampler_state": saved_sampler.state()}
    network, sampler = build_network(TINY, 1), CropSampler([subject], (16, 16, 8), seed=0)
    assert resume_training(state, TINY, 1, network, sampler, distributed=False) == (5, {"x": 1})
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), saved_network.state_dict().values()))
    for a, b in zip(sampler.batch(2), saved_sampler.batch(2)):
        assert torch.equal(a, b)
    untouched = CropSampler([subject], (16, 16, 8), seed=0)
    resume_training(state, TINY, 1, build_network(TINY, 1), untouched, distributed=True)
    assert torch.equal(untouched.batch(1)[0], CropSampler([subject], (16, 16, 8), seed=0).batch(1)[0])


def test_refiner_save_writes_what_load_reads(tmp_path: Path) -> None:
    phantom = make_phantom((40, 40, 20), spacing=(1.0, 1.0, 2.0), n_lesions=3, seed=1)
    config = dataclasses.replace(TINY, iterations=2, tta=1)
    refiner = Refiner("gmm", config=config, device="cpu").fit([phantom.volume], brain_masks=[phantom.brain])
    path = refiner.save(tmp_path / "model.pt")
    state = read_checkpoint(path)
    assert set(state) == FORMAT_1_KEYS and state["optimizer_state"] is None and state["sampler_state"] is None
    assert state["n_iter"] == 2
    loaded = Refiner.load(path, device="cpu")
    np.testing.assert_array_equal(loaded.predict_proba(phantom.volume, phantom.brain),
                                  refiner.predict_proba(phantom.volume, phantom.brain))
