"""The refiner: an sklearn-style estimator that turns a prior into a refined lesion mask.

``Refiner(prior).fit(volumes)`` computes (or adapts) one prior per volume, trains the CGC
U-Net against those pseudo-labels (no ground truth anywhere), and ``predict_proba`` /
``predict`` segment any volume with the trained network by sliding-window inference.

The estimator's parts live beside it: :mod:`cgc_refine.subjects` reads and prepares the
training subjects, :mod:`cgc_refine.training` runs the training loop,
:mod:`cgc_refine.refinement` holds the label-free steps around the network (test-time
augmentation, self-training targets, blending, the collapse guard) and
:mod:`cgc_refine.checkpoint` the model file's format.
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

from .alignment import align_subject
from .checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_state,
    read_checkpoint,
    restore_refiner,
    resume_training,
    write_checkpoint,
)
from .cleanup import CleanupSettings, clean_probability
from .config import ConfigError, RefinerConfig
from .device import resolve_device, seed_everything
from .distributed import DistributedContext, is_main_process, setup_distributed
from .exceptions import CheckpointError, InvalidImageError, InvalidParameterError
from .io.coercion import as_brain_mask, as_volume
from .postprocess import remove_small_components
from .priors import ProbabilityMap
from .refinement import as_numpy, blend_with_prior, collapse_warning, next_targets, predict_box, tta_flips
from .subjects import SubjectReader, builtin_prior, check_priors, per_volume_priors
from .training import (
    CropSampler,
    PreparedSubject,
    TrainingPlan,
    build_network,
    plan_training,
    prepare_subject,
    train_network,
)

__all__ = ["Refiner", "CHECKPOINT_FORMAT", "blend_with_prior", "collapse_warning", "tta_flips"]

logger = logging.getLogger(__name__)

def _as_list(volumes: Any) -> list[Any]:
    """The subjects as a list: a single path, Volume or array is one subject."""
    if isinstance(volumes, (str, os.PathLike)) or not isinstance(volumes, (list, tuple)):
        return [volumes]
    return list(volumes)


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
    alignment_shifts_ : list of float or None
        With ``config.intensity_alignment == "prior"``: per training subject, the shift of its
        first channel (its prior's decision boundary, :mod:`cgc_refine.alignment`); None where
        no shift was applied or alignment is off.
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
        """The prior object that computes every volume's prior (None: one prior per volume)."""
        return builtin_prior(self.prior, self.modality)

    def _reader(self, cleanup: str = "none") -> SubjectReader:
        """Reads this estimator's subjects (its prior, modality, prior kind and seed)."""
        return SubjectReader(self._builtin_prior(), self.modality, self.prior_kind, self.random_state, cleanup)

    def compute_priors(
        self, volumes: Sequence[Any], brain_masks: Sequence[Any] | None = None
    ) -> list[ProbabilityMap]:
        """The prior of every volume, as probability maps (what :meth:`fit` trains on)."""
        volumes = _as_list(volumes)
        masks = [None] * len(volumes) if brain_masks is None else list(brain_masks)
        reader = self._reader()
        external = per_volume_priors(self.prior, reader.builtin, len(volumes))
        maps = []
        for volume_in, mask_in, prior_in in zip(volumes, masks, external):
            volume = as_volume(volume_in)
            maps.append(reader.prior_of(volume, as_brain_mask(mask_in, volume), prior_in))
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
        volumes = _as_list(volumes)
        if len(volumes) == 0:
            raise InvalidImageError("fit needs at least one volume")
        masks_in = [None] * len(volumes) if brain_masks is None else list(brain_masks)
        if len(masks_in) != len(volumes):
            raise InvalidImageError(f"got {len(masks_in)} brain masks for {len(volumes)} volumes")
        started = time.perf_counter()
        subjects = self._prepare_subjects(volumes, masks_in, config, context, cache_dir)
        if config.intensity_alignment == "prior":
            subjects = [align_subject(s, s.prior, seed=self.random_state + i) for i, s in enumerate(subjects)]
        prior_seconds = time.perf_counter() - started
        resume = None if resume_from is None else read_checkpoint(resume_from)
        plan = plan_training(subjects, config, device, context, seed=self.random_state, resume=resume)
        network = self._fresh_network(plan, config, device)
        sampler = CropSampler(plan.subjects, plan.crop, config.foreground_oversampling, seed=plan.sampler_seed,
                              augmentation=plan.augmentation)
        start = (0, None) if plan.resume is None else resume_training(
            plan.resume, config, plan.n_channels, network, sampler, distributed=context.enabled)
        self._set_training_attributes(plan, config, device)
        if context.is_main:
            logger.info(
                "training on %d subject(s), crop %s, %d iterations, device %s%s",
                len(plan.subjects), plan.crop, config.iterations, device,
                f", {context.world_size} processes" if context.enabled else "",
            )
        totals = self._train_rounds(plan, config, device, context, network, sampler, start,
                                    checkpoint_path, checkpoint_every)
        self.n_iter_ = config.iterations
        self.timings_ = {
            "priors_s": prior_seconds, "train_s": time.perf_counter() - started - prior_seconds,
            "steps": totals["steps"], "samples": totals["samples"], "world_size": context.world_size,
            "loop_s": totals["loop_s"], "data_wait_s": totals["data_wait_s"],
        }
        return self

    def _prepare_subjects(self, volumes: list[Any], masks_in: list[Any], config: RefinerConfig,
                          context: DistributedContext, cache_dir: str | os.PathLike[str] | None
                          ) -> list[PreparedSubject]:
        """Every training subject prepared (through a cache in ``cache_dir``), priors checked."""
        reader = self._reader(config.cleanup)
        external = per_volume_priors(self.prior, reader.builtin, len(volumes))
        cache = None
        if cache_dir is not None:
            from .cache import SubjectCache

            cache = SubjectCache(cache_dir)
        subjects = reader.prepare_all(list(zip(volumes, masks_in, external)), cache, context)
        check_priors(subjects, context)
        return subjects

    def _fresh_network(self, plan: TrainingPlan, config: RefinerConfig, device: torch.device) -> Any:
        """A newly initialised network (seeded by ``random_state``) on ``device``, channels-last."""
        seed_everything(self.random_state)
        # Channels-last 3-D convolutions are about twice as fast on CPU (measured) and are
        # the layout cuDNN prefers for bf16 on CUDA.
        return build_network(config, plan.n_channels, strides=plan.strides).to(device).to(
            memory_format=torch.channels_last_3d)

    def _set_training_attributes(self, plan: TrainingPlan, config: RefinerConfig, device: torch.device) -> None:
        """The fitted attributes known before training: configuration, geometry, prior provenance."""
        self.config_ = config
        self.device_ = device
        self.n_channels_in_ = plan.n_channels
        self.crop_size_ = plan.crop
        self.strides_ = plan.strides
        self.spacing_ = plan.spacing
        self.target_cleanup_ = [s.info.get("cleanup") for s in plan.subjects]
        self.alignment_shifts_ = [s.info.get("alignment_shift") for s in plan.subjects]
        self.window_size_ = plan.window
        self.priors_ = [{"source": s.info.get("prior_source"), "params": s.info.get("prior_params", {})}
                        for s in plan.subjects]

    def _train_rounds(
        self, plan: TrainingPlan, config: RefinerConfig, device: torch.device, context: DistributedContext,
        network: Any, sampler: CropSampler, start: tuple[int, dict[str, Any] | None],
        checkpoint_path: str | os.PathLike[str] | None, checkpoint_every: int,
    ) -> dict[str, Any]:
        """Train ``config.rounds`` rounds; set ``network_``, ``history_`` and ``rounds_``; return totals.

        Round 1 trains against the priors (from ``start``, a resumed iteration and Adam state);
        every later round trains a fresh network against the previous round's cleaned,
        test-time-augmented prediction, blended with the cleaned prior as the output is
        (:func:`~cgc_refine.refinement.next_targets`).
        """
        subjects = plan.subjects
        start_iteration, optimizer_state = start

        def save_checkpoint(iteration: int, optim_state: dict[str, Any]) -> None:
            self.network_ = network
            self.n_iter_ = iteration
            self.history_ = []
            self._write(checkpoint_path, overwrite=True, optimizer_state=optim_state,  # type: ignore[arg-type]
                        sampler_state=sampler.state())

        first_targets = [s.prior for s in plan.subjects]
        self.rounds_ = []
        history: list[dict[str, float]] = []
        totals = {"steps": 0, "samples": 0, "loop_s": 0.0, "data_wait_s": 0.0}
        for round_index in range(1, config.rounds + 1):
            if round_index > 1:
                # Self-training: the next target is this round's cleaned, test-time-augmented
                # prediction; the next student starts from fresh weights.
                self.network_ = network
                subjects, record = next_targets(network, subjects, config, round_index, window=plan.window,
                                                device=device, random_state=self.random_state,
                                                blend_references=first_targets)
                self.rounds_.append(record)
                network = self._fresh_network(plan, config, device)
                sampler = CropSampler(subjects, plan.crop, config.foreground_oversampling,
                                      seed=plan.sampler_seed + round_index - 1, augmentation=plan.augmentation)
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
            totals["steps"] += result.steps
            totals["samples"] += result.samples
            totals["loop_s"] += result.elapsed_s
            totals["data_wait_s"] += result.data_wait_s
        self.network_ = network
        self.history_ = history
        self._optimizer_state = result.optimizer_state
        return totals

    def fit_predict(self, volumes: Any, y: None = None, *, brain_masks: Sequence[Any] | None = None) -> list[np.ndarray]:
        """Fit on ``volumes`` and return the refined mask of each."""
        self.fit(volumes, brain_masks=brain_masks)
        volumes = _as_list(volumes)
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
        loaded = as_volume(volume)
        if loaded.n_channels != self.n_channels_in_:
            raise CheckpointError(
                f"the model was trained on {self.n_channels_in_} channel(s) but the image has "
                f"{loaded.n_channels}; pass the same modalities, in the same order"
            )
        subject = prepare_subject(loaded, None, as_brain_mask(brain_mask, loaded), self.modality)
        aligned = getattr(self.config_, "intensity_alignment", "none") == "prior"
        if aligned and prior is None:
            raise InvalidParameterError(
                "this model was trained with intensity_alignment='prior': pass the subject's prior "
                "(predict(..., prior=...); on the command line, cgc-refine predict --prior ...) so "
                "that its intensities are aligned as in training"
            )
        blend = getattr(self.config_, "output_blend", "none") != "none"
        reference = self._blend_reference(prior, subject, loaded) if prior is not None and (blend or aligned) else None
        if aligned:
            subject = align_subject(subject, reference[(None, *subject.bbox)], seed=self.random_state)
        box_prob, agreement = predict_box(self.network_, subject, self.config_, self.window_size_, self.device_,
                                          progress)
        self.tta_agreement_ = agreement
        probability = np.zeros(subject.shape, dtype=np.float32)
        probability[subject.bbox] = box_prob
        self.network_probability_ = probability
        self.blend_reference_ = None
        if reference is None or not blend:
            return probability
        self.blend_reference_ = reference
        return blend_with_prior(probability, reference)

    def _blend_reference(self, prior: Any, subject: PreparedSubject, loaded: Any) -> np.ndarray:
        """The subject's prior as training saw it: cleaned with the configured pattern."""
        prior_data = np.asarray(getattr(prior, "data", prior), dtype=np.float32)
        if self.config_.cleanup == "none":
            return prior_data
        brain = np.zeros(subject.shape, dtype=bool)
        brain[subject.bbox] = as_numpy(subject.brain[0])
        return clean_probability(prior_data, loaded.spacing, CleanupSettings(pattern=self.config_.cleanup),
                                 brain_mask=brain, affine=loaded.affine).probability

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
        loaded = as_volume(volume)
        mask_array = as_brain_mask(brain_mask, loaded)
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
        """Write this fitted estimator (and, in periodic checkpoints, the training state) to ``path``."""
        state = checkpoint_state(self, optimizer_state=optimizer_state, sampler_state=sampler_state)
        return write_checkpoint(path, state, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "auto") -> "Refiner":
        """Read a model written by :meth:`save` (format: :mod:`cgc_refine.checkpoint`).

        Raises
        ------
        CheckpointError
            If the file is missing, corrupted, or not a cgc_refine model.
        """
        resolved = resolve_device(device)
        return restore_refiner(cls, read_checkpoint(path), path, device, resolved)
