"""An on-disk cache of preprocessed subjects (:class:`~cgc_refine.data.PreparedSubject`).

A cohort is preprocessed once: each subject's standardised, brain-cropped channels, prior and
brain mask are written as ``.npy`` files under ``<root>/<key>/`` and read back as
:class:`MappedArray` objects, which map a file only for the duration of one read. Training
therefore holds only the crops in memory (a mapping kept open would add every page a crop
ever touched to the process's resident memory) and a rerun skips preprocessing.

The key is a SHA-256 over the *content* of every input (image file bytes or array bytes,
the prior -- its data, or for a prior computed from the image its class and parameters,
or for a prior file its bytes --, the brain mask, the preprocessing parameters and the cache
format), so any change to an input gives a new entry, and a hit skips computing the prior
too. An entry is complete when its
``meta.json`` exists: the files are written into a hidden temporary folder, ``meta.json``
last, and the folder is then renamed into place, so a crash never leaves a half entry that
looks complete. Incomplete or unreadable entries are rebuilt.

Examples
--------
>>> cache = SubjectCache("/tmp/cgc-cache")                                 # doctest: +SKIP
>>> key = cache.key(["flair.nii.gz"], prior, None, {"modality": "mri"})   # doctest: +SKIP
>>> subject = cache.get_or_create(key, lambda: prepare_subject(...))      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._utils import atomic_write, jsonable
from .exceptions import CGCRefineError, OutputNotWritableError
from .priors.base import ProbabilityMap
from .data import PreparedSubject

__all__ = ["CACHE_FORMAT", "MappedArray", "SubjectCache", "image_key", "mask_key", "prior_key"]

logger = logging.getLogger(__name__)

#: Version of the on-disk entry layout and of the preprocessing it stores; part of every key.
CACHE_FORMAT = 2

_CHUNK = 1 << 20
_KEY_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_ARRAYS = ("image", "prior", "brain")


def _field(digest: Any, tag: str, payload: bytes) -> None:
    """Add one tagged, length-prefixed field (so adjacent fields cannot run together)."""
    digest.update(f"{tag}:{len(payload)}:".encode())
    digest.update(payload)


def _hash_array(digest: Any, tag: str, array: Any) -> None:
    data = np.ascontiguousarray(np.asarray(array))
    _field(digest, f"{tag}.meta", json.dumps([data.dtype.str, list(data.shape)]).encode())
    flat = data.reshape(-1).view(np.uint8)
    digest.update(f"{tag}.bytes:{flat.size}:".encode())
    for start in range(0, flat.size, _CHUNK):
        digest.update(flat[start:start + _CHUNK])


def _hash_file(digest: Any, tag: str, path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{tag}.file:{size}:".encode())
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)



def image_key(volume: Any) -> Any:
    """What identifies an image's content for :meth:`SubjectCache.key`: its files, or its data and affine.

    A loaded :class:`~cgc_refine.io.Volume` is keyed by its data (even when it came from
    files), so that changing its array in memory can never serve a stale entry; paths and
    arrays are returned as they are.
    """
    from .io import Volume

    if isinstance(volume, Volume):
        return [volume.data, np.asarray(volume.affine, np.float64)]
    if isinstance(volume, tuple) and len(volume) == 2 and not isinstance(volume[0], (str, os.PathLike)):
        return [np.asarray(volume[0]), np.asarray(volume[1], np.float64)]
    return volume


def mask_key(mask: Any) -> Any:
    """What identifies a brain mask for :meth:`SubjectCache.key`: its path, or its values as booleans."""
    if mask is None or isinstance(mask, (str, os.PathLike)):
        return mask
    return np.asarray(mask) > 0.5 if np.asarray(mask).dtype != bool else np.asarray(mask)


def prior_key(builtin: Any, prior: Any) -> Any:
    """What identifies a prior for :meth:`SubjectCache.key` without computing it.

    A prior object (``builtin``, applied to every subject, or ``prior``, this subject's): its
    class and parameters, with the bytes of any parameter that names an existing file; a
    prior file: its bytes; an array or map: itself.
    """
    recipe_source = builtin if builtin is not None else prior
    if hasattr(recipe_source, "compute"):
        params = recipe_source.get_params() if hasattr(recipe_source, "get_params") else {}
        files, shown = [], {}
        for name, value in sorted(params.items()):
            if isinstance(value, (str, os.PathLike)) and Path(value).is_file():
                files.append(Path(value))
                shown[name] = "<file>"
            else:
                shown[name] = value
        kind = type(recipe_source)
        return {"class": f"{kind.__module__}.{kind.__qualname__}", "params": jsonable(shown, strict=True),
                "files": files}
    if isinstance(prior, (str, os.PathLike)):
        return {"class": "file", "files": [Path(prior)]}
    return prior

class MappedArray:
    """A read-only ``.npy`` array on disk, read slice by slice.

    Indexing maps the file, copies the requested part into memory and unmaps it again, so
    no page stays mapped (and counted in the resident memory) between reads. Pickles as its
    path, so data-loader workers open the file themselves.

    Parameters
    ----------
    path : path
        A ``.npy`` file.

    Attributes
    ----------
    path : pathlib.Path
    shape : tuple of int
    dtype : numpy.dtype
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        mapped = np.load(self.path, mmap_mode="r")
        self.shape: tuple[int, ...] = tuple(int(s) for s in mapped.shape)
        self.dtype = mapped.dtype
        del mapped

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        mapped = np.load(self.path, mmap_mode="r")
        try:
            return np.array(mapped[key], copy=True)
        finally:
            del mapped

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[...]
        return data if dtype is None else data.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"MappedArray({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


class SubjectCache:
    """Content-addressed on-disk store of :class:`~cgc_refine.data.PreparedSubject`.

    Parameters
    ----------
    root : path
        Cache folder; created when missing.

    Attributes
    ----------
    root : pathlib.Path
        The cache folder.
    hits : int
        Entries served from disk by :meth:`get_or_create`.
    misses : int
        Entries that had to be built.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputNotWritableError(
                f"cannot create the cache folder '{self.root}' ({exc.strerror or exc}); choose "
                "another cache_dir"
            ) from exc
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------------------ keys
    @staticmethod
    def key(
        volume_paths_or_arrays: Any,
        prior: ProbabilityMap | None,
        brain_mask: np.ndarray | None,
        params: dict[str, Any] | None = None,
    ) -> str:
        """SHA-256 over the content of everything preprocessing depends on.

        Parameters
        ----------
        volume_paths_or_arrays : path, array, or sequence of paths / arrays
            The image: file paths (their bytes are hashed, in order) or arrays (raw bytes,
            shape and dtype).
        prior : ProbabilityMap, array, dict or None
            The prior. A :class:`ProbabilityMap`: its data bytes, affine, source and
            parameters; an array: its bytes; a dict (a *recipe*, for a prior computed when
            the entry is built): its JSON, with the bytes of every file listed under
            ``"files"`` hashed in place of the names.
        brain_mask : numpy.ndarray, path or None
            The brain mask: its values, or a file's bytes (None when it is derived from the
            image).
        params : dict, optional
            Preprocessing parameters (modality, seed, ...); JSON-serialisable.

        Returns
        -------
        str
            64 hexadecimal digits.
        """
        digest = hashlib.sha256()
        _field(digest, "format", str(CACHE_FORMAT).encode())
        items: Sequence[Any]
        if isinstance(volume_paths_or_arrays, (str, os.PathLike, np.ndarray, torch.Tensor)):
            items = [volume_paths_or_arrays]
        else:
            items = list(volume_paths_or_arrays)
        _field(digest, "n_images", str(len(items)).encode())
        for index, item in enumerate(items):
            if isinstance(item, (str, os.PathLike)):
                _hash_file(digest, f"image{index}", Path(item))
            else:
                _hash_array(digest, f"image{index}", _as_numpy(item))
        if prior is None:
            _field(digest, "prior", b"none")
        elif isinstance(prior, ProbabilityMap):
            _hash_array(digest, "prior", prior.data)
            affine = b"none" if prior.affine is None else np.asarray(prior.affine, np.float64).tobytes()
            _field(digest, "prior.affine", affine)
            provenance = {"source": prior.source, "params": prior.params}
            _field(digest, "prior.provenance", json.dumps(jsonable(provenance, strict=True), sort_keys=True).encode())
        elif isinstance(prior, dict):
            recipe = dict(prior)
            files = [Path(f) for f in recipe.pop("files", [])]
            _field(digest, "prior.recipe", json.dumps(jsonable(recipe, strict=True), sort_keys=True).encode())
            for index, path in enumerate(files):
                _hash_file(digest, f"prior.file{index}", path)
        else:
            _hash_array(digest, "prior.array", _as_numpy(prior))
        if brain_mask is None:
            _field(digest, "mask", b"none")
        elif isinstance(brain_mask, (str, os.PathLike)):
            _hash_file(digest, "mask", Path(brain_mask))
        else:
            _hash_array(digest, "mask", np.asarray(brain_mask, dtype=bool))
        settings = jsonable(dict(params or {}), strict=True)
        _field(digest, "params", json.dumps(settings, sort_keys=True).encode())
        return digest.hexdigest()

    # --------------------------------------------------------------------------- entries
    def path(self, key: str) -> Path:
        """The folder of entry ``key``."""
        if not isinstance(key, str) or not _KEY_PATTERN.match(key):
            raise CGCRefineError(f"{key!r} is not a cache key; use SubjectCache.key() to make one")
        return self.root / key

    def is_complete(self, key: str) -> bool:
        """Whether entry ``key`` has its ``meta.json`` (written last)."""
        return (self.path(key) / "meta.json").is_file()

    def get_or_create(self, key: str, make: Callable[[], PreparedSubject]) -> PreparedSubject:
        """The cached subject for ``key``, building and storing it with ``make()`` on a miss.

        Parameters
        ----------
        key : str
            From :meth:`key`.
        make : callable
            Returns the freshly prepared subject; called only on a miss.

        Returns
        -------
        PreparedSubject
            Backed by :class:`MappedArray` views of the entry's files, with the ``info``
            recorded when the entry was built.
        """
        folder = self.path(key)
        if self.is_complete(key):
            try:
                subject = self._read(folder)
            except (OSError, ValueError, KeyError, TypeError) as error:
                logger.warning("cache entry %s is unreadable (%s); rebuilding it", key[:12], error)
            else:
                self.hits += 1
                logger.info("subject cache hit %s", key[:12])
                return subject
        self.misses += 1
        logger.info("subject cache miss %s; preparing the subject", key[:12])
        self._write(folder, make())
        return self._read(folder)

    def _write(self, folder: Path, subject: PreparedSubject) -> None:
        tmp = self.root / f".{folder.name}.tmp-{secrets.token_hex(6)}"
        try:
            tmp.mkdir()
            arrays = {"image": subject.image, "prior": subject.prior, "brain": subject.brain}
            for name, value in arrays.items():
                if value is not None:
                    np.save(tmp / f"{name}.npy", np.ascontiguousarray(_as_numpy(value)))
            np.save(tmp / "foreground.npy", np.asarray(subject.foreground, dtype=np.int64).reshape(-1, 3))
            meta = {
                "format": CACHE_FORMAT,
                "info": jsonable(subject.info, strict=True),
                "bbox": [[int(s.start), int(s.stop)] for s in subject.bbox],
                "shape": [int(s) for s in subject.shape],
                "has_prior": subject.prior is not None,
                "image_shape": list(_as_numpy(subject.image).shape),
            }
            atomic_write(tmp / "meta.json", lambda handle: json.dump(meta, handle, indent=1),
                         overwrite=False, binary=False)
            if folder.exists():  # an incomplete or unreadable entry: replace it
                shutil.rmtree(folder)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not (folder / "meta.json").is_file():
                    raise
                # Another process completed the same entry meanwhile; same content, keep it.
                logger.debug("cache entry %s appeared while writing; keeping it", folder.name[:12])
        except OSError as exc:
            raise OutputNotWritableError(
                f"cannot write the cache entry '{folder}' ({exc.strerror or exc}); check free "
                "disk space and the cache folder"
            ) from exc
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)

    @staticmethod
    def _read(folder: Path) -> PreparedSubject:
        with open(folder / "meta.json", encoding="utf-8") as handle:
            meta = json.load(handle)
        if int(meta["format"]) != CACHE_FORMAT:
            raise ValueError(f"entry format {meta['format']} is not {CACHE_FORMAT}")
        image = MappedArray(folder / "image.npy")
        brain = MappedArray(folder / "brain.npy")
        prior = MappedArray(folder / "prior.npy") if meta["has_prior"] else None
        foreground = MappedArray(folder / "foreground.npy")
        if list(image.shape) != list(meta["image_shape"]):
            raise ValueError(f"image shape {image.shape} differs from the recorded {meta['image_shape']}")
        bbox = tuple(slice(int(a), int(b)) for a, b in meta["bbox"])
        shape = tuple(int(s) for s in meta["shape"])
        return PreparedSubject(image, prior, brain, bbox, shape, foreground,  # type: ignore[arg-type]
                               dict(meta.get("info", {})))
