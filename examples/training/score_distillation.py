"""The online fake score, DMD2's GAN classifier on it, and their alternation with a one-step generator."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from . import runtime, sdxl_models, validation

#: DMD2-SDXL's ``gen_cls_loss_weight``: ``--gan_weight`` given without a value (tianweiy/DMD2 experiments/sdxl).
DMD2_SDXL_GAN_WEIGHT = 5e-3
#: DMD2-SDXL's ``guidance_cls_loss_weight``: the classifier's weight in the fake-score update.
DMD2_SDXL_CLASSIFIER_WEIGHT = 1e-2


def add_fake_score_args(group: Any, *, one_step: bool = True) -> None:
    """Options of the online fake score and the generator / fake-score alternation; with ``one_step`` also the
    timestep a one-step generator is called at and what it is fed there (a generator fed from noise)."""
    if one_step:
        group.add_argument(
            "--generator_timestep", type=int, default=999, help="timestep the one-step generator is called at"
        )
        group.add_argument(
            "--generator_input",
            choices=validation.GENERATOR_INPUTS,
            default="noise",
            help="what the one-step generator is fed at --generator_timestep: 'noise' = pure noise z (DMD2), "
            "'noised' = a zero image noised to it, sigma_t z (SiD-LSG's add_noise(0, z, 625), SIM's sigma_init z)",
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


def add_gan_args(group: Any) -> None:
    """Options of DMD2's GAN classifier on the fake score's bottleneck (:class:`BottleneckGAN`)."""
    group.add_argument(
        "--gan_weight",
        type=float,
        nargs="?",
        const=DMD2_SDXL_GAN_WEIGHT,
        default=0.0,
        help="weight of the GAN classifier's non-saturating term in the generator loss (DMD2's "
        f"gen_cls_loss_weight; the flag alone: DMD2-SDXL's {DMD2_SDXL_GAN_WEIGHT}). 0 (the default): no classifier",
    )
    group.add_argument(
        "--gan_classifier_weight",
        type=float,
        default=DMD2_SDXL_CLASSIFIER_WEIGHT,
        help="weight of the classifier's loss in the fake-score update (DMD2's guidance_cls_loss_weight, "
        f"SDXL: {DMD2_SDXL_CLASSIFIER_WEIGHT})",
    )


def check_gan_args(args: argparse.Namespace) -> None:
    """Refuse negative GAN weights (``ValueError`` with the fix)."""
    for name in ("gan_weight", "gan_classifier_weight"):
        if not getattr(args, name) >= 0:
            raise ValueError(
                f"Expected --{name} >= 0, but got {getattr(args, name)} (0 turns the GAN term off)."
            )


def check_engine(accelerator: Any, args: argparse.Namespace) -> None:
    """Refuse ``--gan_weight`` under FSDP / DeepSpeed (see :meth:`BottleneckGAN.build`); the scripts call it right
    after ``runtime.make_accelerator``, before any model loads. Raises ``ValueError`` with the fix."""
    if getattr(args, "gan_weight", 0) and runtime.is_sharded(accelerator):
        raise ValueError(
            "--gan_weight: DMD2's classifier runs the fake score UNet's encoder and mid block outside the "
            "fake score's FSDP / DeepSpeed engine, which shards them; run it under DDP or on one process, "
            "or leave --gan_weight 0."
        )


class BottleneckGAN:
    """DMD2's GAN classifier on the fake score UNet's bottleneck (Yin et al. 2024, arXiv:2405.14867, Sec. 4.3).

    As DMD2's code (``cls_on_clean_image``, ``compute_cls_logits``): latents are noised to
    ``t ~ U{0, ..., T-1}`` (a Diffusion-GAN), the fake score UNet's encoder and mid block give the
    bottleneck features (conditioned on the batch's prompts) and
    :class:`diffdistill.discriminators.BottleneckHead` (``cls_pred_branch``) the logit. The generator adds ``--gan_weight`` times the
    non-saturating term ``softplus(-D(fake))`` (``gen_cls_loss``) through the frozen classifier; the fake-score
    update adds ``--gan_classifier_weight`` times ``softplus(D(fake)) + softplus(-D(real))``
    (``guidance_cls_loss``) on detached generator samples and the real latents, so the classifier trains the
    head and the fake UNet's trunk in the fake-score step, as DMD2's guidance update does. Our choices: the
    head has its own optimiser (at the fake score's learning rate) and is clipped on its own; real and fake
    latents draw their own timesteps and noise and go through the head in one call.

    Args:
        accelerator: the run's accelerator.
        head: the prepared :class:`~diffdistill.discriminators.BottleneckHead` (see :meth:`build`).
        optimizer: the head's prepared optimiser.
        schedule: the :class:`~diffdistill.schedulers.NoiseSchedule` that noises the latents.
        weight: ``--gan_weight``.
        classifier_weight: ``--gan_classifier_weight``.
    """

    def __init__(
        self,
        accelerator: Any,
        head: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Any,
        *,
        weight: float,
        classifier_weight: float,
    ) -> None:
        self.accelerator, self.head, self.optimizer, self.schedule = accelerator, head, optimizer, schedule
        self.weight, self.classifier_weight = float(weight), float(classifier_weight)

    @classmethod
    def build(
        cls, accelerator: Any, args: argparse.Namespace, fake: nn.Module, schedule: Any
    ) -> BottleneckGAN:
        """The classifier head on the (prepared) fake score UNet ``fake``, its optimiser, both prepared.

        The head is sized for ``--resolution`` and shares the fake UNet's weights; it is a prepared model of
        its own, so checkpoints hold it and its optimiser. Refused under FSDP / DeepSpeed, where the shared
        trunk is sharded by the fake score's engine and the head would run it outside that engine. A fake
        score that is an adapter of a ``--shared_base`` UNet: the head reads that UNet's encoder and mid block
        run under the fake score's adapter (``shared_critics.ActiveAdapter``), which stays the fake score's to
        train (as DMD2's classifier trains the fake score's trunk).
        """
        from diffdistill.discriminators import BottleneckHead
        from diffdistill.students import AdapterView

        from . import shared_critics

        check_engine(accelerator, args)
        trunk = accelerator.unwrap_model(fake)
        view = trunk if isinstance(trunk, AdapterView) else None
        if view is not None:
            trunk = view.shared_base.model
        head: nn.Module = BottleneckHead(
            trunk, feature_resolution=sdxl_models.discriminator_feature_resolution(trunk, args.resolution)
        )
        if view is not None:
            head = shared_critics.ActiveAdapter(head, view.shared_base, view.adapter_name, owns_adapter=False)
        lr = args.fake_learning_rate or args.learning_rate
        optimizer = runtime.adamw(head.parameters(), args, lr=lr)
        head, optimizer = runtime.prepare(accelerator, (head, optimizer))
        return cls(
            accelerator,
            head,
            optimizer,
            schedule,
            weight=args.gan_weight,
            classifier_weight=args.gan_classifier_weight,
        )

    def logits(
        self, head: nn.Module, batches: list[torch.Tensor], gen: torch.Generator, cond: dict[str, Any]
    ) -> list[torch.Tensor]:
        """``head``'s logits of each batch of latents, noised to timesteps ``t ~ U{0, ..., T-1}`` drawn from
        ``gen`` (per batch: its ``t``, then its noise); one call of ``head`` on all of them (a DDP-wrapped head
        runs one forward per backward)."""
        noised, timesteps = [], []
        for latents in batches:
            batch, device = latents.shape[0], latents.device
            t = torch.randint(0, self.schedule.num_train_timesteps, (batch,), generator=gen).to(device)
            noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
            noised.append(self.schedule.add_noise(latents, noise, t))
            timesteps.append(t)
        logits = head(torch.cat(noised), torch.cat(timesteps), **_repeat_batch(cond, len(batches)))[0]
        return list(logits.chunk(len(batches)))

    def generator_term(
        self, x: torch.Tensor, gen: torch.Generator, cond: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``--gan_weight * softplus(-D(x))`` of the generator's samples ``x``, through the frozen classifier."""
        from diffdistill.losses import gan_generator_loss

        (logits,) = self.logits(self.accelerator.unwrap_model(self.head), [x], gen, cond)
        loss, logs = gan_generator_loss(logits)
        return self.weight * loss, {f"gan_{k}": v for k, v in logs.items()}

    def classifier_term(
        self, real: torch.Tensor, fake: torch.Tensor, gen: torch.Generator, cond: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``--gan_classifier_weight * (softplus(D(fake)) + softplus(-D(real)))``; ``fake`` is detached here."""
        from diffdistill.losses import gan_discriminator_loss

        real_logits, fake_logits = self.logits(self.head, [real, fake.detach().to(real.dtype)], gen, cond)
        loss, logs = gan_discriminator_loss(real_logits, fake_logits)
        return self.classifier_weight * loss, {f"gan_{k}": v for k, v in logs.items()}


def _repeat_batch(cond: Any, times: int) -> Any:
    """Every tensor of the UNet keyword arguments ``cond`` repeated ``times`` times along the batch."""
    if isinstance(cond, dict):
        return {k: _repeat_batch(v, times) for k, v in cond.items()}
    return torch.cat([cond] * times) if isinstance(cond, torch.Tensor) and times > 1 else cond


class CriticUpdates:
    """The two updates every score-distillation loop shares: the generator's (its loss plus the optional GAN
    term, then backward and a clipped optimiser step) and the fake score's (its loss plus the optional GAN
    classifier's, then the fake score's and the classifier heads' steps).

    Subclasses set ``accelerator``, ``args`` (``--max_grad_norm``), ``generator`` / ``opt_g``, ``fake`` /
    ``opt_f``, ``gan`` (a :class:`BottleneckGAN` or ``None``) and ``_state["gen" | "cond" | "real"]``, the
    step's random generator, UNet / transformer keyword arguments and real latents.
    """

    accelerator: Any
    args: argparse.Namespace
    generator: nn.Module
    opt_g: torch.optim.Optimizer
    fake: nn.Module
    opt_f: torch.optim.Optimizer
    gan: BottleneckGAN | None
    _state: dict[str, Any]

    def generator_steps_at(self, step: int) -> bool:
        """Whether the generator takes an optimiser step in step ``step`` (0-based, counted as :meth:`step` counts:
        from the first score-distillation step): every ``--generator_every``-th. The scripts pass it to
        ``loop.train_loop(ema_due=...)``, so ``--use_ema`` averages the generator once per update of it (with
        ``--generator_every 5`` a per-step EMA would decay 5 times per generator update: ``--ema_decay``'s horizon
        5x shorter than it says)."""
        return step % self.args.generator_every == 0

    def update_generator(
        self, x: torch.Tensor, loss: torch.Tensor, logs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Add the GAN term of the generator's samples ``x`` to its ``loss``, backward, clip, step."""
        if self.gan is not None:
            gan_loss, gan_logs = self.gan.generator_term(x, self._state["gen"], self._state["cond"])
            loss, logs = loss + gan_loss, {**logs, **gan_logs}
        runtime.backward(self.accelerator, loss, self.generator)
        runtime.clip_and_step(
            self.accelerator, self.opt_g, self.generator.parameters(), self.args.max_grad_norm
        )
        return logs

    def update_fake(
        self, x: torch.Tensor, loss: torch.Tensor, logs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Add the GAN classifier's loss on the real latents and the detached samples ``x`` to the fake score's
        ``loss``, backward, then clip and step the fake score (and the classifier heads)."""
        if self.gan is not None:
            gen, cond = self._state["gen"], self._state["cond"]
            cls_loss, cls_logs = self.gan.classifier_term(self._state["real"], x, gen, cond)
            loss, logs = loss + cls_loss, {**logs, **cls_logs}
        runtime.backward(self.accelerator, loss, self.fake)
        runtime.clip_and_step(self.accelerator, self.opt_f, self.fake.parameters(), self.args.max_grad_norm)
        if self.gan is not None:
            runtime.clip_and_step(
                self.accelerator, self.gan.optimizer, self.gan.head.parameters(), self.args.max_grad_norm
            )
        return logs


class ScoreDistillation(CriticUpdates):
    """Alternating updates of a generator and its online fake score (SIM, SiD, DMD), optionally with DMD2's GAN
    classifier on the fake score (:class:`BottleneckGAN`).

    ``loss(x, z, generator, cond) -> (loss, logs)`` is the generator's objective on its samples ``x``
    (``generator`` and ``fake`` are ``(prepared model, optimiser)``; e.g. :func:`diffdistill.losses.dmd_loss`
    against the real and fake scores). The samples are the clean latents the generator predicts in one call:
    from the noise ``z`` at ``--generator_timestep`` (a one-step generator, fed as ``--generator_input`` says), or from the state a caller
    passes to :meth:`step` as ``start`` (MLCM's re-noised student samples). The fake score is fitted to the
    detached samples by :func:`diffdistill.losses.fake_score_loss`, or by
    ``fake_loss(x, generator, cond) -> (loss, logs)`` when given (e.g. SiD-LSG's guided fake score on its own
    timestep range, ``sdxl_sim.py``). With ``gan`` the generator loss gains the classifier's term and the
    fake-score update the classifier's loss on the ``real`` latents passed to :meth:`step`.
    :class:`diffdistill.losses.AlternatingUpdate` alternates the two (``--generator_every``, ``--fake_steps``)
    with the fake network (and the classifier head) frozen in the generator step. The phase is a function of
    the step index, so a resumed run needs no extra state.
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
        gan: BottleneckGAN | None = None,
    ) -> None:
        from diffdistill.losses import AlternatingUpdate

        self.accelerator, self.args, self.schedule = accelerator, args, schedule
        (self.generator, self.opt_g), (self.fake, self.opt_f) = generator, fake
        self.generator_loss, self.fake_loss, self.gan = loss, fake_loss, gan
        self.latent_shape = (args.train_batch_size, 4, args.resolution // 8, args.resolution // 8)
        self.models = [self.generator, self.fake] + ([gan.head] if gan is not None else [])
        self.loop = AlternatingUpdate(
            self._generator_step,
            self._fake_step,
            generator_every=args.generator_every,
            fake_steps=args.fake_steps,
            freeze_during_generator=self.models[1:],
        )
        self._state: dict[str, Any] = {}

    def generate(
        self, model: Any, gen: torch.Generator, cond: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, z)``: the clean latents ``model`` predicts from ``z`` in one call (float32).

        ``z`` is the step's ``start`` state at its timesteps when :meth:`step` got one, else pure noise drawn
        from ``gen``, fed at ``--generator_timestep`` as ``--generator_input`` says
        (:func:`training.validation.one_step_input`).
        """
        start = self._state.get("start")
        if start is None:
            z = torch.randn(self.latent_shape, generator=gen).to(self.accelerator.device)
            t, fed = self.args.generator_timestep, self.args.generator_input
            return validation.one_step_x0(model, self.schedule, z, t, cond, fed), z
        z, t = start
        return self.schedule.to_x0(model(z, t, **cond).sample.float(), z, t), z

    def step(
        self,
        step: int,
        gen: torch.Generator,
        cond: dict[str, Any],
        *,
        real: torch.Tensor | None = None,
        start: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The updates of optimisation step ``step`` (0-based, counted from the first score-distillation step)
        for one micro-batch.

        ``real``: the real latents of the GAN classifier (needed with ``gan``). ``start``: ``(z, t)``, the
        generator's input states and their ``(B,)`` timesteps (default: pure noise at ``--generator_timestep``).
        """
        if self.gan is not None and real is None:
            raise ValueError("The GAN classifier needs the step's real latents: pass `real`.")
        self._state = {"gen": gen, "cond": cond, "x": None, "real": real, "start": start}
        # The update phase follows the optimisation step, so every micro-batch of a step runs the same
        # updates (with gradient accumulation) and a resumed run keeps the phase without extra state.
        self.loop.step_count = step
        with self.accelerator.accumulate(*self.models), runtime.autocast(self.accelerator):
            return self.loop.step()

    def _generator_step(self) -> dict[str, torch.Tensor]:
        gen, cond = self._state["gen"], self._state["cond"]
        x, z = self.generate(self.generator, gen, cond)
        logs = self.update_generator(x, *self.generator_loss(x, z, gen, cond))
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
        return self.update_fake(x, loss, logs)
