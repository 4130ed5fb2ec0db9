"""Score distillation plumbing: the online fake score and its alternation with the generator."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from . import runtime, validation


def add_fake_score_args(group: Any) -> None:
    """Options of the one-step generator, the online fake score and the generator / fake-score alternation."""
    group.add_argument(
        "--generator_timestep", type=int, default=999, help="timestep the one-step generator is called at"
    )
    group.add_argument("--fake_learning_rate", type=float, default=None, help="default: --learning_rate")
    group.add_argument(
        "--generator_every",
        type=int,
        default=1,
        help="fake updates per generator update (DMD2: 5; sdxl_sim.py takes its default from --preset)",
    )
    group.add_argument("--fake_steps", type=int, default=1, help="fake-score updates per step")
    group.add_argument(
        "--fake_weighting",
        choices=["epsilon", "v", "x0", "edm"],
        default="epsilon",
        help="space of the fake score's denoising loss",
    )


class ScoreDistillation:
    """Alternating updates of a one-step generator and its online fake score (SIM, SiD, DMD).

    ``loss(x, z, generator, cond) -> (loss, logs)`` is the generator's objective on its samples
    ``x = one_step_x0(generator_model, z)`` at ``--generator_timestep`` (``generator`` and ``fake`` are
    ``(prepared model, optimiser)``; e.g. :func:`diffdistill.losses.dmd_loss` against the real and
    fake scores); the fake score is fitted to the detached samples by
    :func:`diffdistill.losses.fake_score_loss`, or by ``fake_loss(x, generator, cond) -> (loss, logs)`` when
    given (e.g. SiD-LSG's guided fake score on its own timestep range, ``sdxl_sim.py``).
    :class:`diffdistill.losses.AlternatingUpdate` alternates the two (``--generator_every``, ``--fake_steps``)
    with the fake network frozen in the generator step. The phase is a function of the step index, so a
    resumed run needs no extra state.
    """

    def __init__(
        self,
        accelerator: Any,
        args: argparse.Namespace,
        schedule: Any,
        *,
        generator: tuple[nn.Module, torch.optim.Optimizer],
        fake: tuple[nn.Module, torch.optim.Optimizer],
        loss: Any,
        fake_loss: Any = None,
    ) -> None:
        from diffdistill.losses import AlternatingUpdate

        self.accelerator, self.args, self.schedule = accelerator, args, schedule
        (self.generator, self.opt_g), (self.fake, self.opt_f) = generator, fake
        self.generator_loss, self.fake_loss = loss, fake_loss
        self.latent_shape = (args.train_batch_size, 4, args.resolution // 8, args.resolution // 8)
        self.loop = AlternatingUpdate(
            self._generator_step,
            self._fake_step,
            generator_every=args.generator_every,
            fake_steps=args.fake_steps,
            freeze_during_generator=[self.fake],
        )
        self._state: dict[str, Any] = {}

    def generate(
        self, model: Any, gen: torch.Generator, cond: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, z)``: one-step samples of ``model`` and the noise ``z`` drawn from ``gen``."""
        z = torch.randn(self.latent_shape, generator=gen).to(self.accelerator.device)
        return validation.one_step_x0(model, self.schedule, z, self.args.generator_timestep, cond), z

    def step(self, step: int, gen: torch.Generator, cond: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The updates of optimisation step ``step`` (0-based, counted from the first score-distillation step)
        for one micro-batch."""
        self._state = {"gen": gen, "cond": cond, "x": None}
        # The update phase follows the optimisation step, so every micro-batch of a step runs the same
        # updates (with gradient accumulation) and a resumed run keeps the phase without extra state.
        self.loop.step_count = step
        with self.accelerator.accumulate(self.generator, self.fake), runtime.autocast(self.accelerator):
            return self.loop.step()

    def _generator_step(self) -> dict[str, torch.Tensor]:
        gen, cond = self._state["gen"], self._state["cond"]
        x, z = self.generate(self.generator, gen, cond)
        loss, logs = self.generator_loss(x, z, gen, cond)
        runtime.backward(self.accelerator, loss, self.generator)
        runtime.clip_and_step(
            self.accelerator, self.opt_g, self.generator.parameters(), self.args.max_grad_norm
        )
        self._state["x"] = x.detach()
        return logs

    def _fake_step(self) -> dict[str, torch.Tensor]:
        from diffdistill.losses import fake_score_loss

        gen, cond = self._state["gen"], self._state["cond"]
        x = self._state["x"]
        if x is None:  # the generator step was skipped this time (generator_every > 1)
            with torch.no_grad():
                x, _ = self.generate(self.generator, gen, cond)
        if self.fake_loss is not None:
            loss, logs = self.fake_loss(x, gen, cond)
        else:
            loss, logs = fake_score_loss(
                self.fake,
                x,
                schedule=self.schedule,
                weighting=self.args.fake_weighting,
                cond=cond,
                generator=gen,
            )
        runtime.backward(self.accelerator, loss, self.fake)
        runtime.clip_and_step(self.accelerator, self.opt_f, self.fake.parameters(), self.args.max_grad_norm)
        return logs
