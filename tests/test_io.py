"""Tests of cgc_refine.io: NIfTI reading, writing and orientation without geometry loss."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import cgc_refine.io as cio
from cgc_refine._utils import move_into_place
from cgc_refine.io import _nifti
from cgc_refine.exceptions import (
    CGCRefineError,
    InvalidImageError,
    InvalidPriorError,
    OutputExistsError,
    OutputNotWritableError,
    SpaceMismatchError,
)
from cgc_refine.io import (
    Volume,
    check_output_path,
    check_same_grid,
    default_output_path,
    from_canonical,
    load_array,
    load_mask,
    load_volume,
    save_array,
    save_mask,
    save_probability_map,
    to_canonical,
)

SHAPE = (6, 7, 8)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _las_affine() -> np.ndarray:
    affine = np.diag([-1.5, 1.0, 2.5, 1.0])
    affine[:3, 3] = [40.0, -60.0, -20.0]
    return affine


def _oblique_affine() -> np.ndarray:
    """Rotated, anisotropic, with permuted and flipped voxel axes (roughly P, S, L)."""
    linear = _rotation(0.2, -0.15, 0.3) @ np.diag([0.9, 1.1, 3.0])
    linear = linear[:, [1, 2, 0]] * np.array([-1.0, 1.0, -1.0])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [12.5, -30.25, 7.0]
    return affine


def _write(path: Path, data: np.ndarray, affine: np.ndarray, *, dtype=None, codes=(1, 1)) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=codes[0])
    img.header.set_sform(affine, code=codes[1])
    if dtype is not None:
        img.set_data_dtype(dtype)
    nib.save(img, str(path))
    return path


def _random(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))  # includes hidden temporary files


# ------------------------------------------------------------------------------ round trips


def test_round_trip_las(tmp_path):
    data = _random() * 100
    src = _write(tmp_path / "sub-01_FLAIR.nii.gz", data, _las_affine())
    vol = load_volume(src)
    assert vol.data.shape == (1, *SHAPE) and vol.data.dtype == np.float32
    assert vol.shape == SHAPE and vol.n_channels == 1
    np.testing.assert_array_equal(vol.data[0], data)
    np.testing.assert_allclose(vol.affine, _las_affine(), atol=1e-6)
    assert vol.axcodes == ("L", "A", "S")
    np.testing.assert_allclose(vol.spacing, (1.5, 1.0, 2.5), rtol=1e-6)
    assert vol.paths == (src,)

    prob = _random(seed=1)
    out = save_probability_map(prob, vol, tmp_path / "prob.nii.gz")
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, _las_affine(), atol=1e-6)
    assert nib.aff2axcodes(back.affine) == ("L", "A", "S")
    assert (int(back.header["qform_code"]), int(back.header["sform_code"])) == (1, 1)
    np.testing.assert_allclose(back.header.get_zooms(), (1.5, 1.0, 2.5), rtol=1e-6)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), prob)


@pytest.mark.parametrize(("suffix", "codes"), [(".nii", (1, 1)), (".nii.gz", (1, 1)),
                                               (".nii.gz", (1, 0)), (".nii.gz", (0, 4))])
def test_round_trip_oblique(tmp_path, suffix, codes):
    affine = _oblique_affine()
    data = _random(seed=2) * 500 - 100
    src = _write(tmp_path / f"ct{suffix}", data, affine, codes=codes)
    vol = load_volume(src)
    np.testing.assert_array_equal(vol.data[0], data)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    assert vol.axcodes == nib.aff2axcodes(affine)
    assert vol.axcodes != ("R", "A", "S")
    np.testing.assert_allclose(vol.spacing, (1.1, 3.0, 0.9), rtol=1e-5)

    mask = data > 150
    out = save_mask(mask, vol, tmp_path / f"mask{suffix}")
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    assert (int(back.header["qform_code"]), int(back.header["sform_code"])) == codes
    np.testing.assert_array_equal(load_mask(out, reference=vol), mask)


def test_header_without_coordinate_codes_gets_explicit_ones(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_zooms((2.0, 2.0, 3.0))
    src = tmp_path / "old.nii.gz"
    nib.save(nib.Nifti1Image(_random(), header.get_base_affine(), header=header), str(src))
    raw = nib.load(src).header
    assert (int(raw["qform_code"]), int(raw["sform_code"])) == (0, 0)
    vol = load_volume(src)
    assert vol.axcodes == ("L", "A", "S")  # the Analyze default orientation
    out = save_mask(vol.data[0] > 0.5, vol, tmp_path / "m.nii.gz")
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-6)
    assert int(back.header["qform_code"]) > 0 and int(back.header["sform_code"]) > 0


def test_in_memory_volume_saved_with_its_affine(tmp_path):
    affine = _oblique_affine()
    vol = Volume.from_array(_random(seed=3), affine=affine)
    assert vol.paths == () and vol.n_channels == 1
    np.testing.assert_allclose(vol.spacing, (1.1, 3.0, 0.9), rtol=1e-9)
    out = save_probability_map(vol.data[0], vol, tmp_path / "p.nii.gz")
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    assert int(back.header["sform_code"]) > 0 and int(back.header["qform_code"]) > 0


# --------------------------------------------------------------------------- dtype handling


def _int16_flair(path: Path) -> Path:
    """An int16 file whose header carries a non-trivial scl_slope/scl_inter."""
    data = np.linspace(-3.7, 1000.3, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE)
    return _write(path, data, _las_affine(), dtype=np.int16)


@pytest.mark.parametrize("kind", ["volume", "nibabel", "raw-header-volume", "raw-header-image"])
def test_probability_map_with_int16_header_is_float32(tmp_path, kind):
    flair = _int16_flair(tmp_path / "flair.nii.gz")
    raw = nib.load(flair)
    assert raw.get_data_dtype() == np.int16
    assert raw.dataobj.slope != 1.0 or raw.dataobj.inter != 0.0  # the file really scales
    # nibabel moves the scaling out of img.header; a header read directly keeps it
    with gzip.open(flair) as fh:
        disk_header = nib.Nifti1Header.from_fileobj(fh)
    assert disk_header["scl_slope"] != 1.0 and disk_header.get_data_dtype() == np.int16
    if kind == "volume":
        reference = load_volume(flair)
        assert reference.header.get_data_dtype() == np.int16
    elif kind == "nibabel":
        reference = raw
    elif kind == "raw-header-volume":
        reference = Volume.from_array(raw.get_fdata(), header=disk_header)
    else:
        reference = nib.Nifti1Image(np.asanyarray(raw.dataobj), None, header=disk_header)
    prob = np.random.default_rng(4).random(SHAPE).astype(np.float32)
    prob.flat[:3] = [0.123456789, 1e-7, 0.999999]
    out = save_probability_map(prob, reference, tmp_path / "prob.nii.gz")
    back = nib.load(out)
    assert back.get_data_dtype() == np.float32
    assert back.dataobj.slope == 1.0 and back.dataobj.inter == 0.0
    values = np.asanyarray(back.dataobj)
    assert values.dtype == np.float32
    np.testing.assert_allclose(values, prob, rtol=0, atol=1e-6)
    assert (float(back.header["cal_min"]), float(back.header["cal_max"])) == (0.0, 1.0)
    np.testing.assert_allclose(back.affine, raw.affine, atol=1e-6)


def test_probability_map_clipped_and_nan_rejected(tmp_path):
    vol = Volume.from_array(_random(), spacing=(1.0, 1.0, 2.0))
    prob = _random(seed=5)
    prob[0, 0, 0], prob[1, 1, 1] = -0.2, 1.3
    out = save_probability_map(prob, vol, tmp_path / "p.nii.gz")
    back = np.asanyarray(nib.load(out).dataobj)
    assert back[0, 0, 0] == 0.0 and back[1, 1, 1] == 1.0
    assert back.min() >= 0.0 and back.max() <= 1.0
    prob[2, 2, 2] = np.nan
    with pytest.raises(InvalidImageError, match="1 NaN"):
        save_probability_map(prob, vol, tmp_path / "nan.nii.gz")
    assert not (tmp_path / "nan.nii.gz").exists()


def test_mask_saved_as_uint8_binary(tmp_path):
    flair = _int16_flair(tmp_path / "flair.nii.gz")
    vol = load_volume(flair)
    mask = _random(seed=6) > 0.7
    out = save_mask(mask, vol, tmp_path / "mask.nii.gz")
    back = nib.load(out)
    assert back.get_data_dtype() == np.uint8
    values = np.asanyarray(back.dataobj)
    assert values.dtype == np.uint8
    assert set(np.unique(values).tolist()) == {0, 1}
    np.testing.assert_array_equal(values.astype(bool), mask)
    # float masks with values just below 1 still count as foreground
    soft = np.where(mask, np.float64(0.99999997), 0.0)
    out2 = save_mask(soft, vol, tmp_path / "mask2.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(nib.load(out2).dataobj), mask.astype(np.uint8))


def test_load_mask_float64_near_one(tmp_path):
    mask = _random(seed=7) > 0.5
    soft = np.where(mask, 0.99999997, 0.0)
    path = _write(tmp_path / "m.nii.gz", soft, np.eye(4), dtype=np.float64)
    loaded = load_mask(path)
    assert loaded.dtype == np.bool_
    np.testing.assert_array_equal(loaded, mask)


def test_load_array_keeps_values_and_checks_grid(tmp_path):
    labels = np.random.default_rng(8).integers(0, 4, SHAPE).astype(np.int16)
    path = _write(tmp_path / "labels.nii.gz", labels, _las_affine(), dtype=np.int16)
    ref = Volume.from_array(_random(), affine=_las_affine())
    data, affine = load_array(path, reference=ref)
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, labels)
    np.testing.assert_allclose(affine, _las_affine(), atol=1e-6)
    other = Volume.from_array(_random(), affine=np.eye(4))
    with pytest.raises(SpaceMismatchError, match="resample"):
        load_array(path, reference=other)


def test_load_array_error_class_follows_name(tmp_path):
    bad = _random()
    bad[0, 0, 0] = np.nan
    path = _write(tmp_path / "prior.nii.gz", bad, np.eye(4))
    with pytest.raises(InvalidPriorError, match="1 NaN"):
        load_array(path)
    with pytest.raises(InvalidImageError, match="scores file"):
        load_array(path, name="scores")
    with pytest.raises(InvalidPriorError):
        load_array(tmp_path / "missing.nii.gz", name="scores", error=InvalidPriorError)


# --------------------------------------------------------------------------- multi-modal


def test_multimodal_stacking_order(tmp_path):
    a, b = _random(seed=10), _random(seed=11) + 5
    pa = _write(tmp_path / "sub-01_T1w.nii.gz", a, _las_affine())
    pb = _write(tmp_path / "sub-01_FLAIR.nii.gz", b, _las_affine())
    vol = load_volume([pa, pb])
    assert vol.n_channels == 2 and vol.shape == SHAPE
    np.testing.assert_array_equal(vol.data[0], a)
    np.testing.assert_array_equal(vol.data[1], b)
    assert vol.paths == (pa, pb)
    rev = load_volume((pb, pa))
    np.testing.assert_array_equal(rev.data[0], b)
    np.testing.assert_array_equal(rev.data[1], a)


def test_multimodal_shape_mismatch(tmp_path):
    pa = _write(tmp_path / "a.nii.gz", _random(), np.eye(4))
    pb = _write(tmp_path / "b.nii.gz", _random((6, 7, 9)), np.eye(4))
    with pytest.raises(SpaceMismatchError, match=r"shapes differ.*resample_from_to"):
        load_volume([pa, pb])


def test_multimodal_affine_mismatch(tmp_path):
    shifted = _las_affine()
    shifted[0, 3] += 2.0
    pa = _write(tmp_path / "a.nii.gz", _random(), _las_affine())
    pb = _write(tmp_path / "b.nii.gz", _random(), shifted)
    with pytest.raises(SpaceMismatchError, match=r"2 mm.*--resample-prior") as info:
        load_volume([pa, pb])
    assert "b.nii.gz" in str(info.value)


def test_check_same_grid_tolerance():
    aff = _oblique_affine()
    rounded = aff.copy()
    rounded[:3] += 1e-6
    check_same_grid(SHAPE, aff, SHAPE, rounded)  # float32 rounding is tolerated
    moved = aff.copy()
    moved[:3, 3] += 0.01  # ~1 % of the smallest voxel
    with pytest.raises(SpaceMismatchError, match="voxels"):
        check_same_grid(SHAPE, aff, SHAPE, moved, names=("flair", "mask"))
    check_same_grid(SHAPE, aff, SHAPE, moved, atol=0.05)
    rotated = aff.copy()
    rotated[:3, :3] = _rotation(0.0, 0.0, 0.01) @ aff[:3, :3]
    with pytest.raises(SpaceMismatchError, match="mask"):
        check_same_grid(SHAPE, aff, SHAPE, rotated, names=("flair", "mask"))
    with pytest.raises(SpaceMismatchError, match="shapes differ"):
        check_same_grid(SHAPE, aff, (6, 7, 9), aff)


# ---------------------------------------------------------------------------- read errors


def _assert_one_line(err: BaseException, path: Path) -> None:
    message = str(err)
    assert path.name in message and "\n" not in message
    assert isinstance(err, CGCRefineError) and isinstance(err, ValueError)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(InvalidImageError, match="does not exist") as info:
        load_volume(path)
    _assert_one_line(info.value, path)


def test_text_file_is_not_nifti(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("this is not an image\n" * 20)
    with pytest.raises(InvalidImageError, match="not a readable NIfTI") as info:
        load_volume(path)
    _assert_one_line(info.value, path)


def test_png_is_not_nifti(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 500
    path = tmp_path / "slice.png"
    path.write_bytes(png)
    with pytest.raises(InvalidImageError, match=r"not a NIfTI file.*\.nii\.gz") as info:
        load_volume(path)
    _assert_one_line(info.value, path)
    disguised = tmp_path / "slice.nii"
    disguised.write_bytes(png)
    with pytest.raises(InvalidImageError, match="not a readable NIfTI") as info:
        load_volume(disguised)
    _assert_one_line(info.value, disguised)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_file(tmp_path, suffix):
    full = _write(tmp_path / f"full{suffix}", _random((20, 20, 20)), np.eye(4))
    raw = full.read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InvalidImageError, match="truncated or corrupt") as info:
        load_volume(path)
    _assert_one_line(info.value, path)


def test_not_gzip_despite_suffix(tmp_path):
    path = tmp_path / "plain.nii.gz"
    path.write_bytes(b"\x00" * 400)
    with pytest.raises(InvalidImageError, match="not a readable NIfTI"):
        load_volume(path)


def test_two_dimensional_image(tmp_path):
    path = _write(tmp_path / "slice2d.nii.gz", _random((6, 7)), np.eye(4))
    with pytest.raises(InvalidImageError, match=r"2-D image.*3-D volume is expected") as info:
        load_volume(path)
    _assert_one_line(info.value, path)


def test_single_slice_volume(tmp_path):
    path = _write(tmp_path / "thin.nii.gz", _random((6, 7, 1)), np.eye(4))
    with pytest.raises(InvalidImageError, match="single slice"):
        load_volume(path)


def test_four_dimensional_image(tmp_path):
    path = _write(tmp_path / "dwi.nii.gz", _random((6, 7, 8, 3)), np.eye(4))
    with pytest.raises(InvalidImageError, match=r"4-D image.*3-D volume.*fslsplit") as info:
        load_volume(path)
    _assert_one_line(info.value, path)


def test_trailing_singleton_fourth_dimension_is_squeezed(tmp_path):
    data = _random((6, 7, 8, 1))
    path = _write(tmp_path / "one.nii.gz", data, _las_affine())
    vol = load_volume(path)
    assert vol.data.shape == (1, 6, 7, 8)
    np.testing.assert_array_equal(vol.data[0], data[..., 0])
    assert vol.header.get_data_shape() == (6, 7, 8)
    out = save_mask(vol.data[0] > 0.5, vol, tmp_path / "m.nii.gz")
    assert nib.load(out).shape == (6, 7, 8)


def test_nan_and_inf_values(tmp_path):
    data = _random()
    data.flat[[1, 5, 9]] = np.nan
    data.flat[[2, 3]] = np.inf
    path = _write(tmp_path / "bad.nii.gz", data, np.eye(4))
    with pytest.raises(InvalidImageError, match="3 NaN and 2 infinite") as info:
        load_volume(path)
    _assert_one_line(info.value, path)


def test_empty_path_list():
    with pytest.raises(InvalidImageError, match="no image file"):
        load_volume([])


# ------------------------------------------------------------------------------- writing


def test_overwrite_refused_then_allowed(tmp_path):
    vol = Volume.from_array(_random())
    dest = tmp_path / "mask.nii.gz"
    first = _random(seed=1) > 0.5
    save_mask(first, vol, dest)
    with pytest.raises(OutputExistsError, match=r"overwrite=True") as info:
        save_mask(~first, vol, dest)
    assert "--overwrite" not in str(info.value)  # Python callers get the keyword
    np.testing.assert_array_equal(load_mask(dest), first)
    with pytest.raises(OutputExistsError, match=r"mask\.nii\.gz"):
        check_output_path(dest)
    assert check_output_path(dest, overwrite=True) == dest
    save_mask(~first, vol, dest, overwrite=True)
    np.testing.assert_array_equal(load_mask(dest), ~first)
    assert _files(tmp_path) == ["mask.nii.gz"]


def test_write_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst, *args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    vol = Volume.from_array(_random())
    dest = tmp_path / "p.nii.gz"
    save_probability_map(vol.data[0], vol, dest)
    np.testing.assert_array_equal(np.asanyarray(nib.load(dest).dataobj), vol.data[0])
    with pytest.raises(OutputExistsError):
        move_into_place(dest, dest, overwrite=False)
    assert _files(tmp_path) == ["p.nii.gz"]


def test_spacing_in_mm_from_header_units(tmp_path, caplog):
    caplog.set_level("INFO", logger="cgc_refine")
    img = nib.Nifti1Image(_random(), np.diag([500.0, 500.0, 2000.0, 1.0]))
    img.header.set_xyzt_units("micron")
    nib.save(img, str(tmp_path / "micro.nii.gz"))
    vol = load_volume(tmp_path / "micro.nii.gz")
    assert vol.spacing == pytest.approx((0.5, 0.5, 2.0))
    assert "micron" in caplog.text


def _interrupting_save(written: list[str], exc: BaseException):
    def fake_save(img, filename, *args, **kwargs):
        written.append(str(filename))
        with gzip.open(filename, "wb") as fh:  # a partial file, then the interruption
            fh.write(b"\x00" * 100)
        raise exc

    return fake_save


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    vol = Volume.from_array(_random())
    written: list[str] = []
    monkeypatch.setattr(nib, "save", _interrupting_save(written, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_probability_map(vol.data[0], vol, out_dir / "prob.nii.gz")
    assert written and Path(written[0]).parent == out_dir
    assert Path(written[0]).name.startswith(".") and written[0].endswith(".nii.gz")
    assert _files(out_dir) == []


def test_interrupted_overwrite_keeps_old_file(tmp_path, monkeypatch):
    vol = Volume.from_array(_random())
    dest = tmp_path / "mask.nii"
    old = _random(seed=3) > 0.5
    save_mask(old, vol, dest)
    monkeypatch.setattr(nib, "save", _interrupting_save([], KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_mask(~old, vol, dest, overwrite=True)
    monkeypatch.undo()
    assert _files(tmp_path) == ["mask.nii"]
    np.testing.assert_array_equal(load_mask(dest), old)


def test_permission_error_while_writing(tmp_path, monkeypatch):
    vol = Volume.from_array(_random())
    monkeypatch.setattr(nib, "save", _interrupting_save([], PermissionError(13, "denied")))
    with pytest.raises(OutputNotWritableError, match="permission denied"):
        save_mask(vol.data[0] > 0.5, vol, tmp_path / "m.nii.gz")
    assert _files(tmp_path) == []


def test_unwritable_destinations(tmp_path, monkeypatch):
    vol = Volume.from_array(_random())
    mask = vol.data[0] > 0.5
    with pytest.raises(OutputNotWritableError, match="does not exist"):
        save_mask(mask, vol, tmp_path / "missing" / "m.nii.gz")
    with pytest.raises(OutputNotWritableError, match=r"\.nii\.gz or \.nii"):
        save_mask(mask, vol, tmp_path / "m.png")
    folder_like = tmp_path / "dir.nii.gz"
    folder_like.mkdir()
    with pytest.raises(OutputNotWritableError, match="existing folder"):
        check_output_path(folder_like, overwrite=True)
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(OutputNotWritableError, match="not writable") as info:
        save_mask(mask, vol, tmp_path / "m.nii.gz")
    assert isinstance(info.value, PermissionError)
    assert not (tmp_path / "m.nii.gz").exists()


def test_save_shape_mismatch(tmp_path):
    vol = Volume.from_array(_random())
    with pytest.raises(SpaceMismatchError, match="from_canonical"):
        save_mask(np.zeros((8, 7, 6), bool), vol, tmp_path / "m.nii.gz")
    assert _files(tmp_path) == []


def test_save_array_integer_checks(tmp_path):
    vol = Volume.from_array(_random())
    labels = np.random.default_rng(0).integers(0, 300, SHAPE)
    out = save_array(labels, vol, tmp_path / "labels.nii.gz", np.int16)
    back = nib.load(out)
    assert back.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels)
    with pytest.raises(InvalidImageError, match="outside"):
        save_array(labels, vol, tmp_path / "u8.nii.gz", np.uint8)
    with pytest.raises(InvalidImageError, match="non-integer"):
        save_array(_random(), vol, tmp_path / "f.nii.gz", np.int16)


def test_nifti2_reference_gives_nifti2_output(tmp_path):
    img = nib.Nifti2Image(_random(), _las_affine())
    nib.save(img, str(tmp_path / "n2.nii.gz"))
    vol = load_volume(tmp_path / "n2.nii.gz")
    assert isinstance(vol.header, nib.Nifti2Header)
    out = save_mask(vol.data[0] > 0.5, vol, tmp_path / "m.nii.gz")
    back = nib.load(out)
    assert isinstance(back, nib.Nifti2Image)
    np.testing.assert_allclose(back.affine, _las_affine(), atol=1e-6)


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize(
    "affine_fn", [_las_affine, _oblique_affine, lambda: np.diag([2.0, 1.0, 3.0, 1.0])]
)
def test_canonical_round_trip(affine_fn):
    affine = affine_fn()
    data = np.random.default_rng(12).random((2, *SHAPE)).astype(np.float32)
    vol = Volume.from_array(data, affine=affine)
    can = to_canonical(vol)
    assert can.axcodes == ("R", "A", "S")
    assert can.n_channels == 2
    np.testing.assert_allclose(can.spacing, _nifti._affine_spacing(can.affine), rtol=1e-9)
    assert sorted(can.spacing) == pytest.approx(sorted(vol.spacing))
    # every voxel keeps its world position and value
    rng = np.random.default_rng(13)
    ijk = np.stack([rng.integers(0, n, 20) for n in SHAPE], axis=1)
    world = (affine @ np.c_[ijk, np.ones(20)].T).T
    can_ijk = (np.linalg.inv(can.affine) @ world.T).T[:, :3]
    np.testing.assert_allclose(can_ijk, np.round(can_ijk), atol=1e-6)
    can_ijk = np.round(can_ijk).astype(int)
    np.testing.assert_array_equal(
        can.data[:, can_ijk[:, 0], can_ijk[:, 1], can_ijk[:, 2]],
        vol.data[:, ijk[:, 0], ijk[:, 1], ijk[:, 2]],
    )
    # exact inverse, for 4-D and 3-D arrays of any dtype
    np.testing.assert_array_equal(from_canonical(can.data, vol), vol.data)
    labels = (can.data[0] > 0.5).astype(np.uint8)
    back = from_canonical(labels, vol)
    assert back.dtype == np.uint8 and back.flags.c_contiguous
    np.testing.assert_array_equal(back, (vol.data[0] > 0.5).astype(np.uint8))


def test_canonical_results_saved_either_way_agree(tmp_path):
    src = _write(tmp_path / "ct.nii.gz", _random(seed=14), _oblique_affine())
    vol = load_volume(src)
    can = to_canonical(vol)
    assert can.axcodes == ("R", "A", "S")
    mask_can = can.data[0] > 0.5
    a = save_mask(mask_can, can, tmp_path / "a.nii.gz")
    b = save_mask(from_canonical(mask_can, vol), vol, tmp_path / "b.nii.gz")
    img_a = nib.as_closest_canonical(nib.load(a))
    img_b = nib.as_closest_canonical(nib.load(b))
    np.testing.assert_allclose(img_a.affine, img_b.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(img_a.dataobj), np.asanyarray(img_b.dataobj))


def test_from_canonical_shape_check():
    vol = Volume.from_array(_random(), affine=_oblique_affine())
    with pytest.raises(SpaceMismatchError, match="canonical grid"):
        from_canonical(np.zeros(SHAPE), vol)


def test_to_canonical_is_identity_for_ras():
    vol = Volume.from_array(_random(), spacing=(1.0, 2.0, 3.0))
    assert vol.axcodes == ("R", "A", "S")
    assert to_canonical(vol) is vol


# ------------------------------------------------------------------------- Volume, paths


def test_volume_from_array():
    vol = Volume.from_array(_random().astype(np.float64), spacing=(0.5, 0.75, 2.0))
    assert vol.data.shape == (1, *SHAPE) and vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.affine, np.diag([0.5, 0.75, 2.0, 1.0]))
    assert vol.spacing == (0.5, 0.75, 2.0)
    assert vol.header.get_data_shape() == SHAPE
    assert int(vol.header["sform_code"]) > 0
    assert "Volume(shape=(6, 7, 8)" in repr(vol)
    default = Volume.from_array(np.zeros((2, 3, 4, 5)))
    assert default.n_channels == 2 and default.spacing == (1.0, 1.0, 1.0)
    bad = _random()
    bad[1, 2, 3] = np.inf
    with pytest.raises(InvalidImageError, match="1 infinite"):
        Volume.from_array(bad)
    with pytest.raises(InvalidImageError, match="3-D"):
        Volume.from_array(np.zeros((4, 4)))
    with pytest.raises(InvalidImageError, match="spacing"):
        Volume.from_array(_random(), spacing=(1.0, 0.0, 1.0))


def test_volume_from_array_with_header_uses_its_geometry(tmp_path):
    src = _write(tmp_path / "ref.nii.gz", _random(), _oblique_affine())
    header = nib.load(src).header
    vol = Volume.from_array(_random(seed=2), header=header)
    np.testing.assert_allclose(vol.affine, _oblique_affine(), atol=1e-5)
    np.testing.assert_allclose(vol.spacing, (1.1, 3.0, 0.9), rtol=1e-5)
    assert vol.header is not header
    moved = Volume.from_array(_random(seed=2), affine=_las_affine(), header=header)
    np.testing.assert_allclose(moved.header.get_best_affine(), _las_affine(), atol=1e-5)
    np.testing.assert_allclose(moved.header.get_zooms()[:3], moved.spacing, rtol=1e-6)
    np.testing.assert_allclose(header.get_best_affine(), _oblique_affine(), atol=1e-5)


def test_default_output_path(tmp_path):
    assert default_output_path("data/sub-01_FLAIR.nii.gz") == Path(
        "data/sub-01_FLAIR_label-lesion_mask.nii.gz"
    )
    assert default_output_path("ct.nii", "prob") == Path("ct_prob.nii.gz")
    out = default_output_path(Path("a/b/x.NII.GZ"), "mask", out_dir=tmp_path)
    assert out == tmp_path / "x_mask.nii.gz"


# ----------------------------------------------- issue 13: header vs file size, inputs, writes


def _forged(path: Path, shape: tuple[int, ...], payload: bytes, *, gz: bool) -> Path:
    """A NIfTI header claiming ``shape`` float32 voxels, followed by only ``payload``."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    buffer = __import__("io").BytesIO()
    header.write_to(buffer)
    raw = buffer.getvalue() + b"\x00" * 4 + payload  # 348-byte header, 4-byte extension flag
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


@pytest.fixture()
def no_voxel_reads(monkeypatch):
    """Fail the test if the voxel data of any file are read (the check must come first)."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("the voxel data were read before the size check")

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", refuse)
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "get_unscaled", refuse)


@pytest.mark.parametrize("gz", [False, True])
def test_header_claiming_32_gb_in_1_kb_is_refused_before_reading(tmp_path, gz, no_voxel_reads):
    name = "huge.nii.gz" if gz else "huge.nii"
    path = _forged(tmp_path / name, (2000, 2000, 2000), b"\x00" * 1024, gz=gz)
    with pytest.raises(InvalidImageError, match=r"2000x2000x2000 float32.*holds only") as info:
        load_volume(path)
    _assert_one_line(info.value, path)
    assert "truncated or corrupt" in str(info.value)


def test_gzip_trailer_smaller_than_header_claim_is_refused(tmp_path, no_voxel_reads):
    # Random bytes do not compress, so the deflate-ratio bound cannot decide (the file could
    # hold 100x100x100 float32 = 4 MB); the gzip trailer (ISIZE = 352 + 40000) and then the
    # bounded count of decompressed bytes do.
    payload = np.random.default_rng(0).bytes(40000)
    path = _forged(tmp_path / "short.nii.gz", (100, 100, 100), payload, gz=True)
    assert path.stat().st_size * _nifti._MAX_DEFLATE_RATIO + _nifti._COUNT_CHUNK > 352 + 4 * 100**3
    with pytest.raises(InvalidImageError, match="100x100x100 float32"):
        load_volume(path)


def test_size_check_accepts_valid_files(tmp_path):
    data = _random((20, 20, 10))
    plain = _write(tmp_path / "a.nii", data, np.eye(4))
    packed = _write(tmp_path / "a.nii.gz", data, np.eye(4))
    # A multi-member gzip (as written by some tools) has the size of its last member only in
    # the trailer; the bounded count accepts it.
    raw = plain.read_bytes()
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:3000]) + gzip.compress(raw[3000:]))
    # Extra bytes after the voxel data are ignored by readers and accepted here.
    padded = tmp_path / "padded.nii"
    padded.write_bytes(raw + b"\x00" * 64)
    for path in (plain, packed, multi, padded):
        np.testing.assert_array_equal(load_volume(path).data[0], data)


def test_check_input_file(tmp_path):
    image = _write(tmp_path / "img.nii.gz", _random(), np.eye(4))
    assert cio.check_input_file(image) == image
    with pytest.raises(InvalidImageError, match="does not exist"):
        cio.check_input_file(tmp_path / "missing.nii.gz")
    with pytest.raises(InvalidPriorError, match="prior path .* is a folder"):
        cio.check_input_file(tmp_path, name="prior", error=InvalidPriorError)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InvalidImageError, match="not a NIfTI file"):
        cio.check_input_file(tmp_path / "notes.txt")


def test_same_file_or_content(tmp_path):
    image = _write(tmp_path / "img.nii.gz", _random(), np.eye(4))
    other = _write(tmp_path / "other.nii.gz", _random(seed=5), np.eye(4))
    copy = tmp_path / "copy.nii.gz"
    copy.write_bytes(image.read_bytes())
    link = tmp_path / "link.nii.gz"
    link.symlink_to(image)
    assert cio.same_file_or_content(image, image)
    assert cio.same_file_or_content(tmp_path / "." / "img.nii.gz", image)
    assert cio.same_file_or_content(link, image)
    assert cio.same_file_or_content(copy, image)
    assert not cio.same_file_or_content(other, image)
    assert not cio.same_file_or_content(tmp_path / "missing.nii.gz", image)


def test_overwrite_wording_follows_the_caller(tmp_path):
    from cgc_refine._utils import atomic_write, overwrite_wording

    vol = Volume.from_array(_random())
    dest = tmp_path / "mask.nii.gz"
    save_mask(vol.data[0] > 0.5, vol, dest)
    sidecar = tmp_path / "mask.json"
    sidecar.write_text("{}")
    with overwrite_wording("add --overwrite"):
        for write in (lambda: save_mask(vol.data[0] > 0.5, vol, dest),
                      lambda: atomic_write(sidecar, lambda h: h.write("x"), overwrite=False, binary=False)):
            with pytest.raises(OutputExistsError, match="add --overwrite") as info:
                write()
            assert "overwrite=True" not in str(info.value)
    with pytest.raises(OutputExistsError, match="pass overwrite=True") as info:
        atomic_write(sidecar, lambda h: h.write("x"), overwrite=False, binary=False)
    assert "--overwrite" not in str(info.value)


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"),
    OSError(28, "No space left on device"),
    OSError(27, "File too large"),
])
def test_atomic_write_failure_raises_the_given_error(tmp_path, failure):
    from cgc_refine._utils import atomic_write
    from cgc_refine.exceptions import CheckpointError

    def write(handle):
        handle.write(b"partial")
        raise failure

    dest = tmp_path / "model.pt"
    with pytest.raises(CheckpointError, match=r"writing model .*model\.pt' failed") as info:
        atomic_write(dest, write, overwrite=False, binary=True, what="model", error=CheckpointError)
    assert "\n" not in str(info.value) and "disk space" in str(info.value)
    with pytest.raises(OutputNotWritableError):  # the default error class
        atomic_write(dest, write, overwrite=False, binary=True)
    assert _files(tmp_path) == []  # no temporary file left


def test_nifti_write_over_file_size_limit_is_an_error(tmp_path):
    """A real EFBIG (ulimit -f) while writing a NIfTI file: exit-2 error, nothing left behind."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, numpy as np
        from cgc_refine.io import Volume, save_array
        from cgc_refine.exceptions import OutputNotWritableError
        vol = Volume.from_array(np.random.default_rng(0).random((64, 64, 64), dtype=np.float32))
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        try:
            save_array(vol.data[0], vol, {str(tmp_path / 'big.nii')!r}, np.float32)
        except OutputNotWritableError as exc:
            print("ERROR", exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ERROR") and "big.nii" in done.stdout, done.stdout
    assert _files(tmp_path) == []
