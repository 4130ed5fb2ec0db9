"""Qwen-Image (``QwenImageTransformer2DModel``) students: the ``"qwen-half"`` block-removal preset (teacher init, block
map, the teacher rebuilt when every block is kept), parameters and FLOPs of Qwen-Image on the meta device, LayerKD on
the image stream of its double-stream blocks, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffdistill.errors import OptionError
from diffdistill.students import (
    FeatureTap,
    LayerKD,
    TransformerBlockRemovalSpec,
    build_transformer_student,
    transformer_flops,
    transformer_student_config,
)
from tests.transformer_configs import QWEN_IMAGE_CONFIG, tiny_qwen_transformer_config

diffusers = pytest.importorskip("diffusers")


def _tiny(num_layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_qwen_transformer_config(num_layers=num_layers)
    return diffusers.QwenImageTransformer2DModel(**config).eval().requires_grad_(False)


def _inputs(batch: int = 2) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(batch, 16, 64, generator=g)  # 8x8 latents packed into a 4x4 grid
    cond = {
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
        "timestep": torch.tensor([0.9, 0.3][:batch]),
        "img_shapes": [[(1, 4, 4)]] * batch,
    }
    return tokens, cond


def _call(model: torch.nn.Module, tokens: torch.Tensor, cond: dict) -> torch.Tensor:
    return model(hidden_states=tokens, return_dict=False, **cond)[0]


def test_qwen_half_copies_the_kept_blocks_and_keeping_all_rebuilds_the_teacher() -> None:
    teacher = _tiny()
    student, report = build_transformer_student(teacher, "qwen-half", count_flops=False)
    assert report.module_map == {
        "transformer_blocks.0": "transformer_blocks.0",
        "transformer_blocks.1": "transformer_blocks.3",
    }
    assert report.removed == ["transformer_blocks.1", "transformer_blocks.2"] and report.initialized
    assert type(student).__name__ == "QwenImageTransformer2DModel" and student.config.num_layers == 2
    t_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        source = key.replace("transformer_blocks.1.", "transformer_blocks.3.", 1)
        assert torch.equal(value, t_state[source]), key
    tokens, cond = _inputs()
    same, _ = build_transformer_student(teacher, TransformerBlockRemovalSpec(), count_flops=False)
    with torch.no_grad():
        assert torch.equal(_call(same.eval(), tokens, cond), _call(teacher, tokens, cond))
    # the first kept block sees the teacher's input: its image stream equals teacher block 0's
    with (
        FeatureTap(teacher, ["transformer_blocks.0"]) as t_tap,
        FeatureTap(student, ["transformer_blocks.0"]) as s_tap,
    ):
        with torch.no_grad():
            _call(teacher, tokens, cond), _call(student.eval(), tokens, cond)
        torch.testing.assert_close(
            s_tap.pop()["transformer_blocks.0"], t_tap.pop()["transformer_blocks.0"], rtol=0, atol=0
        )


class _Denoiser(torch.nn.Module):
    """A Qwen-Image transformer as ``denoiser(tokens, t, **cond)`` (LayerKD calls ``model(x_t, t, **cond)``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, timestep: torch.Tensor, **cond: object) -> torch.Tensor:
        return self.model(hidden_states=tokens, timestep=timestep, return_dict=False, **cond)[0]


def test_layer_kd_on_the_qwen_half_student() -> None:
    """SSD-1B's loss on the Qwen-Image student: task MSE + 0.5 output MSE + 0.5 x the MSE of each student block's
    image stream against its teacher block's (element 1 of the block's ``(text, image)`` output), against the taps'
    own features; gradients reach the student only."""
    teacher = _tiny()
    student, report = build_transformer_student(teacher, "qwen-half", count_flops=False)
    assert report.kd_pairs() == {
        "transformer_blocks.0": "transformer_blocks.0",
        "transformer_blocks.3": "transformer_blocks.1",
    }
    pairs = {f"model.{t}": f"model.{s}" for t, s in report.kd_pairs().items()}
    tokens, cond = _inputs()
    t = cond.pop("timestep")
    target = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(2))
    s_net, t_net = _Denoiser(student), _Denoiser(teacher)
    with FeatureTap(t_net, list(pairs)) as t_tap, FeatureTap(s_net, list(pairs.values())) as s_tap:
        with torch.no_grad():
            t_out, s_out = t_net(tokens, t, **cond), s_net(tokens, t, **cond)
        t_feats, s_feats = t_tap.pop(), s_tap.pop()
    feature = sum(F.mse_loss(s_feats[s], t_feats[k]) for k, s in pairs.items())
    expected = F.mse_loss(s_out, target) + 0.5 * F.mse_loss(s_out, t_out) + 0.5 * feature
    with LayerKD(s_net, t_net, pairs) as kd:
        loss, logs = kd(tokens, t, target, **cond)
    assert set(logs) >= {"feature/model.transformer_blocks.0", "feature/model.transformer_blocks.1"}
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    student.requires_grad_(True)
    with LayerKD(s_net, t_net, pairs) as kd:
        kd(tokens, t, target, **cond)[0].backward()
    assert student.transformer_blocks[1].attn.to_q.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_qwen_image_report_on_the_meta_device() -> None:
    """Qwen-Image (20.43 B parameters, reference/flow.md) -> "qwen-half": 30 of 60 double-stream blocks removed;
    the parameters removed are 30 blocks' and the FLOPs removed at 1024 px (4096 packed tokens, 512 text tokens)
    are half the blocks' share."""
    with torch.device("meta"):
        teacher = diffusers.QwenImageTransformer2DModel(**QWEN_IMAGE_CONFIG)
    student, report = build_transformer_student(teacher, "qwen-half")
    assert next(student.parameters()).device.type == "meta" and not report.initialized
    assert round(report.teacher_parameters / 1e9, 2) == 20.43
    block = sum(p.numel() for p in teacher.transformer_blocks[0].parameters())
    assert report.teacher_parameters - report.student_parameters == 30 * block
    assert report.flops_at == {"latent_size": 128, "text_tokens": 512}
    assert 0.45 < report.removed_flops_fraction <= 0.5 and report.student_flops > 0
    kept = [int(m.split(".")[1]) for m in report.module_map.values()]
    assert len(kept) == 30 and kept[0] == 0 and kept[-1] == 59
    assert transformer_student_config(dict(QWEN_IMAGE_CONFIG), "qwen-half")["num_layers"] == 30  # by its keys


def test_qwen_block_removal_refusals() -> None:
    qwen = _tiny()
    with pytest.raises(
        OptionError, match=r"Expected a preset for QwenImageTransformer2DModel, but 'sd3-half' is for"
    ):
        build_transformer_student(qwen, "sd3-half", count_flops=False)
    with pytest.raises(
        OptionError, match=r"`single_blocks` to be None for a Qwen-Image transformer \(one block list\)"
    ):
        build_transformer_student(qwen, TransformerBlockRemovalSpec(single_blocks=1), count_flops=False)
    with pytest.raises(
        OptionError, match=r"multiple of 2 \(the 2x2 packing of QwenImageTransformer2DModel\)"
    ):
        build_transformer_student(qwen, "qwen-half", latent_size=7)
    assert transformer_flops(qwen, latent_size=8, text_tokens=5) > transformer_flops(
        qwen, latent_size=4, text_tokens=5
    )
