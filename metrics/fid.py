"""Fréchet Inception Distance with clean-fid's preprocessing, accumulated in float64 and across processes.

FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
NeurIPS 2017, Sec. 3 / Eq. 6) fits a Gaussian to the Inception-v3 pool features of each image set and reports

.. math::

    d^2 = \\lVert \\mu_1 - \\mu_2 \\rVert_2^2 + \\operatorname{Tr}\\big(\\Sigma_1 + \\Sigma_2
          - 2 (\\Sigma_1 \\Sigma_2)^{1/2}\\big).

Which resize filter produces the 299x299 network input changes the number by several points (Parmar et al.,
"On Aliased Resizing and Surprising Subtleties in GAN Evaluation", CVPR 2022, Sec. 3-4); we use clean-fid's
"clean" mode (PIL bicubic per channel in float, then clean-fid's Inception) through the ``cleanfid`` package
itself rather than our own network, so numbers match ``cleanfid.fid.compute_fid(mode="clean")`` and its
published reference statistics.

Pieces:

* :class:`FeatureStatistics` -- streaming float64 mean / covariance of features, mergeable and all-reducible;
* :func:`frechet_distance`, :func:`fid_from_statistics` -- the distance, in float64, as clean-fid computes it;
* :func:`clean_resize`, :class:`InceptionFeatures` -- clean-fid's preprocessing and feature extractor;
* :class:`FID` -- a torchmetrics-like accumulator over any feature extractor.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._checks import check_bool, check_float_input, check_int, check_tensor
from ..errors import DTypeError, MissingDependencyError, OptionError, ShapeError, value_checks_enabled
from ._dist import all_reduce_sum, is_distributed
from .protocol import module_sha256

__all__ = [
    "FID",
    "FeatureStatistics",
    "InceptionFeatures",
    "clean_resize",
    "fid_from_statistics",
    "frechet_distance",
]

logger = logging.getLogger(__name__)

CLEAN_FID_SIZE = (299, 299)
INCEPTION_FILE = "inception-2015-12-05.pt"


def _require(module: str, pip_name: str, what: str) -> Any:
    """Import an optional dependency or raise :class:`MissingDependencyError` naming the pip package."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{what} needs the `{module}` package, which is not installed. Install it with "
            f"`pip install {pip_name}` (or `pip install diffdistill[eval]`)."
        ) from err


class FeatureStatistics:
    """Streaming float64 mean and covariance of features ``(N, D)``, as FID needs them.

    The state is the count ``n``, the mean and the centred scatter matrix ``M2 = sum (x - mean)(x - mean)^T``.
    Each batch is folded in with the pairwise update of Chan, Golub & LeVeque ("Updating formulae and a
    pairwise algorithm for computing sample variances", 1979, Eq. 1.5b): with batch count ``m``, mean ``b`` and
    centred scatter ``B`` (computed about the batch's own mean),

    .. math::

        \\delta = b - \\bar x,\\quad \\bar x \\leftarrow \\bar x + \\tfrac{m}{n+m}\\delta,\\quad
        M_2 \\leftarrow M_2 + B + \\tfrac{nm}{n+m}\\,\\delta\\delta^T .

    Nothing is ever accumulated about the origin, so a large common offset of the features (Inception pool
    features are non-negative with means far from 0) costs no precision, unlike ``sum x x^T - n mean mean^T``.
    :meth:`merge` applies the same formula to two states; :meth:`all_reduce` sums the states of all processes
    about their pooled mean (the torch.distributed sum of count / sum / sum of outer products, taken about a
    common shift). The covariance is the unbiased ``M2 / (n - 1)``, as ``np.cov`` in clean-fid and pytorch-fid.
    The mean is float64 too, where clean-fid's ``np.mean`` of its float32 features stays float32: its FID differs
    from ours by that rounding only (~1e-7 relative; tests/metrics/test_fid.py bounds it).

    Args:
        num_features: The feature dimension ``D`` (2048 for Inception pool features).
        device: Where the state lives; ``None`` puts it on the device of the first features passed to
            :meth:`update`.

    Raises:
        DTypeError: ``num_features`` is not an integer.
        OptionError: ``num_features`` < 1.

    Example:
        >>> import numpy as np
        >>> from diffdistill.metrics import FeatureStatistics
        >>> x = torch.randn(100, 3, dtype=torch.float64) + 1e6
        >>> stats = FeatureStatistics(3)
        >>> for chunk in x.split(30):
        ...     _ = stats.update(chunk)
        >>> stats.count, np.allclose(stats.covariance.numpy(), np.cov(x.numpy(), rowvar=False))
        (100, True)
    """

    def __init__(self, num_features: int, *, device: torch.device | str | None = None) -> None:
        self.num_features = check_int(num_features, "num_features", minimum=1)
        self._lazy_device = device is None
        dev = torch.device("cpu") if device is None else torch.device(device)
        self._n = 0
        self._mean = torch.zeros(self.num_features, dtype=torch.float64, device=dev)
        self._m2 = torch.zeros(self.num_features, self.num_features, dtype=torch.float64, device=dev)
        self._fixed_covariance: torch.Tensor | None = None  # set by load() of a file without a count
        # the covariance a file held, returned as read (bit for bit) until new features change the state: the
        # scatter is stored as sigma * (n - 1), and dividing that by n - 1 again can move the last bit
        self._loaded_covariance: torch.Tensor | None = None

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def count(self) -> int | None:
        """The number of feature vectors seen (``None`` for statistics loaded from a file without a count)."""
        return None if self._fixed_covariance is not None else self._n

    @property
    def device(self) -> torch.device:
        """The device of the state."""
        return self._mean.device

    @property
    def mean(self) -> torch.Tensor:
        """The float64 mean ``(D,)``."""
        return self._mean.clone()

    @property
    def covariance(self) -> torch.Tensor:
        """The unbiased float64 covariance ``(D, D)``: ``M2 / (n - 1)``, as ``np.cov(x, rowvar=False)``.

        Raises:
            ShapeError: Fewer than 2 feature vectors were seen.
        """
        if self._fixed_covariance is not None:
            return self._fixed_covariance.clone()
        if self._loaded_covariance is not None:
            return self._loaded_covariance.clone()
        if self._n < 2:
            raise ShapeError(
                f"The covariance needs at least 2 feature vectors, but {self._n} were seen. Pass more images "
                "to update() (FID needs thousands for a meaningful number).",
                name="features",
                expected=">= 2 samples",
                actual=self._n,
            )
        return self._m2 / (self._n - 1)

    def _check_mutable(self, what: str) -> None:
        if self._fixed_covariance is not None:
            raise OptionError(
                f"Cannot {what}: these statistics were loaded from a file without a `count` (a clean-fid / "
                "pytorch-fid reference .npz holds only mu and sigma), so new features cannot be weighted "
                "against them. Accumulate into a new FeatureStatistics instead."
            )

    def _fold(self, m: int, batch_mean: torch.Tensor, batch_m2: torch.Tensor) -> None:
        """Chan et al.'s pairwise update with a batch of ``m`` vectors (mean, centred scatter)."""
        if m == 0:
            return
        self._loaded_covariance = None
        n = self._n
        total = n + m
        delta = batch_mean - self._mean
        self._mean = self._mean + delta * (m / total)
        self._m2 = self._m2 + batch_m2 + torch.outer(delta, delta) * (n * m / total)
        self._n = total

    def update(self, features: torch.Tensor) -> FeatureStatistics:
        """Fold a batch of features into the statistics (in float64, whatever the input dtype).

        Args:
            features: ``(N, D)`` floating-point features.

        Returns:
            ``self``, for chaining.

        Raises:
            DTypeError: ``features`` is not a floating-point tensor.
            ShapeError: ``features`` is not ``(N, D)`` with this object's ``D``, or is empty.
            NonFiniteError: ``features`` holds NaN or Inf (value checks on).
            OptionError: The statistics were loaded without a count.
        """
        x = check_float_input(features, "features", ndim=2, layout="(N, D)")
        if x.shape[1] != self.num_features:
            raise ShapeError(
                f"Expected `features` to have {self.num_features} columns (the feature dimension these "
                f"statistics were created with), but got shape {tuple(x.shape)}.",
                name="features",
                expected=(None, self.num_features),
                actual=tuple(x.shape),
            )
        self._check_mutable("update them")
        if self._lazy_device and self._n == 0 and x.device != self.device:
            self._mean, self._m2 = self._mean.to(x.device), self._m2.to(x.device)
        x = x.detach().to(device=self.device, dtype=torch.float64)
        batch_mean = x.mean(dim=0)
        centred = x - batch_mean
        self._fold(x.shape[0], batch_mean, centred.T @ centred)
        return self

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Fold another set of statistics into this one (Chan et al.'s pairwise formula).

        Merging the statistics of two shards equals one pass over their union up to float64 rounding.

        Args:
            other: Statistics of the same feature dimension.

        Returns:
            ``self``, for chaining.

        Raises:
            DTypeError: ``other`` is not a :class:`FeatureStatistics`.
            ShapeError: The feature dimensions differ.
            OptionError: Either side was loaded without a count.
        """
        if not isinstance(other, FeatureStatistics):
            raise DTypeError(
                f"Expected `other` to be a FeatureStatistics, but got {type(other).__name__}. Build one with "
                "FeatureStatistics(num_features).update(features)."
            )
        if other.num_features != self.num_features:
            raise ShapeError(
                f"Cannot merge statistics of {other.num_features} features into statistics of "
                f"{self.num_features} features. Use the same feature extractor for both.",
                name="other",
                expected=self.num_features,
                actual=other.num_features,
            )
        self._check_mutable("merge into them")
        other._check_mutable("merge them")
        if self._lazy_device and self._n == 0 and other.device != self.device:
            self._mean, self._m2 = self._mean.to(other.device), self._m2.to(other.device)
        self._fold(other._n, other._mean.to(self.device), other._m2.to(self.device))
        return self

    def all_reduce(self, group: Any = None) -> FeatureStatistics:
        """Replace the state by the statistics of all processes' features together (in place).

        A no-op unless a ``torch.distributed`` process group is initialised. Every process must call it (it is
        a collective), once, after its last :meth:`update`: a second call would count every feature again.
        The pooled mean ``K`` is all-reduced first (``sum n_r mean_r / sum n_r``); each process then re-centres
        its state on ``K`` and the sums ``sum n_r``, ``S1 = sum n_r (mean_r - K)`` and
        ``S2 = sum M2_r + n_r (mean_r - K)(mean_r - K)^T`` are all-reduced, giving ``mean = K + S1 / n`` and
        ``M2 = S2 - S1 S1^T / n`` (``S1`` is zero up to rounding, so nothing cancels).

        Args:
            group: The process group (``None``: the default group).

        Returns:
            ``self``, for chaining.

        Raises:
            OptionError: The statistics were loaded without a count.
        """
        if not is_distributed(group):
            return self
        self._check_mutable("all-reduce them")
        d = self.num_features
        first = torch.cat(
            [torch.tensor([float(self._n)], dtype=torch.float64, device=self.device), self._mean * self._n]
        )
        first = all_reduce_sum(first, group)
        total = round(float(first[0]))
        if total == 0:
            return self
        self._loaded_covariance = None
        pooled = first[1:] / total
        offset = self._mean - pooled
        s1 = offset * self._n
        s2 = self._m2 + torch.outer(offset, offset) * self._n
        second = all_reduce_sum(torch.cat([s1, s2.reshape(-1)]), group)
        s1, s2 = second[:d], second[d:].reshape(d, d)
        self._n = total
        self._mean = pooled + s1 / total
        self._m2 = s2 - torch.outer(s1, s1) / total
        return self

    # -- files -------------------------------------------------------------------------------------------------
    def sha256(self) -> str:
        """The identity of the statistics FID uses: SHA-256 of the float64 mean and covariance bytes.

        Exactly ``sha256(mu.astype("<f8").tobytes() + sigma.astype("<f8").tobytes()).hexdigest()`` (C order,
        little-endian float64, whatever the platform), with ``mu`` = :attr:`mean` and ``sigma`` =
        :attr:`covariance`. It depends on the values only: the same statistics saved with or without a count,
        compressed or not, or given in memory hash the same (a clean-fid reference's float32 ``mu`` is hashed
        after the exact upcast to float64). Statistics accumulated from the same images on a different number of
        processes or in other batches can differ in the last bits, and then in the hash.

        Returns:
            64 lowercase hex digits.

        Raises:
            ShapeError: Fewer than 2 feature vectors were seen.
        """
        mu = self._mean.detach().cpu().numpy().astype("<f8")
        sigma = self.covariance.detach().cpu().numpy().astype("<f8")
        return hashlib.sha256(
            np.ascontiguousarray(mu).tobytes() + np.ascontiguousarray(sigma).tobytes()
        ).hexdigest()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``mu``, ``sigma`` (as clean-fid's reference statistics) and ``count`` to an ``.npz`` file.

        The file is written at exactly ``path``: no ``.npz`` is appended when the name lacks it (``np.savez`` of a
        name would append one), so that ``save(path)``, :meth:`load` ``(path)``, ``FID(reference=path)`` and
        anything else that names the file (a hash of it, a ``<path>.json`` beside it) all see the same file.

        Args:
            path: The file to write.

        Raises:
            ShapeError: Fewer than 2 feature vectors were seen.
        """
        mu = self._mean.cpu().numpy()
        sigma = self.covariance.cpu().numpy()
        with open(path, "wb") as file:  # a file object: numpy writes there and appends no suffix
            np.savez(file, mu=mu, sigma=sigma, count=np.int64(-1 if self.count is None else self.count))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureStatistics:
        """Read an ``.npz`` of ``mu`` / ``sigma`` (ours, clean-fid's or pytorch-fid's reference statistics).

        Files written by :meth:`save` also hold ``count``, so the result can be updated and merged; files
        without it (clean-fid / pytorch-fid references) give fixed statistics (``count`` is ``None``).

        Args:
            path: The ``.npz`` file.

        Returns:
            The statistics.

        Raises:
            FileNotFoundError: ``path`` does not exist (the message names ``path + ".npz"`` when that exists:
                what ``np.savez`` writes for a name without the suffix).
            ShapeError: ``mu`` is not ``(D,)`` or ``sigma`` is not ``(D, D)``, or a key is missing.
        """
        path = Path(path)
        if not path.exists():
            suffixed = Path(f"{path}.npz")
            hint = (
                f" `{suffixed}` exists (np.savez appends .npz to a name without it): pass that path."
                if suffixed.is_file()
                else ""
            )
            raise FileNotFoundError(
                f"No feature statistics at `{path}`.{hint} Write them with FeatureStatistics.save() or pass a "
                "clean-fid / pytorch-fid reference .npz file."
            )
        with np.load(path) as data:
            missing = [k for k in ("mu", "sigma") if k not in data.files]
            if missing:
                raise ShapeError(
                    f"`{path}` lacks the key(s) {missing}: expected an .npz with `mu` (D,) and `sigma` (D, D) as "
                    f"clean-fid and pytorch-fid write them; it holds {sorted(data.files)}.",
                    name="path",
                    expected=["mu", "sigma"],
                    actual=sorted(data.files),
                )
            mu = np.asarray(data["mu"], dtype=np.float64)
            sigma = np.asarray(data["sigma"], dtype=np.float64)
            count = int(data["count"]) if "count" in data.files else -1
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ShapeError(
                f"`{path}` holds mu of shape {mu.shape} and sigma of shape {sigma.shape}; expected (D,) and (D, D).",
                name="path",
                expected="(D,) and (D, D)",
                actual=(mu.shape, sigma.shape),
            )
        stats = cls(mu.shape[0])
        stats._lazy_device = False
        stats._mean = torch.from_numpy(mu.copy())
        if count >= 2:
            stats._n = count
            stats._m2 = torch.from_numpy(sigma * (count - 1))
            stats._loaded_covariance = torch.from_numpy(sigma.copy())
        else:
            stats._fixed_covariance = torch.from_numpy(sigma.copy())
        return stats

    def __repr__(self) -> str:
        return (
            f"FeatureStatistics(num_features={self.num_features}, count={self.count}, device={self.device})"
        )


def _as_float64_numpy(x: Any, name: str, ndim: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        arr = x.detach().to("cpu", torch.float64).numpy()
    elif isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
            raise DTypeError(f"Expected `{name}` to hold real numbers, but got dtype {x.dtype}.")
        arr = x.astype(np.float64)
    else:
        raise DTypeError(
            f"Expected `{name}` to be a numpy array or a torch.Tensor, but got {type(x).__name__}. Pass the "
            "statistics' mean / covariance (FeatureStatistics.mean / .covariance)."
        )
    if arr.ndim != ndim:
        layout = "(D,)" if ndim == 1 else "(D, D)"
        raise ShapeError(
            f"Expected `{name}` to have {ndim} dimension(s) laid out as {layout}, but got shape {arr.shape}.",
            name=name,
            expected=layout,
            actual=arr.shape,
        )
    return arr


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, *, eps: float = 1e-6) -> float:
    """The Fréchet distance between two Gaussians, in float64, as clean-fid and pytorch-fid compute it.

    .. math::

        d^2 = \\lVert \\mu_1 - \\mu_2 \\rVert^2 + \\operatorname{Tr}(\\Sigma_1) + \\operatorname{Tr}(\\Sigma_2)
              - 2 \\operatorname{Tr}\\big((\\Sigma_1 \\Sigma_2)^{1/2}\\big)

    (Heusel et al. 2017, Eq. 6; Dowson & Landau 1982). The matrix square root is ``scipy.linalg.sqrtm`` of the
    product, as in both reference implementations; when it is not finite (a singular product) ``eps`` is added
    to both diagonals and it is retried, and a negligible imaginary part from rounding is dropped (a large one
    raises).

    Args:
        mu1: Mean ``(D,)`` of the first set (numpy or torch).
        sigma1: Covariance ``(D, D)`` of the first set.
        mu2: Mean ``(D,)`` of the second set.
        sigma2: Covariance ``(D, D)`` of the second set.
        eps: Diagonal offset used only when the product is singular.

    Returns:
        The squared Fréchet distance (what papers call FID) as a Python float.

    Raises:
        DTypeError: An argument is not a real numpy array / tensor.
        ShapeError: The shapes are not ``(D,)`` / ``(D, D)`` with one ``D``.
        OptionError: ``eps`` is not positive.
        NonFiniteError: The matrix square root has a large imaginary part (the covariances are not PSD).
        MissingDependencyError: scipy is not installed.

    Example:
        >>> from diffdistill.metrics import frechet_distance
        >>> mu, sigma = torch.zeros(2), torch.eye(2)
        >>> round(frechet_distance(mu, sigma, mu + 1, 4 * sigma), 6)  # 2 + (1 + 4 - 2 * 2) * 2
        4.0
    """
    from .._checks import check_positive

    check_positive(eps, "eps")
    m1, s1 = _as_float64_numpy(mu1, "mu1", 1), _as_float64_numpy(sigma1, "sigma1", 2)
    m2, s2 = _as_float64_numpy(mu2, "mu2", 1), _as_float64_numpy(sigma2, "sigma2", 2)
    d = m1.shape[0]
    for name, arr, want in (("sigma1", s1, (d, d)), ("mu2", m2, (d,)), ("sigma2", s2, (d, d))):
        if arr.shape != want:
            raise ShapeError(
                f"Expected `{name}` to have shape {want} to match `mu1` {m1.shape}, but got {arr.shape}. Both "
                "statistics must come from the same feature extractor.",
                name=name,
                expected=want,
                actual=arr.shape,
            )
    linalg = _require("scipy.linalg", "scipy", "frechet_distance")
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        logger.warning(
            "FID: sigma1 @ sigma2 is singular; adding %g to the diagonal of both covariances.", eps
        )
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if imag > 1e-3:
            from ..errors import NonFiniteError

            raise NonFiniteError(
                f"The square root of sigma1 @ sigma2 has an imaginary diagonal part up to {imag:.3g} (the "
                "reference implementations' tolerance is 1e-3): the covariances are not positive semi-definite. "
                "Check that they were estimated from enough samples (more than the feature dimension)."
            )
        covmean = covmean.real
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_statistics(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """FID between two sets of :class:`FeatureStatistics` (:func:`frechet_distance` of their moments).

    Args:
        a: Statistics of the first image set.
        b: Statistics of the second image set (e.g. the reference).

    Returns:
        The FID as a Python float.

    Raises:
        DTypeError: ``a`` or ``b`` is not a :class:`FeatureStatistics`.
        ShapeError: The feature dimensions differ, or a set has fewer than 2 samples.

    Example:
        >>> from diffdistill.metrics import FeatureStatistics, fid_from_statistics
        >>> x = torch.randn(50, 4, dtype=torch.float64)
        >>> stats = FeatureStatistics(4).update(x)
        >>> abs(fid_from_statistics(stats, stats)) < 1e-9
        True
    """
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, FeatureStatistics):
            raise DTypeError(
                f"Expected `{name}` to be a FeatureStatistics, but got {type(value).__name__}. Build one with "
                "FeatureStatistics(num_features).update(features) or FeatureStatistics.load(path)."
            )
    return frechet_distance(a.mean, a.covariance, b.mean, b.covariance)


def check_float_images(images: Any, hint: str) -> torch.Tensor:
    """Float RGB images ``(N, 3, H, W)`` in ``[0, 1]`` (the range check is a value check).

    Args:
        images: The value the caller passed.
        hint: The last sentence of the layout error (how to fix it).

    Returns:
        ``images``, typed as a tensor.

    Raises:
        DTypeError: ``images`` is not a floating-point tensor.
        ShapeError: ``images`` is not ``(N, 3, H, W)`` or is empty.
        OptionError: ``images`` lie outside ``[0, 1]`` (value checks on).
    """
    x = check_float_input(images, "images", ndim=4, layout="(N, 3, H, W)")
    if x.shape[1] != 3:
        raise ShapeError(
            f"Expected float `images` laid out as (N, 3, H, W) with 3 (RGB) channels, but got shape "
            f"{tuple(x.shape)}. {hint}.",
            name="images",
            expected="(N, 3, H, W)",
            actual=tuple(x.shape),
        )
    check_unit_range(x, "images", "image")
    return x


def check_unit_range(x: torch.Tensor, name: str, processor: str) -> None:
    """The value check of float pixels: ``x`` within ``[0, 1]`` (with value checks on).

    Args:
        x: The float tensor.
        name: Its argument name (``images``, ``videos``).
        processor: Which diffusers processor maps ``[-1, 1]`` outputs the same way (``image``, ``video``).

    Raises:
        OptionError: ``x`` lies outside ``[0, 1]``, naming the range found and the map from ``[-1, 1]``.
    """
    if value_checks_enabled():
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise OptionError(
                f"Expected float `{name}` in [0, 1], but they range over [{lo:.4g}, {hi:.4g}]. Map [-1, 1] "
                f"outputs with ({name} / 2 + 0.5).clamp(0, 1), as diffusers' {processor} processor does."
            )


def _images_to_uint8_hwc(images: Any, quantize: bool) -> np.ndarray:
    """``(N, H, W, 3)`` numpy images in [0, 255] (uint8, or float32 when ``quantize`` is False)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise DTypeError(
                f"Expected numpy `images` to be uint8 (N, H, W, 3), but got dtype {images.dtype}. Pass float "
                "images as a torch tensor (N, 3, H, W) in [0, 1]."
            )
        images = torch.from_numpy(images)
    check_tensor(images, "images")
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ShapeError(
                f"Expected uint8 `images` laid out as (N, H, W, 3) (as read from image files), but got shape "
                f"{tuple(images.shape)}. Float images are (N, 3, H, W) in [0, 1].",
                name="images",
                expected="(N, H, W, 3)",
                actual=tuple(images.shape),
            )
        if images.shape[0] == 0:
            raise ShapeError(
                "Expected `images` to hold at least one image, but got an empty batch.", name="images"
            )
        return images.detach().cpu().numpy()
    x = check_float_images(images, "uint8 images are (N, H, W, 3)")
    x = x.detach().float().cpu().permute(0, 2, 3, 1) * 255.0
    if quantize:
        return x.round().clamp(0, 255).to(torch.uint8).numpy()
    return x.numpy()


def _num_threads(value: int | None) -> int:
    if value is None:
        return min(8, os.cpu_count() or 1)
    return check_int(value, "num_threads", minimum=1)


def clean_resize(images: Any, *, quantize: bool = True, num_threads: int | None = None) -> torch.Tensor:
    """clean-fid's "clean" preprocessing: each channel resized to 299x299 by PIL bicubic in float.

    This is ``cleanfid.resize.make_resizer("PIL", False, "bicubic", (299, 299))`` (what
    ``cleanfid.resize.build_resizer("clean")`` returns; Parmar et al. 2022, Sec. 4), applied image by image, and
    the result laid out channels-first as clean-fid's data loader hands it to the Inception network.

    Input layouts:

    * ``uint8`` ``(N, H, W, 3)`` (torch or numpy), as read from image files (clean-fid's folder path);
    * float ``(N, 3, H, W)`` in ``[0, 1]`` (a pipeline's output). With ``quantize=True`` (the default, our
      choice) it is first rounded to uint8 as saving a PNG does (``(x * 255).round()``, diffusers'
      ``numpy_to_pil``), so images scored in memory give the same features as the same images written to a
      folder and read back; ``quantize=False`` feeds ``x * 255`` unrounded, as clean-fid's ``fid_model`` path
      does with a generator's float output.

    Args:
        images: The images, in one of the layouts above.
        quantize: Whether float images are rounded to uint8 first.
        num_threads: Threads resizing images in parallel (PIL releases the GIL while resizing; clean-fid
            parallelises the same work with DataLoader workers). ``None``: ``min(8, os.cpu_count())``. The
            result does not depend on it.

    Returns:
        float32 ``(N, 3, 299, 299)`` on the CPU, values in ``[0, 255]``.

    Raises:
        DTypeError: ``images`` is neither a uint8 nor a float tensor / uint8 array.
        ShapeError: The layout is not one of the above, or the batch is empty.
        OptionError: Float images lie outside ``[0, 1]`` (value checks on), or ``num_threads`` < 1.
        NonFiniteError: Float images hold NaN or Inf (value checks on).
        MissingDependencyError: clean-fid (or PIL) is not installed.

    Example:
        >>> from diffdistill.metrics import clean_resize
        >>> clean_resize(torch.rand(2, 3, 64, 48)).shape
        torch.Size([2, 3, 299, 299])
    """
    check_bool(quantize, "quantize")
    threads = _num_threads(num_threads)
    arrays = _images_to_uint8_hwc(images, quantize)
    resize = _require("cleanfid.resize", "clean-fid", "clean_resize")
    fn = resize.make_resizer("PIL", False, "bicubic", CLEAN_FID_SIZE)
    if threads > 1 and len(arrays) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(threads, len(arrays))) as pool:
            resized = list(pool.map(fn, arrays))
    else:
        resized = [fn(img) for img in arrays]
    out = np.stack(resized)  # (N, 299, 299, 3) float32
    return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))


class InceptionFeatures(nn.Module):
    """clean-fid's Inception-v3 feature extractor in "clean" mode: images in, 2048-d pool features out.

    ``forward`` applies :func:`clean_resize` and then the network ``cleanfid.features.build_feature_extractor
    ("clean")`` builds: the TorchScript Inception of StyleGAN2-ADA / clean-fid
    (``inception-2015-12-05.pt``, a port of the TensorFlow FID network of Heusel et al. 2017) without its
    internal resize, on inputs normalised as ``(x - 128) / 128``. We construct clean-fid's own wrapper
    (``cleanfid.inception_torchscript.InceptionV3W``) directly rather than through ``build_feature_extractor``
    so that the network is a module that ``.to(device)`` moves (the same object, without DataParallel).

    The network is loaded on first use, not at construction: ``import`` and construction never download. The
    first ``forward`` downloads ``inception-2015-12-05.pt`` into ``weights_dir`` when it is not there yet (as
    clean-fid does, into the system temporary folder by default).

    Args:
        weights_dir: Folder holding (or receiving) ``inception-2015-12-05.pt``; ``None``: the system temporary
            folder (``/tmp`` on Linux, where clean-fid itself puts it).
        quantize: Passed to :func:`clean_resize` for float images.
        num_threads: Passed to :func:`clean_resize` (``None``: ``min(8, os.cpu_count())``).

    Raises:
        DTypeError: ``quantize`` is not a bool or ``num_threads`` not an integer.
        OptionError: ``num_threads`` < 1.

    Example:
        >>> from diffdistill.metrics import InceptionFeatures
        >>> net = InceptionFeatures()  # nothing is loaded yet
        >>> net.loaded
        False
    """

    num_features = 2048

    def __init__(
        self,
        weights_dir: str | os.PathLike[str] | None = None,
        *,
        quantize: bool = True,
        num_threads: int | None = None,
    ) -> None:
        super().__init__()
        self.weights_dir = Path(tempfile.gettempdir() if weights_dir is None else weights_dir)
        self.quantize = check_bool(quantize, "quantize")
        self.num_threads = _num_threads(num_threads)
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        self.net: nn.Module | None = None

    @property
    def loaded(self) -> bool:
        """Whether the network has been loaded."""
        return self.net is not None

    def load(self) -> nn.Module:
        """Load (downloading once if needed) clean-fid's TorchScript Inception onto this module's device.

        Returns:
            The network (``cleanfid.inception_torchscript.InceptionV3W``).

        Raises:
            MissingDependencyError: clean-fid is not installed.
        """
        if self.net is None:
            module = _require("cleanfid.inception_torchscript", "clean-fid", "InceptionFeatures")
            self.weights_dir.mkdir(parents=True, exist_ok=True)
            present = (self.weights_dir / INCEPTION_FILE).exists()
            if not present:
                logger.info("Downloading clean-fid's Inception weights into %s", self.weights_dir)
            net = module.InceptionV3W(str(self.weights_dir), download=not present, resize_inside=False)
            self.net = net.eval().requires_grad_(False).to(self.get_buffer("_device_anchor").device)
        return self.net

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Frozen: stays in eval mode whatever ``mode`` is (DESIGN.md convention 6).

        Args:
            mode: Ignored.

        Returns:
            ``self``.
        """
        return super().train(False)

    def forward(self, images: Any) -> torch.Tensor:
        """Features of a batch of images.

        Args:
            images: uint8 ``(N, H, W, 3)`` or float ``(N, 3, H, W)`` in ``[0, 1]`` (see :func:`clean_resize`).

        Returns:
            float32 ``(N, 2048)`` pool features, on this module's device.

        Raises:
            DTypeError: See :func:`clean_resize`.
            ShapeError: See :func:`clean_resize`.
            MissingDependencyError: clean-fid is not installed.
        """
        x = clean_resize(images, quantize=self.quantize, num_threads=self.num_threads)
        net = self.load()
        with torch.no_grad():
            return net(x.to(self.get_buffer("_device_anchor").device)).float()


def checked_extractor(extractor: Callable[[Any], torch.Tensor] | None) -> Callable[[Any], torch.Tensor]:
    """A metric's ``feature_extractor`` argument: ``None`` builds :class:`InceptionFeatures`; else it must be callable.

    Args:
        extractor: The argument.

    Returns:
        The extractor.

    Raises:
        DTypeError: ``extractor`` is neither None nor callable.
    """
    if extractor is None:
        return InceptionFeatures()
    if not callable(extractor):
        raise DTypeError(
            f"Expected `feature_extractor` to be callable (images -> (N, D) features), but got "
            f"{type(extractor).__name__}."
        )
    return extractor


def extract_features(extractor: Callable[[Any], torch.Tensor], images: Any) -> torch.Tensor:
    """``extractor(images)`` without gradients, a module in eval mode for the call (its mode restored after).

    Args:
        extractor: A callable mapping a batch of images to ``(N, D)`` features.
        images: The batch, in the layout ``extractor`` takes.

    Returns:
        The features ``(N, D)``.

    Raises:
        DTypeError: The extractor returned no floating tensor.
        ShapeError: The extractor returned other than ``(N, D)``.
    """
    was_training = isinstance(extractor, nn.Module) and extractor.training
    if isinstance(extractor, nn.Module):
        extractor.eval()
    with torch.no_grad():
        feats = extractor(images)
    if isinstance(extractor, nn.Module) and was_training:
        extractor.train()
    return check_float_input(feats, "feature_extractor(images)", ndim=2, layout="(N, D)")


def _describe_extractor(extractor: Callable[..., Any]) -> str:
    if isinstance(extractor, InceptionFeatures):
        rounding = "float images rounded to uint8 first" if extractor.quantize else "float images unrounded"
        return (
            "clean-fid InceptionV3W (inception-2015-12-05.pt), clean resize (PIL bicubic 299, float), "
            + rounding
        )
    return getattr(extractor, "__qualname__", type(extractor).__qualname__)


class FID:
    """Fréchet Inception Distance accumulated over batches (torchmetrics-like: update / compute / reset).

    Generated images go to ``update(images)``; the reference is either given (``reference``: statistics or
    the path of an ``.npz``, e.g. clean-fid's COCO statistics) or accumulated with ``update(images,
    real=True)``. Features are summarised in float64 by :class:`FeatureStatistics`, so memory does not grow
    with the number of images; on several processes, call :meth:`all_reduce` on every process after the last
    update and then :meth:`compute`.

    Args:
        feature_extractor: A callable mapping a batch of images to ``(N, D)`` features; ``None`` builds
            :class:`InceptionFeatures` (clean-fid's "clean" mode, loaded lazily). Tests and the toy demo pass
            their own small network.
        reference: Reference statistics, an ``.npz`` path (:meth:`FeatureStatistics.load`), or ``None`` to
            accumulate the reference with ``update(..., real=True)``.

    Raises:
        DTypeError: ``feature_extractor`` is not callable, or ``reference`` is neither statistics nor a path.
        FileNotFoundError: ``reference`` is a path that does not exist.

    Example:
        >>> from diffdistill.metrics import FID
        >>> extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
        >>> fid = FID(extractor)
        >>> images = torch.rand(32, 3, 8, 8)
        >>> fid.update(images, real=True)
        >>> fid.update(images)
        >>> abs(fid.compute()) < 1e-6  # a set against itself
        True
    """

    def __init__(
        self,
        feature_extractor: Callable[[Any], torch.Tensor] | None = None,
        reference: FeatureStatistics | str | os.PathLike[str] | None = None,
    ) -> None:
        self.feature_extractor = checked_extractor(feature_extractor)
        self.reference_file: str | None = None  # the file name, when `reference` was a path
        if reference is None or isinstance(reference, FeatureStatistics):
            self.reference = reference
        elif isinstance(reference, (str, os.PathLike)):
            self.reference = FeatureStatistics.load(reference)
            self.reference_file = Path(reference).name
        else:
            raise DTypeError(
                f"Expected `reference` to be FeatureStatistics, the path of an .npz of mu / sigma, or None, but "
                f"got {type(reference).__name__}."
            )
        self.fake: FeatureStatistics | None = None
        self.real: FeatureStatistics | None = None

    def _features(self, images: Any) -> torch.Tensor:
        return extract_features(self.feature_extractor, images)

    def update(self, images: Any, real: bool = False) -> None:
        """Extract the features of a batch and fold them into the generated (or reference) statistics.

        Args:
            images: A batch in the layout the feature extractor takes (:class:`InceptionFeatures`: uint8
                ``(N, H, W, 3)`` or float ``(N, 3, H, W)`` in ``[0, 1]``).
            real: ``True`` for reference images (only when no ``reference`` was given).

        Raises:
            DTypeError: ``real`` is not a bool, or the extractor returned no floating tensor.
            ShapeError: The extractor returned other than ``(N, D)``, or another ``D`` than before.
            OptionError: ``real=True`` while fixed ``reference`` statistics were given.
        """
        check_bool(real, "real")
        if real and self.reference is not None:
            raise OptionError(
                "update(images, real=True) was called, but this FID was built with fixed `reference` statistics. "
                "Either drop `reference` to accumulate the reference from images, or only pass generated images."
            )
        feats = self._features(images)
        target = self.real if real else self.fake
        if target is None:
            target = FeatureStatistics(feats.shape[1])
            if real:
                self.real = target
            else:
                self.fake = target
        target.update(feats)

    def all_reduce(self, group: Any = None) -> None:
        """All-reduce the accumulated statistics over processes (see :meth:`FeatureStatistics.all_reduce`).

        Call it on every process, once, after the last :meth:`update`; a no-op without a process group. A
        process that saw no images of a kind takes part with empty statistics (the feature dimension is agreed
        on first, by an all-reduce of the dimensions).

        Args:
            group: The process group (``None``: the default group).
        """
        if not is_distributed(group):
            return
        import torch.distributed as dist

        from ._dist import _backend_device

        dims = torch.tensor(
            [0 if s is None else s.num_features for s in (self.fake, self.real)],
            dtype=torch.int64,
            device=_backend_device(group),
        )
        dist.all_reduce(dims, op=dist.ReduceOp.MAX, group=group)
        d_fake, d_real = (int(v) for v in dims.tolist())
        if self.fake is None and d_fake:
            self.fake = FeatureStatistics(d_fake)
        if self.real is None and d_real:
            self.real = FeatureStatistics(d_real)
        for stats in (self.fake, self.real):
            if stats is not None:
                stats.all_reduce(group)

    def compute(self) -> float:
        """FID of the generated images against the reference.

        Returns:
            The FID (float64 arithmetic) as a Python float.

        Raises:
            OptionError: No generated images, or no reference (neither given nor accumulated).
            ShapeError: Fewer than 2 images on a side, or different feature dimensions.
        """
        if self.fake is None:
            raise OptionError("FID.compute() before any update(images): pass generated images first.")
        reference = self.reference if self.reference is not None else self.real
        if reference is None:
            raise OptionError(
                "FID.compute() has no reference: pass `reference` statistics / an .npz path to FID(...), or "
                "update(images, real=True) with reference images."
            )
        return fid_from_statistics(self.fake, reference)

    def reset(self) -> None:
        """Forget the accumulated generated and real statistics (fixed ``reference`` statistics are kept)."""
        self.fake = None
        self.real = None

    def protocol(self) -> dict[str, Any]:
        """What a protocol record should hold about this metric (see :class:`EvaluationProtocol`).

        The reference set moves FID by points (COCO-2014 val 30k against a 10k subset, 512 against 1024 px
        reference images), so given reference statistics are identified in the record and
        :func:`~diffdistill.metrics.check_comparable` refuses runs scored against different ones:

        * ``reference_sha256``: :meth:`FeatureStatistics.sha256` of the reference (its float64 mean and
          covariance), read when this method is called;
        * ``reference_count``: the number of images behind it, when the statistics know it (statistics in
          memory and :meth:`FeatureStatistics.save` files; clean-fid / pytorch-fid files do not hold it);
        * ``reference_file``: the file's name (not its folder), when ``reference`` was a path. It is compared
          like everything else; for a renamed copy of the same file pass
          ``ignore=["generator", "backbones.fid.reference_file"]`` (the hash still has to agree).

        A reference accumulated with ``update(images, real=True)`` is recorded as ``"accumulated from images"``
        only: the statistics of the same images differ in the last bits with the batching and the number of
        processes, so the caller identifies the images (as ``examples/evaluate.py`` does with their file list).
        The counts of generated images are results, not protocol, and are left out (the prompt count is the
        protocol's).

        A feature extractor other than :class:`InceptionFeatures` (whose file is clean-fid's published one) is
        named by its class and, when it is an ``nn.Module``, identified by its weights
        (``feature_extractor_sha256``, :func:`~diffdistill.metrics.protocol.module_sha256`, hashed once).

        Returns:
            ``{"metric": "fid", "feature_extractor": ..., "reference": ...}``, plus the ``reference_*`` entries
            above for given statistics and ``feature_extractor_sha256`` for a custom module.

        Raises:
            ShapeError: The given reference statistics hold fewer than 2 feature vectors.
        """
        out: dict[str, Any] = {
            "metric": "fid",
            "feature_extractor": _describe_extractor(self.feature_extractor),
            "reference": "given statistics" if self.reference is not None else "accumulated from images",
        }
        extractor = self.feature_extractor
        own_hash = isinstance(extractor, InceptionFeatures) or hasattr(extractor, "sha256")  # FVD's I3D file
        if isinstance(extractor, nn.Module) and not own_hash:
            out["feature_extractor_sha256"] = module_sha256(extractor)  # another network of the same class
        if self.reference is not None:
            out["reference_sha256"] = self.reference.sha256()
            if self.reference.count is not None:
                out["reference_count"] = self.reference.count
            if self.reference_file is not None:
                out["reference_file"] = self.reference_file
        return out
