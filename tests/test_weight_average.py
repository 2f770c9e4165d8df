"""The EMA teacher (cgc_refine.weight_average) against hand-computed averages, and in training."""

import numpy as np
import pytest
import torch

from cgc_refine.config import RefinerConfig
from cgc_refine.exceptions import InvalidParameterError
from cgc_refine.weight_average import ExponentialWeightAverage, ema_decay


def test_decay_spans_the_horizon_of_the_iterations():
    assert ema_decay(0.1, 200) == pytest.approx(0.95)
    assert ema_decay(0.1, 2000) == pytest.approx(0.995)
    assert ema_decay(0.0, 200) == 0.0
    assert ema_decay(0.1, 5) == 0.0  # half a step: nothing to average
    with pytest.raises(InvalidParameterError):
        ema_decay(-0.1, 200)


def test_average_matches_the_hand_computed_recursion():
    module = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(0.0)
    ema = ExponentialWeightAverage(module, decay=0.9)
    expected = 0.0
    for t, value in enumerate([1.0, 2.0, 3.0, 4.0]):
        with torch.no_grad():
            module.weight.fill_(value)
        ema.update(module)
        d = min(0.9, (1 + t) / (10 + t))  # warm-up: 0.1, 0.1818..., 0.25, 0.3077...
        expected = d * expected + (1 - d) * value
    assert ema.average.weight.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(3.6)  # by hand: 0.9, 1.8, 2.7, 3.6
    target = torch.nn.Linear(1, 1, bias=False)
    ema.copy_to(target)
    assert target.weight.item() == pytest.approx(expected, rel=1e-6)


def test_float_buffers_are_averaged_and_counters_copied():
    module = torch.nn.BatchNorm1d(1)
    ema = ExponentialWeightAverage(module, decay=0.5)
    with torch.no_grad():
        module.running_mean.fill_(2.0)
        module.num_batches_tracked.fill_(7)
    ema.update(module)  # d_0 = min(0.5, 0.1) = 0.1
    assert float(ema.average.running_mean) == pytest.approx(0.9 * 2.0)
    assert int(ema.average.num_batches_tracked) == 7


def test_decay_outside_range_is_refused():
    with pytest.raises(InvalidParameterError):
        ExponentialWeightAverage(torch.nn.Linear(1, 1), decay=1.0)


def test_training_hands_back_the_average_not_the_last_iterate(monkeypatch):
    """With ema_horizon > 0 the fitted network holds the averaged weights; with 0 the last ones."""
    from cgc_refine import training
    from cgc_refine.phantom import make_phantom
    from cgc_refine.refiner import Refiner

    seen = {}

    class Recording(ExponentialWeightAverage):
        def update(self, module):
            super().update(module)
            seen["last"] = [p.detach().clone() for p in module.parameters()]
            seen["average"] = [p.detach().clone() for p in self.average.parameters()]

    monkeypatch.setattr(training, "ExponentialWeightAverage", Recording)
    phantom = make_phantom((32, 32, 16), spacing=(1.0, 1.0, 1.0), n_lesions=2, seed=5)
    fitted = {}
    for horizon in (0.5, 0.0):
        seen.clear()
        config = RefinerConfig(channels=(4, 8), crop_size=(16, 16, 16), iterations=6, batch_size=1, proj_dim=4,
                               patch_size=(1, 1, 1), log_every=1, ema_horizon=horizon)
        refiner = Refiner([phantom.truth.astype(np.float32)], prior_kind="probability", config=config,
                          device="cpu", random_state=0).fit([phantom.volume], brain_masks=[phantom.brain])
        fitted[horizon] = [p.detach().clone() for p in refiner.network_.parameters()]
        if horizon > 0:
            for final, average, last in zip(fitted[horizon], seen["average"], seen["last"]):
                torch.testing.assert_close(final, average)
            assert any(not torch.equal(a, b) for a, b in zip(seen["average"], seen["last"]))
        else:
            assert not seen  # no average kept
    # same seed, same crops: the last iterates agree, so the averaged network must differ from it
    assert any(not torch.equal(a, b) for a, b in zip(fitted[0.5], fitted[0.0]))
