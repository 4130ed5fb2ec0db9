"""Guidance rescales of the teacher: Lin et al.'s std rescale (diffusers' ``guidance_rescale``) and Qwen-Image's
true-CFG renormalisation, as functions and inside :class:`TeacherSolver`.

References: diffusers 0.42.1 ``rescale_noise_cfg`` (the SD / SDXL pipelines) and ``QwenImagePipeline.__call__``'s
``comb_pred * (||noise_pred|| / ||comb_pred||)`` over the last dimension of its packed tokens
(``QwenImagePipeline._pack_latents``: 2x2 patches of every channel).
"""

from __future__ import annotations

import functools

import pytest
import torch

from diffdistill.errors import DTypeError, OptionError, ShapeError
from diffdistill.schedulers import (
    NoiseSchedule,
    TeacherSolver,
    apply_guidance,
    rescale_guidance_norm,
    rescale_guidance_std,
)

diffusers_sdxl = pytest.importorskip("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl")
from diffusers import QwenImagePipeline  # noqa: E402


def _pair(shape=(3, 4, 6, 8), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(shape, generator=g, dtype=dtype)
    uncond = torch.randn(shape, generator=g, dtype=dtype)
    return cond, apply_guidance(cond, uncond, 4.5)


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("shape", [(3, 4, 6, 8), (2, 16, 3, 4, 4)])
def test_std_rescale_is_diffusers_rescale_noise_cfg(phi, shape):
    cond, guided = _pair(shape)
    want = diffusers_sdxl.rescale_noise_cfg(guided.clone(), cond.clone(), guidance_rescale=phi)
    torch.testing.assert_close(rescale_guidance_std(guided, cond, phi), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 16, 4, 6), (1, 3, 8, 2)])
def test_norm_rescale_is_qwen_image_true_cfg_on_packed_tokens(shape):
    """Ours on unpacked latents, packed with the pipeline's own ``_pack_latents``, equals the pipeline's
    formula on its packed tokens (packing is a bijection, so the unpacked results agree too)."""
    cond, guided = _pair(shape)
    b, c, h, w = shape
    pack = functools.partial(
        QwenImagePipeline._pack_latents, batch_size=b, num_channels_latents=c, height=h, width=w
    )
    cond_p, guided_p = pack(cond), pack(guided)
    want = guided_p * (torch.norm(cond_p, dim=-1, keepdim=True) / torch.norm(guided_p, dim=-1, keepdim=True))
    torch.testing.assert_close(
        pack(rescale_guidance_norm(guided, cond, patch_size=2)), want, rtol=1e-12, atol=1e-12
    )


def test_norm_rescale_per_position_on_any_rank():
    cond, guided = _pair((2, 5, 3, 4, 4))
    got = rescale_guidance_norm(guided, cond)
    # every position's channel vector has the conditional norm and the guided direction
    torch.testing.assert_close(torch.linalg.vector_norm(got, dim=1), torch.linalg.vector_norm(cond, dim=1))
    cosine = torch.nn.functional.cosine_similarity(got, guided, dim=1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))


def test_rescales_gradcheck():
    cond, guided = _pair((2, 3, 4, 4))
    for fn in (
        lambda g, c: rescale_guidance_std(g, c, 0.7),
        lambda g, c: rescale_guidance_norm(g, c, patch_size=2),
        rescale_guidance_norm,
    ):
        assert torch.autograd.gradcheck(fn, (guided.clone().requires_grad_(), cond.clone().requires_grad_()))


def test_bf16_outputs_keep_their_dtype():
    cond, guided = _pair((2, 4, 4, 4), dtype=torch.float32)
    for fn in (rescale_guidance_std, rescale_guidance_norm):
        out = fn(guided.bfloat16(), cond.bfloat16())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), fn(guided, cond), rtol=2**-7, atol=2**-7)


class TwoPassModel:
    """A conditional velocity model: v = x * a + b, recording its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t, a, b):
        self.calls += 1
        return x * a + b + 0 * t.view(-1, *(1,) * (x.ndim - 1))


def _solver_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    cond = {
        "a": torch.full((2, 1, 1, 1), 0.9, dtype=torch.float64),
        "b": torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64),
    }
    uncond = {
        "a": torch.full((1, 1, 1, 1), 0.4, dtype=torch.float64),
        "b": torch.zeros(1, 4, 4, 4, dtype=torch.float64),
    }
    return x, cond, uncond


@pytest.mark.parametrize(
    ("rescale", "reference"),
    [
        (0.7, lambda g, c: diffusers_sdxl.rescale_noise_cfg(g, c, guidance_rescale=0.7)),
        (functools.partial(rescale_guidance_norm, patch_size=2), lambda g, c: rescale_guidance_norm(g, c, 2)),
    ],
)
def test_teacher_solver_rescales_each_guided_prediction(rescale, reference):
    schedule = NoiseSchedule.flow_matching(shift=3.0)
    x, cond, uncond = _solver_inputs()
    model = TwoPassModel()
    solver = TeacherSolver(model, schedule, guidance_scale=4.0, guidance_rescale=rescale)
    got = solver.predict(x, 500, cond, uncond)
    c = x * cond["a"] + cond["b"]
    u = x * uncond["a"] + uncond["b"]
    torch.testing.assert_close(got, reference(apply_guidance(c, u, 4.0), c), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, apply_guidance(c, u, 4.0))  # the rescale did something
    # a no-op scale runs the conditional pass alone and leaves it as it is (the pipelines rescale only CFG)
    torch.testing.assert_close(solver.predict(x, 500, cond, uncond, guidance_scale=1.0), c, rtol=0, atol=0)


def test_bad_rescales_are_refused():
    schedule = NoiseSchedule.flow_matching(shift=3.0)
    with pytest.raises(OptionError, match=r"`guidance_rescale` to be <= 1"):
        TeacherSolver(TwoPassModel(), schedule, guidance_rescale=1.5)
    with pytest.raises(DTypeError, match="guidance_rescale"):
        TeacherSolver(TwoPassModel(), schedule, guidance_rescale="norm")
    with pytest.raises(OptionError, match=r"guidance-distilled model \(guidance_input='guidance'\).*drop"):
        TeacherSolver(TwoPassModel(), schedule, guidance_input="guidance", guidance_rescale=0.7)
    x, cond, uncond = _solver_inputs()
    bad = TeacherSolver(TwoPassModel(), schedule, guidance_scale=3.0, guidance_rescale=lambda g, c: g[:, :1])
    with pytest.raises(ShapeError, match="guidance_rescale"):
        bad.predict(x, 10, cond, uncond)
    cond_t, guided = _pair((2, 3, 5, 4))
    with pytest.raises(ShapeError, match=r"divisible by patch_size=2"):
        rescale_guidance_norm(guided, cond_t, patch_size=2)
    with pytest.raises(ShapeError, match=r"`guided`.*`cond_out`"):
        rescale_guidance_std(guided, cond_t[:, :2])
    with pytest.raises(ShapeError, match="at least 2 values per sample"):
        rescale_guidance_std(torch.ones(3, 1), torch.ones(3, 1))
    with pytest.raises(OptionError, match="`patch_size`"):
        rescale_guidance_norm(guided, cond_t, patch_size=0)


def test_norm_rescale_packed_is_the_pipelines_formula_on_packed_tokens():
    """``packed=True`` on the transformer's packed tokens (B, L, 4C) is QwenImagePipeline's
    ``comb_pred * (norm(noise_pred, dim=-1) / norm(comb_pred, dim=-1))``, and equals the unpacked patch_size=2
    path after packing; the default refuses the 3-D packed layout instead of normalising across tokens
    (audit 10, defect 4)."""
    b, c, h, w = 2, 16, 4, 6
    cond, guided = _pair((b, c, h, w))
    pack = functools.partial(
        QwenImagePipeline._pack_latents, batch_size=b, num_channels_latents=c, height=h, width=w
    )
    cond_p, guided_p = pack(cond), pack(guided)
    want = guided_p * (torch.norm(cond_p, dim=-1, keepdim=True) / torch.norm(guided_p, dim=-1, keepdim=True))
    got = rescale_guidance_norm(guided_p, cond_p, packed=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        got, pack(rescale_guidance_norm(guided, cond, patch_size=2)), rtol=1e-12, atol=1e-12
    )
    assert torch.autograd.gradcheck(
        functools.partial(rescale_guidance_norm, packed=True),
        (guided_p[:1, :3].clone().requires_grad_(), cond_p[:1, :3].clone().requires_grad_()),
    )
    with pytest.raises(ShapeError, match=r"3-D shape \(2, 6, 64\), the layout of packed tokens.*packed=True"):
        rescale_guidance_norm(guided_p, cond_p)
    with pytest.raises(OptionError, match=r"`packed=True` takes packed tokens.*patch_size=2"):
        rescale_guidance_norm(guided_p, cond_p, patch_size=2, packed=True)
    with pytest.raises(DTypeError, match="`packed`"):
        rescale_guidance_norm(guided_p, cond_p, packed=1)
