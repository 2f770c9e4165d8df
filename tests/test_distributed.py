"""Distributed training under torchrun (2 CPU processes, gloo) and the helpers behind it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cgc_refine import Refiner, RefinerConfig
from cgc_refine.distributed import (
    DistributedContext,
    current_rank,
    is_main_process,
    launched_by_torchrun,
    rank_seed,
    setup_distributed,
)
from cgc_refine.io import save_array
from cgc_refine.phantom import make_phantom, noisy_prior
from cgc_refine.priors import ProbabilityMap
from cgc_refine.training import CropStream, prepare_subject

HERE = Path(__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this torch build has no gloo backend",
)


def _torchrun(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run([*TORCHRUN, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _digest(refiner: Refiner) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(refiner.network_.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@needs_gloo
@pytest.mark.slow
def test_torchrun_two_ranks_identical_weights_one_writer_and_model_predicts(tmp_path):
    result = _torchrun([str(HERE / "ddp_worker.py"), str(tmp_path)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    # both replicas end with the same parameters and batch-norm buffers
    assert ranks[0]["digest"] == ranks[1]["digest"]
    # each rank drew its own crops: the first step's losses differ
    assert ranks[0]["first_loss"] != ranks[1]["first_loss"]
    assert ranks[0]["samples"] == ranks[1]["samples"] == 12
    # only rank 0 wrote: checkpoints at iterations 3 and 6, then the model
    checkpoint, model = str(tmp_path / "checkpoint.pt"), str(tmp_path / "model.pt")
    assert ranks[0]["writes"] == [checkpoint, checkpoint, model]
    assert ranks[1]["writes"] == []
    written = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt")
    assert written == ["checkpoint.pt", "model.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    loaded = Refiner.load(tmp_path / "model.pt", device="cpu")
    assert _digest(loaded) == ranks[0]["digest"]
    phantom = make_phantom((40, 40, 20), n_lesions=2, seed=0)
    mask = loaded.predict(phantom.volume)
    assert mask.shape == (40, 40, 20) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    resumed = Refiner.load(tmp_path / "checkpoint.pt", device="cpu")
    assert resumed.n_iter_ == 6


@needs_gloo
@pytest.mark.slow
def test_cli_fit_under_torchrun_writes_once(tmp_path):
    cohort = tmp_path / "cohort"
    for index in range(2):
        folder = cohort / f"sub-{index}"
        folder.mkdir(parents=True)
        phantom = make_phantom((40, 40, 20), n_lesions=2, seed=index)
        save_array(phantom.volume.data[0], phantom.volume, folder / "flair.nii.gz", np.float32)
    model = tmp_path / "model.pt"
    result = _torchrun(["-m", "cgc_refine", "fit", "--cohort", str(cohort), "--image-pattern", "flair*",
                        "--prior", "gmm", "--fast", "--iterations", "4", "--checkpoint-every", "2",
                        "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "-o", str(model)],
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # a finished fit removes its periodic checkpoint (model.pt.ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "cohort", "model.json", "model.pt"]
    assert result.stdout.count("wrote ") == 2  # model and sidecar, by rank 0 only
    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert sidecar["distributed"]["world_size"] == 2 and sidecar["training"]["n_iter"] == 4
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one entry per subject, built once
    loaded = Refiner.load(model, device="cpu")
    mask = loaded.predict(cohort / "sub-0" / "flair.nii.gz")
    assert mask.shape == (40, 40, 20) and mask.dtype == np.uint8


# ------------------------------------------------------------------ single-process helpers


def test_plain_process_is_not_distributed(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not launched_by_torchrun() and current_rank() == 0 and is_main_process()
    context, device = setup_distributed("cpu")
    assert context == DistributedContext() and not context.enabled and context.is_main
    assert device == torch.device("cpu")
    # a one-process torchrun job is not distributed either
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not launched_by_torchrun() and setup_distributed("cpu")[0].world_size == 1


def test_non_zero_rank_does_not_write(monkeypatch, tmp_path):
    phantom = make_phantom((32, 32, 16), n_lesions=2, seed=1)
    prior = ProbabilityMap(noisy_prior(phantom.truth, phantom.brain, seed=1))
    config = RefinerConfig(channels=(4, 8), crop_size=(16, 16, 8), iterations=1, proj_dim=4, log_every=1)
    refiner = Refiner([prior], config=config, device="cpu").fit([phantom.volume])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert current_rank() == 1 and not is_main_process()
    target = tmp_path / "model.pt"
    assert refiner.save(target) == target and not target.exists()
    monkeypatch.setenv("RANK", "0")
    refiner.save(target)
    assert target.is_file()


def test_rank_seeds_are_distinct_and_stable():
    seeds = {rank_seed(0, rank, worker) for rank in range(4) for worker in range(3)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    assert rank_seed(5, 1, 2) == rank_seed(5, 1, 2) and rank_seed(5, 1) != rank_seed(6, 1)


def test_crop_stream_workers_draw_different_crops():
    phantom = make_phantom((32, 32, 16), n_lesions=2, seed=1)
    subject = prepare_subject(phantom.volume, ProbabilityMap(noisy_prior(phantom.truth, phantom.brain, seed=1)))
    stream = CropStream([subject], (16, 16, 8), batch_size=2, seed=3)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == 4:
            break
    for image, prior, brain in batches:
        assert image.shape == (2, 1, 16, 16, 8) and prior.shape == brain.shape == (2, 1, 16, 16, 8)
    # batches alternate between the two workers, whose generators differ
    assert not torch.equal(batches[0][0], batches[1][0])
    # in-process (no worker), the stream is reproducible for a given seed and rank
    first = [next(iter(CropStream([subject], (16, 16, 8), 2, seed=3)))[0] for _ in range(2)]
    other_rank = next(iter(CropStream([subject], (16, 16, 8), 2, seed=3, rank=1)))[0]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], other_rank)


def test_fit_with_worker_processes_records_data_wait(tmp_path):
    phantom = make_phantom((32, 32, 16), n_lesions=2, seed=2)
    prior = ProbabilityMap(noisy_prior(phantom.truth, phantom.brain, seed=2))
    config = RefinerConfig(channels=(4, 8, 16), crop_size=(16, 16, 8), iterations=4, batch_size=2,
                           proj_dim=4, log_every=2, num_workers=2)
    refiner = Refiner([prior], config=config, device="cpu").fit([phantom.volume], cache_dir=tmp_path / "c")
    timings = refiner.timings_
    assert timings["steps"] == 4 and timings["samples"] == 8
    assert 0.0 <= timings["data_wait_s"] <= timings["loop_s"]
    assert refiner.history_[-1]["data_wait_s"] == pytest.approx(timings["data_wait_s"])
