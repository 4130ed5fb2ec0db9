"""Hyper-SD's human-feedback phase in ``examples/sdxl_hyper_sd.py`` (Ren et al. 2024, Sec. 3.2, Eq. 10, 13-15).

One TSCD step, then two steps of the feedback phase: a separate ``feedback`` LoRA on top of the frozen TSCD
LoRA, trained on ``weight * relu(margin - r(x0', c))`` of two tiny rewards (an ``nn.Module`` aesthetic stand-in
and an ImageReward-type callable) at an x0' reached from pure noise, plus a tiny perceptual callable (Eq. 14)
at an x0' reached from noised dataset latents (``tests/examples/tiny_feedback_models.py``). The runs (an
uninterrupted one, spied on, and one resumed inside the feedback phase) are made once per module; the tests
read their checkpoints, outputs and the recorded calls. A third run puts the one-step stage after the feedback
phase. The helpers of the script (``refl_x0``, the unified LoRA, the hook's output check) are also checked
against independent derivations, and the new options' errors against their messages.
"""

# ruff: noqa: F811
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

# The fixture is imported (not copied): its name is then a test parameter, which ruff reads as a redefinition.
from tests.examples import tiny_feedback_models
from tests.examples.test_sdxl_scripts import (  # noqa: F401
    _common_argv,
    _launch_two_processes,
    _load,
    _lora_state,
    tiny_sdxl,
)
from tests.examples.tiny_sdxl import deterministic_kernels
from tests.state_compare import assert_same_update

lora_adapters = _load("training.lora_adapters")

MODELS = tiny_feedback_models.__name__
FEEDBACK_RANGE = (100, 600)  # t in [t_l, t_r] where x0' is predicted
PERCEPTUAL_START = 700  # t_a of the perceptual branch (Eq. 14)
ROLLOUT_STEPS = 2  # the no-grad rollout follows the trailing 2-step grid [999, 499]
LORA_FILE = "pytorch_lora_weights.safetensors"


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


def _feedback_argv(tiny: dict[str, Path], out: Path) -> list[str]:
    argv = _set(_common_argv(tiny, out, lora=True), "--max_train_steps", "3")
    argv = _set(argv, "--checkpoints_total_limit", "3")
    argv += ["--train_data_dir", str(tiny["images"]), "--segments", "1", "--num_inference_steps", "4"]
    argv += ["--feedback_steps", "2", "--feedback_rollout_steps", str(ROLLOUT_STEPS)]
    argv += ["--feedback_timestep_range", *(str(t) for t in FEEDBACK_RANGE)]
    # Two rewards, each with its own weight and margin (margins above the scores: the hinge is active).
    argv += ["--reward_model", f"{MODELS}:tiny_aesthetic", "--reward_weight", "1", "--reward_margin", "50"]
    argv += [
        "--reward_model",
        f"{MODELS}:tiny_image_reward",
        "--reward_weight",
        "0.5",
        "--reward_margin",
        "20",
    ]
    argv += ["--perceptual_model", f"{MODELS}:tiny_perceptual", "--perceptual_weight", "2"]
    argv += ["--perceptual_start_timestep", str(PERCEPTUAL_START)]
    return argv


@pytest.fixture(scope="module")
def feedback_runs(tiny_sdxl: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run ``a`` (3 steps, checkpoints after steps 1 and 2; ``refl_x0`` and the UNet's calls spied on) and
    run ``b`` (resumed from ``a``'s ``checkpoint-2``, inside the feedback phase)."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("hyper_feedback")
    script = _load("sdxl_hyper_sd")
    rollouts: list[dict[str, Any]] = []  # one per refl_x0 call, with the UNet calls made inside it
    refl_x0 = script.refl_x0
    forward = UNet2DConditionModel.forward

    def spied_refl_x0(
        model: Any, schedule: Any, x: torch.Tensor, t_start: int, t_stop: int, *a: Any, **kw: Any
    ) -> Any:
        rollouts.append({"x": x.detach().clone(), "t_start": t_start, "t_stop": t_stop, "calls": []})
        try:
            return refl_x0(model, schedule, x, t_start, t_stop, *a, **kw)
        finally:
            rollouts[-1]["done"] = True

    def spied_forward(self: Any, sample: torch.Tensor, timestep: Any, *a: Any, **kw: Any) -> Any:
        if rollouts and "done" not in rollouts[-1]:  # a UNet call inside refl_x0: (timestep, grad enabled)
            t = torch.as_tensor(timestep).flatten()
            rollouts[-1]["calls"].append((int(t[0]), torch.is_grad_enabled(), bool((t == t[0]).all())))
        return forward(self, sample, timestep, *a, **kw)

    tiny_feedback_models.CALLS.clear()
    out_a, out_b = root / "a", root / "b"
    with deterministic_kernels(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(script, "refl_x0", spied_refl_x0)
        mp.setattr(UNet2DConditionModel, "forward", spied_forward)
        script.main(script.parse_args(_feedback_argv(tiny_sdxl, out_a)))
        calls_a = list(tiny_feedback_models.CALLS)
        tiny_feedback_models.CALLS.clear()
        ckpt = out_a / "checkpoint-2"
        mp.undo()
        script.main(
            script.parse_args([*_feedback_argv(tiny_sdxl, out_b), "--resume_from_checkpoint", str(ckpt)])
        )
    return {
        "script": script,
        "a": out_a,
        "b": out_b,
        "rollouts": rollouts,
        "calls_a": calls_a,
        "calls_b": list(tiny_feedback_models.CALLS),
    }


def test_feedback_phase_trains_only_the_feedback_adapter(feedback_runs: dict[str, Any]) -> None:
    out_a: Path = feedback_runs["a"]
    tscd_1 = _lora_state(out_a / "checkpoint-1" / "unet_lora.safetensors")
    tscd_2 = _lora_state(out_a / "checkpoint-2" / "unet_lora.safetensors")
    fb_1 = _lora_state(out_a / "checkpoint-1" / "unet_feedback_lora.safetensors")
    fb_2 = _lora_state(out_a / "checkpoint-2" / "unet_feedback_lora.safetensors")
    assert tscd_1.keys() == tscd_2.keys() == fb_1.keys() == fb_2.keys() and tscd_1
    # Step 1 (TSCD) trained the TSCD LoRA only: the feedback LoRA is still peft's initial one (B = 0).
    assert any(bool(v.abs().sum() > 0) for k, v in tscd_1.items() if "lora_B" in k), "TSCD did not train"
    assert all(bool((v == 0).all()) for k, v in fb_1.items() if "lora_B" in k), (
        "TSCD trained the feedback LoRA"
    )
    # Step 2 (feedback) trained the feedback LoRA only: the TSCD LoRA is bit for bit what step 1 left.
    assert all(torch.equal(tscd_1[k], tscd_2[k]) for k in tscd_1), "the feedback phase changed the TSCD LoRA"
    assert any(not torch.equal(fb_1[k], fb_2[k]) for k in fb_1 if "lora_B" in k), (
        "feedback LoRA did not train"
    )
    # The released feedback LoRA (after step 3) moved on from step 2; the TSCD half of the unified file is
    # still step 1's TSCD LoRA.
    fb_final = _lora_state(out_a / "feedback" / LORA_FILE)
    assert any(not torch.equal(fb_2[k], fb_final["unet." + k]) for k in fb_2 if "lora_B" in k)
    unified = _lora_state(out_a / LORA_FILE)
    for k, v in tscd_1.items():
        rank = v.shape[0] if "lora_A" in k else v.shape[1]
        part = unified["unet." + k][:rank] if "lora_A" in k else unified["unet." + k][:, :rank]
        assert torch.equal(part, v), k  # --lora_alpha defaults to the rank: scale 1, no rescaling


def test_feedback_rewards_and_perceptual_hook_get_what_the_paper_feeds_them(
    feedback_runs: dict[str, Any],
) -> None:
    calls = feedback_runs["calls_a"]
    # Steps 2 and 3 are feedback steps: each scores one decoded batch with both rewards and the hook.
    assert [c["model"] for c in calls] == ["aesthetic", "image_reward", "perceptual"] * 2
    for call in calls:
        assert call["shape"] == (2, 3, 128, 128) and call["grad"] is True, call
        low, high = call["range"]
        assert -1.0 <= low <= high <= 1.0
        assert len(call["prompts"]) == 2
    aesthetic = [c for c in calls if c["model"] == "aesthetic"]
    assert all(c["frozen"] for c in aesthetic), "an nn.Module reward must be frozen"
    perceptual = [c for c in calls if c["model"] == "perceptual"]
    assert all(c["reference_shape"] == (2, 3, 128, 128) and c["reference_grad"] is False for c in perceptual)
    # The resumed run made step 3 only.
    assert [c["model"] for c in feedback_runs["calls_b"]] == ["aesthetic", "image_reward", "perceptual"]


def test_feedback_x0_is_predicted_after_a_no_grad_rollout_from_pure_noise(
    feedback_runs: dict[str, Any],
) -> None:
    rollouts = feedback_runs["rollouts"]
    assert len(rollouts) == 4  # 2 feedback steps x (reward branch + perceptual branch)
    grid = [999, 499]  # trailing ROLLOUT_STEPS-step grid
    for i, r in enumerate(rollouts):
        reward_branch = i % 2 == 0
        t_start, t_stop = r["t_start"], r["t_stop"]
        assert FEEDBACK_RANGE[0] <= t_stop <= FEEDBACK_RANGE[1]
        if reward_branch:  # Eq. 10: from x_T, pure Gaussian noise (not a noised dataset latent)
            assert t_start == 999
            x = r["x"].double()
            assert x.shape == (2, 4, 16, 16)
            assert abs(float(x.mean())) < 0.15 and 0.85 < float(x.std()) < 1.15
        else:  # Eq. 14: from dataset latents noised to t_a
            assert t_start == PERCEPTUAL_START
        # The student runs without gradient from t_start along the grid points below it and above t_stop,
        # then once with gradient at t_stop (where x0' is predicted).
        expected = [t_start] + [g for g in grid if t_stop < g < t_start]
        calls = r["calls"]
        assert [c[0] for c in calls] == [*expected, t_stop], r
        assert [c[1] for c in calls] == [False] * len(expected) + [True]
        assert all(c[2] for c in calls)  # one timestep for the whole batch
    # The pure noise of the two reward rollouts differs (drawn per step).
    assert not torch.equal(rollouts[0]["x"], rollouts[2]["x"])


def test_feedback_resume_inside_the_phase_is_exact(feedback_runs: dict[str, Any]) -> None:
    out_a, out_b = feedback_runs["a"], feedback_runs["b"]
    at_step2 = {
        "unet." + k: v
        for k, v in _lora_state(out_a / "checkpoint-2" / "unet_feedback_lora.safetensors").items()
    }
    a = _lora_state(out_a / "feedback" / LORA_FILE)
    b = _lora_state(out_b / "feedback" / LORA_FILE)
    assert_same_update(b, a, at_step2, what="resumed vs uninterrupted feedback LoRA")
    ua, ub = _lora_state(out_a / LORA_FILE), _lora_state(out_b / LORA_FILE)
    assert ua.keys() == ub.keys()
    tscd = _lora_state(out_a / "checkpoint-2" / "unet_lora.safetensors")
    start = {
        "unet." + k: torch.cat([v, at_step2["unet." + k]], dim=0 if "lora_A" in k else 1)
        for k, v in tscd.items()
    }
    assert_same_update(ub, ua, start, what="resumed vs uninterrupted unified LoRA")


def test_unified_lora_loads_in_the_diffusers_pipeline_and_equals_tscd_plus_feedback(
    feedback_runs: dict[str, Any], tiny_sdxl: dict[str, Path]
) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from diffdistill.students import load_lora

    out_a: Path = feedback_runs["a"]
    meta = json.loads(_safetensors_metadata(out_a / LORA_FILE)["lora_adapter_metadata"])
    assert meta["unet.r"] == 8 and meta["unet.lora_alpha"] == 8.0  # rank 4 + 4, scale 1
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl["model"]))
    pipe.load_lora_weights(str(out_a), weight_name=LORA_FILE)
    # The two adapters as trained: TSCD (unchanged since checkpoint-1) and feedback (released alone).
    both = UNet2DConditionModel.from_pretrained(str(tiny_sdxl["model"]), subfolder="unet")
    load_lora(both, out_a / "checkpoint-1" / "unet_lora.safetensors", prefix="")
    load_lora(both, out_a / "feedback" / LORA_FILE, adapter_name="feedback")
    both.set_adapters(["default", "feedback"])
    plain = UNet2DConditionModel.from_pretrained(str(tiny_sdxl["model"]), subfolder="unet")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([999, 400])
    ehs = torch.randn(2, 8, pipe.unet.config.cross_attention_dim, generator=gen)
    added = {
        "text_embeds": torch.randn(2, 32, generator=gen),
        "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * 2),
    }
    with torch.no_grad():
        got = pipe.unet(x, t, ehs, added_cond_kwargs=added).sample
        want = both(x, t, ehs, added_cond_kwargs=added).sample
        base = plain(x, t, ehs, added_cond_kwargs=added).sample
    assert (want - base).abs().max() > 1e-4, "the adapters do not change the output"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_refl_x0_runs_ddim_from_t_start_then_predicts_x0_with_gradient() -> None:
    """Against an independent derivation: with the exact noise as the model output, every DDIM move stays on
    the noising path of one (x0, eps) pair, so the state at ``t_stop`` is ``add_noise(x0, eps, t_stop)`` and
    the prediction is ``x0``; only the last call records a graph."""
    from diffdistill.schedulers import NoiseSchedule, spaced_timesteps

    script = _load("sdxl_hyper_sd")
    schedule = NoiseSchedule.from_betas()
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    eps = torch.randn(2, 4, 8, 8, generator=gen)
    scale = torch.ones((), requires_grad=True)
    seen: list[tuple[list[int], bool, torch.Tensor]] = []

    class Oracle:
        def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> Any:
            seen.append((t.tolist(), torch.is_grad_enabled(), x.detach().clone()))
            return type("Out", (), {"sample": scale * eps})()

    grid = spaced_timesteps(4, "trailing", num_train_timesteps=1000)  # 999, 749, 499, 249
    x_t = schedule.add_noise(x0, eps, 999)
    pred = script.refl_x0(Oracle(), schedule, x_t, 999, 300, {}, grid)
    assert [s[0][0] for s in seen] == [999, 749, 499, 300]
    assert [s[1] for s in seen] == [False, False, False, True]
    assert all(s[0] == [s[0][0]] * 2 for s in seen)  # one timestep for the batch
    torch.testing.assert_close(seen[-1][2], schedule.add_noise(x0, eps, 300), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred.detach(), x0, rtol=1e-4, atol=1e-4)
    pred.sum().backward()
    # d x0'/d scale = -sigma/alpha * eps at t_stop, summed: only the graded call contributes.
    want = -(schedule.sigma(300) / schedule.alpha(300)).double() * eps.double().sum()
    torch.testing.assert_close(scale.grad.double(), want.reshape(()), rtol=1e-4, atol=1e-5)
    # t_stop at t_start: no rollout, one call with gradient (the perceptual branch when t_r >= t_a).
    seen.clear()
    script.refl_x0(Oracle(), schedule, x_t, 499, 499, {}, grid)
    assert [(s[0][0], s[1]) for s in seen] == [(499, True)]


def test_merged_lora_state_is_the_sum_of_the_two_scaled_adapters(tmp_path: Path) -> None:
    """``W + s1 B1 A1 + s2 B2 A2 = W + [s1 B1 | s2 B2] [A1; A2]`` with adapters of different rank and alpha: the
    written file, loaded by the library as one rank-(r1 + r2) adapter, computes what the two adapters compute."""
    from diffdistill.students import add_lora, load_lora

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    base = {k: v.clone() for k, v in net.state_dict().items()}
    add_lora(net, rank=2, alpha=4.0, targets=["0", "2"])
    add_lora(net, rank=3, alpha=1.5, targets=["0", "2"], adapter_name="feedback")
    for name, p in net.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p)
    for m in net.modules():
        if hasattr(m, "set_adapter") and hasattr(m, "lora_A"):
            m.set_adapter(["default", "feedback"])
    x = torch.randn(4, 6)
    with torch.no_grad():
        want = net(x)
    tensors, meta = lora_adapters.merged_lora_state(net, ("default", "feedback"))
    assert meta["r"] == 5 and meta["lora_alpha"] == 5.0
    assert tensors["0.lora_A.weight"].shape == (5, 6) and tensors["0.lora_B.weight"].shape == (5, 5)
    path = tmp_path / "unified.safetensors"
    lora_adapters.write_lora_file(tensors, meta, path)
    fresh = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    fresh.load_state_dict(base)
    load_lora(fresh, path)
    with torch.no_grad():
        got = fresh(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_feedback_options_are_checked(tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    script = _load("sdxl_hyper_sd")
    argv = _feedback_argv(tiny_sdxl, tmp_path)
    args = script.parse_args(argv)
    assert args.reward_weight == [1.0, 0.5] and args.reward_margin == [50.0, 20.0]
    at = argv.index("--use_lora")
    assert argv[at : at + 3] == ["--use_lora", "--lora_rank", "4"]
    no_lora = argv[:at] + argv[at + 3 :]
    with pytest.raises(ValueError, match=r"feedback phase trains a separate LoRA.*--use_lora"):
        script.parse_args(no_lora)
    plain = _set(_common_argv(tiny_sdxl, tmp_path, lora=True), "--max_train_steps", "3")
    plain += ["--train_data_dir", str(tiny_sdxl["images"])]
    with pytest.raises(ValueError, match="--feedback_steps needs --reward_model or --perceptual_model"):
        script.parse_args([*plain, "--feedback_steps", "1"])
    reward = ["--reward_model", f"{MODELS}:tiny_image_reward", "--reward_margin", "1"]
    with pytest.raises(ValueError, match=r"scores only the feedback phase.*and the one-step stage"):
        script.parse_args([*plain, *reward])
    with pytest.raises(ValueError, match="--perceptual_model is used by the feedback phase"):
        script.parse_args([*plain, "--perceptual_model", f"{MODELS}:tiny_perceptual"])
    with pytest.raises(
        ValueError, match=r"one --reward_margin per --reward_model.*got 2 models and 1 margin"
    ):
        script.parse_args(
            [*plain, "--feedback_steps", "1", *reward, "--reward_model", f"{MODELS}:tiny_aesthetic"]
        )
    with pytest.raises(ValueError, match="--reward_weight once per --reward_model"):
        script.parse_args(
            [*plain, "--feedback_steps", "1", *reward, "--reward_weight", "1", "--reward_weight", "2"]
        )
    with pytest.raises(ValueError, match="keep at least one TSCD step"):
        script.parse_args([*plain, "--feedback_steps", "2", "--one_step_steps", "1", *reward])
    with pytest.raises(ValueError, match=r"0 <= t_l <= t_r"):
        script.parse_args([*argv, "--feedback_timestep_range", "600", "100"])
    with pytest.raises(ValueError, match="--feedback_rollout_steps >= 1"):
        script.parse_args([*argv, "--feedback_rollout_steps", "0"])
    with pytest.raises(ValueError, match="as 'module:callable'"):
        script.parse_args([*argv, "--perceptual_model", "tiny_perceptual"])


def test_one_step_stage_after_the_feedback_phase_trains_the_tscd_lora_only(
    tiny_sdxl: dict[str, Path], tmp_path: Path
) -> None:
    """TSCD (step 1), feedback (step 2), one-step stage (step 3): the last trains the TSCD LoRA with the feedback
    LoRA frozen, its reward scores the generator's samples, and ``tscd/`` holds the unified LoRA of step 2."""
    script = _load("sdxl_hyper_sd")
    out = tmp_path / "run"
    argv = _set(_common_argv(tiny_sdxl, out, lora=True), "--max_train_steps", "3")
    argv = _set(argv, "--checkpoints_total_limit", "3")
    argv += ["--train_data_dir", str(tiny_sdxl["images"]), "--segments", "1", "--num_inference_steps", "4"]
    argv += ["--feedback_steps", "1", "--feedback_rollout_steps", "2", "--one_step_steps", "1"]
    argv += ["--one_step_teacher_steps", "2", "--generator_timestep", "800"]
    argv += ["--reward_model", f"{MODELS}:tiny_image_reward", "--reward_margin", "20"]
    tiny_feedback_models.CALLS.clear()
    script.main(script.parse_args(argv))
    # One reward call in the feedback step, one on the one-step generator's samples; none in the TSCD step.
    assert [c["model"] for c in tiny_feedback_models.CALLS] == ["image_reward"] * 2
    ckpt = out / "checkpoint-2"
    tscd_1 = _lora_state(out / "checkpoint-1" / "unet_lora.safetensors")
    tscd_2 = _lora_state(ckpt / "unet_lora.safetensors")
    fb_2 = _lora_state(ckpt / "unet_feedback_lora.safetensors")
    assert all(torch.equal(tscd_1[k], tscd_2[k]) for k in tscd_1)
    fb_final = _lora_state(out / "feedback" / LORA_FILE)
    assert all(torch.equal(fb_2[k], fb_final["unet." + k]) for k in fb_2), (
        "the one-step stage trained feedback"
    )
    unified = _lora_state(out / LORA_FILE)
    halves = {
        k: unified["unet." + k][: v.shape[0]] if "lora_A" in k else unified["unet." + k][:, : v.shape[1]]
        for k, v in tscd_2.items()
    }
    assert any(not torch.equal(halves[k], tscd_2[k]) for k in tscd_2 if "lora_B" in k), (
        "one-step did not train"
    )
    # tscd/: the multi-step student before the one-step stage = step 2's TSCD and feedback LoRAs, merged.
    released = _lora_state(out / "tscd" / LORA_FILE)
    for k, v in tscd_2.items():
        both = torch.cat([v, fb_2[k]], dim=0 if "lora_A" in k else 1)
        assert torch.equal(released["unet." + k], both), k


def test_perceptual_loss_checks_what_the_hook_returns() -> None:
    script = _load("sdxl_hyper_sd")
    images, reference = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    per_sample = script.perceptual_loss(
        lambda x, r, p: (x - r).square().mean(dim=(1, 2, 3)), images, reference, ["a", "b"]
    )
    assert per_sample.dtype == torch.float32 and per_sample.ndim == 0 and float(per_sample) == 1.0
    with pytest.raises(TypeError, match="--perceptual_model to return a floating tensor"):
        script.perceptual_loss(lambda x, r, p: 1.0, images, reference, ["a", "b"])
    with pytest.raises(TypeError, match=r"but got torch\.int64"):
        script.perceptual_loss(lambda x, r, p: torch.ones(2, dtype=torch.long), images, reference, ["a", "b"])
    with pytest.raises(
        ValueError, match=r"to return \(2,\) per-sample losses or a 0-d loss, but got shape \(2, 3\)"
    ):
        script.perceptual_loss(lambda x, r, p: torch.ones(2, 3), images, reference, ["a", "b"])


def test_feedback_phase_under_ddp(
    tiny_sdxl: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two DDP processes (batch 1 each): the TSCD LoRA is frozen mid-run (DDP's find_unused_parameters), so
    the feedback steps leave it bit for bit and train the feedback LoRA, the same on both replicas."""
    root = str(Path(__file__).resolve().parents[2])  # the reward modules are imported in the children
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = tmp_path / "ddp"
    # 1 TSCD step, then 2 feedback steps
    argv = _set(_feedback_argv(tiny_sdxl, out), "--train_batch_size", "1")
    _launch_two_processes("sdxl_hyper_sd", argv)
    ckpt_1, ckpt_2 = out / "checkpoint-1", out / "checkpoint-2"
    assert (ckpt_1 / "random_states_1.pkl").is_file(), "DDP ran in one process"
    tscd_1, tscd_2 = (_lora_state(c / "unet_lora.safetensors") for c in (ckpt_1, ckpt_2))
    fb_1, fb_2 = (_lora_state(c / "unet_feedback_lora.safetensors") for c in (ckpt_1, ckpt_2))
    assert all(torch.equal(tscd_1[k], tscd_2[k]) for k in tscd_1), "the feedback step changed the TSCD LoRA"
    assert any(not torch.equal(fb_1[k], fb_2[k]) for k in fb_1 if "lora_B" in k), (
        "feedback LoRA did not train"
    )
    assert (out / "feedback" / LORA_FILE).is_file() and (out / LORA_FILE).is_file()
