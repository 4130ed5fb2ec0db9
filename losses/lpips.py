r"""Perceptual distances for latent diffusion: LatentLPIPS, E-LatentLPIPS and a pixel-LPIPS baseline.

LatentLPIPS (Kang et al., "Distilling Diffusion Models into Conditional GANs", ECCV 2024,
arXiv:2405.05967) computes an LPIPS distance directly on VAE latents. The trunk is a VGG16-BN trained
for ImageNet classification *on latents*: its first convolution takes the latent channels (4 for
SD1.5/SD2.1/SDXL, 16 for SD3/FLUX) and its first three max-pools are removed, since latents are
already 8× downsampled. For latents :math:`x, y` with trunk features :math:`\phi_l` at relu1_2 …
relu5_3, unit-normalised over channels as :math:`\hat\phi_l = \phi_l / \sqrt{\lVert\phi_l\rVert^2 +
10^{-8}}`, and learned non-bias 1×1 heads :math:`w_l`,

.. math::

    d(x, y) = \sum_{l=1}^{5} \frac{1}{H_l W_l} \sum_{h, w} w_l^\top
        \big(\hat\phi_l(x) - \hat\phi_l(y)\big)_{hw}^{\odot 2}
        \; + \; \lambda_{1} \, \frac{1}{CHW} \lVert x - y \rVert_1 .

E-LatentLPIPS ensembles it over random differentiable augmentations :math:`T` applied identically to
both arguments, :math:`d_E(x, y) = \mathbb E_T\, d(T(x), T(y))` (the L1 term is taken before the
augmentation), which the paper shows is needed for the loss to converge as a regression target.

Checkpoints in the layout of the author's ``elatentlpips`` package (``*_latest_vgg16_tuned.pth``,
``*_latent_vgg16.pth.tar``) load unchanged (``load_state_dict(sd, strict=True)``; tested on state dicts
written in that layout, not on the downloaded files), and ``python -m diffdistill.losses.lpips convert
CHECKPOINT OUT.safetensors`` converts them. No weights ship with this library and nothing is downloaded
unless :func:`download_weights` is called with a URL: :data:`RELEASED_WEIGHTS_URL` names the calibrated
checkpoints of the author's later re-implementation (CC-BY-NC licensed, not the paper's original weights). Built without ``weights``, a loss warns once per call site that it runs
on a random trunk; ``weights=None`` chooses that random trunk explicitly, without a warning.

Dtypes: the trunk runs in the dtype of its parameters (inputs are cast to it, or the caller's autocast
picks), and everything after it (normalisation, heads, averages, the L1 term) in at least float32 and at
least the precision of the inputs and the network, so float64 inputs into the default float32 network give
a float64 loss (whose trunk part has float32 precision: call ``.double()`` on the module for float64
throughout) and bf16 inputs give a float32 loss.
"""

from __future__ import annotations

import argparse
import enum
import itertools
import logging
import numbers
import operator
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import einops
import torch
import torch.nn.functional as F
from torch import nn

from .._checks import (
    DTypeError,
    OptionError,
    ShapeError,
    check_finite,
    check_float_input,
    check_not_video,
    check_option,
    check_positive,
    check_real,
    check_same_shape,
)
from .latent_augment import (
    LatentAugment,
    _cast,
    _check_generator,
    _working_dtype,
    augment_ops,
    sym6_filter,
)

__all__ = [
    "LATENT_SPECS",
    "RELEASED_WEIGHTS_URL",
    "ELatentLPIPS",
    "LatentLPIPS",
    "LatentVGG16BN",
    "PixelLPIPS",
    "download_weights",
    "load_latent_lpips_state_dict",
    "main",
]

logger = logging.getLogger(__name__)

#: Latent name -> (channels, scale, shift). ``normalize=True`` maps a raw VAE latent ``z`` to
#: ``(z - shift) * scale``, the convention of the diffusers pipelines.
LATENT_SPECS: dict[str, tuple[int, float, float]] = {
    "sd15": (4, 0.18215, 0.0),
    "sd21": (4, 0.18215, 0.0),
    "sdxl": (4, 0.13025, 0.0),
    "sd3": (16, 1.5305, 0.0609),
    "flux": (16, 0.3611, 0.1159),
}

_REDUCTIONS = ("mean", "sum", "none")
_TAP_CHANNELS = (64, 128, 256, 512, 512)
# torchvision ``vgg16_bn().features`` indices covered by each slice (slice k = [b_k, b_{k+1})).
_SLICE_BOUNDS = (0, 7, 14, 24, 34, 44)
_VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")  # fmt: skip
_NORM_EPS = 1e-8

#: The calibrated checkpoints of the author's E-LatentLPIPS re-implementation (the ``elatentlpips`` package,
#: CC-BY-NC licensed; not the paper's original weights, which were not released), by latent name (``sd15``, ``sd21``,
#: ``sdxl``, ``sd3``, ``flux``): ``download_weights(RELEASED_WEIGHTS_URL.format(latent="sdxl"))`` fetches one
#: (nothing is downloaded otherwise), and its path is what ``weights=`` takes.
RELEASED_WEIGHTS_URL = "https://huggingface.co/Mingguksky/elatentlpips/resolve/main/elatentlpips_ckpt/{latent}_latest_vgg16_tuned.pth"


class _Weights(enum.Enum):
    """Sentinel of a ``weights`` argument the caller did not pass (``None`` is an explicit choice)."""

    NOT_GIVEN = "not given"

    def __repr__(self) -> str:
        return "<not given>"


_NOT_GIVEN = _Weights.NOT_GIVEN


def _warn_random_weights(cls_name: str, latent: str | int) -> None:
    """Warn (once per call site, Python's default filter) that a loss was built on a random trunk."""
    if isinstance(latent, str):
        how = (
            "Load calibrated weights (the author's CC-BY-NC re-implementation) with weights=diffdistill.losses.download_weights("
            f"{RELEASED_WEIGHTS_URL.format(latent=latent)!r}) (downloads once) or weights=PATH (an official, "
            "converted or save_pretrained checkpoint)"
        )
    else:
        how = (
            f"No weights are released for a {latent}-channel latent: train them with "
            "examples/train_latent_lpips.py and pass weights=PATH"
        )
    # Point the warning at the caller's line: skip the frames of this file (subclass __init__s included).
    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    warnings.warn(
        f"{cls_name}(latent={latent!r}) was built without `weights`, so it runs on a randomly initialised "
        f"latent VGG16-BN trunk with unit heads: an uncalibrated distance, not the paper's LatentLPIPS. {how}, "
        "or pass weights=None to choose the random trunk explicitly and silence this warning.",
        UserWarning,
        stacklevel=level,
    )


def _resolve_latent(latent: str | int) -> tuple[str | int, int, float | None, float | None]:
    if isinstance(latent, bool) or not isinstance(latent, (str, int)):
        raise OptionError(
            f"Expected `latent` to be one of {list(LATENT_SPECS)} or a positive int number of channels, "
            f"but got {latent!r}."
        )
    if isinstance(latent, int):
        check_positive(latent, "latent")
        return latent, latent, None, None
    check_option(latent, "latent", LATENT_SPECS)
    c, scale, shift = LATENT_SPECS[latent]
    return latent, c, scale, shift


# ----------------------------------------------------------------------------------------------
# Network


def _latent_vgg16_bn_features(in_channels: int) -> list[nn.Module]:
    """The 44 layers of torchvision's ``vgg16_bn().features`` with a latent first conv, pools 1-3 gone."""
    layers: list[nn.Module] = []
    c, pools = in_channels, 0
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.Identity() if pools < 3 else nn.MaxPool2d(kernel_size=2, stride=2))
            pools += 1
        else:
            conv = nn.Conv2d(c, int(v), kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)  # type: ignore[arg-type]
            layers += [conv, nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            c = int(v)
    return layers


class LatentVGG16BN(nn.Module):
    """Latent VGG16-BN trunk sliced at relu1_2 … relu5_3 (5 feature maps).

    Module names follow torchvision's ``features`` indices inside ``slice1`` … ``slice5`` so
    checkpoints of the official package map one to one. Each slice ends where the next tap starts;
    the taps of slices 4 and 5 therefore come after the remaining max-pools (features at 1/2 and 1/4
    of the latent size), exactly as in the reference. Frozen (eval mode, no parameter requiring a
    gradient, no forward hook), it runs each convolution with its batch norm folded in (cached).

    Args:
        in_channels: latent channels of the first convolution, an int >= 1.

    Raises:
        OptionError: if ``in_channels`` is not an int >= 1.

    Shapes:
        input ``(B, C, H, W)`` with ``H, W >= 4``; outputs ``(B, 64, H, W)``, ``(B, 128, H, W)``,
        ``(B, 256, H, W)``, ``(B, 512, H/2, W/2)``, ``(B, 512, H/4, W/4)``.

    Example:
        >>> trunk = LatentVGG16BN(4).eval()
        >>> [tuple(f.shape) for f in trunk(torch.randn(1, 4, 8, 8))][-2:]
        [(1, 512, 4, 4), (1, 512, 2, 2)]
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, numbers.Integral) or in_channels < 1:
            raise OptionError(f"Expected `in_channels` to be an int >= 1, but got {in_channels!r}.")
        self.in_channels: int = operator.index(in_channels)
        layers = _latent_vgg16_bn_features(self.in_channels)
        for k in range(5):
            lo, hi = _SLICE_BOUNDS[k], _SLICE_BOUNDS[k + 1]
            self.add_module(
                f"slice{k + 1}", nn.Sequential(OrderedDict((str(i), layers[i]) for i in range(lo, hi)))
            )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five tapped feature maps of ``x``.

        Args:
            x: ``(B, in_channels, H, W)`` latents with ``H, W >= 4``, in the trunk's dtype (or under autocast).

        Returns:
            The relu1_2 … relu5_3 maps, shapes as in the class docstring.

        Raises:
            DTypeError: if ``x`` is not a floating tensor.
            ShapeError: if ``x`` is 5-D video latents (image-only) or not ``(B, in_channels, H, W)``, has an empty
                batch or is smaller than 4×4.
        """
        _check_latents(x, "x", self.in_channels, f"in_channels={self.in_channels}")
        feats = []
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in self.modules())
        if self.training or hooked or any(p.requires_grad for p in self.parameters()):
            for k in range(5):
                x = getattr(self, f"slice{k + 1}")(x)
                feats.append(x)
            return feats
        folded = iter(self._folded())
        for k in range(5):
            for layer in getattr(self, f"slice{k + 1}"):
                if isinstance(layer, nn.Conv2d):
                    weight, bias = next(folded)
                    x = F.conv2d(x, weight, bias, layer.stride, layer.padding)
                elif not isinstance(layer, nn.BatchNorm2d):  # folded into the convolution before it
                    x = layer(x)
            feats.append(x)
        return feats

    def _folded(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        r"""Each convolution with its (eval-mode) batch norm folded in: ``(weight, bias)`` per conv.

        :meth:`forward` uses them when the trunk is frozen (eval mode, no parameter requiring a gradient)
        and no forward hook is registered on it or its layers (those run the layers module by module).

        Our choice (one kernel less per layer forward and backward, and no pass over the activations):
        :math:`\mathrm{BN}(w * x + b) = (s\,w) * x + s\,(b - \mu) + \beta` with
        :math:`s = \gamma / \sqrt{\sigma^2 + \epsilon}` (running statistics), composed in float64 and
        rounded once to the weights' dtype and memory format. Eager mode caches the result until a
        parameter or buffer changes (storage or version counter: ``load_state_dict``, ``.to()``, in-place
        updates); a traced graph recomputes it (a few small fused kernels). A write through ``.data``
        (``p.data.copy_(...)``, as diffusers' ``EMAModel.copy_to`` does) bumps no version counter: call
        :meth:`refresh_folded` after one. Nothing is cached under ``torch.inference_mode()`` (inference
        tensors cannot be saved for a later backward).
        """
        tensors = [t for m in self.modules() for t in (*m.parameters(False), *m.buffers(False))]
        key = None
        # Inference tensors (a trunk built under torch.inference_mode) have no version counter, and folds made
        # under inference mode could not be saved for backward by a later call outside it: no cache then.
        if (
            not torch.compiler.is_compiling()
            and not torch.is_inference_mode_enabled()
            and not any(t.is_inference() for t in tensors)
        ):
            key = tuple((t.data_ptr(), t._version) for t in tensors)
            cached = self.__dict__.get("_fold_cache")
            if cached is not None and cached[0] == key:
                return cached[1]
        out = []
        layers = [m for k in range(5) for m in getattr(self, f"slice{k + 1}")]
        for conv, bn in itertools.pairwise(layers):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            w = conv.weight
            var, mean = bn.running_var.double(), bn.running_mean.double()  # type: ignore[union-attr]
            s = bn.weight.double() * torch.rsqrt(var + bn.eps)
            weight = (w.double() * s.view(-1, 1, 1, 1)).to(w.dtype)
            bias = ((conv.bias.double() - mean) * s + bn.bias.double()).to(w.dtype)  # type: ignore[union-attr]
            out.append((weight, bias))
        if key is not None:
            self.__dict__["_fold_cache"] = (key, out)
        return out

    def refresh_folded(self) -> None:
        """Drop the cached folded weights (:meth:`_folded`), so the next frozen forward folds the current ones.

        Needed only after weights were written through ``.data`` (e.g. ``p.data.copy_(...)``, diffusers'
        ``EMAModel.copy_to``), which changes no version counter; ``load_state_dict``, ``.to()`` and in-place
        updates of the parameters themselves are noticed without it.

        Example:
            >>> trunk = LatentVGG16BN(4).eval().requires_grad_(False)
            >>> _ = trunk(torch.randn(1, 4, 8, 8))
            >>> trunk.slice1[0].weight.data.zero_()  # doctest: +ELLIPSIS
            tensor(...)
            >>> trunk.refresh_folded()
            >>> bool(trunk(torch.randn(1, 4, 8, 8))[0].std() == 0)
            True
        """
        self.__dict__.pop("_fold_cache", None)


class _LinearHead(nn.Module):
    """1×1 non-bias projection of a squared feature difference to one channel (LPIPS ``w_l``).

    Args:
        channels: channels of the feature map it projects.
        dropout: dropout probability before the projection, applied to the squared difference when the dropout
            module is in training mode (LPIPS calibrates its heads so: ``examples/train_latent_lpips.py``); the
            metric itself stays in eval mode, where it does nothing.
    """

    def __init__(self, channels: int, dropout: float = 0.5) -> None:
        super().__init__()
        conv = nn.Conv2d(channels, 1, kernel_size=1, bias=False)
        nn.init.ones_(conv.weight)
        # Index 0 holds the (training-time) dropout, index 1 the weights: the reference names.
        self.model = nn.Sequential(nn.Dropout(dropout), conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _check_latents(x: Any, name: str, channels: int, what: str) -> None:
    """Static checks of a latent batch: a non-empty floating ``(B, channels, H >= 4, W >= 4)`` tensor (video
    latents ``(B, C, F, H, W)`` refused with the reason)."""
    check_not_video(
        x,
        name,
        "LatentLPIPS / E-LatentLPIPS (a latent VGG16 trained on one image VAE's latents, Kang et al. 2024)",
    )
    check_float_input(x, name, ndim=4, layout="(B, C, H, W)", finite=False)
    if x.shape[1] != channels:
        raise ShapeError(
            f"Expected `{name}` to have {channels} channels for {what}, i.e. shape "
            f"(B, {channels}, H, W), but got shape {tuple(x.shape)}. Pass the latent of the "
            f"matching VAE (4 channels: 'sd15', 'sd21', 'sdxl'; 16: 'sd3', 'flux') or an int.",
            name=name,
            expected=channels,
            actual=tuple(x.shape),
        )
    if x.shape[2] < 4 or x.shape[3] < 4:
        raise ShapeError(
            f"Expected `{name}` to be at least 4×4 (the trunk pools twice), but got shape {tuple(x.shape)}.",
            name=name,
            expected=(4, 4),
            actual=tuple(x.shape),
        )


def _unit_normalize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / sqrt(|x|^2 + eps), 1 / sqrt(|x|^2 + eps))`` with the norm over channels (dim 1)."""
    r = torch.rsqrt(x.square().sum(dim=1, keepdim=True) + _NORM_EPS)
    return x * r, r


class _LayerDistance(torch.autograd.Function):
    r"""One LPIPS layer term :math:`\operatorname{mean}_{hw} w^\top (\hat\phi(x) - \hat\phi(y))^{\odot 2}` (Zhang et
    al., LPIPS, CVPR 2018, Eq. 1, as Kang et al., ECCV 2024, use it on latents) with a hand-written backward.

    Our choice (kernel count): autograd records ~20 element-wise ops per layer for the normalisation,
    difference, 1×1 head and mean. Here the forward keeps the head-weighted difference
    :math:`u = d \odot w / (HW)` of :math:`d = \hat\phi(x) - \hat\phi(y)` (per pixel without the
    :math:`1/(HW)` when ``spatial``), so the value is :math:`\sum_{chw} u \odot d` and the gradient with respect
    to :math:`\hat\phi(x)` is :math:`g = 2 u` times the incoming gradient; the closed-form gradient of
    :math:`\hat\phi = \phi\, r`, :math:`r = (\lVert\phi\rVert^2 + \epsilon)^{-1/2}`, is then
    :math:`\partial\phi = r\,(g - \hat\phi\, \langle\hat\phi, g\rangle_c)` -- seven ops per input. The heads
    get theirs when they require it (their calibration); only the tensors a requested gradient needs are
    saved. First-order only (``once_differentiable``: a second derivative raises instead of being
    silently wrong).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, fx: torch.Tensor, fy: torch.Tensor, head: torch.Tensor, spatial: bool
    ) -> torch.Tensor:
        nx, rx = _unit_normalize(fx)
        ny, ry = _unit_normalize(fy)
        diff = nx - ny
        # head: the (1, C, 1, 1) weight of the 1×1 convolution, broadcast over the batch and the pixels.
        if spatial:  # (B, 1, h, w)
            weighted = diff * head
            value = (weighted * diff).sum(dim=1, keepdim=True)
        else:  # (B,): the mean over the pixels folded into the head
            weighted = diff * (head * (1.0 / (diff.shape[2] * diff.shape[3])))
            value = (weighted * diff).sum(dim=(1, 2, 3))
        need_x, need_y, need_w = ctx.needs_input_grad[:3]
        ctx.save_for_backward(
            weighted,
            nx if need_x else None,
            rx if need_x else None,
            ny if need_y else None,
            ry if need_y else None,
            diff if need_w else None,
        )
        ctx.spatial = spatial
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        weighted, nx, rx, ny, ry, diff = ctx.saved_tensors
        b, _, h, w = weighted.shape
        scale = (grad if ctx.spatial else grad.view(b, 1, 1, 1)) * 2
        g = weighted * scale  # gradient w.r.t. the normalised x features (minus it for y)
        gx = gy = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.addcmul(g, nx, (nx * g).sum(dim=1, keepdim=True), value=-1) * rx
        if ctx.needs_input_grad[1]:
            gy = torch.addcmul(g, ny, (ny * g).sum(dim=1, keepdim=True), value=-1) * -ry
        if ctx.needs_input_grad[2]:  # the heads are trained (calibration): d value / d w_c = mean_hw diff_c^2
            per_pixel = 0.5 if ctx.spatial else 0.5 / (h * w)
            gw = ((diff.square() * scale).sum(dim=(0, 2, 3)) * per_pixel).view(1, -1, 1, 1)
        return gx, gy, gw, None


def _reduce(value: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return value.mean()
    if reduction == "sum":
        return value.sum()
    return value


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """At least float32 and at least as precise as each of ``dtypes`` (inputs, network parameters)."""
    return _working_dtype(*dtypes)


def _param_dtype(module: nn.Module) -> torch.dtype | None:
    p = next(iter(module.parameters()), None)
    return p.dtype if p is not None else None


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _trunk_key(key: str) -> str | None:
    """``model.features.N.param`` (ImageNet classifier checkpoint) -> ``net.sliceK.N.param``."""
    parts = key.split(".")
    if len(parts) < 4 or parts[0] != "model" or parts[1] != "features" or not parts[2].isdigit():
        return None
    idx = int(parts[2])
    for k in range(5):
        if _SLICE_BOUNDS[k] <= idx < _SLICE_BOUNDS[k + 1]:
            return f"net.slice{k + 1}.{idx}." + ".".join(parts[3:])
    return None


def _check_path(path: Any, name: str) -> Path:
    """A ``str`` / ``os.PathLike`` naming an existing file (:class:`DTypeError` / ``FileNotFoundError``)."""
    if not isinstance(path, (str, os.PathLike)):
        hint = (
            " To load a state dict you hold in memory, call module.load_state_dict(state_dict)."
            if isinstance(path, Mapping)
            else ""
        )
        raise DTypeError(
            f"Expected `{name}` to be a file path (str or os.PathLike), but got {type(path).__name__}.{hint}"
        )
    out = Path(path)
    if not out.is_file():
        raise FileNotFoundError(
            f"`{name}` names no file: {str(out)!r}. Pass the path of a LatentLPIPS checkpoint (official "
            "`*_latest_vgg16_tuned.pth` / `*_latent_vgg16.pth.tar`, or a safetensors file from save_pretrained "
            "or the convert command); download_weights(RELEASED_WEIGHTS_URL.format(latent=...)) fetches the "
            "released ones."
        )
    return out


def load_latent_lpips_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a LatentLPIPS checkpoint into our key layout.

    Accepts a safetensors file written by :meth:`LatentLPIPS.save_pretrained` or the ``convert``
    command, the official calibrated checkpoint ``*_latest_vgg16_tuned.pth`` (a full state dict; its
    duplicate ``lins.N`` entries are kept for the load pre-hook to check) and the official ImageNet
    trunk ``*_latent_vgg16.pth.tar`` (``state_dict`` with ``module.model.features.N`` keys; the
    classifier is dropped and ``has_heads`` is ``False``). Pickles are read with
    ``torch.load(weights_only=True)``.

    Args:
        path: the checkpoint file (``.safetensors``, or a pickle ``.pth`` / ``.pth.tar``).

    Returns:
        ``(state_dict, has_heads)``: the tensors under our key names, and whether the checkpoint holds the
        calibrated heads (``lin0`` … ``lin4``) besides the trunk.

    Raises:
        DTypeError: if ``path`` is not a ``str`` / ``os.PathLike``.
        FileNotFoundError: if ``path`` names no file.
        ValueError: if the file cannot be read with ``weights_only=True``, holds no state dict, or is a
            trunk checkpoint without latent VGG16-BN keys.

    Example:
        >>> import tempfile, os
        >>> m = LatentLPIPS("sdxl", weights=None)
        >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> m.save_pretrained(path)
        >>> sd, has_heads = load_latent_lpips_state_dict(path)
        >>> has_heads, sd["net.slice1.0.weight"].shape[1]
        (True, 4)
    """
    path = _check_path(path, "path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw: Mapping[str, Any] = load_file(str(path), device="cpu")
    else:
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling restrictions name the offending global
            raise ValueError(
                f"Could not read `{path}` with torch.load(weights_only=True): {exc}. Only plain tensor "
                "checkpoints are accepted; convert it with an environment you trust."
            ) from exc
    if not isinstance(raw, Mapping):
        raise ValueError(f"Expected `{path}` to hold a state dict (a mapping), but got {type(raw).__name__}.")
    trunk_only = "state_dict" in raw and isinstance(raw["state_dict"], Mapping)
    sd = raw["state_dict"] if trunk_only else raw
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue
        k = key[len("module.") :] if key.startswith("module.") else key
        if trunk_only:
            mapped = _trunk_key(k)
            if mapped is not None:
                out[mapped] = value
        else:
            out[k] = value
    if trunk_only and not out:
        raise ValueError(
            f"`{path}` has a `state_dict` entry but no `module.model.features.N` trunk keys "
            f"(found e.g. {list(sd)[:3]}); it is not an official latent VGG16-BN checkpoint."
        )
    has_heads = any(k.startswith("lin0.") for k in out)
    return out, has_heads


def download_weights(
    url: str, path: str | os.PathLike[str] | None = None, *, hash_prefix: str | None = None
) -> Path:
    """Download ``url`` to ``path``, or reuse the file already there.

    The only function of this module that touches the network, and only when called. Pass the result
    as ``weights=`` to :class:`LatentLPIPS`; :data:`RELEASED_WEIGHTS_URL` names the released checkpoints.

    Args:
        url: the address of the file (``https://…``, or ``file://…`` for a local copy).
        path: where to store it; ``None`` is ``torch.hub.get_dir()/diffdistill/<file name of url>``.
        hash_prefix: if given, the start of the file's SHA-256 hex digest, checked after the download.

    Returns:
        The path of the file.

    Raises:
        DTypeError: if ``url`` is not a string or ``path`` not a ``str`` / ``os.PathLike``.
        OptionError: if ``url`` is empty.
        RuntimeError: from ``torch.hub``, if the download fails or the hash does not match.

    Example:
        >>> import tempfile, os
        >>> src = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> LatentLPIPS(4, weights=None).save_pretrained(src)
        >>> dst = download_weights("file://" + src, os.path.join(tempfile.mkdtemp(), "copy.safetensors"))
        >>> dst.exists()
        True
    """
    if not isinstance(url, str):
        raise DTypeError(f"Expected `url` to be a string, but got {type(url).__name__}.")
    if not url.strip():
        raise OptionError(
            "Expected `url` to be a non-empty address, e.g. RELEASED_WEIGHTS_URL.format(latent='sdxl')."
        )
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise DTypeError(
            f"Expected `path` to be a file path (str or os.PathLike) or None, but got {type(path).__name__}."
        )
    if path is None:
        path = Path(torch.hub.get_dir()) / "diffdistill" / url.rstrip("/").split("/")[-1].split("?")[0]
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("Downloading %s to %s", url, path)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix, progress=False)
    return path


# ----------------------------------------------------------------------------------------------
# Losses


class LatentLPIPS(nn.Module):
    r"""LPIPS computed on VAE latents by a latent VGG16-BN (Kang et al., ECCV 2024, arXiv:2405.05967).

    .. math::

        d(x, y) = \sum_{l=1}^{5} \operatorname{mean}_{hw}\big(w_l^\top
        (\hat\phi_l(x) - \hat\phi_l(y))^{2}\big) + \lambda_1 \operatorname{mean}|x - y|

    with unit-normalised trunk features :math:`\hat\phi_l` and learned 1×1 heads :math:`w_l`. The
    trunk and heads are frozen (eval mode, ``requires_grad=False``); gradients flow to the inputs.

    Image-only by design: the trunk is trained on one image VAE's latents, so 5-D video latents
    ``(B, C, F, H, W)`` (Wan) are refused with a :class:`ShapeError` that says so; no released trunk is
    trained on a video VAE's latents, whose frames are also compressed in time.

    Precision: inputs are cast to the trunk's dtype (its parameters' dtype; the caller's autocast, if
    any, then picks the convolution dtype); the normalisation, heads, averages and the L1 term run
    outside autocast in at least float32 and at least the precision of the inputs and of the network.
    So bf16 inputs give a float32 loss, float64 inputs into the default float32 network give a float64
    loss with a float32 trunk (call ``.double()`` for float64 throughout, as ``gradcheck`` needs), and a
    ``.bfloat16()`` network accepts float32 inputs.

    Args:
        latent: ``"sd15"``, ``"sd21"``, ``"sdxl"``, ``"sd3"``, ``"flux"`` (4 or 16 channels and the
            VAE's scale/shift for ``normalize=True``) or an int number of channels.
        weights: a checkpoint path (see :func:`load_latent_lpips_state_dict`; the released ones are
            fetched with ``download_weights(RELEASED_WEIGHTS_URL.format(latent=...))``). ``None`` chooses
            a random trunk with heads equal to 1 (the uncalibrated LPIPS baseline) explicitly; left out,
            it is the same random trunk plus a ``UserWarning`` (once per call site) that says how to
            load the released weights.
        l1_weight: weight :math:`\lambda_1` (a finite number >= 0) of the L1 term; 0 turns it off.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (per-sample values, shape ``(B,)``).

    Raises:
        OptionError: on an unknown ``latent`` or ``reduction``, a channel count < 1, or a negative,
            NaN or infinite ``l1_weight``.
        DTypeError: if ``l1_weight`` is not a number or ``weights`` not a path.
        FileNotFoundError: if ``weights`` names no file.
        ShapeError: if the checkpoint's tensors have other shapes (e.g. another channel count).
        ValueError: if the checkpoint cannot be read or lacks or adds keys.

    Shapes:
        ``input``, ``target``: ``(B, C, H, W)`` with ``H, W >= 4``. Output: scalar, or ``(B,)`` for
        ``reduction="none"``; ``spatial=True`` returns the per-pixel map ``(B, 1, H, W)``.

    Example:
        >>> loss_fn = LatentLPIPS("sdxl", weights=None)  # random trunk, chosen explicitly
        >>> x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        >>> sd3 = LatentLPIPS("sd3", weights=None, reduction="none")
        >>> loss_fn(x, y).shape, sd3(torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)).shape
        (torch.Size([]), torch.Size([2]))
        >>> float(loss_fn(x, x))
        0.0
    """

    def __init__(
        self,
        latent: str | int = "sdxl",
        weights: str | os.PathLike[str] | Literal[_Weights.NOT_GIVEN] | None = _NOT_GIVEN,
        l1_weight: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        check_option(reduction, "reduction", _REDUCTIONS)
        self.l1_weight = check_real(l1_weight, "l1_weight", low=0.0)
        self.latent, self.in_channels, self._scale, self._shift = _resolve_latent(latent)
        self.reduction = reduction
        if weights is not None and weights is not _NOT_GIVEN:
            _check_path(weights, "weights")
        self.net = LatentVGG16BN(self.in_channels)
        for k, c in enumerate(_TAP_CHANNELS):
            self.add_module(f"lin{k}", _LinearHead(c))
        self.register_load_state_dict_pre_hook(_consume_reference_extras)
        if weights is _NOT_GIVEN:
            _warn_random_weights(type(self).__name__, self.latent)
        elif weights is not None:
            self.load_weights(weights)
        self.requires_grad_(False)
        self.eval()

    # The trunk and heads are frozen: the module never leaves eval mode.
    def train(self, mode: bool = True) -> LatentLPIPS:
        """Keep the module in eval mode whatever ``mode`` is (the trunk and heads are frozen).

        Args:
            mode: ignored.

        Returns:
            The module itself, in eval mode.
        """
        return super().train(False)

    def extra_repr(self) -> str:
        return f"latent={self.latent!r}, in_channels={self.in_channels}, l1_weight={self.l1_weight}, reduction={self.reduction!r}"

    @property
    def heads(self) -> list[nn.Module]:
        """The five 1×1 heads ``lin0`` … ``lin4``."""
        return [getattr(self, f"lin{k}") for k in range(5)]

    # -- weights ---------------------------------------------------------------------------

    def load_weights(self, weights: str | os.PathLike[str]) -> None:
        """Load a checkpoint file (official or converted) into this module.

        A trunk-only checkpoint (``*_latent_vgg16.pth.tar``) leaves the heads at 1 and logs a warning.

        Args:
            weights: the checkpoint path (see :func:`load_latent_lpips_state_dict`).

        Raises:
            DTypeError: if ``weights`` is not a ``str`` / ``os.PathLike``.
            FileNotFoundError: if ``weights`` names no file.
            ShapeError: if tensors have other shapes; the message names the keys and the channel count.
            ValueError: if the file cannot be read, or keys are missing or unexpected.

        Example:
            >>> import tempfile, os
            >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
            >>> LatentLPIPS("sd3", weights=None).save_pretrained(path)
            >>> LatentLPIPS("sd3", weights=path).in_channels
            16
        """
        _check_path(weights, "weights")
        sd, has_heads = load_latent_lpips_state_dict(weights)
        self._check_checkpoint(sd, has_heads, str(weights))
        self.load_state_dict(sd, strict=has_heads)
        if not has_heads:
            logger.warning(
                "%s holds only the trunk; the LatentLPIPS heads are uncalibrated (all 1).", weights
            )

    def _check_checkpoint(self, sd: Mapping[str, torch.Tensor], has_heads: bool, source: str) -> None:
        own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        skip = ("lins.", "augment.")
        found = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith(skip)}
        for k in range(5):  # heads saved without dropout are renamed by the pre-hook
            alt = f"lin{k}.model.0.weight"
            if alt in found and f"lin{k}.model.1.weight" not in found:
                found[f"lin{k}.model.1.weight"] = found.pop(alt)
        required = {k for k in own if has_heads or not k.startswith("lin")}
        missing = sorted(required - set(found))
        unexpected = sorted(set(found) - set(own))
        mismatched = [(k, own[k], found[k]) for k in sorted(set(own) & set(found)) if own[k] != found[k]]
        if not (missing or unexpected or mismatched):
            return
        parts = []
        if mismatched:
            parts.append(
                "shape mismatch: "
                + "; ".join(f"`{k}` expected {list(e)}, found {list(f)}" for k, e, f in mismatched[:4])
                + (f" (+{len(mismatched) - 4} more)" if len(mismatched) > 4 else "")
            )
        if missing:
            parts.append(
                f"missing keys {missing[:6]}" + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else "")
            )
        if unexpected:
            parts.append(
                f"unexpected keys {unexpected[:6]}"
                + (f" (+{len(unexpected) - 6} more)" if len(unexpected) > 6 else "")
            )
        first = sd.get("net.slice1.0.weight")
        hint = ""
        if first is not None and first.ndim == 4 and first.shape[1] != self.in_channels:
            hint = (
                f" The checkpoint is for {first.shape[1]}-channel latents but latent={self.latent!r} has "
                f"{self.in_channels}; pass latent={first.shape[1]} or the matching VAE name."
            )
        msg = (
            f"Checkpoint {source} does not match {type(self).__name__}(latent={self.latent!r}): "
            + "; ".join(parts)
        )
        if mismatched:
            raise ShapeError(
                msg + "." + hint, name="weights", expected=mismatched[0][1], actual=mismatched[0][2]
            )
        raise ValueError(msg + "." + hint)

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write the trunk and heads (no duplicates, no augmentation state) to a safetensors file.

        Args:
            path: the file to write (``.safetensors`` by convention); its folder must exist.

        Raises:
            DTypeError: if ``path`` is not a ``str`` / ``os.PathLike``.

        Example:
            >>> import tempfile, os
            >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
            >>> LatentLPIPS(4, weights=None).save_pretrained(path)
            >>> os.path.getsize(path) > 0
            True
        """
        if not isinstance(path, (str, os.PathLike)):
            raise DTypeError(
                f"Expected `path` to be a file path (str or os.PathLike), but got {type(path).__name__}."
            )
        from safetensors.torch import save_file

        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {
            "format": "diffdistill.latent_lpips",
            "in_channels": str(self.in_channels),
            "latent": str(self.latent),
        }
        save_file(sd, str(path), metadata=meta)

    # -- forward ---------------------------------------------------------------------------

    def _check_inputs(
        self, input: torch.Tensor, target: torch.Tensor, normalize: bool, spatial: bool
    ) -> None:
        what = f"latent={self.latent!r}"
        _check_latents(input, "input", self.in_channels, what)
        _check_latents(target, "target", self.in_channels, what)
        check_same_shape(input, target, "input", "target")
        _check_flag(normalize, "normalize")
        _check_flag(spatial, "spatial")
        check_finite(input, "input")
        check_finite(target, "target")

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self._scale is None or self._shift is None:
            raise OptionError(
                f"`normalize=True` needs a known VAE latent, but latent={self.latent!r} is a channel count. "
                f"Scale the latents yourself or pass latent as one of {list(LATENT_SPECS)}."
            )
        return (x - self._shift) * self._scale

    def _prepare(
        self, input: torch.Tensor, target: torch.Tensor, normalize: bool, spatial: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the inputs and cast them to the compute dtype (>= float32, >= inputs and network)."""
        self._check_inputs(input, target, normalize, spatial)
        w = self.net.slice1[0].weight  # type: ignore[index, union-attr]
        dt = _compute_dtype(input.dtype, target.dtype, w.dtype)
        x, y = _cast(input, dt), _cast(target, dt)
        if normalize:
            x, y = self._normalize(x), self._normalize(y)
        return x, y

    def _l1(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).abs().mean(dim=(1, 2, 3))

    def _plus_l1(self, value: torch.Tensor, l1: torch.Tensor) -> torch.Tensor:
        """``value + l1_weight * l1``; the default weight 1 adds ``l1`` without a multiplication."""
        return value + l1 if self.l1_weight == 1 else value + self.l1_weight * l1

    def _distance(self, x: torch.Tensor, y: torch.Tensor, spatial: bool) -> torch.Tensor:
        """LPIPS part only: ``(B,)``, or ``(B, 1, H, W)`` when ``spatial``; in ``x``'s dtype."""
        dt = x.dtype
        w = self.net.slice1[0].weight  # type: ignore[index, union-attr]
        channels_last = w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()

        def trunk(t: torch.Tensor) -> list[torch.Tensor]:  # may run under the caller's autocast
            t = t if t.dtype == w.dtype else t.to(w.dtype)  # the trunk runs in its parameters' dtype
            return self.net(t.contiguous(memory_format=torch.channels_last) if channels_last else t)

        if x.requires_grad == y.requires_grad:
            b = x.shape[0]
            feats = [(f[:b], f[b:]) for f in trunk(torch.cat([x, y]))]
        else:  # a target without gradient needs no autograd graph: half the backward work
            feats = list(zip(trunk(x), trunk(y), strict=True))
        with torch.autocast(device_type=x.device.type, enabled=False):
            total: torch.Tensor | None = None
            for k, (fx, fy) in enumerate(feats):
                fx, fy = _cast(fx, dt), _cast(fy, dt)
                head = self.heads[k].model[1].weight  # type: ignore[index, union-attr]
                head = _cast(head, dt)
                drop = cast(nn.Dropout, self.heads[k].model[0])  # type: ignore[index, union-attr]
                # Head calibration with dropout (LPIPS' trainer; train_latent_lpips.py): the autograd path.
                if drop.training and drop.p > 0:
                    sq = drop((_unit_normalize(fx)[0] - _unit_normalize(fy)[0]).square())
                    m = F.conv2d(sq, head)
                    m = m if spatial else m.mean(dim=(2, 3)).flatten()
                else:
                    m = _LayerDistance.apply(fx, fy, head, spatial)
                if spatial:
                    m = F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False)
                total = m if total is None else total + m
        return cast(torch.Tensor, total)  # five slices: never None

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        *,
        normalize: bool = False,
        spatial: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Distance between latents ``input`` and ``target``.

        Args:
            input: ``(B, C, H, W)`` latents (e.g. the student's prediction), floating point.
            target: ``(B, C, H, W)`` latents of the same shape (dtype may differ).
            normalize: apply the VAE's ``(z - shift) * scale`` first (pass raw VAE-encoder outputs);
                ``False`` takes the latents as the diffusion model sees them.
            spatial: return the per-pixel map ``(B, 1, H, W)`` (layer maps upsampled bilinearly, plus
                the per-pixel channel-mean L1 map) instead of reduced values.
            generator: unused here; accepted so the call matches :class:`ELatentLPIPS`.

        Returns:
            The distance: a scalar for ``reduction="mean"`` / ``"sum"``, ``(B,)`` for ``"none"``, or
            ``(B, 1, H, W)`` with ``spatial=True``; in at least float32 (see the class docstring).

        Raises:
            DTypeError: if ``input`` or ``target`` is not a floating tensor, or a flag is not a bool.
            ShapeError: if they are 5-D video latents (image-only), or not ``(B, C, H, W)`` with the module's
                channel count and ``H, W >= 4``, have an empty batch, or differ in shape.
            NonFiniteError: if either holds NaN/Inf (a value check, see :func:`diffdistill.errors.value_checks`).
            OptionError: for ``normalize=True`` when ``latent`` is a channel count (no known scaling).
        """
        x, y = self._prepare(input, target, normalize, spatial)
        value = self._distance(x, y, spatial)
        if self.l1_weight:
            with torch.autocast(device_type=x.device.type, enabled=False):
                l1 = (x - y).abs().mean(dim=1, keepdim=True) if spatial else self._l1(x, y)
                value = self._plus_l1(value, l1)
        return value if spatial else _reduce(value, self.reduction)


class ELatentLPIPS(LatentLPIPS):
    r"""E-LatentLPIPS: LatentLPIPS averaged over shared random augmentations (Kang et al., ECCV 2024).

    .. math::

        d_E(x, y) = \frac{1}{K} \sum_{k=1}^{K} d_{\mathrm{LPIPS}}(T_k(x), T_k(y))
        + \lambda_1 \operatorname{mean}|x - y|, \qquad T_k \sim \text{ADA}(\texttt{augment})

    Each :math:`T_k` is drawn per sample by :class:`~diffdistill.losses.latent_augment.LatentAugment`
    (Karras et al., ADA, NeurIPS 2020) and applied to both arguments; ``num_draws=K`` evaluates all
    ``K`` draws in one batched trunk call (the batch laid out as ``(k b)``). The L1 term uses the
    un-augmented latents, as in the reference. With ``augment=None`` it equals :class:`LatentLPIPS`.
    Dtypes are handled as in :class:`LatentLPIPS`; the augmentation resamples in the compute dtype.

    Args:
        latent: see :class:`LatentLPIPS`.
        augment: ``"b"``, ``"g"``, ``"c"``, ``"o"``, ``"co"``, ``"bg"``, ``"bgc"``, ``"bgco"`` (any
            combination of these letters), a list of op names (see
            :func:`~diffdistill.losses.latent_augment.augment_ops`) or ``None`` (no augmentation).
        weights: see :class:`LatentLPIPS` (``None``: random trunk, chosen explicitly; left out: the same
            with a warning).
        l1_weight: weight of the L1 term (a finite number >= 0); 0 turns it off.
        num_draws: number ``K`` (an int >= 1) of augmentation draws averaged per call.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (shape ``(B,)``).

    Raises:
        OptionError: on an unknown ``augment`` letter, ``num_draws`` < 1 or not an int, and as
            :class:`LatentLPIPS`.
        DTypeError: as :class:`LatentLPIPS`.
        FileNotFoundError: as :class:`LatentLPIPS`.
        ShapeError: as :class:`LatentLPIPS`.
        ValueError: as :class:`LatentLPIPS`.

    Shapes:
        as :class:`LatentLPIPS`; ``spatial=True`` needs ``augment=None`` (maps of different draws live
        in different coordinates).

    Example:
        >>> loss_fn = ELatentLPIPS("sdxl", augment="bg", weights=None, num_draws=2, reduction="none")
        >>> x = torch.randn(2, 4, 8, 8, requires_grad=True)
        >>> d = loss_fn(x, torch.randn(2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        >>> d.shape
        torch.Size([2])
        >>> d.sum().backward(); x.grad.shape
        torch.Size([2, 4, 8, 8])
    """

    def __init__(
        self,
        latent: str | int = "sdxl",
        augment: str | Sequence[str] | None = "bg",
        weights: str | os.PathLike[str] | Literal[_Weights.NOT_GIVEN] | None = _NOT_GIVEN,
        l1_weight: float = 1.0,
        num_draws: int = 1,
        reduction: str = "mean",
    ) -> None:
        if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
            raise OptionError(f"Expected `num_draws` to be an int >= 1, but got {num_draws!r}.")
        augment_ops(augment)  # validate before building the network
        super().__init__(latent, weights=weights, l1_weight=l1_weight, reduction=reduction)
        self.augment = LatentAugment(augment) if augment is not None else None
        self.num_draws = num_draws

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_draws={self.num_draws}"

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        *,
        normalize: bool = False,
        spatial: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Augmentation-ensembled distance between latents ``input`` and ``target``.

        Args:
            input: ``(B, C, H, W)`` latents (e.g. the student's prediction), floating point.
            target: ``(B, C, H, W)`` latents of the same shape (dtype may differ).
            normalize: apply the VAE's ``(z - shift) * scale`` first (pass raw VAE-encoder outputs).
            spatial: per-pixel map; only with ``augment=None`` (see :meth:`LatentLPIPS.forward`).
            generator: source of the augmentation draws (reproducible with a seeded generator); ``None``
                uses the default generator of the inputs' device -- what ``torch.compile(fullgraph=True)``
                and CUDA-graph capture need (dynamo does not trace ``torch.Generator`` objects; seed with
                ``torch.manual_seed`` instead). Forward and backward read nothing back to the host.

        Returns:
            The distance: a scalar for ``reduction="mean"`` / ``"sum"``, ``(B,)`` for ``"none"``, in at
            least float32.

        Raises:
            OptionError: for ``spatial=True`` with augmentation, or ``normalize=True`` when ``latent`` is a
                channel count.
            DTypeError: if an input is not a floating tensor, a flag not a bool, or ``generator`` not a
                ``torch.Generator``.
            ShapeError: as :meth:`LatentLPIPS.forward`.
            NonFiniteError: as :meth:`LatentLPIPS.forward` (a value check).
        """
        if self.augment is None:
            return super().forward(input, target, normalize=normalize, spatial=spatial)
        if spatial is True:
            raise OptionError(
                "`spatial=True` is not defined for ELatentLPIPS with augmentation (each draw warps the "
                "map differently); use LatentLPIPS or augment=None for per-pixel maps."
            )
        _check_generator(generator)
        x, y = self._prepare(input, target, normalize, spatial)
        k = self.num_draws
        # The K draws batched along the batch dimension, draw-major: sample i of draw j at j * B + i.
        if k > 1:
            x_k = einops.repeat(x, "b c h w -> (k b) c h w", k=k)
            y_k = einops.repeat(y, "b c h w -> (k b) c h w", k=k)
        else:  # one draw: no copies (and no repeat / mean in the graph)
            x_k, y_k = x, y
        xa, ya = self.augment._run((x_k, y_k), generator, None)  # float32+ resampling, outside autocast
        value = self._distance(xa, ya, spatial=False)
        if k > 1:
            value = einops.reduce(value, "(k b) -> b", "mean", k=k)
        if self.l1_weight:
            value = self._plus_l1(value, self._l1(x, y))
        return _reduce(value, self.reduction)


def _check_flag(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise DTypeError(f"Expected `{name}` to be a bool, but got {type(value).__name__} ({value!r}).")


def _consume_reference_extras(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre-hook: accept the reference state dict layout explicitly.

    * ``lins.N.*`` duplicates of ``linN.*`` are removed after checking they equal their twin (a
      missing or different head still fails the load);
    * heads saved without dropout (``linN.model.0.weight``) are renamed to ``linN.model.1.weight``;
    * the augmentation buffers ``augment.p`` (a scalar) and ``augment.Hz_geom`` (the ``sym6``
      filter) are checked and dropped: our augmentation keeps no state.
    """
    for k in range(5):
        alt, main = f"{prefix}lin{k}.model.0.weight", f"{prefix}lin{k}.model.1.weight"
        if alt in state_dict and main not in state_dict:
            state_dict[main] = state_dict.pop(alt)
    for key in [k for k in state_dict if k.startswith(prefix + "lins.")]:
        rest = key[len(prefix + "lins.") :]
        idx, _, tail = rest.partition(".")
        value = state_dict.pop(key)
        twin_tail = (
            "model.1.weight"
            if tail == "model.0.weight" and f"{prefix}lin{idx}.model.0.weight" not in state_dict
            else tail
        )
        twin = f"{prefix}lin{idx}.{twin_tail}"
        if twin in state_dict:
            other = state_dict[twin]
            if other.shape != value.shape or not torch.equal(other, value):
                error_msgs.append(
                    f"duplicate head `{key}` {list(value.shape)} disagrees with `{twin}` {list(other.shape)}; "
                    "the reference stores each head twice and both copies must be equal."
                )
    p_key, f_key = prefix + "augment.p", prefix + "augment.Hz_geom"
    if p_key in state_dict:
        p = state_dict.pop(p_key)
        if p.numel() != 1 or not 0.0 <= float(p) <= 1.0:
            error_msgs.append(f"`{p_key}` must be a probability scalar, but has shape {list(p.shape)}.")
    if f_key in state_dict:
        f = state_dict.pop(f_key)
        ref = sym6_filter(dtype=torch.float64)
        if f.shape != ref.shape or not torch.allclose(f.double().cpu(), ref, atol=1e-6):
            error_msgs.append(
                f"`{f_key}` must be the 12-tap sym6 filter {list(ref.shape)}, but got shape {list(f.shape)} "
                "or different values; this checkpoint's augmentation is not the reference ADA pipeline."
            )


# ----------------------------------------------------------------------------------------------
# Pixel-space baseline


def _decode(decoder: Any, z: torch.Tensor) -> torch.Tensor:
    out = decoder.decode(z) if hasattr(decoder, "decode") else decoder(z)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[1] != 3 or out.shape[0] != z.shape[0]:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ShapeError(
            f"Expected `vae_decoder` to return RGB images (B, 3, H, W) in [-1, 1], but for a latent batch of "
            f"shape {tuple(z.shape)} it returned {got}. Pass a VAE decoder (e.g. diffusers AutoencoderKL, whose "
            "decode(z).sample is taken) or a callable z -> image batch.",
            name="vae_decoder",
            expected=(z.shape[0], 3),
            actual=tuple(out.shape) if isinstance(out, torch.Tensor) else None,
        )
    return out


def _decoder_latent_channels(decoder: Any) -> int | None:
    """The latent channel count a diffusers-style decoder declares (``config.latent_channels``), if any."""
    config = getattr(decoder, "config", None)
    value = getattr(config, "latent_channels", None) if config is not None else None
    if value is None and isinstance(config, Mapping):
        value = config.get("latent_channels")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


class PixelLPIPS(nn.Module):
    r"""Baseline: decode both latents with a VAE decoder, then the ``lpips`` package's LPIPS.

    .. math::

        d(x, y) = \mathrm{LPIPS}\big(D(x / s + b),\; D(y / s + b)\big)

    for a decoder :math:`D` producing images in [-1, 1]; ``(s, b)`` is the scale/shift of ``latent``
    (skipped for ``latent=None`` or ``normalize=True``, i.e. raw latents). Same call as
    :class:`LatentLPIPS`, so swapping losses is one line. The decoder is frozen
    (``requires_grad_(False)``, eval) but gradients reach the latents, which is what makes this
    path ~10× more expensive (Kang et al., ECCV 2024, arXiv:2405.05967). Image-only: 5-D video latents
    ``(B, C, F, H, W)`` are refused (decode them with the video VAE and compare frames yourself).

    Precision: the latents are cast to the decoder's dtype (its parameters'), the images to the ``lpips``
    network's dtype, outside autocast; the result comes back in at least float32 and at least the
    inputs' precision, like :class:`LatentLPIPS`.

    Args:
        vae_decoder: a module with ``decode(z)`` (e.g. diffusers ``AutoencoderKL``; ``.sample`` is
            taken) or a callable ``z -> image``, returning ``(B, 3, H, W)`` images in [-1, 1].
        net: ``"vgg"``, ``"alex"`` or ``"squeeze"`` (the ``lpips`` trunks).
        latent: VAE name from :data:`LATENT_SPECS` whose scaling the inputs carry, or ``None`` (the inputs
            are what the decoder takes).
        pretrained_heads: load the ``lpips`` package's calibrated heads (shipped with it, no download);
            ``False`` sets every head weight to 1 (the uncalibrated distance: each layer's mean squared
            difference of unit-normalised features, summed; the ``lpips`` package would draw them at random).
        trunk_weights: a torchvision ImageNet state dict file for the trunk (``features.N`` keys,
            read with ``weights_only=True``); ``None`` keeps a random trunk (nothing is downloaded).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (shape ``(B,)``).

    Raises:
        OptionError: on an unknown ``net``, ``latent`` or ``reduction``.
        DTypeError: if ``vae_decoder`` is neither callable nor has ``decode``, ``pretrained_heads`` is not a
            bool, or ``trunk_weights`` is not a path.
        FileNotFoundError: if ``trunk_weights`` names no file.
        ShapeError: if a ``trunk_weights`` tensor has another shape than the trunk's.
        ValueError: if ``trunk_weights`` cannot be read or lacks a trunk key.

    Example:
        >>> decoder = torch.nn.Sequential(torch.nn.Upsample(scale_factor=4), torch.nn.Conv2d(4, 3, 1))
        >>> loss_fn = PixelLPIPS(decoder, net="alex", latent=None, pretrained_heads=False)
        >>> loss_fn(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), reduction="none").shape
        torch.Size([2])
    """

    def __init__(
        self,
        vae_decoder: nn.Module | Callable[[torch.Tensor], Any],
        net: str = "vgg",
        *,
        latent: str | None = None,
        pretrained_heads: bool = True,
        trunk_weights: str | os.PathLike[str] | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if not (callable(vae_decoder) or callable(getattr(vae_decoder, "decode", None))):
            raise DTypeError(
                f"Expected `vae_decoder` to be a module with decode(z) (e.g. diffusers AutoencoderKL) or a "
                f"callable z -> image, but got {type(vae_decoder).__name__}."
            )
        check_option(net, "net", ("vgg", "alex", "squeeze"))
        check_option(reduction, "reduction", _REDUCTIONS)
        if latent is not None:
            check_option(latent, "latent", LATENT_SPECS)
        _check_flag(pretrained_heads, "pretrained_heads")
        if trunk_weights is not None:
            _check_path(trunk_weights, "trunk_weights")
        import lpips  # heavy: pulls in torchvision

        self.latent = latent
        self.reduction = reduction
        self.vae_decoder = vae_decoder
        if isinstance(vae_decoder, nn.Module):
            vae_decoder.requires_grad_(False).eval()
        with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=`
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.lpips = lpips.LPIPS(pretrained=pretrained_heads, net=net, pnet_rand=True, verbose=False)
        if (
            not pretrained_heads
        ):  # lpips initialises unloaded heads randomly (signed): make them the plain sum
            with torch.no_grad():
                for head in self.lpips.lins:
                    head.model[-1].weight.fill_(1.0)
        if trunk_weights is not None:
            self._load_trunk(trunk_weights)
        else:
            logger.info("PixelLPIPS: random %s trunk (pass trunk_weights= for ImageNet weights).", net)
        self.lpips.requires_grad_(False).eval()

    def _load_trunk(self, path: str | os.PathLike[str]) -> None:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling restrictions name the offending global
            raise ValueError(
                f"Could not read `trunk_weights` {path} with torch.load(weights_only=True): {exc}. Only plain "
                "tensor state dicts (torchvision's `features.N` keys) are accepted."
            ) from exc
        if not isinstance(sd, Mapping):
            raise ValueError(
                f"Expected `trunk_weights` {path} to hold a state dict (a mapping), but got {type(sd).__name__}."
            )
        own = self.lpips.net.state_dict()
        mapped = {}
        for key in own:
            _, idx, param = key.split(".", 2)
            src = f"features.{idx}.{param}"
            if src not in sd:
                raise ValueError(
                    f"`trunk_weights` {path} lacks `{src}` (needed for `{key}`); found e.g. {list(sd)[:3]}."
                )
            if sd[src].shape != own[key].shape:
                raise ShapeError(
                    f"`trunk_weights` `{src}` expected {list(own[key].shape)}, found {list(sd[src].shape)}.",
                    name="trunk_weights",
                    expected=tuple(own[key].shape),
                    actual=tuple(sd[src].shape),
                )
            mapped[key] = sd[src]
        self.lpips.net.load_state_dict(mapped, strict=True)

    def train(self, mode: bool = True) -> PixelLPIPS:
        """Keep the module in eval mode whatever ``mode`` is (the decoder and LPIPS are frozen).

        Args:
            mode: ignored.

        Returns:
            The module itself, in eval mode.
        """
        return super().train(False)

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        *,
        normalize: bool = False,
        spatial: bool = False,
        generator: torch.Generator | None = None,
        reduction: str | None = None,
    ) -> torch.Tensor:
        """Decode both latents and compare the images.

        Args:
            input: ``(B, C, H, W)`` latents (e.g. the student's prediction), floating point.
            target: ``(B, C, H, W)`` latents of the same shape.
            normalize: the inputs are raw VAE latents: skip the ``latent``'s unscaling before decoding.
            spatial: return the ``lpips`` per-pixel map ``(B, 1, H', W')`` at the image resolution.
            generator: unused; accepted so the call matches :class:`ELatentLPIPS`.
            reduction: overrides the module's ``reduction`` for this call; ``None`` keeps it.

        Returns:
            A scalar for ``"mean"`` / ``"sum"``, ``(B,)`` for ``"none"``, or the map with ``spatial=True``.

        Raises:
            DTypeError: if an input is not a floating tensor, a flag not a bool or ``generator`` not a
                ``torch.Generator``.
            ShapeError: if the inputs are 5-D video latents (image-only) or not 4-D, have an empty batch or differ
                in shape, their channels differ from the decoder's ``config.latent_channels``, or the decoder returns no
                ``(B, 3, H, W)`` images.
            NonFiniteError: if an input holds NaN/Inf (a value check).
            OptionError: on an unknown ``reduction``.
        """
        for t, name in ((input, "input"), (target, "target")):
            check_not_video(t, name, "PixelLPIPS (an image VAE decoder and an image LPIPS)")
            check_float_input(t, name, ndim=4, layout="(B, C, H, W)", finite=False)
        check_same_shape(input, target, "input", "target")
        _check_flag(normalize, "normalize")
        _check_flag(spatial, "spatial")
        _check_generator(generator)
        red = self.reduction if reduction is None else reduction
        check_option(red, "reduction", _REDUCTIONS)
        channels = _decoder_latent_channels(self.vae_decoder)
        if channels is not None and input.shape[1] != channels:
            raise ShapeError(
                f"Expected `input` to have {channels} channels (the decoder's config.latent_channels), i.e. "
                f"shape (B, {channels}, H, W), but got shape {tuple(input.shape)}.",
                name="input",
                expected=channels,
                actual=tuple(input.shape),
            )
        check_finite(input, "input")
        check_finite(target, "target")
        w = (
            next(iter(self.vae_decoder.parameters()), None)
            if isinstance(self.vae_decoder, nn.Module)
            else None
        )

        def decode(z: torch.Tensor) -> torch.Tensor:
            if self.latent is not None and not normalize:
                _, scale, shift = LATENT_SPECS[self.latent]
                z = z / scale + shift
            return _decode(self.vae_decoder, z.to(w.dtype) if w is not None else z)

        b = input.shape[0]
        if input.requires_grad == target.requires_grad:
            images = decode(torch.cat([input, target]))
            img_x, img_y = images[:b], images[b:]
        else:  # decode the side without gradient without a graph: the decoder's activations dominate
            img_x, img_y = decode(input), decode(target)
        net_dtype = _param_dtype(self.lpips) or torch.float32
        with torch.autocast(device_type=img_x.device.type, enabled=False):
            self.lpips.spatial = spatial
            value = self.lpips(img_x.to(net_dtype), img_y.to(net_dtype))
        value = value.to(_compute_dtype(input.dtype, target.dtype, net_dtype))
        if spatial:
            return value
        return _reduce(value.reshape(b), red)


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffdistill.losses.lpips convert CHECKPOINT OUT.safetensors [--latent NAME]``.

    Converts an official ``*_latest_vgg16_tuned.pth`` or ``*_latent_vgg16.pth.tar`` (or any
    supported checkpoint) into our safetensors layout; the channel count comes from the checkpoint.

    Args:
        argv: the command line after the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status, 0.

    Raises:
        SystemExit: from ``argparse`` on a malformed command line.
        FileNotFoundError: if the checkpoint names no file.
        ValueError: if the checkpoint is not a LatentLPIPS checkpoint or does not fit ``--latent``.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> torch.save(LatentLPIPS(4, weights=None).state_dict(), os.path.join(d, "ref.pth"))
        >>> main(["convert", os.path.join(d, "ref.pth"), os.path.join(d, "out.safetensors")])
        0
    """
    parser = argparse.ArgumentParser(
        prog="python -m diffdistill.losses.lpips", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a checkpoint to safetensors")
    conv.add_argument("checkpoint")
    conv.add_argument("output")
    conv.add_argument("--latent", default=None, help=f"one of {list(LATENT_SPECS)} (default: channel count)")
    args = parser.parse_args(argv)
    _check_path(args.checkpoint, "checkpoint")
    sd, _ = load_latent_lpips_state_dict(args.checkpoint)
    first = sd.get("net.slice1.0.weight")
    if first is None:
        raise ValueError(
            f"`{args.checkpoint}` has no `net.slice1.0.weight`; it is not a LatentLPIPS checkpoint."
        )
    latent: str | int = args.latent if args.latent is not None else int(first.shape[1])
    model = LatentLPIPS(latent, weights=args.checkpoint)
    model.save_pretrained(args.output)
    logger.info("Wrote %s (%d channels)", args.output, model.in_channels)
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess test
    raise SystemExit(main())
