"""A toy adversarial run: each discriminator learns to tell two latent distributions apart."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffdistill.discriminators import (
    MultiLevelDiscriminator,
    UNetEncoderDiscriminator,
    sdxl_conditions,
    tiny_sdxl_unet,
)
from diffdistill.losses import GANLoss


def _smooth(n: int, gen: torch.Generator) -> torch.Tensor:
    """Low-frequency latents: 4×4 noise upsampled bilinearly, scaled to unit std."""
    x = F.interpolate(
        torch.randn(n, 4, 4, 4, generator=gen), size=(16, 16), mode="bilinear", align_corners=False
    )
    return x / x.std()


def _white(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 4, 16, 16, generator=gen)


@pytest.mark.parametrize("kind", ["lightning_trainable", "pcm_frozen_teacher"])
def test_discriminator_separates_two_latent_distributions(kind, unet) -> None:
    torch.manual_seed(0)
    if kind == "lightning_trainable":
        # 8 GroupNorm groups: at this width 32 groups would hold 2 channels each on the head's 1×1 map
        disc = UNetEncoderDiscriminator(unet, conditional=False, norm_groups=8)
        crit, head_lr = GANLoss("non_saturating"), 1e-3
    else:
        teacher = tiny_sdxl_unet().requires_grad_(False)  # PCM: a frozen, shared teacher; only heads learn
        disc = MultiLevelDiscriminator(teacher, norm_groups=8)
        crit, head_lr = GANLoss("hinge"), 5e-3
    opt = torch.optim.Adam(disc.parameter_groups(head_lr=head_lr, backbone_lr=1e-4), betas=(0.0, 0.99))
    gen = torch.Generator().manual_seed(0)
    batch = 8
    ehs, added = sdxl_conditions(unet, 2 * batch, generator=torch.Generator().manual_seed(1))
    for _ in range(30):
        x = torch.cat([_smooth(batch, gen), _white(batch, gen)])
        logits = disc(x, 250, ehs, added)
        loss, _ = crit.discriminator_loss([h[:batch] for h in logits], [h[batch:] for h in logits])
        opt.zero_grad()
        loss.backward()
        opt.step()
    disc.eval()
    test_gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        x = torch.cat([_smooth(batch, test_gen), _white(batch, test_gen)])
        score = torch.stack([h.flatten(1).mean(1) for h in disc(x, 250, ehs, added)]).mean(0)
    accuracy = ((score[:batch] > 0).float().mean() + (score[batch:] < 0).float().mean()) / 2
    assert accuracy >= 0.9, f"accuracy {accuracy:.2f} (chance is 0.5)"
    assert all(p.grad is None for p in unet.parameters())
