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
    BlockRemovalSpec,
    build_student,
    init_from_teacher,
    student_config,
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
