"""FVD and I3DFeatures: the StyleGAN-V call of the TorchScript I3D (uint8 (N, 3, T, H, W) clips, rescale / resize /
return_features) checked on a TorchScript stand-in the test writes, the clip of the first frames, the value against
numpy and scipy by hand, the protocol, and the input checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from diffdistill.errors import DTypeError, OptionError, ShapeError
from diffdistill.metrics import FVD, I3DFeatures

# the stand-ins are TorchScript, as the published I3D is
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

PROJECTION = torch.from_numpy(np.random.default_rng(0).standard_normal((48, 6))).float()


class StandInI3D(torch.nn.Module):
    """The I3D's TorchScript call signature: uint8 clips (N, 3, T, H, W) -> (N, 6) features (a (4, 2, 2) average pool
    of each channel, 48 numbers, through a fixed projection); any other flags or layout raise, as a wrong call must
    not go unnoticed."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("projection", PROJECTION.clone())

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 5 or x.shape[1] != 3:
            raise RuntimeError("expected uint8 clips (N, 3, T, H, W)")
        if not (rescale and resize and return_features):
            raise RuntimeError("expected rescale=True, resize=True, return_features=True")
        pooled = torch.nn.functional.adaptive_avg_pool3d(x.float() / 127.5 - 1.0, [4, 2, 2])
        return pooled.flatten(1) @ self.projection


class ScalarI3D(torch.nn.Module):
    """The call signature, but one number for the whole batch."""

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        return x.float().mean()


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    torch.jit.script(StandInI3D()).save(str(path))
    return path


def _videos(n: int, frames: int, seed: int, size: int = 8) -> torch.Tensor:
    """Float videos (n, frames, 3, size, size) whose values are multiples of 1/255 (as frames read from PNG)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, frames, 3, size, size), generator=g).float() / 255


def _features_by_hand(videos: torch.Tensor) -> np.ndarray:
    """The stand-in's features of the uint8 clips derived here: x * 255 (exact for PNG values), (N, 3, T, H, W)."""
    clips = (videos * 255).round().to(torch.uint8).permute(0, 2, 1, 3, 4)
    return StandInI3D()(clips, True, True, True).double().numpy()


def _frechet_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


def test_i3d_features_make_stylegan_vs_call(i3d_file: Path) -> None:
    """uint8 clips (N, 3, T, H, W) rounded half up, the three flags set, the network's features returned as float32;
    the file is read on first use."""
    net = I3DFeatures(i3d_file)
    assert not net.loaded
    videos = _videos(3, 5, seed=1)
    got = net(videos)
    assert net.loaded and got.dtype == torch.float32 and got.shape == (3, 6)
    np.testing.assert_allclose(got.double().numpy(), _features_by_hand(videos), rtol=1e-6, atol=1e-6)
    # rounding half up: 0.5 / 255 above a level rounds to the next one (127.5 -> 128), just below it does not
    half = torch.full((1, 4, 3, 8, 8), 127.5 / 255)
    below = torch.full((1, 4, 3, 8, 8), 127.49 / 255)
    assert not torch.equal(net(half), net(below))
    torch.testing.assert_close(net(half), net(torch.full_like(half, 128 / 255)), rtol=0, atol=0)
    assert not net.train().training  # frozen


def test_fvd_scores_the_first_frames_against_numpy_by_hand(i3d_file: Path) -> None:
    fake, real = _videos(12, 6, seed=2), _videos(14, 7, seed=3)
    fvd = FVD(I3DFeatures(i3d_file), num_frames=4)
    for chunk in fake.split(5):
        fvd.update(chunk)
    for chunk in real.split(6):
        fvd.update(chunk, real=True)
    want = _frechet_by_hand(_features_by_hand(fake[:, :4]), _features_by_hand(real[:, :4]))
    assert fvd.compute() == pytest.approx(want, rel=1e-6)
    # mutation: clips of every frame (or of the last four) give another number
    whole = _frechet_by_hand(_features_by_hand(fake), _features_by_hand(real[:, :6]))
    last = _frechet_by_hand(_features_by_hand(fake[:, -4:]), _features_by_hand(real[:, -4:]))
    assert abs(whole - want) > 1e-3 * want and abs(last - want) > 1e-3 * want
    fvd.reset()
    with pytest.raises(OptionError, match=r"compute\(\) before any update"):
        fvd.compute()


def test_fvd_protocol_names_the_clip_and_the_network(i3d_file: Path) -> None:
    record = FVD(I3DFeatures(i3d_file)).protocol()
    assert record["metric"] == "fvd" and record["num_frames"] == 16
    assert record["reference"] == "accumulated from images" and "first num_frames frames" in record["clip"]
    assert (
        "i3d_torchscript.pt" in record["feature_extractor"] and "rescale=True" in record["feature_extractor"]
    )
    assert "1/(n-1)" in record["covariance"]
    assert record["feature_extractor_sha256"] == hashlib.sha256(i3d_file.read_bytes()).hexdigest()


def test_fvd_input_checks(i3d_file: Path, tmp_path: Path) -> None:
    fvd = FVD(I3DFeatures(i3d_file), num_frames=4)
    with pytest.raises(
        ShapeError, match=r"at least 4 frames per video \(FVD scores clips of the first num_frames=4"
    ):
        fvd.update(_videos(2, 3, seed=0))
    with pytest.raises(ShapeError, match=r"3 \(RGB\) channels.*permute"):
        fvd.update(_videos(2, 5, seed=0).permute(0, 2, 1, 3, 4))
    with pytest.raises(OptionError, match=r"in \[0, 1\]"):
        fvd.update(_videos(2, 5, seed=0) * 2)
    with pytest.raises(DTypeError, match="floating"):
        fvd.update(torch.zeros(2, 5, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(FileNotFoundError, match=r"no such file\. Download i3d_torchscript\.pt from"):
        I3DFeatures(tmp_path / "missing.pt")
    with pytest.raises(DTypeError, match=r"FVD has no default network"):
        FVD(None)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="num_frames"):
        FVD(I3DFeatures(i3d_file), num_frames=0)
    other = tmp_path / "scalar.pt"  # a network that returns no (N, D) features
    torch.jit.script(ScalarI3D()).save(str(other))
    with pytest.raises(ShapeError, match=r"to return features \(N, D\) for 2 clips, but got shape \(\)"):
        I3DFeatures(other)(_videos(2, 4, seed=0))
