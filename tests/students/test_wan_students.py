"""Wan (``WanTransformer3DModel``) students: FeatureTap / LayerKD on its blocks (against a hand-run, checkpointing),
the ``"wan-half"`` block-removal preset (teacher init, block map, parameters and FLOPs of Wan2.1-T2V-1.3B on the meta
device against closed forms), LoRA targets and SharedBase views (equal to independent copies, gradients only into
the trained adapter); bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffdistill.errors import OptionError
from diffdistill.students import (
    FLOW_LORA_TARGETS,
    WAN_LORA_TARGETS,
    FeatureTap,
    LayerKD,
    SharedBase,
    TransformerBlockRemovalSpec,
    add_lora,
    build_transformer_student,
    transformer_flops,
    transformer_student_config,
)
from tests.tiny_wan import hand_run, wan_batch
from tests.transformer_configs import WAN21_T2V_1_3B_CONFIG, tiny_sd3_transformer, tiny_wan_transformer

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")


def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    return model(x, t, **cond, return_dict=False)[0]


# ----------------------------------------------------------------------------------------------- taps and KD
def test_feature_tap_records_wan_block_tokens() -> None:
    wan = tiny_wan_transformer()
    x, t, cond = wan_batch()
    ref = hand_run(wan, x, t, cond["encoder_hidden_states"])
    with FeatureTap(wan, [0, "blocks.2"]) as tap, torch.no_grad():
        call(wan, x, t, cond)
        feats = tap.pop()
    assert list(feats) == ["blocks.0", "blocks.2"]
    for name, k in (("blocks.0", 0), ("blocks.2", 2)):
        assert feats[name].shape == (2, 48, 24)  # (B, F'H'W', D): one tensor, image tokens only
        torch.testing.assert_close(feats[name], ref[k], rtol=0, atol=0)


def _kd_reference(student, teacher, pairs, x, t, cond, target) -> torch.Tensor:
    """task MSE + 0.5 output MSE + 0.5 * sum of block-token MSEs (SSD-1B's weights), from hand-runs."""
    text = cond["encoder_hidden_states"]
    s_tokens, t_tokens = hand_run(student, x, t, text), hand_run(teacher, x, t, text)
    with torch.no_grad():
        s_out, t_out = call(student, x, t, cond), call(teacher, x, t, cond)
    feature = sum(
        F.mse_loss(s_tokens[int(s.split(".")[1])], t_tokens[int(tn.split(".")[1])]) for tn, s in pairs.items()
    )
    return F.mse_loss(s_out, target) + 0.5 * F.mse_loss(s_out, t_out) + 0.5 * feature


@pytest.mark.parametrize("ckpt", [False, True])
def test_layer_kd_on_the_wan_half_student(ckpt: bool) -> None:
    teacher = tiny_wan_transformer(num_layers=4)
    student, report = build_transformer_student(teacher, "wan-half", count_flops=False)
    pairs = report.kd_pairs("span_end")  # {teacher block: student block}
    assert pairs == {"blocks.2": "blocks.0", "blocks.3": "blocks.1"}
    x, t, cond = wan_batch()
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    expected = _kd_reference(student, teacher, pairs, x, t, cond, target)
    if ckpt:
        student.enable_gradient_checkpointing()
    with LayerKD(student, teacher, pairs) as kd:
        loss, logs = kd(x, t, target, **cond)
    assert set(logs) >= {"feature/blocks.0", "feature/blocks.1"}
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    loss.backward()
    grads = {n: p.grad for n, p in student.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for n, g in grads.items() if n.startswith("blocks."))
    assert grads["blocks.0.attn1.to_q.weight"].abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_layer_kd_gradients_equal_with_and_without_checkpointing() -> None:
    """Checkpointed blocks recompute the same float32 operations: the KD gradients are equal, and the taps record
    the forward pass only (not the recomputation)."""
    teacher = tiny_wan_transformer(num_layers=4)
    x, t, cond = wan_batch()
    grads = []
    for ckpt in (False, True):
        student, report = build_transformer_student(teacher, "wan-half", count_flops=False)
        if ckpt:
            student.enable_gradient_checkpointing()
        with LayerKD(student, teacher, report.kd_pairs()) as kd:
            loss, _ = kd(x, t, None, **cond)
            loss.backward()
            assert kd.student_tap.calls == {"blocks.0": 1, "blocks.1": 1}
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- block removal
def test_wan_half_copies_the_kept_blocks() -> None:
    teacher = tiny_wan_transformer(num_layers=4)
    student, report = build_transformer_student(teacher, "wan-half", count_flops=False)
    assert report.module_map == {"blocks.0": "blocks.0", "blocks.1": "blocks.3"}
    assert report.removed == ["blocks.1", "blocks.2"] and report.initialized
    assert type(student).__name__ == "WanTransformer3DModel" and student.config.num_layers == 2
    t_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        source = key.replace("blocks.1.", "blocks.3.", 1) if key.startswith("blocks.1.") else key
        assert torch.equal(value, t_state[source]), key
    # Student block 1 fed teacher block 3's input gives teacher block 3's output (a hand-run of both).
    x, t, cond = wan_batch()
    ref = hand_run(teacher, x, t, cond["encoder_hidden_states"])
    with torch.no_grad():
        rotary = teacher.rope(x)
        _, proj, text, _ = teacher.condition_embedder(t, cond["encoder_hidden_states"], None)
        out = student.blocks[1](ref[2], text, proj.unflatten(1, (6, -1)), rotary)
    torch.testing.assert_close(out, ref[3], rtol=0, atol=0)
    # Keeping every block rebuilds the teacher.
    same, _ = build_transformer_student(teacher, TransformerBlockRemovalSpec(), count_flops=False)
    with torch.no_grad():
        assert torch.equal(call(same, x, t, cond), call(teacher, x, t, cond))


def test_wan21_1_3b_report_on_the_meta_device() -> None:
    """Parameters and FLOPs removed by "wan-half" from Wan2.1-T2V-1.3B (30 -> 15 blocks), against closed forms.

    One block (width D = 1536, feed-forward F = 8960): self- and cross-attention q/k/v/out 8 (D^2 + D), their RMS
    q/k norms 4D, the cross-attention norm's weight and bias 2D, the feed-forward 2DF + F + D, the modulation table
    6D: 8D^2 + 2DF + 21D + F parameters. FLOPs at N = 21 x 30 x 52 image tokens (81 frames, 480 x 832) and L = 512
    text tokens: self-attention projections 8ND^2, scores and values 4N^2 D, cross-attention q/out 4ND^2, k/v
    4LD^2, scores and values 4NLD, feed-forward 4NDF."""
    with torch.device("meta"):
        teacher = diffusers.WanTransformer3DModel(**WAN21_T2V_1_3B_CONFIG)
    student, report = build_transformer_student(teacher, "wan-half")
    assert next(student.parameters()).device.type == "meta" and not report.initialized
    d, f, n, length = 1536, 8960, 21 * 30 * 52, 512
    block_params = 8 * d * d + 2 * d * f + 21 * d + f
    block_flops = (
        8 * n * d * d
        + 4 * n * n * d
        + 4 * n * d * d
        + 4 * length * d * d
        + 4 * n * length * d
        + 4 * n * d * f
    )
    assert report.teacher_parameters == 1_418_996_800  # 1.42 B, as flow.md's calc
    assert report.teacher_parameters - report.student_parameters == 15 * block_params
    assert report.teacher_flops - report.student_flops == 15 * block_flops
    assert report.flops_at == {"latent_size": [21, 60, 104], "text_tokens": 512}
    assert round(report.removed_fraction, 4) == 0.4909 and round(report.removed_flops_fraction, 4) == 0.5
    kept = [int(m.split(".")[1]) for m in report.module_map.values()]
    # the blocks the README lists: spread 30 -> 15 meets a tie at j = 7 (14.5), rounded half up to block 15
    assert kept == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]
    assert report.to_dict()["config"]["num_layers"] == 15


def test_wan_block_removal_refusals() -> None:
    wan, sd3 = tiny_wan_transformer(), tiny_sd3_transformer()
    with pytest.raises(
        OptionError, match=r"Expected a preset for WanTransformer3DModel, but 'sd3-half' is for"
    ):
        build_transformer_student(wan, "sd3-half", count_flops=False)
    with pytest.raises(
        OptionError, match=r"Expected a preset for SD3Transformer2DModel, but 'wan-half' is for"
    ):
        build_transformer_student(sd3, "wan-half", count_flops=False)
    with pytest.raises(
        OptionError, match=r"`single_blocks` to be None for a Wan transformer \(one block list\)"
    ):
        build_transformer_student(wan, TransformerBlockRemovalSpec(single_blocks=1), count_flops=False)
    with pytest.raises(
        OptionError, match=r"multiples of the patch size \(1, 2, 2\) of WanTransformer3DModel"
    ):
        build_transformer_student(wan, "wan-half", latent_size=(3, 7, 8))
    with pytest.raises(OptionError, match=r"an int >= 1 \(one square frame\) or \(frames, height, width\)"):
        transformer_flops(wan, latent_size=(3, 8))
    assert (
        transformer_student_config(dict(WAN21_T2V_1_3B_CONFIG), "wan-half")["num_layers"] == 15
    )  # by ffn_dim
    assert transformer_flops(wan, latent_size=8, text_tokens=5) == transformer_flops(
        wan, latent_size=(1, 8, 8), text_tokens=5
    )


# ----------------------------------------------------------------------------------------------- LoRA, SharedBase
def test_wan_lora_targets_adapt_every_attention_projection() -> None:
    wan = add_lora(tiny_wan_transformer(), rank=2, targets=WAN_LORA_TARGETS)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in wan.named_parameters() if ".lora_A." in n}
    expected = {
        f"blocks.{i}.attn{a}.{p}"
        for i in range(3)
        for a in (1, 2)
        for p in ("to_q", "to_k", "to_v", "to_out.0")
    }
    assert adapted == expected
    with pytest.raises(
        OptionError, match=r"Expected `targets` to match module names of WanTransformer3DModel"
    ):
        add_lora(tiny_wan_transformer(), rank=2, targets=FLOW_LORA_TARGETS)  # SD3 / FLUX names (attn., ff.)


def _with_adapters() -> nn.Module:
    wan = tiny_wan_transformer()
    torch.manual_seed(11)
    add_lora(wan, rank=4, targets=WAN_LORA_TARGETS, adapter_name="generator", init_lora_weights=False)
    add_lora(
        wan,
        rank=2,
        alpha=4.0,
        targets=["attn1.to_q", "ffn.net.2"],
        adapter_name="fake",
        init_lora_weights=False,
    )
    return wan


def test_shared_base_views_equal_independent_copies() -> None:
    model = _with_adapters()
    copies = {}
    for keep, drop in (("generator", "fake"), ("fake", "generator")):
        ref = copy.deepcopy(model)
        ref.delete_adapters(drop)
        ref.set_adapter(keep)
        copies[keep] = ref
    plain = tiny_wan_transformer()
    base = SharedBase(model)
    x, t, cond = wan_batch()
    with torch.no_grad():
        for name, ref in copies.items():
            assert torch.equal(call(base.view(name), x, t, cond), call(ref, x, t, cond)), name
        real = call(base.view(None), x, t, cond)
        assert torch.equal(real, call(plain, x, t, cond))
        assert not torch.equal(real, call(base.view("fake"), x, t, cond))
        assert not torch.equal(real, call(base.view("generator"), x, t, cond))


@pytest.mark.parametrize("ckpt", [False, True])
def test_shared_base_gradients_reach_only_the_trained_adapter(ckpt: bool) -> None:
    model = _with_adapters()
    base = SharedBase(model)
    if ckpt:
        base.enable_gradient_checkpointing()
    fake, gen = base.view("fake"), base.view("generator")
    x, t, cond = wan_batch()
    call(fake, x, t, cond).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())
    assert all(p.grad is None for p in gen.parameters())
    trained = {id(p) for p in fake.parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in trained)
    # The real score (adapters off) passes gradients to its input only.
    xi = x.clone().requires_grad_(True)
    call(base.view(None), xi, t, cond).sum().backward()
    assert xi.grad is not None and xi.grad.abs().sum() > 0
    assert all(p.grad is None for p in gen.parameters())
