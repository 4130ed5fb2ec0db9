"""``unwrap_model`` strips a DeepSpeed engine (one-process gloo group, DeepSpeed's CPU accelerator)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from diffdistill._modules import unwrap_model
from diffdistill.students import FeatureTap


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[nn.Module, nn.Module]]:
    for name, value in {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    deepspeed = pytest.importorskip("deepspeed")
    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True,
        }
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        wrapped, *_ = deepspeed.initialize(model=net, optimizer=opt, config=config, dist_init_required=False)
        yield wrapped, net
    finally:
        dist.destroy_process_group()


def test_unwrap_model_strips_a_deepspeed_engine(engine: tuple[nn.Module, nn.Module]) -> None:
    wrapped, net = engine
    assert type(wrapped).__name__ == "DeepSpeedEngine" and wrapped is not net
    assert unwrap_model(wrapped) is net
    # Layer names of the user's model work through the engine (FeatureTap resolves them after unwrapping).
    with FeatureTap(wrapped, ["1"]) as tap:
        out = wrapped(torch.ones(1, 4))
        feats = tap.pop()
    torch.testing.assert_close(feats["1"], torch.tanh(net[0](torch.ones(1, 4))))
    assert out.shape == (1, 1)
