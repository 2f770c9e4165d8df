"""Output sets are all-or-nothing (issue 13, items 6 and 7).

A command's outputs (mask, probability map, model, report, sidecar) replace the previous ones
together or not at all, and two commands writing the same outputs at once leave one command's
complete set, never a mix.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

import cgc_refine.cli as cli
from cgc_refine._utils import OutputSet, atomic_write, lock_path_for, write_text_atomic
from cgc_refine.workflow import results
from cgc_refine.exceptions import OutputExistsError, OutputNotWritableError
from cgc_refine.io import save_array

from test_cli import TRAIN, las_affine, write_subject

MASK = "flair_label-lesion_mask.nii.gz"
PROBSEG = "flair_label-lesion_probseg.nii.gz"
SIDECAR = "flair_label-lesion_mask.json"
GRID = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))


def run_cli(*args: object):  # noqa: ANN201 - click's Result
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every entry of ``folder`` (hidden ones included) with its bytes."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.fixture()
def previous_result(tmp_path: Path, keep_torch_threads: None) -> dict[str, object]:
    """A subject whose output folder holds a complete earlier result (mask, map, model, sidecar)."""
    files = write_subject(tmp_path / "in", las_affine())
    out = tmp_path / "out"
    out.mkdir()
    first = run_cli("--prior", "gmm", "--image", files["image"], "-o", out, "--save-proba",
                    "--save-model", out / "m.pt", "-q", *TRAIN)
    assert first.exit_code == 0, first.stderr
    before = snapshot(out)
    assert sorted(before) == sorted(["m.pt", MASK, PROBSEG, SIDECAR])
    return {"image": files["image"], "out": out, "before": before}


# --------------------------------------------------------------------------------------------
# item 6: a failed --overwrite run keeps the previous set complete
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["probability-map", "sidecar-interrupt", "commit"])
def test_failed_overwrite_keeps_the_previous_output_set(
    previous_result: dict[str, object], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    out = previous_result["out"]
    assert isinstance(out, Path)
    if where == "probability-map":  # disk full while the map is written (after model and mask)
        real_save = nib.save

        def failing_save(img, filename, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if "probseg" in os.fspath(filename):
                Path(filename).write_bytes(b"partial")
                raise OSError(28, "No space left on device")
            return real_save(img, filename, *args, **kwargs)

        monkeypatch.setattr(nib, "save", failing_save)
    elif where == "sidecar-interrupt":  # Ctrl-C when everything but the sidecar is written
        def interrupted(payload):  # noqa: ANN001, ANN202
            raise KeyboardInterrupt

        monkeypatch.setattr(results, "dump_json", interrupted)
    else:  # every file written; moving the probability map into place fails
        real_replace = os.replace

        def failing_replace(src, dst, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if Path(dst).name == PROBSEG and ".tmp-" in Path(src).name:
                raise OSError(5, "Input/output error")
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", failing_replace)
    result = run_cli("--prior", "gmm", "--image", previous_result["image"], "-o", out, "--save-proba",
                     "--save-model", out / "m.pt", "--overwrite", *TRAIN[:-2], "--seed", "11")
    assert result.exit_code == (130 if where == "sidecar-interrupt" else 2), result.stderr
    assert "Traceback" not in result.stderr
    # the earlier model, mask, map and sidecar, byte for byte; no temporary or lock file
    assert snapshot(out) == previous_result["before"]


def test_successful_overwrite_replaces_the_whole_set(previous_result: dict[str, object]) -> None:
    out = previous_result["out"]
    assert isinstance(out, Path)
    result = run_cli("--prior", "gmm", "--image", previous_result["image"], "-o", out, "--save-proba",
                     "--save-model", out / "m.pt", "--overwrite", "-q", *TRAIN[:-2], "--seed", "11")
    assert result.exit_code == 0, result.stderr
    after = snapshot(out)
    assert sorted(after) == sorted(previous_result["before"])  # no lock or temporary file left
    assert json.loads(after[SIDECAR])["seed"] == 11


def _three_files(folder: Path, tag: str, *, overwrite: bool) -> OutputSet:
    """Write a recognisable set (a NIfTI, a text and a JSON file) into an open OutputSet."""
    outputs = OutputSet(overwrite)
    with outputs.collect():
        save_array(np.full((4, 4, 4), float(len(tag)), np.float32), GRID, folder / "a.nii.gz",
                   np.float32, overwrite)
        atomic_write(folder / "b.txt", lambda h: h.write(tag), overwrite=overwrite, binary=False)
        atomic_write(folder / "c.json", lambda h: h.write(json.dumps({"tag": tag})),
                     overwrite=overwrite, binary=False)
    return outputs


def test_output_set_touches_nothing_before_commit(tmp_path: Path) -> None:
    _three_files(tmp_path, "old", overwrite=False).commit()
    before = snapshot(tmp_path)
    outputs = _three_files(tmp_path, "newer", overwrite=True)
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith(".")} == before
    outputs.discard()
    assert snapshot(tmp_path) == before
    assert _three_files(tmp_path, "newer", overwrite=True).commit() == [
        tmp_path / "a.nii.gz", tmp_path / "b.txt", tmp_path / "c.json"]
    assert (tmp_path / "b.txt").read_text() == "newer"
    assert sorted(os.listdir(tmp_path)) == ["a.nii.gz", "b.txt", "c.json"]


def test_output_set_restores_the_old_files_when_a_move_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _three_files(tmp_path, "old", overwrite=False).commit()
    before = snapshot(tmp_path)
    outputs = _three_files(tmp_path, "newer", overwrite=True)
    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if Path(dst).name == "c.json" and ".tmp-" in Path(src).name:  # the last of the three
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OutputNotWritableError, match="previous outputs were kept"):
        outputs.commit()
    assert snapshot(tmp_path) == before


def test_output_set_without_overwrite_refuses_a_file_that_appeared(tmp_path: Path) -> None:
    outputs = _three_files(tmp_path, "mine", overwrite=False)
    (tmp_path / "b.txt").write_text("someone else's")
    with pytest.raises(OutputExistsError, match="appeared while writing"):
        outputs.commit()
    assert sorted(os.listdir(tmp_path)) == ["b.txt"]  # none of the set was moved in
    assert (tmp_path / "b.txt").read_text() == "someone else's"


# --------------------------------------------------------------------------------------------
# item 7: concurrent writers of one output set never mix their files
# --------------------------------------------------------------------------------------------


def _write_tagged_set(folder: Path, run: int, attempt: int) -> None:
    """One command's output set through the CLI's transaction: a NIfTI and its sidecar."""
    value = float(100 * attempt + run)
    with results.output_transaction(True) as tx:
        tx.add(save_array(np.full((4, 4, 4), value, np.float32), GRID, folder / "p.nii.gz",
                          np.float32, True))
        tx.add(write_text_atomic(folder / "p.json", json.dumps({"value": value}), overwrite=True))


def _assert_consistent(folder: Path) -> float:
    value = float(np.asanyarray(nib.load(str(folder / "p.nii.gz")).dataobj)[0, 0, 0])
    assert json.loads((folder / "p.json").read_text())["value"] == value, "NIfTI and sidecar differ"
    return value


def _slow_moves() -> None:
    """Widen the window between the moves of one commit, so unlocked commits would interleave."""
    real_replace = os.replace

    def slow_replace(src, dst, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        time.sleep(random.uniform(0.0, 0.02))  # uneven gaps: unlocked commits would cross
        return real_replace(src, dst, *args, **kwargs)

    os.replace = slow_replace  # type: ignore[assignment]


def test_concurrent_threads_never_mix_output_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "replace", os.replace)  # restored after _slow_moves
    _slow_moves()
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def writer(run: int, attempt: int) -> None:
        try:
            barrier.wait(timeout=30)
            _write_tagged_set(tmp_path, run, attempt)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    for attempt in range(30):
        threads = [threading.Thread(target=writer, args=(run, attempt)) for run in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        value = _assert_consistent(tmp_path)
        assert value in (100 * attempt + 1, 100 * attempt + 2)
    assert sorted(os.listdir(tmp_path)) == ["p.json", "p.nii.gz"]  # lock files removed


def _writer_process(folder: str, run: int, attempts: int, barrier) -> None:  # noqa: ANN001
    _slow_moves()
    for attempt in range(attempts):
        barrier.wait(timeout=60)  # both writers start the attempt together
        _write_tagged_set(Path(folder), run, attempt)
        barrier.wait(timeout=60)  # the parent checks the set
        barrier.wait(timeout=60)


def test_concurrent_processes_never_mix_output_sets(tmp_path: Path) -> None:
    attempts = 20
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3)
    workers = [context.Process(target=_writer_process, args=(str(tmp_path), run, attempts, barrier))
               for run in (1, 2)]
    for worker in workers:
        worker.start()
    try:
        for attempt in range(attempts):
            barrier.wait(timeout=120)
            barrier.wait(timeout=120)
            assert _assert_consistent(tmp_path) in (100 * attempt + 1, 100 * attempt + 2)
            barrier.wait(timeout=120)
    except BaseException:
        barrier.abort()  # a failed check releases the writers at once (only then: aborting after
        raise            # the last wait could break a writer still leaving it)
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert sorted(os.listdir(tmp_path)) == ["p.json", "p.nii.gz"]


def test_lock_file_is_hidden_next_to_the_output(tmp_path: Path) -> None:
    assert lock_path_for(tmp_path / "p.nii.gz") == tmp_path / ".p.nii.gz.lock"


@pytest.mark.slow
def test_two_prior_commands_at_once_leave_one_complete_set(tmp_path: Path) -> None:
    """The reported case: two ``prior gmm -o p.nii.gz --overwrite`` runs on different images."""
    exe = shutil.which("cgc-refine")
    if exe is None:
        pytest.skip("the cgc-refine console script is not on PATH (pip install -e . first)")
    images = {name: write_subject(tmp_path / name, las_affine(), seed=seed)["image"]
              for name, seed in (("a", 0), ("b", 1))}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(image: Path, out: Path) -> list[str]:
        return [exe, "prior", "gmm", "--image", str(image), "-o", str(out), "--device", "cpu",
                "--overwrite", "-q"]

    alone = [subprocess.Popen(command(image, tmp_path / f"{name}.nii.gz"), env=env)
             for name, image in images.items()]  # each image's prior, to its own file
    assert [proc.wait(timeout=300) for proc in alone] == [0, 0]
    expected = {str(image.resolve()): np.asanyarray(nib.load(str(tmp_path / f"{name}.nii.gz")).dataobj)
                for name, image in images.items()}
    assert not np.array_equal(*expected.values())
    out = tmp_path / "out"
    out.mkdir()
    for _ in range(2):
        procs = [subprocess.Popen(command(image, out / "p.nii.gz"), env=env) for image in images.values()]
        assert [proc.wait(timeout=300) for proc in procs] == [0, 0]
        written = json.loads((out / "p.json").read_text())["inputs"]["images"][0]
        np.testing.assert_array_equal(np.asanyarray(nib.load(str(out / "p.nii.gz")).dataobj),
                                      expected[written])
        assert sorted(os.listdir(out)) == ["p.json", "p.nii.gz"]
