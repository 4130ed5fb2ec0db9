"""Evaluation metrics for distilled students, measured the way the papers measure them (issue 25).

* FID with clean-fid's resize and Inception (:class:`FID`, :class:`InceptionFeatures`, :func:`clean_resize`),
  on streaming float64 statistics that merge across batches and processes (:class:`FeatureStatistics`,
  :func:`frechet_distance`, :func:`fid_from_statistics`);
* CLIP score with a named open_clip or transformers backbone (:class:`CLIPScore`), and the frame consistency of
  videos on the same backbone (:class:`FrameConsistency`: the mean cosine of consecutive frames' CLIP embeddings);
* FVD on clips of the first 16 frames with StyleGAN-V's TorchScript I3D from a local file (:class:`FVD`,
  :class:`I3DFeatures`);
* precision and recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020) from k-nearest-neighbour
  balls in a feature space (:class:`PrecisionRecall`, :func:`precision_recall`): fidelity and diversity apart,
  where FID folds them into one number;
* preference scores (:class:`ImageRewardScore`, :class:`HPSv21Score`, :class:`PickScore`,
  :class:`AestheticScore`);
* the protocol record written beside every number, and the refusal to compare runs measured differently
  (:class:`EvaluationProtocol`, :func:`check_comparable`, :func:`hash_prompts`, :func:`package_versions`).

Every metric is an accumulator: ``update`` per batch, ``all_reduce`` once on every process of a
``torch.distributed`` run (a no-op otherwise), ``compute`` for the number, ``protocol`` for the record.
Importing this package imports only torch and numpy; clean-fid, open_clip, transformers, scipy and PIL are
imported by the functions that need them (``pip install diffdistill[eval]``).

Example:
    >>> import torch
    >>> from diffdistill.metrics import FID, FeatureStatistics
    >>> extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))  # a stand-in
    >>> reference = FeatureStatistics(16)
    >>> with torch.no_grad():
    ...     _ = reference.update(extractor(torch.rand(64, 3, 8, 8)))
    >>> fid = FID(extractor, reference=reference)
    >>> for _ in range(2):
    ...     fid.update(torch.rand(32, 3, 8, 8))
    >>> fid.compute() > 0
    True
"""

from __future__ import annotations

from ..errors import MissingDependencyError, ProtocolMismatchError
from .clip_score import CLIPScore
from .fid import (
    FID,
    FeatureStatistics,
    InceptionFeatures,
    clean_resize,
    fid_from_statistics,
    frechet_distance,
)
from .frame_consistency import FrameConsistency
from .fvd import FVD, I3DFeatures
from .precision_recall import PrecisionRecall, precision_recall
from .preference import AestheticMLP, AestheticScore, HPSPreprocess, HPSv21Score, ImageRewardScore, PickScore
from .protocol import EvaluationProtocol, check_comparable, hash_prompts, package_versions

__all__ = [
    "FID",
    "FVD",
    "AestheticMLP",
    "AestheticScore",
    "CLIPScore",
    "EvaluationProtocol",
    "FeatureStatistics",
    "FrameConsistency",
    "HPSPreprocess",
    "HPSv21Score",
    "I3DFeatures",
    "ImageRewardScore",
    "InceptionFeatures",
    "MissingDependencyError",
    "PickScore",
    "PrecisionRecall",
    "ProtocolMismatchError",
    "check_comparable",
    "clean_resize",
    "fid_from_statistics",
    "frechet_distance",
    "hash_prompts",
    "package_versions",
    "precision_recall",
]
