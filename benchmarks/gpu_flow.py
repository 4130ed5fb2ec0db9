"""One training step of each flow-transformer distillation at the real FLUX.1 / SD3.5 sizes: time and peak memory.

The flow counterpart of ``benchmarks/gpu_sdxl.py`` (issue 23): for each method of the ``examples/flow_*.py``
family the script builds what that method trains -- a LoRA (rank 64) on a frozen bf16 base with gradient
checkpointing under bf16 autocast, as the README's launch commands -- on the published transformer architecture
with random weights (``--model flux``: ``black-forest-labs/FLUX.1-dev``, 11.9 B parameters; ``sd35-large``:
8.1 B; ``sd35-medium``: 2.2 B; configs in ``tests/transformer_configs.py``, built directly on the device in bf16,
nothing downloaded), and times one optimisation step (forward, backward and optimiser step of every network the
step updates) on 128x128 latents of 16 channels (1024 px) with the model's text length (FLUX: 512 T5 tokens;
SD3: 77 CLIP + 256 T5), first at batch 1, then doubling until it runs out of memory or reaches ``--max_batch``.
It prints a Markdown table with the step time (median of ``--repeats`` after ``--warmup``) and the peak memory
(``torch.cuda.max_memory_allocated``) at batch 1 and the largest batch that fits, each also as a multiple of the
``reference`` step's: a plain flow-matching LoRA fine-tuning step (velocity MSE at SD3's logit-normal sigma, one
transformer forward and backward, Adam), run first in the same process. ``--memory_cap_gib 78`` makes "fits" mean
"fits an 80 GB card" on a larger one.

Every step runs on ONE base transformer (:class:`diffdistill.students.SharedBase`): the critics and the teacher
are views of it with adapters switched (the memory saving of issue 22), and the steps are assembled from the
library's public losses with the examples' own plumbing (``training.flow_models.FlowDenoiser``: FLUX packing,
timestep and guidance inputs):

* ``ladd`` -- LADD (Sauer et al. 2024): the student's adapter maps re-noised latents to x0 in one call (sigma
  from ``{1, .75, .5, .25}``), judged by :class:`~diffdistill.discriminators.LADDDiscriminator` heads on the base
  with adapters off (frozen teacher features); generator update through the frozen discriminator, then the
  heads' hinge update;
* ``dmd2`` -- DMD2's generator update (real score = adapters off, FLUX.1-dev's embedded guidance or SD3's CFG;
  fake score = its adapter) then the fake score's flow-matching update on the detached samples;
* ``tscd`` -- Hyper-SD's trajectory-segmented consistency on the flow teacher (4 segments, one guided teacher
  Euler step, online target as LCM-LoRA);
* ``kd`` -- the block-removed student (``--kd_preset``, default ``flux-mini`` / ``sd3-half``; full training,
  float32 master weights) with LayerKD against the frozen bf16 teacher (flow-matching task loss, output KD and
  feature KD), as ``examples/flow_kd.py``.

The FLOP columns (TFLOP/step, TFLOP/s, MFU against the device's dense bf16 peak, the checkpointing recomputation)
and ``--compile`` / ``--peak_tflops`` are gpu_sdxl.py's (counted once per method and batch before the timing).

``--tiny`` runs the same code on the tiny FLUX / SD3 configs with 8x8 latents, float32, on the CPU (the smoke
test). Without a GPU the GPU columns are missing: ``benchmarks/shared_base_memory.py`` gives the parameter-memory
estimate.

Usage::

    python benchmarks/gpu_flow.py --model flux                          # all methods, FLUX.1-dev size
    python benchmarks/gpu_flow.py --model sd35-large --methods ladd dmd2
    python benchmarks/gpu_flow.py --model flux --batches 1 2 4 8 --memory_cap_gib 78   # an 80 GB card
    python benchmarks/gpu_flow.py --model flux --batches 4 8 --compile --warmup 3        # with torch.compile
    OMP_NUM_THREADS=1 python benchmarks/gpu_flow.py --tiny --model flux --device cpu   # CPU smoke run (seconds)
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffdistill.discriminators import LADDDiscriminator, ladd_renoise_sigma
from diffdistill.losses import (
    consistency_pair,
    dmd_loss,
    fake_score_loss,
    gan_discriminator_loss,
    gan_generator_loss,
)
from diffdistill.schedulers import NoiseSchedule, TeacherSolver, flow_density_timesteps, tscd_segments
from diffdistill.students import LayerKD, SharedBase, build_transformer_student

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))
from training import compilation, sdxl_models  # noqa: E402 - the examples' package
from training.flow_families import FLOW_LORA_TARGETS  # noqa: E402
from training.flow_models import FlowDenoiser  # noqa: E402

from tests.transformer_configs import (  # noqa: E402 - the published and tiny configs
    FLUX1_DEV_CONFIG,
    SD35_LARGE_CONFIG,
    SD35_MEDIUM_CONFIG,
    tiny_flux_transformer_config,
    tiny_sd3_transformer_config,
)


def _gpu_sdxl() -> Any:
    """The SDXL benchmark module (its measuring loop, table and memory cap), loaded by path: putting benchmarks/ on
    sys.path would shadow installed packages by the benchmarks' file names (benchmarks/lpips.py vs lpips)."""
    import importlib.util

    if "gpu_sdxl" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_sdxl", ROOT / "benchmarks" / "gpu_sdxl.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_sdxl"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_sdxl"]


_sdxl = _gpu_sdxl()
REFERENCE, _out_of_memory, cap_memory, table = (
    _sdxl.REFERENCE,
    _sdxl._out_of_memory,
    _sdxl.cap_memory,
    _sdxl.table,
)

METHODS = ("ladd", "dmd2", "tscd", "kd")
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "flux": ("flux", FLUX1_DEV_CONFIG),
    "sd35-large": ("sd3", SD35_LARGE_CONFIG),
    "sd35-medium": ("sd3", SD35_MEDIUM_CONFIG),
}
TEXT_TOKENS = {"flux": 512, "sd3": 77 + 256}  # FluxPipeline's T5 length; SD3's CLIP 77 + T5 256 (diffusers)
KD_PRESET = {"flux": "flux-mini", "sd3": "sd3-half"}
LADD_SIGMAS = (1.0, 0.75, 0.5, 0.25)  # student sigmas of LADD's 4-step schedule (reference/flow.md §4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="flux")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument(
        "--tiny", action="store_true", help="the tiny config of --model's family, 8x8 latents, float32"
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--latent_size", type=int, default=None, help="default 128 (1024 px; tiny: 8)")
    p.add_argument("--max_batch", type=int, default=None, help="largest batch tried (default 32; tiny: 2)")
    p.add_argument(
        "--batches", type=int, nargs="+", default=None, help="batch sizes to try, up to the first OOM"
    )
    p.add_argument(
        "--memory_cap_gib", type=float, default=None, help="CUDA: cap the allocator (78: an 80 GB card)"
    )
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument(
        "--kd_preset", default=None, help="block-removal preset of kd (default flux-mini / sd3-half)"
    )
    p.add_argument("--no_gradient_checkpointing", action="store_true")
    p.add_argument(
        "--no_reference", action="store_true", help="skip the plain LoRA fine-tuning reference step"
    )
    p.add_argument("--warmup", type=int, default=None, help="default 2 (tiny: 1)")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (tiny: 1)")
    _sdxl.add_speed_args(p)
    args = p.parse_args(argv)
    _sdxl.check_speed_args(p, args)
    args.family, config = MODELS[args.model]
    if args.tiny:
        config = tiny_flux_transformer_config() if args.family == "flux" else tiny_sd3_transformer_config()
    args.config = dict(config)
    args.device = torch.device(
        args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    )
    args.dtype = torch.float32 if args.tiny else torch.bfloat16
    args.latent_size = args.latent_size or (8 if args.tiny else 128)
    if args.latent_size % 2:
        p.error(f"--latent_size must be even (2x2 patches), got {args.latent_size}")
    args.max_batch = args.max_batch or (2 if args.tiny else 32)
    if args.batches is None:
        args.batches = [2**k for k in range(args.max_batch.bit_length())]
    elif any(b < 1 for b in args.batches):
        p.error(f"--batches must be positive integers, got {args.batches}")
    if args.memory_cap_gib is not None and args.device.type != "cuda":
        p.error(
            f"--memory_cap_gib caps the CUDA allocator: it needs a CUDA device, got --device {args.device}"
        )
    args.text_tokens = 8 if args.tiny else TEXT_TOKENS[args.family]
    args.kd_preset = args.kd_preset or KD_PRESET[args.family]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    return args


def build_transformer(args: argparse.Namespace) -> nn.Module:
    """The transformer of ``args.config`` with random weights, built on the device in ``args.dtype`` (a 12 B
    model is never materialised in float32), frozen."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if args.family == "flux" else SD3Transformer2DModel
    default = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)
    try:
        with torch.random.fork_rng(devices=[]), torch.device(args.device):
            torch.manual_seed(0)
            model = cls(**args.config)
    finally:
        torch.set_default_dtype(default)
    return model.requires_grad_(False).eval()


@dataclass
class Bench:
    """What a step builder gets: the frozen base transformer and the settings."""

    transformer: nn.Module
    args: argparse.Namespace
    schedule: NoiseSchedule

    @property
    def guidance(self) -> float | None:
        return 3.5 if self.args.config.get("guidance_embeds") else None

    def shared(self, *adapters: str) -> SharedBase:
        """One base with a float32 LoRA (rank ``--lora_rank``) per name; gradient checkpointing per adapter."""
        opts = {"rank": self.args.lora_rank, "targets": list(FLOW_LORA_TARGETS)}
        base = SharedBase(self.transformer, adapters={name: dict(opts) for name in adapters})
        sdxl_models.upcast_trainable(self.transformer)  # SharedBase trains exactly the "lora_" parameters
        if not self.args.no_gradient_checkpointing:
            base.enable_gradient_checkpointing()
        return base

    def compile(self, *networks: Any) -> None:
        """``--compile``: the networks' blocks through ``torch.compile``, as the scripts (``compile_networks``)."""
        compilation.compile_networks(self.args, *networks)

    def denoiser(self, model: nn.Module) -> FlowDenoiser:
        return FlowDenoiser(model, self.args.family, guidance=self.guidance)

    def latents(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        channels = self.args.config.get("out_channels") or self.args.config["in_channels"]
        if self.args.family == "flux":
            channels = self.args.config["in_channels"] // 4  # packed 2x2 patches
        size = self.args.latent_size
        return torch.randn(batch, channels, size, size, generator=gen).to(self.args.device)

    def cond(self, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        c, a = self.args.config, self.args
        ehs = torch.randn(batch, a.text_tokens, c["joint_attention_dim"], generator=gen)
        pooled = torch.randn(batch, c["pooled_projection_dim"], generator=gen)
        return {
            "encoder_hidden_states": ehs.to(a.device, a.dtype),
            "pooled_projections": pooled.to(a.device, a.dtype),
        }

    def uncond(self) -> dict[str, torch.Tensor] | None:
        """The empty prompt's conditions for CFG; None for an embedded-guidance model (no unconditional pass)."""
        return None if self.guidance is not None else self.cond(1, torch.Generator().manual_seed(1))

    def adam(self, *modules: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for m in modules for p in m.parameters() if p.requires_grad], lr=1e-6)

    def teacher(self, real: Callable[..., Any]) -> TeacherSolver:
        """The real score / teacher: FLUX.1-dev's embedded guidance (one pass), else SD3's CFG 7 (two passes)."""
        if self.guidance is not None:
            return TeacherSolver(real, self.schedule, guidance_scale=self.guidance, guidance_input="guidance")
        return TeacherSolver(real, self.schedule, guidance_scale=7.0)


Step = Callable[[int, torch.Generator], None]


def _update(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _noised(b: Bench, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x0, noise, t)``: latents, noise and SD3's logit-normal training timesteps."""
    t = flow_density_timesteps(batch, generator=gen, device=b.args.device).t
    return b.latents(batch, gen), b.latents(batch, gen), t


def build_reference(b: Bench) -> Step:
    """The yardstick: a plain flow-matching LoRA fine-tuning step (velocity MSE, one forward and backward)."""
    base = b.shared("default")
    student = b.denoiser(base.view("default"))
    b.compile(b.transformer)
    opt = b.adam(base.view("default"))

    def step(batch: int, gen: torch.Generator) -> None:
        x0, noise, t = _noised(b, batch, gen)
        v = student(b.schedule.add_noise(x0, noise, t), b.schedule.model_timestep(t), **b.cond(batch, gen))
        _update(torch.nn.functional.mse_loss(v.float(), noise - x0), opt)

    return step


def build_ladd(b: Bench) -> Step:
    base = b.shared("generator")
    gen_view = base.view("generator")
    student = b.denoiser(gen_view)
    disc = LADDDiscriminator(
        base.model,
        # the extractor's own checkpointing for the teacher pass (it replaces the base's recompute function for the
        # call; the recomputation then runs in the generator's backward, outside any view call: adapters off, as in
        # its forward under base.active(None))
        gradient_checkpointing=not b.args.no_gradient_checkpointing,
        norm_groups=32 if not b.args.tiny else 4,
    ).to(b.args.device)
    features = b.denoiser(base.model)
    b.compile(b.transformer)  # the student's and the teacher's (= the heads' trunk) blocks
    opt_g, opt_d = b.adam(gen_view), b.adam(disc)
    sigmas = torch.tensor(LADD_SIGMAS, dtype=torch.float64)

    def judge(x0: torch.Tensor, cond: dict[str, torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
        batch = x0.shape[0]
        sigma = ladd_renoise_sigma(batch, generator=gen).to(b.args.device)
        s = sigma.view(-1, 1, 1, 1)
        x = (1 - s) * x0 + s * b.latents(batch, gen)
        hidden, kwargs, grid = features.model_inputs(x.to(b.args.dtype), 1000 * sigma, **cond)
        with base.active(None):  # the frozen teacher's features
            return disc(hidden, kwargs.pop("timestep"), grid_size=grid, **kwargs)

    def step(batch: int, gen: torch.Generator) -> None:
        x_teacher, noise, cond = b.latents(batch, gen), b.latents(batch, gen), b.cond(batch, gen)
        pick = torch.randint(0, len(LADD_SIGMAS), (batch,), generator=gen)
        s = sigmas[pick].to(b.args.device, torch.float32).view(-1, 1, 1, 1)
        x_s = (1 - s) * x_teacher + s * noise
        x0 = x_s - s * student(x_s, 1000 * s.flatten(), **cond).float()
        disc.requires_grad_(False)
        adv, _ = gan_generator_loss(judge(x0, cond, gen), loss="hinge")
        disc.requires_grad_(True)
        _update(adv, opt_g)
        loss_d, _ = gan_discriminator_loss(
            judge(x_teacher, cond, gen), judge(x0.detach(), cond, gen), loss="hinge"
        )
        _update(loss_d, opt_d)

    return step


def build_dmd2(b: Bench) -> Step:
    base = b.shared("generator", "fake")
    gen_view, fake_view = base.view("generator"), base.view("fake")
    generator = b.denoiser(gen_view)
    real = b.teacher(b.denoiser(base.view(None)))
    fake = TeacherSolver(b.denoiser(fake_view), b.schedule)
    b.compile(b.transformer)
    opt_g, opt_f = b.adam(gen_view), b.adam(fake_view)
    uncond = b.uncond()

    def step(batch: int, gen: torch.Generator) -> None:
        z, cond = b.latents(batch, gen), b.cond(batch, gen)
        t = torch.full((batch,), 999, device=b.args.device, dtype=torch.long)
        x = z - generator(z, b.schedule.model_timestep(t), **cond).float()  # sigma(999) = 1: x0 = z - v
        fake_view.requires_grad_(False)
        loss, _ = dmd_loss(x, real, fake, schedule=b.schedule, cond=cond, uncond=uncond, generator=gen)
        _update(loss, opt_g)
        fake_view.requires_grad_(True)
        f_loss, _ = fake_score_loss(
            fake, x.detach(), schedule=b.schedule, weighting="flow", cond=cond, generator=gen
        )
        _update(f_loss, opt_f)

    return step


def build_tscd(b: Bench) -> Step:
    base = b.shared("generator")
    gen_view = base.view("generator")
    student = b.denoiser(gen_view)
    teacher = b.teacher(b.denoiser(base.view(None)))
    b.compile(b.transformer)
    opt = b.adam(gen_view)
    uncond = b.uncond()

    def step(batch: int, gen: torch.Generator) -> None:
        x0, noise, cond = b.latents(batch, gen), b.latents(batch, gen), b.cond(batch, gen)
        sample = tscd_segments(batch, 4, 50, generator=gen, device=b.args.device)
        x_t = b.schedule.add_noise(x0, noise, sample.t)
        pair = consistency_pair(student, teacher, x_t, sample, cond, uncond, parameterization="move")
        _update(torch.nn.functional.mse_loss(pair.student.float(), pair.target.float()), opt)

    return step


def build_kd(b: Bench) -> Step:
    teacher = b.transformer
    student, report = build_transformer_student(teacher, b.args.kd_preset, count_flops=False)
    student.float().train().requires_grad_(True)
    if not b.args.no_gradient_checkpointing:
        student.enable_gradient_checkpointing()
    kd = LayerKD(b.denoiser(student), b.denoiser(teacher), _prefixed(report.kd_pairs()))
    b.compile(student, teacher)
    opt = b.adam(student)

    def step(batch: int, gen: torch.Generator) -> None:
        x0, noise, t = _noised(b, batch, gen)
        loss, _ = kd(
            b.schedule.add_noise(x0, noise, t), b.schedule.model_timestep(t), noise - x0, **b.cond(batch, gen)
        )
        _update(loss, opt)

    return step


def _prefixed(pairs: Any) -> Any:
    """The report's KD pairs named inside :class:`FlowDenoiser` (its transformer is the ``transformer`` child)."""
    if isinstance(pairs, dict):
        return {f"transformer.{s}": f"transformer.{t}" for s, t in pairs.items()}
    return [(f"transformer.{s}", f"transformer.{t}") for s, t in pairs]


BUILDERS: dict[str, Callable[[Bench], Step]] = {
    REFERENCE: build_reference,
    "ladd": build_ladd,
    "dmd2": build_dmd2,
    "tscd": build_tscd,
    "kd": build_kd,
}


def run_method(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows ``{method, trains, batch, seconds, peak_gib, status}`` for ``args.batches`` up to the first OOM."""
    bench = Bench(build_transformer(args), args, NoiseSchedule.flow_matching(shift=3.0))
    trains = f"student {args.kd_preset} (full)" if name == "kd" else "LoRA"
    try:
        rows = _sdxl.measure_batches(BUILDERS[name](bench), name, trains, args)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:  # the networks alone do not fit
        if not _out_of_memory(err):
            raise
        rows = [{"method": name, "trains": trains, "batch": args.batches[0], "status": "OOM"}]
    del bench
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(args: argparse.Namespace) -> str:
    _sdxl.check_recompute_detection()  # MFU must exclude gradient checkpointing's recomputation
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.memory_cap_gib is not None:
        cap_memory(args.device, args.memory_cap_gib)
    names = ([REFERENCE] if not args.no_reference else []) + list(args.methods)
    rows = [row for name in names for row in run_method(name, args)]
    peak, peak_note = _sdxl.peak_tflops(args)
    header = (
        f"device: {_sdxl.device_name(args.device)}, torch {torch.__version__}, {'tiny ' if args.tiny else ''}{args.model} transformer "
        "(random weights), latents "
        f"{args.latent_size}x{args.latent_size}, {args.text_tokens} text tokens, {str(args.dtype).removeprefix('torch.')}, "
        f"gradient checkpointing {'off' if args.no_gradient_checkpointing else 'on'}, one shared base per step"
        f"{'' if args.memory_cap_gib is None else f', memory capped at {args.memory_cap_gib:g} GiB'}"
        f"{_sdxl.compile_note(args)}; {peak_note}"
    )
    return header + "\n\n" + table(rows, peak)


if __name__ == "__main__":
    print(main(parse_args()))
