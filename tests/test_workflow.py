"""The jobs as library functions (issue 11, item 1): the single-subject job, a saved model, a
built-in prior, with progress hooks instead of printing and one sidecar schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cgc_refine import RefinerConfig
from cgc_refine.exceptions import InvalidPriorError, OutputExistsError
from cgc_refine.io import save_array, save_mask
from cgc_refine.phantom import make_phantom, noisy_prior
from cgc_refine.workflow import (
    PriorSpec,
    Progress,
    RunOptions,
    SubjectOutputs,
    compute_prior,
    predict_subject,
    refine_subject,
)
from cgc_refine.workflow.results import SIDECAR_SECTIONS, sidecar_path_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = RefinerConfig.fast(iterations=1, crop_size=(16, 16, 16))
HEAD = ["cgc_refine_version", "command", "command_line", "created", "python"]


class Recorder(Progress):
    """Progress hooks that record what a job reports."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.steps = 0
        self.windows: list[tuple[int, int]] = []

    def training(self, total: int):  # noqa: ANN201
        def step(values: dict[str, float]) -> None:
            self.steps += 1

        return step

    def inference(self):  # noqa: ANN201
        return lambda done, total: self.windows.append((done, total))

    def note(self, message: str) -> None:
        self.notes.append(message)


@pytest.fixture()
def subject(tmp_path: Path) -> dict[str, Path]:
    phantom = make_phantom((32, 32, 16), seed=0)
    volume = phantom.volume
    files = {name: tmp_path / f"{name}.nii.gz" for name in ("flair", "truth", "brain", "prior")}
    save_array(volume.data[0], volume, files["flair"], np.float32)
    save_mask(phantom.truth, volume, files["truth"])
    save_mask(phantom.brain, volume, files["brain"])
    save_array(noisy_prior(phantom.truth, phantom.brain, flip_fraction=0.05, seed=0), volume,
               files["prior"], np.float32)
    return files


def test_refine_subject_writes_outputs_and_returns_the_facts(subject: dict[str, Path],
                                                             tmp_path: Path) -> None:
    outputs = SubjectOutputs.next_to(subject["flair"], folder=tmp_path, probability=True,
                                     model=tmp_path / "m.pt")
    progress = Recorder()
    result = refine_subject([subject["flair"]], PriorSpec(subject["prior"], kind="probability"), outputs,
                            TINY, brain_mask=subject["brain"], truth=subject["truth"],
                            options=RunOptions(device="cpu", seed=2), progress=progress)
    assert result is not None
    assert outputs.mask.name == "flair_label-lesion_mask.nii.gz"
    assert outputs.sidecar == sidecar_path_for(outputs.mask)
    assert list(result.written) == [tmp_path / "m.pt", outputs.mask, outputs.probability, outputs.sidecar]
    assert all(path.is_file() for path in result.written)
    sidecar = json.loads(outputs.sidecar.read_text())
    assert list(sidecar)[:5] == HEAD and sidecar["command"] == "segment"
    assert [k for k in sidecar if k not in HEAD] == [k for k in SIDECAR_SECTIONS if k in sidecar]
    assert sidecar["seed"] == 2 and sidecar["config"] == TINY.validate().to_dict()
    assert result.lesion_ml == pytest.approx(sidecar["lesion"]["volume_mm3"] / 1000.0)
    assert result.change_ml == pytest.approx(result.lesion_ml - result.prior_ml)
    assert result.evaluation is not None and set(result.evaluation) == {"refined", "prior"}
    assert progress.steps == 1 and progress.windows and result.seconds > 0
    assert progress.notes[0].startswith("prior") and progress.notes[-1].startswith("Dice against the truth")

    model_out = SubjectOutputs.for_mask(tmp_path / "predicted.nii.gz")
    predicted = predict_subject(tmp_path / "m.pt", [subject["flair"]], model_out,
                                options=RunOptions(device="cpu"))
    record = json.loads(model_out.sidecar.read_text())
    assert record["command"] == "predict" and list(record)[:5] == HEAD
    assert predicted.prior_ml is None and predicted.change_ml is None
    assert record["model"]["inference_window"] == sidecar["training"]["inference_window"]


def test_existing_outputs_are_refused_in_python_terms(subject: dict[str, Path], tmp_path: Path) -> None:
    outputs = SubjectOutputs.for_mask(tmp_path / "mask.nii.gz")
    outputs.mask.write_bytes(b"keep")
    with pytest.raises(OutputExistsError, match="pass overwrite=True"):
        refine_subject([subject["flair"]], "gmm", outputs, TINY, options=RunOptions(device="cpu"))
    assert outputs.mask.read_bytes() == b"keep"


def test_unknown_prior_name_is_refused_before_reading(tmp_path: Path) -> None:
    with pytest.raises(InvalidPriorError, match="neither a built-in prior"):
        refine_subject([tmp_path / "x.nii.gz"], "gnm", SubjectOutputs.for_mask(tmp_path / "m.nii.gz"))


def test_compute_prior_writes_map_and_sidecar(subject: dict[str, Path], tmp_path: Path) -> None:
    progress = Recorder()
    written = compute_prior("gmm", [subject["flair"]], tmp_path / "p.nii.gz", brain_mask=subject["brain"],
                            cleanup="auto", options=RunOptions(device="cpu"), progress=progress)
    assert written == (tmp_path / "p.nii.gz", tmp_path / "p.json")
    record = json.loads((tmp_path / "p.json").read_text())
    assert record["command"] == "prior" and record["prior"]["cleanup"]["pattern"] in ("focal", "multifocal")
    assert progress.notes[0].startswith("clean-up") and progress.notes[1].startswith("prior gmm")
