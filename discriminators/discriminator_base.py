"""What every UNet discriminator shares: parameter groups, head reset, paired augmentation, condition batching."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .._checks import DTypeError, ShapeError, check_tensor
from .heads import reset_module_parameters, run_head_float32
from .unet_features import UNetFeatureExtractor

__all__ = ["UNetDiscriminatorBase"]


def _expand_timestep(
    timestep: torch.Tensor | float | int, batch: int, device: torch.device, name: str
) -> torch.Tensor:
    """A number, ``()``, ``(1,)`` or ``(B,)`` timestep as a ``(B,)`` tensor."""
    if not torch.is_tensor(timestep):
        dtype = torch.float64 if isinstance(timestep, float) else torch.int64
        if dtype == torch.float64 and device.type == "mps":  # no float64 on MPS (as diffusers)
            dtype = torch.float32
        return torch.full((batch,), timestep, dtype=dtype, device=device)
    t = timestep.reshape(-1) if timestep.ndim == 0 else timestep
    if t.ndim != 1 or t.shape[0] not in (1, batch):
        raise ShapeError(
            f"Expected `{name}` to be a number or a tensor of shape (), (1,) or ({batch},), but got "
            f"{tuple(timestep.shape)}.",
            name=name,
            expected=(batch,),
            actual=tuple(timestep.shape),
        )
    return t.to(device).expand(batch)


def _repeat_batch(value: Any, batch: int, times: int, name: str) -> Any:
    """Concatenate every tensor of ``value`` (a tensor or mapping) ``times`` times along dim 0."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {k: _repeat_batch(v, batch, times, f"{name}['{k}']") for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] != batch:
            raise ShapeError(
                f"Expected `{name}` to have the batch size of `sample` ({batch}) in dim 0, but got shape "
                f"{tuple(value.shape)}.",
                name=name,
                expected=(batch,),
                actual=tuple(value.shape),
            )
        return torch.cat([value] * times, dim=0)
    return value


def _default_trainable(backbone: str, trainable: bool | None) -> bool | None:
    if backbone == "shared":
        return trainable
    return True if trainable is None else trainable


class UNetDiscriminatorBase(nn.Module):
    """Base of the UNet discriminators: ``extractor`` (backbone), ``heads`` and an optional ``augment``.

    Subclasses set ``self.extractor`` (a :class:`~diffdistill.discriminators.UNetFeatureExtractor`),
    ``self.heads`` (an ``nn.ModuleList``) and optionally extra new layers listed in ``_new_layer_names``.
    ``forward`` returns a list of logits in at least float32, one ``(B, 1, h, w)`` tensor per head.

    Example:
        >>> from diffdistill.discriminators import UNetEncoderDiscriminator, tiny_sdxl_unet
        >>> disc = UNetEncoderDiscriminator(tiny_sdxl_unet(), conditional=False)
        >>> isinstance(disc, UNetDiscriminatorBase)
        True
        >>> opt = torch.optim.AdamW(disc.parameter_groups(head_lr=1e-4, backbone_lr=1e-5))
        >>> [g["lr"] for g in opt.param_groups]
        [0.0001, 1e-05]
    """

    extractor: UNetFeatureExtractor
    heads: nn.ModuleList
    _new_layer_names: tuple[str, ...] = ()

    def _finish_init(self, augment: nn.Module | None) -> None:
        """Set ``augment`` and put the layers this discriminator created on its backbone's device.

        The heads and new input layers are built on the default device; a discriminator built from a UNet
        on the GPU must run there without a further ``.to()`` (their dtype stays float32: the heads run in
        float32, see :func:`~diffdistill.discriminators.run_head_float32`). A trunk on the meta device (not
        yet materialised) takes them to meta too: materialise the whole discriminator, then
        :meth:`reset_head`.
        """
        if augment is not None and not callable(augment):
            raise DTypeError(
                f"Expected `augment` to be a module such as LatentAugment('bgc'), or None, but got {type(augment).__name__}."
            )
        self.augment = augment
        weight = next(self.extractor.trunk.parameters(), None)
        if weight is not None:
            self.heads.to(weight.device)
            for name in self._new_layer_names:
                getattr(self, name).to(weight.device)

    def _augment(self, *tensors: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """Apply ``augment`` with one shared draw to every tensor (training mode only)."""
        if self.augment is None or not self.training:
            return tensors
        out = self.augment(*tensors, generator=generator)
        return (out,) if isinstance(out, torch.Tensor) else tuple(out)

    def _run_heads(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [run_head_float32(head, f) for head, f in zip(self.heads, features)]

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters created by the discriminator (heads and any new input layers); give them their own lr."""
        yield from self.heads.parameters()
        for name in self._new_layer_names:
            yield from getattr(self, name).parameters()

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the registered UNet trunk (none for ``backbone="shared"``)."""
        if self.extractor.backbone_mode != "shared":
            yield from self.extractor.trunk.parameters()

    def parameter_groups(self, head_lr: float, backbone_lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups ``[{"params": heads, "lr": head_lr}, {"params": backbone, "lr": ...}]``.

        Only parameters with ``requires_grad`` are listed; an empty backbone group is dropped.
        """
        groups = [{"params": [p for p in self.head_parameters() if p.requires_grad], "lr": float(head_lr)}]
        backbone = [p for p in self.backbone_parameters() if p.requires_grad]
        if backbone:
            groups.append({"params": backbone, "lr": float(backbone_lr)})
        return groups

    def reset_head(self) -> None:
        """Re-initialise the heads (and new input layers) only, e.g. at each progressive-distillation stage."""
        reset_module_parameters(self.heads)
        for name in self._new_layer_names:
            reset_module_parameters(getattr(self, name))
        self._init_new_layers()

    def _init_new_layers(self) -> None:
        """Initialise new input layers after a reset (subclasses with zero-initialised layers override it)."""

    @staticmethod
    def _check_sample(sample: torch.Tensor, name: str = "sample") -> torch.Tensor:
        check_tensor(sample, name)
        if sample.ndim != 4:
            raise ShapeError(
                f"Expected `{name}` to have 4 dimensions laid out as (B, C, H, W), but got shape {tuple(sample.shape)}.",
                name=name,
                expected=4,
                actual=tuple(sample.shape),
            )
        return sample
