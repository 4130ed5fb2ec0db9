"""A download-free quality metric for the toy demo: a small CNN classifier trained on the shapes data, used
through the library's evaluation interface (:mod:`diffdistill.metrics`, issue 25).

:func:`train_classifier` fits it from a seed in a few seconds. Its penultimate-layer features are the FD's
feature extractor, exactly as Inception's pool features are FID's: :func:`reference_statistics` folds the
real images' features into a :class:`~diffdistill.metrics.FeatureStatistics`, and :func:`evaluate_samples`
returns the Fréchet distance of the generated images' features to them (:class:`~diffdistill.metrics.FID`
with this extractor: an FID-style distance, lower is better) and the class accuracy of the generated images
(does a sample of class ``y`` look like a ``y``; higher is better). :func:`classifier_protocol` is what an
:class:`~diffdistill.metrics.EvaluationProtocol` records about it, so ``make demo``'s ``results.json`` reads
like ``examples/evaluate.py``'s.
"""

from __future__ import annotations

import hashlib

import torch
from shapes import NUM_CLASSES, sample_shapes
from torch import nn

from diffdistill.metrics import FID, FeatureStatistics, precision_recall

__all__ = [
    "COVERAGE_K",
    "ShapeClassifier",
    "classifier_protocol",
    "coverage_protocol",
    "evaluate_samples",
    "pixel_coverage",
    "reference_statistics",
    "train_classifier",
]


class ShapeClassifier(nn.Module):
    """conv(32) → pool → conv(64) → pool → conv(64) → global average → 32-d features → logits."""

    def __init__(self, feature_dim: int = 32) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The FD's features ``(N, feature_dim)`` of images ``x`` ``(N, 3, 16, 16)`` in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(seed: int = 0, steps: int = 300, batch: int = 64) -> ShapeClassifier:
    """Train :class:`ShapeClassifier` on fresh shapes (with pixel noise of a random level up to 0.3, so
    that imperfect samples still get meaningful features); deterministic given ``seed`` (and the number of
    torch threads). The seed and step count are kept on the network for :func:`classifier_protocol`."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ShapeClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        x, y = sample_shapes(batch, g)
        level = torch.rand(batch, 1, 1, 1, generator=g) * 0.3
        x = x + level * torch.randn(x.shape, generator=g)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    net.training_record = {"seed": seed, "steps": steps, "batch": batch}  # type: ignore[assignment]
    return net


def classifier_protocol(classifier: ShapeClassifier) -> dict[str, object]:
    """The feature extractor's identity for a protocol record: its architecture and feature size, how it was
    trained, and the SHA-256 of its weights (two runs compare only under the same classifier: its training
    is repeatable for a given seed and thread count)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(classifier.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return {
        "feature_extractor": "examples/toy ShapeClassifier.features (penultimate layer)",
        "feature_dim": classifier.feature_dim,
        "training": getattr(classifier, "training_record", None),
        "weights_sha256": digest.hexdigest(),
    }


@torch.no_grad()
def reference_statistics(classifier: ShapeClassifier, reference: torch.Tensor) -> FeatureStatistics:
    """Float64 feature statistics of the real ``reference`` images ``(N, 3, 16, 16)`` (the FD's reference)."""
    return FeatureStatistics(classifier.feature_dim).update(classifier.features(reference))


@torch.no_grad()
def evaluate_samples(
    classifier: ShapeClassifier,
    samples: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor | FeatureStatistics,
) -> dict[str, float]:
    """``{"fd": Fréchet feature distance to the reference, "acc": class accuracy}`` of ``samples``.

    ``samples`` are clamped to [-1, 1] (the images' range) for both numbers. ``reference`` is the real images
    or their :func:`reference_statistics` (computed once per evaluation by the demo). The FD is
    :class:`~diffdistill.metrics.FID` with the classifier's features as its extractor: float64 statistics
    and :func:`~diffdistill.metrics.frechet_distance` (Heusel et al. 2017, Eq. 6).
    """
    x = samples.clamp(-1, 1)
    acc = float((classifier(x).argmax(1) == labels).float().mean())
    if not isinstance(reference, FeatureStatistics):
        reference = reference_statistics(classifier, reference)
    fid = FID(feature_extractor=classifier.features, reference=reference)
    fid.update(x)
    return {"fd": fid.compute(), "acc": acc}


#: k of the coverage's balls (Naeem et al. 2020 recommend 5).
COVERAGE_K = 5


@torch.no_grad()
def pixel_coverage(samples: torch.Tensor, reference: torch.Tensor, nearest_k: int = COVERAGE_K) -> float:
    """Coverage (Naeem et al. 2020, arXiv:2002.09797; :func:`diffdistill.metrics.precision_recall`) of ``samples``
    over the real ``reference`` images, both ``(N, 3, 16, 16)``, in pixel space: the share of reference images whose
    ball (radius: the distance to their ``nearest_k``-th nearest other reference image) holds a sample.

    The FD's classifier features tell the shapes apart and hardly see colour, position or size: samples of one
    hue, or 64 real images repeated, score an FD as low as a draw of real images (audit 15). Pixels see all of
    them. Measured (``sample_shapes`` from seed 0: 512 samples against 512 other real images, k = 5): another
    draw of real images 0.97 (for equal set sizes about 1 - 2^-k), one hue 0.41, 64 real images repeated 8 times
    0.44, real images plus noise of sd 0.2 0.71, real images blurred (3 x 3 mean) 0.97: a low coverage means
    missing variety (or noisy samples), not blur. As many reference images as samples keep the real-data value near
    1 - 2^-k. Samples are clamped to [-1, 1] as for the FD."""
    out = precision_recall(reference.flatten(1), samples.clamp(-1, 1).flatten(1), nearest_k)
    return out["coverage"]


def coverage_protocol(reference_count: int) -> dict[str, object]:
    """The coverage's entry of a protocol record."""
    return {
        "metric": "coverage (Naeem et al. 2020; diffdistill.metrics.precision_recall)",
        "features": "pixels (3 x 16 x 16), samples clamped to [-1, 1]",
        "nearest_k": COVERAGE_K,
        "reference_images": reference_count,
    }
