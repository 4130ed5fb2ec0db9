"""EMA: decay schedules against diffusers' EMAModel (oracle), foreach update, resume, wrappers."""

from __future__ import annotations

import copy

import pytest
import torch

from diffdistill.errors import DTypeError, OptionError, ShapeError
from diffdistill.students import EMA


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


@pytest.mark.parametrize("warmup,use_ema_warmup", [("linear", False), ("power", True)])
def test_matches_diffusers_ema(warmup, use_ema_warmup):
    training_utils = pytest.importorskip("diffusers.training_utils")
    net = _net()
    ours = EMA(net, decay=0.99, warmup=warmup, update_after_step=2, power=0.75)
    ref = training_utils.EMAModel(
        net.parameters(), decay=0.99, use_ema_warmup=use_ema_warmup, update_after_step=2, power=0.75
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(25):
        opt.zero_grad()
        net(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
        ours.update(net)
        ref.step(net.parameters())
        assert ours.decay_at(int(ours.num_updates)) == pytest.approx(ref.cur_decay_value)
    # Both are the same per-element affine update (a fused lerp vs diffusers' sub/mul): they differ by a few
    # float32 roundings (~6e-8 relative) per update of O(1) weights, a few over 25 updates: well below 1e-6,
    # while a wrong decay shifts the average by (decay error) x (the weights' change), not by rounding.
    for p_ours, p_ref in zip(ours.module.parameters(), ref.shadow_params):
        torch.testing.assert_close(p_ours, p_ref, atol=1e-6, rtol=1e-6)


def test_constant_decay_formula_and_buffers():
    net = _net()
    ema = EMA(net, decay=0.9)
    start = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net.train()(torch.randn(16, 3))  # moves BatchNorm running stats
    ema.update(net)
    for s, e, p in zip(start, ema.module.parameters(), net.parameters()):
        torch.testing.assert_close(e, 0.9 * s + 0.1 * p)
    bn_ema, bn = ema.module[1], net[1]
    assert int(bn_ema.num_batches_tracked) == int(bn.num_batches_tracked)  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert not ema.train().module.training
    # update_after_step holds for the constant decay too: copies until then (used to be ignored)
    late = EMA(net, decay=0.9, update_after_step=3)
    assert [late.decay_at(k) for k in (1, 2, 3, 4, 50)] == [0.0, 0.0, 0.0, 0.9, 0.9]
    assert [EMA(net, decay=0.9).decay_at(k) for k in (1, 2)] == [0.9, 0.9]


def test_state_dict_resume_and_copy_to():
    net = _net()
    ema = EMA(net, decay=0.999, warmup="linear")
    for _ in range(5):
        ema.update(net)
    clone = EMA(copy.deepcopy(net), decay=0.999, warmup="linear")
    clone.load_state_dict(ema.state_dict())
    assert int(clone.num_updates) == 5 and clone.decay_at(6) == ema.decay_at(6)
    target = _net()
    with torch.no_grad():
        target[0].weight.zero_()
    ema.copy_to(target)
    torch.testing.assert_close(target[0].weight, ema.module[0].weight)


def test_wrappers_and_errors():
    net = _net()
    ema = EMA(torch.nn.DataParallel(net), decay=0.5)
    ema.update(torch.nn.DataParallel(net))
    x = torch.randn(4, 3)
    ema.eval()
    torch.testing.assert_close(ema(x), ema.module(x))
    with pytest.raises(
        OptionError, match=r"Expected 0 <= `min_decay` <= `decay` <= 1, but got min_decay=0.0, decay=1.5"
    ):
        EMA(net, decay=1.5)
    with pytest.raises(
        OptionError, match=r"Expected `warmup` to be one of \['none', 'linear', 'power'\], but got 'cosine'"
    ):
        EMA(net, warmup="cosine")
    with pytest.raises(OptionError, match=r"`model` has 2 parameters but the EMA copy has 6"):
        ema.update(torch.nn.Linear(3, 4))


def test_trainable_only_shares_the_frozen_parameters_and_averages_the_rest():
    net = _net()
    net[0].requires_grad_(False)  # e.g. the frozen base of a LoRA student
    full, lean = EMA(net, decay=0.9), EMA(net, decay=0.9, trainable_only=True)
    assert lean.module[0].weight is net[0].weight and lean.module[0].bias is net[0].bias  # shared, no copy
    assert lean.module[2].weight is not net[2].weight
    assert not any(p.requires_grad for p in lean.module.parameters())
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        net(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
        full.update(net)
        lean.update(net)
    for (name, a), b in zip(lean.module.named_parameters(), full.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    for a, b in zip(lean.module.buffers(), full.module.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A shared parameter is the model's own tensor: it follows in-place changes (hence it must stay
    # frozen), where a whole copy averages towards them.
    with torch.no_grad():
        net[0].weight.add_(1.0)
    lean.update(net)
    assert torch.equal(lean.module[0].weight, net[0].weight)
    full.update(net)
    assert not torch.equal(full.module[0].weight, net[0].weight)


def test_trainable_only_state_dict_holds_the_average_not_the_shared_weights():
    net = _net()
    net[0].requires_grad_(False)
    lean = EMA(net, decay=0.5, trainable_only=True)
    with torch.no_grad():
        net[2].weight.add_(1.0)
    lean.update(net)
    state = lean.state_dict()
    assert "module.0.weight" not in state and "module.0.bias" not in state
    assert {"module.2.weight", "module.1.running_mean", "num_updates"} <= state.keys()
    base = net[0].weight.detach().clone()
    other = EMA(net, decay=0.5, trainable_only=True)
    other.load_state_dict(state)  # strict: nothing missing
    torch.testing.assert_close(other.module[2].weight, lean.module[2].weight, rtol=0, atol=0)
    assert int(other.num_updates) == 1
    # A checkpoint that holds values for the shared weights does not write them into the model.
    other.load_state_dict({**state, "module.0.weight": torch.zeros(4, 3), "module.0.bias": torch.zeros(4)})
    torch.testing.assert_close(net[0].weight, base, rtol=0, atol=0)
    # Nested in another module, the names carry its prefix.
    holder = torch.nn.ModuleDict({"ema": other})
    assert "ema.module.0.weight" not in holder.state_dict() and "ema.module.2.weight" in holder.state_dict()
    holder.load_state_dict(holder.state_dict())


def test_update_after_a_dtype_change_writes_the_live_copy():
    # update() lists the copy's tensors once; .double() replaces the BatchNorm buffers, so the list must
    # be rebuilt (a stale one would average into the discarded buffers).
    net = _net()
    ema = EMA(net, decay=0.5)
    ema.update(net)
    net.double()
    ema.double()
    with torch.no_grad():
        net[1].running_mean.add_(2.0)
        net[0].weight.add_(1.0)
    before_mean, before_weight = ema.module[1].running_mean.clone(), ema.module[0].weight.clone()
    ema.update(net)
    assert ema.module[1].running_mean.dtype == torch.float64
    torch.testing.assert_close(ema.module[1].running_mean, 0.5 * before_mean + 0.5 * net[1].running_mean)
    torch.testing.assert_close(ema.module[0].weight, 0.5 * before_weight + 0.5 * net[0].weight)


def _double_under_the_overwrite_flag(ema: EMA) -> None:
    # torch then gives the copy new Parameter objects as well as new buffers.
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        ema.module.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)


def _load_assigned(ema: EMA) -> None:
    state = {
        k: v.double().clone() if v.is_floating_point() else v.clone()
        for k, v in ema.module.state_dict().items()
    }
    ema.module.load_state_dict(state, assign=True)


@pytest.mark.parametrize(
    "move",
    [
        lambda ema: ema.module.double(),
        lambda ema: torch.nn.ModuleDict({"unet": ema.module}).to(
            torch.float64
        ),  # pipe.unet = ema.module; pipe.to
        _double_under_the_overwrite_flag,
        _load_assigned,
    ],
    ids=["module.double", "pipeline.to", "overwrite_params_flag", "load_state_dict_assign"],
)
def test_update_reaches_the_copy_after_the_copy_itself_is_moved(move):
    # Audit 2, item 2: moving / casting ema.module (not the EMA) puts new tensors in the copy; later updates
    # must average into those (a stale list of the old tensors left BatchNorm's statistics frozen).
    net = _net()
    ema = EMA(net, decay=0.5)
    net.train()
    net(torch.randn(8, 3) + 5.0)
    ema.update(net)
    move(ema)
    net.double()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net(torch.randn(8, 3, dtype=torch.float64) + 5.0)  # moves the running statistics, counts a batch
    copy = ema.module
    before = {k: v.clone() for k, v in copy.state_dict().items()}
    ema.update(net)
    assert copy[0].weight.dtype == torch.float64
    for name in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var", "2.weight"):
        now, online = copy.state_dict()[name], net.state_dict()[name]
        torch.testing.assert_close(now, 0.5 * before[name] + 0.5 * online, rtol=0, atol=1e-12)
    assert not torch.equal(copy[1].running_mean, before["1.running_mean"])
    assert int(copy[1].num_batches_tracked) == int(net[1].num_batches_tracked) == 2  # copied, not averaged


def test_update_counter_lives_on_the_model_device():
    # The whole state_dict sits with the model (meta stands in for a GPU; the first H200 run found the
    # counter on the CPU beside a CUDA average).
    ema = EMA(torch.nn.Linear(3, 2, device="meta"))
    assert {v.device.type for v in ema.state_dict().values()} == {"meta"}
    assert EMA(torch.nn.Identity()).num_updates.device.type == "cpu"  # nothing to follow: the default


def test_update_keeps_the_count_on_the_host_and_rereads_it_after_a_load():
    # No read of the device counter per update (a CUDA read waits for the step): on the meta device, where
    # reading a value raises, updates still run.
    model = torch.nn.Linear(3, 2, device="meta")
    ema = EMA(model, decay=0.9, warmup="linear")
    assert [ema.update(model) for _ in range(2)] == [ema.decay_at(1), ema.decay_at(2)]
    net = _net()
    trained = EMA(net, decay=0.999, warmup="linear")
    for _ in range(5):
        trained.update(net)
    clone = EMA(copy.deepcopy(net), decay=0.999, warmup="linear")
    clone.update(net)
    clone.load_state_dict(trained.state_dict())  # the loaded count (5) wins over the clone's own (1)
    assert clone.update(net) == trained.update(net) == trained.decay_at(6) != trained.decay_at(2)
    assert int(clone.num_updates) == 6


# --- bad inputs (issue 18): refused at the boundary, with the argument's name and a fix ---


class _Narrow(torch.nn.Module):
    """Parameters that broadcast against ``_net()``'s first layer: (1, 3) and (1,) against (4, 3) and (4,)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 1)
        self.bn = torch.nn.BatchNorm1d(4)
        self.b = torch.nn.Linear(4, 2)


def test_update_from_another_architecture_is_refused_before_any_change():
    ema = EMA(_net(), decay=0.5)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    # Same parameter count, shapes that broadcast: averaged silently before (an EMA of a (1, 3) weight
    # spread over (4, 3)).
    with pytest.raises(
        ShapeError, match=r"`model`'s parameter `a.weight` to have shape \(4, 3\).*got \(1, 3\)"
    ):
        ema.update(_Narrow())
    with pytest.raises(ShapeError, match=r"architecture the EMA was built from \(Sequential\)"):
        ema.update(torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2)))
    with pytest.raises(
        OptionError, match=r"`model` has 2 parameters but the EMA copy has 6.*same \(online\)"
    ):
        ema.update(torch.nn.Linear(3, 4))
    with pytest.raises(DTypeError, match=r"Expected `model` to be a torch.nn.Module, but got NoneType"):
        ema.update(None)  # type: ignore[arg-type]
    assert int(ema.num_updates) == 0  # a refused update does not advance the decay schedule
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    with pytest.raises(ShapeError, match=r"pass the same \(online\) network to copy_to"):
        ema.copy_to(_Narrow())


def test_update_converts_to_the_average_dtype():
    net = _net()
    ema = EMA(net, decay=0.5).double()
    ema.update(copy.deepcopy(net).bfloat16())  # a bf16 online model into a float64 average: converted
    assert ema.module[0].weight.dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"decay": "0.9"}, DTypeError, r"Expected `decay` to be a real number, but got str '0.9'"),
        ({"decay": float("nan")}, OptionError, r"Expected `decay` to be a finite number, but got nan"),
        ({"min_decay": 0.5, "decay": 0.4}, OptionError, r"0 <= `min_decay` <= `decay` <= 1"),
        (
            {"update_after_step": -1},
            OptionError,
            r"Expected `update_after_step` to be an int >= 0, but got -1",
        ),
        (
            {"update_after_step": 2.5},
            DTypeError,
            r"Expected `update_after_step` to be an int >= 0, but got float",
        ),
        ({"warmup": "power", "inv_gamma": 0}, OptionError, r"Expected `inv_gamma` to be > 0.0, but got 0"),
        ({"warmup": "power", "power": -1.0}, OptionError, r"Expected `power` to be > 0.0, but got -1.0"),
        (
            {"include_buffers": "no"},
            DTypeError,
            r"Expected `include_buffers` to be True or False, but got str",
        ),
        ({"trainable_only": 1}, DTypeError, r"Expected `trainable_only` to be True or False, but got int"),
    ],
)
def test_constructor_refuses_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        EMA(_net(), **kwargs)


def test_constructor_and_decay_at_refuse_bad_types():
    with pytest.raises(DTypeError, match=r"Expected `model` to be a torch.nn.Module, but got list"):
        EMA([torch.nn.Linear(2, 2)])  # type: ignore[arg-type]
    ema = EMA(_net(), warmup="linear")
    with pytest.raises(OptionError, match=r"Expected `num_updates` to be an int >= 0, but got -1"):
        ema.decay_at(-1)
    with pytest.raises(DTypeError, match=r"Expected `num_updates` to be an int >= 0, but got float 1.5"):
        ema.decay_at(1.5)  # type: ignore[arg-type]
    assert ema.decay_at(0) == 0.0 and ema.decay_at(ema.num_updates + 3) == ema.decay_at(
        3
    )  # 0-d tensors index
