"""Smoke test of examples/train_latent_lpips.py: 2 steps per stage on generated data and a tiny VAE."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from diffdistill.losses import LatentLPIPS

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_latent_lpips.py"


def _load_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("train_latent_lpips", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_png(path: Path, rng: np.random.Generator, size: int = 20) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def tiny_setup(tmp_path: Path) -> dict[str, Path]:
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    vae.save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        for i in range(3):
            _write_png(tmp_path / "train" / c / f"{i}.png", rng)
    for i in range(4):
        for part in ("ref", "p0", "p1"):
            _write_png(tmp_path / "bapps" / "traditional" / part / f"{i:03d}.png", rng)
        (tmp_path / "bapps" / "traditional" / "judge").mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "bapps" / "traditional" / "judge" / f"{i:03d}.npy", np.array([rng.random()]))
    return {"root": tmp_path}


def test_two_steps_per_stage(tiny_setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    root = tiny_setup["root"]
    script = _load_script()
    out = root / "out"
    # The heads train with their dropout on (as LPIPS'), and are evaluated with it off.
    dropout_on: list[bool] = []

    class Spy(script.LatentLPIPS):  # type: ignore[misc, name-defined]
        def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
            dropout_on.append(all(h.model[0].training for h in self.heads))
            return super().forward(*args, **kwargs)

    monkeypatch.setattr(script, "LatentLPIPS", Spy)
    args = script.parse_args(
        [
            "--pretrained_vae", str(root / "vae"),
            "--train_dir", str(root / "train"),
            "--bapps_dir", str(root / "bapps"),
            "--output_dir", str(out),
            "--resolution", "16",
            "--batch_size", "3",
            "--classifier_width", "32",
            "--classifier_max_steps", "2",
            "--calibration_batch_size", "2",
            "--calibration_max_steps", "2",
            "--bapps_val_dir", str(root / "bapps"),
            "--device", "cpu",
        ]
    )  # fmt: skip
    metrics = script.main(args)
    assert metrics["classifier_steps"] == 2 and metrics["calibration_steps"] == 2
    assert dropout_on == [True] * 4 + [False] * 4  # 2 steps x (d0, d1); then 2 val batches x (d0, d1)
    # The held-out score: the saved metric's agreement on the val triplets, from the posterior means.
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(root / "vae"))
    data = script.TwoAFCDataset(str(root / "bapps"), 16)
    saved = LatentLPIPS(4, weights=out / "latent_lpips.safetensors", l1_weight=0.0, reduction="none")
    agree = []
    with torch.no_grad():
        for i in range(len(data)):
            ref, p0, p1, judge = (t.unsqueeze(0) if isinstance(t, torch.Tensor) else t for t in data[i])
            z = [vae.encode(x).latent_dist.mode() * vae.config.scaling_factor for x in (ref, p0, p1)]
            agree.append(
                script.two_afc_agreement(saved(z[0], z[1]), saved(z[0], z[2]), torch.as_tensor(judge))
            )
    assert metrics["2afc"] == pytest.approx(float(torch.cat([a.reshape(-1) for a in agree]).mean()), abs=1e-5)
    assert 0.0 <= metrics["2afc_train"] <= 1.0
    assert json.loads((out / "metrics.json").read_text())["calibration_steps"] == 2
    metric = LatentLPIPS(4, weights=out / "latent_lpips.safetensors", reduction="none")
    assert all(float(h.model[1].weight.min()) >= 0 for h in metric.heads)
    z = torch.randn(2, 4, 8, 8)
    d = metric(z, z.flip(0))
    assert d.shape == (2,) and torch.isfinite(d).all()
    from safetensors.torch import load_file

    trunk = load_file(str(out / "latent_vgg16_bn.safetensors"))
    assert trunk["net.slice1.0.weight"].shape == (64, 4, 3, 3) and "classifier.6.weight" in trunk


def _argv(root: Path, out: Path, *extra: str, stage1: bool = True) -> list[str]:
    """A tiny run: 6 images of batch 3 (2 steps an epoch), 2 calibration steps."""
    argv = ["--pretrained_vae", str(root / "vae"), "--bapps_dir", str(root / "bapps"), "--output_dir", str(out),
            "--resolution", "16", "--batch_size", "3", "--classifier_width", "32", "--calibration_batch_size", "2",
            "--calibration_max_steps", "2", "--device", "cpu", "--lr", "0.01"]  # fmt: skip
    return argv + (["--train_dir", str(root / "train")] if stage1 else []) + list(extra)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_bapps_is_checked_before_stage_1(
    tiny_setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A BAPPS folder without judge/ (or a ref without its p1 image) fails before stage 1 runs one step."""
    root = tiny_setup["root"]
    script = _load_script()
    stage1: list[int] = []
    monkeypatch.setattr(script, "train_classifier", lambda *a, **k: stage1.append(1))
    bapps = root / "bapps" / "traditional"
    (bapps / "judge").rename(root / "judge_elsewhere")
    with pytest.raises(ValueError, match="No BAPPS triplets"):
        script.main(script.parse_args(_argv(root, root / "out")))
    (root / "judge_elsewhere").rename(bapps / "judge")
    (bapps / "p1" / "002.png").unlink()
    with pytest.raises(ValueError, match=r"1 of 4 lack one \(first: .*002.png\)"):
        script.main(script.parse_args(_argv(root, root / "out", "--bapps_val_dir", str(root / "bapps"))))
    assert stage1 == []


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--bapps_dir", "/typo/bapps"], "--bapps_dir /typo/bapps to be a BAPPS 2AFC folder"),
        (["--bapps_val_dir", "/typo/val"], "--bapps_val_dir /typo/val to be a BAPPS"),
        (["--train_dir", "/typo/train"], "--train_dir /typo/train to be a folder"),
        (["--pretrained_vae", "/typo/vae"], "local diffusers AutoencoderKL folder"),
        (["--batch_size", "0"], "--batch_size >= 1"),
        (["--classifier_epochs", "0"], "--classifier_epochs >= 1"),
        (["--calibration_max_steps", "-1"], "--calibration_max_steps >= 1"),
        (["--resume"], "there is none: drop --resume"),
        (["--trunk", "/typo/trunk.safetensors"], "drop --resume and --train_dir"),
    ],
)
def test_bad_options_are_refused_by_parse_args(
    tiny_setup: dict[str, Path], extra: list[str], match: str
) -> None:
    root = tiny_setup["root"]
    with pytest.raises(ValueError, match=re.escape(match)):
        _load_script().parse_args(_argv(root, root / "out", *extra))


def test_trunk_and_resume_reproduce_the_uninterrupted_run(tiny_setup: dict[str, Path]) -> None:
    """Stage 1 resumed after epoch 1 gives the trunk of 2 uninterrupted epochs, bit for bit (each epoch seeded by
    (seed, epoch)); --trunk skips stage 1 and gives the heads of the full run (stage 2 seeded by --seed)."""
    root = tiny_setup["root"]
    script = _load_script()
    full = script.main(script.parse_args(_argv(root, root / "full", "--classifier_epochs", "2")))
    assert full["classifier_steps"] == 4
    reference = _tensors(root / "full" / script.TRUNK_NAME)
    heads = _tensors(root / "full" / "latent_lpips.safetensors")

    script.main(script.parse_args(_argv(root, root / "split", "--classifier_epochs", "1")))
    once = _tensors(root / "split" / script.TRUNK_NAME)
    assert not torch.equal(once["net.slice1.0.weight"], reference["net.slice1.0.weight"])
    with pytest.raises(ValueError, match="pass --resume to continue it"):
        script.parse_args(_argv(root, root / "split", "--classifier_epochs", "2"))
    with pytest.raises(ValueError, match=r"these differ \(checkpoint, now\): \{'lr': \(0.01, 0.1\)\}"):
        script.main(
            script.parse_args(
                _argv(root, root / "split", "--classifier_epochs", "2", "--resume", "--lr", "0.1")
            )
        )
    resumed = script.main(
        script.parse_args(_argv(root, root / "split", "--classifier_epochs", "2", "--resume"))
    )
    assert resumed["classifier_steps"] == 4
    assert all(torch.equal(v, reference[k]) for k, v in _tensors(root / "split" / script.TRUNK_NAME).items())
    assert all(
        torch.equal(v, heads[k]) for k, v in _tensors(root / "split" / "latent_lpips.safetensors").items()
    )

    trunk = str(root / "full" / script.TRUNK_NAME)
    loaded = script.main(script.parse_args(_argv(root, root / "heads", "--trunk", trunk, stage1=False)))
    assert loaded["trunk"] == trunk and "classifier_steps" not in loaded
    assert not (root / "heads" / script.CHECKPOINT_NAME).exists()
    assert all(
        torch.equal(v, heads[k]) for k, v in _tensors(root / "heads" / "latent_lpips.safetensors").items()
    )
    with pytest.raises(ValueError, match="its scaling_factor is"):
        script.main(script.parse_args(_argv(root, root / "h2", "--trunk", trunk, "--scaling_factor", "2",
                                            stage1=False)))  # fmt: skip
