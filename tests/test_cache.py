"""On-disk subject cache: content keys, hits without recomputation, crash safety, memmaps."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cgc_refine import training
from cgc_refine.cache import MappedArray, SubjectCache
from cgc_refine.config import RefinerConfig
from cgc_refine.io import load_volume, save_array
from cgc_refine.phantom import make_phantom, noisy_prior
from cgc_refine.priors import ProbabilityMap
from cgc_refine.refiner import Refiner
from cgc_refine.training import CropSampler, prepare_subject

TINY = RefinerConfig(
    channels=(4, 8, 16, 32), crop_size=(32, 32, 16), iterations=3, batch_size=2,
    learning_rate=3e-3, log_every=1, proj_dim=8,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def data(tmp_path):
    phantom = make_phantom((24, 24, 12), n_lesions=2, seed=3)
    image_path = save_array(phantom.volume.data, phantom.volume, tmp_path / "image.nii.gz", np.float32)
    prior = ProbabilityMap(noisy_prior(phantom.truth, phantom.brain, blur=0.0, seed=1))
    return {"phantom": phantom, "path": image_path, "prior": prior, "tmp": tmp_path}


class _Counter:
    """A ``make`` callable that counts its calls."""

    def __init__(self, volume, prior, mask=None, modality="mri"):
        self.args = (volume, prior, mask, modality)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return prepare_subject(*self.args)


def test_rerun_is_a_hit_without_recomputation_and_arrays_are_exact(data, caplog):
    volume = load_volume(data["path"])
    make = _Counter(volume, data["prior"])
    cache = SubjectCache(data["tmp"] / "cache")
    key = cache.key([data["path"]], data["prior"], None, {"modality": "mri"})
    assert len(key) == 64 and key == cache.key(data["path"], data["prior"], None, {"modality": "mri"})
    with caplog.at_level(logging.INFO, logger="cgc_refine.cache"):
        first = cache.get_or_create(key, make)
        again = SubjectCache(data["tmp"] / "cache")  # a new process: only the disk is shared
        second = again.get_or_create(key, make)
    assert make.calls == 1
    assert (cache.hits, cache.misses, again.hits, again.misses) == (0, 1, 1, 0)
    assert "miss" in caplog.text and "hit" in caplog.text
    fresh = prepare_subject(volume, data["prior"])
    for subject in (first, second):
        for name in ("image", "prior", "brain"):
            array = getattr(subject, name)
            assert isinstance(array, MappedArray)
            expected = getattr(fresh, name).numpy()
            assert array.dtype == expected.dtype and array.shape == expected.shape
            assert np.array_equal(array, expected) and np.array_equal(array[:, 2:5, 1], expected[:, 2:5, 1])
        assert subject.bbox == fresh.bbox and subject.shape == fresh.shape
        assert np.array_equal(subject.foreground, fresh.foreground)
    assert second.nbytes() == fresh.nbytes()
    assert second.to(torch.device("cpu")) is second  # never moved wholesale


def test_any_input_change_gives_a_new_key(data):
    phantom, prior = data["phantom"], data["prior"]
    base = SubjectCache.key([data["path"]], prior, None, {"modality": "mri"})
    # one voxel of the image file changed
    changed = phantom.volume.data[0].copy()
    changed[12, 12, 6] += 0.25
    other_path = save_array(changed, phantom.volume, data["tmp"] / "image2.nii.gz", np.float32)
    assert SubjectCache.key([other_path], prior, None, {"modality": "mri"}) != base
    # the same bytes at another path: same key (content, not names)
    copy = data["tmp"] / "copy.nii.gz"
    copy.write_bytes(data["path"].read_bytes())
    assert SubjectCache.key([copy], prior, None, {"modality": "mri"}) == base
    # the prior's data, its provenance, the mask, the modality
    bumped = prior.data.copy()
    bumped[0, 0, 0] = 0.5
    assert SubjectCache.key([data["path"]], ProbabilityMap(bumped), None, {"modality": "mri"}) != base
    relabelled = ProbabilityMap(prior.data, source="gmm", params={"k": 3})
    assert SubjectCache.key([data["path"]], relabelled, None, {"modality": "mri"}) != base
    assert SubjectCache.key([data["path"]], prior, phantom.brain, {"modality": "mri"}) != base
    assert SubjectCache.key([data["path"]], prior, None, {"modality": "ct"}) != base
    # arrays: bytes, shape and dtype all count
    array = phantom.volume.data
    array_key = SubjectCache.key(array, prior, None, {})
    assert array_key == SubjectCache.key(array.copy(), prior, None, {})
    assert array_key != SubjectCache.key(array.astype(np.float64), prior, None, {})
    assert array_key != SubjectCache.key(array.reshape(1, 24, 12, 24), prior, None, {})


def test_modality_change_is_a_miss(data):
    volume = load_volume(data["path"])
    cache = SubjectCache(data["tmp"] / "cache")
    for modality in ("mri", "ct", "mri"):
        key = cache.key([data["path"]], data["prior"], None, {"modality": modality})
        cache.get_or_create(key, _Counter(volume, data["prior"], modality=modality))
    assert (cache.misses, cache.hits) == (2, 1)


def test_half_written_entry_is_rebuilt(data):
    volume = load_volume(data["path"])
    cache = SubjectCache(data["tmp"] / "cache")
    key = cache.key([data["path"]], data["prior"], None, {"modality": "mri"})
    folder = cache.path(key)
    folder.mkdir()
    np.save(folder / "image.npy", np.zeros((1, 2, 2, 2), np.float32))  # crash before meta.json
    make = _Counter(volume, data["prior"])
    subject = cache.get_or_create(key, make)
    assert make.calls == 1 and cache.misses == 1 and cache.is_complete(key)
    assert np.array_equal(subject.image, prepare_subject(volume, data["prior"]).image.numpy())
    # no temporary folders are left behind
    assert [p.name for p in cache.root.iterdir()] == [key]
    assert cache.get_or_create(key, make) is not None and make.calls == 1 and cache.hits == 1


def test_corrupted_entry_is_rebuilt(data):
    volume = load_volume(data["path"])
    cache = SubjectCache(data["tmp"] / "cache")
    key = cache.key([data["path"]], data["prior"], None, {})
    make = _Counter(volume, data["prior"])
    cache.get_or_create(key, make)
    (cache.path(key) / "image.npy").write_bytes(b"garbage")
    subject = cache.get_or_create(key, make)
    assert make.calls == 2 and isinstance(subject.image, MappedArray)


def test_bad_key_is_refused(tmp_path):
    from cgc_refine.exceptions import CGCRefineError

    with pytest.raises(CGCRefineError, match="cache key"):
        SubjectCache(tmp_path).path("../escape")


def test_crop_sampler_memmap_matches_in_memory(data):
    volume = load_volume(data["path"])
    cache = SubjectCache(data["tmp"] / "cache")
    key = cache.key([data["path"]], data["prior"], None, {})
    cached = cache.get_or_create(key, _Counter(volume, data["prior"]))
    fresh = prepare_subject(volume, data["prior"])
    for crop in ((16, 16, 8), (32, 32, 16)):  # inside the box, and padded beyond it
        a = CropSampler([fresh], crop, 0.5, seed=5).batch(3)
        b = CropSampler([cached], crop, 0.5, seed=5).batch(3)
        for x, y in zip(a, b):
            assert x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)


def test_refiner_fit_with_cache_dir_twice(data, monkeypatch):
    calls = {"n": 0}
    original = training.prepare_subject

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    import cgc_refine.subjects as subjects_module

    monkeypatch.setattr(subjects_module, "prepare_subject", counting)
    cache_dir = data["tmp"] / "cache"
    prior = data["prior"]

    def fit(**kwargs):
        return Refiner([prior], prior_kind="probability", config=TINY, device="cpu", random_state=2).fit(
            [data["path"]], **kwargs
        )

    first = fit(cache_dir=cache_dir)
    assert calls["n"] == 1
    second = fit(cache_dir=cache_dir)
    assert calls["n"] == 1  # the rerun skipped preprocessing
    plain = fit()
    assert calls["n"] == 2
    for name, weights in first.network_.state_dict().items():
        assert torch.equal(weights, second.network_.state_dict()[name])
        assert torch.equal(weights, plain.network_.state_dict()[name])
    assert first.crop_size_ == second.crop_size_ == plain.crop_size_
    assert len([p for p in cache_dir.iterdir()]) == 1


def _mapped_files() -> str:
    with open("/proc/self/maps", encoding="utf-8") as handle:
        return handle.read()


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc (Linux)")
def test_mapped_array_keeps_no_mapping_between_reads(tmp_path):
    path = tmp_path / "big.npy"
    np.save(path, np.arange(4 * 50 * 50 * 20, dtype=np.float32).reshape(4, 50, 50, 20))
    array = MappedArray(path)
    assert array.shape == (4, 50, 50, 20) and array.nbytes == 4 * 50 * 50 * 20 * 4 and len(array) == 4
    crop = array[:, 10:20, 5:15, 2:6]
    assert crop.flags.writeable and crop.shape == (4, 10, 10, 4)
    assert crop[1, 0, 0, 0] == 50 * 50 * 20 + 10 * 50 * 20 + 5 * 20 + 2
    assert str(path) not in _mapped_files()  # the read unmapped the file again
    import pickle

    clone = pickle.loads(pickle.dumps(array))  # what a data-loader worker receives
    assert np.array_equal(clone[:, 10:20, 5:15, 2:6], crop)


def test_fit_rerun_with_builtin_prior_skips_the_prior_too(data, monkeypatch):
    from cgc_refine.priors import GMMPrior

    calls = {"n": 0}
    original = GMMPrior.compute

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GMMPrior, "compute", counting)
    cache_dir = data["tmp"] / "cache"

    def fit(prior):
        return Refiner(prior, config=TINY, device="cpu").fit([data["path"]], cache_dir=cache_dir)

    first = fit(GMMPrior(n_components=3))
    assert calls["n"] == 1
    second = fit(GMMPrior(n_components=3))
    assert calls["n"] == 1  # hit: no prior computed, provenance read back from the entry
    assert second.priors_ == first.priors_ and first.priors_[0]["source"] == "gmm"
    fit(GMMPrior(n_components=4))  # another prior setting is another entry
    assert calls["n"] == 2 and len(list(cache_dir.iterdir())) == 2


def test_prior_file_content_keys_the_entry(data):
    from cgc_refine.cache import prior_key

    prior_path = save_array(data["prior"].data, data["phantom"].volume, data["tmp"] / "p.nii.gz", np.float32)
    copy = data["tmp"] / "copy.nii.gz"
    copy.write_bytes(prior_path.read_bytes())
    key = lambda p: SubjectCache.key([data["path"]], prior_key(None, p), None, {})  # noqa: E731
    assert key(prior_path) == key(copy)
    bumped = data["prior"].data.copy()
    bumped[3, 3, 3] = 0.7
    other = save_array(bumped, data["phantom"].volume, data["tmp"] / "q.nii.gz", np.float32)
    assert key(other) != key(prior_path)


def test_loaded_volume_is_keyed_by_its_data(data):
    from cgc_refine.cache import image_key

    volume = load_volume(data["path"])
    key = lambda v: SubjectCache.key(image_key(v), data["prior"], None, {})  # noqa: E731
    before = key(volume)
    assert before == key(load_volume(data["path"]))
    volume.data[0, 5, 5, 5] += 1.0  # changed in memory after loading from the file
    assert key(volume) != before
