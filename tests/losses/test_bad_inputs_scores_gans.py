"""Bad inputs to the adversarial, score, distance and reward losses (issue 18, part 2).

Each case is a call a user could plausibly make by mistake: an integer or bool tensor, an empty batch, NaN /
Inf values, a shape that would broadcast, an option that would be silently ignored. Each raises one of the
public error types with a message that names the argument as the caller passed it. The finiteness checks are
value checks: switched off (``value_checks(False)``) or under ``torch.compile`` they do not run and a NaN
propagates instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from diffdistill.errors import DTypeError, NonFiniteError, OptionError, ShapeError, value_checks
from diffdistill.losses import (
    AlternatingUpdate,
    GANLoss,
    MPSHingeLoss,
    RewardHingeLoss,
    approximate_r1_penalty,
    compute_distance,
    denoise,
    dmd_loss,
    fake_score_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    lazy_r1_penalty,
    mix_and_match,
    mps_hinge_loss,
    pseudo_huber_distance,
    r1_penalty,
    random_derangement,
    reduce_loss,
    renoise_for_discriminator,
    reward_hinge_loss,
    sid_loss,
    sim_loss,
)
from diffdistill.losses.distances import _compute_distance
from diffdistill.schedulers import NoiseSchedule, TeacherSolver

NAN, INF = float("nan"), float("inf")
SCHED = NoiseSchedule.from_betas(prediction_type="sample")


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _f(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen())


def _with(value: float, *shape: int) -> torch.Tensor:
    """A float tensor of ``shape`` whose first element is ``value`` (NaN / Inf)."""
    x = _f(*shape)
    x.view(-1)[0] = value
    return x


def real_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.9 * x


def fake_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * x


LONG = torch.ones(4, 6, dtype=torch.long)
BOOL = torch.ones(4, 6, dtype=torch.bool)
EMPTY = torch.zeros(0, 6)


def _score_call(fn: Callable[..., Any], x: Any = None, **kw: Any) -> Callable[[], Any]:
    """A call of a generator score loss with valid defaults, ``x`` and ``kw`` replaced."""
    kw = {"schedule": SCHED, "generator": _gen(), **kw}
    real, fake = kw.pop("real", real_net), kw.pop("fake", fake_net)
    return lambda: fn(_f(4, 6) if x is None else x, real, fake, **kw)


def _r1_inputs_nan() -> tuple[torch.Tensor, torch.Tensor]:
    x = _with(NAN, 3, 2).requires_grad_(True)
    return x.nan_to_num().sum(dim=1), x  # finite logits with a graph to a NaN input


def _step_returning(value: Any) -> AlternatingUpdate:
    return AlternatingUpdate(lambda: value, lambda: {})


class _Scorer(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).mean(dim=1)


# (id, call, error type, regex the message must match)
CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    # ------------------------------------------------------------------ GAN losses
    ("gan_d-empty-real", lambda: gan_discriminator_loss(torch.zeros(0, 1), _f(3, 1)), ShapeError,
     r"`real_logits` to hold at least one sample, but got shape \(0, 1\)"),
    ("gan_d-nan-fake", lambda: gan_discriminator_loss(_f(3, 1), _with(NAN, 3, 1)), NonFiniteError,
     r"`fake_logits` to be finite, but it holds 1 NaN/Inf"),
    ("gan_d-inf-head1", lambda: gan_discriminator_loss([_f(3), _with(INF, 3, 2)], [_f(3), _f(3, 2)]),
     NonFiniteError, r"`real_logits\[1\]` to be finite"),
    ("gan_g-empty", lambda: gan_generator_loss(torch.zeros(0)), ShapeError,
     r"`fake_logits` to hold at least one sample"),
    ("gan_g-inf", lambda: gan_generator_loss(_with(INF, 4)), NonFiniteError, r"`fake_logits` to be finite"),
    ("GANLoss-nan", lambda: GANLoss()(_with(NAN, 4, 1)), NonFiniteError, r"`fake_logits` to be finite"),
    ("GANLoss-d-empty", lambda: GANLoss().discriminator_loss(torch.zeros(0, 1), _f(2, 1)), ShapeError,
     r"`real_logits` to hold at least one sample"),
    ("GANLoss-head_weights-number", lambda: GANLoss(head_weights=1.0), OptionError,  # type: ignore[arg-type]
     r"`head_weights` to be a sequence with one relative weight per discriminator head"),
    ("gan_g-head_weights-strings", lambda: gan_generator_loss([_f(2), _f(2)], head_weights=("a", "b")),  # type: ignore[arg-type]
     OptionError, r"`head_weights` to hold numbers"),
    # ------------------------------------------------------------------ R1
    ("r1-empty", lambda: r1_penalty(torch.zeros(0), torch.zeros(0, 2, requires_grad=True)), ShapeError,
     r"to hold at least one sample, but got shape \(0"),
    ("r1-nan-inputs", lambda: r1_penalty(*_r1_inputs_nan()), NonFiniteError, r"`inputs` to be finite"),
    ("r1-batch-mismatch",
     lambda: (lambda x: r1_penalty(x.sum().reshape(1), x))(torch.randn(3, 2, requires_grad=True)), ShapeError,
     r"`real_logits` to hold the logits of each of the 3 samples of `inputs`.*got shape \(1,\)"),
    ("r1-gamma-inf", lambda: (lambda x: r1_penalty(x.sum(1), x, gamma=INF))(torch.randn(3, 2, requires_grad=True)),
     OptionError, r"`gamma` to be a finite number, but got inf"),
    ("r1-gamma-str", lambda: (lambda x: r1_penalty(x.sum(1), x, gamma="1"))(torch.randn(3, 2, requires_grad=True)),  # type: ignore[arg-type]
     DTypeError, r"`gamma` to be a real number, but got str '1'"),
    ("approx_r1-sigma-inf", lambda: approximate_r1_penalty(_f(3), _f(3), sigma=INF), OptionError,
     r"`sigma` to be a finite number, but got inf"),
    ("approx_r1-nan-perturbed", lambda: approximate_r1_penalty(_f(3), _with(NAN, 3), sigma=0.1), NonFiniteError,
     r"`perturbed_logits` to be finite"),
    ("approx_r1-empty", lambda: approximate_r1_penalty(torch.zeros(0), torch.zeros(0), sigma=0.1), ShapeError,
     r"`real_logits` to hold at least one sample"),
    ("lazy_r1-empty", lambda: lazy_r1_penalty(torch.nn.Linear(2, 1), torch.zeros(0, 2), step=0), ShapeError,
     r"`real` to hold at least one sample"),
    ("lazy_r1-nan", lambda: lazy_r1_penalty(torch.nn.Linear(2, 1), _with(NAN, 3, 2), step=0), NonFiniteError,
     r"`real` to be finite"),
    ("lazy_r1-cond-list", lambda: lazy_r1_penalty(torch.nn.Linear(2, 1), _f(3, 2), step=0, cond=[1]),  # type: ignore[arg-type]
     DTypeError, r"`cond` to be a tensor or a mapping"),
    ("lazy_r1-sigma-inf", lambda: lazy_r1_penalty(torch.nn.Linear(2, 1), _f(3, 2), step=0, approximate_sigma=INF),
     OptionError, r"`approximate_sigma` to be a finite number, but got inf"),
    ("lazy_r1-head_weights", lambda: lazy_r1_penalty(torch.nn.Linear(2, 1), _f(3, 2), step=1, head_weights=2.0),  # type: ignore[arg-type]
     OptionError, r"`head_weights` to be a sequence"),
    ("lazy_r1-pooled-logits", lambda: lazy_r1_penalty(lambda x: x.sum().reshape(1), _f(3, 2), step=0, num_samples=2),
     ShapeError, r"`discriminator` to return logits with one row per sample of its input \(2\), but got shape \(1,\)"),
    ("lazy_r1-nan-logits", lambda: lazy_r1_penalty(lambda x: x.sum(1) * NAN, _f(3, 2), step=0), NonFiniteError,
     r"`discriminator\(real\)` to be finite"),
    ("lazy_r1-approx-inf-logits",
     lambda: lazy_r1_penalty(lambda x: [x.sum(1), x.sum(1) * INF], _f(3, 2), step=0, approximate_sigma=0.1),
     NonFiniteError, r"`discriminator\(real\)\[1\]` to be finite"),
    # ------------------------------------------------------------------ mix-and-match, derangement, re-noising
    ("mix-int-latents", lambda: mix_and_match(torch.ones(3, 2, dtype=torch.long)), DTypeError,
     r"`latents` to be a floating-point tensor, but got dtype torch.int64"),
    ("mix-nan-latents", lambda: mix_and_match(_with(NAN, 3, 2)), NonFiniteError, r"`latents` to be finite"),
    ("mix-bool-noise", lambda: mix_and_match(_f(3, 2), noise=torch.ones(3, 2, dtype=torch.bool), mismatch="noise"),
     DTypeError, r"`noise` to be a floating-point tensor"),
    ("mix-inf-noise", lambda: mix_and_match(_f(3, 2), noise=_with(INF, 3, 2)), NonFiniteError,
     r"`noise` to be finite"),
    ("mix-cond-list", lambda: mix_and_match(_f(3, 2), [1, 2, 3], mismatch="cond"), DTypeError,  # type: ignore[arg-type]
     r"`cond` to be a tensor or a mapping"),
    ("mix-cond-nothing-batched",
     lambda: mix_and_match(_f(3, 2), {"null": torch.ones(1, 4), "scale": 7.5}, mismatch="cond"), OptionError,
     r"`cond` holds no tensor with batch size 3"),
    ("derangement-float", lambda: random_derangement(2.5), OptionError, r"`n` to be an int >= 2"),  # type: ignore[arg-type]
    ("renoise-empty", lambda: renoise_for_discriminator(torch.zeros(0, 3), schedule=SCHED), ShapeError,
     r"`clean\[0\]` to hold at least one sample"),
    ("renoise-0d", lambda: renoise_for_discriminator(torch.tensor(1.0), schedule=SCHED), ShapeError,
     r"`clean\[0\]` to have a batch dimension"),
    ("renoise-nan", lambda: renoise_for_discriminator(_f(2, 3), _with(NAN, 2, 3), schedule=SCHED), NonFiniteError,
     r"`clean\[1\]` to be finite"),
    ("renoise-values-range", lambda: renoise_for_discriminator(_f(2, 3), schedule=SCHED, values=(10, 1000)),
     OptionError, r"`values` to lie in \[-1, 999\]"),
    ("renoise-values-float", lambda: renoise_for_discriminator(_f(2, 3), schedule=SCHED, values=(10.5, 20)),  # type: ignore[arg-type]
     OptionError, r"`values` to hold int timesteps"),
    ("renoise-t-and-weights",
     lambda: renoise_for_discriminator(_f(2, 3), schedule=SCHED, t=torch.tensor([1, 2]), weights=(1, 1, 1, 1)),
     OptionError, r"`weights` are the probabilities of `values`.*explicit `t`"),
    # ------------------------------------------------------------------ score losses
    ("dmd-int-x", _score_call(dmd_loss, LONG), DTypeError, r"`x` to be a floating-point tensor, but got dtype torch.int64"),
    ("sid-bool-x", _score_call(sid_loss, BOOL), DTypeError, r"`x` to be a floating-point tensor, but got dtype torch.bool"),
    ("sim-int-x", _score_call(sim_loss, LONG), DTypeError, r"`x` to be a floating-point tensor"),
    ("dmd-empty-x", _score_call(dmd_loss, EMPTY), ShapeError, r"`x` to hold at least one sample"),
    ("sid-empty-x", _score_call(sid_loss, EMPTY), ShapeError, r"`x` to hold at least one sample"),
    ("sim-0d-x", _score_call(sim_loss, torch.tensor(1.0)), ShapeError, r"`x` to have a batch dimension"),
    ("dmd-nan-x", _score_call(dmd_loss, _with(NAN, 4, 6)), NonFiniteError, r"`x` to be finite"),
    ("sid-inf-x", _score_call(sid_loss, _with(INF, 4, 6)), NonFiniteError, r"`x` to be finite"),
    ("sim-nan-x", _score_call(sim_loss, _with(NAN, 4, 6)), NonFiniteError, r"`x` to be finite"),
    ("dmd-int-noise", _score_call(dmd_loss, noise=LONG), DTypeError, r"`noise` to be a floating-point tensor"),
    ("sim-nan-noise", _score_call(sim_loss, noise=_with(NAN, 4, 6)), NonFiniteError, r"`noise` to be finite"),
    ("dmd-noise-broadcast", _score_call(dmd_loss, noise=_f(4, 1)), ShapeError,
     r"`x` and `noise` to have the same shape, but got x \(4, 6\) and noise \(4, 1\)"),
    ("dmd-schedule", _score_call(dmd_loss, schedule=None), DTypeError, r"`schedule` to be a diffdistill NoiseSchedule"),
    ("sid-real-not-callable", _score_call(sid_loss, real="unet"), DTypeError,
     r"`real` to be a TeacherSolver or a callable model\(x_t, t, \*\*cond\), but got str"),
    ("sim-fake-not-callable", _score_call(sim_loss, fake=None), DTypeError, r"`fake` to be a TeacherSolver or a callable"),
    ("dmd-cond-tensor", _score_call(dmd_loss, cond=_f(4, 6)), DTypeError, r"`cond` to be a mapping of the model's keyword"),
    ("sid-fake_cond-list", _score_call(sid_loss, fake_cond=[1]), DTypeError, r"`fake_cond` to be a mapping"),
    ("sim-uncond-plain-real", _score_call(sim_loss, uncond={"y": 1}), OptionError,
     r"`uncond` is the unconditional branch of a TeacherSolver's classifier-free guidance, but `real` is a plain"),
    ("dmd-t-and-t_range", _score_call(dmd_loss, t=torch.tensor(500), t_range=(20, 980)), OptionError,
     r"`t_range` is the range `t` is drawn from when `t` is None, but an explicit `t` was given too"),
    ("sid-t_range-str", _score_call(sid_loss, t_range="ab"), OptionError, r"Expected `t_range` = \(low, high\)"),
    ("sim-t_range-triple", _score_call(sim_loss, t_range=(1, 2, 3)), OptionError, r"Expected `t_range` = \(low, high\)"),
    ("dmd-real-wrong-shape", _score_call(dmd_loss, real=lambda x, t: x[:, :1]), ShapeError,
     r"`real` to return a prediction of the shape of its input \(4, 6\), but got \(4, 1\)"),
    ("sim-fake-int-output", _score_call(sim_loss, fake=lambda x, t: x.long()), DTypeError,
     r"`fake` to return a floating-point prediction"),
    ("sid-alpha-nan", _score_call(sid_loss, alpha=NAN), OptionError, r"`alpha` to be a finite number, but got nan"),
    ("sim-c-inf", _score_call(sim_loss, c=INF), OptionError, r"`c` to be a finite number, but got inf"),
    ("sim-c-str", _score_call(sim_loss, c="0.1"), DTypeError, r"`c` to be a real number, but got str"),
    ("sim-detach_dprime", _score_call(sim_loss, detach_dprime="yes"), DTypeError, r"`detach_dprime` to be True or False"),
    ("sim-weight-nan", _score_call(sim_loss, weight=_with(NAN, 4)), NonFiniteError, r"`weight` to be finite"),
    ("sim-weight-bool", _score_call(sim_loss, weight=torch.ones(4, dtype=torch.bool)), DTypeError,
     r"`weight` \(w\(t\)\) to hold numbers, but got a bool tensor"),
    ("sim-weight-list", _score_call(sim_loss, weight=[1.0] * 4), DTypeError,
     r"`weight` \(w\(t\)\) to be a tensor, a number, a callable of t or None"),
    ("fake_score-int-x0", lambda: fake_score_loss(fake_net, LONG, schedule=SCHED), DTypeError,
     r"`x0` to be a floating-point tensor"),
    ("fake_score-empty-x0", lambda: fake_score_loss(fake_net, EMPTY, schedule=SCHED), ShapeError,
     r"`x0` to hold at least one sample"),
    ("fake_score-nan-x0", lambda: fake_score_loss(fake_net, _with(NAN, 4, 6), schedule=SCHED), NonFiniteError,
     r"`x0` to be finite"),
    ("fake_score-inf-noise", lambda: fake_score_loss(fake_net, _f(4, 6), schedule=SCHED, noise=_with(INF, 4, 6)),
     NonFiniteError, r"`noise` to be finite"),
    ("fake_score-noise-shape", lambda: fake_score_loss(fake_net, _f(4, 6), schedule=SCHED, noise=_f(1, 6)),
     ShapeError, r"`x0` and `noise` to have the same shape"),
    ("fake_score-fake-int", lambda: fake_score_loss(3, _f(4, 6), schedule=SCHED),
     DTypeError, r"`fake` to be a TeacherSolver or a callable model\(x_t, t, \*\*cond\), but got int"),
    ("fake_score-uncond-plain-fake", lambda: fake_score_loss(fake_net, _f(4, 6), schedule=SCHED, uncond={"y": 1}),
     OptionError, r"`uncond` is the unconditional branch of a TeacherSolver's classifier-free guidance, but `fake`"),
    ("fake_score-uncond-list", lambda: fake_score_loss(TeacherSolver(fake_net, SCHED), _f(4, 6), schedule=SCHED,
     uncond=[1]), DTypeError, r"`uncond` to be a mapping"),
    ("fake_score-guided-no-uncond",
     lambda: fake_score_loss(TeacherSolver(fake_net, SCHED, guidance_scale=2.0), _f(4, 6), schedule=SCHED),
     OptionError, r"Expected `uncond` for classifier-free guidance with guidance_scale=2.0"),
    ("sid-fake_uncond-plain-fake", _score_call(sid_loss, fake_uncond={"y": 1}), OptionError,
     r"`fake_uncond` is the unconditional branch of a TeacherSolver's classifier-free guidance, but `fake` is a"),
    ("dmd-fake_uncond-list", _score_call(dmd_loss, fake_uncond=[1]), DTypeError, r"`fake_uncond` to be a mapping"),
    ("fake_score-sigma_data-0", lambda: fake_score_loss(fake_net, _f(4, 6), schedule=SCHED, sigma_data=0.0),
     OptionError, r"`sigma_data` to be > 0, but got 0.0"),
    ("fake_score-sigma_data-nan", lambda: fake_score_loss(fake_net, _f(4, 6), schedule=SCHED, sigma_data=NAN),
     OptionError, r"`sigma_data` to be a finite number"),
    ("fake_score-wrong-shape", lambda: fake_score_loss(lambda x, t: x.mean(1), _f(4, 6), schedule=SCHED),
     ShapeError, r"`fake` to return a prediction of the shape of its input \(4, 6\), but got \(4,\)"),
    ("denoise-int-x_t", lambda: denoise(real_net, LONG, 5, SCHED), DTypeError, r"`x_t` to be a floating-point tensor"),
    ("denoise-nan-x_t", lambda: denoise(real_net, _with(NAN, 4, 6), 5, SCHED), NonFiniteError, r"`x_t` to be finite"),
    ("denoise-empty-x_t", lambda: denoise(real_net, EMPTY, 5, SCHED), ShapeError, r"`x_t` to hold at least one sample"),
    ("denoise-t-none", lambda: denoise(real_net, _f(4, 6), None, SCHED), OptionError,  # type: ignore[arg-type]
     r"Expected `t`, the timesteps of `x_t`"),
    ("denoise-model", lambda: denoise(3, _f(4, 6), 5, SCHED), DTypeError, r"`model` to be a TeacherSolver or a callable"),  # type: ignore[arg-type]
    ("denoise-uncond-plain", lambda: denoise(real_net, _f(4, 6), 5, SCHED, None, {"y": 1}), OptionError,
     r"`uncond` is the unconditional branch.*`model` is a plain function"),
    ("denoise-grad", lambda: denoise(real_net, _f(4, 6), 5, SCHED, grad="no"), DTypeError, r"`grad` to be True or False"),  # type: ignore[arg-type]
    ("alternating-step-none", lambda: AlternatingUpdate(None, lambda: {}), DTypeError,  # type: ignore[arg-type]
     r"`generator_step` to be a callable taking no arguments"),
    ("alternating-every-str", lambda: AlternatingUpdate(dict, dict, generator_every="a"), DTypeError,  # type: ignore[arg-type]
     r"`generator_every` to be an int >= 1, but got str 'a'"),
    ("alternating-fake_steps-inf", lambda: AlternatingUpdate(dict, dict, fake_steps=INF), DTypeError,  # type: ignore[arg-type]
     r"`fake_steps` to be an int >= 1, but got float inf"),
    ("alternating-freeze-int", lambda: AlternatingUpdate(dict, dict, freeze_during_generator=[1]), DTypeError,  # type: ignore[list-item]
     r"`freeze_during_generator\[0\]` to be an nn.Module"),
    ("alternating-first-str", lambda: AlternatingUpdate(dict, dict, generator_first="no"), DTypeError,  # type: ignore[arg-type]
     r"`generator_first` to be True or False"),
    ("alternating-returns-list", lambda: _step_returning([1.0]).step(), DTypeError,
     r"`generator_step` to return a mapping of logging values or None, but it returned list"),
    ("alternating-state-missing", lambda: AlternatingUpdate(dict, dict).load_state_dict({}), OptionError,
     r"`state` to hold 'step_count'"),
    ("alternating-state-negative", lambda: AlternatingUpdate(dict, dict).load_state_dict({"step_count": -1}),
     OptionError, r"`state\['step_count'\]` to be an int >= 0, but got -1"),
    # ------------------------------------------------------------------ distances
    ("distance-int-input", lambda: compute_distance(LONG, _f(4, 6)), DTypeError,
     r"`input` to be a floating-point tensor, but got dtype torch.int64"),
    ("distance-bool-target", lambda: compute_distance(_f(4, 6), BOOL), DTypeError,
     r"`target` to be a floating-point tensor, but got dtype torch.bool"),
    ("distance-empty", lambda: compute_distance(EMPTY, EMPTY), ShapeError, r"`input` to hold at least one sample"),
    ("distance-empty-features", lambda: compute_distance(torch.zeros(2, 0), torch.zeros(2, 0), "l1"), ShapeError,
     r"`input` to hold at least one sample, but got shape \(2, 0\)"),
    ("distance-nan-input", lambda: compute_distance(_with(NAN, 4, 6), _f(4, 6), "l1"), NonFiniteError,
     r"`input` to be finite"),
    ("distance-inf-target", lambda: compute_distance(_f(4, 6), _with(INF, 4, 6), "pseudo_huber"), NonFiniteError,
     r"`target` to be finite"),
    ("distance-c-with-mse", lambda: compute_distance(_f(4, 6), _f(4, 6), "mse", c=0.1), OptionError,
     r"`c` is the pseudo-Huber constant and unused with distance='mse'"),
    ("distance-c-with-callable", lambda: compute_distance(_f(4, 6), _f(4, 6), lambda a, b: (a - b).abs().mean(1), c=0.1),
     OptionError, r"`c` is the pseudo-Huber constant and unused with a callable `distance`"),
    ("distance-callable-batch", lambda: compute_distance(_f(4, 6), _f(3, 6), lambda a, b: a.mean(1)), ShapeError,
     r"`input` and `target` to have the same batch size, but got input \(4, 6\) and target \(3, 6\)"),
    ("distance-c-inf", lambda: compute_distance(_f(4, 6), _f(4, 6), "pseudo_huber_norm", c=INF), OptionError,
     r"`c` \(the pseudo-Huber constant\) to be finite and >= 0, but got inf"),
    ("distance-none", lambda: compute_distance(_f(4, 6), _f(4, 6), None), OptionError,  # type: ignore[arg-type]
     r"`distance` to be one of .* or a callable"),
    ("huber-int", lambda: pseudo_huber_distance(LONG, _f(4, 6)), DTypeError, r"`input` to be a floating-point tensor"),
    ("huber-c-nan", lambda: pseudo_huber_distance(_f(4, 6), _f(4, 6), NAN), OptionError,
     r"`c` \(the pseudo-Huber constant\) to be finite and >= 0, but got nan"),
    ("huber-per_sample_norm", lambda: pseudo_huber_distance(_f(4, 6), _f(4, 6), per_sample_norm="yes"),  # type: ignore[arg-type]
     DTypeError, r"`per_sample_norm` to be True or False"),
    ("huber-nan", lambda: pseudo_huber_distance(_f(4, 6), _with(NAN, 4, 6)), NonFiniteError, r"`target` to be finite"),
    ("reduce-int", lambda: reduce_loss(torch.ones(3, dtype=torch.long)), DTypeError,
     r"`per_sample` to be a floating-point tensor"),
    ("reduce-empty", lambda: reduce_loss(torch.zeros(0)), ShapeError, r"`per_sample` to hold at least one sample"),
    ("reduce-nan", lambda: reduce_loss(_with(NAN, 3), "sum"), NonFiniteError, r"`per_sample` to be finite"),
    ("wrapper-names-huber_c", lambda: _compute_distance(_f(4, 6), _f(4, 6), "mse", c=0.1, c_name="huber_c"),
     OptionError, r"`huber_c` is the pseudo-Huber constant and unused with distance='mse', but got huber_c=0.1"),
    ("wrapper-names-negative", lambda: _compute_distance(_f(4, 6), _f(4, 6), "pseudo_huber", c=-1.0, c_name="huber_c"),
     OptionError, r"`huber_c` \(the pseudo-Huber constant\) to be finite and >= 0, but got -1.0"),
    # ------------------------------------------------------------------ rewards
    ("reward-empty", lambda: reward_hinge_loss(torch.zeros(0), 1.0), ShapeError, r"`input` to hold at least one sample"),
    ("reward-nan", lambda: reward_hinge_loss(_with(NAN, 4), 1.0), NonFiniteError, r"`input` to be finite"),
    ("reward-inf", lambda: reward_hinge_loss(_with(INF, 4), 1.0), NonFiniteError, r"`input` to be finite"),
    ("reward-cond-without-fn", lambda: reward_hinge_loss(_f(4), 1.0, cond={"prompt": 1}), OptionError,
     r"`cond` holds keyword arguments for `reward_fn`, but `reward_fn` is None"),
    ("reward-fn-int-images", lambda: reward_hinge_loss(LONG, 1.0, reward_fn=lambda x: x.float().mean(1)), DTypeError,
     r"`input` to be a floating-point tensor"),
    ("reward-fn-empty-images", lambda: reward_hinge_loss(EMPTY, 1.0, reward_fn=_Scorer()), ShapeError,
     r"`input` to hold at least one sample"),
    ("reward-fn-0d-images", lambda: reward_hinge_loss(torch.tensor(1.0), 1.0, reward_fn=_Scorer()), ShapeError,
     r"`input` to be a batch of images"),
    ("reward-fn-nan-images", lambda: reward_hinge_loss(_with(NAN, 4, 6), 1.0, reward_fn=lambda x: torch.ones(4)),
     NonFiniteError, r"`input` to be finite"),
    ("reward-fn-returns-nan", lambda: reward_hinge_loss(_f(4, 6), 1.0, reward_fn=lambda x: _with(NAN, 4)),
     NonFiniteError, r"`reward_fn\(input, \*\*cond\)` to be finite"),
    ("reward-fn-returns-int", lambda: reward_hinge_loss(_f(4, 6), 1.0, reward_fn=lambda x: torch.ones(4, dtype=torch.long)),
     DTypeError, r"`reward_fn` to return floating-point rewards"),
    ("mps-nan-input", lambda: mps_hinge_loss(_with(NAN, 4), _f(4)), NonFiniteError, r"`input` to be finite"),
    ("mps-inf-negative", lambda: mps_hinge_loss(_f(4), _with(INF, 4)), NonFiniteError, r"`negative` to be finite"),
    ("mps-empty-negative", lambda: mps_hinge_loss(_f(4), torch.zeros(0)), ShapeError,
     r"`negative` to hold at least one sample"),
    ("mps-fn-negative-nan",
     lambda: mps_hinge_loss(_f(4, 6), reward_fn=lambda x, s: x.mean(1) * s, cond={"s": 1.0}, negative_cond={"s": NAN}),
     NonFiniteError, r"`reward_fn\(input, \*\*negative_cond\)` to be finite"),
    ("MPSHingeLoss-int-cond", lambda: MPSHingeLoss()(_f(4), torch.ones(4, dtype=torch.long)), DTypeError,
     r"`cond` to be a floating-point tensor"),
    ("MPSHingeLoss-nan-cond", lambda: MPSHingeLoss()(_f(4), _with(NAN, 4)), NonFiniteError, r"`cond` to be finite"),
    ("MPSHingeLoss-batch", lambda: MPSHingeLoss()(_f(4), _f(3)), ShapeError,
     r"\(`input` and `cond`\) to have the same batch size, but got 4 and 3"),
    ("RewardHingeLoss-empty", lambda: RewardHingeLoss(None, 1.0)(torch.zeros(0)), ShapeError,
     r"`input` to hold at least one sample"),
    ("RewardHingeLoss-freeze", lambda: RewardHingeLoss(_Scorer(), 1.0, freeze=1), DTypeError,  # type: ignore[arg-type]
     r"`freeze` to be True or False"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(call: Callable[[], Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        call()
    assert type(info.value) is error  # the exact public type, not a builtin raised deeper inside


def test_case_ids_are_unique() -> None:
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------- value checks switched off
NAN_CALLS: dict[str, Callable[[], Any]] = {
    "gan_discriminator_loss": lambda: gan_discriminator_loss(_with(NAN, 3, 1), _f(3, 1))[0],
    "gan_generator_loss": lambda: gan_generator_loss(_with(NAN, 3, 1))[0],
    "GANLoss": lambda: GANLoss("hinge")(_with(NAN, 3, 1), _f(3, 1))[0],
    "approximate_r1_penalty": lambda: approximate_r1_penalty(_f(3), _with(NAN, 3), sigma=0.1)[0],
    "lazy_r1_penalty": lambda: lazy_r1_penalty(
        torch.nn.Linear(2, 1), _with(NAN, 3, 2), step=0, num_samples=None, approximate_sigma=0.1
    )[0],
    "mix_and_match": lambda: mix_and_match(_with(NAN, 3, 2), generator=_gen()).latents,
    "renoise_for_discriminator": lambda: renoise_for_discriminator(_with(NAN, 2, 3), schedule=SCHED).samples[
        0
    ],
    "dmd_loss": lambda: dmd_loss(_with(NAN, 4, 6), real_net, fake_net, schedule=SCHED, reduction="none")[0],
    "sid_loss": lambda: sid_loss(_with(NAN, 4, 6), real_net, fake_net, schedule=SCHED)[0],
    "sim_loss": lambda: sim_loss(_with(NAN, 4, 6), real_net, fake_net, schedule=SCHED)[0],
    "fake_score_loss": lambda: fake_score_loss(fake_net, _with(NAN, 4, 6), schedule=SCHED)[0],
    "denoise": lambda: denoise(real_net, _with(NAN, 4, 6), 5, SCHED),
    "compute_distance": lambda: compute_distance(_with(NAN, 4, 6), _f(4, 6)),
    "pseudo_huber_distance": lambda: pseudo_huber_distance(_f(4, 6), _with(NAN, 4, 6)),
    "reduce_loss": lambda: reduce_loss(_with(NAN, 3)),
    "reward_hinge_loss": lambda: reward_hinge_loss(_with(NAN, 4), 1.0)[0],
    "mps_hinge_loss": lambda: mps_hinge_loss(_f(4), _with(NAN, 4))[0],
    "RewardHingeLoss": lambda: RewardHingeLoss(_Scorer(), 1.0)(_with(NAN, 2, 3))[0],
    "MPSHingeLoss": lambda: MPSHingeLoss()(_with(NAN, 4), _f(4))[0],
}


@pytest.mark.parametrize("name", sorted(NAN_CALLS))
def test_nan_propagates_without_value_checks(name: str) -> None:
    with value_checks(False):  # no device sync: the NaN is not looked for, it propagates
        out = NAN_CALLS[name]()
    assert bool(torch.isnan(out).any()), name
    with pytest.raises(NonFiniteError):
        NAN_CALLS[name]()  # and the default (checks on) refuses it


def test_r1_nan_inputs_without_value_checks() -> None:
    with value_checks(False):
        r1_penalty(*_r1_inputs_nan())  # the NaN input is not looked at: its gradient is finite here


def test_lazy_r1_off_schedule_does_not_read_the_batch() -> None:
    # Off schedule the discriminator does not run and the batch is not read (no device sync).
    loss, logs = lazy_r1_penalty(torch.nn.Linear(2, 1), _with(NAN, 3, 2), step=1, every=16)
    assert float(loss) == 0.0 and float(logs["r1_active"]) == 0.0


# ---------------------------------------------------------------------------- valid inputs still accepted
def test_accepted_variants_keep_working() -> None:
    perm = random_derangement(np.int64(4), generator=_gen())  # numpy ints are ints
    assert sorted(perm.tolist()) == [0, 1, 2, 3] and bool((perm != torch.arange(4)).all())
    # A single module to freeze, an integral float count, a None log.
    lin = torch.nn.Linear(2, 2)
    seen: list[bool] = []
    loop = AlternatingUpdate(
        lambda: seen.append(lin.weight.requires_grad),
        lambda: None,
        generator_every=2.0,
        freeze_during_generator=lin,
    )  # type: ignore[arg-type]
    assert loop.step() == {} and seen == [False] and lin.weight.requires_grad
    loop.load_state_dict({"step_count": torch.tensor(3)})
    assert loop.state_dict() == {"step_count": 3}
    # uncond with a TeacherSolver real is its guidance; values as a tensor; t_range alone.
    solver = TeacherSolver(real_net, SCHED, guidance_scale=2.0)
    loss, _ = dmd_loss(
        _f(4, 6), solver, fake_net, schedule=SCHED, uncond={}, t_range=(10, 20), generator=_gen()
    )
    assert bool(torch.isfinite(loss))
    out = renoise_for_discriminator(_f(3, 2), schedule=SCHED, values=torch.tensor([3, 7]), generator=_gen())
    assert set(out.t.tolist()) <= {3, 7}
    # Conditional labels may be integer tensors: mix-and-match only permutes them.
    labels = torch.arange(3)
    mixed = mix_and_match(_f(3, 2), {"label": labels}, mismatch="cond", generator=_gen())
    assert torch.equal(mixed.cond["label"], labels[mixed.permutation])


# ---------------------------------------------------------------------------- torch.compile
@pytest.mark.compile
def test_checked_losses_compile_fullgraph_and_skip_value_checks() -> None:
    def step(r: torch.Tensor, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d, _ = gan_discriminator_loss(r, f, loss="hinge")
        g, _ = gan_generator_loss(f)
        a, _ = approximate_r1_penalty(r, f, sigma=0.5)
        h = pseudo_huber_distance(r, y, 0.1) + compute_distance(r, y, "l1")
        w, _ = reward_hinge_loss(r.mean(dim=1), 0.5)
        m, _ = mps_hinge_loss(r.mean(dim=1), f.mean(dim=1), s0=1.0)
        return d + g + a + h + reduce_loss(w.reshape(1)) + m

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    args = (_f(3, 2), _f(3, 2) + 1, _f(3, 2) - 1)
    torch.testing.assert_close(compiled(*args), step(*args))
    # Value checks do not run while compiling: a NaN propagates instead of breaking the graph.
    assert bool(torch.isnan(compiled(_with(NAN, 3, 2), args[1], args[2])))


def test_messages_name_public_arguments_only() -> None:
    # No message of this table names an internal alias (`c` for `huber_c` in a wrapper, `rewards` for `input`,
    # `x0` for the score losses' `x`, `t` for `values`).
    for case_id, call, _, _ in CASES:
        try:
            call()
        except (DTypeError, ShapeError, OptionError, NonFiniteError) as err:
            msg = str(err)
            assert "`rewards`" not in msg, case_id
            if case_id.startswith(("dmd-", "sid-", "sim-")):
                assert "`x0`" not in msg and "`model_output`" not in msg, (case_id, msg)
            if case_id.startswith("renoise-values"):
                assert not re.search(r"`t`", msg), (case_id, msg)
