r"""Accuracy of APT's approximate R1 on Diffusion2GAN's discriminator, per sigma and per precision.

APT's penalty (Lin et al. 2025, arXiv:2501.08316; :func:`~diffdistill.losses.approximate_r1_penalty`)
squares the finite difference :math:`(D(x + \sigma\epsilon) - D(x)) / \sigma`, an estimate of the
directional derivative :math:`\nabla_x D(x) \cdot \epsilon`, whose square averages over
:math:`\epsilon` to R1's :math:`\|\nabla_x D(x)\|^2`. One draw per sample differs from exact R1 by
Monte-Carlo noise (relative standard deviation :math:`\sqrt 2` per sample for Gaussian :math:`\epsilon`;
zero-mean, it averages out over samples and steps). This script sets that noise aside: draw by draw, with
the same :math:`\epsilon`, it compares the approximation against
:math:`\tfrac{\gamma}{2} (\nabla_x D(x) \cdot \epsilon)^2`, the one-direction estimate whose mean is
exactly R1. What remains is what the approximation itself adds: the finite difference's truncation
(relative order :math:`\sigma`, from D's curvature) and the rounding of the precision it runs in
(relative order :math:`u / \sigma`, ``u`` the unit roundoff: 2^-53 float64, 2^-24 float32, 2^-8 for bf16
autocast, where the difference is taken between logits computed in bf16).

The exact counterpart is a float64 central difference, ``approximate_r1_penalty(D(x - h eps), D(x + h
eps), sigma=2h)`` = :math:`\tfrac{\gamma}{2}((D(x+h\epsilon) - D(x-h\epsilon)) / 2h)^2` with ``h =
--h`` (error :math:`O(h^2)`; the header reports how far it moves when ``h`` is 10 times larger), so it
uses the library's public function only, with no double backward.

For each ``--sigmas`` value and precision (``float64``: D in float64; ``float32``; ``bf16 autocast``:
float32 weights under bf16 autocast, as the Diffusion2GAN script trains D) over ``--draws`` draws of
:math:`\epsilon` (batch ``--batch``):

* ``value``: :math:`\sum |\tilde p - p| / \sum p` over samples and draws, ``p`` the per-sample penalty
  (the error of one step's penalty; its term odd in :math:`\epsilon`, :math:`\sigma (\nabla_x D \cdot
  \epsilon)(\epsilon^\top H \epsilon)`, has mean zero);
* ``mean``: :math:`|\sum \tilde p - \sum p| / \sum p`, the bias left after averaging over the draws
  (truncation :math:`O(\sigma^2)` plus rounding; with few draws the odd term's average remains in it);
* ``gradient``: :math:`\|\tilde g - g\| / \|g\|`, ``g`` the gradient of the draws' summed mean penalty
  in D's trainable parameters (what the penalty does to training).

D is the multi-scale conditional discriminator on a randomly initialised tiny SDXL-structured UNet
(:func:`r1.discriminator_setup`); a trained D has other curvature and logit scales, so the figures show
where the trade-off lies and how precision moves it, not the value to use for SDXL.

Usage::

    python benchmarks/r1_accuracy.py                  # CPU, tiny UNet, 32x32 latents, 16 draws
    python benchmarks/r1_accuracy.py --sigmas 0.03 0.1 0.3 --draws 4
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass

import torch
from r1 import Setup, discriminator_setup

from diffdistill.losses import approximate_r1_penalty

PRECISIONS = ("float64", "float32", "bf16 autocast")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--latent_size", type=int, default=32)
    p.add_argument("--batch", type=int, default=2, help="real latents per draw (default 2)")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0])
    p.add_argument("--draws", type=int, default=16, help="directions eps per sample (default 16)")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--h", type=float, default=1e-4, help="float64 central difference step of the reference")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    args = p.parse_args(argv)
    if args.batch < 1 or args.draws < 1 or not args.h > 0 or not all(s > 0 for s in args.sigmas):
        p.error(
            f"--batch and --draws must be >= 1, --h and every --sigmas > 0, got {args.batch}, {args.draws}, "
            f"{args.h}, {args.sigmas}"
        )
    args.device = torch.device(args.device)
    args.sdxl, args.no_gradient_checkpointing = False, True  # what r1.discriminator_setup reads
    return args


@dataclass
class Penalty:
    """One way of computing the per-sample penalty: a discriminator copy and the precision it runs in."""

    setup: Setup
    dtype: torch.dtype  # of the weights and inputs
    autocast: bool  # bf16 autocast around the discriminator calls

    def logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        cond = {k: _cast(v, self.dtype) for k, v in self.setup.cond.items()}
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.setup.call(x.to(self.dtype), **cond)

    def params(self) -> list[torch.nn.Parameter]:
        return [q for q in self.setup.disc.parameters() if q.requires_grad]

    def value_and_grad(
        self, lo: torch.Tensor, hi: torch.Tensor, sigma: float, gamma: float
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-sample ``approximate_r1_penalty(D(lo), D(hi), sigma)`` and the gradient of its mean (float64)."""
        per_sample, _ = approximate_r1_penalty(
            self.logits(lo), self.logits(hi), sigma=sigma, gamma=gamma, reduction="none"
        )
        grads = torch.autograd.grad(per_sample.mean(), self.params())
        return per_sample.detach().double(), [g.double() for g in grads]


def _cast(value: object, dtype: torch.dtype) -> object:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def penalties(args: argparse.Namespace) -> tuple[Penalty, dict[str, Penalty]]:
    """The float64 reference and one :class:`Penalty` per requested precision, all from the same D."""
    setup = discriminator_setup(args)
    setup.disc.eval()
    as64 = Setup(copy.deepcopy(setup.disc).double(), setup.real, setup.fake, setup.cond, setup.generator)
    made = {
        "float64": Penalty(as64, torch.float64, False),
        "float32": Penalty(setup, torch.float32, False),
        "bf16 autocast": Penalty(setup, torch.float32, True),
    }
    return made["float64"], {name: made[name] for name in args.precisions}


def _add(total: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [a + b for a, b in zip(total, grads)] if total else grads


def _relative(diff: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum(float(d.square().sum()) for d in diff)
    den = sum(float(r.square().sum()) for r in ref)
    return (num / den) ** 0.5


def measure(args: argparse.Namespace) -> tuple[dict[tuple[float, str], tuple[float, float, float]], float]:
    """``{(sigma, precision): (value, mean, gradient errors)}`` and the reference's own h vs 10h spread."""
    ref, ways = penalties(args)
    x = ref.setup.real.double()
    gen = torch.Generator().manual_seed(1)
    ref_sum = 0.0
    ref_grad: list[torch.Tensor] = []
    abs_err: dict[tuple[float, str], float] = {}
    total: dict[tuple[float, str], float] = {}
    grad: dict[tuple[float, str], list[torch.Tensor]] = {}
    spread = float("nan")
    for draw in range(args.draws):
        # eps drawn in float32 on the CPU, as lazy_r1_penalty draws it, then cast per precision.
        eps = torch.randn(x.shape, generator=gen).to(x.device, torch.float64)
        h = args.h
        p_ref, g_ref = ref.value_and_grad(x - h * eps, x + h * eps, 2 * h, args.gamma)
        if draw == 0:
            p_wide, _ = ref.value_and_grad(x - 10 * h * eps, x + 10 * h * eps, 20 * h, args.gamma)
            spread = float((p_wide - p_ref).abs().sum() / p_ref.sum())
        ref_sum += float(p_ref.sum())
        ref_grad = _add(ref_grad, g_ref)
        for sigma in args.sigmas:
            for name, way in ways.items():
                xd, ed = x.to(way.dtype), eps.to(way.dtype)
                p, g = way.value_and_grad(xd, xd + sigma * ed, sigma, args.gamma)
                key = (sigma, name)
                abs_err[key] = abs_err.get(key, 0.0) + float((p - p_ref).abs().sum())
                total[key] = total.get(key, 0.0) + float(p.sum())
                grad[key] = _add(grad.get(key, []), g)
        print(f"# draw {draw + 1}/{args.draws}", file=sys.stderr, flush=True)
    out = {
        key: (
            abs_err[key] / ref_sum,
            abs(total[key] - ref_sum) / ref_sum,
            _relative([a - b for a, b in zip(grad[key], ref_grad)], ref_grad),
        )
        for key in abs_err
    }
    return out, spread


def main(args: argparse.Namespace) -> str:
    errors, spread = measure(args)
    names = list(args.precisions)
    lines = [
        f"tiny SDXL-structured UNet, multi-scale D (random weights), latents {args.batch}x4x{args.latent_size}x"
        f"{args.latent_size}, {args.draws} draws of eps, {args.device}, torch {torch.__version__}; relative "
        f"error against the float64 central difference (h {args.h:g}; at 10h it moves {spread:.1e})",
        "",
        "| sigma | " + " | ".join(f"{n}: value | {n}: mean | {n}: gradient" for n in names) + " |",
        "|---:|" + "---:|---:|---:|" * len(names),
    ]
    for sigma in args.sigmas:
        cells = " | ".join(" | ".join(f"{e:.1e}" for e in errors[(sigma, n)]) for n in names)
        lines.append(f"| {sigma:g} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(parse_args()))
