"""LoRA students: LCM-LoRA targets, teacher view, merge, safetensors round trip (ours and diffusers'), guidance embedding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffdistill.errors import DTypeError, NonFiniteError, OptionError, ShapeError, value_checks
from diffdistill.students import (
    LCM_LORA_TARGETS,
    TeacherView,
    adapters_disabled,
    add_guidance_embedding,
    add_lora,
    guidance_scale_embedding,
    load_lora,
    lora_state_dict,
    merge_lora,
    save_lora,
)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

TINY_SDXL = {
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": [1, 2],
    "cross_attention_dim": 32,
    "attention_head_dim": (2, 4),
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "norm_num_groups": 8,
    "use_linear_projection": True,
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_unet(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**{**TINY_SDXL, **overrides})


def inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(5)
    return (
        torch.randn(batch, 4, 16, 16, generator=g),
        torch.tensor([999, 300][:batch]),
        {
            "encoder_hidden_states": torch.randn(batch, 3, 32, generator=g),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(batch, 32, generator=g),
                "time_ids": torch.rand(batch, 6, generator=g),
            },
        },
    )


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_lcm_lora_targets_on_sdxl_structure() -> None:
    unet = add_lora(tiny_unet(), rank=4)
    adapted = {n for n, m in unet.named_modules() if hasattr(m, "lora_A")}
    assert len(LCM_LORA_TARGETS) == 14
    for suffix in LCM_LORA_TARGETS:  # every target exists in an SDXL-structured UNet
        assert any(n == suffix or n.endswith("." + suffix) for n in adapted), suffix
    skipped = (
        "conv_in",
        "conv_out",
        "time_embedding.linear_1",
        "time_embedding.linear_2",
        "add_embedding.linear_1",
    )
    assert not any(n.startswith(s) for n in adapted for s in skipped)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x, t, cond = inputs()
    base = tiny_unet()
    with torch.no_grad():  # B = 0 at init: the LoRA student starts as the teacher
        torch.testing.assert_close(unet(x, t, **cond).sample, base(x, t, **cond).sample)


def test_rank_alpha_scaling_and_generic_modules() -> None:
    net = add_lora(
        nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), rank=2, alpha=8, targets=["0", "2"]
    )
    assert net[0].scaling["default"] == pytest.approx(4.0)
    assert net[0].lora_A["default"].weight.shape == (2, 4)
    assert sorted(lora_state_dict(net)) == [
        "0.lora_A.weight",
        "0.lora_B.weight",
        "2.lora_A.weight",
        "2.lora_B.weight",
    ]
    with pytest.raises(
        OptionError, match=r"Expected `adapter_name` to be one of \['default'\], but got 'other'"
    ):
        lora_state_dict(net, "other")
    with pytest.raises(OptionError, match=r"Expected `rank` to be an int >= 1, but got 0"):
        add_lora(nn.Linear(2, 2), rank=0)
    with pytest.raises(DTypeError, match=r"Expected `rank` to be an int >= 1, but got float 2.5"):
        add_lora(nn.Linear(2, 2), rank=2.5)  # peft would take r=2 with alpha 2.5: scaling 1.25, not 1
    import numpy as np

    net = add_lora(nn.Sequential(nn.Linear(2, 2)), rank=np.int64(2), targets=["0"])  # numpy ints are ints
    assert net[0].lora_A["default"].weight.shape == (2, 2)


def test_teacher_view_disables_adapters_and_restores_state() -> None:
    unet = add_lora(tiny_unet(), rank=4)
    randomize_lora(unet)
    base = tiny_unet()
    x, t, cond = inputs()
    teacher = TeacherView(unet)
    with torch.no_grad():
        adapted = unet(x, t, **cond).sample
        plain = base(x, t, **cond).sample
    out = teacher(x, t, **cond).sample
    assert not out.requires_grad
    torch.testing.assert_close(out, plain)
    assert (adapted - plain).abs().max() > 1e-3
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    with adapters_disabled(unet):
        pass
    assert flags == {n: p.requires_grad for n, p in unet.named_parameters()}
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, **cond).sample, adapted)  # adapters active again
    assert "UNet2DConditionModel" in repr(teacher)


def test_merge_gives_the_adapter_models_output() -> None:
    unet = add_lora(tiny_unet(), rank=4, alpha=8)
    randomize_lora(unet)
    x, t, cond = inputs()
    with torch.no_grad():
        adapted = unet(x, t, **cond).sample
    merged = merge_lora(unet)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert type(merged.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, **cond).sample, adapted, atol=1e-5, rtol=1e-4)
    assert not getattr(merged, "_hf_peft_config_loaded", False)


def test_safetensors_round_trip_ours_and_diffusers(tmp_path) -> None:
    from safetensors import safe_open

    unet = add_lora(tiny_unet(), rank=4, alpha=2)
    randomize_lora(unet)
    x, t, cond = inputs()
    with torch.no_grad():
        expected = unet(x, t, **cond).sample
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_lora(unet, path)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        assert (
            f.metadata()["format"] == "pt"
            and '"unet.lora_alpha": 2.0' in f.metadata()["lora_adapter_metadata"]
        )
    assert all(k.startswith("unet.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    # Our loader, into a fresh copy of the base model (adapter created from the file's metadata).
    ours = load_lora(tiny_unet(), path)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, **cond).sample, expected)
    # diffusers' own loader reads the same file (rank and alpha from the metadata).
    theirs = tiny_unet()
    theirs.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="unet", adapter_name="default")
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, **cond).sample, expected)
    # Bare peft keys (prefix "") and error messages.
    save_lora(unet, tmp_path / "bare.safetensors", prefix="")
    bare = load_lora(tiny_unet(), tmp_path / "bare.safetensors", prefix="")
    with torch.no_grad():
        torch.testing.assert_close(bare(x, t, **cond).sample, expected)
    with pytest.raises(OptionError, match=r"Expected keys starting with 'text_encoder\.'"):
        load_lora(tiny_unet(), path, prefix="text_encoder")
    with pytest.raises(
        OptionError, match=r"to match adapter 'default' exactly"
    ):  # same rank and alpha, fewer layers
        load_lora(add_lora(tiny_unet(), rank=4, alpha=2, targets=["to_q", "to_k"]), path)


def test_save_lora_from_a_given_state_dict(tmp_path) -> None:
    # The values come from the state dict passed in (e.g. FSDP's gathered one), not from the model's tensors.
    unet = add_lora(tiny_unet(), rank=4)
    randomize_lora(unet, seed=1)
    full = {k: v.clone() for k, v in unet.state_dict().items()}
    randomize_lora(unet, seed=2)  # the live model now holds other LoRA weights
    picked = lora_state_dict(unet, state_dict=full)
    assert picked.keys() == lora_state_dict(unet).keys()
    for k, v in picked.items():
        torch.testing.assert_close(v, full[k.replace(".weight", ".default.weight")], rtol=0, atol=0)
        if "lora_B" in k:
            assert not torch.equal(v, lora_state_dict(unet)[k])
    save_lora(unet, tmp_path / "a.safetensors", state_dict=full)
    reference = add_lora(tiny_unet(), rank=4)
    randomize_lora(reference, seed=1)
    loaded = load_lora(tiny_unet(), tmp_path / "a.safetensors")
    x, t, cond = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, **cond).sample, reference(x, t, **cond).sample)


def test_guidance_embedding_zero_init_keeps_output_and_config() -> None:
    unet = tiny_unet()
    x, t, cond = inputs()
    w_emb = guidance_scale_embedding(torch.tensor([3.0, 8.0]), 16)
    with torch.no_grad():
        before = unet(x, t, **cond).sample
    add_guidance_embedding(unet, 16)
    assert unet.config.time_cond_proj_dim == 16
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, timestep_cond=w_emb, **cond).sample, before)
    rebuilt = diffusers.UNet2DConditionModel.from_config(unet.config)
    assert (
        rebuilt.time_embedding.cond_proj.weight.shape
        == unet.time_embedding.cond_proj.weight.shape
        == (32, 16)  # (linear_1.in_features = block_out_channels[0], time_cond_proj_dim)
    )
    with pytest.raises(
        OptionError, match=r"without a guidance embedding, but `time_embedding.cond_proj` exists"
    ):
        add_guidance_embedding(unet, 16)
    other = add_guidance_embedding(
        tiny_unet(), 16, init="uniform", generator=torch.Generator().manual_seed(0)
    )
    w = other.time_embedding.cond_proj.weight
    assert w.abs().max() <= 1 / math.sqrt(16) and w.abs().sum() > 0
    with torch.no_grad():
        assert (other(x, t, timestep_cond=w_emb, **cond).sample - before).abs().max() > 1e-4
    with pytest.raises(OptionError, match=r"Expected `init` to be one of \['zeros', 'uniform'\]"):
        add_guidance_embedding(tiny_unet(), 16, init="normal")
    with pytest.raises(OptionError, match=r"with `time_embedding.linear_1`, but Linear has none"):
        add_guidance_embedding(nn.Linear(2, 2))


def test_guidance_scale_embedding_formula() -> None:
    w = torch.tensor([0.0, 2.5, 8.0])
    emb = guidance_scale_embedding(w, 8)
    half = 4
    freqs = torch.exp(torch.arange(half) * -(math.log(10000.0) / (half - 1)))
    args = 1000.0 * w[:, None] * freqs[None]
    torch.testing.assert_close(emb, torch.cat([args.sin(), args.cos()], dim=1))
    assert guidance_scale_embedding(w, 9)[:, -1].abs().sum() == 0  # odd sizes are zero-padded
    # oracle: diffusers' LCM pipeline (the function LCM-distilled UNets were trained with)
    from diffusers import LatentConsistencyModelPipeline

    for dim in (8, 9, 256):
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)  # type: ignore[arg-type]
        torch.testing.assert_close(guidance_scale_embedding(w, dim), ref, atol=0, rtol=0)
    # bf16: diffusers scales w by 1000 before the cast (w = 8.1 -> 8096 in bf16, not 8.1 in bf16 x 1000 = 8128)
    w = torch.tensor([8.1, 3.3])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(  # type: ignore[arg-type]
        None, w, embedding_dim=16, dtype=torch.bfloat16
    )
    torch.testing.assert_close(guidance_scale_embedding(w, 16, dtype=torch.bfloat16), ref, atol=0, rtol=0)
    with pytest.raises(OptionError, match=r"Expected `embedding_dim` to be an int >= 4, but got 2"):
        guidance_scale_embedding(w, 2)


class _Wrap(nn.Module):
    """``(sample, timestep) -> output`` around a plain network, as LayerKD calls a UNet."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, sample: torch.Tensor, timestep: object) -> torch.Tensor:
        return self.net(sample)


def test_layer_kd_with_lora_teacher_view_on_the_same_network() -> None:
    from diffdistill.students import LayerKD

    torch.manual_seed(0)
    net = add_lora(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)), rank=2, targets=["0", "2"])
    randomize_lora(net)
    base = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
    base.load_state_dict(
        {k.replace(".base_layer", ""): v for k, v in net.state_dict().items() if "lora_" not in k}
    )
    x = torch.randn(3, 4)
    model = _Wrap(net)  # one network: the student, and (adapters disabled) the teacher
    with LayerKD(model, model, ["net.0"]) as kd:
        loss, logs = kd(x, None, teacher_fn=TeacherView(model))
        assert kd.teacher_tap.features == {} and kd.student_tap.features == {}
    with torch.no_grad():
        expected_feat = torch.nn.functional.mse_loss(net[0](x), base[0](x))
        expected_out = torch.nn.functional.mse_loss(net(x), base(x))
    torch.testing.assert_close(logs["feature/net.0"], expected_feat)
    torch.testing.assert_close(logs["output_kd"], expected_out)
    loss.backward()
    assert all(p.grad is None for n, p in net.named_parameters() if "lora_" not in n)
    assert any(p.grad is not None for n, p in net.named_parameters() if "lora_" in n)


def test_teacher_view_grad_keeps_the_input_graph():
    from diffdistill.students import TeacherView, add_lora

    net = add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), rank=1, targets=["0"])
    x = torch.randn(3, 2, requires_grad=True)
    assert not TeacherView(net)(x).requires_grad
    out = TeacherView(net, grad=True)(x)
    out.sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(out, TeacherView(net)(x))  # adapters still disabled


def test_teacher_view_refuses_a_model_without_adapters():
    # After merge_lora (Lightning's LoRA -> full switch) the "teacher" used to be the student itself.
    from diffdistill._checks import OptionError
    from diffdistill.students import TeacherView, adapters_disabled, add_lora, merge_lora

    net = merge_lora(add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), rank=1, targets=["0"]))
    msg = r"Expected `model` \(Sequential\) to have LoRA adapters for {}, but it has none .*merge_lora"
    with pytest.raises(OptionError, match=msg.format("TeacherView")):
        TeacherView(net)
    with pytest.raises(OptionError, match=msg.format("adapters_disabled")), adapters_disabled(net):
        pass


# --- a guidance embedding with LoRA (issue 18, part 4): trainable and saved, in either order ---


@pytest.mark.parametrize("order", ["embedding_then_lora", "lora_then_embedding"])
def test_guidance_embedding_trains_and_is_saved_with_the_adapter(order: str, tmp_path) -> None:
    unet = tiny_unet()
    if order == "embedding_then_lora":
        add_lora(add_guidance_embedding(unet, 16), rank=4)  # froze the zero embedding for good before
    else:
        add_guidance_embedding(add_lora(unet, rank=4), 16)
    proj = unet.time_embedding.cond_proj.weight
    assert proj.requires_grad and not unet.conv_in.weight.requires_grad
    x, t, cond = inputs()
    w_emb = guidance_scale_embedding(torch.tensor([3.0, 8.0]), 16)
    opt = torch.optim.SGD([p for p in unet.parameters() if p.requires_grad], lr=0.1)
    unet(x, t, timestep_cond=w_emb, **cond).sample.pow(2).mean().backward()
    opt.step()
    assert proj.abs().sum() > 0  # it trained
    randomize_lora(unet)
    state = lora_state_dict(unet)
    assert torch.equal(state["time_embedding.cond_proj.weight"], proj.detach())
    with pytest.raises(OptionError, match=r"`state_dict` to hold `time_embedding.cond_proj.weight`"):
        lora_state_dict(unet, state_dict={k: v for k, v in unet.state_dict().items() if "cond_proj" not in k})
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_lora(unet, path)
    with torch.no_grad():
        expected = unet(x, t, timestep_cond=w_emb, **cond).sample
    # Our loader adds the embedding (time_cond_proj_dim from the file) to a plain UNet and loads it.
    ours = load_lora(tiny_unet(), path)
    assert ours.config.time_cond_proj_dim == 16 and ours.time_embedding.cond_proj.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, timestep_cond=w_emb, **cond).sample, expected)
    # diffusers' loader reads the file too: into a UNet with the embedding, the embedding is loaded as well.
    theirs = add_guidance_embedding(tiny_unet(), 16)
    theirs.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="unet", adapter_name="default")
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, timestep_cond=w_emb, **cond).sample, expected)
    # A UNet with an embedding of another width refuses the file's.
    with pytest.raises(ShapeError, match=r"`time_embedding.cond_proj.weight` .* another time_cond_proj_dim"):
        load_lora(add_guidance_embedding(tiny_unet(), 8), path)


# --- bad inputs (issue 18): refused at the boundary, with the argument's name and a fix ---


class _Named(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.proj(x)))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"targets": ["nope"]},
            OptionError,
            r"`targets` to match module names of _Named .* none of \['nope'\]",
        ),
        ({"targets": []}, OptionError, r"Expected `targets` to name at least one module suffix"),
        ({"targets": [1]}, DTypeError, r"Expected `targets` to be a module-name suffix or a list of them"),
        (
            {"alpha": -1.0},
            OptionError,
            r"Expected `alpha` to be > 0.0, but got -1.0",
        ),  # a negative scale before
        ({"alpha": float("nan")}, OptionError, r"Expected `alpha` to be a finite number"),
        ({"dropout": -0.5}, OptionError, r"Expected `dropout` to be >= 0.0, but got -0.5"),  # ignored before
        ({"dropout": 1.0}, OptionError, r"Expected `dropout` to be < 1.0, but got 1.0"),
        ({"adapter_name": ""}, OptionError, r"Expected `adapter_name` to be a non-empty string without '.'"),
        ({"adapter_name": 3}, DTypeError, r"Expected `adapter_name` to be a string, but got int 3"),
        ({"freeze_base": "no"}, DTypeError, r"Expected `freeze_base` to be True or False, but got str"),
    ],
)
def test_add_lora_refuses_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        add_lora(_Named(), **{"rank": 2, "targets": ["proj"], **kwargs})


def test_add_lora_takes_one_target_as_a_string_and_refuses_a_second_adapter_of_the_same_name() -> None:
    net = add_lora(_Named(), rank=2, targets="proj")  # list("proj") = ['p', 'r', 'o', 'j'] before: no match
    assert sorted(n for n, p in net.named_parameters() if p.requires_grad) == [
        "proj.lora_A.default.weight",
        "proj.lora_B.default.weight",
    ]
    with pytest.raises(
        OptionError, match=r"Expected a new `adapter_name`, but _Named already has an adapter 'default'"
    ):
        add_lora(net, rank=2, targets="proj")
    with pytest.raises(DTypeError, match=r"Expected `model` to be a torch.nn.Module, but got NoneType"):
        add_lora(None)  # type: ignore[arg-type]


def test_merge_and_views_refuse_models_without_adapters() -> None:
    with pytest.raises(
        OptionError, match=r"`model` \(_Named\) to have LoRA layers to merge, but it has none"
    ):
        merge_lora(_Named())  # returned the model unchanged before
    none = r"Expected `model` to be a torch.nn.Module, but got NoneType"
    with pytest.raises(DTypeError, match=none):
        merge_lora(None)  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=none):
        TeacherView(None)  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=none), adapters_disabled(None):  # type: ignore[arg-type]
        pass
    with pytest.raises(DTypeError, match=r"Expected `grad` to be True or False"):
        TeacherView(add_lora(_Named(), rank=1, targets="proj"), grad="yes")  # type: ignore[arg-type]


def test_load_lora_refuses_another_alpha_of_an_existing_adapter(tmp_path) -> None:
    # the update (alpha / r) B A of the same weights would be rescaled by 2 without a sign (shapes agree)
    path = tmp_path / "a.safetensors"
    save_lora(add_lora(_Named(), rank=2, alpha=4.0, targets=["proj", "out"]), path)
    with pytest.raises(OptionError, match=r"saved with alpha 4 and the adapter has alpha 8: .* scaled by 2"):
        load_lora(add_lora(_Named(), rank=2, alpha=8.0, targets=["proj", "out"]), path)
    same = load_lora(add_lora(_Named(), rank=2, alpha=4.0, targets=["proj", "out"]), path)
    created = load_lora(_Named(), path)  # a new adapter takes the file's alpha
    assert same.peft_config["default"].lora_alpha == created.peft_config["default"].lora_alpha == 4.0


def test_load_lora_refuses_another_rank_or_architecture(tmp_path) -> None:
    net = add_lora(_Named(), rank=2, targets=["proj", "out"])
    path = tmp_path / "a.safetensors"
    save_lora(net, path)
    # torch's "size mismatch for proj.lora_A.default.weight" before, also with strict=False
    for strict in (True, False):
        with pytest.raises(ShapeError, match=r"rank-2 adapter but the model's adapter 'default' has rank 4"):
            load_lora(add_lora(_Named(), rank=4, targets=["proj", "out"]), path, strict=strict)
    with pytest.raises(
        ShapeError, match=r"`\w+.lora_A.weight` .* \(2, 8\), but got \(2, 4\): .* another architecture"
    ):
        load_lora(_Named(width=8), path)
    (tmp_path / "b.safetensors").write_text("not a safetensors file")
    with pytest.raises(
        OptionError, match=r"Expected `path` to be a safetensors file, but .* could not be read"
    ):
        load_lora(_Named(), tmp_path / "b.safetensors")
    with pytest.raises(FileNotFoundError, match=r"Expected `path` to be an existing safetensors file"):
        load_lora(_Named(), tmp_path / "missing.safetensors")
    with pytest.raises(DTypeError, match=r"Expected `strict` to be True or False"):
        load_lora(_Named(), path, strict="no")  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"Expected `prefix` to be a string"):
        load_lora(_Named(), path, prefix=None)  # type: ignore[arg-type]


def test_save_lora_and_lora_state_dict_refuse_bad_arguments(tmp_path) -> None:
    net = add_lora(_Named(), rank=2, targets="proj")
    with pytest.raises(DTypeError, match=r"Expected `path` to be a file path \(str or os.PathLike\)"):
        save_lora(net, None)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=r"Expected the folder of `path` to exist"):
        save_lora(net, tmp_path / "missing" / "a.safetensors")
    # a state dict without the adapter's weights: an empty adapter file before
    with pytest.raises(
        OptionError, match=r"`state_dict` to hold the weights of adapter 'default' \(1 LoRA layers\)"
    ):
        save_lora(net, tmp_path / "a.safetensors", state_dict=_Named().state_dict())
    with pytest.raises(DTypeError, match=r"Expected `state_dict` to be a mapping"):
        lora_state_dict(net, state_dict=[1])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("w", "kwargs", "error", "match"),
    [
        (
            torch.tensor([7, 8]),
            {},
            DTypeError,
            r"Expected `w` to be a floating-point tensor, but got dtype torch.int64",
        ),
        (
            torch.tensor([True]),
            {},
            DTypeError,
            r"Expected `w` to be a floating-point tensor, but got dtype torch.bool",
        ),
        (
            torch.tensor([]),
            {},
            ShapeError,
            r"Expected `w` to hold at least one sample",
        ),  # an empty result before
        (torch.tensor([float("nan")]), {}, NonFiniteError, r"Expected `w` to be finite"),
        (torch.tensor([[7.5]]), {}, ShapeError, r"Expected `w` to have 1 dimensions laid out as \(B,\)"),
        (
            torch.tensor([7.5]),
            {"embedding_dim": 8.5},
            DTypeError,
            r"`embedding_dim` to be an int >= 4, but got float",
        ),
        (torch.tensor([7.5]), {"dtype": torch.long}, DTypeError, r"`dtype` to be a floating torch dtype"),
    ],
)
def test_guidance_scale_embedding_refuses_bad_inputs(w, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        guidance_scale_embedding(w, **kwargs)


def test_guidance_embedding_value_checks_switch_off_and_bad_arguments() -> None:
    with value_checks(False):
        assert guidance_scale_embedding(torch.tensor([float("nan")]), 8).isnan().any()
    with pytest.raises(OptionError, match=r"Expected `time_cond_proj_dim` to be an int >= 1, but got 0"):
        add_guidance_embedding(tiny_unet(), 0)
    with pytest.raises(
        DTypeError, match=r"Expected `time_cond_proj_dim` to be an int >= 1, but got float 16.5"
    ):
        add_guidance_embedding(tiny_unet(), 16.5)  # type: ignore[arg-type]
    with pytest.raises(
        DTypeError, match=r"Expected `generator` to be a torch.Generator or None, but got int"
    ):
        add_guidance_embedding(tiny_unet(), 16, init="uniform", generator=0)  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"Expected `unet` to be a torch.nn.Module, but got NoneType"):
        add_guidance_embedding(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_adapters_on_a_half_precision_base_are_float32_by_default(base_dtype: torch.dtype) -> None:
    """peft gives an adapter its base layer's dtype; bf16 LoRA weights lose most Adam updates to rounding, so the
    trainable adapter is float32 unless ``adapter_dtype=None`` asks for peft's."""
    net = add_lora(nn.Sequential(nn.Linear(8, 8)).to(base_dtype), rank=2, targets=["0"])
    lora = {n: p.dtype for n, p in net.named_parameters() if "lora_" in n}
    assert set(lora.values()) == {torch.float32} and len(lora) == 2
    assert net[0].base_layer.weight.dtype == base_dtype  # the frozen base is untouched
    out = net(torch.randn(3, 8, dtype=base_dtype))  # peft casts around the float32 adapter
    assert out.dtype == base_dtype
    kept = add_lora(nn.Sequential(nn.Linear(8, 8)).to(base_dtype), rank=2, targets=["0"], adapter_dtype=None)
    assert {p.dtype for n, p in kept.named_parameters() if "lora_" in n} == {base_dtype}
    double = add_lora(nn.Sequential(nn.Linear(8, 8)).double(), rank=2, targets=["0"])
    assert {p.dtype for n, p in double.named_parameters() if "lora_" in n} == {torch.float64}  # never lowered
    with pytest.raises(OptionError, match=r"Expected `adapter_dtype` to be a floating torch dtype"):
        add_lora(nn.Sequential(nn.Linear(8, 8)), rank=2, targets=["0"], adapter_dtype=torch.int8)
