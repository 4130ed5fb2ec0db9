r"""Adversarial losses for distillation: GAN objectives, R1 penalties, mix-and-match negatives, re-noising.

Every loss here takes discriminator **logits** (the raw output before any sigmoid) and returns
``(loss, logs)``: the loss tensor (0-d for ``reduction="mean"`` / ``"sum"``, ``(B,)`` for ``"none"``) and a
dict of detached float32 0-d tensors for logging (no ``.item()``, so no device sync). Losses compute in
float32 when the logits are float16/bfloat16 and in float64 when they are float64. Logits and inputs are
``(B, ...)``: per-sample means (GAN losses) and sums (R1) run over every non-batch dim, so video patch logits
``(B, 1, F, h, w)`` and video latents ``(B, C, F, H, W)`` work as image ones do.

Objectives, for real logits :math:`r` and fake logits :math:`f`:

=====================  ===============================================  =======================================
``loss``               discriminator :math:`L_D`                        generator :math:`L_G`
=====================  ===============================================  =======================================
``"non_saturating"``   :math:`\mathrm{sp}(-r) + \mathrm{sp}(f)`         :math:`\mathrm{sp}(-f)`
``"hinge"``            :math:`\max(0, 1 - r) + \max(0, 1 + f)`          :math:`-f` or :math:`\max(0, 1 - f)`
``"least_squares"``    :math:`\tfrac12 (r - 1)^2 + \tfrac12 f^2`        :math:`\tfrac12 (f - 1)^2`
=====================  ===============================================  =======================================

with :math:`\mathrm{sp}(x) = \log(1 + e^x)`, so that the non-saturating row is
:math:`-\log D(x) - \log(1 - D(\hat x))` and :math:`-\log D(\hat x)` for :math:`D = \sigma(\text{logit})`.

A multi-head discriminator (several readouts or feature levels, each a tensor of any shape
``(B, ...)``) passes a list of logits: each head's elementwise loss is averaged over its non-batch
dimensions first, then heads are averaged with ``head_weights`` (normalised to sum to 1).

When the GAN term earns its place (measured on the issue-20 toy, ``benchmarks/toy_losses.py --mixture
hard``: a one-step generator from pure noise, 3,000 steps, 2 seeds, 1-step sliced Wasserstein to the data,
data vs data 0.016): a GAN term fixes what a regression target gets wrong, and adds nothing to a target that
is already right.

* Regression to the teacher's *exact* ODE solution from the same noise (32 DDIM steps of an exact teacher,
  Diffusion2GAN's pairs): 0.059 ± 0.010 alone, 0.058 ± 0.009 with a non-saturating GAN term of weight 0.1
  whose discriminator sees the regression targets as real. The target is the right sample: there is nothing
  left for the discriminator to find.
* Regression to a *blurry* target (a 4-step teacher, SW 0.187, as a few-step teacher or a cheap solver
  gives): 0.188 ± 0.005 alone (it copies the blur), 0.149 ± 0.005 with the GAN term (weight 0.1) whose
  discriminator sees **data** as real. Show the discriminator samples of the distribution you want, not the
  regression targets, or it learns the targets' errors as "real".
* GAN alone (discriminator on data, generator from the teacher's x0 estimate, no regression): 0.148 ± 0.004,
  0.145 ± 0.001 with R1 (:func:`r1_penalty`, gamma 1): it finds the modes, less precisely than the
  regression onto exact pairs.

Settings of those runs (a starting point, not a tuned optimum): discriminator inputs re-noised to a random
timestep (:func:`renoise_for_discriminator`, SDXL-Lightning Sec. 3.7) with the timestep as an input, Adam
``(0, 0.99)`` for generator and discriminator (SDXL-Lightning's), discriminator lr 3x the generator's, one
discriminator step per generator step, no R1 unless stated, an EMA (0.995) of the generator sampled.

References:
    * Goodfellow et al., "Generative Adversarial Nets", NeurIPS 2014 (non-saturating loss).
    * S. Lin, A. Wang, X. Yang, "SDXL-Lightning", arXiv:2402.13929, Eq. 20-21 (non-saturating),
      Sec. 3.7 / Eq. 25-26 (multi-timestep re-noising of the discriminator inputs).
    * T. Yin et al., "Improved Distribution Matching Distillation" (DMD2), arXiv:2405.14867 (softplus form).
    * J. H. Lim, J. C. Ye, "Geometric GAN", arXiv:1705.02894 (hinge loss);
      F.-Y. Wang et al., "Phased Consistency Model" (PCM), arXiv:2405.18407 (hinge with a ReLU generator).
    * X. Mao et al., "Least Squares Generative Adversarial Networks", ICCV 2017 (a = 0, b = c = 1).
    * L. Mescheder, A. Geiger, S. Nowozin, "Which Training Methods for GANs do actually Converge?",
      ICML 2018 (R1).
    * T. Karras et al., "Analyzing and Improving the Image Quality of StyleGAN" (StyleGAN2), CVPR 2020
      (lazy regularisation).
    * M. Kang et al., "Distilling Diffusion Models into Conditional GANs" (Diffusion2GAN),
      arXiv:2405.05967 (single-sample lazy R1, mix-and-match negatives).
    * S. Lin et al., "Diffusion Adversarial Post-Training for One-Step Video Generation" (APT),
      arXiv:2501.08316 (approximated R1).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import (
    SHARED_CONDITION_HINT,
    DTypeError,
    OptionError,
    ShapeError,
    check_dtype_floating,
    check_finite,
    check_float_input,
    check_int,
    check_option,
    check_real,
    check_tensor,
    is_shared_condition,
)
from .._outputs import first_tensor
from ..schedulers.timestep_samplers import LIGHTNING_DISCRIMINATOR_TIMESTEPS, categorical_timesteps
from .distances import _reduce

__all__ = [
    "GANLoss",
    "MixAndMatch",
    "RenoisedSamples",
    "approximate_r1_penalty",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "lazy_r1_penalty",
    "mix_and_match",
    "r1_penalty",
    "random_derangement",
    "renoise_for_discriminator",
]

GANKind = Literal["non_saturating", "hinge", "least_squares"]
HingeGenerator = Literal["linear", "relu"]
Reduction = Literal["mean", "sum", "none"]
Logits = torch.Tensor | Sequence[torch.Tensor]

_KINDS = ("non_saturating", "hinge", "least_squares")
_HINGE_G = ("linear", "relu")
_REDUCTIONS = ("mean", "sum", "none")
_MISMATCH = ("all", "cond", "noise")


# --------------------------------------------------------------------------------------------- helpers
def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 -> float32; float32 and float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _log_scalar(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float()


def _as_heads(logits: Logits, name: str) -> list[torch.Tensor]:
    """Validate one tensor or a non-empty list of tensors of shape ``(B, ...)``; return a list."""
    heads = [logits] if isinstance(logits, torch.Tensor) else logits
    if not isinstance(heads, (list, tuple)) or len(heads) == 0:
        raise DTypeError(
            f"Expected `{name}` to be a tensor of logits or a non-empty list/tuple of them (one per "
            f"discriminator head), but got {type(logits).__name__}."
        )
    out = []
    for i, head in enumerate(heads):
        label = name if isinstance(logits, torch.Tensor) else f"{name}[{i}]"
        check_tensor(head, label)
        check_dtype_floating(head, label)
        if head.ndim == 0:
            raise ShapeError(
                f"Expected `{label}` to have a batch dimension, shape (B, ...), but got a 0-d tensor. "
                f"Use {label}.reshape(1) for a single sample.",
                name=label,
                expected="(B, ...)",
                actual=(),
            )
        check_float_input(head, label)  # non-empty, and finite (a value check)
        out.append(head)
    return out


def _head_weights(head_weights: Sequence[float] | None, num_heads: int | None) -> list[float]:
    """Normalised head weights (uniform when None); ``num_heads=None`` validates without a head count."""
    if head_weights is None:
        return [] if num_heads is None else [1.0 / num_heads] * num_heads
    if isinstance(head_weights, (str, bytes)) or not isinstance(head_weights, (Sequence, torch.Tensor)):
        raise OptionError(
            f"Expected `head_weights` to be a sequence with one relative weight per discriminator head, e.g. "
            f"(1.0, 1.0), or None, but got {type(head_weights).__name__} {head_weights!r}."
        )
    try:
        weights = [float(w) for w in head_weights]
    except (TypeError, ValueError, RuntimeError):
        raise OptionError(
            f"Expected `head_weights` to hold numbers, one relative weight per discriminator head, but got "
            f"{head_weights!r}."
        ) from None
    if num_heads is not None and len(weights) != num_heads:
        raise OptionError(
            f"Expected `head_weights` to have one entry per discriminator head ({num_heads}), but got "
            f"{len(weights)}: {list(head_weights)}."
        )
    total = sum(weights)
    if any(not 0 <= w < math.inf for w in weights) or not total > 0:
        raise OptionError(
            f"Expected `head_weights` to be finite and >= 0 with a positive sum, but got {list(head_weights)}: "
            "give one relative weight per head, e.g. all 1.0 (they are normalised to sum 1)."
        )
    return [w / total for w in weights]


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: ``(B, ...) -> (B,)``."""
    return x if x.ndim == 1 else x.flatten(1).mean(dim=1)


def _combine(per_head: list[torch.Tensor], weights: list[float], name: str) -> torch.Tensor:
    """Weighted sum of per-sample head losses ``(B,)`` (weights already normalised)."""
    batch = per_head[0].shape[0]
    for i, v in enumerate(per_head):
        if v.shape[0] != batch:
            raise ShapeError(
                f"Expected every head of `{name}` to have the same batch size, but head 0 has {batch} and "
                f"head {i} has {v.shape[0]}.",
                name=name,
                expected=(batch,),
                actual=(v.shape[0],),
            )
    total = per_head[0] * weights[0]
    for v, w in zip(per_head[1:], weights[1:]):
        total = total + v * w
    return total


def _mean_logit(heads: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    value = _upcast(heads[0].detach()).mean() * weights[0]
    for h, w in zip(heads[1:], weights[1:]):
        value = value + _upcast(h.detach()).mean() * w
    return _log_scalar(value)


def _real_term(r: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "non_saturating":
        return F.softplus(-r)
    if kind == "hinge":
        return F.relu(1.0 - r)
    return 0.5 * (r - 1.0).square()


def _fake_term(f: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "non_saturating":
        return F.softplus(f)
    if kind == "hinge":
        return F.relu(1.0 + f)
    return 0.5 * f.square()


def _generator_term(f: torch.Tensor, kind: str, hinge_generator: str) -> torch.Tensor:
    if kind == "non_saturating":
        return F.softplus(-f)
    if kind == "hinge":
        return -f if hinge_generator == "linear" else F.relu(1.0 - f)
    return 0.5 * (f - 1.0).square()


# --------------------------------------------------------------------------------------------- GAN losses
def gan_discriminator_loss(
    real_logits: Logits,
    fake_logits: Logits,
    *,
    loss: GANKind = "non_saturating",
    head_weights: Sequence[float] | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Discriminator loss from real and fake logits (the fake logits come from detached fakes).

    .. math::

        L_D = \mathbb{E}_{\text{real}}[\ell_r(r)] + \mathbb{E}_{\text{fake}}[\ell_f(f)]

    with :math:`\ell_r(r) = \mathrm{softplus}(-r),\ \ell_f(f) = \mathrm{softplus}(f)` (``"non_saturating"``,
    SDXL-Lightning Eq. 20, DMD2), :math:`\max(0, 1 - r),\ \max(0, 1 + f)` (``"hinge"``, PCM) or
    :math:`\tfrac12(r - 1)^2,\ \tfrac12 f^2` (``"least_squares"``, Mao et al. 2017). Each head is averaged
    over its non-batch dimensions, heads are averaged with ``head_weights``.

    Args:
        real_logits: logits of real (teacher) samples, ``(B_r, ...)``, or a list with one tensor per head.
        fake_logits: logits of fake (student) samples, ``(B_f, ...)``, or a list with the same number of
            heads. ``B_r`` and ``B_f`` may differ (e.g. extra mix-and-match negatives) except for
            ``reduction="none"``.
        loss: ``"non_saturating"`` (the default), ``"hinge"`` or ``"least_squares"``.
        head_weights: relative weight of each head (normalised to sum 1); None (the default) weighs the
            heads equally.
        reduction: ``"mean"`` (the default: mean over each batch, then real + fake), ``"sum"`` (sum over
            samples) or ``"none"`` (per-sample ``real + fake`` loss, shape ``(B,)``, needs ``B_r == B_f``).

    Returns:
        ``(loss, logs)``: the loss (0-d, or ``(B,)`` for ``reduction="none"``; float32 for half inputs, float64
        for float64) and logs ``d_loss`` (the mean loss), ``d_real`` / ``d_fake`` (mean real / fake logit,
        head-weighted), detached float32 0-d tensors.

    Raises:
        OptionError: ``loss`` or ``reduction`` is unknown, or ``head_weights`` is not one finite weight
            ``>= 0`` per head with a positive sum.
        DTypeError: a logit is not a floating-point tensor (or the logits are neither a tensor nor a non-empty
            list/tuple of them).
        ShapeError: a head is 0-d or empty, ``real_logits`` and ``fake_logits`` have different numbers of heads,
            the heads of one argument have different batch sizes, or ``reduction="none"`` with
            ``B_r != B_f``.
        NonFiniteError: a logit is NaN or Inf (a value check, see :mod:`diffdistill.errors`).

    Example:
        >>> real, fake = torch.tensor([[2.0], [1.0]]), torch.tensor([[-1.0], [0.0]])
        >>> loss, logs = gan_discriminator_loss(real, fake, loss="hinge")
        >>> loss  # mean(relu(1 - r)) + mean(relu(1 + f)) = 0 + 0.5
        tensor(0.5000)
        >>> sorted(logs)
        ['d_fake', 'd_loss', 'd_real']
    """
    check_option(loss, "loss", _KINDS)
    check_option(reduction, "reduction", _REDUCTIONS)
    real = _as_heads(real_logits, "real_logits")
    fake = _as_heads(fake_logits, "fake_logits")
    if len(real) != len(fake):
        raise ShapeError(
            f"Expected `real_logits` and `fake_logits` to come from the same heads, but got {len(real)} real "
            f"and {len(fake)} fake head(s).",
            name="real_logits/fake_logits",
            expected=len(real),
            actual=len(fake),
        )
    weights = _head_weights(head_weights, len(real))
    real_ps = _combine([_per_sample(_real_term(_upcast(r), loss)) for r in real], weights, "real_logits")
    fake_ps = _combine([_per_sample(_fake_term(_upcast(f), loss)) for f in fake], weights, "fake_logits")
    if reduction == "none":
        if real_ps.shape != fake_ps.shape:
            raise ShapeError(
                "reduction='none' returns one loss per sample, so `real_logits` and `fake_logits` need the "
                f"same batch size, but got {real_ps.shape[0]} and {fake_ps.shape[0]}. Use reduction='mean'.",
                name="real_logits/fake_logits",
                expected=tuple(real_ps.shape),
                actual=tuple(fake_ps.shape),
            )
        out = real_ps + fake_ps
    else:
        out = _reduce(real_ps, reduction) + _reduce(fake_ps, reduction)
    mean_loss = out.mean() if reduction == "none" else real_ps.mean() + fake_ps.mean()
    logs = {
        "d_loss": _log_scalar(mean_loss),
        "d_real": _mean_logit(real, weights),
        "d_fake": _mean_logit(fake, weights),
    }
    return out, logs


def gan_generator_loss(
    fake_logits: Logits,
    *,
    loss: GANKind = "non_saturating",
    hinge_generator: HingeGenerator = "linear",
    head_weights: Sequence[float] | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Generator (student) loss from the logits the discriminator gives its samples.

    .. math::

        L_G = \mathbb{E}_{\text{fake}}[\ell_g(f)]

    with :math:`\ell_g(f) = \mathrm{softplus}(-f) = -\log \sigma(f)` (``"non_saturating"``,
    SDXL-Lightning Eq. 21, DMD2, Diffusion2GAN), :math:`\tfrac12 (f - 1)^2` (``"least_squares"``, Mao et al.
    2017 with c = 1) or, for ``"hinge"``, either :math:`-f` (``hinge_generator="linear"``, the usual hinge
    generator of Geometric GAN / SAGAN / BigGAN) or :math:`\max(0, 1 - f)` (``hinge_generator="relu"``, as
    in PCM's ``train_pcm_lora_sdxl_adv.py``: it stops pushing samples the discriminator already scores
    above the margin).

    Args:
        fake_logits: logits of the student's samples (not detached: the gradient reaches the student
            through the discriminator), ``(B, ...)`` or a list with one tensor per head.
        loss: ``"non_saturating"`` (the default), ``"hinge"`` or ``"least_squares"``.
        hinge_generator: ``"linear"`` (the default) or ``"relu"``; only used with ``loss="hinge"``.
        head_weights: relative weight of each head (normalised to sum 1); None (the default) weighs the
            heads equally.
        reduction: ``"mean"`` (the default), ``"sum"`` or ``"none"`` (per-sample, shape ``(B,)``).

    Returns:
        ``(loss, logs)``: the loss (0-d, or ``(B,)`` for ``reduction="none"``) and logs ``g_loss`` (the mean
        loss) and ``d_fake`` (mean fake logit), detached float32 0-d tensors.

    Raises:
        OptionError: ``loss``, ``hinge_generator`` or ``reduction`` is unknown, or ``head_weights`` is not one
            finite weight ``>= 0`` per head with a positive sum.
        DTypeError: a logit is not a floating-point tensor (or ``fake_logits`` is neither a tensor nor a
            non-empty list/tuple of them).
        ShapeError: a head is 0-d or empty, or the heads have different batch sizes.
        NonFiniteError: a logit is NaN or Inf (a value check).

    Example:
        >>> f = torch.tensor([0.0, 3.0])
        >>> gan_generator_loss(f, loss="hinge", hinge_generator="relu")[0]  # mean(relu(1 - f))
        tensor(0.5000)
        >>> gan_generator_loss(f, loss="hinge")[0]  # mean(-f)
        tensor(-1.5000)
    """
    check_option(loss, "loss", _KINDS)
    check_option(hinge_generator, "hinge_generator", _HINGE_G)
    check_option(reduction, "reduction", _REDUCTIONS)
    fake = _as_heads(fake_logits, "fake_logits")
    weights = _head_weights(head_weights, len(fake))
    per_sample = _combine(
        [_per_sample(_generator_term(_upcast(f), loss, hinge_generator)) for f in fake],
        weights,
        "fake_logits",
    )
    out = _reduce(per_sample, reduction)
    logs = {"g_loss": _log_scalar(per_sample.mean()), "d_fake": _mean_logit(fake, weights)}
    return out, logs


class GANLoss(nn.Module):
    """Holds one GAN objective's options so the discriminator and generator steps stay consistent.

    :meth:`discriminator_loss` calls :func:`gan_discriminator_loss`, :meth:`generator_loss` calls
    :func:`gan_generator_loss`; ``forward(fake_logits)`` is the generator loss and
    ``forward(fake_logits, real_logits)`` the discriminator loss.

    Args:
        loss: ``"non_saturating"`` (the default; SDXL-Lightning, DMD2), ``"hinge"`` (PCM) or
            ``"least_squares"``.
        hinge_generator: ``"linear"`` (the default, :math:`-f`) or ``"relu"`` (:math:`\\max(0, 1 - f)`, PCM).
        head_weights: relative weight of each discriminator head; None (the default) weighs them equally.
        reduction: ``"mean"`` (the default), ``"sum"`` or ``"none"`` (per-sample, ``(B,)``).

    Raises:
        OptionError: ``loss``, ``hinge_generator`` or ``reduction`` is unknown, or ``head_weights`` holds a
            negative or non-finite weight or sums to 0. The methods raise what :func:`gan_discriminator_loss`
            and :func:`gan_generator_loss` raise.

    Example:
        >>> crit = GANLoss("hinge", hinge_generator="relu")
        >>> d_loss, d_logs = crit.discriminator_loss(torch.ones(4, 1), -torch.ones(4, 1))
        >>> g_loss, g_logs = crit(torch.zeros(4, 1))
        >>> d_loss.item(), g_loss.item()
        (0.0, 1.0)
    """

    def __init__(
        self,
        loss: GANKind = "non_saturating",
        *,
        hinge_generator: HingeGenerator = "linear",
        head_weights: Sequence[float] | None = None,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        check_option(loss, "loss", _KINDS)
        check_option(hinge_generator, "hinge_generator", _HINGE_G)
        check_option(reduction, "reduction", _REDUCTIONS)
        if head_weights is not None:
            _head_weights(head_weights, None)
        self.loss = loss
        self.hinge_generator = hinge_generator
        self.head_weights = None if head_weights is None else tuple(float(w) for w in head_weights)
        self.reduction = reduction

    def discriminator_loss(
        self, real_logits: Logits, fake_logits: Logits
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:func:`gan_discriminator_loss` with the stored options.

        Args:
            real_logits: logits of real samples, ``(B_r, ...)`` or a list with one tensor per head.
            fake_logits: logits of (detached) fake samples, ``(B_f, ...)`` or a list with the same heads.

        Returns:
            ``(loss, logs)`` as :func:`gan_discriminator_loss`.

        Raises:
            DTypeError: a logit is not a floating-point tensor.
            ShapeError: a head is 0-d or empty, or the heads do not match (see :func:`gan_discriminator_loss`).
            OptionError: the stored ``head_weights`` do not have one entry per head.
            NonFiniteError: a logit is NaN or Inf (a value check).
        """
        return gan_discriminator_loss(
            real_logits, fake_logits, loss=self.loss, head_weights=self.head_weights, reduction=self.reduction
        )

    def generator_loss(self, fake_logits: Logits) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:func:`gan_generator_loss` with the stored options.

        Args:
            fake_logits: logits of the student's samples (not detached), ``(B, ...)`` or a list per head.

        Returns:
            ``(loss, logs)`` as :func:`gan_generator_loss`.

        Raises:
            DTypeError: a logit is not a floating-point tensor.
            ShapeError: a head is 0-d or empty, or the heads have different batch sizes.
            OptionError: the stored ``head_weights`` do not have one entry per head.
            NonFiniteError: a logit is NaN or Inf (a value check).
        """
        return gan_generator_loss(
            fake_logits,
            loss=self.loss,
            hinge_generator=self.hinge_generator,
            head_weights=self.head_weights,
            reduction=self.reduction,
        )

    def forward(
        self, fake_logits: Logits, real_logits: Logits | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Generator loss if ``real_logits`` is None, otherwise the discriminator loss.

        Args:
            fake_logits: logits of the fake samples (not detached for the generator loss, detached for the
                discriminator loss), ``(B, ...)`` or a list per head.
            real_logits: logits of the real samples for the discriminator loss; None (the default) gives the
                generator loss.

        Returns:
            ``(loss, logs)`` of :meth:`generator_loss` or :meth:`discriminator_loss`.

        Raises:
            DTypeError: a logit is not a floating-point tensor.
            ShapeError: a head is 0-d or empty, or the heads do not match.
            OptionError: the stored ``head_weights`` do not have one entry per head.
            NonFiniteError: a logit is NaN or Inf (a value check).
        """
        if real_logits is None:
            return self.generator_loss(fake_logits)
        return self.discriminator_loss(real_logits, fake_logits)

    def extra_repr(self) -> str:
        return (
            f"loss={self.loss!r}, hinge_generator={self.hinge_generator!r}, "
            f"head_weights={self.head_weights}, reduction={self.reduction!r}"
        )


# --------------------------------------------------------------------------------------------- R1
def _as_inputs(inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    items = [inputs] if isinstance(inputs, torch.Tensor) else inputs
    if not isinstance(items, (list, tuple)) or len(items) == 0:
        raise DTypeError(
            "Expected `inputs` to be the tensor (or a non-empty list of tensors) the discriminator was run "
            f"on, but got {type(inputs).__name__}."
        )
    for i, x in enumerate(items):
        label = "inputs" if isinstance(inputs, torch.Tensor) else f"inputs[{i}]"
        check_float_input(x, label)  # floating, non-empty, finite (a value check)
        if not x.requires_grad:
            raise ValueError(
                f"Expected `{label}` to require grad so the penalty can differentiate the logits with respect "
                f"to it, but {label}.requires_grad is False. Call x = x.detach().requires_grad_(True) before "
                "running the discriminator on it."
            )
    return list(items)


def r1_penalty(
    real_logits: Logits,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    gamma: float = 1.0,
    head_weights: Sequence[float] | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""R1 gradient penalty on real samples (Mescheder et al. 2018), differentiable in the discriminator.

    .. math::

        R_1 = \frac{\gamma}{2}\, \mathbb{E}_{x \sim p_\text{real}} \big\| \nabla_x D(x) \big\|^2,
        \qquad D(x_b) = \sum_h w_h \sum_{j} \text{logit}_{h}(x)_{b, j}

    The gradient is taken with ``create_graph=True`` so that the penalty trains the discriminator. For a
    patch or multi-head discriminator, :math:`D` is the head-weighted sum of each sample's logits (as
    StyleGAN2's ``real_logits.sum()``); for one logit per sample it is the usual R1. A sum, not the mean
    the GAN losses take: a head with ``P`` logits per sample weighs up to ``P**2`` times more in the
    penalty than one averaged logit would, so ``gamma`` values do not transfer between head shapes
    (rescale ``gamma`` or ``head_weights`` when changing patch sizes). With several
    ``inputs`` (e.g. the pair of a conditional discriminator) the squared norms add up.

    Discriminators with attention (diffusion UNets) must compute ``real_logits`` under
    ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``: the fused SDPA kernels have no double backward.
    :func:`lazy_r1_penalty` does this itself.

    Args:
        real_logits: logits of ``inputs`` (a graph from ``inputs`` to them is needed), ``(B, ...)`` or a
            list with one tensor per head.
        inputs: the real tensor(s) the discriminator was run on, each ``(B, ...)`` with
            ``requires_grad=True``.
        gamma: penalty weight :math:`\gamma`, a finite number ``>= 0`` (default 1).
        head_weights: relative weight of each head (normalised to sum 1); None (the default) weighs the
            heads equally.
        reduction: ``"mean"`` (the default), ``"sum"`` or ``"none"`` (per-sample penalty, shape ``(B,)``).

    Returns:
        ``(loss, logs)``: the penalty (0-d, or ``(B,)`` for ``reduction="none"``) and logs ``r1`` (the mean
        penalty) and ``r1_grad_sq`` (mean :math:`\|\nabla_x D\|^2`, without :math:`\gamma/2`).

    Raises:
        OptionError: ``reduction`` is unknown, ``gamma`` is negative or not finite, or ``head_weights`` is not
            one finite weight ``>= 0`` per head.
        DTypeError: a logit or an input is not a floating-point tensor (or not a tensor / a non-empty list of
            them).
        ShapeError: a head is 0-d or empty, an input is empty, the inputs have different batch sizes, or a head's
            batch size is not the inputs'.
        NonFiniteError: a logit or an input holds NaN or Inf (a value check).
        ValueError: an input does not require grad, or the logits do not depend on it through autograd.

    Example:
        >>> w = torch.tensor([3.0, 4.0], requires_grad=True)
        >>> x = torch.randn(5, 2).requires_grad_(True)
        >>> penalty, logs = r1_penalty(x @ w, x, gamma=2.0)  # D(x) = w.x: ||grad||^2 = ||w||^2 = 25
        >>> penalty
        tensor(25., grad_fn=<MeanBackward0>)
        >>> penalty.backward(); w.grad  # d/dw (gamma / 2 ||w||^2) = gamma w
        tensor([6., 8.])
    """
    check_option(reduction, "reduction", _REDUCTIONS)
    gamma = check_real(gamma, "gamma", low=0)
    heads = _as_heads(real_logits, "real_logits")
    xs = _as_inputs(inputs)
    weights = _head_weights(head_weights, len(heads))
    batch = xs[0].shape[0] if xs[0].ndim else 1
    for i, x in enumerate(xs):
        if (x.shape[0] if x.ndim else 1) != batch:
            raise ShapeError(
                f"Expected every entry of `inputs` to have batch size {batch}, but entry {i} has shape "
                f"{tuple(x.shape)}.",
                name="inputs",
                expected=(batch,),
                actual=tuple(x.shape),
            )
    for i, head in enumerate(heads):
        if head.shape[0] != batch:
            label = "real_logits" if isinstance(real_logits, torch.Tensor) else f"real_logits[{i}]"
            raise ShapeError(
                f"Expected `{label}` to hold the logits of each of the {batch} samples of `inputs` (batch size "
                f"{batch} in dim 0), but got shape {tuple(head.shape)}. R1 penalises each sample's own gradient: "
                "pass the logits before any reduction over the batch.",
                name=label,
                expected=(batch,),
                actual=tuple(head.shape),
            )
    total = _sample_values(heads, weights).sum()
    if not total.requires_grad:
        raise ValueError(
            "Expected `real_logits` to depend on `inputs` through autograd, but they do not require grad. "
            "Run the discriminator on the inputs outside torch.no_grad() and without detaching them."
        )
    grads = torch.autograd.grad(total, xs, create_graph=True, allow_unused=True)
    squares = []
    for i, g in enumerate(grads):
        if g is None:
            raise ValueError(
                f"`real_logits` do not depend on `inputs` (entry {i}): pass the tensor the discriminator was run "
                "on, not a copy of it."
            )
        squares.append(_upcast(g).reshape(batch, -1).square().sum(dim=1))
    sq = squares[0]
    for extra in squares[1:]:
        sq = sq + extra
    per_sample = 0.5 * gamma * sq
    out = _reduce(per_sample, reduction)
    logs = {"r1": _log_scalar(per_sample.mean()), "r1_grad_sq": _log_scalar(sq.mean())}
    return out, logs


def _sample_values(heads: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Each sample's head-weighted sum of logits, ``(B,)`` (the :math:`D(x_b)` of :func:`r1_penalty`)."""
    total = _upcast(heads[0]).reshape(heads[0].shape[0], -1).sum(dim=1) * weights[0]
    for h, w in zip(heads[1:], weights[1:]):
        total = total + _upcast(h).reshape(h.shape[0], -1).sum(dim=1) * w
    return total


def approximate_r1_penalty(
    real_logits: Logits,
    perturbed_logits: Logits,
    *,
    sigma: float,
    gamma: float = 1.0,
    head_weights: Sequence[float] | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Approximated R1 (Lin et al. 2025, APT): a finite difference instead of a gradient penalty.

    .. math::

        \tilde R_1 = \frac{\gamma}{2 \sigma^2}\, \mathbb{E}_{x}\, \mathbb{E}_{\epsilon \sim \mathcal N(0, I)}
        \big( D(x + \sigma \epsilon) - D(x) \big)^2

    with :math:`D(x_b)` the head-weighted sum of each sample's logits, as in :func:`r1_penalty`. Since
    :math:`\mathbb{E}_\epsilon (D(x + \sigma\epsilon) - D(x))^2 = \sigma^2 \|\nabla_x D(x)\|^2 + O(\sigma^4)`
    (the odd moments of :math:`\epsilon` vanish), :math:`\tilde R_1` estimates R1 with the same ``gamma``,
    with a bias of relative order :math:`\sigma^2` (none for a ``D`` linear in ``x``). APT writes it
    :math:`\lambda \|D(x) - D(\mathcal N(x, \sigma^2 I))\|^2`: :math:`\lambda = \gamma / (2 \sigma^2)`.

    Both logits stay differentiable in the discriminator's parameters; nothing is differentiated twice. So,
    unlike :func:`r1_penalty`, it works with the fused attention kernels (flash / memory-efficient, which
    have no double backward), with gradient checkpointing, and with sharded discriminators (the
    Diffusion2GAN script's run under DeepSpeed ZeRO-2 is tested). Its cost is two more forward passes of
    the penalised samples and their backward (SDXL, H200: exact single-sample R1 on Diffusion2GAN's
    full-UNet discriminator peaked at 109 GiB). The two logits must come from the same function: a
    discriminator that draws random numbers (augmentation, dropout) must draw the same ones for both
    (:func:`lazy_r1_penalty` replays the RNG state for its second call). Under bf16 autocast the difference
    is taken between bf16 features (relative rounding :math:`2^{-8}`): keep :math:`\sigma` large enough
    that the perturbation moves ``D`` well beyond that rounding, while the truncation grows with
    :math:`\sigma` (``benchmarks/r1_accuracy.py`` measures both on Diffusion2GAN's discriminator: on the
    tiny random-weight one, the bf16 rounding dominates up to :math:`\sigma \approx 0.03`).

    Args:
        real_logits: logits of the real samples ``x``, ``(B, ...)`` or a list with one tensor per head.
        perturbed_logits: logits of ``x + sigma * eps`` (the same shapes), from a fresh standard normal
            ``eps`` per element.
        sigma: the perturbation's standard deviation :math:`\sigma`, a finite number ``> 0``.
        gamma: penalty weight :math:`\gamma` (R1's), a finite number ``>= 0`` (default 1).
        head_weights: relative weight of each head (normalised to sum 1); None (the default) weighs the
            heads equally.
        reduction: ``"mean"`` (the default), ``"sum"`` or ``"none"`` (per-sample penalty, shape ``(B,)``).

    Returns:
        ``(loss, logs)``: the penalty (0-d, or ``(B,)`` for ``reduction="none"``) and logs ``r1`` (the mean
        penalty) and ``r1_grad_sq`` (the mean estimate :math:`(D(x + \sigma\epsilon) - D(x))^2 / \sigma^2` of
        :math:`\|\nabla_x D\|^2`).

    Raises:
        OptionError: ``reduction`` is unknown, ``sigma`` is not finite and ``> 0``, ``gamma`` is
            negative or not finite, or ``head_weights`` is not one finite weight ``>= 0`` per head.
        DTypeError: a logit is not a floating-point tensor, or ``sigma`` / ``gamma`` is not a real number.
        ShapeError: a head is 0-d or empty, or ``perturbed_logits`` does not have the heads and shapes of
            ``real_logits``.
        NonFiniteError: a logit is NaN or Inf (a value check).

    Example:
        >>> w = torch.tensor([3.0, 4.0], requires_grad=True)
        >>> x, eps = torch.randn(5, 2), torch.randn(5, 2)
        >>> penalty, logs = approximate_r1_penalty(x @ w, (x + 0.1 * eps) @ w, sigma=0.1, gamma=2.0)
        >>> bool(torch.isclose(penalty, ((eps @ w.detach()) ** 2).mean()))  # (w . eps)^2, mean ||w||^2 = 25
        True
    """
    check_option(reduction, "reduction", _REDUCTIONS)
    gamma = check_real(gamma, "gamma", low=0)
    sigma = check_real(sigma, "sigma", low=0, strict=True)
    real = _as_heads(real_logits, "real_logits")
    perturbed = _as_heads(perturbed_logits, "perturbed_logits")
    if len(real) != len(perturbed):
        raise ShapeError(
            f"Expected `perturbed_logits` to have one head per head of `real_logits` ({len(real)}), but got "
            f"{len(perturbed)}.",
            name="perturbed_logits",
            expected=(len(real),),
            actual=(len(perturbed),),
        )
    for i, (r, q) in enumerate(zip(real, perturbed)):
        if r.shape != q.shape:
            raise ShapeError(
                f"Expected head {i} of `perturbed_logits` to have the shape of `real_logits`' "
                f"{tuple(r.shape)}, but got {tuple(q.shape)}.",
                name="perturbed_logits",
                expected=tuple(r.shape),
                actual=tuple(q.shape),
            )
    weights = _head_weights(head_weights, len(real))
    diff_sq = (_sample_values(perturbed, weights) - _sample_values(real, weights)).square()
    per_sample = diff_sq * (0.5 * gamma / sigma**2)
    out = _reduce(per_sample, reduction)
    return out, {"r1": _log_scalar(per_sample.mean()), "r1_grad_sq": _log_scalar(diff_sq.mean() / sigma**2)}


def _disc_heads(output: Any) -> Logits:
    """A discriminator's output as logits: a tensor, a list of head tensors, or anything with a tensor."""
    if isinstance(output, (list, tuple)) and output and all(isinstance(o, torch.Tensor) for o in output):
        return list(output)
    return first_tensor(output, "discriminator")


def _index_batch(value: Any, index: torch.Tensor, batch: int, name: str, key: Any = None) -> Any:
    """Index every batched tensor of ``value`` (a tensor or a possibly nested mapping) along dim 0.

    Tensors with a leading dimension of 1, 0-d tensors and shared position ids (``key`` is the value's keyword;
    :func:`~diffdistill._checks.is_shared_condition`) are shared by the batch and kept; any other non-tensor
    value is kept as is.
    """
    if isinstance(value, Mapping):
        return {k: _index_batch(v, index, batch, f"{name}[{k!r}]", k) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or (value.shape[0] == 1 and batch != 1) or is_shared_condition(key, value):
            return value
        if value.shape[0] != batch:
            raise ShapeError(
                f"Expected `{name}` to have batch size {batch} (or 1, shared by the batch) in dim 0, but got "
                f"shape {tuple(value.shape)}. {SHARED_CONDITION_HINT}",
                name=name,
                expected=(batch,),
                actual=tuple(value.shape),
            )
        return value[index.to(value.device)]
    return value


def _check_cond(cond: Any, name: str) -> None:
    """``cond`` is None, a tensor or a mapping (of tensors, nested mappings and shared values)."""
    if cond is not None and not isinstance(cond, (torch.Tensor, Mapping)):
        raise DTypeError(
            f"Expected `{name}` to be a tensor or a mapping of discriminator inputs (tensors with the batch size "
            f"in dim 0, nested mappings, shared values), or None, but got {type(cond).__name__}."
        )


def _has_batched(value: Any, batch: int, key: Any = None) -> bool:
    """Whether ``value`` (a tensor or a nested mapping) holds a tensor with ``batch`` rows (``batch >= 2``) that is
    not a shared position id."""
    if isinstance(value, Mapping):
        return any(_has_batched(v, batch, k) for k, v in value.items())
    return (
        isinstance(value, torch.Tensor)
        and value.ndim > 0
        and value.shape[0] == batch
        and not is_shared_condition(key, value)
    )


def _gen_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def lazy_r1_penalty(
    discriminator: Callable[..., Any],
    real: torch.Tensor,
    *,
    step: int,
    every: int = 16,
    gamma: float = 1.0,
    num_samples: int | None = 1,
    cond: Mapping[str, Any] | torch.Tensor | None = None,
    head_weights: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    approximate_sigma: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Lazy, subsampled R1 (StyleGAN2 lazy regularisation; Diffusion2GAN's single-sample R1).

    On steps with ``step % every == 0``, draws ``num_samples`` real samples without replacement, runs
    ``discriminator`` on them (detached, with ``requires_grad``) and returns ``every`` times their mean
    R1 penalty, so that its expected gradient per step matches R1 applied every step:

    .. math::

        L = k \cdot \frac{\gamma}{2} \frac{1}{|S|} \sum_{b \in S} \|\nabla_{x_b} D(x_b)\|^2
        \ \text{ if } \texttt{step} \bmod k = 0, \qquad 0 \text{ otherwise}.

    On other steps the discriminator is not run and the loss is a zero tensor (add it to the
    discriminator loss rather than calling ``backward`` on it alone). Diffusion2GAN uses
    ``num_samples=1, every=16``.

    With ``approximate_sigma`` set, the penalty is :func:`approximate_r1_penalty` instead (APT's
    finite difference, same ``gamma``): the subset is run twice, as is and perturbed by
    ``approximate_sigma`` times a standard normal draw (from ``generator``), from the same global RNG
    state (a discriminator's random augmentation or dropout draws the same numbers in both calls), with
    the default attention kernels and no double backward -- for discriminators too large for exact R1's
    memory, or sharded.

    Args:
        discriminator: called as ``discriminator(x, **cond)`` (``cond`` a mapping), ``discriminator(x, cond)``
            (a tensor) or ``discriminator(x)``; returns logits, a list of per-head logits, or an output whose
            main tensor :func:`~diffdistill._outputs.first_tensor` finds.
        real: real samples, ``(B, ...)`` floating; not modified.
        step: the caller's training step (a Python int, the same on every rank).
        every: the lazy interval :math:`k`, an int ``>= 1`` (default 16).
        gamma: R1 weight :math:`\gamma`, a finite number ``>= 0`` (default 1).
        num_samples: size of the random subset, an int ``>= 1`` clipped to ``B`` (default 1); None uses the
            whole batch.
        cond: extra discriminator inputs (None: the discriminator takes ``x`` alone); every tensor with batch
            size ``B`` in dim 0 (nested mappings included, such as SDXL's ``added_cond_kwargs``) is indexed
            with the same subset; tensors with batch size 1 and FLUX's shared position ids (2-D ``img_ids`` /
            ``txt_ids``, the rule of :func:`~diffdistill.schedulers.concat_conditions`) are passed whole.
        head_weights: relative weight of each discriminator head; None (the default) weighs them equally.
        generator: draws the subset: the first ``num_samples`` entries of ``torch.randperm(B)`` (and the
            perturbation of the approximate penalty); None uses the global RNG.
        approximate_sigma: None (the default) for exact R1; a finite :math:`\sigma > 0` for the approximated
            R1.

    Returns:
        ``(loss, logs)`` with logs ``r1`` (the returned loss), ``r1_grad_sq`` (mean
        :math:`\|\nabla D\|^2` of the subset, or its finite-difference estimate; 0 off schedule) and
        ``r1_active`` (1.0 on schedule, else 0.0).

    Raises:
        DTypeError: ``real`` is not a floating-point tensor, ``discriminator`` is not callable, ``cond`` is
            neither a tensor, a mapping nor None, the discriminator returns no tensor, ``every`` or
            ``num_samples`` is not an int, or ``gamma`` / ``approximate_sigma`` is not a real number.
        ShapeError: ``real`` is 0-d or empty, a tensor of ``cond`` has neither batch size ``B`` nor 1, or the
            discriminator's logits do not have one row per sample.
        OptionError: ``step`` is not a Python int, ``every`` or ``num_samples`` is ``< 1``,
            ``gamma`` / ``approximate_sigma`` are out of range or not finite, or ``head_weights`` is invalid.
        NonFiniteError: ``real`` (on schedule) or the logits hold NaN or Inf (a value check).

    Example:
        >>> disc = torch.nn.Linear(3, 1, bias=False)
        >>> real = torch.randn(8, 3)
        >>> on, logs = lazy_r1_penalty(disc, real, step=32, every=16, gamma=1.0)
        >>> bool(torch.isclose(on, 16 * 0.5 * disc.weight.square().sum()))
        True
        >>> lazy_r1_penalty(disc, real, step=33, every=16)[0]
        tensor(0.)
    """
    check_tensor(real, "real")
    check_dtype_floating(real, "real")
    if not callable(discriminator):
        raise DTypeError(
            f"Expected `discriminator` to be callable as discriminator(x, **cond), but got "
            f"{type(discriminator).__name__}."
        )
    if isinstance(step, bool) or not isinstance(step, int):
        raise OptionError(f"Expected `step` to be a Python int (the training step), but got {step!r}.")
    check_int(every, "every", minimum=1)
    gamma = check_real(gamma, "gamma", low=0)
    if approximate_sigma is not None:
        approximate_sigma = check_real(approximate_sigma, "approximate_sigma", low=0, strict=True)
    if real.ndim == 0:
        raise ShapeError(
            "Expected `real` to have a batch dimension, shape (B, ...), but got a 0-d tensor.",
            name="real",
            expected="(B, ...)",
            actual=(),
        )
    check_float_input(real, "real", finite=False)  # non-empty; finiteness only on schedule, below
    _check_cond(cond, "cond")
    if head_weights is not None:
        _head_weights(head_weights, None)
    batch = real.shape[0]
    n = batch if num_samples is None else min(check_int(num_samples, "num_samples", minimum=1), batch)
    if step % every != 0:
        zero = torch.zeros((), device=real.device, dtype=torch.promote_types(real.dtype, torch.float32))
        return zero, {"r1": zero.float(), "r1_grad_sq": zero.float(), "r1_active": zero.float()}
    check_finite(real, "real")
    index = torch.randperm(batch, generator=generator, device=_gen_device(generator, real.device))[:n]
    index = index.to(real.device)
    x = real.detach()[index]
    cond_sub = _index_batch(cond, index, batch, "cond") if cond is not None else None

    def run(inputs: torch.Tensor, label: str) -> list[torch.Tensor]:
        if cond_sub is None:
            out = discriminator(inputs)
        elif isinstance(cond_sub, Mapping):
            out = discriminator(inputs, **cond_sub)
        else:
            out = discriminator(inputs, cond_sub)
        # Checked here, so that the messages name what the caller gave (the discriminator), not R1's arguments.
        heads = _as_heads(_disc_heads(out), label)
        for head in heads:
            if head.shape[0] != inputs.shape[0]:
                raise ShapeError(
                    f"Expected `discriminator` to return logits with one row per sample of its input "
                    f"({inputs.shape[0]}), but got shape {tuple(head.shape)}. R1 penalises each sample's own "
                    "gradient: return the logits before any reduction over the batch.",
                    name="discriminator",
                    expected=(inputs.shape[0],),
                    actual=tuple(head.shape),
                )
        return heads

    if approximate_sigma is not None:
        # Drawn in float32 whatever the dtype of `real`: the same perturbation in float64, float32 and bf16.
        eps = torch.randn(x.shape, generator=generator, device=_gen_device(generator, x.device))
        # The second call replays the first's RNG state: any randomness inside D (augmentation, dropout)
        # is then the same in both, and the difference is the perturbation's alone.
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            unperturbed = run(x, "discriminator(real)")
        perturbed = run(
            x + approximate_sigma * eps.to(x.device, x.dtype), "discriminator(real + sigma * eps)"
        )
        penalty, logs = approximate_r1_penalty(
            unperturbed, perturbed, sigma=approximate_sigma, gamma=gamma, head_weights=head_weights
        )
    else:
        # R1 differentiates the discriminator twice; the fused SDPA kernels (flash / memory-efficient, CPU
        # and CUDA) have no double backward, so attention inside D runs on the math kernel for this pass.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        x.requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):
            penalty, logs = r1_penalty(
                run(x, "discriminator(real)"), x, gamma=gamma, head_weights=head_weights
            )
    loss = penalty * every
    return loss, {
        "r1": _log_scalar(loss),
        "r1_grad_sq": logs["r1_grad_sq"],
        "r1_active": torch.ones((), device=real.device),
    }


# --------------------------------------------------------------------------------------------- negatives
def random_derangement(
    n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """A random permutation of ``0..n-1`` with no fixed point (``perm[i] != i`` for every ``i``).

    It is a random ``n``-cycle: with ``s = randperm(n)``, ``perm[s[i]] = s[(i + 1) % n]``. Every ``i``'s
    partner is uniform over the other ``n - 1`` indices, and the draw costs one ``randperm`` (no
    rejection loop, no device sync).

    Args:
        n: number of elements, an int at least 2.
        generator: source of randomness (its device is where the draw happens); None uses the global RNG.
        device: device of the result; None (the default) keeps the device of the draw (the generator's,
            else CPU).

    Returns:
        An int64 tensor of shape ``(n,)``: a permutation of ``0..n-1`` with ``perm[i] != i``.

    Raises:
        OptionError: ``n`` is not an int ``>= 2``.

    Example:
        >>> perm = random_derangement(5, generator=torch.Generator().manual_seed(0))
        >>> bool((perm != torch.arange(5)).all()), sorted(perm.tolist())
        (True, [0, 1, 2, 3, 4])
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
        raise OptionError(
            f"Expected `n` to be an int >= 2 (a derangement of one element does not exist), but got {n!r}."
        )
    n = int(n)
    dev = _gen_device(generator, torch.device("cpu"))
    order = torch.randperm(n, generator=generator, device=dev)
    perm = torch.empty_like(order)
    perm[order] = order.roll(-1)
    return perm if device is None else perm.to(device)


class MixAndMatch(NamedTuple):
    """Mismatched negatives from :func:`mix_and_match`; ``permutation[i]`` is the partner of sample ``i``."""

    latents: torch.Tensor
    cond: Any
    noise: torch.Tensor | None
    permutation: torch.Tensor


def mix_and_match(
    latents: torch.Tensor,
    cond: Mapping[str, Any] | torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    *,
    mismatch: Literal["all", "cond", "noise"] = "all",
    generator: torch.Generator | None = None,
) -> MixAndMatch:
    r"""Mismatched (latent, condition, noise) tuples to label fake (Diffusion2GAN's mix-and-match).

    Diffusion2GAN trains its conditional discriminator :math:`D(c, z, x)` with extra negatives in which
    the latent :math:`x` belongs to another sample than :math:`(c, z)`, so that D must check that the output
    agrees with its text and noise (GigaGAN's matching-aware loss). With a random derangement
    :math:`\pi` (no sample keeps its own partner), sample ``i`` of the result is

    * ``mismatch="all"``: :math:`(x_{\pi(i)}, c_i, z_i)`: latents swapped, condition and noise kept;
    * ``mismatch="cond"``: :math:`(x_i, c_{\pi(i)}, z_i)`: only the condition is wrong;
    * ``mismatch="noise"``: :math:`(x_i, c_i, z_{\pi(i)})`: only the noise is wrong.

    Feed the result to the discriminator and add its logits to the fake logits (any subset, e.g. the
    first ``B // 4`` rows, if only part of the batch should be mismatched).

    Args:
        latents: ``(B, ...)`` floating, generated or real latents, ``B >= 2``.
        cond: the conditions: a tensor or a (nested) mapping of tensors with batch size ``B`` in dim 0;
            tensors with batch size 1, FLUX's shared position ids (2-D ``img_ids`` / ``txt_ids``, the rule of
            :func:`~diffdistill.schedulers.concat_conditions`) and non-tensor values are shared and kept. None
            (the default): no conditions.
        noise: the noise ``(B, ...)`` the latents were generated from; None (the default) if the
            discriminator does not see it.
        mismatch: which element is paired wrongly: ``"all"`` (the default: the latents), ``"cond"`` or
            ``"noise"``.
        generator: draws the derangement; None uses the global RNG.

    Returns:
        :class:`MixAndMatch` ``(latents, cond, noise, permutation)``; elements that are not permuted are
        returned as given; ``permutation`` is int64 ``(B,)``.

    Raises:
        DTypeError: ``latents`` or ``noise`` is not a floating-point tensor, or ``cond`` is neither a tensor,
            a mapping nor None.
        ShapeError: ``latents`` holds fewer than 2 samples, ``noise`` has another batch size, or a tensor of
            ``cond`` has neither batch size ``B`` nor 1.
        OptionError: ``mismatch`` is unknown, ``mismatch="cond"`` without a ``cond`` holding a tensor of batch
            size ``B`` (nothing would be permuted), or ``mismatch="noise"`` without ``noise``.
        NonFiniteError: ``latents`` or ``noise`` holds NaN or Inf (a value check).

    Example:
        >>> x, c = torch.arange(4.0).reshape(4, 1), {"text": torch.arange(4.0).reshape(4, 1)}
        >>> neg = mix_and_match(x, c, generator=torch.Generator().manual_seed(0))
        >>> bool((neg.latents != neg.cond["text"]).all()), neg.cond is c
        (True, True)
    """
    check_tensor(latents, "latents")
    check_dtype_floating(latents, "latents")
    check_option(mismatch, "mismatch", _MISMATCH)
    _check_cond(cond, "cond")
    if latents.ndim == 0 or latents.shape[0] < 2:
        raise ShapeError(
            "Expected `latents` to hold at least 2 samples, shape (B, ...) with B >= 2, to pair each with "
            f"another sample's condition, but got shape {tuple(latents.shape)}. Mix-and-match needs a batch "
            "of 2 or more; skip it for single-sample batches.",
            name="latents",
            expected="(B >= 2, ...)",
            actual=tuple(latents.shape),
        )
    check_float_input(latents, "latents")  # non-empty elements, finite (a value check)
    batch = latents.shape[0]
    if noise is not None:
        check_tensor(noise, "noise")
        check_dtype_floating(noise, "noise")
        if noise.ndim == 0 or noise.shape[0] != batch:
            raise ShapeError(
                f"Expected `noise` to have batch size {batch} like `latents`, but got shape {tuple(noise.shape)}.",
                name="noise",
                expected=(batch,),
                actual=tuple(noise.shape),
            )
        check_float_input(noise, "noise")
    if mismatch == "cond" and cond is None:
        raise OptionError("mismatch='cond' permutes the conditions, but `cond` is None. Pass `cond`.")
    if mismatch == "cond" and not _has_batched(cond, batch):
        raise OptionError(
            f"mismatch='cond' permutes the conditions, but `cond` holds no tensor with batch size {batch} in "
            "dim 0 (tensors with batch size 1 and other values are shared, so nothing would be mismatched). "
            "Pass the per-sample conditions, e.g. {'encoder_hidden_states': emb} with emb of shape (B, ...)."
        )
    if mismatch == "noise" and noise is None:
        raise OptionError("mismatch='noise' permutes the noise, but `noise` is None. Pass `noise`.")
    perm = random_derangement(batch, generator=generator, device=latents.device)
    # Index the conditions in every mode: it validates their batch sizes.
    permuted_cond = None if cond is None else _index_batch(cond, perm, batch, "cond")
    if mismatch == "all":
        return MixAndMatch(latents[perm], cond, noise, perm)
    if mismatch == "cond":
        return MixAndMatch(latents, permuted_cond, noise, perm)
    permuted_noise = None if noise is None else noise[perm.to(noise.device)]
    return MixAndMatch(latents, cond, permuted_noise, perm)


# --------------------------------------------------------------------------------------------- re-noising
def _check_values(values: Any, schedule: Any) -> None:
    """``values`` is a non-empty sequence of ints inside the schedule's ``[-1, T-1]`` (a drawn ``t``)."""
    try:
        items = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    except TypeError:
        items = None
    if isinstance(values, (str, bytes)) or not items:
        raise OptionError(
            f"Expected `values` to be a non-empty sequence of int timesteps, e.g. (10, 250, 500, 750), but got "
            f"{values!r}."
        )
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in items):
        raise OptionError(
            f"Expected `values` to hold int timesteps (diffusers indices), but got {items!r}: round them first."
        )
    last = getattr(schedule, "num_train_timesteps", None)
    if isinstance(last, int) and any(not -1 <= int(v) <= last - 1 for v in items):
        raise OptionError(
            f"Expected `values` to lie in [-1, {last - 1}] (the schedule's timesteps; -1 is the clean end), but "
            f"got {items!r}."
        )


class RenoisedSamples(NamedTuple):
    """Output of :func:`renoise_for_discriminator`: one noised tensor per input, the shared ``t`` and the noise."""

    samples: tuple[torch.Tensor, ...]
    t: torch.Tensor
    noise: tuple[torch.Tensor, ...]


def renoise_for_discriminator(
    *clean: torch.Tensor,
    schedule: Any,
    values: Sequence[int] = LIGHTNING_DISCRIMINATOR_TIMESTEPS,
    weights: Sequence[float] | None = None,
    t: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> RenoisedSamples:
    r"""Re-noise clean samples to a shared per-sample :math:`t^*` before the discriminator (SDXL-Lightning).

    SDXL-Lightning (Sec. 3.7, Eq. 25-26) shows its diffusion-UNet discriminator the teacher's
    :math:`x_0` and the student's :math:`\hat x_0` after re-noising both to the same :math:`t^*` with fresh
    noise :math:`\epsilon^*`:

    .. math::

        t^* \sim \text{Cat}(\{10, 250, 500, 750\}, w), \qquad
        x^*_{t^*} = \alpha_{t^*} x_0 + \sigma_{t^*} \epsilon^*

    with weights 1:1:1:1 first and ``(5, 1, 1, 1)`` once training is stable. Sample ``b`` of every
    input gets the same :math:`t^*_b`; each input gets its own independent noise. DMD2's diffusion-GAN
    (``t ~ U[0, 1000)``) and PCM's within-phase re-noising are obtained by passing ``t`` (e.g. from
    :func:`~diffdistill.schedulers.uniform_timesteps`). On a rectified-flow schedule (SD3, FLUX) the same call
    gives :math:`(1 - \sigma_{t^*}) x_0 + \sigma_{t^*}\epsilon^*` (LADD's re-noising of both inputs before
    the teacher-feature discriminator, Sauer et al. 2024, arXiv:2403.12015); ``values`` are indices into the
    flow table (``schedule.sigma_to_timestep`` finds the index of a given :math:`\sigma`).

    Args:
        *clean: one or more clean floating tensors ``(B, ...)`` with the same batch size (teacher ``x0``,
            student ``x0_hat``, ...).
        schedule: a :class:`~diffdistill.schedulers.NoiseSchedule` (its ``terminal_pure_noise`` applies).
        values: the timestep values to draw from (diffusers indices, ints in ``[-1, T-1]``); default
            SDXL-Lightning's ``(10, 250, 500, 750)``.
        weights: their relative probabilities, one per value; None (the default) draws them uniformly.
        t: explicit per-sample timesteps ``(B,)`` (skips the draw; ``values`` and ``weights`` are then
            unused); None (the default) draws ``t`` from ``values``.
        generator: draws ``t`` and the noise (in this order: ``t`` first, then one noise tensor per input);
            None uses the global RNG.

    Returns:
        :class:`RenoisedSamples` ``(samples, t, noise)``: ``samples[i]`` has the shape and dtype of
        ``clean[i]``; ``t`` is int64 ``(B,)`` when drawn (the given ``t`` otherwise).

    Raises:
        OptionError: no clean tensor is given, ``values`` holds a non-int or a value outside the schedule's
            ``[-1, T-1]``, ``weights`` does not match ``values``, ``weights`` is given with an explicit
            ``t``, or the given ``t`` lies outside ``[-1, T-1]``.
        DTypeError: ``schedule`` has no ``add_noise``, a clean input is not a floating-point tensor, or
            ``t`` is not a tensor of integer timesteps.
        ShapeError: a clean input is 0-d or empty, the batch sizes differ, or ``t`` is not ``(B,)``.
        NonFiniteError: a clean input holds NaN or Inf (a value check).

    Example:
        >>> from diffdistill.schedulers import NoiseSchedule
        >>> sched = NoiseSchedule.from_betas()
        >>> x0, x0_hat = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
        >>> out = renoise_for_discriminator(x0, x0_hat, schedule=sched, weights=(5, 1, 1, 1),
        ...                                 generator=torch.Generator().manual_seed(0))
        >>> len(out.samples), out.t.shape, set(out.t.tolist()) <= {10, 250, 500, 750}
        (2, torch.Size([4]), True)
    """
    if len(clean) == 0:
        raise OptionError(
            "Expected at least one clean tensor, e.g. renoise_for_discriminator(x0, x0_hat, schedule=sched)."
        )
    if not callable(getattr(schedule, "add_noise", None)):
        raise DTypeError(
            f"Expected `schedule` to be a NoiseSchedule (with an `add_noise` method), but got "
            f"{type(schedule).__name__}. Build one with NoiseSchedule.from_scheduler(diffusers_scheduler)."
        )
    for i, x in enumerate(clean):
        check_tensor(x, f"clean[{i}]")
        check_dtype_floating(x, f"clean[{i}]")
        if x.ndim == 0:
            raise ShapeError(
                f"Expected `clean[{i}]` to have a batch dimension, shape (B, ...), but got a 0-d tensor.",
                name=f"clean[{i}]",
                expected="(B, ...)",
                actual=(),
            )
    batch = clean[0].shape[0]
    for i, x in enumerate(clean):
        if x.shape[0] != batch:
            raise ShapeError(
                f"Expected every clean tensor to have the batch size of clean[0] ({batch}) in dim 0, but "
                f"clean[{i}] has shape {tuple(x.shape)}.",
                name=f"clean[{i}]",
                expected=(batch,),
                actual=tuple(x.shape),
            )
    for i, x in enumerate(clean):
        check_float_input(x, f"clean[{i}]")  # non-empty, finite (a value check)
    device = clean[0].device
    if t is None:
        _check_values(values, schedule)
        t = categorical_timesteps(batch, values, weights, generator=generator, device=device).t
    else:
        if weights is not None:
            raise OptionError(
                "`weights` are the probabilities of `values` when t is drawn, but an explicit `t` was given too: "
                "pass one of them."
            )
        check_tensor(t, "t")
        if t.shape != (batch,):
            raise ShapeError(
                f"Expected `t` to hold one timestep per sample, shape ({batch},), but got {tuple(t.shape)}.",
                name="t",
                expected=(batch,),
                actual=tuple(t.shape),
            )
        t = t.to(device)
    gen_dev = _gen_device(generator, device)
    noises = tuple(
        torch.randn(
            x.shape, generator=generator, device=gen_dev, dtype=torch.promote_types(x.dtype, torch.float32)
        ).to(x.device, x.dtype)
        for x in clean
    )
    samples = tuple(schedule.add_noise(x, eps, t) for x, eps in zip(clean, noises))
    return RenoisedSamples(samples, t, noises)
