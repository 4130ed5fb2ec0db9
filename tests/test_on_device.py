"""The library's main components on ``--device`` (float32 and bf16 autocast) against CPU float64.

Run on a GPU with ``pytest -q --device cuda tests/test_on_device.py`` (or DIFFDISTILL_TEST_DEVICE=cuda);
without the option everything runs on the CPU, which CI does too.

Every test follows one recipe:

* the module is built on the CPU in float64 (seeded), and the device copy is
  ``copy.deepcopy(reference).to(device, torch.float32)``, so both hold the same weights;
* inputs and random draws come from a CPU ``torch.Generator``, as in the examples: tensors live on the
  device, the library draws on the generator's device and moves the result (a draw made on the wrong
  device raises on CUDA);
* forward + backward on the device in float32 must match the float64 CPU run (values and gradients) at
  the float32 tolerance of ``tests/conftest.py``;
* the same computation under ``torch.autocast(device.type, dtype=torch.bfloat16)`` must give float32
  (at least) losses, finite values and gradients, close to the float64 run at a loose bf16 tolerance.

Errors are measured relative to the reference's largest magnitude (``max|got - want| / max|want|``), so a
tolerance means the same for a loss value and for a gradient whose entries are 1e-4. Set
``DIFFDISTILL_PRINT_ERRORS=1`` (with ``pytest -s``) to print the measured errors, e.g. to re-measure the
bf16 tolerances on a new device. The bf16 tolerances below are 4-5x the largest error measured on the CPU
(2-core x86, torch 2.14, oneDNN bf16), quoted next to each.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffdistill.losses import (
    ELatentLPIPS,
    LatentLPIPS,
    dice_semimetric_loss,
    dmd_loss,
    fake_score_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    lazy_r1_penalty,
    lcm_consistency_loss,
    r1_penalty,
    sim_loss,
    tscd_loss,
)
from diffdistill.schedulers import NoiseSchedule, TeacherSolver, ddim_sample, lcm_sample, spaced_timesteps
from diffdistill.schedulers.few_step_samplers import lcm_timesteps
from diffdistill.students import EMA
from tests.conftest import DTYPE_TOLERANCES

Results = dict[str, torch.Tensor]
CPU = torch.device("cpu")
F32_TOL = DTYPE_TOLERANCES[torch.float32]  # (rtol, atol relative to the reference's max magnitude)


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _ieee_float32(device: torch.device) -> Iterator[None]:
    """On CUDA, cuDNN convolutions default to TF32 (10-bit mantissa): switch it off so "float32" is float32.

    The bf16 checks cover reduced precision; the float32 checks are about the device computing the same
    thing as the CPU.
    """
    if device.type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    if matmul:
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        if matmul:
            torch.backends.cuda.matmul.allow_tf32 = matmul


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """float32 draws on the CPU (a float64 draw would give other numbers for the same seed)."""
    return torch.randn(shape, generator=generator)


def _device_copy(reference: nn.Module, device: torch.device) -> nn.Module:
    return copy.deepcopy(reference).to(device, torch.float32)


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[object]:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _grads(
    value: torch.Tensor, inputs: dict[str, torch.Tensor | list[torch.Tensor]], **kwargs: bool
) -> Results:
    """Gradients of ``value``; a list of tensors (a module's parameters) gives one flattened vector."""
    flat = [t for v in inputs.values() for t in (v if isinstance(v, list) else [v])]
    got = iter(torch.autograd.grad(value, flat, **kwargs))
    out = {}
    for name, v in inputs.items():
        if isinstance(v, list):
            out[f"grad:{name}"] = torch.cat([next(got).flatten() for _ in v])
        else:
            out[f"grad:{name}"] = next(got)
    return out


def _trainable(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def _scaled_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want64 = want.detach().double().cpu()
    diff = (got.detach().double().cpu() - want64).abs().max()
    return float(diff / want64.abs().max().clamp_min(1e-30))


def _compare(got: Results, want: Results, tol: tuple[float, float], label: str) -> None:
    """assert_close for every entry, atol relative to the entry's largest reference magnitude."""
    assert got.keys() == want.keys()
    rtol, atol = tol
    for key, w in want.items():
        g = got[key]
        assert g.shape == w.shape, f"{label} {key}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert torch.isfinite(g).all(), f"{label} {key}: non-finite values"
        scale = float(w.detach().abs().max())
        assert scale > 0, f"{label} {key}: the reference is all zeros, the comparison would be vacuous"
        err = _scaled_error(g, w)
        if os.environ.get("DIFFDISTILL_PRINT_ERRORS"):
            print(f"{label:>40} {key:<42} scaled error {err:.2e}")
        torch.testing.assert_close(
            g.detach().double().cpu(),
            w.detach().double().cpu(),
            rtol=rtol,
            atol=atol * scale,
            msg=lambda m, k=key, e=err: f"{label} {k}: scaled error {e:.2e}\n{m}",
        )


def _check_on_device(
    run: Callable[[torch.device, torch.dtype, bool], Results],
    device: torch.device,
    bf16_tol: tuple[float, float],
    label: str,
) -> Results:
    """float64 CPU reference, float32 device run, bf16-autocast device run; returns the reference.

    ``bf16_tol``: (tolerance of the values, tolerance of the gradients), each used as rtol and scaled atol.
    """
    want = run(CPU, torch.float64, False)
    assert all(v.dtype == torch.float64 for k, v in want.items() if k.startswith("loss"))
    got = run(device, torch.float32, False)
    assert all(v.device.type == device.type for v in got.values())
    assert all(v.dtype == torch.float32 for k, v in got.items() if k.startswith("loss"))
    _compare(got, want, F32_TOL, f"{label} float32")
    got_bf16 = run(device, torch.float32, True)
    for key, value in got_bf16.items():
        if key.startswith(("loss", "logits")):
            assert value.dtype == torch.float32, f"{label} {key}: {value.dtype} under bf16 autocast"
    assert all(torch.isfinite(v).all() for v in got_bf16.values()), f"{label} bf16: non-finite values"
    grads = [k for k in want if k.startswith("grad")]
    values = [k for k in want if k not in grads]
    for keys, tol in ((values, bf16_tol[0]), (grads, bf16_tol[1])):
        _compare({k: got_bf16[k] for k in keys}, {k: want[k] for k in keys}, (tol, tol), f"{label} bf16")
    return want


class TinyDenoiser(nn.Module):
    """``model(x_t, t, context=None)``: two convs with a time (and optional context) embedding."""

    def __init__(self, channels: int = 4, hidden: int = 16, context_dim: int | None = None) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.time = nn.Linear(1, hidden)
        self.context = nn.Linear(context_dim, hidden) if context_dim else None
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time((t.to(x.dtype) / 1000).reshape(-1, 1))
        if self.context is not None and context is not None:
            emb = emb + self.context(context)
        h = F.silu(self.conv_in(x) + emb[:, :, None, None])
        return self.conv_out(h)


def _tiny_generator() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))


def _tiny_discriminator() -> nn.Sequential:
    """Patch discriminator with smooth activations (R1's double backward is not trivially zero)."""
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 16, 4, stride=2, padding=1), nn.SiLU(),
        nn.Conv2d(16, 1, 3, padding=1),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- 1. LPIPS
@pytest.fixture(scope="module")
def lpips_reference() -> ELatentLPIPS:
    torch.manual_seed(0)
    model = ELatentLPIPS("sdxl", weights=None, augment="bg", num_draws=2, reduction="none")
    g = _gen(10)
    with torch.no_grad():  # calibrated-looking heads and BN statistics instead of the all-ones defaults
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(1 + 0.2 * torch.rand(buf.shape, generator=g))
        for head in model.heads:
            w = head.model[1].weight
            w.copy_(0.2 * torch.rand(w.shape, generator=g))
    return model.double()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_elatent_lpips(
    device: torch.device, lpips_reference: ELatentLPIPS, memory_format: torch.memory_format
) -> None:
    dev_model = _device_copy(lpips_reference, device).to(memory_format=memory_format)
    formats: list[bool] = []
    dev_model.net.slice1.register_forward_pre_hook(
        lambda m, args: formats.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    plain_ref = LatentLPIPS("sdxl", weights=None, reduction="none")
    plain_ref.load_state_dict(lpips_reference.state_dict())
    plain_ref = plain_ref.double()
    plain_dev = _device_copy(plain_ref, device).to(memory_format=memory_format)
    g = _gen(1)
    x0, y0 = _randn(2, 4, 8, 8, generator=g), _randn(2, 4, 8, 8, generator=g)

    def run(dev: torch.device, dtype: torch.dtype, autocast: bool) -> Results:
        model, plain = (lpips_reference, plain_ref) if dtype == torch.float64 else (dev_model, plain_dev)
        x = x0.to(dev, dtype).contiguous(memory_format=memory_format).requires_grad_(True)
        y = y0.to(dev, dtype).contiguous(memory_format=memory_format)
        with _autocast(dev, autocast):
            ens = model(x, y, generator=_gen(3))  # two augmentation draws from a CPU generator
            single = plain(x, y)
            spatial = plain(x, y, spatial=True)
        out = {"loss:elatent": ens, "loss:latent": single, "loss:spatial": spatial}
        out |= _grads(ens.sum(), {"x:elatent": x}, retain_graph=True)
        out |= _grads(single.sum(), {"x:latent": x})
        return out

    # Measured on CPU, bf16 scaled errors: values <= 2.9e-4 (the spatial map), input gradients <= 1.1e-2.
    _check_on_device(run, device, (2e-3, 5e-2), f"ELatentLPIPS[{memory_format}]")
    # The trunk saw channels_last activations exactly when its weights are channels_last.
    assert formats and all(f == (memory_format == torch.channels_last) for f in formats)


# --------------------------------------------------------------------------------------------- 2. Dice
def test_dice_semimetric_soft_labels(device: torch.device) -> None:
    torch.manual_seed(0)
    head_ref = nn.Conv2d(3, 5, 3, padding=1).double()
    head_dev = _device_copy(head_ref, device)
    g = _gen(2)
    feats0 = _randn(2, 3, 8, 8, generator=g)
    soft0 = torch.softmax(2 * _randn(2, 5, 8, 8, generator=g), dim=1)  # soft labels summing to 1 over C

    def run(dev: torch.device, dtype: torch.dtype, autocast: bool) -> Results:
        head = head_ref if dtype == torch.float64 else head_dev
        feats = feats0.to(dev, dtype).requires_grad_(True)
        target = soft0.to(dev, dtype)
        with _autocast(dev, autocast):
            logits = head(feats)  # bf16 under autocast
            dml = dice_semimetric_loss(logits, target)
            per_image = dice_semimetric_loss(logits, target, aggregate="image", reduction="none")
            jaccard = dice_semimetric_loss(logits, target, alpha=1.0, beta=1.0, norm=2)
        out = {"loss:dml": dml, "loss:per_image": per_image, "loss:jaccard": jaccard}
        out |= _grads(dml + jaccard, {"feats": feats, "head": _trainable(head)})
        return out

    # Measured on CPU, bf16 scaled errors: values <= 3.1e-4 (per image), gradients <= 4.7e-3.
    _check_on_device(run, device, (2e-3, 2.5e-2), "dice_semimetric_loss")


# --------------------------------------------------------------------------------------------- 3. GAN
def test_adversarial_losses_and_r1(device: torch.device) -> None:
    torch.manual_seed(0)
    disc_ref, gen_ref = _tiny_discriminator().double(), _tiny_generator().double()
    disc_dev, gen_dev = _device_copy(disc_ref, device), _device_copy(gen_ref, device)
    g = _gen(3)
    real0, z0 = _randn(4, 4, 8, 8, generator=g), _randn(4, 4, 8, 8, generator=g)

    def run(dev: torch.device, dtype: torch.dtype, autocast: bool) -> Results:
        disc, gen = (disc_ref, gen_ref) if dtype == torch.float64 else (disc_dev, gen_dev)
        real, z = real0.to(dev, dtype), z0.to(dev, dtype)
        # Weights only: the last bias's D-loss gradient is a sum of +-0.5 / N terms that cancel, and the
        # bf16 backward rounds them all the same way (error 15% of that gradient, measured on CPU).
        d_weights = [p for n, p in disc.named_parameters() if n.endswith("weight")]
        with _autocast(dev, autocast):
            fake = gen(z)
            g_loss, _ = gan_generator_loss(disc(fake))
            d_loss, _ = gan_discriminator_loss(disc(real), disc(fake.detach()))
            hinge, _ = gan_discriminator_loss(disc(real), disc(fake.detach()), loss="hinge")
            real_req = real.detach().requires_grad_(True)
            r1, logs = r1_penalty(disc(real_req), real_req, gamma=2.0)
            # Subset drawn by randperm on the CPU generator, then indexed on the device.
            lazy, _ = lazy_r1_penalty(
                disc, real, step=8, every=4, num_samples=2, gamma=2.0, generator=_gen(7)
            )
        # APT's finite difference (the perturbation drawn on the CPU generator, then moved; D replays its RNG
        # state on the device) outside autocast: in bf16 it differences rounded logits (7e-2 scaled error,
        # measured on CPU; its docstring says to keep sigma large there), so both runs check it in float32.
        approx, _ = lazy_r1_penalty(
            disc, real, step=8, every=4, num_samples=2, gamma=2.0, generator=_gen(7), approximate_sigma=0.1
        )
        out = {"loss:g": g_loss, "loss:d": d_loss, "loss:hinge": hinge, "loss:r1": r1, "loss:lazy_r1": lazy}
        out["loss:approximate_r1"] = approx
        out["log:r1_grad_sq"] = logs["r1_grad_sq"]
        out |= _grads(g_loss, {"G:g": _trainable(gen)})
        out |= _grads(d_loss, {"D:d": d_weights})
        # Double backward for R1, which does not depend on the last bias.
        out |= _grads(r1, {"D:r1": d_weights})
        out |= _grads(lazy, {"D:lazy_r1": d_weights})
        out |= _grads(approx, {"D:approximate_r1": d_weights})
        return out

    # Measured on CPU, bf16 scaled errors: values <= 7e-4 (R1), gradients <= 7.3e-3 (D loss; R1's double
    # backward 3.7e-3).
    _check_on_device(run, device, (4e-3, 4e-2), "adversarial")


# --------------------------------------------------------------------------------------------- 4. score
def test_score_losses(device: torch.device) -> None:
    torch.manual_seed(0)
    real_ref = TinyDenoiser().double().requires_grad_(False)  # frozen teacher (epsilon prediction)
    fake_ref = TinyDenoiser().double()  # online fake score
    gen_ref = _tiny_generator().double()
    real_dev, fake_dev, gen_dev = (_device_copy(m, device) for m in (real_ref, fake_ref, gen_ref))
    schedule = NoiseSchedule.from_betas()
    z0 = _randn(4, 4, 8, 8, generator=_gen(4))

    def run(dev: torch.device, dtype: torch.dtype, autocast: bool) -> Results:
        on_ref = dtype == torch.float64
        real, fake, gen = (real_ref, fake_ref, gen_ref) if on_ref else (real_dev, fake_dev, gen_dev)
        z = z0.to(dev, dtype)
        with _autocast(dev, autocast):
            x = gen(z)
            # t ~ U[20, 980] and the noise are drawn on the CPU generator and moved to the device.
            sim, _ = sim_loss(x, real, fake, schedule=schedule, c=0.05, generator=_gen(11))
            dmd, logs = dmd_loss(x, real, fake, schedule=schedule, generator=_gen(12))
            fsl, _ = fake_score_loss(fake, x, schedule=schedule, generator=_gen(13))
            fsl_v, _ = fake_score_loss(fake, x, schedule=schedule, weighting="v", generator=_gen(14))
        out = {"loss:sim": sim, "loss:dmd": dmd, "loss:fake": fsl, "loss:fake_v": fsl_v}
        out["log:dmd_grad_norm"] = logs["grad_norm"]
        out |= _grads(sim, {"G:sim": _trainable(gen)}, retain_graph=True)
        out |= _grads(dmd, {"G:dmd": _trainable(gen)})
        out |= _grads(fsl + fsl_v, {"fake": _trainable(fake)})
        return out

    # Measured on CPU, bf16 scaled errors: values <= 1.3e-3 (DMD), gradients <= 6.4e-3 (fake score).
    _check_on_device(run, device, (6e-3, 3e-2), "score losses")


# --------------------------------------------------------------------------------------------- 5. consistency
@pytest.mark.parametrize("loss_name", ["lcm", "tscd"])
def test_consistency_losses(device: torch.device, loss_name: str) -> None:
    torch.manual_seed(0)
    student_ref = TinyDenoiser(context_dim=6).double()
    teacher_ref = TinyDenoiser(context_dim=6).double().requires_grad_(False)
    student_dev, teacher_dev = _device_copy(student_ref, device), _device_copy(teacher_ref, device)
    schedule = NoiseSchedule.from_betas()
    g = _gen(5)
    x00, ctx0 = _randn(3, 4, 8, 8, generator=g), _randn(3, 6, generator=g)

    def run(dev: torch.device, dtype: torch.dtype, autocast: bool) -> Results:
        on_ref = dtype == torch.float64
        student, teacher_net = (student_ref, teacher_ref) if on_ref else (student_dev, teacher_dev)
        teacher = TeacherSolver(teacher_net, schedule, guidance_scale=3.0, guidance="lcm")
        x0 = x00.to(dev, dtype)
        cond = {"context": ctx0.to(dev, dtype)}
        uncond = {"context": torch.zeros(1, 6, device=dev, dtype=dtype)}
        with _autocast(dev, autocast):
            # Timesteps and noise come from the CPU generator; the teacher step runs CFG batched. LCM with
            # "mse": under the default pseudo-Huber (c = 0.001) the gradient is about sign(student -
            # target), and entries where the two nearly agree flip sign under bf16 (11% scaled error).
            if loss_name == "lcm":
                loss, logs = lcm_consistency_loss(
                    student, teacher, x0, cond, uncond, distance="mse", generator=_gen(21)
                )
            else:
                loss, logs = tscd_loss(student, teacher, x0, cond, uncond, num_segments=4, generator=_gen(22))
        out = {"loss:value": loss, "log:target_norm": logs["target_norm"]}
        out |= _grads(loss, {"student": _trainable(student)})
        return out

    # Measured on CPU, bf16 scaled errors (values, gradients): lcm 4.4e-3, 3.9e-2; tscd 2.5e-3, 7.8e-3. The
    # LCM gradient is the least accurate: student and online target nearly agree, and both amplify the
    # model's bf16 error by sigma_t / alpha_t in the x0 estimate (up to 14 at t = 999).
    tol = {"lcm": (2e-2, 1.5e-1), "tscd": (1.5e-2, 4e-2)}[loss_name]
    _check_on_device(run, device, tol, f"{loss_name} consistency loss")


# --------------------------------------------------------------------------------------------- 6. discriminators
@pytest.fixture(scope="module")
def tiny_unet64() -> nn.Module:
    pytest.importorskip("diffusers")
    from diffdistill.discriminators import tiny_sdxl_unet

    return tiny_sdxl_unet(seed=0).double().eval()


def _sdxl_inputs(unet: nn.Module, batch: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from diffdistill.discriminators import sdxl_conditions

    return sdxl_conditions(unet, batch, generator=_gen(seed))  # float32 draws on the CPU


def _to(value: object, dev: torch.device, dtype: torch.dtype) -> object:
    if isinstance(value, dict):
        return {k: _to(v, dev, dtype) for k, v in value.items()}
    assert isinstance(value, torch.Tensor)
    return value.to(dev, dtype)


@pytest.mark.parametrize("kind", ["unet_encoder", "unet_encoder_augmented", "multi_scale"])
def test_unet_discriminators(device: torch.device, tiny_unet64: nn.Module, kind: str) -> None:
    from diffdistill.discriminators import MultiScaleConditionalDiscriminator, UNetEncoderDiscriminator
    from diffdistill.losses import LatentAugment

    torch.manual_seed(0)
    if kind.startswith("unet_encoder"):
        # Training mode; the augmentation (one draw from the CPU generator for both inputs) acts only then.
        augment = LatentAugment("bg") if kind.endswith("augmented") else None
        disc_ref = UNetEncoderDiscriminator(
            tiny_unet64, conditional=True, head_channels=128, norm_groups=4, augment=augment
        ).double()
        disc_ref.train()
    else:
        disc_ref = MultiScaleConditionalDiscriminator(tiny_unet64, norm_groups=8).double().eval()
        with torch.no_grad():  # the z-conv and input convs start at zero: give them weights to test
            for conv in [disc_ref.noise_conv, *disc_ref.input_convs.values()]:
                nn.init.normal_(conv.weight, std=0.05)
    disc_dev = _device_copy(disc_ref, device)
    g = _gen(6)
    sample0, other0 = _randn(2, 4, 16, 16, generator=g), _randn(2, 4, 16, 16, generator=g)
    ehs0, added0 = _sdxl_inputs(tiny_unet64, 2, seed=7)

    def run(dev: torch.device, dtype: torch.dtype, autocast: bool) -> Results:
        disc = disc_ref if dtype == torch.float64 else disc_dev
        sample = sample0.to(dev, dtype).requires_grad_(True)
        other = other0.to(dev, dtype).requires_grad_(True)
        ehs, added = ehs0.to(dev, dtype), _to(added0, dev, dtype)
        with _autocast(dev, autocast):
            if kind.startswith("unet_encoder"):
                t_prev, t = torch.tensor([250, 100]), torch.tensor([500, 350])  # CPU timesteps
                logits = disc(
                    sample, t_prev, ehs, added, cond_sample=other, cond_timestep=t, generator=_gen(8)
                )
            else:
                logits = disc(sample, 0, ehs, added, noise=other)
            loss, _ = gan_generator_loss(logits)
        out = {f"logits:{i}": logit for i, logit in enumerate(logits)}
        out["logits:g_loss"] = (
            loss  # float64 for the float64 reference (heads keep float64), float32 otherwise
        )
        out |= _grads(loss, {"sample": sample, "other": other, "new_layers": list(disc.head_parameters())})
        return out

    # Measured on CPU, bf16 scaled errors (values, gradients): unet_encoder 4.5e-3, 1.8e-2; multi_scale
    # 1.5e-2, 2.2e-2; unet_encoder_augmented 2.8e-2, 3.1e-2 (the augmentation itself resamples in
    # float32 under autocast: test_latent_augment_under_autocast).
    tol = {"unet_encoder": (3e-2, 8e-2), "unet_encoder_augmented": (6e-2, 8e-2), "multi_scale": (6e-2, 1e-1)}[
        kind
    ]
    _check_on_device(run, device, tol, f"{kind} discriminator")


def test_latent_augment_under_autocast(device: torch.device) -> None:
    # The resampling runs in float32 outside the caller's bf16 autocast (it used to follow autocast: bf16
    # output, ~7% scaled error), and the colour draws are float32 for every data dtype, so the float64
    # reference replays the same draw.
    from diffdistill.losses import LatentAugment

    augment = LatentAugment("bgc")
    x = _randn(2, 4, 16, 16, generator=_gen(20))
    want = augment(x.double(), generator=_gen(8))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = augment(x.to(device), generator=_gen(8))
    assert got.dtype == torch.float32
    _compare({"augmented": got}, {"augmented": want}, DTYPE_TOLERANCES[torch.float32], "LatentAugment bf16")


# --------------------------------------------------------------------------------------------- 7. schedulers
@pytest.mark.parametrize("compute_dtype", [torch.float64, None])
def test_noise_schedule_math(device: torch.device, compute_dtype: torch.dtype | None) -> None:
    schedule = NoiseSchedule.from_betas(terminal_pure_noise=True, compute_dtype=compute_dtype)
    g = _gen(9)
    x00, eps0 = _randn(4, 4, 8, 8, generator=g), _randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([999, 600, 250, 0])  # stays on the CPU: the schedule moves it
    t_to = torch.tensor([750, 300, 0, -1])

    def run(dev: torch.device, dtype: torch.dtype, latents: torch.dtype) -> Results:
        x0 = x00.to(dev, dtype).requires_grad_(True)
        eps = eps0.to(dev, dtype)
        x_t = schedule.add_noise(x0.to(latents), eps.to(latents), t)
        pred = 0.9 * eps.to(latents)
        x0_hat = schedule.to_x0(pred, x_t, t)
        v = schedule.convert(pred, x_t, t, "epsilon", "v_prediction")
        moved = schedule.ddim_step(pred, t, x_t, t_to)
        out = {"x_t": x_t, "x0_hat": x0_hat, "v": v, "moved": moved}
        assert all(o.dtype == latents for o in out.values())  # results keep the latents' dtype
        total = sum((o if o.dtype == torch.float64 else o.float()).square().mean() for o in out.values())
        return out | _grads(total, {"x0": x0})

    want = run(CPU, torch.float64, torch.float64)
    _compare(run(device, torch.float32, torch.float32), want, F32_TOL, f"NoiseSchedule({compute_dtype})")
    with torch.autocast(device.type, dtype=torch.bfloat16):  # bf16 latents stay bf16 (elementwise math)
        got = run(device, torch.float32, torch.bfloat16)
    # Measured on CPU: scaled errors <= 1.9e-2 (x0 estimate: the bf16 rounding of x_t and of the prediction
    # is amplified by 1 / alpha_t = 14 at t = 999), 8.7e-3 (gradient).
    _compare(got, want, (8e-2, 8e-2), f"NoiseSchedule({compute_dtype}) bf16")
    assert torch.equal(want["x_t"][0], eps0[0].double())  # terminal pure noise at t = 999


def test_few_step_samplers(device: torch.device) -> None:
    torch.manual_seed(0)
    model_ref = TinyDenoiser(context_dim=6).double()
    model_dev = _device_copy(model_ref, device)
    schedule = NoiseSchedule.from_betas()
    g = _gen(15)
    noise0, ctx0 = _randn(2, 4, 8, 8, generator=g), _randn(2, 6, generator=g)
    steps = lcm_timesteps(4)
    drawn: dict[str, tuple[torch.Tensor, ...]] = {}

    def run(dev: torch.device, dtype: torch.dtype, autocast: bool) -> Results:
        model = model_ref if dtype == torch.float64 else model_dev
        x_t = noise0.to(dev, dtype)
        cond = {"context": ctx0.to(dev, dtype)}
        uncond = {"context": torch.zeros(2, 6, device=dev, dtype=dtype)}
        with _autocast(dev, autocast):
            ddim = ddim_sample(model, schedule, x_t, spaced_timesteps(4), cond=cond, uncond=uncond,
                               guidance_scale=4.0, grad=True)  # fmt: skip
            if dtype == torch.float64:  # float64 draws differ from float32 ones: replay the device's
                lcm = lcm_sample(model, schedule, x_t, steps, cond=cond, noises=drawn["noises"], grad=True)
            else:
                lcm = lcm_sample(model, schedule, x_t, steps, cond=cond, generator=_gen(16), grad=True)
                drawn["noises"] = tuple(z.double().cpu() for z in lcm.noises)
                assert all(z.device.type == dev.type for z in lcm.noises)
        loss = ddim.sample.square().mean() + lcm.sample.square().mean()
        out = {"sample:ddim": ddim.sample, "sample:lcm": lcm.sample}
        return out | _grads(loss, {"model": _trainable(model)})

    got = run(device, torch.float32, False)
    # The re-noising draws come from the CPU generator (float32, like x_t), whatever the device.
    replay = _gen(16)
    expected_noises = [_randn(2, 4, 8, 8, generator=replay) for _ in range(len(steps) - 1)]
    assert len(drawn["noises"]) == len(expected_noises)
    for z, e in zip(drawn["noises"], expected_noises):
        torch.testing.assert_close(z, e.double(), rtol=0, atol=0)
    want = run(CPU, torch.float64, False)
    _compare(got, want, F32_TOL, "samplers float32")
    got_bf16 = run(device, torch.float32, True)
    assert all(v.dtype == torch.float32 for k, v in got_bf16.items() if k.startswith("sample"))
    # Measured on CPU, bf16 scaled errors: samples <= 6.5e-3, gradients <= 6.7e-3.
    _compare(got_bf16, want, (3e-2, 3e-2), "samplers bf16")


# --------------------------------------------------------------------------------------------- 8. students
def test_lora_unet(device: torch.device) -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from diffdistill.discriminators import tiny_sdxl_unet
    from diffdistill.losses import pseudo_huber_distance
    from diffdistill.students import add_lora

    unet_ref = tiny_sdxl_unet(seed=0).double()
    torch.manual_seed(1)
    add_lora(unet_ref, rank=4, init_lora_weights=False)  # random A and B: the adapter is not a no-op
    trainable = [n for n, p in unet_ref.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float64 for p in unet_ref.parameters())
    unet_dev = _device_copy(unet_ref, device)
    g = _gen(17)
    x0, target0 = _randn(2, 4, 16, 16, generator=g), _randn(2, 4, 16, 16, generator=g)
    ehs0, added0 = _sdxl_inputs(unet_ref, 2, seed=18)

    def run(dev: torch.device, dtype: torch.dtype, autocast: bool) -> Results:
        unet = unet_ref if dtype == torch.float64 else unet_dev
        x = x0.to(dev, dtype).requires_grad_(True)
        ehs, added = ehs0.to(dev, dtype), _to(added0, dev, dtype)
        with _autocast(dev, autocast):
            t = torch.tensor([500, 20], device=dev)  # diffusers does not move a (B,) timestep tensor
            pred = unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
            if autocast:
                assert pred.dtype == torch.bfloat16  # the UNet really ran in bf16
            loss = pseudo_huber_distance(pred, target0.to(dev, dtype), c=0.1)
        out = {"loss:value": loss, "out:pred": pred}
        return out | _grads(loss, {"x": x, "lora": _trainable(unet)})

    # Measured on CPU, bf16 scaled errors: values <= 1.5e-2 (UNet prediction), gradients <= 2.9e-2.
    _check_on_device(run, device, (6e-2, 1.2e-1), "LoRA UNet")


def test_ema_update(device: torch.device) -> None:
    torch.manual_seed(0)
    net_ref = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 1))
    net_ref = net_ref.double()
    net_dev = _device_copy(net_ref, device)
    ema_ref, ema_dev = EMA(net_ref, decay=0.9, warmup="linear"), EMA(net_dev, decay=0.9, warmup="linear")
    assert all(t.device.type == device.type for t in ema_dev.state_dict().values())
    g = _gen(19)
    batch = _randn(4, 4, 8, 8, generator=g)
    for _ in range(4):  # a "training step": new weights and BN statistics, then the EMA update
        deltas = [0.1 * _randn(*p.shape, generator=g) for p in net_ref.parameters()]
        for net in (net_ref, net_dev):
            net.train()
            with torch.no_grad():
                for p, d in zip(net.parameters(), deltas):
                    p.add_(d.to(p.device, p.dtype))
                net(batch.to(next(net.parameters()).device, next(net.parameters()).dtype))
        assert ema_ref.update(net_ref) == ema_dev.update(net_dev)
    assert int(ema_dev.num_updates) == 4 and ema_dev.num_updates.device.type == device.type
    want = dict(ema_ref.state_dict())
    got = {k: v for k, v in ema_dev.state_dict().items() if k in want}
    floats = {k: v for k, v in want.items() if v.is_floating_point()}
    _compare({k: got[k] for k in floats}, floats, F32_TOL, "EMA float32")
    assert torch.equal(got["module.1.num_batches_tracked"].cpu(), want["module.1.num_batches_tracked"])
    # The averaged copy runs on the device, under autocast too.
    with torch.no_grad():
        y_ref = ema_ref(batch.double())
        y = ema_dev(batch.to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y_bf16 = ema_dev(batch.to(device))
    _compare({"y": y}, {"y": y_ref}, F32_TOL, "EMA forward float32")
    # Measured on CPU: scaled error 6.3e-3.
    _compare({"y": y_bf16}, {"y": y_ref}, (3e-2, 3e-2), "EMA forward bf16")
