"""The example scripts run end to end on the built-in phantom (few iterations)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# each test runs an example script end to end (a few training steps)
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


def test_refine_one_subject(tmp_path, capsys):
    _load("refine_one_subject").main(["--iterations", "2", "--device", "cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert (tmp_path / "label-lesion_mask.nii.gz").is_file()
    assert (tmp_path / "label-lesion_probseg.nii.gz").is_file()
    assert "phantom Dice: prior" in out


def test_wrap_anomaly_map(capsys):
    _load("wrap_anomaly_map").main(["--iterations", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "scores -> probability: robust rule" in out and "refined mask:" in out


def test_cohort_train_apply(tmp_path, capsys):
    model = tmp_path / "model.pt"
    _load("cohort_train_apply").main(["--iterations", "2", "--device", "cpu", "--model", str(model)])
    out = capsys.readouterr().out
    assert model.is_file() and "trained on 3 subjects" in out and "held-out subject" in out
