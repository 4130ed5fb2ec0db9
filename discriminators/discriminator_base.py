"""What every UNet discriminator shares: parameter groups, head reset, paired augmentation, condition batching."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .._checks import DTypeError, ShapeError, check_real
from ._inputs import shape_str
from .heads import _Head, _run_head, reset_module_parameters
from .transformer_features import TransformerFeatureExtractor
from .unet_features import UNetFeatureExtractor

__all__ = ["DiscriminatorBase", "UNetDiscriminatorBase"]


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
                f"{shape_str(value.shape)}. Pass one entry per sample.",
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


class DiscriminatorBase(nn.Module):
    """Base of the discriminators (UNet and transformer backbones): ``extractor``, ``heads`` and an ``augment``.

    Subclasses set ``self.extractor`` (a :class:`~diffdistill.discriminators.UNetFeatureExtractor` or
    :class:`~diffdistill.discriminators.TransformerFeatureExtractor`),
    ``self.heads`` (an ``nn.ModuleList``) and optionally extra new layers listed in ``_new_layer_names``.
    ``forward`` returns a list of logits in at least float32, one ``(B, 1, h, w)`` tensor per head.

    Dtypes: every discriminator casts the latents it judges (and the text conditions) to its backbone's dtype
    (``extractor.compute_dtype``) before anything else, so a bf16 sample from a mixed-precision generator
    works with a float32 discriminator with or without ``torch.autocast`` (the gradient flows back to the
    sample in its own dtype); under autocast the autocast dtype decides the compute dtype. The heads run in
    their own dtype, outside autocast (:func:`~diffdistill.discriminators.run_head_float32`), so the logits
    are float32 (float64 for a float64 discriminator).

    Inputs are checked at the boundary and every message names the argument as the caller passed it
    (``sample``, ``cond_sample``, ``noise``, ``timestep``, ``encoder_hidden_states``, ...); the finiteness
    checks are value checks (:func:`diffdistill.errors.value_checks`).

    Raises:
        DTypeError: ``augment`` is neither None nor callable (raised by the subclasses' constructors).

    Example:
        >>> from diffdistill.discriminators import UNetEncoderDiscriminator, tiny_sdxl_unet
        >>> disc = UNetEncoderDiscriminator(tiny_sdxl_unet(), conditional=False)
        >>> isinstance(disc, DiscriminatorBase)
        True
        >>> opt = torch.optim.AdamW(disc.parameter_groups(head_lr=1e-4, backbone_lr=1e-5))
        >>> [g["lr"] for g in opt.param_groups]
        [0.0001, 1e-05]
    """

    extractor: UNetFeatureExtractor | TransformerFeatureExtractor
    heads: nn.ModuleList
    _new_layer_names: tuple[str, ...] = ()

    def _finish_init(self, augment: nn.Module | None) -> None:
        """Set ``augment`` and put the layers this discriminator created on its backbone's device.

        The heads and new input layers are built on the default device; a discriminator built from a UNet
        on the GPU must run there without a further ``.to()`` (their dtype stays float32: the heads run in
        float32, see :func:`~diffdistill.discriminators.run_head_float32`). A trunk on the meta device (not
        yet materialised) takes them to meta too: materialise the whole discriminator, then
        :meth:`reset_head`. The heads skip the finiteness check of their features: those are computed here,
        not passed by the caller (whose inputs are checked by ``forward``).
        """
        if augment is not None and not callable(augment):
            raise DTypeError(
                f"Expected `augment` to be a module such as LatentAugment('bgc'), or None, but got {type(augment).__name__}."
            )
        self.augment = augment
        for head in self.heads:
            if isinstance(head, _Head):
                head._check_feature_values = False
        weight = next(self.extractor.trunk.parameters(), None)
        if weight is not None:
            self.heads.to(weight.device)
            for name in self._new_layer_names:
                getattr(self, name).to(weight.device)

    def _prepare_sample(self, sample: Any, name: str = "sample") -> torch.Tensor:
        """Static checks of a latent to judge (a floating ``(B, in_channels, H, W)`` tensor) and the cast to the
        backbone's dtype; its finiteness is checked by the extractor (or by the caller for other names)."""
        self.extractor._check_sample(sample, name)
        return sample.to(self.extractor.compute_dtype)

    def _augment(self, *tensors: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """Apply ``augment`` with one shared draw to every tensor (training mode only)."""
        if self.augment is None or not self.training:
            return tensors
        out = self.augment(*tensors, generator=generator)
        return (out,) if isinstance(out, torch.Tensor) else tuple(out)

    def _run_heads(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [_run_head(head, f) for head, f in zip(self.heads, features)]

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters created by the discriminator (heads and any new input layers); give them their own lr.

        Yields:
            The parameters of the heads, then of the new input layers (e.g. Diffusion2GAN's z-conv).
        """
        yield from self.heads.parameters()
        for name in self._new_layer_names:
            yield from getattr(self, name).parameters()

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the registered UNet trunk (none for ``backbone="shared"``).

        Yields:
            The trunk's parameters, trainable or not.
        """
        if self.extractor.backbone_mode != "shared":
            yield from self.extractor.trunk.parameters()

    def parameter_groups(self, head_lr: float, backbone_lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups ``[{"params": heads, "lr": head_lr}, {"params": backbone, "lr": ...}]``.

        Only parameters with ``requires_grad`` are listed; an empty backbone group is dropped.

        Args:
            head_lr: learning rate of the heads and new input layers (:meth:`head_parameters`).
            backbone_lr: learning rate of the trainable backbone (:meth:`backbone_parameters`).

        Returns:
            One or two parameter-group dicts for a ``torch.optim`` optimizer.

        Raises:
            DTypeError: a learning rate is not a number.
            OptionError: a learning rate is negative or not finite.
        """
        head_lr = check_real(head_lr, "head_lr", low=0)
        backbone_lr = check_real(backbone_lr, "backbone_lr", low=0)
        groups = [{"params": [p for p in self.head_parameters() if p.requires_grad], "lr": head_lr}]
        backbone = [p for p in self.backbone_parameters() if p.requires_grad]
        if backbone:
            groups.append({"params": backbone, "lr": backbone_lr})
        return groups

    def reset_head(self) -> None:
        """Re-initialise the heads (and new input layers) only, e.g. at each progressive-distillation stage."""
        reset_module_parameters(self.heads)
        for name in self._new_layer_names:
            reset_module_parameters(getattr(self, name))
        self._init_new_layers()

    def _init_new_layers(self) -> None:
        """Initialise new input layers after a reset (subclasses with zero-initialised layers override it)."""


#: The name :class:`DiscriminatorBase` had while every discriminator was a UNet's (kept for compatibility).
UNetDiscriminatorBase = DiscriminatorBase
