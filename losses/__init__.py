"""diffdistill.losses: loss families, one module each, as functional + ``nn.Module`` pairs."""

from __future__ import annotations

from .adversarial import (
    GANLoss,
    MixAndMatch,
    RenoisedSamples,
    gan_discriminator_loss,
    gan_generator_loss,
    lazy_r1_penalty,
    mix_and_match,
    r1_penalty,
    random_derangement,
    renoise_for_discriminator,
)
from .dice import DiceSemimetricLoss, dice_semimetric_loss
from .rewards import MPSHingeLoss, RewardHingeLoss, mps_hinge_loss, reward_hinge_loss
from .soft_labels import (
    boundary_label_smoothing,
    multi_rater_soft_labels,
    teacher_soft_labels,
    uniform_label_smoothing,
)

__all__: list[str] = [
    "DiceSemimetricLoss",
    "GANLoss",
    "MPSHingeLoss",
    "MixAndMatch",
    "RenoisedSamples",
    "RewardHingeLoss",
    "boundary_label_smoothing",
    "dice_semimetric_loss",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "lazy_r1_penalty",
    "mix_and_match",
    "mps_hinge_loss",
    "multi_rater_soft_labels",
    "r1_penalty",
    "random_derangement",
    "renoise_for_discriminator",
    "reward_hinge_loss",
    "teacher_soft_labels",
    "uniform_label_smoothing",
]
