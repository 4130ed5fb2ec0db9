"""LADD's discriminator on tiny SD3 / FLUX teachers: shapes, blocks, conditioning, every GAN loss and R1 variant,
gradients (heads and generator input, never the frozen teacher), float64 gradcheck of the head, bad inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffdistill._checks import DTypeError, OptionError, ShapeError
from diffdistill.discriminators import (
    DiscriminatorBase,
    LADDDiscriminator,
    LADDHead,
    ladd_renoise_sigma,
    noise_level_embedding,
)
from diffdistill.losses import approximate_r1_penalty, gan_discriminator_loss, gan_generator_loss, r1_penalty
from tests.transformer_configs import (
    tiny_flux_transformer,
    tiny_sd3_transformer,
)

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sd3() -> nn.Module:
    return tiny_sd3_transformer()


@pytest.fixture(scope="module")
def flux() -> nn.Module:
    return tiny_flux_transformer()


def sd3_batch(
    batch: int = 2, seed: int = 0, h: int = 8, w: int = 8
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    sigma = ladd_renoise_sigma(batch, generator=g)
    cond = {
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
        "pooled_projections": torch.randn(batch, 16, generator=g),
    }
    return x, 1000 * sigma, cond  # SD3 takes sigma * 1000


def flux_batch(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(3, 4, 3)
    ids[..., 1] = torch.arange(3)[:, None]
    ids[..., 2] = torch.arange(4)[None, :]
    cond = {
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
        "pooled_projections": torch.randn(batch, 16, generator=g),
        "img_ids": ids.reshape(12, 3),
        "txt_ids": torch.zeros(5, 3),
        "guidance": torch.full((batch,), 3.5),
        "grid_size": (3, 4),
    }
    return (
        torch.randn(batch, 12, 16, generator=g),
        ladd_renoise_sigma(batch, generator=g),
        cond,
    )  # FLUX takes sigma


def build(model: nn.Module, **kw) -> LADDDiscriminator:
    torch.manual_seed(1)
    return LADDDiscriminator(model, norm_groups=4, **kw)


# ----------------------------------------------------------------------------------------------- structure
def test_blocks_default_every_and_list(sd3, flux) -> None:
    assert build(sd3).blocks == tuple(f"transformer_blocks.{i}" for i in range(4))  # k = 4 // 4 = 1
    assert build(sd3, every=2).blocks == ("transformer_blocks.1", "transformer_blocks.3")
    assert build(flux, every=2).blocks == ("transformer_blocks.1", "single_transformer_blocks.1")
    assert build(flux, blocks=(0, "single_transformer_blocks.2")).blocks == (
        "transformer_blocks.0",
        "single_transformer_blocks.2",
    )
    assert build(flux).timestep_scale == 1000.0 and build(sd3).timestep_scale == 1.0
    assert build(sd3).pooled_dim == 16


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_shapes_dtype_params(kind, sd3, flux) -> None:
    model, (x, t, cond) = (sd3, sd3_batch()) if kind == "sd3" else (flux, flux_batch())
    disc = build(model, every=2)
    assert isinstance(disc, DiscriminatorBase)
    logits = disc(x, t, **cond)
    grid = (4, 4) if kind == "sd3" else (3, 4)
    assert [tuple(v.shape) for v in logits] == [(2, 1, *grid)] * 2
    assert all(v.dtype == torch.float32 for v in logits)
    # A shared frozen teacher is not part of the discriminator: only heads and the conditioning MLP are.
    assert {id(p) for p in disc.parameters()} == {id(p) for p in disc.head_parameters()}
    assert list(disc.backbone_parameters()) == []
    groups = disc.parameter_groups(head_lr=1e-4, backbone_lr=1e-5)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-4
    assert not any(k.startswith(("extractor", "model")) for k in disc.state_dict())


def test_own_lora_backbone_lists_only_trainable_params(flux) -> None:
    peft = pytest.importorskip("peft")
    model = copy.deepcopy(flux)
    model.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
    disc = build(model, backbone="own")
    groups = disc.parameter_groups(head_lr=1e-4, backbone_lr=1e-5)
    assert len(groups) == 2 and groups[1]["lr"] == 1e-5
    assert groups[1]["params"] and all("lora" in n for n, p in model.named_parameters() if p.requires_grad)


def test_conditioning_on_noise_level_and_pooled_text(sd3) -> None:
    disc = build(sd3, blocks=1)
    x, t, cond = sd3_batch(batch=1)
    feats = disc.extractor(x, timestep=t, **cond)
    with torch.no_grad():
        for head in disc.heads:
            nn.init.normal_(head.film.weight, std=0.5)
        base = disc(x, t, **cond)[0]
        # Same features (teacher run on the same timestep), other head condition: change the scale only.
        disc.timestep_scale = 0.5
        other_t = disc(x, t, **cond)[0]
        disc.timestep_scale = 1.0
        other_text = disc(x, t, **dict(cond, pooled_projections=cond["pooled_projections"] + 1))[0]
    assert not torch.allclose(base, other_t) and not torch.allclose(base, other_text)
    assert feats["transformer_blocks.1"].shape == (1, 16, 4, 4)


def test_reset_head_zeroes_film(sd3) -> None:
    disc = build(sd3, blocks=0)
    head = disc.heads[0]
    nn.init.normal_(head.film.weight)
    before = head.conv1.weight.clone()
    disc.reset_head()
    assert head.film.weight.abs().sum() == 0 and head.film.bias.abs().sum() == 0
    assert not torch.equal(before, head.conv1.weight)


def test_built_on_backbone_device(sd3) -> None:
    disc = LADDDiscriminator(copy.deepcopy(sd3).to("meta"), blocks=0, norm_groups=4)
    assert {p.device.type for p in disc.parameters()} == {"meta"}


def test_heads_float32_under_bf16_autocast(sd3) -> None:
    disc = build(sd3, every=2)
    x, t, cond = sd3_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = disc(x.to(torch.bfloat16), t, **cond)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in logits)


# ----------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("loss", ["hinge", "non_saturating", "least_squares"])
def test_gan_losses_train_heads_and_generator_not_teacher(kind, loss, sd3, flux) -> None:
    model, (x, t, cond) = (sd3, sd3_batch()) if kind == "sd3" else (flux, flux_batch())
    disc = build(model, every=2)
    # Discriminator step: real and detached fake.
    real, fake = x, (x.flip(0) * 0.5).detach()
    d_loss, logs = gan_discriminator_loss(disc(real, t, **cond), disc(fake, t, **cond), loss=loss)
    d_loss.backward()
    assert torch.isfinite(d_loss) and set(logs)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in disc.parameters())
    assert any(p.grad.abs().sum() > 0 for p in disc.heads.parameters())
    assert all(p.grad is None for p in model.parameters())
    # Generator step: the gradient reaches the generator's output through the frozen teacher.
    disc.zero_grad(set_to_none=True)
    gen_out = (x * 0.5).requires_grad_(True)
    g_loss, _ = gan_generator_loss(disc(gen_out, t, **cond), loss=loss)
    g_loss.backward()
    assert gen_out.grad is not None and torch.isfinite(gen_out.grad).all() and gen_out.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_r1_penalty_exact(kind, sd3, flux) -> None:
    model, (x, t, cond) = (sd3, sd3_batch()) if kind == "sd3" else (flux, flux_batch())
    disc = build(model, every=2)
    real = x.clone().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):  # double backward through the teacher's attention
        penalty, logs = r1_penalty(disc(real, t, **cond), real, gamma=0.1)
        penalty.backward()
    assert torch.isfinite(penalty) and penalty > 0 and torch.isfinite(logs["r1_grad_sq"])
    # Every head weight gets a finite gradient (a logit's constant bias does not move grad_x D: no gradient).
    assert all(h.conv1.weight.grad is not None and h.conv2.weight.grad is not None for h in disc.heads)
    grads = [p.grad for p in disc.heads.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters())


def test_r1_exact_same_with_gradient_checkpointing(flux) -> None:
    x, t, cond = flux_batch()
    out = []
    for ckpt in (False, True):
        disc = build(flux, every=2, gradient_checkpointing=ckpt)
        real = x.clone().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):
            penalty, _ = r1_penalty(disc(real, t, **cond), real)
            penalty.backward()
        out.append((penalty.detach(), [p.grad for p in disc.parameters() if p.grad is not None]))
    torch.testing.assert_close(out[0][0], out[1][0])
    assert len(out[0][1]) == len(out[1][1]) > 0
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_approximate_r1_penalty(kind, sd3, flux) -> None:
    model, (x, t, cond) = (sd3, sd3_batch()) if kind == "sd3" else (flux, flux_batch())
    disc = build(model, every=2)
    sigma = 0.01
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    penalty, _ = approximate_r1_penalty(
        disc(x, t, **cond), disc(x + sigma * eps, t, **cond), sigma=sigma, gamma=0.1
    )
    penalty.backward()
    assert torch.isfinite(penalty) and penalty > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in disc.heads.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_approximate_r1_tracks_exact_r1_float64(sd3) -> None:
    """Both penalties estimate the same ||grad_x D||^2: on a float64 discriminator they agree to O(sigma^2)."""
    model = copy.deepcopy(sd3).double()
    disc = build(model, blocks=1).double()
    x, t, cond = sd3_batch(batch=1)
    x, cond = x.double(), {k: v.double() for k, v in cond.items()}
    real = x.clone().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        exact, _ = r1_penalty(disc(real, t, **cond), real)
    g = torch.Generator().manual_seed(0)
    approx = torch.stack(
        [
            approximate_r1_penalty(
                disc(x, t, **cond),
                disc(x + 1e-4 * torch.randn(x.shape, generator=g, dtype=x.dtype), t, **cond),
                sigma=1e-4,
            )[0].detach()
            for _ in range(64)
        ]
    ).mean()
    assert exact.dtype == torch.float64
    assert abs(approx.item() - exact.item()) < 0.35 * exact.item()  # Monte-Carlo over 64 directions


# ----------------------------------------------------------------------------------------------- numerics
def test_head_gradcheck_float64() -> None:
    torch.manual_seed(0)
    head = LADDHead(6, 5, channels=4, norm_groups=2).double()
    nn.init.normal_(head.film.weight, std=0.3)
    feats = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(head, (feats, cond))


def test_head_matches_its_formula_float64() -> None:
    torch.manual_seed(0)
    head = LADDHead(3, 2, channels=4, norm_groups=2).double()
    nn.init.normal_(head.film.weight)
    x, e = torch.randn(1, 3, 2, 2, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    f = torch.nn.functional
    h = f.silu(
        f.group_norm(
            f.conv2d(x, head.conv1.weight, head.conv1.bias, padding=1), 2, head.norm1.weight, head.norm1.bias
        )
    )
    gb = e @ head.film.weight.T + head.film.bias
    h = h * (1 + gb[:, :4, None, None]) + gb[:, 4:, None, None]
    h = f.silu(
        f.group_norm(
            f.conv2d(h, head.conv2.weight, head.conv2.bias, padding=1), 2, head.norm2.weight, head.norm2.bias
        )
    )
    phi = e @ head.project.weight.T + head.project.bias
    ref = f.conv2d(h, head.out.weight, head.out.bias) + (h * phi[:, :, None, None]).sum(1, keepdim=True) / 2.0
    torch.testing.assert_close(head(x, e), ref)


def test_discriminator_gradcheck_float64_wrt_input(sd3) -> None:
    model = copy.deepcopy(sd3).double()
    disc = build(model, blocks=0).double()
    for head in disc.heads:
        nn.init.normal_(head.film.weight, std=0.3)
    x, t, cond = sd3_batch(batch=1, h=4, w=4)
    cond = {k: v.double() for k, v in cond.items()}
    x = x.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: disc(s, t, **cond)[0], (x,))


def test_noise_level_embedding_formula() -> None:
    t = torch.tensor([0.0, 1.0, 250.0, 999.0], dtype=torch.float64)
    emb = noise_level_embedding(t, 8)
    for b, tb in enumerate(t.tolist()):
        for i in range(4):
            w = 10000 ** (-i / 4)
            assert math.isclose(emb[b, i].item(), math.cos(tb * w), abs_tol=1e-12)
            assert math.isclose(emb[b, 4 + i].item(), math.sin(tb * w), abs_tol=1e-12)
    assert noise_level_embedding(torch.tensor([3, 4])).dtype == torch.float32


def test_renoise_sigma_is_a_high_noise_logit_normal() -> None:
    g = torch.Generator().manual_seed(0)
    sigma = ladd_renoise_sigma(200_000, generator=g)
    assert sigma.dtype == torch.float32 and sigma.shape == (200_000,)
    assert (sigma > 0).all() and (sigma < 1).all()
    logit = torch.logit(sigma.double())
    assert abs(logit.mean().item() - 1.0) < 0.01 and abs(logit.std().item() - 1.0) < 0.01
    assert (sigma > 0.5).float().mean() > 0.8  # P(N(1, 1) > 0) = 0.841
    shifted = torch.logit(ladd_renoise_sigma(200_000, mean=-0.6, std=2.0, generator=g).double())
    assert abs(shifted.mean().item() + 0.6) < 0.02 and abs(shifted.std().item() - 2.0) < 0.02
    a = ladd_renoise_sigma(4, generator=torch.Generator().manual_seed(3))
    b = ladd_renoise_sigma(4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert ladd_renoise_sigma(3, mean=40.0, eps=1e-3).max() == pytest.approx(1 - 1e-3)


# ----------------------------------------------------------------------------------------------- errors
def test_bad_options(sd3) -> None:
    with pytest.raises(OptionError, match=r"Pass either `blocks` or `every`, not both"):
        LADDDiscriminator(sd3, blocks=1, every=2, norm_groups=4)
    with pytest.raises(OptionError, match=r"Expected `every` <= the model's 4 blocks, but got 5"):
        LADDDiscriminator(sd3, every=5, norm_groups=4)
    with pytest.raises(
        OptionError, match=r"Expected the default head width min\(C, 256\) \(16\) to be divisible by"
    ):
        LADDDiscriminator(sd3, every=2)  # norm_groups 32 does not divide the tiny width 16
    with pytest.raises(OptionError, match=r"Expected `timestep_scale` to be > 0"):
        LADDDiscriminator(sd3, every=2, norm_groups=4, timestep_scale=0.0)
    with pytest.raises(OptionError, match=r"Expected `every` to be an int >= 1"):
        LADDDiscriminator(sd3, every=0, norm_groups=4)
    with pytest.raises(DTypeError, match=r"Expected `augment` to be a module"):
        LADDDiscriminator(sd3, every=2, norm_groups=4, augment="bgc")
    with pytest.raises(OptionError, match=r"Expected `dim` to be even"):
        noise_level_embedding(torch.zeros(2), 5)
    with pytest.raises(ShapeError, match=r"Expected `noise_level` of shape \(B,\)"):
        noise_level_embedding(torch.zeros(2, 1))
    with pytest.raises(OptionError, match=r"Expected `std` to be > 0"):
        ladd_renoise_sigma(2, std=0.0)
    with pytest.raises(DTypeError, match=r"Expected `generator` to be a torch.Generator or None"):
        ladd_renoise_sigma(2, generator=0)
    with pytest.raises(OptionError, match=r"Expected `batch` to be an int >= 1"):
        ladd_renoise_sigma(0)


def test_bad_inputs(sd3) -> None:
    disc = build(sd3, every=2)
    x, t, cond = sd3_batch()
    with pytest.raises(ValueError, match=r"`pooled_projections` is None"):
        disc(x, t, encoder_hidden_states=cond["encoder_hidden_states"])
    with pytest.raises(ShapeError, match=r"Expected `pooled_projections` of shape \(2, 16\)"):
        disc(x, t, **dict(cond, pooled_projections=cond["pooled_projections"][:, :8]))
    with pytest.raises(ShapeError, match=r"Expected `timestep` to be a number, a 0-d tensor"):
        disc(x, torch.ones(3), **cond)
    with pytest.raises(
        ShapeError, match=r"Expected `hidden_states` laid out as \(B, C, H, W\) to have the model's 4"
    ):
        disc(x[:, :2], t, **cond)
    head = LADDHead(4, 3, norm_groups=2)
    with pytest.raises(ShapeError, match=r"Expected `cond` of shape \(2, 3\)"):
        head(torch.randn(2, 4, 2, 2), torch.randn(2, 4))
    with pytest.raises(ShapeError, match=r"Expected `features` of shape \(B, 4, H, W\)"):
        head(torch.randn(2, 5, 2, 2), torch.randn(2, 3))


def test_benchmark_transformer_rows_smoke() -> None:
    """``benchmarks/discriminators.py --transformer`` runs (tiny configs, FLOPs on the meta device)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "discriminators.py"
    spec = importlib.util.spec_from_file_location("_bench_discriminators", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for kind in ("sd3", "flux", "wan"):
        table = bench.transformer_main(bench.parse_args(["--transformer", kind, "--flops", "--every", "2"]))
        rows = [line for line in table.splitlines() if line.startswith("| LADD D (backbone + heads)")]
        assert len(rows) == 1 and float(rows[0].split("|")[4]) > 1.0  # the heads cost something
    table = bench.transformer_main(
        bench.parse_args(["--transformer", "wan", "--flops", "--blocks", "0", "2"])
    )
    assert "reads 2 blocks ['blocks.0', 'blocks.2']" in table and "3x4x4 video tokens" in table
