"""Reaching the user's ``nn.Module`` through training wrappers (DDP, FSDP, ``torch.compile``, accelerate)."""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip ``DistributedDataParallel`` / ``DataParallel`` (``.module``) and ``torch.compile`` (``._orig_mod``)
    wrappers, repeatedly, so names and parameters are those of the user's model.

    Example:
        >>> from diffdistill._modules import unwrap_model
        >>> net = nn.Linear(2, 2)
        >>> unwrap_model(nn.DataParallel(net)) is net
        True
    """
    seen = 0
    while seen < 16:
        seen += 1
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        fsdp_inner = getattr(model, "_fsdp_wrapped_module", None)
        if isinstance(fsdp_inner, nn.Module):
            model = fsdp_inner
            continue
        break
    return model
