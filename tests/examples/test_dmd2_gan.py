"""DMD2's GAN classifier on the fake score's bottleneck (``sdxl_sim.py --preset dmd2 --gan_weight``).

DMD2 (Yin et al. 2024, arXiv:2405.14867; tianweiy/DMD2 ``sd_guidance.py``): the classifier is a head on the fake
score UNet's bottleneck; it is trained in the fake-score update on noised real and (detached) generated
latents, and the generator gets its non-saturating term through the frozen classifier. The unit tests check
both gradients against a hand computation of the same draws; the smoke test runs the script on a tiny
SDXL pipeline with real images and resumes it.
"""

from __future__ import annotations

import copy
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.examples.example_modules import load_example
from tests.examples.tiny_sdxl import save_tiny_sdxl_pipeline, write_captioned_images
from tests.state_compare import assert_same_update

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")


_load = load_example


runtime = _load("training.runtime")
score_distillation = _load("training.score_distillation")
validation = _load("training.validation")
CLIP_AND_STEP = runtime.clip_and_step  # the original, wrapped by each test's recording spy


# ------------------------------------------------------------------------------ ScoreDistillation + GAN
def _args(**overrides: Any) -> types.SimpleNamespace:
    values = {
        "train_batch_size": 2,
        "resolution": 128,  # 16x16 latents, the tiny UNet's sample size
        "generator_every": 1,
        "fake_steps": 1,
        "max_grad_norm": 0.0,
        "generator_timestep": 999,
        "generator_input": "noise",
        "fake_weighting": "epsilon",
        "learning_rate": 1e-3,
        "fake_learning_rate": None,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_weight_decay": 0.0,
        "gan_weight": 0.5,
        "gan_classifier_weight": 0.25,
    }
    return types.SimpleNamespace(**{**values, **overrides})


def _setup(monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> dict[str, Any]:
    """Generator, fake score and classifier on tiny SDXL UNets, prepared by a CPU accelerator; the generator's
    own loss is 0, so its gradient is the GAN term alone. ``steps`` records each optimiser step's gradients."""
    from accelerate import Accelerator

    from diffdistill.discriminators import sdxl_conditions, tiny_sdxl_unet
    from diffdistill.schedulers import NoiseSchedule

    args = _args(**overrides)
    torch.manual_seed(0)
    generator = tiny_sdxl_unet()
    fake = copy.deepcopy(generator)
    accelerator = Accelerator(cpu=True)
    opt_g = runtime.adamw(generator.parameters(), args)
    opt_f = runtime.adamw(fake.parameters(), args)
    generator, opt_g, fake, opt_f = runtime.prepare(accelerator, (generator, opt_g), (fake, opt_f))
    schedule = NoiseSchedule.from_betas()  # SDXL's
    gan = score_distillation.BottleneckGAN.build(accelerator, args, fake, schedule)
    ehs, added = sdxl_conditions(accelerator.unwrap_model(generator), 2)
    steps: list[tuple[str, dict[str, Any]]] = []

    def recording(acc: Any, optimizer: Any, params: Any, max_norm: float) -> None:
        name = {id(opt_g): "generator", id(opt_f): "fake", id(gan.optimizer): "classifier"}[id(optimizer)]
        grads = {
            net: [None if p.grad is None else p.grad.clone() for p in module.parameters()]
            for net, module in (("generator", generator), ("fake", fake), ("classifier", gan.head))
        }
        steps.append((name, grads))
        CLIP_AND_STEP(acc, optimizer, params, max_norm)

    monkeypatch.setattr(runtime, "clip_and_step", recording)

    def zero_loss(x: torch.Tensor, z: torch.Tensor, gen: Any, cond: Any) -> tuple[torch.Tensor, dict]:
        return 0.0 * x.sum(), {}

    score = score_distillation.ScoreDistillation(
        accelerator, args, schedule, generator=(generator, opt_g), fake=(fake, opt_f), loss=zero_loss, gan=gan
    )
    real = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    cond = {"encoder_hidden_states": ehs, "added_cond_kwargs": added}
    return {
        "args": args,
        "score": score,
        "gan": gan,
        "generator": generator,
        "fake": fake,
        "schedule": schedule,
        "cond": cond,
        "real": real,
        "steps": steps,
    }


def _noised_logits(
    head: Any, schedule: Any, batches: list[torch.Tensor], gen: torch.Generator, cond: Any
) -> list[torch.Tensor]:
    """DMD2's ``compute_cls_logits``, written out: each batch noised to t ~ U{0..T-1} (its t, then its noise), the
    head's logits of all of them in one call (the classifier's own batching), split back per batch."""
    noised, timesteps = [], []
    for latents in batches:
        t = torch.randint(0, schedule.num_train_timesteps, (latents.shape[0],), generator=gen)
        noised.append(schedule.add_noise(latents, torch.randn(latents.shape, generator=gen), t))
        timesteps.append(t)
    n = len(batches)
    repeated = {
        "encoder_hidden_states": torch.cat([cond["encoder_hidden_states"]] * n),
        "added_cond_kwargs": {k: torch.cat([v] * n) for k, v in cond["added_cond_kwargs"].items()},
    }
    return list(head(torch.cat(noised), torch.cat(timesteps), **repeated)[0].chunk(n))


def _assert_same_gradient(got: list[Any], want: tuple[torch.Tensor, ...]) -> None:
    """The recorded gradient equals the hand computation of the same draws. The hand computation repeats the
    library's arithmetic (``schedule.add_noise``, one head call on the concatenated batches): written with
    float64 noising coefficients and separate head calls instead, float32 rounding alone moved the gradient by
    gap / norm 3e-5 to 1.5e-4 (a gradient summed over many cancelling terms), the size of what a tolerance would
    have to absorb. With the same operations the paths agree to reproducibility (measured gap 0); the bound 1e-6
    leaves room for a kernel choosing another summation order, while a missing, doubled or mis-weighted term
    moves the gradient by O(1)."""
    assert len(got) == len(want) and all(g is not None for g in got)
    gap = torch.sqrt(sum((g - w).double().square().sum() for g, w in zip(got, want)))
    norm = torch.sqrt(sum(w.double().square().sum() for w in want))
    assert float(norm) > 0 and float(gap / norm) <= 1e-6, float(gap / norm)


def test_the_generator_gets_the_gan_gradient_through_the_frozen_classifier(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = _setup(monkeypatch)
    generator, schedule, cond = s["generator"], s["schedule"], s["cond"]
    head = s["gan"].head
    # By hand, the same draws as the step: z, then the classifier's t and noise.
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(2, 4, 16, 16, generator=gen)
    x = validation.one_step_x0(generator, schedule, z, 999, cond)
    (logits,) = _noised_logits(head, schedule, [x], gen, cond)
    want = torch.autograd.grad(0.5 * F.softplus(-logits).mean(), list(generator.parameters()))
    s["score"].step(0, torch.Generator().manual_seed(7), cond, real=s["real"])
    names = [name for name, _ in s["steps"]]
    assert names == ["generator", "fake", "classifier"]
    _, grads = s["steps"][0]
    _assert_same_gradient(grads["generator"], want)
    assert any(float(g.abs().sum()) > 0 for g in grads["generator"]), "no GAN gradient reached the generator"
    # The classifier (head and the fake UNet's trunk) is frozen in the generator's update.
    assert all(g is None for g in grads["fake"] + grads["classifier"])


def test_the_gan_weight_scales_the_generator_term_and_zero_turns_it_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    grads = {}
    for weight in (0.5, 1.0):
        s = _setup(monkeypatch, gan_weight=weight)
        s["score"].step(0, torch.Generator().manual_seed(7), s["cond"], real=s["real"])
        grads[weight] = s["steps"][0][1]["generator"]
    for half, full in zip(grads[0.5], grads[1.0]):
        torch.testing.assert_close(full, 2 * half, rtol=1e-5, atol=0)


def test_the_classifier_trains_in_the_fake_score_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffdistill.losses import fake_score_loss

    s = _setup(monkeypatch, generator_every=2)
    generator, fake, schedule, cond, real = s["generator"], s["fake"], s["schedule"], s["cond"], s["real"]
    head = s["gan"].head
    # Step 1 of generator_every 2 is a fake-score step only: the samples are drawn again without gradient,
    # the fake score's loss draws its t and noise, then the classifier its real and fake t and noise.
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        x = validation.one_step_x0(generator, schedule, torch.randn(2, 4, 16, 16, generator=gen), 999, cond)
    dsm, _ = fake_score_loss(fake, x, schedule=schedule, weighting="epsilon", cond=cond, generator=gen)
    real_logits, fake_logits = _noised_logits(head, schedule, [real, x], gen, cond)
    cls = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
    params = list(fake.parameters()) + list(head.parameters())
    want = torch.autograd.grad(dsm + 0.25 * cls, params, retain_graph=True)
    trunk_only = torch.autograd.grad(dsm, list(fake.parameters()))
    s["score"].step(1, torch.Generator().manual_seed(7), cond, real=real)
    assert [name for name, _ in s["steps"]] == ["fake", "classifier"]
    _, grads = s["steps"][0]
    _assert_same_gradient(grads["fake"] + grads["classifier"], want)
    # The classifier's loss reaches the fake UNet's trunk (shared weights), not only the head.
    gap = sum(float((g - d).abs().sum()) for g, d in zip(grads["fake"], trunk_only))
    assert gap > 0
    assert all(g is None or float(g.abs().sum()) == 0 for g in grads["generator"])


def test_the_classifier_needs_real_latents(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _setup(monkeypatch)
    with pytest.raises(ValueError, match=r"needs the step's real latents: pass `real`"):
        s["score"].step(0, torch.Generator().manual_seed(7), s["cond"])


# ------------------------------------------------------------------------------------- sdxl_sim.py
@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SDXL pipeline folder and 3 captioned 128 px images."""

    root = tmp_path_factory.mktemp("tiny_sdxl_dmd2")
    model = save_tiny_sdxl_pipeline(root / "model", seed=0)
    images = write_captioned_images(root / "images", ["a red cube", "a blue sphere", "a green cone"])
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    return {"model": model, "images": images, "prompts": prompts}


def _argv(tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(tiny["model"]),
        "--output_dir",
        str(out),
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
        "--learning_rate",
        "1e-3",
        *extra,
    ]


def test_dmd2_preset_gan_weight_parses_as_dmd2_and_needs_images(
    tiny_sdxl: dict[str, Path], tmp_path: Path
) -> None:
    script = _load("sdxl_sim")
    images = ["--train_data_dir", str(tiny_sdxl["images"])]
    args = script.parse_args(_argv(tiny_sdxl, tmp_path, "--preset", "dmd2", "--gan_weight", *images))
    assert (args.loss, args.gan_weight, args.gan_classifier_weight) == ("dmd", 5e-3, 1e-2)
    args = script.parse_args(_argv(tiny_sdxl, tmp_path, "--preset", "dmd2", "--gan_weight", "0.1", *images))
    assert args.gan_weight == 0.1
    plain = script.parse_args(
        _argv(tiny_sdxl, tmp_path, "--preset", "dmd2", "--prompts_file", str(tiny_sdxl["prompts"]))
    )
    assert plain.gan_weight == 0.0  # the preset alone stays prompt-only
    with pytest.raises(ValueError, match=r"--gan_weight: DMD2's classifier .* pass --train_data_dir"):
        script.parse_args(
            _argv(
                tiny_sdxl,
                tmp_path,
                "--preset",
                "dmd2",
                "--gan_weight",
                "--prompts_file",
                str(tiny_sdxl["prompts"]),
            )
        )
    with pytest.raises(ValueError, match=r"Expected --gan_classifier_weight >= 0, but got -1.0"):
        script.parse_args(
            _argv(tiny_sdxl, tmp_path, "--gan_weight", "--gan_classifier_weight", "-1", *images)
        )
    with pytest.raises(ValueError, match=r"trains on images and their captions.*drop --prompts_file"):
        script.parse_args(
            _argv(tiny_sdxl, tmp_path, "--gan_weight", *images, "--prompts_file", str(tiny_sdxl["prompts"]))
        )


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def test_dmd2_gan_smoke_trains_the_classifier_and_resumes_exactly(
    tiny_sdxl: dict[str, Path], tmp_path: Path
) -> None:
    script = _load("sdxl_sim")
    extra = ["--preset", "dmd2", "--gan_weight", "0.5", "--train_data_dir", str(tiny_sdxl["images"])]
    # TTUR: two fake-score (and classifier) updates per step, the generator every step (DMD2's ratio 5 would
    # leave these steps without a generator update).
    extra += ["--fake_steps", "2", "--generator_every", "1", "--max_grad_norm", "0"]
    extra += ["--checkpointing_steps", "1", "--checkpoints_total_limit", "3", "--validation_steps", "10"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    script.main(script.parse_args([*_argv(tiny_sdxl, out_a, *extra), "--max_train_steps", "3"]))
    ckpt1, ckpt2 = _safetensors(out_a / "checkpoint-1"), _safetensors(out_a / "checkpoint-2")
    heads = [k for k in ckpt1 if k.endswith("heads.0.layers.0.weight")]
    assert len(heads) == 1, f"the classifier head is not in the checkpoint: {sorted(ckpt1)[:8]}"
    assert any(k.startswith("fake_lora/") for k in ckpt1)
    # Step 2 trained the classifier head and the fake score's LoRA.
    assert not torch.equal(ckpt1[heads[0]], ckpt2[heads[0]])
    assert any(not torch.equal(ckpt1[k], ckpt2[k]) for k in ckpt1 if k.startswith("fake_lora/"))
    # Resumed from step 1: steps 2 and 3 again, with the head, the fake score and their optimisers reloaded.
    resumed = [*_argv(tiny_sdxl, out_b, *extra), "--max_train_steps", "3"]
    script.main(script.parse_args([*resumed, "--resume_from_checkpoint", str(out_a / "checkpoint-1")]))
    assert_same_update(
        _safetensors(out_b / "checkpoint-2"), ckpt2, ckpt1, what="checkpoint 2, resumed vs uninterrupted"
    )
    final_a = _safetensors(out_a)
    final_b = _safetensors(out_b)
    start = {
        k.replace("unet_lora/", "pytorch_lora_weights/unet."): v
        for k, v in ckpt2.items()
        if k.startswith("unet_lora/")
    }
    assert_same_update(final_b, final_a, start, what="final LoRA, resumed vs uninterrupted")


@pytest.mark.parametrize("engine", ["FSDP", "DEEPSPEED"])
def test_the_classifier_is_refused_where_the_fake_score_is_sharded(engine: str) -> None:
    accelerator = types.SimpleNamespace(distributed_type=f"DistributedType.{engine}")
    with pytest.raises(
        ValueError, match=r"outside the fake score's FSDP / DeepSpeed engine.*run it under DDP"
    ):
        score_distillation.BottleneckGAN.build(accelerator, _args(), torch.nn.Linear(1, 1), None)
