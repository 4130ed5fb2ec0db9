"""Tests of examples/flow_tscd.py (Hyper-SD's TSCD on SD3 / FLUX) on tiny pipelines: the script's loss is zero
for a student equal to the (guided) teacher, 2-step smoke runs with exact resume and the LoRA loaded by the
diffusers pipeline, a full-transformer run on image-caption data, 2-process DDP vs FSDP2 (MSE and hybrid
distances), option checks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from diffdistill.schedulers import NoiseSchedule, TeacherSolver, TimestepSample, tscd_segments
from tests.examples.flow_scripts import deterministic_runs, flow_encoding, flow_models, flow_tscd  # noqa: F401 (autouse fixture)
from tests.examples.tiny_flow import (
    IMAGE_SIZE,
    T5_LENGTH,
    smoke_argv,
    write_tiny_flow_models,
)
from tests.state_compare import assert_same_update


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_flow_models(
        tmp_path_factory.mktemp("tiny_flow_tscd"),
        prompts="a photo of a cat\nan astronaut riding a horse\n",
        captions=["a red square", "a blue circle", ""],
    )


def _argv(tiny: dict[str, Path], family: str, out: Path, *extra: str, data: str = "prompts") -> list[str]:
    # the tiny heads' norm groups, where a discriminator is trained (MSE-only runs refuse its options)
    mse = "mse" in extra or "--num_segments" in extra
    heads = [] if mse else ["--discriminator_norm_groups", "4"]
    return smoke_argv(tiny, family, out, *heads, *extra, data=data)


def _lora(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------------ the loss: zero for student == teacher
class StraightTransformer(nn.Module):
    """A stand-in for an SD3 / FLUX transformer whose flow ODE has straight paths (reference/flow.md Sec. 1).

    It predicts ``x0_hat = K x + b`` with ``K`` a projection (keep the first half of the features: channels
    for SD3's ``(B, C, h, w)``, packed features for FLUX's ``(B, L, 64)``) and ``b = mean(pooled) (1 + guidance)``
    in its null space, i.e. ``v = (x - x0_hat) / sigma``. Along an Euler step ``x' = x + (s' - s) v`` the
    prediction stays ``x0_hat`` (``K x' = K x`` since ``K (x - x0_hat) = 0``), so every Euler path is the straight
    line to ``x0_hat`` and a student equal to the (guided) teacher is exactly consistent for every ``t_end``.
    ``sigma`` is read as the pipelines hand it (SD3: ``timestep / 1000``; FLUX: ``timestep`` itself), so a script
    that fed another timestep would break the zero. ``cfg`` = ``(uncond pooled, w)`` makes it the CFG-guided
    model ``u + w (c - u)`` (affine in ``b``: ``b = b_u + w (b_c - b_u)``).
    """

    def __init__(self, family: str, cfg: tuple[torch.Tensor, float] | None = None) -> None:
        super().__init__()
        self.family, self.cfg = family, cfg
        self.config = SimpleNamespace(guidance_embeds=family == "flux")

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        pooled_projections: torch.Tensor,
        guidance: torch.Tensor | None = None,
        return_dict: bool = False,
        **_: Any,
    ) -> tuple[torch.Tensor]:
        x = hidden_states.double()
        b = pooled_projections.double().mean(-1)
        if self.cfg is not None:
            u, w = self.cfg
            b = u.double().mean(-1) + w * (b - u.double().mean(-1))
        if guidance is not None:
            b = b * (1 + guidance.double())
        if self.family == "sd3":  # (B, C, h, w): channels
            sigma, feature_dim = timestep.double() / 1000, 1
        else:  # (B, L, 64) packed tokens: the features
            sigma, feature_dim = timestep.double(), -1
        n = x.shape[feature_dim]
        keep = (torch.arange(n) < n // 2).to(x)
        shape = [1] * x.ndim
        shape[feature_dim] = n
        keep = keep.view(shape)
        b = b.view(-1, *([1] * (x.ndim - 1)))
        x0 = keep * x + (1 - keep) * b
        sigma = sigma.view(-1, *([1] * (x.ndim - 1)))
        return ((x - x0) / sigma,)


def _loss_case(family: str, schedule: NoiseSchedule) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    b = 3
    x_t = torch.randn(b, 16, 8, 8, generator=g, dtype=torch.float64)
    cond = {
        "encoder_hidden_states": torch.randn(b, 4, 8, generator=g),
        "pooled_projections": torch.rand(b, 6, generator=g),
    }
    sample = tscd_segments(b, 4, 50, 1000, generator=g)
    return {"x_t": x_t, "cond": cond, "sample": sample, "uncond_pooled": -torch.rand(1, 6, generator=g)}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_student_equal_to_teacher_gives_zero_tscd_loss(family: str) -> None:
    """Through the script's loss (``tscd_sides`` + ``tscd_mse``): SD3 with CFG (w = 4) against the encoded-empty
    uncond, FLUX.1-dev with its embedded guidance (3.5) fed to teacher and student; random t_end in each segment.

    Tolerance: the model reads sigma from a float32 timestep (1000 sigma, or sigma for FLUX) while the moves use
    the schedule's float64 sigma: a relative error ~6e-8 of the move, whose squared effect on O(1) latents is
    ~1e-14; 1e-10 is far above that and far below the non-vacuous cases (> 1e-6)."""
    schedule = NoiseSchedule.flow_matching(shift=3.0, timestep_scale=1000.0)
    case = _loss_case(family, schedule)
    sample: TimestepSample = case["sample"]
    assert bool((sample.t_end < sample.t_prev).any())  # t_end strictly inside the segment: real moves
    if family == "sd3":
        w, uncond = (
            4.0,
            {"encoder_hidden_states": torch.zeros(1, 4, 8), "pooled_projections": case["uncond_pooled"]},
        )
        teacher_net = flow_models.FlowDenoiser(StraightTransformer("sd3"), "sd3")
        student = flow_models.FlowDenoiser(StraightTransformer("sd3", cfg=(case["uncond_pooled"], w)), "sd3")
        teacher, guidance_input = TeacherSolver(teacher_net, schedule, prediction_type="flow"), False
        off = flow_models.FlowDenoiser(
            StraightTransformer("sd3"), "sd3"
        )  # the unguided model: not the target
    else:
        w, uncond = 3.5, None
        teacher_net = flow_models.FlowDenoiser(StraightTransformer("flux"), "flux", guidance=3.5)
        student = flow_models.FlowDenoiser(StraightTransformer("flux"), "flux", guidance=3.5)
        teacher = TeacherSolver(teacher_net, schedule, prediction_type="flow", guidance_input="guidance")
        guidance_input = True

    def loss(net: Any, omega: Any, target: Any = "online") -> float:
        pair = flow_tscd.tscd_sides(
            net, target, teacher, case["x_t"], sample, case["cond"], uncond, omega, guidance_input
        )
        assert float(pair.target.norm()) > 1.0  # the comparison is not between zeros
        return float(flow_tscd.tscd_mse(pair))

    assert loss(student, w) < 1e-10
    assert loss(student, w, target=student) < 1e-10  # a callable target (the EMA's role)
    if family == "sd3":
        assert loss(off, w) > 1e-6  # a student without the teacher's CFG
    else:
        # The student gets the teacher's omega as its guidance input: any omega is consistent ...
        assert loss(student, torch.tensor([2.0, 3.5, 5.0])) < 1e-10
        # ... and a student that ignored it (always 3.5) is not.
        fixed = flow_models.FlowDenoiser(StraightTransformer("flux"), "flux", guidance=3.5)

        def ignores_guidance(x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
            cond.pop("guidance")
            return fixed(x, t, **cond)

        assert loss(ignores_guidance, 2.0) > 1e-6  # the teacher at guidance 2


def test_tiny_flux_student_equal_to_teacher_matches_the_teacher_step() -> None:
    """The tiny (non-straight) FLUX.1-dev transformer as teacher and student: where ``t_end = t_{n-1}`` the loss
    compares the student's Euler step with the teacher's (both the same call), so it is zero up to float32
    rounding of the two calls: bounded by 1e-10 of the target's mean square."""
    from diffusers import FluxTransformer2DModel

    from tests.transformer_configs import tiny_flux_transformer_config

    torch.manual_seed(0)
    net = FluxTransformer2DModel(**tiny_flux_transformer_config(in_channels=64, guidance_embeds=True)).eval()
    schedule = NoiseSchedule.flow_matching(shift=3.0, timestep_scale=1000.0)
    denoiser = flow_models.FlowDenoiser(net, "flux", guidance=3.5)
    teacher = TeacherSolver(denoiser, schedule, prediction_type="flow", guidance_input="guidance")
    g = torch.Generator().manual_seed(1)
    width = net.config.joint_attention_dim
    cond = {
        "encoder_hidden_states": torch.randn(2, 4, width, generator=g),
        "pooled_projections": torch.randn(2, net.config.pooled_projection_dim, generator=g),
    }
    s = tscd_segments(2, 4, 50, 1000, generator=g)
    sample = TimestepSample(s.t, s.t_prev, s.t_prev)
    x_t = torch.randn(2, 16, 8, 8, generator=g)
    with torch.no_grad():
        pair = flow_tscd.tscd_sides(denoiser, "online", teacher, x_t, sample, cond, None, 3.5, True)
        mse = float(flow_tscd.tscd_mse(pair))
        other = flow_tscd.tscd_sides(denoiser, "online", teacher, x_t, sample, cond, None, 5.0, True)
        moved = float(((other.student - pair.student) ** 2).mean())
    assert mse <= 1e-10 * float(pair.target.pow(2).mean()), mse
    assert moved > 1e-8  # the guidance input reaches the student (the check above compares something)


# ------------------------------------------------------------------------------------------ script runs
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_tscd_lora_resumes_exactly_and_loads_in_the_pipeline(
    family: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    """Stages 8 -> 4 -> 2 -> 1 over 2 steps: step 1 in k = 8 (MSE), step 2 in k = 2 (2/3 adversarial: the LADD
    heads train); prompt-only data (teacher-noised states), EMA target, gradient checkpointing, validation grids."""
    lora = ["--use_lora", "--lora_rank", "4", "--gradient_checkpointing"]
    val = ["--validation_prompts", "a cat", "--validation_steps", "1"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    flow_tscd.main(flow_tscd.parse_args(_argv(tiny, family, out_a, *lora, *val)))
    assert sorted(p.name for p in (out_a / "samples").iterdir()) == ["step-1.png", "step-2.png"]
    grid = json.loads((out_a / flow_tscd.GRID_FILE).read_text())
    assert grid["num_inference_steps"] == 2 and grid["pipeline_sigmas"] == [1.0, 0.5]
    assert grid["guidance"] == (
        3.5 if family == "flux" else 1.0
    )  # unguided; FLUX.1-dev: its embedded guidance
    record = json.loads((out_a / "student_sampler.json").read_text())  # what evaluate.py samples with
    assert record["guidance_scale"] == grid["guidance"] and record["max_sequence_length"] == T5_LENGTH
    assert record["grid_size"] == (
        [IMAGE_SIZE, IMAGE_SIZE] if family == "flux" else None
    )  # FLUX's dynamic shift
    resume = ["--resume_from_checkpoint", str(out_a / "checkpoint-1")]
    flow_tscd.main(flow_tscd.parse_args(_argv(tiny, family, out_b, *lora, *resume)))
    a, b = (_lora(o / "pytorch_lora_weights.safetensors") for o in (out_a, out_b))
    step1 = {
        "transformer." + k: v for k, v in _lora(out_a / "checkpoint-1" / "unet_lora.safetensors").items()
    }
    assert a.keys() == b.keys() == step1.keys() and all(k.startswith("transformer.") for k in a)
    assert any(not torch.equal(step1[k], b[k]) for k in b), "the resumed run did not train"
    assert_same_update(b, a, step1, what="resumed vs uninterrupted LoRA")
    # The EMA target is in the checkpoint (2 steps cannot tell a lost target from a restored one: its step-1
    # average moves the target by 5 % of one update): after one update of decay 0.95 from B = 0 (peft's init),
    # every lora_B of the average is 0.05 x the student's.
    target = torch.load(out_a / "checkpoint-1" / "custom_checkpoint_0.pkl", weights_only=True)
    assert int(target["num_updates"]) == 1
    b_keys = [k for k in step1 if ".lora_B." in k]
    assert b_keys and any(step1[k].abs().max() > 0 for k in b_keys)
    for k in b_keys:
        name = "module." + k.removeprefix("transformer.").replace(".lora_B.weight", ".lora_B.default.weight")
        torch.testing.assert_close(target[name], 0.05 * step1[k], rtol=1e-5, atol=0)

    # The pipeline, with its own scheduler given the grid's pipeline sigmas, samples what the script's
    # validation sampler does on the shifted sigmas with the same LoRA (FLUX.1-dev: guidance 3.5 as input).
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from diffdistill.students import load_lora

    pipe = (StableDiffusion3Pipeline if family == "sd3" else FluxPipeline).from_pretrained(str(tiny[family]))
    pipe.load_lora_weights(str(out_a))
    args = flow_tscd.parse_args(_argv(tiny, family, out_a))
    parts = flow_models.load_flow(args)
    guidance = 3.5 if family == "flux" else None
    noise = torch.randn(
        flow_models.latent_shape(parts, 1, IMAGE_SIZE), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        got = pipe(
            "a cat",
            sigmas=grid["pipeline_sigmas"],
            guidance_scale=guidance or 1.0,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            latents=flow_models.pack_latents(noise) if family == "flux" else noise,
            max_sequence_length=T5_LENGTH,
            output_type="latent",
        ).images
        student = load_lora(
            parts.transformer, out_a / "pytorch_lora_weights.safetensors", prefix="transformer"
        )
        cond = flow_encoding.conditions(parts, ["a cat"], args, "cpu", torch.float32)
        want = flow_models.euler_sample(
            flow_models.FlowDenoiser(student, family, guidance), noise, grid["sigmas"], cond
        )
    if family == "flux":
        got = flow_models.unpack_latents(got, *noise.shape[-2:])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_tscd_full_flux_transformer_on_images_with_guidance_range(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """The whole FLUX.1-dev transformer on image-caption data, one 4-segment stage, MSE only, online target,
    embedded guidance drawn in [2, 5] per sample, offset noise."""
    from diffusers import FluxTransformer2DModel

    extra = ["--num_segments", "4", "--distance", "mse", "--target", "online", "--guidance_range", "2", "5"]
    out = tmp_path / "full"
    flow_tscd.main(
        flow_tscd.parse_args(_argv(tiny, "flux", out, *extra, "--noise_offset", "0.1", data="images"))
    )
    start = FluxTransformer2DModel.from_pretrained(str(tiny["flux"]), subfolder="transformer").state_dict()
    trained = FluxTransformer2DModel.from_pretrained(str(out / "transformer")).state_dict()
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start), "the transformer did not train"
    assert json.loads((out / flow_tscd.GRID_FILE).read_text())["pipeline_sigmas"] == [1.0, 0.75, 0.5, 0.25]


@pytest.mark.parametrize("distance", ["mse", "hybrid"])
def test_tscd_lora_fsdp2_equals_ddp_on_two_processes(
    distance: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    """2 CPU processes (gloo): accelerate's DDP and FSDP2 make the same two steps of a LoRA student (stages k = 2
    then 1) with the EMA of its (sharded) adapters as the consistency target and gradient checkpointing.
    ``mse``: the teacher is the sharded transformer with its adapters off (no teacher copy). ``hybrid``: the
    frozen teacher copy (replicated) is the teacher and carries the LADD heads (sharded by their own prepare),
    and step 2 is the adversarial stage (weight 1), the heads frozen through the student's backward. The released
    LoRA of each engine against the size of DDP's step 2 (tests/state_compare.py: the engines sum the gradients in
    another order; a lost shard, a teacher run with the adapters on or an EMA of the wrong weights would change
    the step by O(1))."""
    from tests.examples.test_sdxl_scripts import _two_process_runs

    extra = ["--use_lora", "--lora_rank", "4", "--segments", "2,1", "--distance", distance]
    extra += ["--gradient_checkpointing"]
    argv = _argv(tiny, "sd3", tmp_path, *extra, data="images")  # no teacher-noised states: cheaper
    out = _two_process_runs("flow_tscd", argv, tmp_path, "fsdp", resume=False)
    name = "pytorch_lora_weights.safetensors"
    ddp, fsdp = _lora(out["ddp"] / name), _lora(out["fsdp"] / name)
    step1 = {
        "transformer." + k: v for k, v in _lora(out["ddp"] / "checkpoint-1" / "unet_lora.safetensors").items()
    }
    assert_same_update(fsdp, ddp, step1, what=f"FSDP2 vs DDP ({distance})")
    heads = (out["fsdp"] / "checkpoint-1" / "pytorch_model_fsdp_1").is_dir()
    assert heads == (distance == "hybrid"), "the LADD heads are a second sharded model exactly with hybrid"


def test_tscd_prompt_only_under_fsdp2_block_wrapping_equals_ddp(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompt-only TSCD under FSDP2 with the transformer's blocks as FSDP units (accelerate's transformer-based wrap,
    each block's weights gathered per call): the teacher-noised states solve each process's samples in as many
    teacher calls as their timesteps need, so before ``teacher_trajectory_states(..., synchronize=True)`` the
    processes' all-gathers mismatched (gloo: "Received data size doesn't match expected size"; NCCL would hang).
    Now the run completes and makes DDP's two steps (the synchronised states equal the unsynchronised ones)."""
    from tests.examples.test_sdxl_scripts import _two_process_runs

    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")  # read by the FSDP2 run only
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "JointTransformerBlock")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "true")
    extra = ["--use_lora", "--lora_rank", "4", "--segments", "2", "--distance", "mse", "--target", "online"]
    argv = _argv(tiny, "sd3", tmp_path, *extra, data="prompts")
    out = _two_process_runs("flow_tscd", argv, tmp_path, "fsdp", resume=False)
    name = "pytorch_lora_weights.safetensors"
    ddp, fsdp = _lora(out["ddp"] / name), _lora(out["fsdp"] / name)
    step1 = {
        "transformer." + k: v for k, v in _lora(out["ddp"] / "checkpoint-1" / "unet_lora.safetensors").items()
    }
    assert_same_update(fsdp, ddp, step1, what="FSDP2 (block units) vs DDP, prompt-only")


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--segments", "8,x"], "comma-separated segment counts"),
        (["--segments", "4,4"], "distinct segment counts"),
        (["--num_segments", "64"], r"distinct segment counts in \[1, --num_inference_steps \(50\)\]"),
        (["--num_inference_steps", "30"], "divide 1000"),
        (["--guidance_range", "5", "2"], "0 <= MIN <= MAX"),
        (["--noise_offset", "-1"], "--noise_offset >= 0"),
        (["--discriminator_adam_beta2", "1"], r"--discriminator_adam_beta2 in \[0, 1\)"),
    ],
)
def test_tscd_options_are_checked(
    tiny: dict[str, Path], tmp_path: Path, extra: list[str], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        flow_tscd.parse_args(_argv(tiny, "sd3", tmp_path, *extra))


def test_tscd_guidance_options_fit_the_model(tiny: dict[str, Path], tmp_path: Path) -> None:
    flux = SimpleNamespace(family="flux", variant="flux", has_experts=False, name="FLUX.1")
    args = flow_tscd.parse_args(_argv(tiny, "flux", tmp_path, "--teacher_guidance_scale", "4"))
    with pytest.raises(ValueError, match=r"FLUX\.1 takes its guidance as an input"):
        flow_tscd.check_guidance_args(args, flux)
    args = flow_tscd.parse_args(_argv(tiny, "flux", tmp_path, "--guidance_range", "2", "4"))
    with pytest.raises(ValueError, match="has no guidance embedding"):
        flow_tscd.check_guidance_args(args, flux)  # --guidance unset: FLUX.1-schnell
    sd3 = flow_tscd.parse_args(_argv(tiny, "sd3", tmp_path))
    flow_tscd.check_guidance_args(
        sd3, SimpleNamespace(family="sd3", variant="sd3", has_experts=False, name="SD3")
    )
    assert sd3.teacher_guidance_scale == 7.0
    assert flow_tscd.draw_guidance(sd3, 2, torch.Generator()) == 7.0
    with pytest.raises(ValueError, match="drop --prompts_file"):
        flow_tscd.parse_args(
            [*_argv(tiny, "sd3", tmp_path, data="images"), "--prompts_file", str(tiny["prompts"])]
        )


def test_hybrid_heads_read_the_teacher_at_each_pairs_guidance(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLUX.1-dev, --guidance_range 2 5, hybrid distance in its adversarial stage: the heads' teacher call gets each
    sample's drawn omega as its embedded guidance, the guidance the pair was made at (audit 9: it got --guidance
    3.5 whatever the draw)."""
    from diffdistill.discriminators import LADDDiscriminator

    seen: list[torch.Tensor] = []
    forward = LADDDiscriminator.forward

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["guidance"].detach().cpu())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LADDDiscriminator, "forward", recording)
    extra = ["--use_lora", "--lora_rank", "2", "--segments", "2,1", "--distance", "hybrid"]
    extra += ["--guidance_range", "2", "5", "--max_train_steps", "2", "--checkpointing_steps", "0"]
    flow_tscd.main(flow_tscd.parse_args(_argv(tiny, "flux", tmp_path / "out", *extra)))
    assert seen, "the heads never ran"
    for g in seen:
        assert bool(((g >= 2) & (g <= 5)).all()) and not bool((g == 3.5).all()), g
