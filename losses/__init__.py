"""diffdistill.losses: loss families, one module each, as functional + ``nn.Module`` pairs."""

from __future__ import annotations

from .dice import DiceSemimetricLoss, dice_semimetric_loss
from .soft_labels import (
    boundary_label_smoothing,
    multi_rater_soft_labels,
    teacher_soft_labels,
    uniform_label_smoothing,
)

__all__: list[str] = [
    "DiceSemimetricLoss",
    "boundary_label_smoothing",
    "dice_semimetric_loss",
    "multi_rater_soft_labels",
    "teacher_soft_labels",
    "uniform_label_smoothing",
]
