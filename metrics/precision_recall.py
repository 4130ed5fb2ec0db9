"""Precision, recall, density and coverage: whether generated samples lie on the real samples' manifold and
whether they cover it, from k-nearest-neighbour balls in a feature space.

FID folds fidelity and diversity into one number, and a generator that drops part of the data (one colour per
class, a few memorised images, one mode of a multi-modal teacher) can keep a low FID when the features barely see
what it dropped. These four numbers separate the two:

* **precision**: the share of generated samples inside the real manifold, the union of the balls around every
  real sample with the radius of its k-th nearest real neighbour (fidelity);
* **recall**: the share of real samples inside the generated manifold, built in the same way from the generated
  samples (diversity);
* **density**: the number of real balls that contain a generated sample, divided by k and averaged over the
  generated samples (about 1 when they are distributed like the real ones, above 1 when they crowd into dense
  regions; unbounded);
* **coverage**: the share of real samples whose ball contains at least one generated sample (diversity that a few
  outlying generated samples with wide balls cannot inflate, unlike recall).

Improved precision and recall: Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
Generative Models", NeurIPS, arXiv:1904.06991 (k = 3). ADM's evaluation suite (Dhariwal & Nichol 2021,
arXiv:2105.05233) computes them on Inception pool features with k = 3, and consistency models (Song et al. 2023,
arXiv:2303.01469) report them so. Density and coverage: Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics
for Generative Models", ICML, arXiv:2002.09797 (they recommend k = 5). Their ``prdc`` package is the reference the
tests compare with.

A sample lies in a ball when its distance to the centre is at most the radius (``<=``, as in Kynkäänniemi et al.'s
and ADM's code; ``prdc`` uses ``<``): the two differ only for a distance exactly equal to a radius, as between
duplicated samples. Distances are Euclidean, computed in float64 pair by pair (``torch.cdist`` without its matrix-product
shortcut, whose rounding of a pair depends on the block it is in: a duplicate's distance to a real sample's
neighbour then equals that neighbour's radius exactly, whatever ``chunk_size``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._checks import check_bool, check_float_input, check_int
from ..errors import OptionError, ShapeError
from ._dist import _backend_device, is_distributed
from .fid import InceptionFeatures, _describe_extractor, checked_extractor, extract_features
from .protocol import module_sha256

__all__ = ["PrecisionRecall", "precision_recall"]


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(len(a), len(b))`` computed pair by pair (not through ``|a|^2 + |b|^2 - 2 a.b``, which
    rounds the same pair differently in different blocks): a pair's distance has the same bits whichever block
    holds it, so a duplicated sample is exactly on the boundary of the balls it should be on."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """The distance of every row of ``x`` to its k-th nearest other row (the (k+1)-th smallest, itself first)."""
    radii = []
    for start in range(0, x.shape[0], chunk_size):
        d = _distances(x[start : start + chunk_size], x)
        radii.append(torch.kthvalue(d, k + 1, dim=1).values)
    return torch.cat(radii)


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, nearest_k: int = 3, *, chunk_size: int = 1024
) -> dict[str, float]:
    """Precision, recall, density and coverage of the ``fake`` features against the ``real`` ones.

    Args:
        real: Real samples' features ``(N, D)`` (N > ``nearest_k``).
        fake: Generated samples' features ``(M, D)`` (M > ``nearest_k``), on the same device.
        nearest_k: k of the k-th nearest neighbour that sets each ball's radius (3 in Kynkäänniemi et al. and
            ADM's suite; Naeem et al. recommend 5 for density and coverage).
        chunk_size: Rows of a distance block: memory ``chunk_size * max(N, M)`` float64 numbers at a time.

    Returns:
        ``{"precision": ..., "recall": ..., "density": ..., "coverage": ...}`` as Python floats.

    Raises:
        DTypeError: ``real`` / ``fake`` are not floating tensors, or ``nearest_k`` / ``chunk_size`` not integers.
        ShapeError: Either is not ``(N, D)``, their ``D`` differ, or either holds ``nearest_k`` rows or fewer.
        OptionError: ``nearest_k`` or ``chunk_size`` is below 1.
        NonFiniteError: A feature is NaN or infinite.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> real = torch.randn(200, 2, generator=g)
        >>> collapsed = 0.1 * torch.randn(200, 2, generator=g)  # one mode: inside the data, covering little
        >>> scores = precision_recall(real, collapsed)
        >>> scores["precision"] > 0.9 and scores["recall"] < 0.3 and scores["coverage"] < 0.3
        True
    """
    real = check_float_input(real, "real", ndim=2, layout="(N, D)")
    fake = check_float_input(fake, "fake", ndim=2, layout="(M, D)")
    k = check_int(nearest_k, "nearest_k", minimum=1)
    chunk = check_int(chunk_size, "chunk_size", minimum=1)
    if real.shape[1] != fake.shape[1]:
        raise ShapeError(
            f"Expected `real` and `fake` features of the same dimension, but got {real.shape[1]} and "
            f"{fake.shape[1]}: extract both with the same feature extractor."
        )
    for name, x in (("real", real), ("fake", fake)):
        if x.shape[0] <= k:
            raise ShapeError(
                f"Expected more than nearest_k={k} `{name}` samples (each ball's radius is the distance to the "
                f"k-th nearest other sample), but got {x.shape[0]}. Pass more samples or a smaller nearest_k."
            )
    real, fake = real.double(), fake.to(real.device, torch.float64)
    real_radii = _kth_neighbour_radii(real, k, chunk)
    fake_radii = _kth_neighbour_radii(fake, k, chunk)
    real_balls_per_fake = torch.zeros(fake.shape[0], dtype=torch.int64, device=real.device)
    covered = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    in_fake_manifold = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    for start in range(0, real.shape[0], chunk):
        d = _distances(real[start : start + chunk], fake)  # (chunk, M)
        inside_real_ball = d <= real_radii[start : start + chunk, None]
        real_balls_per_fake += inside_real_ball.sum(0)
        covered[start : start + chunk] = inside_real_ball.any(1)
        in_fake_manifold[start : start + chunk] = (d <= fake_radii[None, :]).any(1)
    return {
        "precision": float((real_balls_per_fake > 0).double().mean()),
        "recall": float(in_fake_manifold.double().mean()),
        "density": float(real_balls_per_fake.double().sum() / (k * fake.shape[0])),
        "coverage": float(covered.double().mean()),
    }


class PrecisionRecall:
    """Precision, recall, density and coverage (:func:`precision_recall`) accumulated over batches
    (torchmetrics-like: update / all_reduce / compute / reset).

    Generated images go to ``update(images)``, real ones to ``update(images, real=True)``. Unlike FID's statistics,
    the k-nearest-neighbour balls need every feature vector: they are kept (``N x D`` float32 numbers per set, on
    the device the extractor returns them on), and :meth:`all_reduce` gathers them on every process.

    Args:
        feature_extractor: A callable mapping a batch of images to ``(N, D)`` features; ``None`` builds
            :class:`~diffdistill.metrics.InceptionFeatures` (clean-fid's Inception pool features, as ADM's suite).
        nearest_k: k of the balls' radii (see :func:`precision_recall`).

    Raises:
        DTypeError: ``feature_extractor`` is not callable, or ``nearest_k`` is not an integer.
        OptionError: ``nearest_k`` is below 1.

    Example:
        >>> extractor = torch.nn.Flatten()  # pixels as features, for the example
        >>> metric = PrecisionRecall(extractor)
        >>> g = torch.Generator().manual_seed(0)
        >>> metric.update(torch.rand(64, 3, 4, 4, generator=g), real=True)
        >>> metric.update(torch.rand(64, 3, 4, 4, generator=g))
        >>> scores = metric.compute()
        >>> sorted(scores), 0.0 < scores["coverage"] <= 1.0
        (['coverage', 'density', 'precision', 'recall'], True)
    """

    def __init__(
        self, feature_extractor: Callable[[Any], torch.Tensor] | None = None, nearest_k: int = 3
    ) -> None:
        self.feature_extractor = checked_extractor(feature_extractor)
        self.nearest_k = check_int(nearest_k, "nearest_k", minimum=1)
        self.reset()

    def reset(self) -> None:
        """Forget every feature (both sets)."""
        self._features: dict[bool, list[torch.Tensor]] = {False: [], True: []}
        self._gathered = False

    def count(self, real: bool = False) -> int:
        """The number of generated (``real=True``: real) samples accumulated.

        Args:
            real: Which set.

        Returns:
            The number of feature vectors held.
        """
        return sum(int(f.shape[0]) for f in self._features[check_bool(real, "real")])

    def update(self, images: Any, real: bool = False) -> None:
        """Extract the features of a batch and keep them.

        Args:
            images: A batch in the layout the feature extractor takes.
            real: ``True`` for real images.

        Raises:
            DTypeError: ``real`` is not a bool, or the extractor returned no floating tensor.
            ShapeError: The extractor returned other than ``(N, D)``, or another ``D`` than before.
            OptionError: Called after :meth:`all_reduce` (without :meth:`reset`).
        """
        check_bool(real, "real")
        if self._gathered:
            raise OptionError(
                "update() was called after all_reduce(): the features were already gathered from every process. "
                "Call reset() to start a new evaluation."
            )
        feats = extract_features(self.feature_extractor, images).detach().float()
        held = [f for s in (False, True) for f in self._features[s]]
        if held and feats.shape[1] != held[0].shape[1]:
            raise ShapeError(
                f"Expected features of dimension {held[0].shape[1]} as before, but the extractor returned "
                f"{feats.shape[1]}: use one feature extractor for every update."
            )
        self._features[real].append(feats)

    def all_reduce(self, group: Any = None) -> None:
        """Gather both sets' features from every process onto every process (a no-op without a process group).

        Call it on every process, once, after the last :meth:`update`; a process may hold no samples of a set.

        Args:
            group: The process group (``None``: the default group).

        Raises:
            OptionError: Called twice without :meth:`reset` (the features would be counted twice).
        """
        if not is_distributed(group):
            return
        if self._gathered:
            raise OptionError(
                "all_reduce() was called twice: call it once per evaluation (reset() starts anew)."
            )
        import torch.distributed as dist

        device = _backend_device(group)
        world = dist.get_world_size(group)
        held = [f for s in (False, True) for f in self._features[s]]
        dims = torch.tensor([held[0].shape[1] if held else 0], dtype=torch.int64, device=device)
        dist.all_reduce(dims, op=dist.ReduceOp.MAX, group=group)
        d = int(dims)
        for real in (False, True):
            local = torch.cat(self._features[real]).to(device) if self._features[real] else None
            if local is None:
                local = torch.zeros(0, d, dtype=torch.float32, device=device)
            counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
            dist.all_gather(
                counts, torch.tensor([local.shape[0]], dtype=torch.int64, device=device), group=group
            )
            longest = max(int(c) for c in counts)
            padded = torch.zeros(longest, d, dtype=torch.float32, device=device)
            padded[: local.shape[0]] = local
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded, group=group)
            gathered = [p[: int(c)] for p, c in zip(parts, counts, strict=True) if int(c) > 0]
            self._features[real] = [torch.cat(gathered)] if gathered else []
        self._gathered = True

    def compute(self) -> dict[str, float]:
        """Precision, recall, density and coverage of the generated samples against the real ones.

        Returns:
            ``{"precision": ..., "recall": ..., "density": ..., "coverage": ...}``.

        Raises:
            OptionError: No real or no generated samples were given.
            ShapeError: A set holds ``nearest_k`` samples or fewer.
        """
        for is_real, name in ((True, "real"), (False, "generated")):
            if not self._features[is_real]:
                flag = ", real=True" if is_real else ""
                raise OptionError(f"No {name} samples: call update(images{flag}) before compute().")
        real = torch.cat(self._features[True])
        fake = torch.cat(self._features[False]).to(real.device)
        return precision_recall(real, fake, self.nearest_k)

    def protocol(self) -> dict[str, Any]:
        """What a protocol record should hold about this metric (see :class:`~diffdistill.metrics.EvaluationProtocol`).

        Returns:
            ``{"metric": "precision_recall", "nearest_k": ..., "feature_extractor": ..., "inside_ball": "<="}``, plus
            ``feature_extractor_sha256`` for a module other than :class:`~diffdistill.metrics.InceptionFeatures`.
        """
        out: dict[str, Any] = {
            "metric": "precision_recall",
            "nearest_k": self.nearest_k,
            "feature_extractor": _describe_extractor(self.feature_extractor),
            "inside_ball": "<=",
        }
        extractor = self.feature_extractor
        if isinstance(extractor, nn.Module) and not isinstance(extractor, InceptionFeatures):
            out["feature_extractor_sha256"] = module_sha256(extractor)
        return out
