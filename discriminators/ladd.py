r"""LADD's discriminator: conditioned patch heads on the features of a frozen transformer teacher.

Latent Adversarial Diffusion Distillation (Sauer et al. 2024, SD3-Turbo) replaces ADD's DINOv2 discriminator
by the *generative* features of the pretrained teacher: generated and real latents are re-noised to
:math:`x_{\hat t} = (1 - \hat t)\, x_0 + \hat t\, \epsilon` with :math:`\hat t` drawn from a logit-normal
shifted toward high noise (:func:`ladd_renoise_sigma`), the frozen teacher is run on them, the image tokens of
every k-th transformer block are reshaped to their 2-D layout and a small trainable head on each, conditioned
on the noise level and the pooled text embedding, gives patch logits:

.. math::

    D_k(x_{\hat t}, \hat t, c) = \mathrm{head}_k\big(f_k(x_{\hat t}, \hat t, c),\ e(\hat t, c_\text{pool})\big)
    \in \mathbb{R}^{B \times 1 \times h \times w}

**Video teachers (Wan).** ``WanTransformer3DModel`` features are ``(B, C, f, h, w)`` maps
(:class:`TransformerFeatureExtractor`). Our choice: the frames are folded into the batch, each frame's map goes
through the same 2-D :class:`LADDHead` with its sample's conditioning repeated, and the logits come back as one
``(B, 1, f, h, w)`` map per head: patch logits per frame, which the GAN losses average per sample and R1 sums
per sample, as for images. The head mixes no frames: the features already come from Wan's full
spatio-temporal self-attention. FastGen's Wan LADD / DMD2 discriminator differs: it unpatchifies the tokens of
blocks (15, 22, 29) of Wan 1.3B to latent resolution, runs unconditioned 3-D convolution heads and pools them to
one logit per sample and head (NVlabs/FastGen, ``fastgen/networks/Wan/network.py::_unpatchify_features`` and
its video discriminator heads, ``disc_type="multiscale_down_mlp_large"``). Wan has no pooled text embedding
(text enters by cross-attention only): by default its heads are conditioned on the noise level alone
(``pooled_dim`` = 0), or, with ``text_pooling="mean"``, also on the mean of the prompt's text tokens (our choice,
see :class:`LADDDiscriminator`). Wan takes ``timestep`` = σ·1000 unscaled, so ``timestep_scale`` is 1.

The logits plug into the library's GAN losses (:func:`~diffdistill.losses.gan_discriminator_loss`,
:func:`~diffdistill.losses.gan_generator_loss`, hinge as in the paper or non-saturating),
:func:`~diffdistill.losses.r1_penalty` and :func:`~diffdistill.losses.approximate_r1_penalty` unchanged: a list of
tensors, one per head. The class shares the interface of the UNet discriminators
(:class:`~diffdistill.discriminators.DiscriminatorBase`: ``heads``, ``head_parameters``,
``parameter_groups``, ``reset_head``, ``augment``).

References:
    * A. Sauer, F. Boesel, T. Dockhorn, A. Blattmann, P. Esser, R. Rombach, "Fast High-Resolution Image
      Synthesis with Latent Adversarial Diffusion Distillation", arXiv:2403.12015 (abstract: the
      teacher's generative features replace ADD's DINOv2; the noise-level and text conditioned heads and the
      high-noise logit-normal re-noising follow the method as summarised by its re-implementations, section
      numbers not checked against the paper's text).
    * A. Sauer et al., "Adversarial Diffusion Distillation" (ADD), arXiv:2311.17042 (the conditioned
      discriminator heads LADD keeps).
    * T. Miyato, M. Koyama, "cGANs with Projection Discriminator", ICLR 2018 (the projection term).
    * E. Perez et al., "FiLM: Visual Reasoning with a General Conditioning Layer", AAAI 2018.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from .._checks import (
    OptionError,
    ShapeError,
    check_all_finite,
    check_float_input,
    check_generator,
    check_int,
    check_optional_int,
    check_real,
)
from ._inputs import shape_str, timestep_batch
from .discriminator_base import DiscriminatorBase
from .heads import _check_groups, _group_norm, _Head, _module_dtype
from .transformer_features import TransformerFeatureExtractor, transformer_block_names
from .unet_features import BackboneMode

__all__ = [
    "LADDDiscriminator",
    "LADDHead",
    "ladd_renoise_sigma",
    "mean_text_embedding",
    "noise_level_embedding",
]

#: Width of the sinusoidal noise-level embedding (as the timestep embedding of DDPM / SD3's ``Timesteps(256)``).
NOISE_EMBED_DIM = 256


def ladd_renoise_sigma(
    batch: int,
    *,
    mean: float = 1.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Noise levels for LADD's discriminator: a logit-normal shifted toward high noise (σ = 1 is pure noise).

    .. math::

        \hat\sigma = \mathrm{clamp}\big(\mathrm{sigmoid}(m + s\, u),\ \epsilon,\ 1 - \epsilon\big),
        \qquad u \sim \mathcal N(0, 1)

    LADD re-noises the generated and real latents with :math:`\hat t` from a logit-normal whose mean is
    moved toward high noise, so that the discriminator judges global structure rather than fine detail
    (arXiv:2403.12015). Defaults :math:`m = 1, s = 1`: the setting reported for LADD in the
    re-implementations we checked (not read off the paper's text); SANA-Sprint uses :math:`m = -0.6` in its
    TrigFlow parametrisation. Re-noise with :math:`x = (1 - \hat\sigma) x_0 + \hat\sigma \epsilon` and give the
    teacher its timestep input (SD3 and Wan: :math:`1000 \hat\sigma`, FLUX: :math:`\hat\sigma`).

    Args:
        batch: number of noise levels ``B`` (>= 1).
        mean: location :math:`m` of the normal in logit space (> 0 shifts toward noise).
        std: scale :math:`s` (> 0).
        generator: randomness (None: the global generator); the draw happens on its device.
        device: device of the result (None: the generator's, else the CPU).
        eps: clamp margin :math:`\epsilon` keeping :math:`\hat\sigma` strictly inside (0, 1), in [0, 0.5).

    Returns:
        ``(B,)`` float32 :math:`\hat\sigma` in :math:`[\epsilon, 1 - \epsilon]`.

    Raises:
        DTypeError: ``batch`` is not an int, a number is not real, ``generator`` is not a ``torch.Generator``.
        OptionError: ``batch < 1``, ``std <= 0``, ``eps`` outside [0, 0.5), a number is not finite.

    Example:
        >>> sigma = ladd_renoise_sigma(10_000, generator=torch.Generator().manual_seed(0))
        >>> bool((sigma > 0).all() and (sigma < 1).all()), round(float(sigma.median()), 2)  # sigmoid(1) = 0.73
        (True, 0.73)
    """
    batch = check_int(batch, "batch", minimum=1)
    mean = check_real(mean, "mean")
    std = check_real(std, "std", low=0, strict=True)
    eps = check_real(eps, "eps", low=0, high=0.5, high_strict=True)
    check_generator(generator)
    draw_device = generator.device if generator is not None else torch.device(device or "cpu")
    u = torch.randn(batch, generator=generator, device=draw_device, dtype=torch.float64)
    sigma = torch.sigmoid(mean + std * u).clamp(eps, 1.0 - eps).to(torch.float32)
    return sigma if device is None else sigma.to(device)


def noise_level_embedding(noise_level: torch.Tensor, dim: int = NOISE_EMBED_DIM) -> torch.Tensor:
    r"""Sinusoidal embedding of a noise level given on the ``[0, 1000]`` scale (σ·1000).

    .. math::

        e(t) = \big[\cos(t\, \omega_0), \dots, \cos(t\, \omega_{d/2-1}),\ \sin(t\, \omega_0), \dots\big],
        \qquad \omega_i = 10000^{-i / (d/2)}

    (the transformer position encoding of Vaswani et al. 2017 as DDPM and SD3 embed timesteps).

    Args:
        noise_level: ``(B,)`` noise levels, σ·1000 (integer or floating).
        dim: even embedding width ``d`` (default 256).

    Returns:
        ``(B, dim)`` in ``noise_level``'s dtype when floating (float32 for an integer one), at least float32.

    Raises:
        DTypeError: ``noise_level`` is not a real tensor; ``dim`` is not an int.
        ShapeError: ``noise_level`` is not 1-D.
        OptionError: ``dim`` is odd or < 2.

    Example:
        >>> noise_level_embedding(torch.tensor([0.0, 500.0]), 4)
        tensor([[ 1.0000,  1.0000,  0.0000,  0.0000],
                [-0.8838,  0.2837, -0.4678, -0.9589]])
    """
    dim = check_int(dim, "dim", minimum=2)
    if dim % 2:
        raise OptionError(f"Expected `dim` to be even (cos and sin halves), but got {dim}.")
    t = noise_level
    if not isinstance(t, torch.Tensor) or t.dtype == torch.bool or t.is_complex():
        check_float_input(t, "noise_level")  # raises the standard DTypeError
    if t.ndim != 1:
        raise ShapeError(
            f"Expected `noise_level` of shape (B,), but got {shape_str(t.shape)}.",
            name="noise_level",
            expected=1,
            actual=tuple(t.shape),
        )
    dtype = torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class LADDHead(_Head):
    r"""A LADD discriminator head: two 3×3 convs with FiLM and a projection term, giving patch logits.

    .. math::

        h_1 &= \mathrm{SiLU}(\mathrm{GN}(W_1 * x)),\qquad h_1 \leftarrow h_1 \odot (1 + \gamma(e)) + \beta(e) \\
        h_2 &= \mathrm{SiLU}(\mathrm{GN}(W_2 * h_1)) \\
        \text{logits} &= W_3 h_2 + \tfrac{1}{\sqrt{C_h}} \langle h_2, \phi(e) \rangle_\text{channels}

    with :math:`e` the conditioning vector (noise level and pooled text, see :class:`LADDDiscriminator`),
    :math:`\gamma, \beta` a zero-initialised linear FiLM (Perez et al. 2018; the head starts unconditioned)
    and :math:`\phi` a linear projection (Miyato & Koyama 2018, as ADD's heads). Our choice of layers: LADD
    specifies light conditioned heads on the teacher's token maps, not their exact layout.

    Args:
        in_channels: feature channels (the transformer's width).
        cond_dim: width of the conditioning vector :math:`e`.
        channels: hidden width :math:`C_h` (default None: ``min(in_channels, 256)``).
        norm_groups: GroupNorm groups; must divide the hidden width.

    Raises:
        DTypeError: a size is not an int.
        OptionError: a size is < 1, or ``norm_groups`` does not divide the hidden width.

    Shapes:
        ``(B, in_channels, h, w), (B, cond_dim) -> (B, 1, h, w)``.

    Example:
        >>> head = LADDHead(32, 8, channels=16, norm_groups=4)
        >>> head(torch.randn(2, 32, 4, 6), torch.randn(2, 8)).shape
        torch.Size([2, 1, 4, 6])
    """

    def __init__(
        self, in_channels: int, cond_dim: int, *, channels: int | None = None, norm_groups: int = 32
    ) -> None:
        super().__init__()
        in_channels = check_int(in_channels, "in_channels", minimum=1)
        cond_dim = check_int(cond_dim, "cond_dim", minimum=1)
        hidden = check_optional_int(channels, "channels", minimum=1)
        norm_groups = check_int(norm_groups, "norm_groups", minimum=1)
        width = hidden or min(in_channels, 256)
        fix = f", or set `channels` to a multiple of {norm_groups}"
        self.in_channels = in_channels
        self.cond_dim = cond_dim
        self.width = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.norm1 = _group_norm(norm_groups, width, "the head channels", fix)
        self.film = nn.Linear(cond_dim, 2 * width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.norm2 = _group_norm(norm_groups, width, "the head channels", fix)
        self.out = nn.Conv2d(width, 1, 1)
        self.project = nn.Linear(cond_dim, width)
        self.act = nn.SiLU()
        self.init_film()

    def init_film(self) -> None:
        """Zero the FiLM layer, so that a new (or reset) head starts as an unconditioned one."""
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, features: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Patch logits of ``features`` given the conditioning vector ``cond`` (both cast to the head's dtype).

        Args:
            features: ``(B, in_channels, h, w)``, any floating dtype.
            cond: ``(B, cond_dim)``, any floating dtype.

        Returns:
            ``(B, 1, h, w)`` logits.

        Raises:
            DTypeError: ``features`` or ``cond`` is not a floating-point tensor.
            ShapeError: ``features`` is not 4-D, is empty or has other channels; ``cond`` is not
                ``(B, cond_dim)``.
            NonFiniteError: ``features`` or ``cond`` holds NaN / Inf (a value check).
        """
        x = self._features(features)
        check_float_input(cond, "cond", ndim=2, layout="(B, D)", finite=self._check_feature_values)
        if cond.shape != (x.shape[0], self.cond_dim):
            raise ShapeError(
                f"Expected `cond` of shape ({x.shape[0]}, {self.cond_dim}) (the batch of `features` and the head's "
                f"cond_dim), but got {shape_str(cond.shape)}.",
                name="cond",
                expected=(x.shape[0], self.cond_dim),
                actual=tuple(cond.shape),
            )
        e = cond.to(x.dtype)
        h = self.act(self.norm1(self.conv1(x)))
        gamma, beta = self.film(e)[:, :, None, None].chunk(2, dim=1)
        h = h * (1 + gamma) + beta
        h = self.act(self.norm2(self.conv2(h)))
        proj = (h * self.project(e)[:, :, None, None]).sum(dim=1, keepdim=True) / math.sqrt(self.width)
        return self.out(h) + proj


def mean_text_embedding(encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    r"""Mean of a prompt's text tokens, zero-padding tokens left out: a pooled text condition for models without one.

    .. math::

        \bar c_b = \frac{\sum_l m_{bl}\, c_{bl}}{\max(1, \sum_l m_{bl})}, \qquad
        m_{bl} = [\, c_{bl} \neq 0 \,]

    diffusers' Wan pipelines cut the umT5 embedding after the prompt's length and pad it with exact zeros to
    ``max_sequence_length`` (``WanPipeline._get_t5_prompt_embeds``), so the tokens that are all zero are the
    padding; a prompt of padding only gives zeros. Used by :class:`LADDDiscriminator` with
    ``text_pooling="mean"`` (our choice: Wan has no pooled text embedding).

    Args:
        encoder_hidden_states: ``(B, L, D)`` text tokens, floating.

    Returns:
        ``(B, D)`` in the dtype of ``encoder_hidden_states``.

    Raises:
        DTypeError: ``encoder_hidden_states`` is not a floating tensor.
        ShapeError: it is not 3-D or is empty.

    Example:
        >>> tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]])  # two tokens and one padding token
        >>> mean_text_embedding(tokens)
        tensor([[2., 3.]])
    """
    check_float_input(
        encoder_hidden_states, "encoder_hidden_states", ndim=3, layout="(B, L, D)", finite=False
    )
    mask = (encoder_hidden_states != 0).any(dim=-1, keepdim=True).to(encoder_hidden_states.dtype)
    total = (encoder_hidden_states * mask).sum(dim=1)
    return total / mask.sum(dim=1).clamp_min(1.0)


def _takes_keyword(model: Any, name: str) -> bool:
    """Whether ``model.forward`` accepts the keyword ``name`` (a named parameter or ``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _default_timestep_scale(model: Any) -> float:
    """1000 for models that take σ (FLUX, Qwen-Image: they multiply by 1000 inside), else 1 (SD3 and Wan take σ·1000
    unscaled).

    The class is named over its whole MRO: FSDP2's ``fully_shard`` swaps a module's class for a generated
    subclass ``FSDP<Name>``, and a sharded FLUX read by its own class name alone would get 1 (heads conditioned
    on σ instead of σ·1000; measured: flow_dmd2.py's FSDP2 updates then left DDP's by 41-82 %)."""
    names = [cls.__name__ for cls in type(model).__mro__]
    return 1000.0 if any(name.startswith(("Flux", "QwenImage")) for name in names) else 1.0


def _run_cond_heads(
    heads: nn.ModuleList,
    cond_embed: nn.Module,
    features: list[torch.Tensor],
    noise_level: torch.Tensor,
    pooled: torch.Tensor | None,
) -> list[torch.Tensor]:
    """Conditioning MLP and heads with autocast off, in the heads' dtype (float32 logits, float64 for a float64 D).

    A video feature map ``(B, C, f, h, w)`` has its frames folded into the batch, the conditioning repeated per
    frame, and its logits unfolded to ``(B, 1, f, h, w)``."""
    dtype = _module_dtype(heads)
    out_dtype = torch.promote_types(dtype, torch.float32)
    device_type = noise_level.device.type
    ctx = (
        torch.autocast(device_type=device_type, enabled=False)
        if torch.amp.is_autocast_available(device_type)
        else contextlib.nullcontext()  # e.g. "meta" (FLOP counting)
    )
    with ctx:
        cond_in = noise_level_embedding(noise_level.to(dtype)).to(dtype)
        if pooled is not None:
            cond_in = torch.cat([cond_in, pooled.to(dtype)], dim=1)
        cond = cond_embed(cond_in)
        out = []
        for head, f in zip(heads, features):
            if f.ndim == 5:  # video: frames into the batch, one conditioning per frame
                frames = f.shape[2]
                folded = f.to(dtype).movedim(2, 1).flatten(0, 1)
                logits = head(folded, cond.repeat_interleave(frames, dim=0))
                out.append(logits.unflatten(0, (f.shape[0], frames)).movedim(1, 2).to(out_dtype))
            else:
                out.append(head(f.to(dtype), cond).to(out_dtype))
        return out


class LADDDiscriminator(DiscriminatorBase):
    r"""LADD's discriminator (arXiv:2403.12015): conditioned heads on every k-th block of a frozen transformer.

    ``D(x_t, timestep, pooled_projections=..., **model_kwargs)`` runs the teacher on the re-noised latents
    ``x_t`` with the keyword arguments the teacher takes (:class:`TransformerFeatureExtractor`: blocks after
    the last readout do not run), embeds the noise level and the pooled text into

    .. math::

        e = \mathrm{MLP}\big([\,\mathrm{sinusoidal}(s \cdot \text{timestep}),\ c_\text{pool}\,]\big)

    (``s`` = ``timestep_scale`` maps the model's timestep input to σ·1000) and returns one ``(B, 1, h, w)``
    logit map per readout block from a :class:`LADDHead` (a video teacher, Wan: ``(B, 1, f, h, w)``, one map per
    frame, see the module docstring). A teacher without a pooled text embedding (Qwen-Image, Wan) gets heads
    conditioned on the noise level only, unless ``text_pooling="mean"`` puts the mean of the text tokens
    (:func:`mean_text_embedding` of ``encoder_hidden_states``) in place of :math:`c_\text{pool}`;
    ``pooled_projections`` reaches the teacher only when its ``forward`` takes it. The heads and the conditioning MLP run in float32
    outside autocast (float64 for a float64 discriminator); the teacher runs in its own dtype. The logits are
    the list the GAN losses and R1 penalties of :mod:`diffdistill.losses` take.

    Training step, as the paper: the student's sample :math:`\hat x_0` and a real (or teacher-generated)
    latent are re-noised with the same law, :math:`\hat\sigma` from :func:`ladd_renoise_sigma`,
    :math:`x = (1 - \hat\sigma) x_0 + \hat\sigma \epsilon`; the discriminator step uses
    ``gan_discriminator_loss(D(x_real), D(x_fake.detach()), loss="hinge")``, the student step
    ``gan_generator_loss(D(x_fake))``, gradients reaching the student through the frozen teacher.

    Args:
        model: the teacher transformer (``SD3Transformer2DModel``, ``FluxTransformer2DModel``,
            ``WanTransformer3DModel``, any transformer :class:`TransformerFeatureExtractor` takes), frozen or with
            trainable LoRA adapters.
        blocks: the readout blocks (indices in execution order or module names); exclusive with ``every``.
        every: read every k-th block: indices ``k-1, 2k-1, ...`` (so the last of ``n`` blocks is read when
            ``k`` divides ``n``). Default (both None): ``k = max(1, n // 4)``, about four heads (our choice:
            SANA-Sprint reads 4 of 20 blocks, FastGen's Wan LADD 3 of 30).
        block_lists: the model's block lists, see :func:`transformer_block_names`.
        backbone: ``"shared"`` (default: the teacher by reference, not saved with the discriminator), ``"own"``
            or ``"copy"``.
        trainable: ``requires_grad`` of an ``"own"`` / ``"copy"`` backbone (None: unchanged).
        head_channels: hidden width of every head (default None: ``min(C, 256)``).
        norm_groups: GroupNorm groups of the heads; must divide the head width.
        cond_dim: width of the conditioning vector ``e`` (default 256).
        pooled_dim: width of ``pooled_projections`` (default None: the config's ``pooled_projection_dim``, 0
            when absent: then the heads are conditioned on the noise level only); with ``text_pooling="mean"``
            the width of the text tokens (default None: the config's ``text_dim`` (Wan) or
            ``joint_attention_dim``).
        text_pooling: what the heads take as the text condition: None (default) ``pooled_projections`` (when
            ``pooled_dim > 0``); ``"mean"`` the mean of the non-padding tokens of ``encoder_hidden_states``
            (:func:`mean_text_embedding`; our choice for teachers without a pooled embedding, e.g. Wan).
        timestep_scale: ``s`` with ``s * timestep = σ·1000`` (default None: 1000 for FLUX / Qwen-Image, which
            take σ; 1 otherwise, e.g. SD3 and Wan, which take σ·1000).
        augment: optional module applied to the input in training mode (it must accept the model's layout).
        gradient_checkpointing: recompute the teacher's blocks in the backward pass (``None``: leave the
            model's own checkpointing setting in force, e.g. a shared base's; see
            :class:`~diffdistill.discriminators.TransformerFeatureExtractor`). ``True`` on a
            :class:`~diffdistill.students.SharedBase`'s model uses the base's checkpoint function when
            ``base.enable_gradient_checkpointing()`` installed it, and is refused while an adapter is active
            without it.

    Raises:
        DTypeError: ``model`` is not a module; a size is not an int; a flag is not a bool; ``augment`` is not
            callable; ``blocks`` has the wrong type.
        OptionError: both ``blocks`` and ``every`` are given; a block does not exist or repeats; a size is
            < 1; ``norm_groups`` does not divide the head width; ``backbone`` is unknown; ``trainable`` is set
            with ``"shared"``; ``timestep_scale`` is not > 0; ``text_pooling`` is unknown, or ``"mean"`` without
            a text width in the config or ``pooled_dim``.

    Example:
        >>> from diffusers import SD3Transformer2DModel
        >>> from diffdistill.losses import gan_discriminator_loss
        >>> teacher = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
        ...     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        ...     pooled_projection_dim=16, pos_embed_max_size=16).requires_grad_(False)
        >>> disc = LADDDiscriminator(teacher, every=2, norm_groups=4)
        >>> disc.blocks
        ('transformer_blocks.1', 'transformer_blocks.3')
        >>> sigma = ladd_renoise_sigma(2, generator=torch.Generator().manual_seed(0))
        >>> x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        >>> x = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        >>> cond = dict(encoder_hidden_states=torch.randn(2, 5, 16), pooled_projections=torch.randn(2, 16))
        >>> logits = disc(x, 1000 * sigma, **cond)
        >>> [tuple(l.shape) for l in logits]
        [(2, 1, 4, 4), (2, 1, 4, 4)]
        >>> loss, _ = gan_discriminator_loss(logits, disc(x.flip(0), 1000 * sigma, **cond), loss="hinge")
        >>> loss.backward()
    """

    extractor: TransformerFeatureExtractor
    blocks: tuple[str, ...]
    _new_layer_names = ("cond_embed",)

    def __init__(
        self,
        model: nn.Module,
        blocks: int | str | Sequence[int | str] | None = None,
        *,
        every: int | None = None,
        block_lists: Sequence[str] | None = None,
        backbone: BackboneMode = "shared",
        trainable: bool | None = None,
        head_channels: int | None = None,
        norm_groups: int = 32,
        cond_dim: int = 256,
        pooled_dim: int | None = None,
        text_pooling: Literal["mean"] | None = None,
        timestep_scale: float | None = None,
        augment: nn.Module | None = None,
        gradient_checkpointing: bool | None = False,
    ) -> None:
        super().__init__()
        if text_pooling is not None and text_pooling != "mean":
            raise OptionError(
                f"Expected `text_pooling` to be None (heads take `pooled_projections`) or 'mean' (the mean of the "
                f"text tokens), but got {text_pooling!r}."
            )
        every = check_optional_int(every, "every", minimum=1)
        width = check_optional_int(head_channels, "head_channels", minimum=1)
        groups = check_int(norm_groups, "norm_groups", minimum=1)
        cond_dim = check_int(cond_dim, "cond_dim", minimum=1)
        pooled_dim = check_optional_int(pooled_dim, "pooled_dim", minimum=0)
        if blocks is not None and every is not None:
            raise OptionError(
                f"Pass either `blocks` or `every`, not both (got blocks={blocks!r}, every={every})."
            )
        names = transformer_block_names(model, block_lists)
        if blocks is None:
            k = every or max(1, len(names) // 4)
            blocks = tuple(range(k - 1, len(names), k))
            if not blocks:
                raise OptionError(
                    f"Expected `every` <= the model's {len(names)} blocks, but got {k}: no block would be read."
                )
        self.extractor = TransformerFeatureExtractor(
            model,
            blocks,
            block_lists=block_lists,
            backbone=backbone,
            trainable=trainable,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.blocks = self.extractor.blocks
        net = self.extractor.trunk
        cfg = getattr(net, "config", None)

        def config_int(key: str) -> int | None:
            got = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
            return int(got) if isinstance(got, int) and not isinstance(got, bool) else None

        if pooled_dim is None and text_pooling == "mean":
            pooled_dim = config_int("text_dim") or config_int("joint_attention_dim")
            if pooled_dim is None:
                raise OptionError(
                    f"text_pooling='mean' conditions the heads on the mean text token, but the config of "
                    f"{type(net).__name__} has no `text_dim` / `joint_attention_dim`: pass `pooled_dim`, the width of "
                    "`encoder_hidden_states`."
                )
        if pooled_dim is None:
            pooled_dim = config_int("pooled_projection_dim") or 0
        if text_pooling == "mean" and pooled_dim == 0:
            raise OptionError(
                "Expected `pooled_dim` > 0 with text_pooling='mean' (the text width), but got 0."
            )
        self.pooled_dim = pooled_dim
        self.text_pooling = text_pooling
        self._teacher_takes_pooled = _takes_keyword(net, "pooled_projections")
        self.timestep_scale = (
            _default_timestep_scale(net)
            if timestep_scale is None
            else check_real(timestep_scale, "timestep_scale", low=0, strict=True)
        )
        channels = next(iter(self.extractor.channels.values()))
        _check_groups(
            groups,
            width or min(channels, 256),
            "`head_channels`" if width else "the default head width min(C, 256)",
            f", or set `head_channels` to a multiple of {groups}",
        )
        self.cond_embed = nn.Sequential(
            nn.Linear(NOISE_EMBED_DIM + pooled_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )
        self.heads = nn.ModuleList(
            [
                LADDHead(self.extractor.channels[b], cond_dim, channels=width, norm_groups=groups)
                for b in self.blocks
            ]
        )
        self._finish_init(augment)

    def _init_new_layers(self) -> None:
        for head in self.heads:
            if isinstance(head, LADDHead):
                head.init_film()

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        *,
        pooled_projections: torch.Tensor | None = None,
        grid_size: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        **model_kwargs: Any,
    ) -> list[torch.Tensor]:
        """Patch logits of the re-noised latents, one map per readout block, in execution order.

        Args:
            hidden_states: the teacher's input at noise level ``timestep``: ``(B, C, H, W)`` latents (SD3),
                packed tokens ``(B, L, C)`` (FLUX) or video latents ``(B, C, F, H, W)`` (Wan), any floating dtype
                (cast to the teacher's).
            timestep: the teacher's timestep input (SD3, Wan: σ·1000, FLUX: σ): a number, ``()``, ``(1,)`` or
                ``(B,)``; also the heads' noise-level condition (times ``timestep_scale``).
            pooled_projections: the pooled text embedding ``(B, pooled_dim)``, given to the teacher when its
                ``forward`` takes it and, with ``text_pooling=None``, to the heads (None only for ``pooled_dim ==
                0`` or ``text_pooling="mean"``).
            grid_size: the patch grid ``(h, w)`` of packed tokens (FLUX: half the latent size); None for
                ``(B, C, H, W)`` latents.
            generator: randomness of ``augment`` (None: the global generator).
            **model_kwargs: the teacher's other keyword arguments (``encoder_hidden_states``; FLUX: ``img_ids``,
                ``txt_ids``, ``guidance``; ``joint_attention_kwargs`` ...).

        Returns:
            One ``(B, 1, h, w)`` (video: ``(B, 1, f, h, w)``) float32 (float64 for a float64 discriminator) logit
            map per block.

        Raises:
            DTypeError: an input is not a floating tensor; ``timestep`` is not a number or real tensor.
            ShapeError: ``hidden_states`` does not fit the teacher; ``pooled_projections`` is not
                ``(B, pooled_dim)``; a condition has another batch size; ``grid_size`` does not fit; with
                ``text_pooling="mean"``, ``encoder_hidden_states`` is not ``(B, L, pooled_dim)``.
            OptionError: ``grid_size`` is missing for packed tokens.
            ValueError: ``pooled_projections`` is None although the heads take it (``pooled_dim > 0``), or
                ``encoder_hidden_states`` is missing with ``text_pooling="mean"``.
            NonFiniteError: an input holds NaN / Inf (a value check).
        """
        sample = self._prepare_sample(hidden_states, "hidden_states")
        batch = sample.shape[0]
        t = timestep_batch(timestep, batch, sample.device, "timestep")
        pooled = self._check_pooled(pooled_projections, batch)
        text = self._text_condition(model_kwargs.get("encoder_hidden_states"), batch)
        check_all_finite([("timestep", t)])
        (sample,) = self._augment(sample, generator=generator)
        if pooled is not None and self._teacher_takes_pooled:
            model_kwargs["pooled_projections"] = pooled
        feats = self.extractor(sample, grid_size=grid_size, timestep=t, **model_kwargs)
        noise_level = (t if t.is_floating_point() else t.float()) * self.timestep_scale
        if text is None and self.pooled_dim:
            text = pooled
        return _run_cond_heads(
            self.heads, self.cond_embed, [feats[b] for b in self.blocks], noise_level, text
        )

    def _text_condition(self, tokens: Any, batch: int) -> torch.Tensor | None:
        """With ``text_pooling="mean"``: the mean text token of ``encoder_hidden_states`` (checked), else None."""
        if self.text_pooling is None:
            return None
        if tokens is None:
            raise ValueError(
                "text_pooling='mean' conditions the heads on the mean text token, but `encoder_hidden_states` is "
                "None. Pass the prompt embedding the teacher takes."
            )
        check_float_input(tokens, "encoder_hidden_states", ndim=3, layout="(B, L, D)", finite=False)
        if tokens.shape[0] != batch or tokens.shape[2] != self.pooled_dim:
            raise ShapeError(
                f"Expected `encoder_hidden_states` of shape ({batch}, L, {self.pooled_dim}) (the batch of "
                f"`hidden_states` and the text width pooled_dim), but got {shape_str(tokens.shape)}.",
                name="encoder_hidden_states",
                expected=(batch, self.pooled_dim),
                actual=tuple(tokens.shape),
            )
        return mean_text_embedding(tokens)

    def _check_pooled(self, pooled: Any, batch: int) -> torch.Tensor | None:
        if self.text_pooling is not None:  # the heads pool the text: pooled_projections is the teacher's only
            if pooled is not None:
                check_float_input(pooled, "pooled_projections", ndim=2, layout="(B, D)", finite=False)
            return pooled
        if pooled is None:
            if self.pooled_dim:
                raise ValueError(
                    f"The heads are conditioned on the pooled text embedding (pooled_dim={self.pooled_dim}), but "
                    "`pooled_projections` is None. Pass the pooled text embedding the teacher takes."
                )
            return None
        check_float_input(pooled, "pooled_projections", ndim=2, layout="(B, D)", finite=False)
        if self.pooled_dim and pooled.shape != (batch, self.pooled_dim):
            raise ShapeError(
                f"Expected `pooled_projections` of shape ({batch}, {self.pooled_dim}) (the batch of `hidden_states` "
                f"and pooled_dim), but got {shape_str(pooled.shape)}.",
                name="pooled_projections",
                expected=(batch, self.pooled_dim),
                actual=tuple(pooled.shape),
            )
        return pooled

    def extra_repr(self) -> str:
        return (
            f"blocks={list(self.blocks)}, timestep_scale={self.timestep_scale}, pooled_dim={self.pooled_dim}, "
            f"text_pooling={self.text_pooling!r}"
        )
