"""Transformer block removal (SD3 joint blocks, FLUX double / single blocks): configs, teacher init, KD pairs,
parameter and FLOP counts (against an independent hand count), the SD3 context-pre-only last block, bad inputs."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from torch import nn

from diffdistill.errors import DTypeError, OptionError
from diffdistill.students import (
    TRANSFORMER_PRESETS,
    FeatureTap,
    LayerKD,
    TransformerBlockRemovalSpec,
    build_transformer_student,
    transformer_flops,
    transformer_student_config,
)

diffusers = pytest.importorskip("diffusers")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transformer_configs import (  # noqa: E402
    FLUX1_DEV_CONFIG,
    SD35_LARGE_CONFIG,
    SD35_MEDIUM_CONFIG,
    tiny_flux_transformer_config,
    tiny_qwen_transformer_config,
    tiny_sd3_transformer_config,
    tiny_wan_transformer_config,
)

TEXT = 5  # text tokens of the tiny inputs


def tiny_sd3(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(**tiny_sd3_transformer_config(**overrides)).eval()


def tiny_flux(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(**tiny_flux_transformer_config(**overrides)).eval()


def sd3_inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    cond = {
        "encoder_hidden_states": torch.randn(batch, TEXT, 16, generator=g),
        "pooled_projections": torch.randn(batch, 16, generator=g),
    }
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([900.0, 250.0][:batch]), cond


def flux_inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(16, 2)
    cond = {
        "encoder_hidden_states": torch.randn(batch, TEXT, 16, generator=g),
        "pooled_projections": torch.randn(batch, 16, generator=g),
        "img_ids": torch.cat([torch.zeros(16, 1), img_ids.float()], 1),
        "txt_ids": torch.zeros(TEXT, 3),
        "guidance": torch.full((batch,), 3.5),
    }
    return torch.randn(batch, 16, 16, generator=g), torch.tensor([0.9, 0.25][:batch]), cond


def count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --- an independent FLOP count: 2 FLOPs per multiply-add of every matrix product, written from the block code ----


def _sd3_block(n: int, m: int, d: int, pre_only: bool, dual: bool) -> int:
    flops = 2 * d * (9 if dual else 6) * d  # norm1 modulation (on the time embedding, batch 1)
    flops += 2 * d * (2 if pre_only else 6) * d  # norm1_context
    flops += 2 * 3 * (n + m) * d * d + 4 * (n + m) ** 2 * d  # q, k, v of both streams; QK^T and AV
    flops += 2 * n * d * d + (0 if pre_only else 2 * m * d * d)  # to_out, to_add_out
    flops += 16 * n * d * d + (0 if pre_only else 16 * m * d * d)  # ff (d -> 4d -> d), ff_context
    if dual:
        flops += 2 * 4 * n * d * d + 4 * n * n * d  # attn2 on the image tokens
    return flops


def sd3_flops_by_hand(config: dict, latent: int, m: int) -> int:
    d, p = config["num_attention_heads"] * config["attention_head_dim"], config["patch_size"]
    n = (latent // p) ** 2
    pooled, joint, layers = (
        config["pooled_projection_dim"],
        config["joint_attention_dim"],
        config["num_layers"],
    )
    dual = set(config.get("dual_attention_layers", ()))
    flops = 2 * n * config["in_channels"] * p * p * d  # patch embedding (a strided conv)
    flops += 2 * (256 * d + d * d + pooled * d + d * d)  # timestep and pooled-text embeddings
    flops += 2 * m * joint * config["caption_projection_dim"]  # context_embedder
    flops += sum(_sd3_block(n, m, d, i == layers - 1, i in dual) for i in range(layers))
    return flops + 2 * d * 2 * d + 2 * n * d * p * p * config["out_channels"]  # norm_out, proj_out


def flux_flops_by_hand(config: dict, latent: int, m: int) -> int:
    d = config["num_attention_heads"] * config["attention_head_dim"]
    n, t, c = (latent // 2) ** 2, (latent // 2) ** 2 + m, config["in_channels"]
    flops = 2 * n * c * d + 2 * m * config["joint_attention_dim"] * d  # x_embedder, context_embedder
    flops += (
        2 * (256 * d + d * d) * (2 if config["guidance_embeds"] else 1)
        + 2 * (config["pooled_projection_dim"] + d) * d
    )
    double = 2 * 2 * d * 6 * d + 2 * 3 * t * d * d + 4 * t * t * d + 2 * t * d * d + 16 * t * d * d
    single = 2 * d * 3 * d + 2 * 3 * t * d * d + 4 * t * t * d + 2 * t * d * 4 * d + 2 * t * 5 * d * d
    flops += config["num_layers"] * double + config["num_single_layers"] * single
    return flops + 2 * d * 2 * d + 2 * n * d * c  # norm_out, proj_out (patch 1, out = in channels)


# --- tests ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_nothing_removed_gives_the_teachers_output(family: str) -> None:
    teacher = tiny_sd3() if family == "sd3" else tiny_flux()
    x, t, cond = sd3_inputs() if family == "sd3" else flux_inputs()
    student, report = build_transformer_student(teacher, TransformerBlockRemovalSpec(), count_flops=False)
    assert report.removed == [] and report.student_parameters == report.teacher_parameters
    assert student.training and type(student) is type(teacher)
    with torch.no_grad():
        torch.testing.assert_close(
            student(x, timestep=t, **cond).sample, teacher(x, timestep=t, **cond).sample, rtol=0, atol=0
        )


def test_sd3_half_keeps_first_and_last_and_copies_their_weights() -> None:
    teacher = tiny_sd3(dual_attention_layers=(0, 1))
    student, report = build_transformer_student(teacher, "sd3-half", count_flops=False)
    assert report.config["num_layers"] == 2 and report.config["dual_attention_layers"] == (0,)
    assert report.module_map == {
        "transformer_blocks.0": "transformer_blocks.0",
        "transformer_blocks.1": "transformer_blocks.3",
    }
    assert report.removed == ["transformer_blocks.1", "transformer_blocks.2"] and report.notes == []
    assert student.transformer_blocks[1].context_pre_only and student.transformer_blocks[0].attn2 is not None
    t_state = teacher.state_dict()
    for key, value in student.state_dict().items():  # every weight comes from its teacher source, unchanged
        src = (
            key.replace("transformer_blocks.1.", "transformer_blocks.3.", 1)
            if key.startswith("transformer_blocks.1.")
            else key
        )
        assert torch.equal(value, t_state[src]), key
    assert report.student_parameters == count(student) and report.teacher_parameters == count(teacher)
    assert report.student_parameters == report.teacher_parameters - count(
        teacher.transformer_blocks[1]
    ) - count(teacher.transformer_blocks[2])


def test_sd3_last_block_removed_becomes_context_pre_only_with_the_teachers_image_output() -> None:
    teacher = tiny_sd3()
    student, report = build_transformer_student(teacher, "sd3-early", count_flops=False)
    assert report.module_map == {
        "transformer_blocks.0": "transformer_blocks.0",
        "transformer_blocks.1": "transformer_blocks.1",
    }
    assert report.removed == ["transformer_blocks.2", "transformer_blocks.3"]
    assert "context-pre-only" in report.notes[0]
    last = student.transformer_blocks[1]
    assert (
        last.context_pre_only
        and last.ff_context is None
        and not teacher.transformer_blocks[1].context_pre_only
    )
    assert report.student_parameters == count(student)
    x, t, cond = sd3_inputs()
    # Both networks run blocks 0 and 1 on identical inputs: the converted block's image stream is the teacher's.
    with torch.no_grad(), FeatureTap(teacher, [0, 1]) as tap_t, FeatureTap(student, [0, 1]) as tap_s:
        teacher(x, timestep=t, **cond)
        out = student(x, timestep=t, **cond).sample
        feats_t, feats_s = tap_t.pop(), tap_s.pop()
    assert out.shape == x.shape
    for name in ("transformer_blocks.0", "transformer_blocks.1"):
        torch.testing.assert_close(feats_s[name], feats_t[name], rtol=1e-6, atol=1e-6)
    # A naive copy (the continuous norm's rows in the teacher's order) would not match: the reordering matters.
    d = 16
    w = teacher.transformer_blocks[1].norm1_context.linear.weight
    assert not torch.equal(last.norm1_context.linear.weight, w[: 2 * d])
    assert torch.equal(last.norm1_context.linear.weight, torch.cat([w[d : 2 * d], w[:d]]))


def test_flux_mini_stride_pairs_student_x_with_teacher_4x() -> None:
    spec = TRANSFORMER_PRESETS["flux-mini"]
    with torch.device("meta"):
        dev = diffusers.FluxTransformer2DModel(**FLUX1_DEV_CONFIG)
    student, report = build_transformer_student(dev, spec, count_flops=False)
    assert not report.initialized and student.device.type == "meta"
    assert (report.config["num_layers"], report.config["num_single_layers"]) == (5, 10)  # Flux-Mini: 5 + 10
    order = [f"transformer_blocks.{i}" for i in range(19)] + [
        f"single_transformer_blocks.{i}" for i in range(38)
    ]
    students = [f"transformer_blocks.{i}" for i in range(5)] + [
        f"single_transformer_blocks.{i}" for i in range(10)
    ]
    assert report.kd_pairs() == {order[4 * x]: students[x] for x in range(15)}
    assert round(report.student_parameters / 1e9, 2) == 3.18  # published: 3.2 B
    assert (
        report.student_parameters == count(student)
        and report.teacher_parameters == count(dev) == 11_901_408_320
    )


def test_flux_lite_8b_depths_and_parameters() -> None:
    with torch.device("meta"):
        dev = diffusers.FluxTransformer2DModel(**FLUX1_DEV_CONFIG)
    student, report = build_transformer_student(dev, "flux-lite-8b", count_flops=False)
    assert (report.config["num_layers"], report.config["num_single_layers"]) == (8, 38)
    assert [report.module_map[f"transformer_blocks.{j}"] for j in range(8)] == [
        f"transformer_blocks.{i}" for i in (0, 3, 5, 8, 10, 13, 15, 18)
    ]
    assert round(report.student_parameters / 1e9, 2) == 8.16  # 16.33 GB in bf16
    assert report.student_parameters == count(student)


@pytest.mark.parametrize(
    ("config", "expected"),
    [(SD35_MEDIUM_CONFIG, (12, (0, 1, 2, 3, 4, 5))), (SD35_LARGE_CONFIG, (19, ()))],
    ids=["sd3.5-medium", "sd3.5-large"],
)
def test_sd35_half_configs(config: dict, expected: tuple) -> None:
    cfg = transformer_student_config({**config, "_class_name": "SD3Transformer2DModel"}, "sd3-half")
    assert (cfg["num_layers"], cfg["dual_attention_layers"]) == expected


def test_kd_pairs_run_in_layer_kd_with_equal_shapes_and_exact_first_pair() -> None:
    teacher = tiny_flux(num_layers=3, num_single_layers=4)  # 7 blocks; stride 3 keeps 0, 3, 6
    student, report = build_transformer_student(
        teacher, TransformerBlockRemovalSpec(stride=3), count_flops=False
    )
    assert report.kd_pairs() == {
        "transformer_blocks.0": "transformer_blocks.0",
        "single_transformer_blocks.0": "single_transformer_blocks.0",
        "single_transformer_blocks.3": "single_transformer_blocks.1",
    }
    t_state = teacher.state_dict()
    for key, value in student.state_dict().items():  # kept blocks by their remapped names, the rest unchanged
        head = ".".join(key.split(".")[:2])
        src = report.module_map[head] + key[len(head) :] if head in report.module_map else key
        assert torch.equal(value, t_state[src]), key
    assert (
        report.student_parameters
        == count(student)
        == count(teacher) - sum(count(teacher.get_submodule(name)) for name in report.removed)
    )
    teacher.requires_grad_(False)
    x, t, cond = flux_inputs()
    with (
        LayerKD(student, teacher, report.kd_pairs()) as kd,
        FeatureTap(student, list(report.kd_pairs().values())) as tap,
    ):
        loss, logs = kd(x, t, target=torch.randn_like(x), **cond)
        shapes = {k: tuple(v.shape) for k, v in tap.pop().items()}
    assert set(shapes.values()) == {(2, 16, 16)}  # image tokens only (16), not 16 + 5 text tokens
    assert logs["feature/transformer_blocks.0"].item() == 0.0  # same weights, same inputs
    assert logs["feature/single_transformer_blocks.0"].item() > 0.0  # its input skipped teacher blocks 1, 2
    loss.backward()
    assert all(p.grad is not None for p in student.transformer_blocks.parameters())


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("spec", ["half", "early"])
def test_flops_equal_an_independent_count(family: str, spec: str) -> None:
    config = (
        tiny_sd3_transformer_config(dual_attention_layers=(1,))
        if family == "sd3"
        else tiny_flux_transformer_config(num_layers=3, num_single_layers=4)
    )
    teacher = (
        tiny_sd3(dual_attention_layers=(1,))
        if family == "sd3"
        else tiny_flux(num_layers=3, num_single_layers=4)
    )
    rule = "spread" if spec == "half" else "first"
    kwargs = {"single_blocks": 0.5} if family == "flux" else {}
    _, report = build_transformer_student(
        teacher, TransformerBlockRemovalSpec(blocks=0.5, rule=rule, **kwargs), latent_size=8, text_tokens=TEXT
    )
    by_hand = sd3_flops_by_hand if family == "sd3" else flux_flops_by_hand
    assert report.teacher_flops == by_hand(config, 8, TEXT)
    assert report.student_flops == by_hand({**config, **report.config}, 8, TEXT)
    assert report.flops_at == {"latent_size": 8, "text_tokens": TEXT}
    assert 0 < report.removed_flops_fraction < 1


def test_published_flux_flops_at_1024() -> None:
    # 57 blocks x 12 d^2 per token x 4608 tokens x 2 + attention 4 T^2 d per block + embeddings (hand count).
    assert transformer_flops(
        {**FLUX1_DEV_CONFIG, "_class_name": "FluxTransformer2DModel"}
    ) == flux_flops_by_hand(FLUX1_DEV_CONFIG, 128, 512)


def test_to_dict_is_json_ready() -> None:
    import json

    _, report = build_transformer_student(
        tiny_sd3(), TransformerBlockRemovalSpec(blocks=(0, -1)), latent_size=8
    )
    record = json.loads(json.dumps(report.to_dict()))
    assert record["spec"]["blocks"] == [0, -1] and record["removed"] == [
        "transformer_blocks.1",
        "transformer_blocks.2",
    ]
    assert record["teacher_flops"] > record["student_flops"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"blocks": "half"}, DTypeError, r"Expected `blocks` to be None \(keep all\), an int"),
        ({"blocks": 0}, OptionError, r"Expected `blocks` to be >= 1"),
        ({"blocks": 1.5}, OptionError, r"Expected the fraction `blocks` to lie in \(0, 1\]"),
        ({"single_blocks": ()}, OptionError, r"Expected `single_blocks` to list at least one block index"),
        ({"blocks": (1, 1)}, OptionError, r"Expected the indices in `blocks` to be distinct"),
        ({"blocks": (0, 1.0)}, DTypeError, r"Expected every entry of `blocks` to be an int block index"),
        ({"rule": "middle"}, OptionError, r"Expected `rule` to be one of \['first', 'last', 'spread'\]"),
        ({"stride": 0}, OptionError, r"Expected `stride` to be >= 1"),
        ({"stride": 2.0}, DTypeError, r"Expected `stride` to be an int or None"),
        ({"stride": 2, "blocks": 2}, OptionError, r"Expected either `stride` or `blocks`"),
        ({"name": 3}, DTypeError, r"Expected `name` to be a string"),
    ],
)
def test_spec_refuses_bad_fields(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        TransformerBlockRemovalSpec(**kwargs)


def test_build_refuses_bad_inputs() -> None:
    sd3, flux = tiny_sd3(), tiny_flux()
    with pytest.raises(DTypeError, match=r"Expected `teacher` to be a torch.nn.Module"):
        build_transformer_student(None, "sd3-half")  # type: ignore[arg-type]
    with pytest.raises(
        DTypeError, match=r"Expected `teacher` to be a diffusers SD3 / FLUX / Qwen-Image / Wan"
    ):
        build_transformer_student(nn.Linear(2, 2), "sd3-half")
    with pytest.raises(
        DTypeError,
        match=r"Expected a diffusers SD3Transformer2DModel, FluxTransformer2DModel, QwenImageTransformer2DModel or",
    ):
        build_transformer_student(
            diffusers.UNet2DModel(
                block_out_channels=(8,),
                down_block_types=("DownBlock2D",),
                up_block_types=("UpBlock2D",),
                norm_num_groups=4,
            ),
            "sd3-half",
        )
    with pytest.raises(OptionError, match=r"Expected `spec` to be one of"):
        build_transformer_student(sd3, "ssd-1b")
    with pytest.raises(DTypeError, match=r"Expected `spec` to be a preset name"):
        build_transformer_student(sd3, 0.5)  # type: ignore[arg-type]
    with pytest.raises(
        OptionError, match=r"Expected a preset for SD3Transformer2DModel, but 'flux-mini' is for"
    ):
        build_transformer_student(sd3, "flux-mini")
    with pytest.raises(OptionError, match=r"Expected `single_blocks` to be None for an SD3 transformer"):
        build_transformer_student(sd3, TransformerBlockRemovalSpec(single_blocks=1))
    with pytest.raises(OptionError, match=r"Expected every index in `blocks` to lie in \[-4, 4\)"):
        build_transformer_student(sd3, TransformerBlockRemovalSpec(blocks=(0, 4)))
    with pytest.raises(OptionError, match=r"Expected the indices in `blocks` to name distinct blocks"):
        build_transformer_student(sd3, TransformerBlockRemovalSpec(blocks=(3, -1)))
    with pytest.raises(
        OptionError, match=r"Expected `blocks` to keep at most the teacher's 4 blocks, but it keeps 5"
    ):
        build_transformer_student(sd3, TransformerBlockRemovalSpec(blocks=5))
    with pytest.raises(OptionError, match=r"Expected `rule` to return 1 distinct indices in \[0, 2\)"):
        build_transformer_student(flux, TransformerBlockRemovalSpec(blocks=1, rule=lambda n, k: [n]))
    with pytest.raises(
        OptionError, match=r"keep at least one of the teacher's 3 `single_transformer_blocks`"
    ):
        build_transformer_student(flux, TransformerBlockRemovalSpec(stride=6))
    with pytest.raises(OptionError, match=r"Expected `latent_size` to be a multiple of 2"):
        build_transformer_student(flux, "flux-mini", latent_size=7)
    with pytest.raises(OptionError, match=r"Expected `text_tokens` to be an int >= 1, but got 0"):
        build_transformer_student(sd3, "sd3-half", text_tokens=0)
    with pytest.raises(DTypeError, match=r"Expected `init_weights` to be True or False"):
        build_transformer_student(sd3, "sd3-half", init_weights=1)  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"Expected `teacher_config` to be a mapping"):
        transformer_student_config(None, "sd3-half")  # type: ignore[arg-type]
    with pytest.raises(
        DTypeError, match=r"Expected `model` to be a diffusers SD3 / FLUX transformer or its config"
    ):
        transformer_flops(nn.Linear(2, 2))


def test_span_end_pairs_match_the_last_teacher_block_of_each_span() -> None:
    teacher = tiny_flux(num_layers=3, num_single_layers=4)
    student, report = build_transformer_student(
        teacher, TransformerBlockRemovalSpec(blocks=(1,), single_blocks=(1,)), count_flops=False
    )
    # student double 0 <- teacher double 1 stands for teacher blocks 1, 2 and single 0 (before single 1 is kept);
    # student single 0 <- teacher single 1 stands for singles 1 .. 3, the teacher's last block.
    assert report.kd_pairs("span_end") == {
        "single_transformer_blocks.0": "transformer_blocks.0",
        "single_transformer_blocks.3": "single_transformer_blocks.0",
    }
    assert report.kd_pairs() == {
        "transformer_blocks.1": "transformer_blocks.0",
        "single_transformer_blocks.1": "single_transformer_blocks.0",
    }
    teacher.requires_grad_(False)
    x, t, cond = flux_inputs()
    with LayerKD(student, teacher, report.kd_pairs("span_end")) as kd:
        loss, logs = kd(x, t, **cond)
    assert torch.isfinite(loss) and logs["feature/transformer_blocks.0"].item() > 0
    with pytest.raises(OptionError, match=r"Expected `target` to be one of \['source', 'span_end'\]"):
        report.kd_pairs("end")  # type: ignore[arg-type]


_FAMILY_CONFIGS = {
    "SD3Transformer2DModel": tiny_sd3_transformer_config(num_layers=24),
    "FluxTransformer2DModel": tiny_flux_transformer_config(num_layers=19, num_single_layers=38),
    "WanTransformer3DModel": tiny_wan_transformer_config(num_layers=30),
    "QwenImageTransformer2DModel": tiny_qwen_transformer_config(num_layers=60),
}
_PRESET_FAMILY = {
    "flux-lite-8b": "FluxTransformer2DModel",
    "flux-mini": "FluxTransformer2DModel",
    "sd3-half": "SD3Transformer2DModel",
    "sd3-early": "SD3Transformer2DModel",
    "wan-half": "WanTransformer3DModel",
    "qwen-half": "QwenImageTransformer2DModel",
}


@pytest.mark.parametrize("family", sorted(_FAMILY_CONFIGS))
@pytest.mark.parametrize("preset", sorted(TRANSFORMER_PRESETS))
def test_transformer_student_config_refuses_a_preset_of_another_family(preset: str, family: str) -> None:
    # Audit 2, item 4: the config-only path refuses what build_transformer_student refuses (an SD3 config with
    # "flux-mini" gave a 6-block SD3 student silently).
    assert set(_PRESET_FAMILY) == set(TRANSFORMER_PRESETS)
    config = _FAMILY_CONFIGS[family]
    if _PRESET_FAMILY[preset] == family:
        assert transformer_student_config(config, preset)["num_layers"] < config["num_layers"]
        return
    with pytest.raises(OptionError, match=rf"Expected a preset for {family}, but '{preset}' is for"):
        transformer_student_config(config, preset)
    with pytest.raises(OptionError, match=rf"Expected a preset for {family}, but '{preset}' is for"):
        transformer_student_config(config, TRANSFORMER_PRESETS[preset].replace(rule="first"))


def test_spread_rule_rounds_ties_half_up_as_unet_block_removal() -> None:
    # Audit 2, item 9: the UNet rule rounded ties to even (6 -> 3 kept [0, 2, 5]), the transformer rule half
    # up ([0, 3, 5]); both now use one rule. Oracle: exact fractions, floor(j (n - 1) / (k - 1) + 1/2).
    from fractions import Fraction

    from diffdistill.students import BlockRemovalSpec, removed_units
    from diffdistill.students.block_removal import _spread_indices

    def oracle(n: int, k: int) -> list[int]:
        return (
            [0] if k == 1 else [math.floor(Fraction(j * (n - 1), k - 1) + Fraction(1, 2)) for j in range(k)]
        )

    for n in range(1, 41):
        for k in range(1, n + 1):
            assert _spread_indices(n, k) == oracle(n, k), (n, k)
    assert oracle(6, 3) == [0, 3, 5]
    # the transformer path
    sd3 = tiny_sd3(num_layers=6)
    _, report = build_transformer_student(sd3, TransformerBlockRemovalSpec(blocks=3), count_flops=False)
    assert list(report.module_map.values()) == [f"transformer_blocks.{i}" for i in (0, 3, 5)]
    # the UNet path: a level-1 attention of depth 6 keeps 3 transformer layers
    unet_config = {
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [8, 16],
        "norm_num_groups": 4,
        "cross_attention_dim": 8,
        "attention_head_dim": 4,
        "transformer_layers_per_block": [1, 6],
    }
    spec = BlockRemovalSpec(down_transformer_layers=(None, 3), mid_block="resnet")
    gone = [u for u in removed_units(unet_config, spec) if not u.startswith("mid_block")]
    assert gone == [f"down_blocks.1.attentions.{a}.transformer_blocks.{b}" for a in (0, 1) for b in (1, 2, 4)]
