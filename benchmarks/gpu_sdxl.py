"""One training step of each SDXL distillation at the real SDXL UNet: step time and peak memory.

For every method of ``examples/`` the script builds what that method's script trains -- by default a LoRA
(rank 64) with gradient checkpointing, frozen weights in bf16 and bf16 autocast, as the README's launch
commands -- on the SDXL-base UNet architecture with random weights (built from
``diffdistill.discriminators.sdxl_unet_config`` directly on the device: nothing is downloaded), and times
one optimisation step (forward, backward and optimiser step of every network the step updates) on
128x128 latents (1024 px), first at batch 1, then doubling the batch until it runs out of memory or
reaches ``--max_batch`` (or at the ``--batches`` given, up to the first that runs out of memory). It prints a Markdown table: the step time (median of ``--repeats`` steps after
``--warmup``, with ``torch.cuda.synchronize``) and the peak memory (``torch.cuda.max_memory_allocated``,
reset before each batch size) of batch 1 and of the largest batch that fits, each also as a multiple of
the ``reference`` step's at the same batch: a plain SDXL fine-tuning step (epsilon MSE, one UNet forward
and backward, Adam) on the same trainable setup, run first in the same process (``--no_reference``
skips it). ``--memory_cap_gib`` caps the allocator, so that "fits" means "fits a card of that size" on a
larger one (78 GiB: an 80 GB H100 measured on an H200).

The steps are assembled from the library's public losses, one builder per method (the scripts' update
logic is inline in their ``main``), with the scripts' own building blocks (``examples/training/``):

* ``lightning`` -- SDXL-Lightning's ``8->4/conditional`` stage: the student's jump against 2 teacher DDIM
  steps, judged by the conditional ``UNetEncoderDiscriminator`` (G and D updates);
* ``hyper_sd`` -- TSCD at the plan's adversarial stage: EMA target (a copy of the UNet), MSE +
  adversarial distance with the unconditional discriminator (G and D updates);
* ``diffusion2gan`` -- one-step generator, E-LatentLPIPS + the multi-scale conditional discriminator with
  mix-and-match negatives (batch >= 2) and the lazy R1 penalty on its step (the peak-memory step; exact,
  or APT's approximation with ``--r1_approximate_sigma``);
* ``mlcm`` -- MLCD: teacher-trajectory training states (up to 8 guided teacher calls) + multistep
  consistency loss, online target;
* ``sim`` -- SIM generator update (real score with autograd through its input, fake score) then the fake
  score's denoising score matching update, a LoRA on each of two UNets, a frozen bf16 real score
  (``sdxl_sim.sim_networks``);
* ``ssd1b`` -- the ``ssd-1b`` block-removed student (full, float32 master weights) + LayerKD against the
  frozen bf16 teacher.

``--shared_base`` (LoRA only) builds ``sim`` and ``diffusion2gan`` as the scripts' ``--shared_base`` does
(``examples/training/shared_critics.py``): ONE frozen bf16 UNet holding the generator's adapter and the fake
score's (SIM) / the discriminator's (Diffusion2GAN) instead of two / three UNets; their ``trains`` column reads
``LoRA, shared base`` (the other methods keep one UNet already, or train a full student, and are unchanged).
Run the table with and without the flag to read the memory it saves, e.g.
``--methods sim diffusion2gan --r1_approximate_sigma 0.1 --batches 8 16 32 64 --memory_cap_gib 78``
twice. With gradient checkpointing, Diffusion2GAN's shared base takes APT's R1 only (as the script).

Model FLOP utilisation (issue 24): the FLOPs of one step are counted once per method and batch, before the
timing, by ``torch.utils.flop_counter.FlopCounterMode`` on the real shapes and device (:func:`count_flops`: every
matmul, convolution and attention of the step's forward and backward passes -- student, teacher, critics and
losses -- with compilation off), so the last columns read the model FLOPs per step, the achieved rate (FLOPs over
the median step time) and that rate as a share of the device's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`, or
``--peak_tflops``): a method far below the reference is bound by its glue, not by its networks. The
recomputation of gradient checkpointing is executed work but not model work: it is counted apart and shown as a
share of the step's FLOPs (``recomputed``), and MFU leaves it out (PaLM's definition, Chowdhery et al. 2022,
App. B). ``--compile`` (``--compile_mode``, ``--compile_backend``) compiles each step's networks as the scripts'
``--compile`` does (``examples/training/compilation.py``: block by block) -- run the table with and without it to
read the speed-up per method; give ``--warmup`` room for the compiles (each block shape, grad mode and adapter).

``--full`` trains the full UNet instead of a LoRA (ssd1b always does). ``--tiny`` runs the same code on a
tiny 3-level SDXL-structured UNet (``distill_TINY_SDXL_3LEVEL_UNET``) with 32x32 latents, float32,
for a CPU smoke test.

Usage::

    python benchmarks/gpu_sdxl.py                                   # all methods, GPU, bf16, LoRA
    python benchmarks/gpu_sdxl.py --methods sim ssd1b --max_batch 32
    python benchmarks/gpu_sdxl.py --batches 1 8 --warmup 1 --repeats 1     # what gpu_checks.sh runs
    python benchmarks/gpu_sdxl.py --full                            # full-UNet students
    python benchmarks/gpu_sdxl.py --batches 16 32 64 --memory_cap_gib 78   # largest batch on an 80 GB card
    python benchmarks/gpu_sdxl.py --methods sim diffusion2gan --r1_approximate_sigma 0.1 --shared_base
    python benchmarks/gpu_sdxl.py --compile --warmup 3 --batches 8 16 32   # MFU with torch.compile (inductor)
    OMP_NUM_THREADS=1 python benchmarks/gpu_sdxl.py --tiny --device cpu   # CPU smoke run (seconds)
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffdistill.discriminators import (
    MultiScaleConditionalDiscriminator,
    UNetEncoderDiscriminator,
    sdxl_conditions,
    sdxl_unet_config,
    tiny_sdxl_unet_config,
)
from diffdistill.losses import (
    ELatentLPIPS,
    consistency_pair,
    fake_score_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    lazy_r1_penalty,
    mix_and_match,
    multistep_consistency_loss,
    sim_loss,
    teacher_trajectory_states,
)
from diffdistill.schedulers import (
    NoiseSchedule,
    StagePlan,
    TeacherSolver,
    milestone_pairs,
    progressive_pairs,
    tscd_segments,
)
from diffdistill.students import EMA, LayerKD, build_student

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
sys.path.insert(0, str(ROOT))
from sdxl_sim import sim_networks  # noqa: E402
from training import (  # noqa: E402 - the examples' shared package
    compilation,
    options,
    sdxl_models,
    shared_critics,
)

from tests.examples.tiny_sdxl import TINY_SDXL_3LEVEL_UNET  # noqa: E402 - the test suite's tiny UNet

METHODS = ("lightning", "hyper_sd", "diffusion2gan", "mlcm", "sim", "ssd1b")
REFERENCE = "reference"  # plain fine-tuning step, run first: the ratios' denominator
SHARED_BASE_METHODS = ("sim", "diffusion2gan")  # what --shared_base changes (the scripts that take it)
#: Dense (no sparsity) bf16 tensor-core peak in TFLOP/s by device name (``torch.cuda.get_device_name``), from
#: NVIDIA's datasheets: H100 SXM (named "NVIDIA H100 80GB HBM3") and H200 SXM 989.4, H100 PCIe 756, A100 (SXM and
#: PCIe) 312. Other cards (H100 NVL, H200 NVL, ...) are left blank: pass ``--peak_tflops``.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*(SXM|HBM3)", 989.4),
    (r"H100 PCIe", 756.0),
    (r"H200(?!.*NVL)", 989.4),
    (r"A100", 312.0),
)


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """``--peak_tflops`` and the scripts' ``--compile`` options (shared with ``benchmarks/gpu_flow.py``)."""
    p.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="the device's dense bf16 peak in TFLOP/s for the MFU column (default: PEAK_BF16_TFLOPS by device "
        "name: H100 SXM / H200 989.4, A100 312; other devices, the CPU included, need it)",
    )
    options.add_compile_args(p.add_argument_group("torch.compile (as the scripts' --compile)"))


def check_speed_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a non-positive ``--peak_tflops`` or bad ``--compile`` options (``p.error``)."""
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        p.error(f"--peak_tflops must be positive (TFLOP/s), got {args.peak_tflops}")
    try:
        options.check_compile_args(args)
    except ValueError as err:
        p.error(str(err))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_tflops(args: argparse.Namespace) -> tuple[float | None, str]:
    """``(peak TFLOP/s or None, what the header says about it)``: ``--peak_tflops``, else the device's entry in
    :data:`PEAK_BF16_TFLOPS`, else none (the MFU column stays blank)."""
    name = device_name(args.device)
    if args.peak_tflops is not None:
        return args.peak_tflops, f"MFU against {args.peak_tflops:g} TFLOP/s (--peak_tflops)"
    for pattern, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return peak, f"MFU against the dense bf16 peak of {name}, {peak:g} TFLOP/s"
    return None, f"MFU blank: no bf16 peak known for {name} (pass --peak_tflops)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--tiny", action="store_true", help="tiny SDXL-structured UNet, 32x32 latents, float32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 (tiny: fp32)"
    )
    p.add_argument("--latent_size", type=int, default=None, help="default 128 (tiny: 32)")
    p.add_argument("--max_batch", type=int, default=None, help="largest batch tried (default 64; tiny: 2)")
    p.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="the batch sizes to try, in order, up to the first OOM; overrides --max_batch (default: 1, 2, 4, ... "
        "up to --max_batch)",
    )
    p.add_argument(
        "--memory_cap_gib",
        type=float,
        default=None,
        help="CUDA only: let the allocator use at most this many GiB (torch.cuda.set_per_process_memory_fraction), "
        "so a larger card finds the largest batch that fits a smaller one, e.g. 78 for an 80 GB H100 on an H200",
    )
    p.add_argument("--full", action="store_true", help="train the full UNet instead of a LoRA")
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument(
        "--r1_approximate_sigma",
        type=float,
        default=None,
        help="diffusion2gan: APT's finite-difference R1 with this sigma instead of exact R1 (the script's flag)",
    )
    p.add_argument("--no_gradient_checkpointing", action="store_true")
    p.add_argument(
        "--shared_base",
        action="store_true",
        help="sim and diffusion2gan on ONE frozen UNet holding every trained network's LoRA adapter (the "
        "scripts' --shared_base); the other methods are unchanged",
    )
    p.add_argument(
        "--no_reference",
        action="store_true",
        help="skip the plain fine-tuning reference step (then the ratio columns read '-')",
    )
    p.add_argument("--warmup", type=int, default=None, help="default 2 (tiny: 1)")
    p.add_argument("--repeats", type=int, default=None, help="default 5 (tiny: 1)")
    add_speed_args(p)
    args = p.parse_args(argv)
    check_speed_args(p, args)
    tiny = args.tiny
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not tiny else "cpu"))
    args.dtype = getattr(torch, args.dtype or ("float32" if tiny else "bfloat16"))
    args.latent_size = args.latent_size or (32 if tiny else 128)
    args.max_batch = args.max_batch or (2 if tiny else 64)
    if args.batches is None:
        args.batches = [2**k for k in range(args.max_batch.bit_length())]  # 1, 2, 4, ... <= max_batch
    elif any(b < 1 for b in args.batches):
        p.error(f"--batches must be positive integers, got {args.batches}")
    if args.memory_cap_gib is not None:
        if args.device.type != "cuda":
            p.error(
                f"--memory_cap_gib caps the CUDA caching allocator: it needs a CUDA device, got --device "
                f"{args.device}; leave it out on the CPU"
            )
        if args.memory_cap_gib <= 0:
            p.error(f"--memory_cap_gib must be positive, got {args.memory_cap_gib}")
    if args.shared_base and args.full:
        p.error("--shared_base shares one frozen UNet between LoRA adapters: leave out --full")
    if (
        args.compile
        and args.shared_base
        and "diffusion2gan" in args.methods
        and args.r1_approximate_sigma is None
    ):
        p.error(
            "--compile --shared_base: Diffusion2GAN's exact R1 differentiates the discriminator twice, which compiled "
            "blocks do not support, and its discriminator runs the generator's blocks: pass --r1_approximate_sigma"
        )
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    args.repeats = args.repeats or (1 if tiny else 5)
    return args


@dataclass
class Bench:
    """What a method's step builder gets: the base UNet (float32, on the device) and the settings."""

    unet: nn.Module
    device: torch.device
    dtype: torch.dtype
    latent_size: int
    seq_len: int
    options: argparse.Namespace  # the scripts' option names (use_lora, lora_rank, learning_rate, ...)
    schedule: NoiseSchedule

    def student(self, unet: nn.Module | None = None) -> tuple[nn.Module, Any]:
        """The scripts' ``student_and_teacher``: LoRA on a bf16 base (teacher = adapters off) or full."""
        return sdxl_models.student_and_teacher(self.options, unet or self.unet, self.device, self.dtype)

    def compile(self, *networks: Any, **kwargs: Any) -> None:
        """``--compile``: the networks' blocks through ``torch.compile``, as the scripts (``compile_networks``)."""
        compilation.compile_networks(self.options, *networks, **kwargs)

    def adam(self, *modules: nn.Module, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=1e-6, betas=betas)

    def latents(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        shape = (batch, 4, self.latent_size, self.latent_size)
        return torch.randn(shape, generator=gen).to(self.device)

    def cond(self, batch: int, gen: torch.Generator) -> dict[str, Any]:
        ehs, added = sdxl_conditions(
            self.unet, batch, seq_len=self.seq_len, generator=gen, device=self.device, dtype=self.dtype
        )
        return {"encoder_hidden_states": ehs, "added_cond_kwargs": added}


Step = Callable[[int, torch.Generator], None]


def _update(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _adversarial_updates(
    disc: nn.Module,
    opts: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    real: torch.Tensor,
    fake: torch.Tensor,
    t: Any,
    cond: dict,
    g_loss: torch.Tensor | float = 0.0,
    w_adv: float = 1.0,
    **extra: Any,
) -> None:
    """The generator update (``g_loss`` + ``w_adv`` x GAN loss of ``fake``, D frozen), then the D update."""
    ehs, added = cond["encoder_hidden_states"], cond["added_cond_kwargs"]
    disc.requires_grad_(False)  # until G's backward: checkpointed D blocks recompute there
    adv, _ = gan_generator_loss(disc(fake, t, ehs, added, **extra))
    (g_loss + w_adv * adv).backward()
    disc.requires_grad_(True)
    opts[0].step()
    opts[0].zero_grad(set_to_none=True)
    d_loss, _ = gan_discriminator_loss(
        disc(real, t, ehs, added, **extra), disc(fake.detach(), t, ehs, added, **extra)
    )
    _update(d_loss, opts[1])


def build_lightning(b: Bench) -> Step:
    stage = StagePlan.sdxl_lightning()["8->4/conditional"]
    gc_on = not b.options.no_gradient_checkpointing
    disc = UNetEncoderDiscriminator(b.unet, conditional=True, gradient_checkpointing=gc_on)
    unet, teacher_model = b.student()
    teacher = TeacherSolver(teacher_model, b.schedule, guidance_scale=stage.options["guidance_scale"])
    b.compile(unet, teacher_model, disc)
    betas = tuple(stage.options["adam_betas"])
    opts = b.adam(unet, betas=betas), b.adam(disc, betas=betas)  # type: ignore[arg-type]
    uncond = b.cond(1, torch.Generator().manual_seed(1))

    def step(batch: int, gen: torch.Generator) -> None:
        x0, cond = b.latents(batch, gen), b.cond(batch, gen)
        sample = progressive_pairs(batch, stage.student_steps or 1, generator=gen, device=b.device)
        x_t = b.schedule.add_noise(x0, b.latents(batch, gen), sample.t)
        pair = consistency_pair(
            unet, teacher, x_t, sample, cond, uncond, target=None, parameterization="move",
            teacher_steps=stage.teacher_steps or 1,
        )  # fmt: skip
        t_judge = pair.sample.t_prev.clamp(min=0)
        extra = {"cond_sample": x_t, "cond_timestep": pair.sample.t}
        _adversarial_updates(disc, opts, pair.target.float(), pair.student.float(), t_judge, cond, **extra)

    return step


def build_hyper_sd(b: Bench) -> Step:
    plan = StagePlan.hyper_sd()
    stage = max(plan, key=lambda s: s.loss_weights.get("adversarial", 0.0))
    w_mse, w_adv = stage.loss_weights.get("mse", 1.0), stage.loss_weights.get("adversarial", 0.0)
    disc = UNetEncoderDiscriminator(
        b.unet, conditional=False, gradient_checkpointing=not b.options.no_gradient_checkpointing
    )
    unet, teacher_model = b.student()
    ema = EMA(unet, decay=stage.options.get("ema_decay", 0.95), trainable_only=True)
    teacher = TeacherSolver(teacher_model, b.schedule, guidance_scale=7.0)
    b.compile(unet, teacher_model, disc)
    opt, opt_d = b.adam(unet), b.adam(disc)
    uncond = b.cond(1, torch.Generator().manual_seed(1))

    def step(batch: int, gen: torch.Generator) -> None:
        x0, cond = b.latents(batch, gen), b.cond(batch, gen)
        sample = tscd_segments(batch, stage.num_segments or 1, 50, generator=gen, device=b.device)
        x_t = b.schedule.add_noise(x0, b.latents(batch, gen), sample.t)
        pair = consistency_pair(unet, teacher, x_t, sample, cond, uncond, target=ema, parameterization="move")
        student, target = pair.student.float(), pair.target.float()
        loss = w_mse * torch.nn.functional.mse_loss(student, target)
        if w_adv > 0:
            t_judge = pair.sample.t_end.clamp(min=0)
            _adversarial_updates(disc, (opt, opt_d), target, student, t_judge, cond, loss, w_adv)
        else:
            _update(loss, opt)
        ema.update(unet)

    return step


def build_diffusion2gan(b: Bench) -> Step:
    gc_on = not b.options.no_gradient_checkpointing
    widths = b.unet.config.block_out_channels
    groups = 32 if all(c % 32 == 0 for c in widths) else 8  # the tiny UNet's 16-channel level: 8 groups
    if b.options.shared_base:  # the script's --shared_base: D = a LoRA adapter of the generator's base
        base = shared_critics.build(
            b.options, b.unet, b.device, b.dtype, (shared_critics.GENERATOR, shared_critics.DISCRIMINATOR)
        )
        trunk = MultiScaleConditionalDiscriminator(base.model, backbone="shared", norm_groups=groups)
        disc: nn.Module = shared_critics.ActiveAdapter(
            trunk, base, shared_critics.DISCRIMINATOR, owns_adapter=True
        ).to(b.device)
        unet: nn.Module = base.view(shared_critics.GENERATOR)
    else:
        disc = MultiScaleConditionalDiscriminator(b.unet, gradient_checkpointing=gc_on, norm_groups=groups)
        unet, _ = b.student()
    lpips = ELatentLPIPS("sdxl", weights=None, augment="bg").to(b.device)
    exact_r1 = (
        b.options.r1_approximate_sigma is None
    )  # D eager: exact R1 is a second backward (as the script)
    b.compile(unet, disc, whole=(lpips,), double_backward=(disc,) * exact_r1)
    opt, opt_d = b.adam(unet), b.adam(disc)

    def step(batch: int, gen: torch.Generator) -> None:
        noise, real, cond = b.latents(batch, gen), b.latents(batch, gen), b.cond(batch, gen)
        ehs, added = cond["encoder_hidden_states"], cond["added_cond_kwargs"]
        t = torch.full((batch,), 999, device=b.device, dtype=torch.long)
        fake = b.schedule.to_x0(unet(noise, t, **cond).sample.float(), noise, t)
        disc.requires_grad_(False)
        g_adv, _ = gan_generator_loss(disc(fake, 0, ehs, added, noise=noise))
        (lpips(fake, real, generator=gen) + 0.5 * g_adv).backward()
        disc.requires_grad_(True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        fake_logits = disc(fake.detach(), 0, ehs, added, noise=noise)
        if batch >= 2:
            mm = mix_and_match(real, {"ehs": ehs, "added": added}, noise, generator=gen)
            more = disc(mm.latents, 0, mm.cond["ehs"], mm.cond["added"], noise=mm.noise)
            fake_logits = [torch.cat([f, e]) for f, e in zip(fake_logits, more)]
        d_loss, _ = gan_discriminator_loss(disc(real, 0, ehs, added, noise=noise), fake_logits)
        sigma = b.options.r1_approximate_sigma

        def r1() -> torch.Tensor:
            return lazy_r1_penalty(
                lambda x, ehs, added, noise: disc(x, 0, ehs, added, noise=noise),
                real, step=0, every=16, cond={"ehs": ehs, "added": added, "noise": noise}, generator=gen,
                approximate_sigma=sigma,
            )[0]  # fmt: skip

        if sigma is not None:  # APT's finite difference: one backward of the sum (as the script)
            _update(d_loss + r1(), opt_d)
            return
        d_loss.backward()
        with sdpa_kernel(SDPBackend.MATH):  # R1 and its backward (double backward; as the script)
            _update(r1(), opt_d)  # one D step on the gradients of d_loss + r1

    return step


def build_mlcm(b: Bench) -> Step:
    mlcd = StagePlan.mlcm()["mlcd"]
    unet, teacher_model = b.student()
    teacher = TeacherSolver(teacher_model, b.schedule, guidance_scale=8.0)
    b.compile(unet, teacher_model)
    opt = b.adam(unet)
    uncond = b.cond(1, torch.Generator().manual_seed(1))

    def step(batch: int, gen: torch.Generator) -> None:
        noise, cond = b.latents(batch, gen), b.cond(batch, gen)
        sample = milestone_pairs(batch, 8, mlcd.options["skip"], generator=gen, device=b.device)
        x_t = teacher_trajectory_states(teacher, noise, sample.t, cond, uncond, num_segments=8)
        loss, _ = multistep_consistency_loss(
            unet, teacher, None, cond, uncond, x_t=x_t, sample=sample, target="online", generator=gen
        )
        _update(loss, opt)

    return step


def build_sim(b: Bench) -> Step:
    unet, fake, real_model = sim_networks(b.options, b.unet, b.device, b.dtype)  # the script's networks
    real = TeacherSolver(real_model, b.schedule, guidance_scale=4.5)
    b.compile(unet, fake, real_model)
    opt_g, opt_f = b.adam(unet), b.adam(fake)
    uncond = b.cond(1, torch.Generator().manual_seed(1))

    def step(batch: int, gen: torch.Generator) -> None:
        z, cond = b.latents(batch, gen), b.cond(batch, gen)
        t = torch.full((batch,), 999, device=b.device, dtype=torch.long)
        x = b.schedule.to_x0(unet(z, t, **cond).sample.float(), z, t)
        fake.requires_grad_(False)
        loss, _ = sim_loss(x, real, fake, schedule=b.schedule, cond=cond, uncond=uncond, generator=gen)
        _update(loss, opt_g)
        for n, p in fake.named_parameters():
            p.requires_grad_(not b.options.use_lora or "lora_" in n)
        f_loss, _ = fake_score_loss(fake, x.detach(), schedule=b.schedule, cond=cond, generator=gen)
        _update(f_loss, opt_f)

    return step


def build_ssd1b(b: Bench) -> Step:
    teacher = b.unet
    student, report = build_student(teacher, "ssd-1b")
    sdxl_models.freeze(teacher)
    teacher.to(dtype=b.dtype)
    student.train().requires_grad_(True)
    if not b.options.no_gradient_checkpointing:
        student.enable_gradient_checkpointing()
    kd = LayerKD(student, teacher, report.kd_pairs("sub_block"))
    b.compile(student, teacher)
    opt = b.adam(student)

    def step(batch: int, gen: torch.Generator) -> None:
        x0, noise, cond = b.latents(batch, gen), b.latents(batch, gen), b.cond(batch, gen)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(b.device)
        loss, _ = kd(b.schedule.add_noise(x0, noise, t), t, noise, **cond)
        _update(loss, opt)

    return step


def build_reference(b: Bench) -> Step:
    """The yardstick: a plain SDXL fine-tuning step on the same trainable setup (LoRA or full UNet).

    One UNet forward and backward of the epsilon-prediction MSE, one Adam step: what a diffusers
    fine-tuning script does per step, with the same checkpointing and dtype. Every method's step time and
    peak memory are also given as a multiple of this step at the same batch size, so the table reads the
    same on any GPU.
    """
    unet, _ = b.student()
    b.compile(unet)
    opt = b.adam(unet)

    def step(batch: int, gen: torch.Generator) -> None:
        x0, noise, cond = b.latents(batch, gen), b.latents(batch, gen), b.cond(batch, gen)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(b.device)
        pred = unet(b.schedule.add_noise(x0, noise, t), t, **cond).sample
        _update(torch.nn.functional.mse_loss(pred.float(), noise), opt)

    return step


BUILDERS: dict[str, Callable[[Bench], Step]] = {
    REFERENCE: build_reference,
    "lightning": build_lightning,
    "hyper_sd": build_hyper_sd,
    "diffusion2gan": build_diffusion2gan,
    "mlcm": build_mlcm,
    "sim": build_sim,
    "ssd1b": build_ssd1b,
}


def _base_unet(args: argparse.Namespace) -> nn.Module:
    from diffusers import UNet2DConditionModel

    cfg = sdxl_unet_config() if not args.tiny else tiny_sdxl_unet_config(**TINY_SDXL_3LEVEL_UNET)
    with torch.random.fork_rng(devices=[]), torch.device(args.device):
        torch.manual_seed(0)
        return UNet2DConditionModel(**cfg)  # type: ignore[return-value]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _autocast(args: argparse.Namespace) -> Any:
    return torch.autocast(args.device.type, dtype=args.dtype, enabled=args.dtype != torch.float32)


def _recomputing() -> bool:
    """Whether the op running now belongs to a gradient-checkpointing recomputation.

    ``torch.utils.checkpoint`` (non-reentrant, what diffusers and ``diffdistill`` use) recomputes a block inside
    the backward pass with its own saved-tensor hooks on top of the stack; the backward formulas themselves run
    without them, and a checkpointed forward runs outside a backward pass (graph task id -1). torch >= 2.14 marks
    those hooks ``_checkpoint_internal``; older torch (the GPU image's 2.11) only by their closures' names, which
    both carry (audit 16: on 2.13 the mark alone counted every recomputation as model FLOPs, MFU x1.3-1.5).
    :func:`check_recompute_detection` refuses to measure where neither works."""
    if torch._C._current_graph_task_id() == -1:
        return False
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None:
        return False
    pack = hooks[0]
    if getattr(pack, "_checkpoint_internal", False):
        return True
    return getattr(pack, "__qualname__", "").startswith(CHECKPOINT_HOOK_QUALNAMES)


#: The qualified-name prefixes of ``torch.utils.checkpoint``'s recomputation pack hooks (torch 2.1 to 2.14).
CHECKPOINT_HOOK_QUALNAMES = ("_recomputation_hook.", "_checkpoint_hook.")


def check_recompute_detection() -> None:
    """Refuse to report MFU when this torch hides checkpoint recomputation from :class:`StepFlops`: a checkpointed
    ``Linear`` step must count its recomputed forward apart (``RuntimeError`` naming the torch version)."""
    layer = nn.Linear(4, 4)

    def step(batch: int, gen: torch.Generator) -> None:
        x = torch.randn(batch, 4, generator=gen, requires_grad=True)
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).sum().backward()

    probe = argparse.Namespace(warmup=0, repeats=0, device=torch.device("cpu"), dtype=torch.float32)
    _, recomputed = count_flops(step, 2, probe)
    if recomputed != 2 * 2 * 4 * 4:
        raise RuntimeError(
            f"torch {torch.__version__}: the FLOP counter sees {recomputed} recomputed FLOPs of a checkpointed "
            f"Linear(4, 4) at batch 2 (expected 64): gradient checkpointing's recomputation would be counted as "
            "model FLOPs and the MFU overstated. Update _recomputing() for this torch's checkpoint hooks."
        )


class _NoModuleTracking:
    """Stands in for ``FlopCounterMode``'s module tracker: per-module attribution is not needed here, and the
    tracker's gradient hooks fail inside ``torch.autograd.grad`` (R1: "A leaf node was passed to
    _will_engine_execute_node ...", torch 2.14)."""

    parents = ("Global",)

    def __enter__(self) -> _NoModuleTracking:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class StepFlops(FlopCounterMode):
    """``FlopCounterMode`` that counts the recomputation of gradient checkpointing apart (``recomputed``):
    ``get_total_flops()`` is then the model FLOPs of what ran (forward and backward of every pass)."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _NoModuleTracking()  # type: ignore[assignment]
        self.recomputed = 0

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        formula = self.flop_registry.get(func_packet)
        if formula is not None:
            flops = formula(*args, **kwargs, out_val=out)
            if _recomputing():
                self.recomputed += flops
            else:
                self.flop_counts["Global"][func_packet] += flops
        return out


def count_flops(step: Step, batch: int, args: argparse.Namespace) -> tuple[int, int]:
    """``(model FLOPs, recomputed FLOPs)`` of one call of ``step`` at ``batch``, run once on the device.

    Counted on the real device rather than the meta device (our choice, why): the steps draw random numbers with
    CPU generators, move them, index and sample (mix-and-match, timesteps, E-LatentLPIPS's augmentation) and call
    diffusers' models, which would all have to be meta-safe; one extra step costs less than that and runs the
    exact shapes of the timed steps. It runs before the timing (it is never one of the timed steps, and the
    dispatch-mode overhead stays out of them), under the same autocast, with ``torch.compile`` off
    (``set_stance("force_eager")``: a compiled graph's kernels would bypass the counter; the FLOPs are the same).
    The step updates the weights like a warm-up step. Its random draws are those of one more seed than the timed
    steps use: where a method's work depends on them (MLCM's teacher-trajectory length), the count is one draw's.
    """
    counter = StepFlops()
    with torch.compiler.set_stance("force_eager"), counter, _autocast(args):
        step(batch, torch.Generator().manual_seed(args.warmup + args.repeats))
    _sync(args.device)
    return counter.get_total_flops(), counter.recomputed


def measure(step: Step, batch: int, args: argparse.Namespace) -> tuple[float, float]:
    """``(median step seconds, peak GiB)`` of ``step`` at ``batch`` (peak: CUDA only, else NaN)."""
    cuda = args.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    times = []
    for i in range(args.warmup + args.repeats):
        gen = torch.Generator().manual_seed(i)
        _sync(args.device)
        start = time.perf_counter()
        with _autocast(args):
            step(batch, gen)
        _sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(args.device) / 2**30 if cuda else float("nan")
    return statistics.median(times), peak


def measure_batches(step: Step, name: str, trains: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows ``{method, trains, batch, seconds, peak_gib, flops, recomputed_flops, status}`` of ``step`` at
    ``args.batches``, in order, up to and including the first that runs out of memory (``status`` ``"OOM"``);
    progress on stderr as it comes, so a run stopped by a time limit still leaves its figures. The FLOPs are
    counted once per batch (:func:`count_flops`), before the timed steps."""
    rows: list[dict[str, Any]] = []
    for batch in args.batches:
        try:
            flops, recomputed = count_flops(step, batch, args)
            seconds, peak = measure(step, batch, args)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            if not _out_of_memory(err):
                raise
            rows.append({"method": name, "trains": trains, "batch": batch, "status": "OOM"})
            print(f"# {name} ({trains}) batch {batch}: out of memory", file=sys.stderr, flush=True)
            break
        row = {"method": name, "trains": trains, "batch": batch, "seconds": seconds, "peak_gib": peak}
        rows.append({**row, "flops": flops, "recomputed_flops": recomputed, "status": "ok"})
        device_peak = peak_tflops(args)[
            0
        ]  # the table's MFU and recomputed share, in case a time limit cuts it
        mfu = f", MFU {100 * flops / seconds / 1e12 / device_peak:.1f} %" if device_peak else ""
        print(
            f"# {name} ({trains}) batch {batch}: {seconds:.3f} s, peak {peak:.1f} GiB, "
            f"{flops / 1e12:.4g} TFLOP/step ({flops / seconds / 1e12:.4g} TFLOP/s{mfu}), recomputed "
            f"{100 * recomputed / max(flops, 1):.0f} %",
            file=sys.stderr,
            flush=True,
        )
    return rows


def run_method(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows ``{method, trains, batch, seconds, peak_gib, status}`` for ``args.batches`` up to the first OOM."""
    options = argparse.Namespace(
        use_lora=not args.full and name != "ssd1b",
        lora_rank=args.lora_rank,
        lora_alpha=None,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        no_gradient_checkpointing=args.no_gradient_checkpointing,
        r1_approximate_sigma=args.r1_approximate_sigma,
        shared_base=args.shared_base and name in SHARED_BASE_METHODS,
        compile=args.compile,
        compile_mode=args.compile_mode,
        compile_backend=args.compile_backend,
        init_unet=None,  # sdxl_sim's generator start: the teacher (a regression start costs the same step)
        init_lora=None,
    )
    bench = Bench(
        unet=_base_unet(args),
        device=args.device,
        dtype=args.dtype,
        latent_size=args.latent_size,
        seq_len=8 if args.tiny else 77,
        options=options,
        schedule=NoiseSchedule.from_betas(),
    )
    step = BUILDERS[name](bench)
    trains = "student (full)" if name == "ssd1b" else ("LoRA" if options.use_lora else "full UNet")
    trains += ", shared base" if options.shared_base else ""
    rows = measure_batches(step, name, trains, args)
    del step, bench
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _ratio(value: float, ref: float | None) -> str:
    if ref is None or ref != ref or value != value or ref <= 0:
        return "-"
    return f"{value / ref:.2f}"


def _flop_columns(r: dict[str, Any], peak: float | None) -> str:
    """``TFLOP/step | TFLOP/s | MFU (%) | recomputed (%)`` of a row (``-`` where unknown)."""
    flops = r.get("flops")
    if not flops or not r.get("seconds"):
        return "- | - | - | -"
    rate = flops / r["seconds"] / 1e12
    mfu = "-" if peak is None else f"{100 * rate / peak:.1f}"
    return f"{flops / 1e12:.4g} | {rate:.4g} | {mfu} | {100 * r.get('recomputed_flops', 0) / flops:.0f}"


def table(rows: list[dict[str, Any]], peak: float | None = None) -> str:
    """Markdown: per method, batch 1 and the largest batch that ran (and where it ran out of memory).

    ``step / reference`` and ``memory / reference`` divide step time and peak memory by the ``reference`` row's
    at the same batch (``-`` where it has none). Then the model FLOPs of one step (TFLOP, recomputation left
    out), the achieved TFLOP/s (over the median step time), MFU = that rate over ``peak`` (TFLOP/s; ``-``
    without one) and the checkpointing recomputation as a percentage of the model FLOPs.
    """
    lines = [
        "| method | trains | batch | step (s) | peak memory (GiB) | largest batch tried "
        "| step / reference | memory / reference | TFLOP/step | TFLOP/s | MFU (%) | recomputed (%) |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    ref = {r["batch"]: r for r in rows if r["method"] == REFERENCE and r["status"] == "ok"}
    for name in dict.fromkeys(r["method"] for r in rows):
        own = [r for r in rows if r["method"] == name]
        ok = [r for r in own if r["status"] == "ok"]
        oom = [r["batch"] for r in own if r["status"] == "OOM"]
        limit = f"OOM at {oom[0]}" if oom else f"{ok[-1]['batch'] if ok else '-'} (no OOM)"
        for r in [ok[0], ok[-1]] if len(ok) > 1 else ok:
            memory = "-" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.1f}"
            base = ref.get(r["batch"])
            time_ratio = _ratio(r["seconds"], base["seconds"] if base else None)
            mem_ratio = _ratio(r["peak_gib"], base["peak_gib"] if base else None)
            lines.append(
                f"| {name} | {r['trains']} | {r['batch']} | {r['seconds']:.3f} | {memory} | {limit} "
                f"| {time_ratio} | {mem_ratio} | {_flop_columns(r, peak)} |"
            )
        if not ok:  # out of memory at the first batch tried
            lines.append(f"| {name} | {own[0]['trains']} | - | - | - | {limit} | - | - | - | - | - | - |")
    return "\n".join(lines)


def cap_memory(device: torch.device, gib: float) -> float:
    """Cap the CUDA caching allocator of ``device`` at ``gib`` GiB; return the fraction of the card that is.

    An allocation past the cap raises ``torch.cuda.OutOfMemoryError`` as it would on a card of that size
    (the CUDA context's own few hundred MiB are outside the allocator and not counted)."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = gib * 2**30 / total
    if fraction > 1:
        raise ValueError(
            f"--memory_cap_gib {gib} exceeds the device's {total / 2**30:.1f} GiB: give a smaller cap or leave it out"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def main(args: argparse.Namespace) -> str:
    check_recompute_detection()  # before any model is built: MFU must exclude the recomputation
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.memory_cap_gib is not None:
        cap_memory(args.device, args.memory_cap_gib)
    names = ([REFERENCE] if not args.no_reference else []) + [m for m in args.methods if m != REFERENCE]
    rows = [row for name in names for row in run_method(name, args)]
    peak, peak_note = peak_tflops(args)
    header = (
        f"device: {device_name(args.device)}, torch {torch.__version__}, "
        f"{'tiny 3-level UNet' if args.tiny else 'SDXL UNet (random weights)'}, latents "
        f"{args.latent_size}x{args.latent_size}, {str(args.dtype).removeprefix('torch.')}, "
        f"gradient checkpointing {'off' if args.no_gradient_checkpointing else 'on'}"
        f"{'' if args.r1_approximate_sigma is None else f', approximate R1 (sigma {args.r1_approximate_sigma})'}"
        f"{'' if args.memory_cap_gib is None else f', memory capped at {args.memory_cap_gib:g} GiB'}"
        f"{', shared base (sim, diffusion2gan)' if args.shared_base else ''}"
        f"{compile_note(args)}; {peak_note}"
    )
    return header + "\n\n" + table(rows, peak)


def compile_note(args: argparse.Namespace) -> str:
    """What the header says about ``--compile``."""
    if not args.compile:
        return ", eager"
    return f", torch.compile per block ({args.compile_backend}, mode {args.compile_mode})"


if __name__ == "__main__":
    print(main(parse_args()))
