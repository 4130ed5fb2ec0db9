"""Shared-base critics of SD3 / FLUX / Wan score distillation (DMD2, SiD, SIM): one frozen transformer, three views."""

# The generator, the fake score and the real score of ``examples/flow_dmd2.py`` are views of ONE frozen transformer
# (:class:`diffdistill.students.SharedBase`): the generator's LoRA adapter, the fake score's LoRA adapter, and the
# transformer with both off (the teacher / real score). This module holds what the script needs beside the
# library's losses:
#
# - :func:`build_shared_base`: the base with the two adapters on the family's LoRA targets
#   (:func:`training.flow_families.lora_targets`).
# - :func:`loss_schedule`: the unshifted flow schedule the losses noise the generator's samples on
#   (``sigma_t = (t + 1) / 1000``), so a uniform draw of ``t`` is a uniform draw of sigma (FastGen's FLUX DMD2
#   draws ``t ~ U[0.001, 0.999]`` on the unshifted rectified-flow path); :func:`sigma_range_to_t`.
# - :func:`student_grid`: the K-step grid of the generator (the model's own shifted ``linspace(1, 1/K, K)``).
# - :func:`renoise_steps`: DMD2's few-step sampler (predict x0, re-noise to the next sigma with fresh noise), used
#   for the backward simulation of a training input and for the validation grid.
# - :class:`FlowScoreDistillation`: the alternation of fake-score and generator updates
#   (:class:`diffdistill.losses.AlternatingUpdate`), with DMD2's backward simulation of the generator's input.
# - :class:`FakeFeatureGAN`: DMD2's GAN classifier as LADD heads on the fake score's transformer blocks.
# - :func:`save_adapter`: an adapter as a LoRA file the pipeline class loads (``load_lora_weights``).

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data_sources, flow_families, flow_models, runtime, score_distillation, sdxl_models, wan_experts

GENERATOR, FAKE = "generator", "fake"
FAKE_LORA_NAME = "fake_lora_weights.safetensors"  # the fake score's adapter in the output folder


def build_shared_base(
    args: argparse.Namespace, transformer: nn.Module, device: Any, dtype: torch.dtype, family: str
) -> Any:
    """The :class:`diffdistill.students.SharedBase` of ``transformer`` with the generator's and the fake score's
    LoRA adapters (``--lora_rank`` / ``--lora_alpha`` on the ``family``'s
    :func:`training.flow_families.lora_targets`, float32)
    over the frozen base in ``dtype`` on ``device``; ``--gradient_checkpointing`` recomputes each block under the
    adapter it ran with (:meth:`SharedBase.enable_gradient_checkpointing`)."""
    from diffdistill.students import SharedBase, add_lora

    transformer.requires_grad_(False)
    sdxl_models.to_frozen_dtype(transformer, device, dtype)
    for name in (GENERATOR, FAKE):
        add_lora(
            transformer,
            rank=args.lora_rank,
            alpha=args.lora_alpha,
            targets=flow_families.lora_targets(family),
            adapter_name=name,
        )
    sdxl_models.upcast_trainable(transformer)
    base = SharedBase(transformer)
    if args.gradient_checkpointing:
        base.enable_gradient_checkpointing()
    return base


def check_engine(accelerator: Any) -> None:
    """Refuse DeepSpeed (``ValueError`` naming the reason and the fix).

    DeepSpeed wraps each prepared model in its own engine (its own flat, partitioned parameters and its own
    backward hooks), while the generator's and the fake score's adapters live inside one transformer that is no
    prepared model: every view runs the other's LoRA layers and the frozen base outside its engine. Under FSDP2
    the base is sharded once (:meth:`~diffdistill.students.SharedBase.fully_shard`, ``shared_critics.shard``) and
    each view shards its own adapter with its optimiser; ``--gan_weight`` works there too (the heads' pass runs
    the sharded base under the fake adapter while the fake view's adapter is unsharded; tested equal to DDP on 2
    CPU processes).
    """
    if runtime.distributed_kind(accelerator) == "DEEPSPEED":
        raise ValueError(
            "flow_dmd2.py runs under DDP, FSDP2 or one process, not DeepSpeed: DeepSpeed wraps each prepared model "
            "in its own engine, while the generator's and the fake score's LoRA adapters share one frozen "
            "transformer that no engine owns. Launch with DDP (accelerate launch --multi_gpu) or FSDP2 "
            "(--use_fsdp --fsdp_version 2), or on one process."
        )


def loss_schedule() -> Any:
    """The unshifted rectified-flow schedule of the score losses: ``sigma_t = (t + 1) / 1000``, model timestep
    ``1000 sigma`` (what :class:`training.flow_models.FlowDenoiser` takes for both families)."""
    from diffdistill.schedulers import NoiseSchedule

    return NoiseSchedule.flow_matching(shift=1.0, timestep_scale=1000.0)


def sigma_range_to_t(sigma_range: tuple[float, float], schedule: Any) -> tuple[int, int]:
    """The inclusive index range of :func:`loss_schedule` whose sigmas lie in ``sigma_range`` (rounded)."""
    total = schedule.num_train_timesteps
    low, high = (min(max(round(s * total) - 1, 0), total - 1) for s in sigma_range)
    return int(low), int(high)


def student_grid(schedule: Any, num_steps: int) -> list[float]:
    """The generator's ``num_steps`` noise levels: ``linspace(1, 1/K, K)`` shifted with the model's own shift at the
    training resolution (SD3: static 3; FLUX: ``mu`` of the token count), as ``FluxPipeline`` builds its grid
    (:func:`diffdistill.schedulers.flow_pipeline_grid`; SD3 at K = 4: 1, 0.9, 0.75, 0.5)."""
    from diffdistill.schedulers import flow_pipeline_grid

    grid = [float(s) for s in flow_pipeline_grid(schedule, num_steps, pipeline="flux").sigmas[:-1]]
    # every shift maps 1 to 1; e^mu / (e^mu + 1/1 - 1) can round to one ulp below: the generator starts at noise
    return [1.0 if abs(grid[0] - 1.0) < 1e-12 else grid[0], *grid[1:]]


def renoise_steps(
    denoiser: Any,
    noise: torch.Tensor,
    sigmas: list[float],
    cond: dict[str, Any],
    generator: torch.Generator,
    steps: int | None = None,
) -> torch.Tensor:
    """DMD2's few-step sampler on the flow path (float32 state): from the zero image noised to ``sigmas[0]``,
    ``sigmas[0] * noise`` (pure noise at ``sigmas[0] = 1``; below 1 SiD's / SIM's ``sigma_init z`` input, Zhou et
    al. 2024, Luo et al. 2024), predict ``x0 = x - sigma v`` and re-noise it to the next sigma with fresh noise,
    ``x <- (1 - sigma') x0 + sigma' eps`` (DMD2's ``sample_backward``; diffusers'
    ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``). ``steps`` (default all): stop after that many
    steps and return the state at ``sigmas[steps]`` (the backward simulation of a training input); after the last
    step the clean prediction is returned."""
    steps = len(sigmas) if steps is None else steps
    x = float(sigmas[0]) * noise.float()  # 1.0 * noise is noise, bit for bit
    for j in range(steps):
        s = sigmas[j]
        t = torch.full((x.shape[0],), 1000.0 * s, device=x.device)
        x0 = x - s * denoiser(x.to(noise.dtype), t, **cond).float()
        if j + 1 == len(sigmas):
            return x0
        s_next = sigmas[j + 1]
        eps = torch.randn(x.shape, generator=generator).to(x.device)
        x = (1 - s_next) * x0 + s_next * eps
    return x


class FlowScoreDistillation(score_distillation.CriticUpdates):
    """Alternating fake-score and generator updates of a K-step flow generator (DMD2 / SiD / SIM).

    Each optimisation step first builds the generator's input: a step index ``k`` uniform in ``{0..K-1}``, drawn
    from a generator shared by every process (DMD2 broadcasts it across ranks), and the state at ``sigmas[k]``
    reached by running the current generator ``k`` steps from pure noise under ``no_grad`` (DMD2's backward
    simulation, Yin et al. 2024, arXiv:2405.14867, Sec. 4.4; ``k = 0``: pure noise; a grid starting below 1 starts
    from ``sigmas[0] * z``, SiD's input). The generator's sample is
    its clean prediction there, ``x = x_k - sigma_k v``. Then :class:`diffdistill.losses.AlternatingUpdate`
    runs ``--fake_steps`` fake-score updates on the detached sample and, every ``--generator_every``-th step, the
    generator update with the fake score (and the GAN heads) frozen. Our choice: the fake-score update runs
    first (``generator_first=False``): the fake adapter starts at zero, so on a guidance-distilled FLUX, whose
    fake score takes the real score's embedded guidance, the fake score equals the real one at step 0 and the DMD
    gradient of a generator update before any fake update would be exactly zero.

    Args:
        accelerator: the run's accelerator.
        args: the script's options (``--generator_every``, ``--fake_steps``, ``--max_grad_norm``, ``--seed``,
            ``--train_batch_size``).
        generator: ``(prepared generator view, optimiser)``.
        fake: ``(prepared fake view, optimiser)``.
        denoiser: ``denoiser(model) -> FlowDenoiser`` of a view (family and guidance input bound).
        sigmas: the generator's K noise levels (descending; it starts from ``sigmas[0] * z``, pure noise at 1,
            :func:`renoise_steps`); :meth:`step` takes
            another grid for a micro-batch of another size (``--aspect_buckets``: FLUX's shift follows the size).
        latent_shape: ``(B, C, h, w)`` of one micro-batch's latents (:meth:`step` takes another).
        generator_loss: ``loss(x, gen, cond) -> (loss, logs)`` of the generator's samples ``x``.
        fake_loss: ``loss(x, gen, cond) -> (loss, logs)`` of the fake score on detached samples.
        gan: the optional :class:`FakeFeatureGAN`.
    """

    def __init__(
        self,
        accelerator: Any,
        args: argparse.Namespace,
        *,
        generator: tuple[nn.Module, torch.optim.Optimizer],
        fake: tuple[nn.Module, torch.optim.Optimizer],
        denoiser: Any,
        sigmas: list[float],
        latent_shape: tuple[int, ...],
        generator_loss: Any,
        fake_loss: Any,
        gan: FakeFeatureGAN | None = None,
    ) -> None:
        from diffdistill.losses import AlternatingUpdate

        self.accelerator, self.args = accelerator, args
        (self.generator, self.opt_g), (self.fake, self.opt_f) = generator, fake
        self.student = denoiser(self.generator)  # the prepared (DDP) view: the generator's update
        self.student_eval = denoiser(accelerator.unwrap_model(self.generator))  # no_grad passes
        self.sigmas, self.latent_shape = list(sigmas), tuple(latent_shape)
        self.generator_loss, self.fake_loss, self.gan = generator_loss, fake_loss, gan
        self.models = [self.generator, self.fake] + ([gan.head] if gan is not None else [])
        frozen_in_generator_step = [accelerator.unwrap_model(self.fake)]
        if gan is not None:
            frozen_in_generator_step.append(accelerator.unwrap_model(gan.head))
        self.loop = AlternatingUpdate(
            self._generator_step,
            self._fake_step,
            generator_every=args.generator_every,
            fake_steps=args.fake_steps,
            generator_first=False,
            freeze_during_generator=frozen_in_generator_step,
        )
        self._state: dict[str, Any] = {}

    def generator_input(
        self, step: int, gen: torch.Generator, cond: dict[str, Any]
    ) -> tuple[torch.Tensor, float]:
        """``(x_k, sigma_k)``: the backward-simulated input of this step's generator update (see the class)."""
        sigmas, shape = self._state.get("grid", (self.sigmas, self.latent_shape))
        shared = data_sources.step_generator(self.args.seed, step, 0, -1)  # the same k on every process
        k = int(torch.randint(len(sigmas), (1,), generator=shared))
        noise = torch.randn(shape, generator=gen).to(self.accelerator.device)
        with torch.no_grad():
            x_k = renoise_steps(self.student_eval, noise, sigmas, cond, gen, steps=k)
        return x_k, sigmas[k]

    def generate(self, model: Any) -> torch.Tensor:
        """The clean prediction ``x_k - sigma_k v`` (float32) of ``model`` at this step's input."""
        x_k, sigma = self._state["input"]
        t = torch.full((x_k.shape[0],), 1000.0 * sigma, device=x_k.device)
        return x_k - sigma * model(x_k, t, **self._state["cond"]).float()

    def step(
        self,
        step: int,
        gen: torch.Generator,
        cond: dict[str, Any],
        *,
        real: torch.Tensor | None = None,
        grid: tuple[list[float], tuple[int, ...]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The updates of optimisation step ``step`` (0-based) for one micro-batch; ``real``: the real latents of
        the GAN classifier (needed with ``gan``); ``grid``: ``(sigmas, latent_shape)`` of this micro-batch's size
        (default the constructor's). The step index ``k`` is drawn the same on every process, whatever its grid."""
        if self.gan is not None and real is None:
            raise ValueError("The GAN classifier needs the step's real latents: pass `real`.")
        # The phase follows the optimisation step: every micro-batch of a step runs the same updates and a
        # resumed run keeps the phase without extra state.
        self.loop.step_count = step
        with self.accelerator.accumulate(*self.models), runtime.autocast(self.accelerator):
            self._state = {"gen": gen, "cond": cond, "real": real, "x": None}
            if grid is not None:
                self._state["grid"] = (list(grid[0]), tuple(grid[1]))
            self._state["input"] = self.generator_input(step, gen, cond)
            logs = self.loop.step()
        logs["student_sigma"] = torch.tensor(self._state["input"][1])
        return logs

    def _fake_step(self) -> dict[str, torch.Tensor]:
        gen, cond = self._state["gen"], self._state["cond"]
        if self._state["x"] is None:
            with torch.no_grad():
                self._state["x"] = self.generate(self.student_eval)
        x = self._state["x"]
        return self.update_fake(x, *self.fake_loss(x, gen, cond))

    def _generator_step(self) -> dict[str, torch.Tensor]:
        x = self.generate(self.student)
        return self.update_generator(x, *self.generator_loss(x, self._state["gen"], self._state["cond"]))


class FakeFeatureGAN(score_distillation.BottleneckGAN):
    """DMD2's GAN classifier (Yin et al. 2024, arXiv:2405.14867, Sec. 4.3) on a transformer: LADD heads
    (:class:`diffdistill.discriminators.LADDDiscriminator`) on the image tokens of the fake score's blocks, i.e.
    the shared base run under the fake score's adapter.

    As DMD2: real latents and the generator's samples are noised to the same kind of noise level as the score
    losses (here ``sigma ~ U[--loss_sigma_range]``, FastGen draws the classifier's ``t`` from its DMD2 ``t``
    distribution) and classified from the fake score's features; the generator adds ``--gan_weight`` times the
    non-saturating ``softplus(-D(x))`` through the frozen classifier, and the fake-score update adds
    ``--gan_classifier_weight`` times ``softplus(D(fake)) + softplus(-D(real))`` (both terms inherited from
    :class:`training.score_distillation.BottleneckGAN`, from which only :meth:`logits` differs), whose gradient
    trains the heads (their own optimiser) and the fake score's adapter (stepped by the fake score's optimiser),
    as DMD2's classifier trains the fake UNet's trunk. FastGen's FLUX DMD2 instead reads the frozen teacher's features
    (its ``discriminator.feature_indices`` on the teacher); ours follows the paper.

    Under FSDP2 the heads' pass runs the sharded base (its blocks unshard in their own hooks) under the fake
    adapter outside the fake view's call, always after it in the same update (the fake-score loss, or the
    generator loss through the frozen fake score, comes first): FSDP2 keeps a root module's parameters (the
    view's adapter) unsharded from its forward to the end of its backward, so the heads' gradient lands on the
    same unsharded adapter and is reduce-scattered with the fake-score loss's (tested equal to DDP on 2 CPU
    processes). Heads run before the view's call would meet sharded ``DTensor`` weights and fail, not train wrong.

    Args:
        accelerator: the run's accelerator.
        head: the prepared heads, wrapped so they run under the fake adapter (see :meth:`build`).
        optimizer: the heads' prepared optimiser.
        features: the :class:`training.flow_models.FlowDenoiser` of the base model (its ``model_inputs``).
        sigma_range: ``(low, high)`` of the noise levels the latents are noised to.
        weight: ``--gan_weight``.
        classifier_weight: ``--gan_classifier_weight``.
    """

    def __init__(
        self,
        accelerator: Any,
        head: nn.Module,
        optimizer: torch.optim.Optimizer,
        features: Any,
        sigma_range: tuple[float, float],
        *,
        weight: float,
        classifier_weight: float,
    ) -> None:
        super().__init__(
            accelerator, head, optimizer, None, weight=weight, classifier_weight=classifier_weight
        )
        self.features, self.sigma_range = features, sigma_range

    @classmethod
    def build(cls, accelerator: Any, args: argparse.Namespace, base: Any, family: str) -> FakeFeatureGAN:
        """The heads on ``base``'s blocks (``--discriminator_blocks``, default every ``len(blocks) // 4``-th)
        under the fake adapter, their optimiser (``--fake_learning_rate`` or ``--learning_rate``), prepared."""

        from . import shared_critics

        # the shared base's own checkpointing: its blocks recomputed under the fake adapter
        heads = ladd_heads(args, family, base.model, gradient_checkpointing=None).to(accelerator.device)
        head = shared_critics.ActiveAdapter(heads, base, FAKE, owns_adapter=False)
        optimizer = runtime.adamw(head.parameters(), args, lr=args.fake_learning_rate or args.learning_rate)
        head, optimizer = runtime.prepare(accelerator, (head, optimizer))
        # the fake score's features: the base under the fake adapter at the fake score's own guidance input
        # (FLUX.1-dev's --fake_guidance, default --guidance)
        features = flow_models.FlowDenoiser(base.model, family, getattr(args, "fake_guidance", args.guidance))
        return cls(
            accelerator,
            head,
            optimizer,
            features,
            args.loss_sigma_range,
            weight=args.gan_weight,
            classifier_weight=args.gan_classifier_weight,
        )

    def logits(
        self, head: nn.Module, batches: list[torch.Tensor], gen: torch.Generator, cond: dict[str, Any]
    ) -> list[torch.Tensor]:
        """The heads' logits of each batch of clean latents, noised to ``sigma ~ U[sigma_range]`` (per batch: its
        sigmas, then its noise, from ``gen``), in one call of ``head``."""
        low, high = self.sigma_range
        noised, sigmas = [], []
        for latents in batches:
            b, device = latents.shape[0], latents.device
            sigma = (low + (high - low) * torch.rand(b, generator=gen)).to(device)
            noise = torch.randn(latents.shape, generator=gen).to(device)
            s = sigma.view(-1, *(1,) * (latents.ndim - 1))
            noised.append((1 - s) * latents.float() + s * noise)
            sigmas.append(sigma)
        batch = torch.cat(noised)
        repeated = {k: torch.cat([v] * len(batches)) for k, v in cond.items()}
        hidden, kwargs, grid = self.features.model_inputs(batch, 1000 * torch.cat(sigmas), **repeated)
        timestep, pooled = kwargs.pop("timestep"), kwargs.pop("pooled_projections", None)
        maps = head(hidden, timestep, pooled_projections=pooled, grid_size=grid, **kwargs)
        flat = torch.cat([m.flatten(1) for m in maps], dim=1)  # every head's patch logits of a sample
        return list(flat.chunk(len(batches)))


def ladd_heads(
    args: argparse.Namespace, family: str, model: nn.Module, *, gradient_checkpointing: bool | None
) -> nn.Module:
    """LADD's discriminator (:class:`diffdistill.discriminators.LADDDiscriminator`) on ``model``'s blocks from the
    head options (``--discriminator_blocks``, ``--discriminator_head_channels`` where the script has it,
    ``--discriminator_norm_groups``; text pooling per family); for Wan 2.2 A14B's experts one per expert, each sample
    judged by the heads on the expert ``WanPipeline`` runs at its noise level
    (:class:`training.wan_experts.ExpertDiscriminators`; our choice: the experts' features differ)."""
    from diffdistill.discriminators import LADDDiscriminator

    def on(trunk: nn.Module) -> nn.Module:
        return LADDDiscriminator(
            trunk,
            args.discriminator_blocks,
            text_pooling=flow_families.ladd_text_pooling(family),
            head_channels=getattr(args, "discriminator_head_channels", None),
            norm_groups=args.discriminator_norm_groups,
            gradient_checkpointing=gradient_checkpointing,
        )

    return wan_experts.per_expert(model, on)


def save_adapter(
    accelerator: Any,
    view: nn.Module,
    args: argparse.Namespace,
    parts: flow_models.FlowComponents,
    weight_name: str,
    *,
    ema: Any = None,
) -> Path:
    """Write the adapter of the (prepared) :class:`~diffdistill.students.AdapterView` ``view`` to
    ``OUTPUT_DIR/weight_name`` with the pipeline class's own ``save_lora_weights`` (keys
    ``transformer.<module>.lora_A.weight``, the adapter's LoRA config in the metadata), so
    ``pipeline.load_lora_weights(OUTPUT_DIR, weight_name=weight_name)`` loads it. With ``ema`` the average is
    written. Call on every process."""
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(view)
    if ema is not None:
        ema.copy_to_model()
    state = accelerator.get_state_dict(view)
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        layers = {k: v.detach().cpu() for k, v in state.items()}
        config = model.shared_base._inner.peft_config[model.adapter_name]
        wan_experts.write_lora(parts, out, layers, config, weight_name)
    accelerator.wait_for_everyone()
    return out / weight_name
