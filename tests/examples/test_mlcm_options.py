"""MLCM's preference phase (Eq. 11) and data-free DMD + GAN phase (Eq. 12-13) in ``examples/sdxl_mlcm.py``.

Xie et al. 2024 (arXiv:2406.05768), Sec. 3.4 and 5.1: after the consistency stages, an MPS hinge phase and a
distribution-matching + GAN phase, both on the student's own samples (no data). The tests spy on the
script's calls to check what each phase trains on, and run every phase on a tiny SDXL pipeline with an
exact resume inside the DMD + GAN phase.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.examples.example_modules import count_ema_updates, load_example
from tests.examples.tiny_sdxl import save_tiny_sdxl_pipeline
from tests.state_compare import assert_same_update

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

REWARD = "tests.examples.test_mlcm_options:tiny_preference"

#: One entry per call of :func:`tiny_preference` (the script loads it by name: read it through :func:`_calls`).
CALLS: list[dict[str, Any]] = []


def tiny_preference(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """An MPS stand-in (a prompt-conditioned preference score): the image mean times the prompt's length + 1,
    ``(B,)``; small, so that both sides of the hinge are active."""
    CALLS.append({"shape": tuple(images.shape), "grad": images.requires_grad, "prompts": list(prompts)})
    length = torch.tensor([len(p) + 1.0 for p in prompts], dtype=images.dtype, device=images.device)
    return images.mean(dim=(1, 2, 3)) * length


def _calls() -> list[dict[str, Any]]:
    """The calls recorded by the module the script imported (which may be another copy of this file)."""
    return importlib.import_module("tests.examples.test_mlcm_options").CALLS


_load = load_example


runtime = _load("training.runtime")
score_distillation = _load("training.score_distillation")


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_sdxl_mlcm")
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of a cat\nan astronaut riding a horse\n")
    return {"model": save_tiny_sdxl_pipeline(root / "model", seed=0), "prompts": prompts}


def _argv(tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(tiny["model"]),
        "--output_dir",
        str(out),
        "--prompts_file",
        str(tiny["prompts"]),
        "--resolution",
        "128",
        "--train_batch_size",
        "2",
        "--report_to",
        "none",
        "--seed",
        "3",
        "--use_lora",
        "--lora_rank",
        "4",
        "--num_segments",
        "4",
        "--student_sample_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--stage2_learning_rate",
        "1e-3",
        *extra,
    ]


def _lora(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mps_steps", "1"], r"MPS phase .* --reward_model: pass both or neither"),
        (["--reward_model", REWARD], r"MPS phase .* --reward_model: pass both or neither"),
        (["--gan_weight"], r"--gan_weight trains the GAN term of the DMD phase: pass --dmd_steps"),
        (
            ["--dmd_steps", "2", "--mps_steps", "2", "--reward_model", REWARD],
            r"--mps_steps \+ --dmd_steps <= ",
        ),
        (["--dmd_steps", "-1"], r"Expected --dmd_steps >= 0"),
        (["--dmd_steps", "1", "--stage1_steps", "2"], r"Expected 0 <= --stage1_steps <= 1 "),
        (["--mps_steps", "1", "--reward_model", "no_colon"], r"Expected --reward_model as 'module:callable'"),
    ],
)
def test_phase_options_are_checked(
    tiny_sdxl: dict[str, Path], tmp_path: Path, extra: list[str], message: str
) -> None:
    script = _load("sdxl_mlcm")
    with pytest.raises(ValueError, match=message):
        script.parse_args([*_argv(tiny_sdxl, tmp_path, "--max_train_steps", "2"), *extra])


def test_phase_defaults_are_off_and_the_paper_values_are_documented(
    tmp_path: Path, tiny_sdxl: dict[str, Path]
) -> None:
    script = _load("sdxl_mlcm")
    args = script.parse_args(_argv(tiny_sdxl, tmp_path, "--max_train_steps", "2"))
    assert (args.mps_steps, args.dmd_steps, args.gan_weight, args.reward_model) == (0, 0, 0.0, None)
    assert args.reward_s0 == 16.0  # Eq. 11's s0
    args = script.parse_args(
        _argv(tiny_sdxl, tmp_path, "--max_train_steps", "2", "--dmd_steps", "1", "--gan_weight")
    )
    assert (args.gan_weight, args.gan_classifier_weight) == (5e-3, 1e-2)  # DMD2's SDXL weights
    phases = script.Phases(
        script.parse_args(
            _argv(
                tiny_sdxl,
                tmp_path,
                "--max_train_steps",
                "20",
                "--mps_steps",
                "3",
                "--dmd_steps",
                "3",
                "--reward_model",
                REWARD,
            )
        ),
        script.StagePlan.mlcm(num_segments=4),
    )
    # The consistency stages keep the plan's 12 : 2 share of the steps before the two new phases.
    assert [phases(s) for s in (0, 11, 12, 13, 14, 16, 17, 19)] == [
        "mlcd",
        "mlcd",
        "lcd-inter-segment",
        "lcd-inter-segment",
        "mps",
        "mps",
        "dm-gan",
        "dm-gan",
    ]


def test_the_mps_hinge_of_the_students_decoded_x0_is_the_loss(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _load("sdxl_mlcm")
    hinges: list[dict[str, Any]] = []
    losses: list[torch.Tensor] = []
    hinge, backward = script.mps_hinge_loss, runtime.backward

    def recording_hinge(images: torch.Tensor, **kwargs: Any) -> Any:
        out = hinge(images, **kwargs)
        hinges.append({"images": images, "out": out, **kwargs})
        return out

    def recording_backward(accelerator: Any, loss: torch.Tensor, model: Any) -> None:
        losses.append(loss.detach().clone())
        backward(accelerator, loss, model)

    monkeypatch.setattr(script, "mps_hinge_loss", recording_hinge)
    monkeypatch.setattr(runtime, "backward", recording_backward)
    _calls().clear()
    extra = ["--max_train_steps", "1", "--mps_steps", "1", "--reward_model", REWARD, "--reward_weight", "2"]
    extra += ["--reward_negative_prompt", "blurry"]
    script.main(script.parse_args(_argv(tiny_sdxl, tmp_path, *extra)))
    assert len(hinges) == 1 and len(losses) == 1
    call = hinges[0]
    images = call["images"]
    assert images.shape == (2, 3, 128, 128) and images.grad_fn is not None  # decoded with gradients
    assert call["s0"] == 16.0
    prompts = call["cond"]["prompts"]
    assert set(prompts) <= {"a photo of a cat", "an astronaut riding a horse"}
    assert call["negative_cond"] == {"prompts": ["blurry", "blurry"]}
    # The reward model scored the same images under the prompt and under the negative prompt.
    assert [c["prompts"] for c in _calls()] == [prompts, ["blurry", "blurry"]]
    assert all(c["grad"] for c in _calls())
    # The loss the student trained on is --reward_weight x Eq. 11.
    torch.testing.assert_close(losses[0], 2 * call["out"][0].detach(), rtol=0, atol=0)
    assert float(call["out"][0].detach()) > 0  # an active hinge
    lora = _lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert any(float(v.abs().sum()) > 0 for k, v in lora.items() if "lora_B" in k), "the hinge did not train"


def test_the_dmd_and_gan_terms_use_the_students_own_samples(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _load("sdxl_mlcm")
    seen: dict[str, list[Any]] = {"sample": [], "generate": [], "dmd": [], "fake": [], "classifier": []}
    x0_renoise, dmd, fake_loss = script.x0_renoise_sample, script.dmd_loss, script.fake_score_loss
    generate = score_distillation.ScoreDistillation.generate
    classifier_term = score_distillation.BottleneckGAN.classifier_term

    def spy_sample(model: Any, schedule: Any, x_t: torch.Tensor, timesteps: Any, **kw: Any) -> Any:
        out = x0_renoise(model, schedule, x_t, timesteps, **kw)
        seen["sample"].append({"model": model, "noise": x_t, "z0": out.sample.detach().clone()})
        return out

    def spy_generate(self: Any, model: Any, gen: Any, cond: Any) -> Any:
        x, z = generate(self, model, gen, cond)
        seen["generate"].append({"student": model is self.generator, "start": self._state["start"], "x": x})
        return x, z

    def spy_dmd(x: torch.Tensor, *a: Any, **kw: Any) -> Any:
        seen["dmd"].append(x)
        return dmd(x, *a, **kw)

    def spy_fake(fake: Any, x0: torch.Tensor, **kw: Any) -> Any:
        seen["fake"].append(x0.detach().clone())
        return fake_loss(fake, x0, **kw)

    def spy_classifier(self: Any, real: torch.Tensor, fake: torch.Tensor, gen: Any, cond: Any) -> Any:
        seen["classifier"].append((real.detach().clone(), fake.detach().clone()))
        return classifier_term(self, real, fake, gen, cond)

    monkeypatch.setattr(script, "x0_renoise_sample", spy_sample)
    monkeypatch.setattr(script, "dmd_loss", spy_dmd)
    monkeypatch.setattr(script, "fake_score_loss", spy_fake)
    monkeypatch.setattr(score_distillation.ScoreDistillation, "generate", spy_generate)
    monkeypatch.setattr(score_distillation.BottleneckGAN, "classifier_term", spy_classifier)
    extra = ["--max_train_steps", "1", "--dmd_steps", "1", "--gan_weight", "0.5"]
    script.main(script.parse_args(_argv(tiny_sdxl, tmp_path, *extra)))
    # One step of the phase: the student's own 2-step sample z0 from pure noise (Eq. 9)...
    assert len(seen["sample"]) == 1 and len(seen["generate"]) == 1
    z0 = seen["sample"][0]["z0"]
    assert seen["sample"][0]["noise"].shape == z0.shape == (2, 4, 16, 16)
    # ... re-noised to a milestone of the M = 4 grid, from where the student predicts x0 in one call.
    step = seen["generate"][0]
    assert step["student"]
    z_t, t = step["start"]
    assert bool(((t + 1) % 250 == 0).all()) and not torch.equal(z_t, z0)
    x = step["x"]
    assert x.grad_fn is not None
    # Eq. 12: the DMD gradient acts on that x0; the fake score is fitted to z0.
    assert len(seen["dmd"]) == 1 and seen["dmd"][0] is x
    assert len(seen["fake"]) == 1 and torch.equal(seen["fake"][0], z0.float())
    # Eq. 13: real samples are z0, fake samples the student's x0 (detached for the classifier).
    ((real, fake),) = seen["classifier"]
    assert torch.equal(real, z0.float()) and torch.equal(fake, x.detach())
    lora = _lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert any(float(v.abs().sum()) > 0 for k, v in lora.items() if "lora_B" in k), (
        "the DMD phase did not train"
    )


def test_every_phase_runs_and_a_resume_inside_the_dmd_phase_is_exact(
    tiny_sdxl: dict[str, Path], tmp_path: Path
) -> None:
    script = _load("sdxl_mlcm")
    # Steps: 0 MLCD, 1 MPS, 2-3 DMD + GAN (no LCD step); checkpoints after steps 1, 2 and 3.
    extra = ["--max_train_steps", "4", "--stage1_steps", "1", "--mps_steps", "1", "--reward_model", REWARD]
    extra += ["--dmd_steps", "2", "--gan_weight", "0.5", "--checkpointing_steps", "1"]
    extra += ["--checkpoints_total_limit", "4", "--max_grad_norm", "0"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    script.main(script.parse_args(_argv(tiny_sdxl, out_a, *extra)))
    ckpt = out_a / "checkpoint-3"
    assert (ckpt / "unet_lora.safetensors").is_file() and (ckpt / "fake_lora.safetensors").is_file()
    # The classifier head is a model of its own in the checkpoint (accelerate writes it beside the adapters).
    assert list(ckpt.glob("model*.safetensors"))
    # Resumed after step 3 (the fake score, the classifier and their optimisers have trained once).
    script.main(script.parse_args([*_argv(tiny_sdxl, out_b, *extra), "--resume_from_checkpoint", str(ckpt)]))
    name = "pytorch_lora_weights.safetensors"
    want, got = _lora(out_a / name), _lora(out_b / name)
    start = {"unet." + k: v for k, v in _lora(ckpt / "unet_lora.safetensors").items()}
    assert_same_update(got, want, start, what="resumed vs uninterrupted MLCM, DMD + GAN step")
    at_mps = {"unet." + k: v for k, v in _lora(out_a / "checkpoint-1" / "unet_lora.safetensors").items()}
    at_dmd = {"unet." + k: v for k, v in _lora(out_a / "checkpoint-2" / "unet_lora.safetensors").items()}
    assert any(not torch.equal(at_mps[k], at_dmd[k]) for k in at_mps), "the MPS step did not train"


def test_validation_renoises_on_the_initial_noises_stream_not_with_it(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLCM's validation sampler (x0, then re-noise to the next milestone) draws its re-noising noise from the
    generator of the initial noise, after it, as StableDiffusionXLPipeline with LCMScheduler and one generator does
    (audit 11: a fresh generator of --seed drew the initial noise itself again)."""
    script = _load("sdxl_mlcm")
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    sample = script.x0_renoise_sample

    def spying(model: Any, schedule: Any, noise: torch.Tensor, *args: Any, generator: Any, **kw: Any) -> Any:
        ahead = torch.Generator().set_state(generator.get_state())
        calls.append((noise.detach().cpu().clone(), torch.randn(noise.shape, generator=ahead)))
        return sample(model, schedule, noise, *args, generator=generator, **kw)

    monkeypatch.setattr(script, "x0_renoise_sample", spying)
    val = ["--validation_prompts", "a cat", "--validation_steps", "1", "--max_train_steps", "1"]
    script.main(script.parse_args(_argv(tiny_sdxl, tmp_path / "out", *val)))
    (noise, first_draw), *_ = [c for c in calls if c[0].shape[0] == 1]  # the validation call (one prompt)
    stream = torch.Generator().manual_seed(3)  # --seed: the initial noise, then the re-noising draws
    assert torch.equal(noise, torch.randn(noise.shape, generator=stream))
    assert torch.equal(first_draw, torch.randn(noise.shape, generator=stream))
    assert not torch.equal(first_draw, noise)


def test_release_average_moves_once_per_generator_update_in_the_dmd_phase(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--use_ema over step 0 (consistency) and steps 1-2 (DMD phase, --generator_every 2): the average moves at
    step 0 and at the DMD phase's generator step 1 only (its steps counted from the phase start)."""
    script = _load("sdxl_mlcm")
    updates = count_ema_updates(monkeypatch)
    extra = ["--max_train_steps", "3", "--stage1_steps", "1", "--dmd_steps", "2", "--generator_every", "2"]
    extra += ["--use_ema", "--checkpointing_steps", "0"]
    script.main(script.parse_args(_argv(tiny_sdxl, tmp_path / "out", *extra)))
    assert len(updates) == 2
