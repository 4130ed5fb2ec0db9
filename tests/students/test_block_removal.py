"""Block removal: presets on tiny SDXL/SD1.5-structured UNets and on the real configs (meta device)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from diffdistill._checks import DTypeError, OptionError, ShapeError
from diffdistill.discriminators import sdxl_unet_config
from diffdistill.students import (
    PRESETS,
    ROUND_GROUPS,
    BlockRemovalChain,
    BlockRemovalSpec,
    build_student,
    infer_chain,
    init_from_teacher,
    remove_blocks,
    removed_units,
    split_rounds,
    start_chain,
    student_config,
    unet_flops,
)

diffusers = pytest.importorskip("diffusers")

# The published SDXL base UNet config (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json).
SDXL = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
# runwayml/stable-diffusion-v1-5 unet/config.json (the fields that differ from the defaults).
SD15 = {
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "sample_size": 64,
}
# SDXL's block structure (incl. 10-layer transformers at level 2), tiny widths.
TINY_SDXL = {
    **SDXL,
    "attention_head_dim": [2, 4, 4],
    "block_out_channels": [32, 64, 64],
    "cross_attention_dim": 32,
    "addition_embed_type_num_heads": 4,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "norm_num_groups": 8,
    "sample_size": 16,
}
TINY_SD15 = {
    **SD15,
    "attention_head_dim": 2,
    "block_out_channels": [16, 32, 64, 64],
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "sample_size": 16,
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(config: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel.from_config(config)


def on_meta(config: dict) -> nn.Module:
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel.from_config(config)


def sdxl_inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(batch, 4, 16, 16, generator=g),
        torch.tensor([999, 10][:batch]),
        {
            "encoder_hidden_states": torch.randn(batch, 3, 32, generator=g),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(batch, 32, generator=g),
                "time_ids": torch.rand(batch, 6, generator=g),
            },
        },
    )


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def assert_kept_weights_equal(student: nn.Module, teacher: nn.Module, module_map: dict[str, str]) -> None:
    """Every mapped resnet / attention / transformer block / sampler equals its teacher source."""
    for s_name, t_name in module_map.items():
        if s_name.count(".") < 2:  # whole blocks: checked through their parts
            continue
        t_sd = teacher.get_submodule(t_name).state_dict()
        for key, value in student.get_submodule(s_name).state_dict().items():
            if key.startswith("transformer_blocks."):  # a subset: checked by the transformer_blocks entries
                continue
            assert torch.equal(value, t_sd[key]), f"{s_name}.{key} != {t_name}.{key}"
    for name in ("conv_in", "time_embedding", "conv_norm_out", "conv_out"):
        for key, value in student.get_submodule(name).state_dict().items():
            assert torch.equal(value, teacher.get_submodule(name).state_dict()[key])


SSD1B_TINY_REMOVED = sorted(
    [f"down_blocks.2.attentions.{a}.transformer_blocks.{b}" for a in (0, 1) for b in (1, 2, 4, 5, 7, 8)]
    + ["mid_block.attentions.0", "mid_block.resnets.1"]
    + [f"up_blocks.0.attentions.{a}.transformer_blocks.{b}" for a in (0, 1) for b in (1, 2, 4, 5, 7, 8)]
    + [f"up_blocks.1.attentions.{a}.transformer_blocks.1" for a in (1, 2)]
)


def test_ssd1b_preset_on_tiny_sdxl_structure() -> None:
    teacher = build(TINY_SDXL)
    student, report = build_student(teacher, "ssd-1b")
    cfg = report.config
    assert cfg["transformer_layers_per_block"] == [1, 2, 4]
    assert cfg["reverse_transformer_layers_per_block"] == [[4, 4, 10], [2, 1, 1], 1]
    assert cfg["mid_block_type"] == "UNetMidBlock2D" and cfg["layers_per_block"] == 2
    # Exactly the documented blocks are removed ...
    assert report.removed == SSD1B_TINY_REMOVED
    # ... and the parameter count drops by exactly their size.
    removed_params = sum(n_params(teacher.get_submodule(name)) for name in SSD1B_TINY_REMOVED)
    assert report.teacher_parameters == n_params(teacher)
    assert report.student_parameters == n_params(student) == n_params(teacher) - removed_params
    assert report.removed_fraction == pytest.approx(removed_params / n_params(teacher))
    # Kept transformer layers are evenly spread (first and last kept).
    assert report.module_map["down_blocks.2.attentions.1.transformer_blocks.3"] == (
        "down_blocks.2.attentions.1.transformer_blocks.9"
    )
    assert report.module_map["up_blocks.0.attentions.2.transformer_blocks.9"] == (
        "up_blocks.0.attentions.2.transformer_blocks.9"
    )
    assert report.initialized
    assert_kept_weights_equal(student, teacher, report.module_map)
    x, t, cond = sdxl_inputs()
    with torch.no_grad():
        out = student(x, t, **cond).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_student_config_is_diffusers_loadable(tmp_path) -> None:
    teacher = build(TINY_SDXL)
    student, report = build_student(teacher, "vega")
    reloaded_cfg = json.loads(json.dumps(report.config))
    assert reloaded_cfg["transformer_layers_per_block"] == [1, 1, 2]
    assert reloaded_cfg["reverse_transformer_layers_per_block"] is None  # Vega is symmetric
    student.save_pretrained(tmp_path)
    loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path)
    x, t, cond = sdxl_inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, **cond).sample, student(x, t, **cond).sample)
    assert json.dumps(report.to_dict())  # serialisable report


def test_two_level_tiny_ssd1b_removes_documented_units() -> None:
    cfg = {
        **TINY_SDXL,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [2, 4],
        "transformer_layers_per_block": [1, 2],
    }
    teacher = on_meta(cfg)
    student, report = build_student(teacher, "ssd-1b")
    assert not report.initialized and student.device.type == "meta"
    assert report.removed == [
        "mid_block.attentions.0",
        "mid_block.resnets.1",
        "up_blocks.0.attentions.1.transformer_blocks.1",
        "up_blocks.0.attentions.2.transformer_blocks.1",
    ]
    assert report.config["reverse_transformer_layers_per_block"] == [[2, 1, 1], 1]


@pytest.mark.parametrize(
    ("config", "preset", "published"),
    [
        (SDXL, None, 2.57e9),
        (SDXL, "ssd-1b", 1.3e9),
        (SDXL, "vega", 0.74e9),
        (SD15, "bk-sdm-base", 0.58e9),
        (SD15, "bk-sdm-small", 0.49e9),
        (SD15, "bk-sdm-tiny", 0.33e9),
    ],
)
def test_presets_on_real_configs_match_published_sizes(
    config: dict, preset: str | None, published: float
) -> None:
    teacher = on_meta(config)
    if preset is None:
        count = n_params(teacher)
    else:
        student, report = build_student(teacher, preset)
        count = report.student_parameters
        assert count == n_params(student)
    assert abs(count - published) / published < 0.03, f"{preset}: {count / 1e9:.3f}B vs {published / 1e9}B"


def test_vega_parts_match_published_breakdown() -> None:
    student, _ = build_student(on_meta(SDXL), "vega")
    parts = [n_params(student.down_blocks), n_params(student.mid_block), n_params(student.up_blocks)]
    assert [round(p / 1e6) for p in parts] == [247, 31, 460]  # openvino PR #1553: 247M / 31M / 460M


@pytest.mark.parametrize("preset", ["bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny"])
def test_bk_sdm_presets_on_tiny_sd15(preset: str) -> None:
    teacher = build(TINY_SD15)
    student, report = build_student(teacher, preset)
    cfg = report.config
    assert cfg["layers_per_block"] == 1
    if preset == "bk-sdm-tiny":
        assert cfg["block_out_channels"] == [16, 32, 64] and cfg["mid_block_type"] is None
        assert cfg["down_block_types"] == ["CrossAttnDownBlock2D"] * 3
        assert cfg["up_block_types"] == ["CrossAttnUpBlock2D"] * 3
        assert "down_blocks.3" in report.removed and "up_blocks.0" in report.removed
        assert "down_blocks.2.downsamplers.0" in report.removed
        # distill-sd: up blocks shift by one; each keeps its first and third resnet.
        assert report.module_map["up_blocks.0.resnets.1"] == "up_blocks.1.resnets.2"
    else:
        assert report.module_map["up_blocks.1.resnets.1"] == "up_blocks.1.resnets.2"
        assert ("mid_block" in report.removed) == (preset == "bk-sdm-small")
    assert "down_blocks.0.resnets.1" in report.removed and "down_blocks.0.attentions.1" in report.removed
    assert_kept_weights_equal(student, teacher, report.module_map)
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        out = student(x, torch.tensor([500]), encoder_hidden_states=torch.randn(1, 3, 32)).sample
    assert out.shape == x.shape


def test_kd_pairs_levels() -> None:
    _, report = build_student(on_meta(TINY_SDXL), "ssd-1b")
    block = report.kd_pairs("block")
    assert block == {
        "down_blocks.0": "down_blocks.0",
        "down_blocks.1": "down_blocks.1",
        "down_blocks.2": "down_blocks.2",
        "up_blocks.0": "up_blocks.0",
        "up_blocks.1": "up_blocks.1",
        "up_blocks.2": "up_blocks.2",
        "mid_block": "mid_block",
    }
    sub = report.kd_pairs()
    assert sub["mid_block"] == "mid_block.resnets.0"  # teacher's whole mid block <-> student's one resnet
    assert sub["up_blocks.1.attentions.2"] == "up_blocks.1.attentions.2"
    assert sum(".resnets." in k for k in sub) == 6 + 9
    assert not any("transformer_blocks" in k for k in sub)
    layer = report.kd_pairs("layer")
    assert (
        layer["down_blocks.2.attentions.0.transformer_blocks.3"]
        == "down_blocks.2.attentions.0.transformer_blocks.1"
    )
    with pytest.raises(OptionError, match=r"Expected `level` to be one of"):
        report.kd_pairs("stage")  # type: ignore[arg-type]


def test_custom_spec_resnets_and_keep_rules() -> None:
    spec = BlockRemovalSpec(
        layers_per_block=(1, 1),
        down_transformer_layers=(None, 1, 3),
        up_transformer_layers=(None, (2, 1)),
        keep_transformer_layers="last",
        mid_block="resnet",  # the innermost depth changes: a kept mid block would shrink with it
    )
    cfg = student_config(TINY_SDXL, spec)
    assert cfg["layers_per_block"] == [1, 1, 2]
    assert cfg["transformer_layers_per_block"] == [1, 1, 3]
    assert cfg["reverse_transformer_layers_per_block"] == [10, [2, 1], 1]
    _, report = build_student(on_meta(TINY_SDXL), spec)
    assert report.module_map["down_blocks.1.attentions.0.transformer_blocks.0"].endswith(
        "transformer_blocks.1"
    )
    assert report.module_map["down_blocks.2.attentions.0.transformer_blocks.0"].endswith(
        "transformer_blocks.7"
    )
    assert report.module_map["up_blocks.1.resnets.1"] == "up_blocks.1.resnets.2"
    assert report.module_map["up_blocks.1.attentions.1.transformer_blocks.0"] == (
        "up_blocks.1.attentions.2.transformer_blocks.1"  # "last" of 2
    )
    first = PRESETS["ssd-1b"].replace(keep_transformer_layers="first")
    _, report = build_student(on_meta(TINY_SDXL), first)
    assert report.module_map["down_blocks.2.attentions.0.transformer_blocks.3"].endswith(
        "transformer_blocks.3"
    )
    odd = PRESETS["ssd-1b"].replace(keep_transformer_layers=lambda d, k: list(range(d - 1, d - 1 - k, -1)))
    _, report = build_student(on_meta(TINY_SDXL), odd)
    assert report.module_map["down_blocks.2.attentions.0.transformer_blocks.0"].endswith(
        "transformer_blocks.6"
    )
    # An unchanged spec gives the teacher's config back.
    same = student_config(TINY_SDXL, BlockRemovalSpec())
    assert same["transformer_layers_per_block"] == [1, 2, 10]
    assert same["reverse_transformer_layers_per_block"] is None


def test_spec_errors() -> None:
    with pytest.raises(OptionError, match=r"Expected `spec` to be one of \['bk-sdm-base'"):
        student_config(TINY_SDXL, "ssd-2b")
    with pytest.raises(DTypeError, match=r"preset name or a BlockRemovalSpec"):
        student_config(TINY_SDXL, 3)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"to lie in \[1, 2\] \(the teacher's depth\), but got 3"):
        student_config(TINY_SDXL, BlockRemovalSpec(down_transformer_layers=(None, 3)))
    with pytest.raises(OptionError, match=r"fraction `down_transformer_layers\[2\]` to lie in \(0, 1\]"):
        student_config(TINY_SDXL, BlockRemovalSpec(down_transformer_layers=(None, None, 1.5)))
    with pytest.raises(OptionError, match=r"to list 3 per-layer depths \(the student's layers\), but got 2"):
        student_config(TINY_SDXL, BlockRemovalSpec(up_transformer_layers=(None, (1, 1))))
    with pytest.raises(OptionError, match=r"`layers_per_block\[0\]` to lie in \[1, 2\]"):
        student_config(TINY_SDXL, BlockRemovalSpec(layers_per_block=(3,)))
    # A depth for a level without attention (SDXL's level 0, DownBlock2D / UpBlock2D) is refused, not dropped.
    with pytest.raises(
        OptionError, match=r"`down_transformer_layers\[0\]` to be None: level 0 \(DownBlock2D\) has"
    ):
        student_config(TINY_SDXL, BlockRemovalSpec(down_transformer_layers=(3,)))
    with pytest.raises(OptionError, match=r"`up_transformer_layers\[0\]` to be None: level 0 \(UpBlock2D\)"):
        student_config(TINY_SDXL, BlockRemovalSpec(up_transformer_layers=(0.5, None, None)))
    with pytest.raises(OptionError, match=r"innermost levels to have the same width"):
        student_config(
            {**TINY_SDXL, "block_out_channels": [32, 64, 128]}, BlockRemovalSpec(drop_innermost=True)
        )
    # diffusers ties the mid block's depth to the innermost level's: "keep" must not shrink it silently
    with pytest.raises(
        OptionError,
        match=r"innermost level to keep the teacher's transformer depth \(10\) with mid_block='keep'.*get 4 of",
    ):
        student_config(sdxl_unet_config(), BlockRemovalSpec(down_transformer_layers=(None, None, 0.4)))
    with pytest.raises(OptionError, match=r"Expected `mid_block` to be one of"):
        student_config(TINY_SDXL, BlockRemovalSpec(mid_block="half"))  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"to return 2 distinct indices in \[0, 2\)"):
        student_config(TINY_SDXL, BlockRemovalSpec(keep_transformer_layers=lambda d, k: [0] * k))
    with pytest.raises(OptionError, match=r"as many `down_block_types` as `up_block_types`"):
        student_config({"down_block_types": ["DownBlock2D"]}, "ssd-1b")
    with pytest.raises(DTypeError, match=r"diffusers UNet2DConditionModel \(with a `.config`\)"):
        build_student(nn.Linear(2, 2), "ssd-1b")


def test_init_from_teacher_errors() -> None:
    teacher = nn.Sequential(nn.Linear(2, 3))
    with pytest.raises(
        OptionError, match=r"Expected the teacher to have `1.weight` \(source of student `0.weight`\)"
    ):
        init_from_teacher(nn.Sequential(nn.Linear(2, 3)), teacher, {"0": "1"})
    with pytest.raises(ShapeError, match=r"teacher `0.weight` and student `0.weight` to have the same shape"):
        init_from_teacher(nn.Sequential(nn.Linear(2, 4)), teacher, {})


def test_more_config_errors() -> None:
    with pytest.raises(
        OptionError, match=r"Expected `layers_per_block` to have 3 entries \(one per block\), but got 2"
    ):
        student_config({**TINY_SDXL, "layers_per_block": [2, 2]}, "ssd-1b")
    with pytest.raises(OptionError, match=r"`transformer_layers_per_block\[2\]` to list 2 layer depths"):
        student_config({**TINY_SDXL, "transformer_layers_per_block": [1, 2, [1, 2, 3]]}, "ssd-1b")
    with pytest.raises(
        DTypeError,
        match=r"`down_transformer_layers\[1\]` to be an int \(layers kept\), a float .* but got str",
    ):
        student_config(TINY_SDXL, BlockRemovalSpec(down_transformer_layers=(None, "2")))  # type: ignore[arg-type]
    with pytest.raises(
        OptionError, match=r"`keep_transformer_layers` to be one of \['first', 'last', 'spread'\]"
    ):
        student_config(TINY_SDXL, PRESETS["vega"].replace(keep_transformer_layers="middle"))
    with pytest.raises(OptionError, match=r"at least two levels for `drop_innermost=True`"):
        student_config(
            {"down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"], "block_out_channels": [8]},
            BlockRemovalSpec(drop_innermost=True),
        )
    with pytest.raises(
        OptionError, match=r"teacher mid block of type UNetMidBlock2DCrossAttn or UNetMidBlock2D"
    ):
        student_config({**TINY_SDXL, "mid_block_type": None}, "ssd-1b")


# --- bad inputs (issue 18): refused at the boundary, with the argument's name and a fix ---


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        # int() truncated 1.5 and "1" before
        (
            {"layers_per_block": (1.5,)},
            DTypeError,
            r"`layers_per_block\[0\]` to be an int \(a resnet count\)",
        ),
        ({"layers_per_block": ("1",)}, DTypeError, r"`layers_per_block\[0\]` to be an int"),
        ({"layers_per_block": 1}, DTypeError, r"`layers_per_block` to be a per-level tuple .* got int 1"),
        ({"layers_per_block": (0,)}, OptionError, r"`layers_per_block\[0\]` to be >= 1"),
        ({"down_transformer_layers": 2}, DTypeError, r"`down_transformer_layers` to be a per-level tuple"),
        (
            {"up_transformer_layers": (None, (1, "a"))},
            DTypeError,
            r"`up_transformer_layers\[1\]\[1\]` to be an int",
        ),
        ({"down_transformer_layers": (None, 0)}, OptionError, r"`down_transformer_layers\[1\]` to be >= 1"),
        (
            {"down_transformer_layers": (None, float("nan"))},
            OptionError,
            r"fraction `down_transformer_layers\[1\]`",
        ),
        (
            {"drop_innermost": "yes"},
            DTypeError,
            r"`drop_innermost` to be True or False, but got str",
        ),  # truthy before
        ({"name": 3}, DTypeError, r"Expected `name` to be a string, but got int"),
        ({"keep_transformer_layers": "middle"}, OptionError, r"`keep_transformer_layers` to be one of"),
    ],
)
def test_spec_is_checked_at_construction(fields, error, match) -> None:
    with pytest.raises(error, match=match):
        BlockRemovalSpec(**fields)


def test_spec_replace_refuses_unknown_fields() -> None:
    with pytest.raises(OptionError, match=r"Expected fields of BlockRemovalSpec .* but got \['mid'\]"):
        PRESETS["vega"].replace(mid="resnet")


def test_student_config_refuses_bad_configs(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(DTypeError, match=r"Expected `teacher_config` to be a UNet2DConditionModel config"):
        student_config(None, "ssd-1b")  # type: ignore[arg-type]
    with pytest.raises(
        OptionError, match=r"`down_block_types` and `up_block_types` .* lists of block type names"
    ):
        student_config({**TINY_SDXL, "down_block_types": "DownBlock2D"}, "ssd-1b")
    with pytest.raises(
        OptionError, match=r"config's `transformer_layers_per_block\[1\]` to hold ints, but got str"
    ):
        student_config({**TINY_SDXL, "transformer_layers_per_block": [1, "2", 10]}, "ssd-1b")
    # a custom spec with more levels than the teacher: the extra entries are ignored, and said so
    with caplog.at_level("WARNING", logger="diffdistill.students.block_removal"):
        student_config(TINY_SDXL, BlockRemovalSpec(down_transformer_layers=(None, None, None, 2)))
    assert any("past level 2 ([2]) are ignored" in r.getMessage() for r in caplog.records)


def test_init_from_teacher_refuses_another_architecture_and_meta_networks() -> None:
    teacher = build(TINY_SDXL)
    student, report = build_student(teacher, "ssd-1b")
    narrower = build({**TINY_SDXL, "block_out_channels": [16, 32, 32]})
    with pytest.raises(
        ShapeError, match=r"the student was not derived from this teacher .* build_student\(teacher"
    ):
        init_from_teacher(student, narrower, report.module_map)
    shallower = build({**TINY_SDXL, "transformer_layers_per_block": [1, 1, 2]})
    with pytest.raises(
        OptionError, match=r"Expected the teacher to have .*\(a teacher of another architecture\)"
    ):
        init_from_teacher(student, shallower, report.module_map)
    with pytest.raises(
        OptionError, match=r"Expected the teacher to hold weights, but it is on the meta device"
    ):
        init_from_teacher(student, on_meta(TINY_SDXL), report.module_map)  # torch's "Cannot copy out of meta"
    with pytest.raises(
        OptionError, match=r"Expected the student to hold weights, but it is on the meta device"
    ):
        init_from_teacher(on_meta(report.config), teacher, report.module_map)  # a silent no-op before
    with pytest.raises(DTypeError, match=r"Expected `module_map` to map student module names .* got list"):
        init_from_teacher(student, teacher, ["mid_block"])  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"Expected `student` to be a torch.nn.Module, but got NoneType"):
        init_from_teacher(None, teacher, {})  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"Expected `init_weights` to be True or False, but got str"):
        build_student(teacher, "ssd-1b", init_weights="no")  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"Expected `teacher` to be a torch.nn.Module, but got NoneType"):
        build_student(None, "ssd-1b")  # type: ignore[arg-type]


# --- progressive rounds (issue 19 part 3): each round removes blocks from the previous round's student ---

TWO_LEVEL = {
    **TINY_SDXL,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [2, 4],
    "transformer_layers_per_block": [1, 4],
    "sample_size": 8,
}


def _chain_through(teacher: nn.Module, rounds: list[list[str]], *, flops: bool = False):
    chain = start_chain(teacher, count_flops=flops)
    student = teacher
    for units in rounds:
        student, chain = remove_blocks(student, chain, units, count_flops=flops)
    return student, chain


@pytest.mark.parametrize(
    ("config", "preset", "groups"),
    [  # the default groups of every preset: test_default_rounds_of_every_preset_are_each_buildable
        (TINY_SDXL, "vega", (("up_blocks",), ("mid_block", "down_blocks"))),
        (
            TINY_SD15,
            "bk-sdm-tiny",
            (
                ("mid_block",),
                ("down_blocks.3", "up_blocks.0", "down_blocks.2.downsamplers"),
                ("down_blocks", "up_blocks"),
            ),
        ),
    ],
)
def test_rounds_of_a_preset_end_at_the_preset_student(config: dict, preset: str, groups) -> None:
    rounds = split_rounds(config, preset, groups)
    assert sorted(u for r in rounds for u in r) == removed_units(config, preset)
    for units, group in zip(rounds, groups):
        assert units and all(any(u == p or u.startswith(p + ".") for p in group) for u in units)
    student, chain = _chain_through(on_meta(config), rounds)
    _, report = build_student(on_meta(config), preset)
    assert student.config == on_meta(report.config).config
    assert chain.rounds[-1].module_map == report.module_map
    assert chain.removed == report.removed
    assert chain.kd_pairs("layer") == report.kd_pairs("layer")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_default_rounds_of_every_preset_are_each_buildable(preset: str) -> None:
    # Audit 2, item 5: with the default groups, BK-SDM's down-path round was refused by remove_blocks (its down
    # resnets need the up resnets of their level, which the default put in round 3). Each preset on the
    # tiny config of the teacher it was published for.
    config = TINY_SD15 if preset.startswith("bk-sdm") else TINY_SDXL
    teacher = on_meta(config)
    rounds = split_rounds(config, preset)
    assert len(rounds) == len(ROUND_GROUPS)
    assert sorted(u for r in rounds for u in r) == removed_units(config, preset)
    student, chain = _chain_through(teacher, rounds)  # remove_blocks refuses an unloadable round
    assert [r.removed for r in chain.rounds] == rounds
    _, report = build_student(teacher, preset)
    expected = json.loads(json.dumps({k: v for k, v in report.config.items() if not k.startswith("_")}))
    assert json.loads(json.dumps({k: student.config[k] for k in expected})) == expected == chain.config
    assert chain.rounds[-1].module_map == report.module_map
    assert chain.removed == report.removed
    assert chain.kd_pairs("layer") == report.kd_pairs("layer")
    if preset.startswith("bk-sdm"):  # the up path goes with the down path (ROUND_GROUPS' docstring)
        assert rounds[2] == [] and any(u.startswith("up_blocks") for u in rounds[1])
        assert (rounds[0] == []) == (preset == "bk-sdm-base")
    else:  # SSD-1B / Vega: each round holds what its group names
        for units, group in zip(rounds, ROUND_GROUPS):
            assert units and all(u.startswith(group[0] + ".") for u in units)


def test_bk_sdm_rounds_copy_the_weights_build_student_copies() -> None:
    teacher = build(TINY_SD15)
    student, _ = _chain_through(teacher, split_rounds(TINY_SD15, "bk-sdm-tiny"))
    expected, _ = build_student(teacher, "bk-sdm-tiny")
    got, want = student.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_split_rounds_refuses_a_round_that_removes_units_too_early() -> None:
    # BK-SDM's up resnets can only go with the down resnets of their level (layers_per_block + 1 per up
    # block): an up-path round before the down path is refused, naming the units; no later unit is pulled in.
    with pytest.raises(
        OptionError,
        match=r"round 1 \(\['up_blocks'\]\) removes \['up_blocks\.0\.resnets\.1', 'up_blocks\.1\.attentions\.1', ",
    ):
        split_rounds(TINY_SD15, "bk-sdm-base", (("up_blocks",), ("mid_block", "down_blocks")))


def test_each_round_starts_from_the_previous_rounds_student() -> None:
    teacher = build(TINY_SDXL)
    rounds = split_rounds(TINY_SDXL, "ssd-1b")
    assert rounds[0] == ["mid_block.attentions.0", "mid_block.resnets.1"]
    chain = start_chain(teacher, count_flops=False)
    s1, chain = remove_blocks(teacher, chain, rounds[0], count_flops=False)
    assert s1.config.mid_block_type == "UNetMidBlock2D"
    # "train" round 1: every weight of the round-1 student moves away from the source's
    with torch.no_grad():
        for p in s1.parameters():
            p.add_(0.01)
    s2, chain = remove_blocks(s1, chain, rounds[1], count_flops=False)
    m2 = chain.rounds[-1].module_map
    # round 2's kept down-path transformer layers come from the round-1 student (names are the source's, and
    # round 1 kept the source's names there), not from the source
    kept = m2["down_blocks.2.attentions.0.transformer_blocks.1"]
    assert kept == "down_blocks.2.attentions.0.transformer_blocks.3"  # spread 10 -> 4: 0, 3, 6, 9
    assert torch.equal(
        s2.get_submodule("down_blocks.2.attentions.0.transformer_blocks.1").ff.net[2].weight,
        s1.get_submodule(kept).ff.net[2].weight,
    )
    assert torch.equal(s2.mid_block.resnets[0].conv1.weight, s1.mid_block.resnets[0].conv1.weight)
    assert torch.equal(s2.conv_in.weight, teacher.conv_in.weight + 0.01)
    # the round-2 student runs, and its kept modules all equal the round-1 student's
    for s_name, t_name in m2.items():
        if s_name.count(".") >= 3 and "transformer_blocks" not in s_name and s_name.startswith("up_"):
            for key, value in s2.get_submodule(s_name).state_dict().items():
                assert torch.equal(value, s1.get_submodule(t_name).state_dict()[key])
    x, t, cond = sdxl_inputs()
    with torch.no_grad():
        assert torch.isfinite(s2(x, t, **cond).sample).all()


def test_round_report_counts_parameters_and_flops_per_round_and_in_total() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    teacher = on_meta(TWO_LEVEL)  # counted on the meta device, as unet_flops does
    rounds = [
        ["mid_block.attentions.0", "mid_block.resnets.1"],
        [f"down_blocks.1.attentions.{a}.transformer_blocks.{b}" for a in (0, 1) for b in (1, 2)],
    ]
    student, chain = _chain_through(teacher, rounds, flops=True)
    # Independent count: the removed units' own parameters and FLOPs inside the source's forward.
    with torch.device("meta"):
        x, t = torch.zeros(1, 4, 8, 8), torch.zeros(1)
        cond = {
            "encoder_hidden_states": torch.zeros(1, 77, 32),
            "added_cond_kwargs": {"text_embeds": torch.zeros(1, 32), "time_ids": torch.zeros(1, 6)},
        }
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        teacher(x, t, **cond)
    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    assert chain.source_flops == per_module["Global"]
    params, flops = n_params(teacher), chain.source_flops
    for units, rnd in zip(rounds, chain.rounds):
        assert rnd.removed == sorted(units)
        assert params - rnd.parameters == sum(n_params(teacher.get_submodule(u)) for u in units)
        assert flops - rnd.flops == sum(per_module[f"UNet2DConditionModel.{u}"] for u in units)
        params, flops = rnd.parameters, rnd.flops
    assert chain.parameters == n_params(student)
    assert chain.report().removed_fraction == pytest.approx(1 - n_params(student) / n_params(teacher))
    lines = chain.summary()
    assert len(lines) == 2 + len(rounds) and lines[1].startswith("0 source")
    assert lines[3].startswith("2 round 2 | 4 | ") and "%" in lines[3]


def test_chain_record_round_trips_and_pairs_with_any_rounds_teacher() -> None:
    teacher = on_meta(TINY_SDXL)
    rounds = split_rounds(TINY_SDXL, "ssd-1b")
    _, chain = _chain_through(teacher, rounds)
    back = BlockRemovalChain.from_dict(json.loads(json.dumps(chain.to_dict())))
    assert back == chain
    assert chain.round_of(TINY_SDXL) == 0
    assert chain.round_of(chain.rounds[0].config) == 1
    assert chain.round_of(chain.config) == 3
    # A teacher of round 1's architecture (the round-1 student): the pairs name its modules.
    pairs = chain.kd_pairs("layer", teacher_round=1)
    s1 = on_meta(chain.rounds[0].config)
    s3 = on_meta(chain.config)
    assert pairs["mid_block"] == "mid_block.resnets.0"
    assert (
        pairs["down_blocks.2.attentions.0.transformer_blocks.9"]
        == "down_blocks.2.attentions.0.transformer_blocks.3"
    )
    for t_name, s_name in pairs.items():
        s1.get_submodule(t_name), s3.get_submodule(s_name)  # both exist
    # and against the source (a fine-tuned SDXL): the same student modules, the source's names
    assert chain.kd_pairs("layer")["up_blocks.0.attentions.1.transformer_blocks.6"] == (
        "up_blocks.0.attentions.1.transformer_blocks.2"
    )
    assert chain.report(2).removed == sorted(rounds[2])
    with pytest.raises(OptionError, match=r"architecture of the chain's source or of one of its 3 round"):
        chain.round_of({**TINY_SDXL, "transformer_layers_per_block": [1, 1, 10]})
    with pytest.raises(OptionError, match=r"`teacher_round` to lie in \[0, 3\]"):
        chain.report(4)
    with pytest.raises(OptionError, match=r"block-removal record with 'source_config'"):
        BlockRemovalChain.from_dict({"rounds": []})
    with pytest.raises(OptionError, match=r"round 1 of the record to have the fields"):
        BlockRemovalChain.from_dict({**chain.to_dict(), "rounds": [{"depth": 3}]})


def test_kd_pairs_across_rounds_have_equal_feature_shapes() -> None:
    teacher = build(TINY_SDXL)
    student, chain = _chain_through(teacher, split_rounds(TINY_SDXL, "ssd-1b"))
    pairs = chain.kd_pairs("layer")
    shapes: dict[str, dict[str, tuple]] = {"t": {}, "s": {}}
    handles = []
    for side, net, names in (("t", teacher, pairs), ("s", student, pairs.values())):
        for name in names:

            def hook(_m, _i, out, side=side, name=name):
                shapes[side][name] = tuple((out[0] if isinstance(out, tuple) else out).shape)

            handles.append(net.get_submodule(name).register_forward_hook(hook))
    x, t, cond = sdxl_inputs(1)
    with torch.no_grad():
        teacher(x, t[:1], **cond), student(x, t[:1], **cond)
    for h in handles:
        h.remove()
    assert len(pairs) > 40
    for t_name, s_name in pairs.items():
        assert shapes["t"][t_name] == shapes["s"][s_name], (t_name, s_name)


def test_an_empty_round_records_a_teacher_change_and_keeps_the_student() -> None:
    teacher = on_meta(TWO_LEVEL)
    s1, chain = remove_blocks(
        teacher, start_chain(teacher, count_flops=False), ["mid_block"], count_flops=False
    )
    s2, chain = remove_blocks(s1, chain, [], name="new teacher", info={"teacher": "juggernaut"})
    assert s2 is s1 and chain.rounds[-1].removed == [] and chain.rounds[-1].info == {"teacher": "juggernaut"}
    assert chain.rounds[-1].config == chain.rounds[0].config and chain.removed == ["mid_block"]


def test_remove_blocks_refuses_bad_rounds_with_the_reason() -> None:
    teacher = on_meta(TWO_LEVEL)
    chain = start_chain(teacher, count_flops=False)
    s1, chain1 = remove_blocks(
        teacher, chain, ["mid_block.attentions.0", "mid_block.resnets.1"], count_flops=False
    )
    with pytest.raises(
        OptionError, match=r"'mid_block.resnets.1' is already gone: round 1 \('round 1'\) removed"
    ):
        remove_blocks(s1, chain1, ["mid_block.resnets.1"])
    with pytest.raises(
        OptionError, match=r"units of the source UNet .* but got 'mid_block.resnets.7': no such unit"
    ):
        remove_blocks(s1, chain1, ["mid_block.resnets.7"])
    with pytest.raises(OptionError, match=r"but got 'down_blocks.1.attentions.0.norm': no such unit"):
        remove_blocks(s1, chain1, ["down_blocks.1.attentions.0.norm"])
    with pytest.raises(OptionError, match=r"the chain's latest student \(after round 1\)"):
        remove_blocks(teacher, chain1, ["down_blocks.1.attentions.0.transformer_blocks.1"])
    with pytest.raises(OptionError, match=r"listed twice or inside \['mid_block'\]"):
        remove_blocks(teacher, chain, ["mid_block", "mid_block.resnets.1"])
    with pytest.raises(OptionError, match=r"takes all 4 of `down_blocks.1.attentions.0`"):
        remove_blocks(
            teacher, chain, [f"down_blocks.1.attentions.0.transformer_blocks.{b}" for b in range(4)]
        )
    # a down attention without its resnet, or a down resnet without its up partners: said what is missing
    with pytest.raises(
        OptionError, match=r"cannot remove \['down_blocks.1.attentions.1'\] alone .*Add or drop those names"
    ):
        remove_blocks(teacher, chain, ["down_blocks.1.attentions.1"])
    with pytest.raises(OptionError, match=r"needs \['up_blocks.1.resnets.1'\]"):
        remove_blocks(teacher, chain, ["down_blocks.0.resnets.1"])
    with pytest.raises(
        OptionError,
        match=r"but removing .* cannot remove \['mid_block.attentions.0.transformer_blocks.0'\]",
    ):
        remove_blocks(teacher, chain, ["mid_block.attentions.0.transformer_blocks.0"])
    with pytest.raises(DTypeError, match=r"`remove` to be a sequence of source module names"):
        remove_blocks(teacher, chain, "mid_block")  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"`chain` to be a BlockRemovalChain \(start_chain\(source\)"):
        remove_blocks(teacher, {}, [])  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"`count_flops` to be True or False"):
        remove_blocks(teacher, chain, [], count_flops="no")  # type: ignore[arg-type]
    # the three-way down/up resnet removal that does fit: accepted
    s, c = remove_blocks(
        teacher, chain, ["down_blocks.0.resnets.1", "up_blocks.1.resnets.1"], count_flops=False
    )
    assert s.config.layers_per_block == [1, 2] and c.removed == [
        "down_blocks.0.resnets.1",
        "up_blocks.1.resnets.1",
    ]


def test_split_rounds_and_unet_flops_refuse_bad_inputs() -> None:
    with pytest.raises(OptionError, match=r"but 'mid_blocks' owns no module of it"):
        split_rounds(TINY_SDXL, "ssd-1b", (("mid_blocks",),))
    with pytest.raises(
        OptionError, match=r"but 'down_blocks.2.attentions.0.transformer_blocks.1' matches none"
    ):
        split_rounds(TINY_SDXL, "ssd-1b", (("mid_block",),))
    with pytest.raises(DTypeError, match=r"`groups\[0\]` to be a tuple of module-name prefixes"):
        split_rounds(TINY_SDXL, "ssd-1b", ("mid_block",))
    with pytest.raises(DTypeError, match=r"`groups` to be a sequence of prefix tuples"):
        split_rounds(TINY_SDXL, "ssd-1b", None)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"`sample_size` to be an int >= 1, but got 0"):
        unet_flops(TWO_LEVEL, sample_size=0)
    with pytest.raises(
        OptionError, match=r"`addition_embed_type` None or 'text_time' \(SDXL\), but got 'text'"
    ):
        unet_flops({**TWO_LEVEL, "addition_embed_type": "text"})
    with pytest.raises(DTypeError, match=r"`unet` to be a diffusers UNet2DConditionModel or its config"):
        unet_flops(nn.Linear(2, 2))
    with pytest.raises(DTypeError, match=r"`source` to be a diffusers UNet2DConditionModel"):
        start_chain(nn.Linear(2, 2))


def test_infer_chain_for_a_student_saved_without_its_record() -> None:
    # segmind/SSD-1B's published UNet config: the SDXL config with these four entries changed
    ssd1b = {
        **SDXL,
        "transformer_layers_per_block": [1, 2, 4],
        "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], 1],
        "mid_block_type": "UNetMidBlock2D",
    }
    chain = infer_chain(SDXL, ssd1b, count_flops=False)
    assert chain.removed == removed_units(SDXL, "ssd-1b")
    assert chain.rounds[0].info == {"inferred": True, "keep_transformer_layers": "spread"}
    assert chain.parameters == n_params(on_meta(ssd1b)) and chain.source_parameters == n_params(on_meta(SDXL))
    first = infer_chain(SDXL, ssd1b, keep_transformer_layers="first", count_flops=False)
    assert first.kd_pairs("layer")["down_blocks.2.attentions.0.transformer_blocks.3"] == (
        "down_blocks.2.attentions.0.transformer_blocks.3"
    )
    assert first.kd_pairs() == chain.kd_pairs()  # sub-block pairs do not depend on the assumption
    # later rounds continue from it, in SDXL's names
    _, chain2 = remove_blocks(
        on_meta(ssd1b), chain, ["down_blocks.2.attentions.1.transformer_blocks.3"], count_flops=False
    )
    assert chain2.config["transformer_layers_per_block"] == [1, 2, [4, 3]]
    with pytest.raises(
        OptionError, match=r"to be a block removal of the source, but: Expected `down_transformer"
    ):
        infer_chain(TINY_SDXL, {**TINY_SDXL, "transformer_layers_per_block": [1, 2, 11]}, count_flops=False)
    with pytest.raises(OptionError, match=r"no removal of the source gives its layout"):
        infer_chain(TINY_SDXL, {**TINY_SDXL, "block_out_channels": [32, 64, 128]}, count_flops=False)
    with pytest.raises(OptionError, match=r"the source's 3 levels \(or one fewer\), but it has 1"):
        one_level = {
            "down_block_types": ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"],
            "block_out_channels": [32],
        }
        infer_chain(TINY_SDXL, {**TINY_SDXL, **one_level, "transformer_layers_per_block": 1})
    with pytest.raises(DTypeError, match=r"`student_config` to be a UNet config \(a mapping\)"):
        infer_chain(TINY_SDXL, None)  # type: ignore[arg-type]
