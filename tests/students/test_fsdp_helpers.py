"""frozen() and EMA on FSDP2 (``fully_shard``) modules, in a one-process gloo group on the CPU.

FSDP2 keeps the root module unsharded after a forward pass and copies a sharded parameter's
``requires_grad`` into the unsharded one at each all-gather. Two failures follow. (1) A naive freeze
silently stops training the root's layers: reproduced here, and ``frozen`` avoids it. (2) Weights written
into the shards after a no-grad forward are ignored by the root's next forward unless :func:`reshard`
runs first; this needs two processes (with one, the gathered parameters share the shards' storage), so
``tests/examples`` checks it through the SIM script under FSDP (``ReleaseEMA.swapped_in``), whose run
equals the DDP run only with the reshard.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from diffdistill.errors import DTypeError
from diffdistill.students import EMA, frozen, reshard

fsdp = pytest.importorskip("torch.distributed.fsdp")


@pytest.fixture
def group(tmp_path: Path) -> Iterator[None]:
    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))


def _sharded(seed: int = 0) -> nn.Sequential:
    net = _net(seed)
    fsdp.fully_shard(net[0])
    fsdp.fully_shard(net)  # the root: holds the last layer, stays unsharded after a forward
    return net


def _train_twice(net: nn.Module) -> list[bool]:
    """Which parameters get gradients in the second of two forward/backward passes."""
    for _ in range(2):
        for p in net.parameters():
            p.grad = None
        net(torch.randn(2, 4)).sum().backward()
    return [p.grad is not None for p in net.parameters()]


def test_naive_freeze_of_an_fsdp2_root_stops_training_but_frozen_does_not(group: None) -> None:
    naive = _sharded()
    naive.requires_grad_(False)
    with torch.no_grad():
        naive(torch.randn(2, 4))  # e.g. a detached fake-score prediction in a generator step
    naive.requires_grad_(True)  # lands on the unsharded root parameters only
    assert _train_twice(naive) == [True, True, False, False]  # the root's layer silently stopped training

    net = _sharded()
    with frozen(net):
        assert not any(p.requires_grad for p in net.parameters())
        with torch.no_grad():
            net(torch.randn(2, 4))
    assert all(p.requires_grad for p in net.parameters())
    assert _train_twice(net) == [True, True, True, True]


def test_frozen_keeps_per_parameter_flags() -> None:
    net = _net()
    net[0].bias.requires_grad_(False)
    with frozen(net):
        assert not any(p.requires_grad for p in net.parameters())
    assert [p.requires_grad for p in net.parameters()] == [True, False, True, True]


def test_ema_of_a_sharded_model_gathers_the_shards(group: None) -> None:
    online = _sharded(seed=1)
    ema = EMA(_net(seed=2), decay=0.25)  # a whole copy, built before sharding
    start = copy.deepcopy(ema.module.state_dict())
    ema.update(online)
    reference = _net(seed=1).state_dict()
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, 0.25 * start[k] + 0.75 * reference[k])


def test_trainable_only_ema_gathers_only_the_averaged_shards(
    group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.distributed.tensor import DTensor

    online = _net(seed=1)
    online[0].requires_grad_(False)  # a frozen base layer
    ema = EMA(online, decay=0.25, trainable_only=True)  # built before sharding, as in the scripts
    with torch.no_grad():
        online[2].weight.add_(1.0)
    expected = 0.25 * ema.module[2].weight + 0.75 * online[2].weight
    fsdp.fully_shard(online[0])
    fsdp.fully_shard(online)
    gathered: list[tuple[int, ...]] = []
    full_tensor = DTensor.full_tensor

    def counted(self: DTensor, *args: object, **kwargs: object) -> torch.Tensor:
        gathered.append(tuple(self.shape))
        return full_tensor(self, *args, **kwargs)

    monkeypatch.setattr(DTensor, "full_tensor", counted)
    ema.update(online)
    assert gathered == [(1, 4), (1,)]  # the last layer's weight and bias only, not the frozen layer's
    torch.testing.assert_close(ema.module[2].weight, expected)


def test_frozen_and_reshard_refuse_what_is_not_a_module() -> None:
    net = _net()
    # model.parameters() (a generator) failed with "'generator' object has no attribute 'modules'" before
    with (
        pytest.raises(
            DTypeError, match=r"every argument of `frozen` to be a torch.nn.Module, but argument 1 is"
        ),
        frozen(net, net.parameters()),  # type: ignore[arg-type]
    ):
        pass
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(
        DTypeError, match=r"every argument of `reshard` to be a torch.nn.Module, but argument 0 is"
    ):
        reshard(None)  # type: ignore[arg-type]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


class _Tower(nn.Module):
    """A diffusers-like model: its ``_no_split_modules`` names the block class."""

    def __init__(self) -> None:
        super().__init__()
        self._no_split_modules = ["_Block"]
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def test_shard_frozen_makes_each_block_and_the_root_an_fsdp2_unit_with_the_same_outputs(group: None) -> None:
    """shard_frozen: every ``_no_split_modules`` block, then the root, becomes an FSDP2 module (the ignored
    parameters stay plain tensors); the frozen network computes what it computed whole, gradient to its input
    included (a teacher a loss back-propagates through)."""
    from diffdistill.students import shard_frozen

    torch.manual_seed(0)
    whole = _Tower().requires_grad_(False)
    sharded = copy.deepcopy(whole)
    assert shard_frozen(sharded, ignored_params=[sharded.out.bias]) == 2
    assert all(isinstance(m, fsdp.FSDPModule) for m in (sharded, *sharded.blocks))
    assert not isinstance(sharded.out.bias, torch.distributed.tensor.DTensor)
    x = torch.randn(3, 4, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(sharded(x2), whole(x), rtol=0, atol=0)
    whole(x).sum().backward()
    sharded(x2).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=0, atol=0)


def test_shard_frozen_refuses_without_a_process_group_or_a_module() -> None:
    from diffdistill.errors import OptionError
    from diffdistill.students import shard_frozen

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    with pytest.raises(OptionError, match=r"Expected an initialised process group for FSDP2 sharding"):
        shard_frozen(_Tower())
    with pytest.raises(DTypeError, match=r"every argument of `shard_frozen` to be a torch.nn.Module"):
        shard_frozen([_Tower()])  # type: ignore[arg-type]
