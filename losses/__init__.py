"""diffdistill.losses: loss families, one module each, as functional + ``nn.Module`` pairs.

Every loss that reads a noise schedule runs on variance-preserving (SD / SDXL) and rectified-flow (SD3, FLUX, Wan)
schedules alike: the networks a loss calls itself get the schedule's model timestep (the index for VP,
:math:`1000\\sigma` for SD3), as :class:`~diffdistill.schedulers.TeacherSolver` calls the teacher. Latents are
``(B, ...)``: image ``(B, C, H, W)`` and video ``(B, C, F, H, W)`` (Wan) alike, reduced per sample over every other
dimension; the image-only E-LatentLPIPS, ``LatentAugment`` and ``PixelLPIPS`` refuse video latents.
"""

from __future__ import annotations

from .adversarial import (
    GANLoss,
    MixAndMatch,
    RenoisedSamples,
    approximate_r1_penalty,
    gan_discriminator_loss,
    gan_generator_loss,
    lazy_r1_penalty,
    mix_and_match,
    r1_penalty,
    random_derangement,
    renoise_for_discriminator,
)
from .consistency import (
    ConsistencyPair,
    consistency_pair,
    inter_segment_consistency_loss,
    lcm_consistency_loss,
    multistep_consistency_loss,
    progressive_distillation_loss,
    teacher_trajectory_states,
    tscd_loss,
    x0_conversion_loss,
)
from .dice import DiceSemimetricLoss, dice_semimetric_loss
from .distances import DISTANCES, compute_distance, pseudo_huber_distance, reduce_loss
from .rewards import MPSHingeLoss, RewardHingeLoss, mps_hinge_loss, reward_hinge_loss
from .score import AlternatingUpdate, denoise, dmd_loss, fake_score_loss, sid_loss, sim_loss
from .soft_labels import (
    boundary_label_smoothing,
    multi_rater_soft_labels,
    teacher_soft_labels,
    uniform_label_smoothing,
)

__all__: list[str] = [
    "DISTANCES",
    "RELEASED_WEIGHTS_URL",
    "AlternatingUpdate",
    "ConsistencyPair",
    "DiceSemimetricLoss",
    "ELatentLPIPS",
    "GANLoss",
    "LatentAugment",
    "LatentLPIPS",
    "MPSHingeLoss",
    "MixAndMatch",
    "PixelLPIPS",
    "RenoisedSamples",
    "RewardHingeLoss",
    "approximate_r1_penalty",
    "boundary_label_smoothing",
    "compute_distance",
    "consistency_pair",
    "denoise",
    "dice_semimetric_loss",
    "dmd_loss",
    "download_weights",
    "fake_score_loss",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "inter_segment_consistency_loss",
    "lazy_r1_penalty",
    "lcm_consistency_loss",
    "load_latent_lpips_state_dict",
    "mix_and_match",
    "mps_hinge_loss",
    "multi_rater_soft_labels",
    "multistep_consistency_loss",
    "progressive_distillation_loss",
    "pseudo_huber_distance",
    "r1_penalty",
    "random_derangement",
    "reduce_loss",
    "renoise_for_discriminator",
    "reward_hinge_loss",
    "sid_loss",
    "sim_loss",
    "teacher_soft_labels",
    "teacher_trajectory_states",
    "tscd_loss",
    "uniform_label_smoothing",
    "x0_conversion_loss",
]

# LatentLPIPS & co. are exported lazily: their module (with einops) is only imported on first
# attribute access, so `import diffdistill` stays light.
_LAZY = {
    "ELatentLPIPS": ".lpips",
    "LatentAugment": ".latent_augment",
    "LatentLPIPS": ".lpips",
    "PixelLPIPS": ".lpips",
    "RELEASED_WEIGHTS_URL": ".lpips",
    "download_weights": ".lpips",
    "load_latent_lpips_state_dict": ".lpips",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
