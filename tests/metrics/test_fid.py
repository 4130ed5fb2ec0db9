"""FID pieces against independent references: np.cov, clean-fid's frechet_distance and resizer, closed forms."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from diffdistill.errors import DTypeError, OptionError, ShapeError
from diffdistill.metrics import (
    FID,
    FeatureStatistics,
    InceptionFeatures,
    clean_resize,
    fid_from_statistics,
    frechet_distance,
)

EPS64 = float(np.finfo(np.float64).eps)


def _features(n: int, d: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + offset


class TinyExtractor(nn.Module):
    """A random CNN: float (N, 3, H, W) -> (N, 6)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 6, 3, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


# -- FeatureStatistics ------------------------------------------------------------------------------------------
def test_streaming_matches_np_cov_with_a_large_mean_offset() -> None:
    """Features 1e6 + O(1): a naive float64 sum of outer products loses ~ (1e6)^2 * eps = 2e-4 of the O(1)
    covariance; Chan's centred update keeps ~ N * eps * |x|^2 / |cov| relative, i.e. the tolerance 1e-9 below
    is ~1e-4 of the naive error (shown to fail on the naive formula)."""
    x = _features(500, 5, seed=0, offset=1e6)
    stats = FeatureStatistics(5)
    for chunk in x.split([1, 7, 100, 200, 192]):
        stats.update(chunk)
    want_cov = np.cov(x.numpy(), rowvar=False)
    assert stats.count == 500
    np.testing.assert_allclose(stats.mean.numpy(), x.numpy().mean(0), rtol=0, atol=1e6 * 100 * EPS64)
    np.testing.assert_allclose(stats.covariance.numpy(), want_cov, rtol=0, atol=1e-9)
    # the naive formula fails the same tolerance: the test can tell the difference
    s1, s2 = x.sum(0), x.T @ x
    naive = ((s2 - torch.outer(s1, s1) / 500) / 499).numpy()
    assert np.abs(naive - want_cov).max() > 1e-6


def test_float32_features_accumulate_in_float64() -> None:
    x = _features(64, 4, seed=1).float()
    stats = FeatureStatistics(4).update(x)
    assert stats.mean.dtype == stats.covariance.dtype == torch.float64
    np.testing.assert_allclose(stats.covariance.numpy(), np.cov(x.double().numpy(), rowvar=False), atol=1e-13)


def test_merge_equals_one_pass_and_streaming_equals_batch() -> None:
    """Merged shards / many small updates / one update differ only by float64 rounding: |cov| ~ 1, so 1e-12."""
    x = _features(300, 6, seed=2, offset=50.0)
    whole = FeatureStatistics(6).update(x)
    a, b, c = FeatureStatistics(6), FeatureStatistics(6), FeatureStatistics(6)
    a.update(x[:37])
    b.update(x[37:200])
    c.update(x[200:])
    merged = FeatureStatistics(6).merge(a).merge(b).merge(c)
    streamed = FeatureStatistics(6)
    for row in x.split(13):
        streamed.update(row)
    for other in (merged, streamed):
        assert other.count == 300
        torch.testing.assert_close(other.mean, whole.mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(other.covariance, whole.covariance, rtol=0, atol=1e-12)
    empty = FeatureStatistics(6).merge(FeatureStatistics(6))
    assert empty.count == 0


def test_save_load_round_trip_and_reference_files(tmp_path: Path) -> None:
    x = _features(40, 3, seed=3)
    stats = FeatureStatistics(3).update(x)
    stats.save(tmp_path / "ours.npz")
    back = FeatureStatistics.load(tmp_path / "ours.npz")
    assert back.count == 40
    torch.testing.assert_close(back.covariance, stats.covariance, rtol=0, atol=1e-14)
    back.update(x)  # a file with a count can keep accumulating
    assert back.count == 80
    # clean-fid / pytorch-fid reference files hold only mu and sigma
    mu, sigma = x.numpy().mean(0), np.cov(x.numpy(), rowvar=False)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    ref = FeatureStatistics.load(tmp_path / "ref.npz")
    assert ref.count is None
    np.testing.assert_array_equal(ref.covariance.numpy(), sigma)
    assert abs(fid_from_statistics(stats, ref)) < 1e-10
    with pytest.raises(OptionError, match=r"loaded from a file without a `count`"):
        ref.update(x)
    with pytest.raises(OptionError, match=r"loaded from a file without a `count`"):
        FeatureStatistics(3).merge(ref)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ShapeError, match=r"lacks the key\(s\) \['mu', 'sigma'\]"):
        FeatureStatistics.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "bad2.npz", mu=mu, sigma=sigma[:2])
    with pytest.raises(ShapeError, match=r"expected \(D,\) and \(D, D\)"):
        FeatureStatistics.load(tmp_path / "bad2.npz")
    with pytest.raises(FileNotFoundError, match=r"No feature statistics at"):
        FeatureStatistics.load(tmp_path / "missing.npz")


def test_save_writes_exactly_the_path_given_and_load_reads_it_back_bit_for_bit(tmp_path: Path) -> None:
    """A name without ``.npz`` is kept (``np.savez`` of a name would write ``coco_ref.npz``, which ``load`` and
    ``FID(reference=...)`` of the same name did not find), and the covariance of a file with a count is read back
    as written, bit for bit (kept as the scatter ``sigma * (n - 1)`` only, dividing by ``n - 1`` again moves the
    last bit of some entries of a covariance not computed as such a quotient)."""
    x = _features(50, 4, seed=11, offset=3.0)
    stats = FeatureStatistics(4).update(x)
    path = tmp_path / "coco_ref"
    stats.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco_ref"]
    back = FeatureStatistics.load(path)
    assert back.count == 50
    np.testing.assert_array_equal(back.mean.numpy(), stats.mean.numpy())
    np.testing.assert_array_equal(back.covariance.numpy(), stats.covariance.numpy())
    fid = FID(lambda feats: feats, reference=path)
    fid.update(x)
    assert abs(fid.compute()) < 1e-9
    # a covariance from elsewhere (a @ a.T) with a count: 4 of its 36 entries would change in the last bit
    a = np.random.default_rng(5).standard_normal((6, 6))
    sigma = a @ a.T
    assert ((sigma * 49) / 49 != sigma).any()  # the case the test needs
    np.savez(tmp_path / "foreign.npz", mu=np.zeros(6), sigma=sigma, count=np.int64(50))
    foreign = FeatureStatistics.load(tmp_path / "foreign.npz")
    np.testing.assert_array_equal(foreign.covariance.numpy(), sigma)
    # new features: the state moves on from the scatter, as a merge of the two sets
    y = _features(30, 6, seed=12).numpy()
    scatter = (
        sigma * 49 + (y - y.mean(0)).T @ (y - y.mean(0)) + np.outer(y.mean(0), y.mean(0)) * (50 * 30 / 80)
    )
    np.testing.assert_allclose(
        foreign.update(torch.from_numpy(y)).covariance.numpy(), scatter / 79, rtol=1e-12
    )
    # a file np.savez wrote for a name without the suffix: the error names the file that exists
    np.savez(tmp_path / "legacy", mu=x.numpy().mean(0), sigma=np.cov(x.numpy(), rowvar=False))
    with pytest.raises(
        FileNotFoundError, match=r"No feature statistics at `.*legacy`\. `.*legacy\.npz` exists"
    ):
        FeatureStatistics.load(tmp_path / "legacy")


def test_fid_protocol_identifies_the_given_reference_statistics(tmp_path: Path) -> None:
    """Runs scored against different reference statistics are refused by ``check_comparable``; the same statistics
    in memory, saved with a count, or as a clean-fid-style file (float32 ``mu``, no count) hash the same, the
    hash being SHA-256 of the float64 mean and covariance bytes written out here."""
    from diffdistill.errors import ProtocolMismatchError
    from diffdistill.metrics import EvaluationProtocol, check_comparable

    ref_a = FeatureStatistics(4).update(_features(60, 4, seed=21))
    ref_b = FeatureStatistics(4).update(_features(60, 4, seed=22, offset=0.5))

    def record(fid: FID) -> EvaluationProtocol:
        return EvaluationProtocol("toy", "0" * 64, 1, backbones={"fid": fid.protocol()})

    fid_a, fid_b = FID(TinyExtractor(), reference=ref_a), FID(TinyExtractor(), reference=ref_b)
    check_comparable(record(fid_a), record(FID(TinyExtractor(), reference=ref_a)))
    with pytest.raises(ProtocolMismatchError, match=r"backbones\.fid\.reference_sha256: '[0-9a-f]{64}' != "):
        check_comparable(record(fid_a), record(fid_b))
    mu, sigma = ref_a.mean.numpy(), ref_a.covariance.numpy()
    want = hashlib.sha256(mu.astype(np.float64).tobytes() + sigma.astype(np.float64).tobytes()).hexdigest()
    proto = fid_a.protocol()
    assert proto["reference_sha256"] == want and proto["reference_count"] == 60
    assert proto["reference"] == "given statistics" and "reference_file" not in proto
    # saved with its count and loaded from the path: the same hash and count, and the file's name
    ref_a.save(tmp_path / "ref_a.npz")
    loaded = FID(TinyExtractor(), reference=tmp_path / "ref_a.npz").protocol()
    assert loaded == proto | {"reference_file": "ref_a.npz"}
    # a clean-fid reference: float32 mu, float64 sigma, no count; hashed after the exact upcast
    mu32 = mu.astype(np.float32)
    np.savez_compressed(tmp_path / "clean.npz", mu=mu32, sigma=sigma)
    clean = FID(TinyExtractor(), reference=tmp_path / "clean.npz").protocol()
    assert "reference_count" not in clean and clean["reference_file"] == "clean.npz"
    assert (
        clean["reference_sha256"]
        == hashlib.sha256(mu32.astype(np.float64).tobytes() + sigma.tobytes()).hexdigest()
    )
    assert clean["reference_sha256"] != want  # the float32 rounding of mu is a different reference
    # a reference accumulated from images carries no hash (the caller identifies the images)
    assert "reference_sha256" not in FID(TinyExtractor()).protocol()


def test_feature_statistics_errors() -> None:
    with pytest.raises(OptionError, match=r"Expected `num_features` to be an int >= 1, but got 0"):
        FeatureStatistics(0)
    stats = FeatureStatistics(3)
    with pytest.raises(ShapeError, match=r"Expected `features` to have 3 columns"):
        stats.update(torch.zeros(4, 2))
    with pytest.raises(ShapeError, match=r"to have 2 dimensions laid out as \(N, D\)"):
        stats.update(torch.zeros(4))
    with pytest.raises(DTypeError, match=r"floating-point tensor"):
        stats.update(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"needs at least 2 feature vectors, but 0 were seen"):
        _ = stats.covariance
    with pytest.raises(DTypeError, match=r"Expected `other` to be a FeatureStatistics"):
        stats.merge(np.zeros(3))  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match=r"Cannot merge statistics of 2 features into statistics of 3"):
        stats.merge(FeatureStatistics(2))
    assert stats.all_reduce() is stats  # no process group: a no-op


# -- frechet_distance ---------------------------------------------------------------------------------------------
def test_frechet_distance_matches_clean_fid() -> None:
    from cleanfid.fid import frechet_distance as clean_frechet

    a, b = _features(200, 8, seed=4), _features(150, 8, seed=5, offset=0.3)
    mu1, s1 = a.numpy().mean(0), np.cov(a.numpy(), rowvar=False)
    mu2, s2 = b.numpy().mean(0), np.cov(b.numpy(), rowvar=False)
    want = float(clean_frechet(mu1, s1, mu2, s2))
    got = frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), mu2, s2)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert fid_from_statistics(
        FeatureStatistics(8).update(a), FeatureStatistics(8).update(b)
    ) == pytest.approx(want, rel=1e-10)


def test_frechet_distance_of_commuting_covariances_is_the_closed_form() -> None:
    """Diagonal covariances commute: d^2 = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2."""
    g = torch.Generator().manual_seed(6)
    mu1, mu2 = (
        torch.randn(10, generator=g, dtype=torch.float64),
        torch.randn(10, generator=g, dtype=torch.float64),
    )
    v1, v2 = (
        torch.rand(10, generator=g, dtype=torch.float64) + 0.1,
        torch.rand(10, generator=g, dtype=torch.float64) + 0.1,
    )
    want = float(((mu1 - mu2) ** 2).sum() + ((v1.sqrt() - v2.sqrt()) ** 2).sum())
    assert frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2)) == pytest.approx(want, rel=1e-12)
    # commuting but not diagonal: a common rotation changes nothing
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    got = frechet_distance(q @ mu1, q @ torch.diag(v1) @ q.T, q @ mu2, q @ torch.diag(v2) @ q.T)
    assert got == pytest.approx(want, rel=1e-9)


def test_fid_of_a_set_against_itself_is_zero() -> None:
    """sqrtm(S S) = S up to rounding: |d^2| <= a few hundred eps * D * tr(S) (D = 16, tr S ~ 16)."""
    x = _features(400, 16, seed=7, offset=3.0)
    stats = FeatureStatistics(16).update(x)
    trace = float(torch.trace(stats.covariance))
    assert abs(fid_from_statistics(stats, stats)) <= 1000 * EPS64 * 16 * trace


def test_frechet_distance_errors() -> None:
    with pytest.raises(
        DTypeError, match=r"Expected `mu1` to be a numpy array or a torch.Tensor, but got list"
    ):
        frechet_distance([0.0], np.eye(1), np.zeros(1), np.eye(1))
    with pytest.raises(ShapeError, match=r"Expected `sigma2` to have shape \(2, 2\)"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
    with pytest.raises(ShapeError, match=r"Expected `sigma1` to have 2 dimension"):
        frechet_distance(np.zeros(2), np.zeros(2), np.zeros(2), np.eye(2))
    with pytest.raises(DTypeError, match=r"Expected `a` to be a FeatureStatistics"):
        fid_from_statistics(np.zeros(2), FeatureStatistics(2))  # type: ignore[arg-type]


# -- clean_resize / InceptionFeatures -----------------------------------------------------------------------------
def test_clean_resize_matches_clean_fids_resizer() -> None:
    from cleanfid.resize import build_resizer

    g = torch.Generator().manual_seed(8)
    uint8 = torch.randint(0, 256, (2, 37, 53, 3), generator=g, dtype=torch.uint8)
    fn = build_resizer("clean")
    want = np.stack([fn(img) for img in uint8.numpy()]).transpose(0, 3, 1, 2)
    got = clean_resize(uint8)
    assert got.shape == (2, 3, 299, 299) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(clean_resize(uint8.numpy(), num_threads=1).numpy(), want)
    np.testing.assert_array_equal(clean_resize(uint8, num_threads=2).numpy(), want)
    # float [0, 1] (N, 3, H, W) is rounded to the same uint8 first (what a PNG holds)
    as_float = uint8.permute(0, 3, 1, 2).float() / 255
    np.testing.assert_array_equal(clean_resize(as_float).numpy(), want)
    shifted = (as_float + 0.4 / 255).clamp(0, 1)
    unrounded = clean_resize(shifted, quantize=False)
    want_unrounded = np.stack([fn(img) for img in (shifted * 255).permute(0, 2, 3, 1).numpy()])
    np.testing.assert_allclose(unrounded.numpy(), want_unrounded.transpose(0, 3, 1, 2), rtol=0, atol=1e-3)


def test_clean_resize_errors() -> None:
    with pytest.raises(ShapeError, match=r"uint8 `images` laid out as \(N, H, W, 3\)"):
        clean_resize(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(
        ShapeError, match=r"float `images` laid out as \(N, 3, H, W\) with 3 \(RGB\) channels"
    ):
        clean_resize(torch.zeros(1, 8, 8, 3))
    with pytest.raises(OptionError, match=r"Expected float `images` in \[0, 1\], but they range over \[-1"):
        clean_resize(torch.full((1, 3, 4, 4), -1.0))
    with pytest.raises(DTypeError, match=r"Expected numpy `images` to be uint8"):
        clean_resize(np.zeros((1, 4, 4, 3)))
    with pytest.raises(OptionError, match=r"Expected `num_threads` to be an int >= 1, but got 0"):
        clean_resize(torch.zeros(1, 3, 4, 4), num_threads=0)
    with pytest.raises(DTypeError, match=r"Expected `quantize` to be True or False"):
        clean_resize(torch.zeros(1, 3, 4, 4), quantize=1)  # type: ignore[arg-type]


def test_inception_features_loads_clean_fids_torchscript_lazily(tmp_path: Path) -> None:
    """A stand-in ``inception-2015-12-05.pt`` (same TorchScript interface: ``.layers`` on (x - 128) / 128) proves
    the wiring: clean resize -> normalisation -> layers -> (N, 2048); nothing is downloaded."""

    class Base(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(nn.Conv2d(3, 2048, 1), nn.AdaptiveAvgPool2d(1))

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return self.layers(x)

    torch.manual_seed(0)
    base = Base()
    torch.jit.script(base).save(str(tmp_path / "inception-2015-12-05.pt"))
    net = InceptionFeatures(tmp_path)
    assert not net.loaded
    images = torch.rand(2, 3, 40, 30)
    feats = net(images)
    assert net.loaded and feats.shape == (2, 2048)
    with torch.no_grad():
        want = base.layers((clean_resize(images) - 128) / 128).view(2, 2048)
    torch.testing.assert_close(feats, want)
    assert not net.train().training


# -- FID ------------------------------------------------------------------------------------------------------
def test_fid_accumulator_matches_features_in_one_pass(tmp_path: Path) -> None:
    extractor = TinyExtractor()
    g = torch.Generator().manual_seed(9)
    fake, real = torch.rand(40, 3, 16, 16, generator=g), torch.rand(30, 3, 16, 16, generator=g) ** 2
    fid = FID(extractor)
    for chunk in fake.split(16):
        fid.update(chunk)
    for chunk in real.split(7):
        fid.update(chunk, real=True)
    with torch.no_grad():
        ff, fr = extractor(fake).double().numpy(), extractor(real).double().numpy()
    from cleanfid.fid import frechet_distance as clean_frechet

    want = float(clean_frechet(ff.mean(0), np.cov(ff, rowvar=False), fr.mean(0), np.cov(fr, rowvar=False)))
    assert fid.compute() == pytest.approx(want, rel=1e-6)
    # the same reference as an .npz path
    assert fid.real is not None
    fid.real.save(tmp_path / "ref.npz")
    again = FID(extractor, reference=tmp_path / "ref.npz")
    again.update(fake)
    assert again.compute() == pytest.approx(want, rel=1e-6)
    assert again.protocol()["reference"] == "given statistics"
    fid.reset()
    with pytest.raises(OptionError, match=r"before any update"):
        fid.compute()


def _write_pngs(folder: Path, seed: int, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """PNG files of random uint8 images (``(width, height)`` each); returns the arrays as PIL reads them back."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    arrays = []
    for k, (w, h) in enumerate(sizes):
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        array[: h // 2] //= 1 + k % 3  # structure beyond noise, so that the features vary across images
        array[..., seed % 3] //= seed  # and the two sets differ (FID ~ 1)
        Image.fromarray(array).save(folder / f"{k:06d}.png")
        arrays.append(array)
    return arrays


def test_folder_fid_equals_clean_fids_compute_fid(tmp_path: Path) -> None:
    """clean-fid's own folder path (``compute_fid(fdir1, fdir2, mode="clean", custom_feat_extractor=...)``: PIL
    reading, clean resize, its DataLoader, ``np.cov``, its ``frechet_distance``) and ours (:class:`FID` over
    :func:`clean_resize` of the same files, streaming float64 statistics) give the same FID with the same feature
    network, here a random 6-feature net on ``(x - 128) / 128`` (clean-fid's Inception normalisation) so that the
    covariances are full rank with 14 / 12 images. Images of several sizes: each is resized on its own."""
    from cleanfid import fid as clean_fid

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 9, stride=8), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()

    def features_of_resized(batch: torch.Tensor) -> torch.Tensor:  # (N, 3, 299, 299) in [0, 255]
        # image by image: a conv's float32 result can depend on the batch it runs in, and the batches differ
        with torch.no_grad():
            return torch.cat([net((x[None] - 128) / 128) for x in batch])

    fake = _write_pngs(tmp_path / "fake", 1, [(40, 52)] * 6 + [(33, 33)] * 8)
    real = _write_pngs(tmp_path / "real", 2, [(64, 48)] * 12)
    ours = FID(lambda images: features_of_resized(clean_resize(images, num_threads=1)))
    for array in fake:
        ours.update(array[None])
    for array in real[:7], real[7:]:
        ours.update(np.stack(array), real=True)
    assert ours.fake is not None and ours.real is not None
    # 1. clean-fid's folder features (its reading, resize and batching) are ours bit for bit, and our streaming
    # float64 moments are np.cov's / the float64 mean's to float64 rounding (~1e-15 relative; 1e-12 with margin)
    kwargs: dict[str, Any] = dict(num_workers=0, batch_size=5, device=torch.device("cpu"), verbose=False)
    theirs = {
        k: clean_fid.get_folder_features(str(tmp_path / k), features_of_resized, mode="clean", **kwargs)
        for k in ("fake", "real")
    }
    for stats, feats in ((ours.fake, theirs["fake"]), (ours.real, theirs["real"])):
        f64 = feats.astype(np.float64)
        np.testing.assert_allclose(stats.mean.numpy(), f64.mean(0), rtol=1e-12, atol=0)
        np.testing.assert_allclose(
            stats.covariance.numpy(), np.cov(f64, rowvar=False), rtol=1e-12, atol=1e-15
        )
    exact = clean_fid.frechet_distance(
        theirs["fake"].astype(np.float64).mean(0), np.cov(theirs["fake"], rowvar=False),
        theirs["real"].astype(np.float64).mean(0), np.cov(theirs["real"], rowvar=False),
    )  # fmt: skip
    assert ours.compute() == pytest.approx(float(exact), rel=1e-9)
    # 2. compute_fid itself takes the mean of the float32 features in float32 (np.mean keeps the dtype): its mu
    # is off by up to ~log2(N) * eps32 * |mu| per set, which moves |mu1 - mu2|^2 by at most about
    # 2 |mu1 - mu2| (|d1| + |d2|) -- the only difference left
    want = clean_fid.compute_fid(
        str(tmp_path / "fake"),
        str(tmp_path / "real"),
        mode="clean",
        custom_feat_extractor=features_of_resized,
        use_dataparallel=False,
        **kwargs,
    )
    eps32 = float(np.finfo(np.float32).eps)
    mu_f, mu_r = ours.fake.mean.numpy(), ours.real.mean.numpy()
    drift = 4 * eps32 * (np.linalg.norm(mu_f) + np.linalg.norm(mu_r))
    assert abs(ours.compute() - float(want)) <= 2 * np.linalg.norm(mu_f - mu_r) * drift + drift**2 + 1e-12
    # 3. the float layout of the same images (what examples/evaluate.py reads back from the PNGs) gives the same
    floats = FID(lambda images: features_of_resized(clean_resize(images, num_threads=1)), reference=ours.real)
    for array in fake:
        floats.update(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255)
    assert floats.compute() == ours.compute()


def test_fid_of_identical_image_sets_is_zero() -> None:
    fid = FID(TinyExtractor())
    images = torch.rand(24, 3, 16, 16)
    fid.update(images)
    fid.update(images, real=True)
    assert abs(fid.compute()) < 1e-9


def test_fid_errors() -> None:
    with pytest.raises(DTypeError, match=r"Expected `feature_extractor` to be callable"):
        FID(3)  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match=r"Expected `reference` to be FeatureStatistics, the path"):
        FID(TinyExtractor(), reference=3)  # type: ignore[arg-type]
    fid = FID(TinyExtractor(), reference=FeatureStatistics(6).update(torch.randn(10, 6)))
    with pytest.raises(OptionError, match=r"built with fixed `reference` statistics"):
        fid.update(torch.rand(2, 3, 8, 8), real=True)
    fid = FID(TinyExtractor())
    fid.update(torch.rand(4, 3, 8, 8))
    with pytest.raises(OptionError, match=r"FID.compute\(\) has no reference"):
        fid.compute()
    bad = FID(lambda images: images.flatten())
    with pytest.raises(ShapeError, match=r"`feature_extractor\(images\)` to have 2 dimensions"):
        bad.update(torch.rand(2, 3, 4, 4))
