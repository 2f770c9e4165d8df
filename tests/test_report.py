"""Tests of the visual report (slice choice, PNG montage, HTML page) and ``--report`` (CPU, tiny)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import cgc_refine
from cgc_refine.exceptions import (
    CGCRefineError,
    OutputExistsError,
    SpaceMismatchError,
)
from cgc_refine.report import (
    MissingDependencyError,
    lesion_slices,
    panel_extent,
    render_montage,
    require_matplotlib,
    write_html_report,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import TRAIN, las_affine, listing, oblique_affine, run, write_subject

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HINT = 'pip install "cgc_refine[report]"'


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header, after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def blob_volume(shape: tuple[int, int, int] = (16, 16, 8)) -> tuple[np.ndarray, np.ndarray]:
    """A bright cube in a noisy ellipsoid, and its mask."""
    rng = np.random.default_rng(0)
    image = np.zeros(shape, dtype=np.float32)
    grid = np.indices(shape).astype(float)
    centre = (np.asarray(shape) - 1) / 2
    inside = (((grid - centre[:, None, None, None]) / (np.asarray(shape)[:, None, None, None] * 0.45)) ** 2).sum(0) <= 1
    image[inside] = 0.5 + 0.05 * rng.standard_normal(int(inside.sum()))
    mask = np.zeros(shape, dtype=bool)
    mask[6:10, 6:10, 3:6] = True
    image[mask] = 1.0
    return image, mask


# --------------------------------------------------------------------------------------------
# lesion_slices
# --------------------------------------------------------------------------------------------


def test_lesion_slices_prefers_full_slices_not_adjacent() -> None:
    mask = np.zeros((8, 8, 12), dtype=bool)
    mask[:5, :4, 5] = True  # 20 voxels: the fullest slice
    mask[:6, :3, 6] = True  # 18, next to 5: skipped while others remain
    mask[:2, :4, 3] = True  # 8
    mask[:1, :5, 9] = True  # 5
    assert lesion_slices(mask, n=3) == [3, 5, 9]
    assert lesion_slices(mask, n=1) == [5]
    # only adjacent lesion slices left: then they are taken, fullest first
    assert lesion_slices(mask, n=4) == [3, 5, 6, 9]


def test_lesion_slices_union_axis_and_fill() -> None:
    a = np.zeros((10, 6, 6), dtype=np.float32)
    b = np.zeros((10, 6, 6), dtype=np.float32)
    a[2, :3, :3] = 0.9  # 9 voxels on slice 2 of axis 0
    b[7, :2, :2] = 1.0  # 4 voxels on slice 7
    b[2, 4, 4] = 0.4  # below 0.5: not lesion
    assert lesion_slices([a, None, b], n=2, axis=0) == [2, 7]
    # fewer lesion slices than asked: filled with slices near the lesions, spread out
    only = np.zeros((6, 6, 10), dtype=bool)
    only[2:4, 2:4, 5] = True
    picked = lesion_slices(only, n=3)
    assert len(picked) == 3 and 5 in picked and picked == sorted(picked)
    assert all(abs(i - 5) <= 2 for i in picked)
    # n larger than the axis: every slice once
    assert lesion_slices(only[:, :, :2], n=5) == [0, 1]


def test_lesion_slices_empty_gives_central_slices() -> None:
    empty = np.zeros((4, 4, 16), dtype=bool)
    assert lesion_slices(empty, n=1) == [8]
    picked = lesion_slices(empty, n=3)
    assert len(picked) == 3 and picked[0] >= 3 and picked[-1] <= 12 and picked[1] in (7, 8)


def test_lesion_slices_errors() -> None:
    with pytest.raises(ValueError, match="positive integer"):
        lesion_slices(np.zeros((4, 4, 4)), n=0)
    with pytest.raises(ValueError, match="axis"):
        lesion_slices(np.zeros((4, 4, 4)), axis=3)
    with pytest.raises(SpaceMismatchError):
        lesion_slices([np.zeros((4, 4, 4)), np.zeros((4, 4, 5))])


# --------------------------------------------------------------------------------------------
# render_montage
# --------------------------------------------------------------------------------------------


def test_panel_extent_is_in_millimetres() -> None:
    assert panel_extent((16, 16, 8), (0.5, 0.5, 4.0), axis=2) == (0.0, 8.0, 0.0, 8.0)
    assert panel_extent((16, 16, 8), (0.5, 0.5, 4.0), axis=0) == (0.0, 8.0, 0.0, 32.0)
    assert panel_extent((16, 16, 8), (1.0, 1.0, 1.0), axis=0) == (0.0, 16.0, 0.0, 8.0)


def test_render_montage_writes_small_png(tmp_path: Path) -> None:
    image, mask = blob_volume()
    prior = mask.astype(np.float32) * 0.8
    out = render_montage(image, tmp_path / "m.png", prior=prior, refined=mask, truth=mask,
                         spacing=(1.0, 1.0, 2.0), title="a <b>title</b>")
    assert out == tmp_path / "m.png"
    width, height = png_size(out)
    assert 300 <= width <= 2000 and 150 <= height <= 800
    assert out.stat().st_size < 400_000
    assert listing(tmp_path) == ["m.png"]  # no temporary file left behind
    with pytest.raises(OutputExistsError, match="overwrite"):
        render_montage(image, out, refined=mask)
    render_montage(image, out, refined=mask, slices=[4], overwrite=True)
    one_width, _ = png_size(out)
    assert one_width < width / 2  # one column instead of three


def test_render_montage_honours_anisotropic_spacing(tmp_path: Path) -> None:
    image, mask = blob_volume((16, 16, 8))
    # sliced across the thick axis: 0.5 x 4 mm pixels, panels 8 mm wide and 32 mm tall
    w_iso, h_iso = png_size(render_montage(image, tmp_path / "iso.png", refined=mask, axis=0,
                                           spacing=(1.0, 1.0, 1.0), slices=[7]))
    w_aniso, h_aniso = png_size(render_montage(image, tmp_path / "aniso.png", refined=mask, axis=0,
                                               spacing=(0.5, 0.5, 4.0), slices=[7]))
    assert h_iso < w_iso  # 16 x 8 mm: wide
    assert h_aniso > 2 * w_aniso  # 8 x 32 mm: tall, not squashed into a square
    # axial panels of 0.5 x 0.5 mm pixels are square whatever the slice thickness
    w_ax, h_ax = png_size(render_montage(image, tmp_path / "axial.png", refined=mask,
                                         spacing=(0.5, 0.5, 8.0), slices=[4]))
    w_ref, h_ref = png_size(render_montage(image, tmp_path / "ref.png", refined=mask,
                                           spacing=(1.0, 1.0, 1.0), slices=[4]))
    assert (w_ax, h_ax) == (w_ref, h_ref)


def test_render_montage_checks_inputs(tmp_path: Path) -> None:
    image, mask = blob_volume()
    with pytest.raises(SpaceMismatchError, match="image grid"):
        render_montage(image, tmp_path / "x.png", refined=mask[:, :, :4])
    with pytest.raises(ValueError, match="out of range"):
        render_montage(image, tmp_path / "x.png", refined=mask, slices=[8])
    assert listing(tmp_path) == []


def test_render_montage_never_imports_pyplot(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from cgc_refine.report import render_montage
        render_montage(np.random.default_rng(0).random((8, 8, 4)), {str(tmp_path / 'p.png')!r},
                       refined=np.ones((8, 8, 4)) > 2)
        assert "matplotlib.pyplot" not in sys.modules
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(cgc_refine.__file__).parents[1]), "MPLBACKEND": "TkAgg"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    png_size(tmp_path / "p.png")


def test_missing_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError) as info:
        require_matplotlib()
    assert str(info.value) == f"--report needs matplotlib: {HINT}"
    assert isinstance(info.value, CGCRefineError) and isinstance(info.value, ImportError)
    image, mask = blob_volume()
    with pytest.raises(MissingDependencyError, match="matplotlib"):
        render_montage(image, tmp_path / "m.png", refined=mask)
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------------------------
# write_html_report
# --------------------------------------------------------------------------------------------


def test_html_report_escapes_text_and_links_png(tmp_path: Path) -> None:
    page = write_html_report(
        tmp_path / "r.html", title="<script>alert('x')</script> & co",
        numbers={"Dice <refined>": 0.81234, "precision": float("nan"), "HD95 (mm)": float("inf"),
                 "voxels": 12, "note": "<img src=x onerror=alert(1)>"},
        image_name="sub 01_report.png", sidecar={"prior": {"name": "</pre><script>"}},
    )
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "<script>" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in text
    assert "Dice &lt;refined&gt;" in text and "0.8123" in text
    assert "n/a" in text and "inf" in text
    assert 'src="sub%2001_report.png"' in text  # relative link, URL-quoted
    assert "http" not in text  # self-contained: nothing loaded from elsewhere
    assert listing(tmp_path) == ["r.html"]
    with pytest.raises(OutputExistsError):
        write_html_report(page, title="t", numbers={}, image_name="a.png")


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def subject(tmp_path: Path) -> dict[str, Path]:
    files = write_subject(tmp_path / "in", las_affine())
    files["out"] = tmp_path / "out"
    files["out"].mkdir()
    return files


def test_cli_report_single_subject_and_predict(subject: dict[str, Path]) -> None:
    out = subject["out"]
    result = run("--prior", subject["prior"], "--image", subject["image"], "--truth", subject["truth"],
                 "--report", "--save-model", out / "m.pt", "-o", out, *TRAIN)
    assert result.exit_code == 0, result.stderr
    png = out / "flair_label-lesion_mask_report.png"
    page = out / "flair_label-lesion_mask_report.html"
    assert f"wrote {png}" in result.stdout and f"wrote {page}" in result.stdout
    assert "Dice against the truth" in result.stdout
    png_size(png)
    assert png.stat().st_size < 400_000
    text = page.read_text(encoding="utf-8")
    assert 'src="flair_label-lesion_mask_report.png"' in text
    for phrase in ("prior lesion volume (ml", "refined lesion volume (ml)", "Dice (refined)",
                   "HD95 (refined, mm)", "Dice (prior)", "Dice with the prior (label-free)",
                   "voxels changed vs the prior (label-free)", "TTA agreement (label-free)"):
        assert phrase in text, phrase
    sidecar = json.loads((out / "flair_label-lesion_mask.json").read_text())
    assert sidecar["outputs"]["report_png"] == str(png.resolve())
    assert set(sidecar["evaluation"]["refined"]) >= {"dice", "sensitivity", "precision", "hd95"}
    assert not [n for n in listing(out) if n.startswith(".")]

    predicted = out / "pred.nii.gz"
    result = run("predict", "--model", out / "m.pt", "--image", subject["image"], "--truth",
                 subject["truth"], "--report", "-o", predicted, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    png_size(out / "pred_report.png")
    text = (out / "pred_report.html").read_text(encoding="utf-8")
    assert "Dice (refined)" in text and "prior lesion volume" not in text


def test_cli_report_demo(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = run("demo", "--iterations", "1", "--shape", "32", "32", "16", "--crop-size", "16", "16",
                 "16", "--device", "cpu", "--report", "-o", out)
    assert result.exit_code == 0, result.stderr
    png_size(out / "phantom_FLAIR_label-lesion_mask_report.png")
    assert "Dice (prior)" in (out / "phantom_FLAIR_label-lesion_mask_report.html").read_text()
    result = run("demo", "--report")
    assert result.exit_code == 2 and "--report needs -o" in result.stderr


@pytest.mark.parametrize("command", ["single", "predict", "demo"])
def test_cli_report_without_matplotlib_fails_fast(
    subject: dict[str, Path], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    before = listing(subject["image"].parent)
    out = subject["out"]
    if command == "single":
        args = ["--prior", "gmm", "--image", subject["image"], "--report", "-o", out, *TRAIN]
    elif command == "predict":
        args = ["predict", "--model", out / "missing.pt", "--image", subject["image"], "--report",
                "-o", out]
    else:
        args = ["demo", "--iterations", "1", "--report", "-o", out / "demo"]
    result = run(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"cgc-refine: error: --report needs matplotlib: {HINT}"]
    assert listing(out) == [] and listing(subject["image"].parent) == before


def test_cli_report_file_exists_fails_before_compute(subject: dict[str, Path]) -> None:
    page = subject["out"] / "flair_label-lesion_mask_report.html"
    page.write_text("keep me")
    result = run("--prior", "gmm", "--image", subject["image"], "--report", "-o", subject["out"],
                 *TRAIN)
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert listing(subject["out"]) == [page.name] and page.read_text() == "keep me"


def test_cli_report_failure_rolls_back_outputs(
    subject: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cgc_refine import report

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report, "write_html_report", broken)
    result = run("--prior", subject["prior"], "--image", subject["image"], "--report", "-o",
                 subject["out"], *TRAIN)
    assert result.exit_code == 1, result.stderr
    assert listing(subject["out"]) == []  # mask and PNG written first, then removed again


def test_cli_truth_on_another_grid_fails_before_training(
    subject: dict[str, Path], tmp_path: Path
) -> None:
    other = write_subject(tmp_path / "other", oblique_affine())
    result = run("--prior", "gmm", "--image", subject["image"], "--truth", other["truth"], "--report",
                 "-o", subject["out"], *TRAIN)
    assert result.exit_code == 2, result.stderr
    assert "truth" in result.stderr and "Traceback" not in result.stderr
    assert listing(subject["out"]) == []


# --------------------------------------------------------------------------------------------
# issue 13 item 11: canonical orientation, labelled sides
# --------------------------------------------------------------------------------------------


def _asymmetric_head() -> tuple[np.ndarray, np.ndarray]:
    """An RAS image whose right-anterior quadrant is bright, with a lesion on the left."""
    image, _ = blob_volume((20, 16, 8))
    image[12:, 10:, :] += 0.4  # high x (right), high y (anterior)
    mask = np.zeros(image.shape, bool)
    mask[3:7, 5:9, 3:6] = True  # low x: the left hemisphere
    return image, mask


def _pixels(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(str(path))


def _lps(array: np.ndarray) -> np.ndarray:
    return array[::-1, ::-1, :].copy()


RAS = np.diag([1.0, 1.0, 2.0, 1.0])
LPS = np.diag([-1.0, -1.0, 2.0, 1.0])
LPS[:3, 3] = [19.0, 15.0, 0.0]  # the same world positions as RAS's voxels


def test_lps_and_ras_inputs_give_the_same_picture(tmp_path: Path) -> None:
    image, mask = _asymmetric_head()
    ras = render_montage(image, tmp_path / "ras.png", refined=mask, affine=RAS, slices=[4])
    lps = render_montage(_lps(image), tmp_path / "lps.png", refined=_lps(mask), affine=LPS,
                         slices=[4])
    np.testing.assert_array_equal(_pixels(ras), _pixels(lps))
    # in raw voxel order (the former behaviour) the two differ: the test can tell
    raw_ras = render_montage(image, tmp_path / "raw_ras.png", refined=mask, affine=RAS,
                             slices=[4], orientation="voxel")
    raw_lps = render_montage(_lps(image), tmp_path / "raw_lps.png", refined=_lps(mask),
                             affine=LPS, slices=[4], orientation="voxel")
    assert not np.array_equal(_pixels(raw_ras), _pixels(raw_lps))


def test_neurological_panel_has_right_and_anterior_where_expected(tmp_path: Path) -> None:
    """The bright right-anterior quadrant is drawn top right (neurological), top left
    (radiological), for an RAS and an LPS file alike."""
    image, mask = _asymmetric_head()
    for name, data, affine in (("ras", image, RAS), ("lps", _lps(image), LPS)):
        for orientation, bright_on_right in (("neurological", True), ("radiological", False)):
            path = render_montage(data, tmp_path / f"{name}_{orientation}.png", slices=[4],
                                  affine=affine, orientation=orientation, window=(0.0, 1.5))
            rgb = _pixels(path)[..., :3]
            grey = rgb.mean(axis=-1)
            # the panel: grey pixels of the image (the figure is black, the side letters and
            # the convention note light blue)
            rows, cols = np.nonzero((grey > 0.05) & (np.ptp(rgb, axis=-1) < 0.02))
            panel = grey[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            h, w = panel.shape
            upper = panel[: h // 3]  # image rows run downwards: the top is anterior
            left, right = upper[:, : w // 3].mean(), upper[:, -w // 3:].mean()
            assert (right > left) == bright_on_right, (name, orientation, left, right)


def test_side_labels() -> None:
    from cgc_refine.report import side_labels

    assert side_labels(2) == {"left": "L", "right": "R", "bottom": "P", "top": "A"}
    assert side_labels(2, "radiological") == {"left": "R", "right": "L", "bottom": "P", "top": "A"}
    assert side_labels(1, "radiological") == {"left": "R", "right": "L", "bottom": "I", "top": "S"}
    assert side_labels(0) == side_labels(0, "radiological") == {
        "left": "P", "right": "A", "bottom": "I", "top": "S"}
    with pytest.raises(ValueError, match="orientation"):
        side_labels(2, "upside-down")


def test_slices_are_the_input_voxel_indices_and_bad_orientation(tmp_path: Path) -> None:
    image, mask = _asymmetric_head()
    flipped_z = np.diag([1.0, 1.0, -2.0, 1.0])  # RAI: the slice axis runs backwards
    a = render_montage(image, tmp_path / "a.png", refined=mask, affine=flipped_z, slices=[2])
    b = render_montage(image[:, :, ::-1].copy(), tmp_path / "b.png", refined=mask[:, :, ::-1].copy(),
                       affine=RAS, slices=[5])  # voxel 2 of 8 reversed is voxel 5
    assert png_size(a) == png_size(b)
    with pytest.raises(ValueError, match="orientation"):
        render_montage(image, tmp_path / "c.png", affine=RAS, orientation="sideways")


def test_report_table_lists_the_label_free_facts_of_every_round() -> None:
    from cgc_refine.workflow.results import report_numbers

    from cgc_refine.phantom import make_phantom

    volume = make_phantom((8, 8, 4), seed=0).volume
    refinement = {"voxels_changed_vs_prior": 12, "dice_with_prior": 0.9, "tta_agreement": 0.97,
                  "rounds": [{"round": 2, "voxels_changed": [5, 7], "dice_with_previous_target": [0.8, 1.0],
                              "tta_agreement": [0.9, 0.96]}], "guard": None}
    numbers = report_numbers(volume=volume, refined=np.zeros((8, 8, 4), np.uint8), prior=None, truth=None,
                             evaluation=None, settings={}, refinement=refinement)
    assert numbers["voxels changed vs the prior (label-free)"] == 12
    assert numbers["round 2 target: voxels changed"] == 12
    assert numbers["round 2 target: Dice with the previous target"] == pytest.approx(0.9)
    assert numbers["round 2 target: TTA agreement"] == pytest.approx(0.93)
    assert "collapse guard" not in numbers
