"""The refiner: an sklearn-style estimator that turns a prior into a refined lesion mask.

``Refiner(prior).fit(volumes)`` computes (or adapts) one prior per volume, trains the CGC
U-Net against those pseudo-labels (no ground truth anywhere), and ``predict_proba`` /
``predict`` segment any volume with the trained network by sliding-window inference.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from ._utils import atomic_write, jsonable
from ._version import __version__
from .config import ConfigError, RefinerConfig
from .device import resolve_device, seed_everything
from .distributed import barrier, is_main_process, rank_seed, setup_distributed
from .exceptions import CheckpointError, InvalidImageError, InvalidPriorError
from .augment import IntensityAugmentation
from .cleanup import CleanupSettings, clean_probability
from .inference import sliding_window_predict
from .model import anisotropic_strides, downsample_factors, isotropic_strides
from .postprocess import remove_small_components
from .priors import GMMPrior, MumfordShahPrior, ProbabilityMap, as_probability_map, check_prior_informative
from .training import (
    CropSampler,
    PreparedSubject,
    build_network,
    effective_crop_size,
    prepare_subject,
    train_network,
    with_target,
    crop_in_voxels,
)

__all__ = ["Refiner", "CHECKPOINT_FORMAT"]

logger = logging.getLogger(__name__)

#: Version of the checkpoint layout written by :meth:`Refiner.save`.
CHECKPOINT_FORMAT = 1


def _load(volume: Any) -> Any:
    """A Volume from a path / paths / Volume / array / (array, affine) pair."""
    from .io import Volume, load_volume

    if isinstance(volume, Volume):
        return volume
    if isinstance(volume, (str, os.PathLike)):
        return load_volume(volume)
    if isinstance(volume, (list, tuple)) and volume and all(isinstance(v, (str, os.PathLike)) for v in volume):
        return load_volume(list(volume))
    if isinstance(volume, tuple) and len(volume) == 2:
        data, affine = volume
        return Volume.from_array(np.asarray(data), affine=np.asarray(affine))
    if isinstance(volume, np.ndarray):
        return Volume.from_array(volume)
    raise InvalidImageError(
        f"cannot read a volume from {type(volume).__name__}; pass a path, a list of paths "
        "(modalities), a cgc_refine.io.Volume, an array, or an (array, affine) pair"
    )


def _load_mask(mask: Any, volume: Any) -> np.ndarray | None:
    if mask is None:
        return None
    if isinstance(mask, (str, os.PathLike)):
        from .io import load_mask

        return load_mask(mask, reference=volume)
    array = np.asarray(mask) > 0.5 if np.asarray(mask).dtype != bool else np.asarray(mask)
    if array.shape != tuple(volume.shape):
        from .exceptions import SpaceMismatchError

        raise SpaceMismatchError(f"brain mask shape {array.shape} differs from image shape {tuple(volume.shape)}")
    return array


def _prior_problem(subject: PreparedSubject) -> str | None:
    """Why the subject's prior cannot teach anything (empty or full in the brain), or None."""
    try:
        check_prior_informative(ProbabilityMap(np.asarray(subject.prior[0])),  # type: ignore[index]
                                np.asarray(subject.brain[0], dtype=bool))
    except InvalidPriorError as error:
        return str(error)
    return None


def _image_key(volume: Any) -> Any:
    """What identifies an image's content for the cache: its files, or its data and affine.

    A loaded Volume is keyed by its data (even when it came from files), so that changing its
    array in memory can never serve a stale entry.
    """
    from .io import Volume

    if isinstance(volume, Volume):
        return [volume.data, np.asarray(volume.affine, np.float64)]
    if isinstance(volume, tuple) and len(volume) == 2 and not isinstance(volume[0], (str, os.PathLike)):
        return [np.asarray(volume[0]), np.asarray(volume[1], np.float64)]
    return volume


def _mask_key(mask: Any) -> Any:
    if mask is None or isinstance(mask, (str, os.PathLike)):
        return mask
    return np.asarray(mask) > 0.5 if np.asarray(mask).dtype != bool else np.asarray(mask)


def _prior_key(builtin: Any, prior: Any) -> Any:
    """What identifies a prior for the cache without computing it.

    A prior object (built-in or per subject): its class and parameters, with the bytes of any
    parameter that names an existing file; a prior file: its bytes; an array or map: itself.
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


class Refiner(BaseEstimator):
    """Refine an unsupervised lesion prior with a CGC-regularised 3D U-Net.

    Parameters
    ----------
    prior : str, prior object, or sequence of maps/paths
        ``"gmm"`` / ``"mumford-shah"`` or a built-in prior object (anything with
        ``compute(volume, brain_mask)``), applied to every volume; or one external prior per
        volume (paths, arrays or :class:`~cgc_refine.priors.ProbabilityMap`), converted by
        :func:`~cgc_refine.priors.as_probability_map` with ``prior_kind``.
    config : RefinerConfig, optional
        Network, loss and training settings (default: the paper's, see
        :class:`~cgc_refine.config.RefinerConfig`; ``RefinerConfig.fast()`` for CPUs).
    prior_kind : str
        Kind of external priors (``"auto"``, ``"probability"``, ``"mask"``, ``"labels"``,
        ``"logits"``, ``"scores"``).
    modality : {"mri", "ct"}
        Intensity handling: robust standardisation for MRI; the brain window for CT.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    random_state : int
        Seed of weights, crops and flips; equal seeds give equal results on the CPU.
    callback : callable, optional
        Called after every training step with a dict of loss values (progress bars).

    Attributes
    ----------
    network_ : CGCUNet
        The trained network (eval mode).
    config_ : RefinerConfig
        The validated configuration.
    device_ : torch.device
        Where the network lives.
    n_channels_in_ : int
        Number of image channels the network expects.
    crop_size_ : tuple of int
        Training crop.
    window_size_ : tuple of int
        Sliding-window size at inference.
    history_ : list of dict
        Loss components logged during training.
    priors_ : list of dict
        Provenance of the training priors (source kind and parameters).
    n_iter_ : int
        Training iterations done.
    strides_ : list of list of int or None
        Per-level down-sampling strides of the network (None: isotropic), chosen from the
        median training spacing when ``config.anisotropic``.
    spacing_ : tuple of float
        That median voxel spacing (mm).
    target_cleanup_ : list of dict
        Per training subject, what the clean-up of its prior did (pattern, voxels added and
        removed), or None when ``config.cleanup == "none"``.
    rounds_ : list of dict
        Per self-training round after the first: voxels changed, Dice with the previous
        target and TTA agreement of each subject's new target (label-free).
    tta_agreement_ : float
        Set by :meth:`predict_proba`: mean Dice of each flipped copy's mask with the averaged
        mask (1: the copies agree everywhere).
    cleanup_info_ : dict or None
        Set by :meth:`postprocess`: what the clean-up of the output did.
    network_probability_, blend_reference_ : numpy.ndarray
        Set by :meth:`predict_proba`: the network's own probability, and the cleaned prior it
        was blended with (None without a prior).

    Notes
    -----
    Launched by ``torchrun`` with several processes, :meth:`fit` trains a
    DistributedDataParallel replica per process (``nccl`` on GPUs, ``gloo`` on CPUs) and
    only rank 0 writes checkpoints and models; see :mod:`cgc_refine.distributed`.

    Examples
    --------
    >>> refiner = Refiner("gmm", config=RefinerConfig.fast()).fit(["flair.nii.gz"])  # doctest: +SKIP
    >>> mask = refiner.predict("flair.nii.gz")                                        # doctest: +SKIP
    """

    def __init__(
        self,
        prior: Any = "gmm",
        *,
        config: RefinerConfig | None = None,
        prior_kind: str = "auto",
        modality: str = "mri",
        device: str = "auto",
        random_state: int = 0,
        callback: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        self.prior = prior
        self.config = config
        self.prior_kind = prior_kind
        self.modality = modality
        self.device = device
        self.random_state = random_state
        self.callback = callback

    # ------------------------------------------------------------------ priors
    def _builtin_prior(self) -> Any | None:
        if isinstance(self.prior, str):
            from .priors import BUILTIN_PRIORS, make_prior

            if self.prior in BUILTIN_PRIORS:
                return make_prior(self.prior, modality=self.modality)
            raise InvalidPriorError(
                f"unknown built-in prior {self.prior!r}; use one of {', '.join(BUILTIN_PRIORS)}, "
                "a prior object, or one prior map per volume"
            )
        if hasattr(self.prior, "compute"):
            return self.prior
        return None

    def _per_volume_priors(self, builtin: Any, n_volumes: int) -> list[Any]:
        """One external prior per volume (None each when a built-in prior computes them)."""
        if builtin is not None:
            return [None] * n_volumes
        external = list(self.prior) if isinstance(self.prior, (list, tuple)) else [self.prior]
        if len(external) != n_volumes:
            raise InvalidPriorError(
                f"got {len(external)} prior map(s) for {n_volumes} volume(s); pass one prior per volume"
            )
        return external

    def compute_priors(
        self, volumes: Sequence[Any], brain_masks: Sequence[Any] | None = None
    ) -> list[ProbabilityMap]:
        """The prior of every volume, as probability maps (what :meth:`fit` trains on)."""
        if isinstance(volumes, (str, os.PathLike)) or not isinstance(volumes, (list, tuple)):
            volumes = [volumes]
        masks = [None] * len(volumes) if brain_masks is None else list(brain_masks)
        builtin = self._builtin_prior()
        external = self._per_volume_priors(builtin, len(volumes))
        maps = []
        for volume_in, mask_in, prior_in in zip(volumes, masks, external):
            volume = _load(volume_in)
            maps.append(self._prior_of(volume, _load_mask(mask_in, volume), builtin, prior_in))
        return maps

    # --------------------------------------------------------------------- fit
    def _validated(self) -> RefinerConfig:
        config = RefinerConfig() if self.config is None else self.config
        if not isinstance(config, RefinerConfig):
            raise ConfigError(f"config must be a RefinerConfig, got {type(config).__name__}")
        if self.modality not in ("mri", "ct"):
            raise ConfigError(f"modality must be 'mri' or 'ct', got {self.modality!r}")
        from .device import check_seed

        check_seed(self.random_state, "random_state")
        return config.validate()

    def fit(
        self,
        volumes: Any,
        y: None = None,
        *,
        brain_masks: Sequence[Any] | None = None,
        checkpoint_path: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 0,
        resume_from: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> "Refiner":
        """Compute the priors and train the network on them.

        Subjects are read one at a time (image, brain mask, prior, preprocessing), so only
        the preprocessed, brain-cropped arrays are kept -- and with ``cache_dir`` not even
        those. Under ``torchrun`` every process calls ``fit`` with the same arguments and
        trains one replica of a DistributedDataParallel model (see
        :mod:`cgc_refine.distributed`); only rank 0 writes checkpoints.

        Parameters
        ----------
        volumes : sequence
            Subjects: paths, lists of paths (modalities), Volumes, arrays or (array, affine)
            pairs. A single path or Volume is one subject.
        y : None
            Ignored (no ground truth is ever used); present for sklearn compatibility.
        brain_masks : sequence, optional
            One brain mask (path or boolean array) per volume, or None to derive them.
        checkpoint_path : path, optional
            Where periodic checkpoints go (every ``checkpoint_every`` iterations).
        resume_from : path, optional
            A checkpoint written by :meth:`save` or a periodic checkpoint to continue from.
        cache_dir : path, optional
            Prepare subjects through a :class:`~cgc_refine.cache.SubjectCache` in this
            folder: preprocessed arrays are stored on disk and training reads only its crops
            from them, so memory stays bounded as the cohort grows; a rerun with the same
            images, priors (or prior settings), masks and modality skips loading, prior
            computation and preprocessing. Under torchrun the ranks split the building of
            missing entries between them.

        Returns
        -------
        Refiner
            self, fitted.
        """
        config = self._validated()
        context, device = setup_distributed(self.device)
        if isinstance(volumes, (str, os.PathLike)) or not isinstance(volumes, (list, tuple)):
            volumes = [volumes]
        if len(volumes) == 0:
            raise InvalidImageError("fit needs at least one volume")
        masks_in = [None] * len(volumes) if brain_masks is None else list(brain_masks)
        if len(masks_in) != len(volumes):
            raise InvalidImageError(f"got {len(masks_in)} brain masks for {len(volumes)} volumes")
        builtin = self._builtin_prior()
        external = self._per_volume_priors(builtin, len(volumes))
        started = time.perf_counter()
        cache = None
        if cache_dir is not None:
            from .cache import SubjectCache

            cache = SubjectCache(cache_dir)
        items = list(zip(volumes, masks_in, external))
        if cache is not None and context.enabled:
            # Each rank builds its share of the missing entries; then every rank reads them all.
            for index in range(context.rank, len(items), context.world_size):
                self._prepare_one(index, *items[index], builtin, cache, config)
            barrier(context)
        subjects: list[PreparedSubject] = []
        for index, item in enumerate(items):
            subject = self._prepare_one(index, *item, builtin, cache, config)
            if subjects and subject.image.shape[0] != subjects[0].image.shape[0]:
                raise InvalidImageError(
                    "all volumes must have the same number of channels, got "
                    f"{subjects[0].image.shape[0]} and {subject.image.shape[0]} (subject {index})"
                )
            subjects.append(subject)
        problems = [s.info.get("prior_problem") for s in subjects]
        for index, problem in enumerate(problems):
            if problem and len(subjects) == 1:
                raise InvalidPriorError(problem)
            if problem and context.is_main:
                logger.warning("subject %d: %s", index, problem)
        if all(problems):
            raise InvalidPriorError("no subject has an informative prior (all empty or full); nothing to learn")
        n_channels = int(subjects[0].image.shape[0])
        prior_seconds = time.perf_counter() - started
        total_bytes = sum(s.nbytes() for s in subjects)
        if device.type == "cuda" and total_bytes < 4 * 2**30:
            subjects = [s.to(device) for s in subjects]
        spacing = tuple(float(v) for v in np.median([s.info.get("spacing", (1.0, 1.0, 1.0)) for s in subjects], axis=0))
        n_down = len(config.channels) - 1
        strides = [list(level) for level in anisotropic_strides(spacing, n_down)] if config.anisotropic else None
        if resume_from is not None:
            state = _read_checkpoint(resume_from)
            strides = state.get("strides", None)
        shapes = [s.image.shape[1:] for s in subjects]
        factors = downsample_factors(strides if strides is not None else isotropic_strides(n_down))
        crop = effective_crop_size(crop_in_voxels(config.crop_size, spacing), shapes, factors)
        augmentation = IntensityAugmentation() if config.intensity_augmentation else None
        sampler_seed = rank_seed(self.random_state, context.rank) if context.enabled else self.random_state

        def fresh_network() -> Any:
            seed_everything(self.random_state)
            # Channels-last 3-D convolutions are about twice as fast on CPU (measured) and are
            # the layout cuDNN prefers for bf16 on CUDA.
            return build_network(config, n_channels, strides=strides).to(device).to(
                memory_format=torch.channels_last_3d)

        network = fresh_network()
        sampler = CropSampler(subjects, crop, config.foreground_oversampling, seed=sampler_seed,
                              augmentation=augmentation)
        start_iteration, optimizer_state = 0, None
        if resume_from is not None:
            _check_compatible(state, config, n_channels)
            network.load_state_dict(state["state_dict"])
            start_iteration = int(state.get("n_iter", 0))
            optimizer_state = state.get("optimizer_state")
            if state.get("sampler_state") is not None and not context.enabled:
                sampler.set_state(state["sampler_state"])
            logger.info("resuming from iteration %d", start_iteration)

        self.config_ = config
        self.device_ = device
        self.n_channels_in_ = n_channels
        self.crop_size_ = crop
        self.strides_ = strides
        self.spacing_ = spacing
        self.target_cleanup_ = [s.info.get("cleanup") for s in subjects]
        self.window_size_ = self._window(config, crop, shapes, spacing, factors)
        self.priors_ = [{"source": s.info.get("prior_source"), "params": s.info.get("prior_params", {})}
                        for s in subjects]

        def save_checkpoint(iteration: int, optim_state: dict[str, Any]) -> None:
            self.network_ = network
            self.n_iter_ = iteration
            self.history_ = []
            self._write(checkpoint_path, overwrite=True, optimizer_state=optim_state,  # type: ignore[arg-type]
                        sampler_state=sampler.state())

        if context.is_main:
            logger.info(
                "training on %d subject(s), crop %s, %d iterations, device %s%s",
                len(subjects), crop, config.iterations, device,
                f", {context.world_size} processes" if context.enabled else "",
            )
        self.rounds_ = []
        history: list[dict[str, float]] = []
        steps = samples = 0
        loop_s = wait_s = 0.0
        for round_index in range(1, config.rounds + 1):
            if round_index > 1:
                # Self-training: the next target is this round's cleaned, test-time-augmented
                # prediction; the next student starts from fresh weights.
                self.network_ = network
                subjects, record = self._next_targets(subjects, config, round_index)
                self.rounds_.append(record)
                network = fresh_network()
                sampler = CropSampler(subjects, crop, config.foreground_oversampling,
                                      seed=sampler_seed + round_index - 1, augmentation=augmentation)
                start_iteration, optimizer_state = 0, None
            if context.is_main and config.rounds > 1:
                logger.info("self-training round %d of %d", round_index, config.rounds)
            result = train_network(
                network, sampler, config, device,
                start_iteration=start_iteration, optimizer_state=optimizer_state,
                callback=self.callback,
                checkpoint=save_checkpoint if checkpoint_path is not None else None,
                checkpoint_every=checkpoint_every,
                context=context, seed=self.random_state,
            )
            history += [dict(entry, round=float(round_index)) for entry in result.history]
            steps += result.steps
            samples += result.samples
            loop_s += result.elapsed_s
            wait_s += result.data_wait_s
        self.network_ = network
        self.history_ = history
        self.n_iter_ = config.iterations
        self.timings_ = {
            "priors_s": prior_seconds, "train_s": time.perf_counter() - started - prior_seconds,
            "steps": steps, "samples": samples, "world_size": context.world_size,
            "loop_s": loop_s, "data_wait_s": wait_s,
        }
        self._optimizer_state = result.optimizer_state
        return self

    def _prepare_one(
        self, index: int, volume_in: Any, mask_in: Any, prior_in: Any, builtin: Any, cache: Any,
        config: RefinerConfig,
    ) -> PreparedSubject:
        """Load, compute the prior of and preprocess subject ``index`` (through the cache)."""
        seed = self.random_state + index

        def make() -> PreparedSubject:
            volume = _load(volume_in)
            for channel, data in enumerate(volume.data):
                if float(data.min()) == float(data.max()):
                    where = volume.paths[channel] if volume.paths else f"channel {channel}"
                    raise InvalidImageError(
                        f"subject {index}: image {where} is constant: it holds no contrast to "
                        "segment; check that the right file was passed"
                    )
            mask = _load_mask(mask_in, volume)
            if mask is not None and not mask.any():
                from .exceptions import EmptyMaskError

                raise EmptyMaskError(
                    f"subject {index}: the brain mask is empty; pass this image's brain mask or "
                    "None to derive one"
                )
            prior = self._prior_of(volume, mask, builtin, prior_in)
            cleanup_info = None
            if config.cleanup != "none":
                if mask is None:
                    from .brain import derive_brain_mask

                    mask = derive_brain_mask(volume.data[0] if self.modality == "ct" else volume.data,
                                             modality=self.modality)
                cleaned = clean_probability(prior.data, volume.spacing, CleanupSettings(pattern=config.cleanup),
                                            brain_mask=mask, affine=volume.affine)
                cleanup_info = cleaned.info
                prior = type(prior)(cleaned.probability, prior.affine, prior.source, prior.params)
            subject = prepare_subject(volume, prior, mask, self.modality, seed=seed)
            subject.info.update(
                prior_source=prior.source, prior_params=jsonable(prior.params, strict=True),
                prior_problem=_prior_problem(subject), cleanup=jsonable(cleanup_info),
                spacing=[float(v) for v in volume.spacing],
                affine=np.asarray(volume.affine, np.float64).tolist(),
            )
            return subject

        if cache is None:
            return make()
        key = cache.key(
            _image_key(volume_in), _prior_key(builtin, prior_in), _mask_key(mask_in),
            {"modality": self.modality, "seed": seed, "prior_kind": self.prior_kind, "cleanup": config.cleanup},
        )
        return cache.get_or_create(key, make)

    def _prior_of(self, volume: Any, mask: np.ndarray | None, builtin: Any, prior_in: Any) -> ProbabilityMap:
        """One subject's prior as a probability map on the image grid."""
        if builtin is not None:
            prob = builtin.compute(volume, mask)
        elif hasattr(prior_in, "compute"):
            prob = prior_in.compute(volume, mask)
        elif isinstance(prior_in, (str, os.PathLike)):
            prob = as_probability_map(prior_in, kind=self.prior_kind, brain_mask=mask, reference=volume)
        else:
            prob = as_probability_map(prior_in, volume.affine, kind=self.prior_kind, brain_mask=mask,
                                      spacing=volume.spacing)
        if prob.shape != tuple(volume.shape):
            from .exceptions import SpaceMismatchError

            raise SpaceMismatchError(
                f"prior shape {prob.shape} differs from image shape {tuple(volume.shape)}; "
                "resample the prior onto the image grid"
            )
        return prob

    @staticmethod
    def _window(config: RefinerConfig, crop: tuple[int, int, int], shapes: list[Any],
                spacing: Sequence[float], factors: Sequence[int]) -> tuple[int, int, int]:
        if config.inference_window is None:
            return crop
        return effective_crop_size(crop_in_voxels(config.inference_window, spacing), shapes, factors)

    def _next_targets(
        self, subjects: list[PreparedSubject], config: RefinerConfig, round_index: int
    ) -> tuple[list[PreparedSubject], dict[str, Any]]:
        """Round ``round_index``'s targets: each subject's cleaned, TTA-averaged prediction."""
        updated, changed, agreement, consistency = [], [], [], []
        for index, subject in enumerate(subjects):
            probability, copies_agreement = self._predict_box(subject)
            previous = _numpy(subject.prior[0]) >= 0.5
            if config.cleanup != "none":
                cleaned = clean_probability(
                    probability, subject.info.get("spacing", (1.0, 1.0, 1.0)),
                    CleanupSettings(pattern=config.cleanup),
                    brain_mask=_numpy(subject.brain[0]),
                    affine=subject.info.get("affine"),
                ).probability
            else:
                cleaned = probability
            new = cleaned >= 0.5
            changed.append(int((new != previous).sum()))
            agreement.append(_dice(new, previous))
            consistency.append(copies_agreement)
            target = torch.from_numpy(np.ascontiguousarray(cleaned, dtype=np.float32))[None]
            if isinstance(subject.image, torch.Tensor):
                target = target.to(subject.image.device)
            updated.append(with_target(subject, target, seed=self.random_state + index))
        record = {"round": round_index, "voxels_changed": changed, "dice_with_previous_target": agreement,
                  "tta_agreement": consistency}
        logger.info("round %d targets: %s voxels changed, Dice with the previous target %s, TTA agreement %s",
                    round_index, changed, [round(a, 3) for a in agreement], [round(c, 3) for c in consistency])
        return updated, record

    def _predict_box(self, subject: PreparedSubject, progress: Callable[[int, int], None] | None = None
                     ) -> tuple[np.ndarray, float]:
        """TTA-averaged probability inside the subject's box, and the agreement of the copies.

        The agreement is the mean Dice between each flipped copy's mask and the averaged mask
        (1: every copy says the same; a label-free measure of how stable the output is).
        """
        network = self.network_
        network.eval()
        image = subject.image if isinstance(subject.image, torch.Tensor) else torch.from_numpy(
            np.asarray(subject.image[(slice(None),)]))
        inputs = image[None].to(self.device_).contiguous(memory_format=torch.channels_last_3d)
        autocast = torch.bfloat16 if (self.device_.type == "cuda" and self.config_.amp) else None
        flip_sets = tta_flips(getattr(self.config_, "tta", 1))
        total, copies = None, []
        for flips in flip_sets:
            dims = [axis + 2 for axis in flips]
            flipped = inputs.flip(dims) if dims else inputs
            logits = sliding_window_predict(
                flipped, network, self.window_size_, overlap=self.config_.overlap,
                sw_batch_size=self.config_.sw_batch_size, mode="gaussian",
                sw_device=self.device_, device=torch.device("cpu"), progress=progress,
                autocast_dtype=autocast,
            )
            prob = torch.sigmoid(logits.float())
            prob = (prob.flip(dims) if dims else prob)[0, 0].numpy()
            copies.append(prob >= self.config_.threshold)
            total = prob if total is None else total + prob
        brain = _numpy(subject.brain[0])
        mean = np.where(brain, total / len(flip_sets), 0.0).astype(np.float32)
        averaged = mean >= self.config_.threshold
        agreement = float(np.mean([_dice(c & brain, averaged) for c in copies]))
        return mean, agreement

    def fit_predict(self, volumes: Any, y: None = None, *, brain_masks: Sequence[Any] | None = None) -> list[np.ndarray]:
        """Fit on ``volumes`` and return the refined mask of each."""
        self.fit(volumes, brain_masks=brain_masks)
        if isinstance(volumes, (str, os.PathLike)) or not isinstance(volumes, (list, tuple)):
            volumes = [volumes]
        masks = [None] * len(volumes) if brain_masks is None else list(brain_masks)
        return [self.predict(v, brain_mask=m) for v, m in zip(volumes, masks)]

    # ---------------------------------------------------------------- predict
    def predict_proba(
        self,
        volume: Any,
        brain_mask: Any = None,
        *,
        prior: Any = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Refined lesion probability on the volume's own grid.

        Parameters
        ----------
        volume : path, Volume, array or (array, affine)
            One subject, with the channels the network was trained on.
        brain_mask : path or array, optional
            Restricts the output (0 outside); derived when omitted.
        prior : ProbabilityMap or array, optional
            This subject's prior (the single-subject job passes the one it trained on). With
            ``config.output_blend == "confidence"`` the network's probability is blended with
            the cleaned prior (:func:`blend_with_prior`); without it the network's probability
            is returned as it is, so a saved and reloaded model predicts the same.
        progress : callable, optional
            ``progress(done, total)`` over the sliding windows.

        Returns
        -------
        numpy.ndarray
            float32 in [0, 1], shape of the volume.
        """
        check_is_fitted(self, "network_")
        loaded = _load(volume)
        if loaded.n_channels != self.n_channels_in_:
            raise CheckpointError(
                f"the model was trained on {self.n_channels_in_} channel(s) but the image has "
                f"{loaded.n_channels}; pass the same modalities, in the same order"
            )
        subject = prepare_subject(loaded, None, _load_mask(brain_mask, loaded), self.modality)
        box_prob, agreement = self._predict_box(subject, progress)
        self.tta_agreement_ = agreement
        probability = np.zeros(subject.shape, dtype=np.float32)
        probability[subject.bbox] = box_prob
        self.network_probability_ = probability
        self.blend_reference_ = None
        if prior is None or getattr(self.config_, "output_blend", "none") == "none":
            return probability
        prior_data = np.asarray(getattr(prior, "data", prior), dtype=np.float32)
        if self.config_.cleanup != "none":
            brain = np.zeros(subject.shape, dtype=bool)
            brain[subject.bbox] = _numpy(subject.brain[0])
            prior_data = clean_probability(prior_data, loaded.spacing, CleanupSettings(pattern=self.config_.cleanup),
                                           brain_mask=brain, affine=loaded.affine).probability
        self.blend_reference_ = prior_data
        return blend_with_prior(probability, prior_data)

    def predict(
        self,
        volume: Any,
        brain_mask: Any = None,
        *,
        prior: Any = None,
        threshold: float | None = None,
        min_size_mm3: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Refined lesion mask (uint8 {0, 1}) on the volume's own grid.

        ``prior`` as for :meth:`predict_proba`; ``threshold`` and ``min_size_mm3`` default to
        the configuration's.
        """
        check_is_fitted(self, "network_")
        loaded = _load(volume)
        mask_array = _load_mask(brain_mask, loaded)
        probability = self.predict_proba(loaded, mask_array, prior=prior, progress=progress)
        return self.postprocess(probability, loaded.spacing, threshold=threshold, min_size_mm3=min_size_mm3,
                                affine=loaded.affine, brain_mask=mask_array)

    def postprocess(
        self,
        probability: np.ndarray,
        spacing: Sequence[float],
        *,
        threshold: float | None = None,
        min_size_mm3: float | None = None,
        affine: np.ndarray | None = None,
        brain_mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """Threshold a probability map, clean it up, drop components under ``min_size_mm3``.

        The clean-up (``config.cleanup_output``, pattern ``config.cleanup``) is the one applied
        to the training targets (:func:`cgc_refine.cleanup.clean_probability`); ``affine``
        and ``brain_mask`` feed its ``"auto"`` pattern decision. Its facts are kept in
        ``cleanup_info_``.
        """
        check_is_fitted(self, "network_")
        level = self.config_.threshold if threshold is None else float(threshold)
        if not 0.0 < level < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {threshold!r}")
        min_size = self.config_.min_size_mm3 if min_size_mm3 is None else float(min_size_mm3)
        mask = (probability >= level).astype(np.uint8)
        self.cleanup_info_ = None
        if getattr(self.config_, "cleanup_output", False) and self.config_.cleanup != "none":
            cleaned = clean_probability(mask.astype(np.float32), spacing, CleanupSettings(pattern=self.config_.cleanup),
                                        brain_mask=brain_mask, affine=affine)
            mask, self.cleanup_info_ = cleaned.mask, cleaned.info
        if min_size > 0:
            mask = remove_small_components(mask, min_size, spacing)
        return mask

    def guard(self, refined: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, str | None]:
        """The label-free collapse guard of ``config.fallback``.

        Parameters
        ----------
        refined : numpy.ndarray
            The refined mask of a subject.
        reference : numpy.ndarray
            What it was refined from (the cleaned prior's mask).

        Returns
        -------
        mask : numpy.ndarray
            ``refined``, or ``reference`` (uint8) when the refined volume is under a third or
            over three times the reference's: a change that large is a collapse or an
            explosion of training, not a refinement of a prior that was informative.
        warning : str or None
            What happened, when the guard acted or would have (``fallback=False``).
        """
        check_is_fitted(self, "network_")
        message = collapse_warning(int(np.count_nonzero(reference)), int(np.count_nonzero(refined)))
        if message is None:
            return refined, None
        if getattr(self.config_, "fallback", False):
            logger.warning("%s; falling back to the cleaned prior", message)
            return (np.asarray(reference) != 0).astype(np.uint8), message + "; fell back to the cleaned prior"
        logger.warning("%s", message)
        return refined, message

    # ------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the trained model (weights, configuration, version) atomically.

        Under torchrun only rank 0 writes; the other ranks return the path without writing
        (their weights are identical).

        Returns
        -------
        pathlib.Path
            The written file.
        """
        check_is_fitted(self, "network_")
        if not is_main_process():
            logger.debug("rank %s: not writing %s (only rank 0 writes)", os.environ.get("RANK"), path)
            return Path(path)
        return self._write(path, overwrite=overwrite)

    def _write(self, path: str | os.PathLike[str], *, overwrite: bool, optimizer_state: Any = None,
               sampler_state: Any = None) -> Path:
        target = Path(path)
        state = {
            "format": CHECKPOINT_FORMAT,
            "cgc_refine_version": __version__,
            "config": self.config_.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.network_.state_dict().items()},
            "n_channels_in": int(self.n_channels_in_),
            "strides": getattr(self, "strides_", None),
            "spacing": list(getattr(self, "spacing_", (1.0, 1.0, 1.0))),
            "crop_size": list(self.crop_size_),
            "window_size": list(self.window_size_),
            "modality": self.modality,
            "random_state": int(self.random_state),
            "n_iter": int(self.n_iter_),
            "priors": jsonable(self.priors_),
            "history": jsonable(self.history_),
            "optimizer_state": optimizer_state,
            "sampler_state": jsonable(sampler_state),
        }
        atomic_write(target, lambda handle: torch.save(state, handle), overwrite=overwrite, binary=True,
                     what="model", error=CheckpointError)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "auto") -> "Refiner":
        """Read a model written by :meth:`save`.

        Raises
        ------
        CheckpointError
            If the file is missing, corrupted, or not a cgc_refine model.
        """
        resolved = resolve_device(device)
        state = _read_checkpoint(path)
        try:
            config = RefinerConfig.from_dict(state["config"])
            refiner = cls(prior=None, config=config, modality=state["modality"], device=device,
                          random_state=int(state["random_state"]))
            network = build_network(config, int(state["n_channels_in"]), strides=state.get("strides"))
            network.load_state_dict(state["state_dict"])
        except (KeyError, TypeError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"{path} is not a usable cgc_refine model ({error}); retrain or re-save it") from None
        refiner.network_ = network.to(resolved).to(memory_format=torch.channels_last_3d).eval()
        refiner.config_ = config
        refiner.device_ = resolved
        refiner.n_channels_in_ = int(state["n_channels_in"])
        refiner.strides_ = state.get("strides")
        refiner.spacing_ = tuple(state.get("spacing", (1.0, 1.0, 1.0)))
        refiner.crop_size_ = tuple(state["crop_size"])
        refiner.window_size_ = tuple(state.get("window_size", state["crop_size"]))
        refiner.n_iter_ = int(state["n_iter"])
        refiner.priors_ = state.get("priors", [])
        refiner.history_ = state.get("history", [])
        return refiner


def _read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    target = Path(path)
    if not target.is_file():
        raise CheckpointError(f"model file {target} does not exist; check the path")
    try:
        state = torch.load(target, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(
            f"{target} cannot be read as a cgc_refine model ({type(error).__name__}); the file is "
            "corrupted or not a model written by cgc-refine"
        ) from None
    if not isinstance(state, dict) or "state_dict" not in state or "config" not in state:
        raise CheckpointError(f"{target} is not a cgc_refine model (missing weights or configuration)")
    if int(state.get("format", -1)) > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{target} was written by a newer cgc_refine (format {state.get('format')}); upgrade cgc_refine"
        )
    return state


def _check_compatible(state: dict[str, Any], config: RefinerConfig, n_channels: int) -> None:
    saved = RefinerConfig.from_dict(state["config"])
    architecture = ("channels", "norm", "use_coarse", "use_fine", "patch_size", "proj_dim")
    if any(getattr(saved, name) != getattr(config, name) for name in architecture):
        raise CheckpointError("the checkpoint's network settings differ from this configuration; resume with the same config")
    if state.get("strides") is not None and config.anisotropic is False:
        raise CheckpointError("the checkpoint's network is anisotropic; resume with anisotropic=True")
    if int(state["n_channels_in"]) != n_channels:
        raise CheckpointError(
            f"the checkpoint was trained on {state['n_channels_in']} channel(s), the data have {n_channels}"
        )



def _numpy(array: Any) -> np.ndarray:
    """A tensor (on any device) or an on-disk array as a NumPy array."""
    return array.cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean arrays (1.0 when both are empty)."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def tta_flips(copies: int) -> list[tuple[int, ...]]:
    """The axis flips of ``copies`` test-time-augmented passes (1, 2, 4 or 8).

    2 adds the flip of the first axis (left-right in RAS/LPS scans, the brain's mirror
    axis), 4 the flips of the first two axes, 8 every combination of the three.
    """
    axes = {1: (), 2: (0,), 4: (0, 1), 8: (0, 1, 2)}[int(copies)]
    sets: list[tuple[int, ...]] = [()]
    for axis in axes:
        sets += [flips + (axis,) for flips in sets]
    return sets


def collapse_warning(prior_voxels: int, refined_voxels: int, factor: float = 3.0) -> str | None:
    """A warning when the refined volume is under ``1/factor`` or over ``factor`` times the prior's."""
    if prior_voxels == 0:
        return None
    ratio = refined_voxels / prior_voxels
    if ratio < 1.0 / factor or ratio > factor:
        return (f"the refined mask holds {refined_voxels} voxels, {ratio:.2f} times the prior's {prior_voxels}: "
                "training did not refine this prior")
    return None


def blend_with_prior(network: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Trust the (cleaned) prior where it is sure, the network where it is not.

    ``p = c * prior + (1 - c) * network`` with ``c = |2 prior - 1|``, the same confidence that
    weights the BCE term in training (:func:`cgc_refine.training.target_weights`): the network
    learned from the voxels the prior was sure of, and decides the ones it was not. A hard
    (0/1) prior is returned unchanged -- it states no uncertainty for the network to resolve;
    soften it first (``from_mask(sigma_mm=...)``) to let the network move its boundary.
    """
    confidence = np.abs(2.0 * prior - 1.0)
    return np.clip(confidence * prior + (1.0 - confidence) * network, 0.0, 1.0).astype(np.float32)
