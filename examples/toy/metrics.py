"""A download-free quality metric for the toy demo: a small CNN classifier trained on the shapes data.

:func:`train_classifier` fits it from a seed in a few seconds; :func:`evaluate_samples` returns the
Fréchet distance between its penultimate-layer features of generated and real images (an FID-style
distance, lower is better) and the class accuracy of generated images (does a sample of class ``y``
look like a ``y``; higher is better).
"""

from __future__ import annotations

import torch
from shapes import NUM_CLASSES, sample_shapes
from torch import nn

__all__ = ["ShapeClassifier", "evaluate_samples", "frechet_distance", "train_classifier"]


class ShapeClassifier(nn.Module):
    """conv(32) → pool → conv(64) → pool → conv(64) → global average → 32-d features → logits."""

    def __init__(self, feature_dim: int = 32) -> None:
        super().__init__()
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
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(seed: int = 0, steps: int = 300, batch: int = 64) -> ShapeClassifier:
    """Train :class:`ShapeClassifier` on fresh shapes (with pixel noise of a random level up to 0.3, so
    that imperfect samples still get meaningful features); deterministic given ``seed``."""
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
    return net


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b`` ``(N, D)`` (float64)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(cov_a cov_b) from the eigenvalues of sqrt(cov_a) cov_b sqrt(cov_a) (symmetric PSD).
    ev, vec = torch.linalg.eigh(cov_a)
    sqrt_a = vec @ torch.diag(ev.clamp_min(0).sqrt()) @ vec.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


@torch.no_grad()
def evaluate_samples(
    classifier: ShapeClassifier, samples: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor
) -> dict[str, float]:
    """``{"fd": Fréchet feature distance to `reference` images, "acc": class accuracy}`` of ``samples``."""
    x = samples.clamp(-1, 1)
    acc = float((classifier(x).argmax(1) == labels).float().mean())
    fd = frechet_distance(classifier.features(x), classifier.features(reference))
    return {"fd": fd, "acc": acc}
