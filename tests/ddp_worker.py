"""Run by tests/test_distributed.py under ``torchrun``: a tiny 2-rank fit on phantoms.

Each rank writes ``rank<N>.json`` (a digest of its weights and buffers, how many files it
wrote through the refiner, its first logged loss); rank 0's ``Refiner.save`` writes the
model. Not a test module itself (no ``test_`` prefix).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

from cgc_refine import Refiner, RefinerConfig
from cgc_refine.phantom import make_phantom, noisy_prior
from cgc_refine.priors import ProbabilityMap

CONFIG = RefinerConfig(channels=(4, 8, 16, 32), crop_size=(32, 32, 16), iterations=6, batch_size=2,
                       learning_rate=3e-3, log_every=1, proj_dim=8)


def main(out: str) -> None:
    torch.set_num_threads(1)
    writes: list[str] = []
    original = Refiner._write

    def counting(self, path, **kwargs):  # noqa: ANN001, ANN003, ANN202
        writes.append(os.fspath(path))
        return original(self, path, **kwargs)

    Refiner._write = counting  # type: ignore[method-assign]
    volumes, priors = [], []
    for seed in range(3):
        phantom = make_phantom((40, 40, 20), n_lesions=2, seed=seed)
        volumes.append(phantom.volume)
        priors.append(ProbabilityMap(noisy_prior(phantom.truth, phantom.brain, seed=seed)))
    refiner = Refiner(priors, config=CONFIG, device="cpu", random_state=1).fit(
        volumes, checkpoint_path=os.path.join(out, "checkpoint.pt"), checkpoint_every=3
    )
    refiner.save(os.path.join(out, "model.pt"))
    digest = hashlib.sha256()
    for name, value in sorted(refiner.network_.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    record = {"digest": digest.hexdigest(), "writes": writes, "world_size": refiner.timings_["world_size"],
              "first_loss": refiner.history_[0]["total"], "samples": refiner.timings_["samples"]}
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    # End as a distributed script should: the ranks leave together and take the process group
    # down before the interpreter exits (rather than one rank tearing it down from an atexit
    # hook while the other still saves; a rare abort of gloo at exit was seen that way).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
