"""Shared fixtures: one tiny SDXL-structured UNet per session (tests must not modify it) and its conditions."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffdistill.discriminators import sdxl_conditions, tiny_sdxl_unet


@pytest.fixture(scope="session")
def unet() -> torch.nn.Module:
    return tiny_sdxl_unet(seed=0)


@pytest.fixture
def conds(unet: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return sdxl_conditions(unet, 2, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def latents() -> torch.Tensor:
    return torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions run faster on one thread, and avoid OpenMP spin-waits on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
