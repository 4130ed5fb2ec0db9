"""Build a LatentLPIPS for any VAE: train the latent VGG16-BN, then calibrate its heads on BAPPS 2AFC.

Stage 1 trains a VGG16-BN classifier whose first convolution takes the VAE's latent channels and whose
first three max-pools are removed (Kang et al., "Distilling Diffusion Models into Conditional GANs",
ECCV 2024, arXiv:2405.05967) on the latents of an image folder laid out as ``root/<class>/<image>``
(ImageNet in the paper; the optimiser is our choice, torchvision's ImageNet recipe as in the unofficial
reproduction: SGD, lr 0.1, momentum 0.9, weight decay 1e-4, step decay; the paper's values are not known).

Stage 2 freezes that trunk and fits the five non-negative 1×1 heads on two-alternative forced-choice
triplets in the BAPPS layout (``<dir>/ref``, ``<dir>/p0``, ``<dir>/p1`` images with matching names
and ``<dir>/judge/<name>.npy`` holding the fraction of people who found ``p1`` closer), through the
small ranking network and binary cross-entropy of LPIPS (Zhang et al., CVPR 2018). It writes

* ``latent_vgg16_bn.safetensors`` -- trunk (``net.*``) and classifier (``classifier.*``);
* ``latent_lpips.safetensors`` -- loadable as ``LatentLPIPS(latent, weights=...)``;
* ``metrics.json`` -- final classifier loss/accuracy, the running 2AFC score of the last training batches
  (``2afc_train``, with the heads' dropout on) and, with ``--bapps_val_dir``, the held-out 2AFC score
  (``2afc``, dropout off).

Stage 1 is the long one (90 ImageNet epochs), so every input is checked before it starts (the VAE folder, the
image folder, and the BAPPS triplets of ``--bapps_dir`` / ``--bapps_val_dir``: each ``ref`` image with its
``p0``, ``p1`` and ``judge``), and it never has to run twice (our choices):

* ``OUTPUT_DIR/classifier_checkpoint.pt`` (classifier, SGD state, StepLR state, epochs done, the settings) is
  rewritten after every epoch; ``--resume`` continues from it exactly (each epoch draws its shuffle, crops,
  posterior samples and dropout from generators seeded by ``(--seed, epoch)``, so a resumed run computes the
  epochs an uninterrupted one computes), and refuses one written with other settings. A resume may raise
  ``--classifier_epochs``. A fresh run into a folder holding a checkpoint is refused.
* ``--trunk OUTPUT_DIR/latent_vgg16_bn.safetensors`` skips stage 1 and calibrates the heads on that trunk
  (``--train_dir`` is then not needed). Stage 2 is seeded by ``--seed`` alone, so it gives the same metric
  whether stage 1 ran just before, was resumed, or was loaded.

Example (a 32-channel VAE the reference never released)::

    python examples/train_latent_lpips.py --pretrained_vae path/to/vae \\
        --train_dir imagenet/train --bapps_dir bapps/2afc/train --output_dir out \\
        --resolution 256 --classifier_epochs 90 --calibration_epochs 5
    # after a crash in stage 1: the same command with --resume; to redo stage 2 only (another BAPPS folder):
    python examples/train_latent_lpips.py --pretrained_vae path/to/vae --trunk out/latent_vgg16_bn.safetensors \
        --bapps_dir bapps/2afc/train --bapps_val_dir bapps/2afc/val --output_dir out-heads --resolution 256

Every option has a CPU-sized default for the smoke test; real runs want a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from diffdistill.losses.lpips import LatentLPIPS, LatentVGG16BN

logger = logging.getLogger("train_latent_lpips")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TRUNK_NAME = "latent_vgg16_bn.safetensors"
CHECKPOINT_NAME = "classifier_checkpoint.pt"
RESUME_SETTINGS = (
    "classifier_width",
    "resolution",
    "batch_size",
    "lr",
    "lr_step_epochs",
    "weight_decay",
    "seed",
    "mixed_precision",
)
"""Options a stage-1 checkpoint must have been written with for ``--resume`` to continue it (they change what an
epoch computes); ``--classifier_epochs`` / ``--classifier_max_steps`` may change (train longer)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_vae", required=True, help="diffusers AutoencoderKL folder (local)")
    g.add_argument("--scaling_factor", type=float, default=None, help="default: vae.config.scaling_factor")
    g.add_argument("--shift_factor", type=float, default=None, help="default: vae.config.shift_factor or 0")
    g.add_argument("--classifier_width", type=int, default=4096, help="hidden width of the VGG classifier")
    g = p.add_argument_group("data")
    g.add_argument(
        "--train_dir", default=None, help="image folder root/<class>/<image> for stage 1 (not with --trunk)"
    )
    g.add_argument("--bapps_dir", required=True, help="BAPPS 2AFC folder(s): searched for ref/p0/p1/judge")
    g.add_argument(
        "--bapps_val_dir",
        default=None,
        help="held-out BAPPS 2AFC folder(s) (e.g. bapps/2afc/val): the reported 2AFC score is measured there; "
        "without it, only the training batches' running score (2afc_train) is reported",
    )
    g.add_argument("--resolution", type=int, default=256)
    g.add_argument("--num_workers", type=int, default=0)
    g = p.add_argument_group("stage 1: classifier")
    g.add_argument(
        "--trunk",
        default=None,
        help=f"skip stage 1: the {TRUNK_NAME} a previous run wrote (its net.* trunk is calibrated)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help=f"continue stage 1 from OUTPUT_DIR/{CHECKPOINT_NAME} (written after every epoch)",
    )
    g.add_argument("--classifier_epochs", type=int, default=1)
    g.add_argument("--classifier_max_steps", type=int, default=None)
    g.add_argument("--batch_size", type=int, default=32)
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--lr_step_epochs", type=int, default=30)
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g = p.add_argument_group("stage 2: head calibration")
    g.add_argument("--calibration_epochs", type=int, default=1)
    g.add_argument("--calibration_max_steps", type=int, default=None)
    g.add_argument("--calibration_batch_size", type=int, default=50)
    g.add_argument("--calibration_lr", type=float, default=1e-4)
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--mixed_precision", choices=["no", "bf16"], default="no")
    g.add_argument("--log_every", type=int, default=50)
    return check_args(p.parse_args(argv))


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Refuse values and paths stage 1 or 2 would fail on later (raises ``ValueError`` with the fix); the data
    folders' contents are checked in :func:`main` before any training."""
    for name in ("resolution", "batch_size", "calibration_batch_size", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"Expected --{name} >= 1, but got {getattr(args, name)}.")
    for name in ("classifier_epochs", "calibration_epochs", "lr_step_epochs", "classifier_max_steps",
                 "calibration_max_steps"):  # fmt: skip
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"Expected --{name} >= 1, but got {getattr(args, name)}.")
    if args.num_workers < 0:
        raise ValueError(f"Expected --num_workers >= 0, but got {args.num_workers}.")
    if not (Path(args.pretrained_vae) / "config.json").is_file():
        raise ValueError(
            f"Expected --pretrained_vae {args.pretrained_vae} to be a local diffusers AutoencoderKL folder (with "
            "config.json), but it is not: pass e.g. path/to/sdxl/vae."
        )
    if args.trunk is not None:
        if args.resume or args.train_dir is not None:
            raise ValueError(
                "--trunk skips stage 1: drop --resume and --train_dir (they are stage 1's), or drop --trunk."
            )
        if not Path(args.trunk).is_file():
            raise ValueError(
                f"Expected --trunk {args.trunk} to be the {TRUNK_NAME} file stage 1 wrote, but it is not a file."
            )
    elif args.train_dir is None:
        raise ValueError(
            f"--train_dir is needed for stage 1 (image folder root/<class>/<image>), or pass --trunk {TRUNK_NAME} "
            "of a previous run to skip it."
        )
    elif not Path(args.train_dir).is_dir():
        raise ValueError(
            f"Expected --train_dir {args.train_dir} to be a folder root/<class>/<image>, but it is not."
        )
    for name in ("bapps_dir", "bapps_val_dir"):
        value = getattr(args, name)
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"Expected --{name} {value} to be a BAPPS 2AFC folder, but it is not a folder.")
    if Path(args.output_dir).is_file():
        raise ValueError(f"Expected --output_dir {args.output_dir} to be a folder, but it is a file.")
    checkpoint = Path(args.output_dir) / CHECKPOINT_NAME
    if args.resume and not checkpoint.is_file():
        raise ValueError(f"--resume continues stage 1 from {checkpoint}, but there is none: drop --resume.")
    if not args.resume and args.trunk is None and checkpoint.is_file():
        raise ValueError(
            f"--output_dir {args.output_dir} holds a stage-1 checkpoint ({CHECKPOINT_NAME}): pass --resume to "
            "continue it, or choose another --output_dir."
        )
    return args


# ----------------------------------------------------------------------------------------------
# Data


def _load_image(path: Path, resolution: int, *, train: bool) -> torch.Tensor:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left = random.randint(0, w - resolution) if train else (w - resolution) // 2
    top = random.randint(0, h - resolution) if train else (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    if train and random.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return x / 127.5 - 1.0  # [-1, 1], the VAE's input range


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` -> (image in [-1, 1], class index); classes sorted by name."""

    def __init__(self, root: str | Path, resolution: int) -> None:
        root = Path(root)
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.items = [
            (f, i)
            for i, c in enumerate(self.classes)
            for f in sorted((root / c).iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.items:
            raise ValueError(f"No images found under {root}/<class>/ (suffixes {IMAGE_SUFFIXES}).")
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return _load_image(path, self.resolution, train=True), label


class TwoAFCDataset(Dataset):
    """BAPPS 2AFC triplets: (ref, p0, p1, judge) with judge = P(p1 judged closer to ref)."""

    def __init__(self, roots: str | Path, resolution: int) -> None:
        dirs = [
            d
            for d in [Path(roots), *Path(roots).rglob("*")]
            if (d / "ref").is_dir() and (d / "judge").is_dir()
        ]
        self.items = []
        for d in sorted(dirs):
            for ref in sorted((d / "ref").iterdir()):
                if ref.suffix.lower() in IMAGE_SUFFIXES:
                    self.items.append(
                        (ref, d / "p0" / ref.name, d / "p1" / ref.name, d / "judge" / f"{ref.stem}.npy")
                    )
        if not self.items:
            raise ValueError(f"No BAPPS triplets (ref/, p0/, p1/, judge/) found under {roots}.")
        broken = [item for item in self.items if not all(f.is_file() for f in item[1:])]
        if broken:
            raise ValueError(
                f"Expected every BAPPS ref image under {roots} to have its p0/, p1/ image and judge/ .npy, but "
                f"{len(broken)} of {len(self.items)} lack one (first: {broken[0][0]}). Re-extract the download."
            )
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ref, p0, p1, judge = self.items[i]
        load = [_load_image(p, self.resolution, train=False) for p in (ref, p0, p1)]
        j = torch.as_tensor(np.load(judge), dtype=torch.float32).reshape(())
        return load[0], load[1], load[2], j


# ----------------------------------------------------------------------------------------------
# Models


class LatentVGGClassifier(nn.Module):
    """The latent trunk followed by VGG's pooled three-layer classifier."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 4096) -> None:
        super().__init__()
        self.net = LatentVGG16BN(in_channels)
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, width),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(width, width),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(width, num_classes),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.net(z)[-1]).flatten(1))


class RankingHead(nn.Module):
    """LPIPS' 2AFC judge: a small MLP on (d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps))."""

    def __init__(self, hidden: int = 32, eps: float = 0.1) -> None:
        super().__init__()
        self.eps = eps
        self.mlp = nn.Sequential(
            nn.Linear(5, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, d0: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
        feats = torch.stack([d0, d1, d0 - d1, d0 / (d1 + self.eps), d1 / (d0 + self.eps)], dim=-1)
        return self.mlp(feats).squeeze(-1)  # logit of P(p1 closer)


def load_vae(path: str, device: torch.device):  # type: ignore[no-untyped-def]
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path).to(device).eval().requires_grad_(False)
    return vae


@torch.no_grad()
def encode(vae, images: torch.Tensor, scale: float, shift: float, *, sample: bool = True) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Scaled latents: a posterior sample for training, its mean (``sample=False``) for evaluation."""
    dist = vae.encode(images).latent_dist
    return ((dist.sample() if sample else dist.mode()) - shift) * scale


# ----------------------------------------------------------------------------------------------
# Stages


def seed_epoch(seed: int, epoch: int, loader_generator: torch.Generator) -> None:
    """Seed everything random in one stage-1 epoch from ``(seed, epoch)`` (our choice, for exact resume): the
    shuffle and the workers' seeds (``loader_generator``), the crops and flips (``random``), the posterior samples
    and dropout (torch's global generators)."""
    value = seed * 1_000_003 + epoch + 1
    loader_generator.manual_seed(value)
    random.seed(value)
    torch.manual_seed(value)


def stage1_settings(args: argparse.Namespace, classes: list[str], scale: float, shift: float) -> dict:
    """What a stage-1 checkpoint must agree with to be resumed (:data:`RESUME_SETTINGS`, the classes, the latents)."""
    return {
        **{name: getattr(args, name) for name in RESUME_SETTINGS},
        "classes": classes,
        "scaling_factor": scale,
        "shift_factor": shift,
    }


def save_checkpoint(path: Path, state: dict) -> None:
    """Write the stage-1 checkpoint atomically (a temporary name, then a rename), so a crash keeps the last one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_classifier(
    args: argparse.Namespace,
    vae,  # type: ignore[no-untyped-def]
    scale: float,
    shift: float,
    device: torch.device,
    data: ImageFolderDataset | None = None,
) -> tuple[LatentVGGClassifier, dict]:
    data = data if data is not None else ImageFolderDataset(args.train_dir, args.resolution)
    loader_generator = torch.Generator()
    loader = DataLoader(
        data,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.num_workers,
        drop_last=False,
        generator=loader_generator,
    )
    c = vae.config.latent_channels
    model = LatentVGGClassifier(c, len(data.classes), args.classifier_width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.lr_step_epochs, gamma=0.1)
    amp = args.mixed_precision == "bf16"
    settings = stage1_settings(args, data.classes, scale, shift)
    checkpoint = Path(args.output_dir) / CHECKPOINT_NAME
    first_epoch, step, loss_v, acc = 0, 0, float("nan"), float("nan")
    if args.resume:
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        changed = {
            k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v
        }
        if changed:
            raise ValueError(
                f"Expected --resume to continue {checkpoint} with its settings, but these differ (checkpoint, now): "
                f"{changed}. Pass the checkpoint's values, or choose another --output_dir to start afresh."
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        first_epoch, step, loss_v, acc = state["epoch"], state["step"], state["loss"], state["acc"]
        logger.info("resumed stage 1 from %s after epoch %d (step %d)", checkpoint, first_epoch, step)
    done = args.classifier_max_steps is not None and step >= args.classifier_max_steps
    model.train()
    for epoch in range(first_epoch, args.classifier_epochs):
        if done:
            break
        seed_epoch(args.seed, epoch, loader_generator)
        for images, labels in loader:
            z = encode(vae, images.to(device), scale, shift)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(z)
            loss = F.cross_entropy(logits.float(), labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_v = float(loss.detach())
            acc = float((logits.argmax(-1) == labels.to(device)).float().mean())
            if step % args.log_every == 0 or step == 1:
                logger.info("classifier epoch %d step %d loss %.4f acc %.3f", epoch, step, loss_v, acc)
            done = args.classifier_max_steps is not None and step >= args.classifier_max_steps
            if done:
                break
        sched.step()
        # --classifier_max_steps ends stage 1 mid-epoch; a resume then continues with the next epoch
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
        state.update(epoch=epoch + 1, step=step, loss=loss_v, acc=acc, settings=settings)
        save_checkpoint(checkpoint, state)
    return model.eval(), {"classifier_steps": step, "classifier_loss": loss_v, "classifier_acc": acc}


def load_trunk(path: str | Path, in_channels: int, scale: float, shift: float) -> LatentVGG16BN:
    """The latent VGG16-BN trunk (``net.*``) of a stage-1 file (``--trunk``), checked against this run's latents.

    Raises:
        ValueError: if the file was trained on other latent channels, scale or shift, or holds no trunk.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k[len("net.") :]: f.get_tensor(k) for k in f.keys() if k.startswith("net.")}  # noqa: SIM118
    if not state:
        raise ValueError(
            f"Expected --trunk {path} to hold the stage-1 trunk (net.* tensors), but it has none."
        )
    for key, now in (("in_channels", in_channels), ("scaling_factor", scale), ("shift_factor", shift)):
        if key in meta and not math.isclose(float(meta[key]), float(now), rel_tol=1e-6, abs_tol=1e-12):
            raise ValueError(
                f"Expected --trunk {path} to have been trained on this VAE's latents, but its {key} is {meta[key]} "
                f"and this run's is {now}. Pass the VAE (or --scaling_factor / --shift_factor) it was trained with."
            )
    trunk = LatentVGG16BN(in_channels)
    trunk.load_state_dict(state)
    return trunk.eval()


def calibrate_heads(
    args: argparse.Namespace,
    trunk: LatentVGG16BN,
    vae,  # type: ignore[no-untyped-def]
    scale: float,
    shift: float,
    device: torch.device,
    data: TwoAFCDataset | None = None,
    val_data: TwoAFCDataset | None = None,
) -> tuple[LatentLPIPS, dict]:
    data = data if data is not None else TwoAFCDataset(args.bapps_dir, args.resolution)
    loader = DataLoader(
        data, batch_size=args.calibration_batch_size, shuffle=True, num_workers=args.num_workers
    )
    c = vae.config.latent_channels
    metric = LatentLPIPS(c, weights=None, l1_weight=0.0, reduction="none").to(device)
    metric.net.load_state_dict(trunk.state_dict())
    heads = [h.model[1].weight for h in metric.heads]
    for w in heads:
        w.requires_grad_(True)
    judge_net = RankingHead().to(device)
    opt = torch.optim.Adam([*heads, *judge_net.parameters()], lr=args.calibration_lr, betas=(0.5, 0.999))
    # LPIPS trains its heads with dropout (lpips' trainer: use_dropout=True, not in eval mode); LatentLPIPS
    # keeps itself in eval mode, so the heads' dropout layers are switched on here, and off afterwards.
    dropouts = [h.model[0] for h in metric.heads]
    for layer in dropouts:
        layer.train()
    step, loss_v, scores = 0, float("nan"), []
    for epoch in range(args.calibration_epochs):
        for ref, p0, p1, judge in loader:
            zr, z0, z1 = (encode(vae, t.to(device), scale, shift) for t in (ref, p0, p1))
            d0, d1 = metric(zr, z0), metric(zr, z1)
            judge = judge.to(device)
            loss = F.binary_cross_entropy_with_logits(judge_net(d0, d1), judge)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for w in heads:
                    w.clamp_(min=0)  # LPIPS keeps the heads non-negative: d stays a distance
            step += 1
            loss_v = float(loss.detach())
            scores.append(float(two_afc_agreement(d0, d1, judge).mean()))
            if step % args.log_every == 0 or step == 1:
                logger.info(
                    "calibration epoch %d step %d loss %.4f 2afc %.3f", epoch, step, loss_v, scores[-1]
                )
            if args.calibration_max_steps is not None and step >= args.calibration_max_steps:
                break
        if args.calibration_max_steps is not None and step >= args.calibration_max_steps:
            break
    for w in heads:
        w.requires_grad_(False)
    for layer in dropouts:
        layer.eval()
    recent = scores[-max(1, len(scores) // 10) :]
    logs = {"calibration_steps": step, "calibration_loss": loss_v, "2afc_train": sum(recent) / len(recent)}
    if args.bapps_val_dir is not None:
        logs["2afc"] = two_afc_score(args, metric, vae, scale, shift, device, val_data)
    return metric, logs


def two_afc_agreement(d0: torch.Tensor, d1: torch.Tensor, judge: torch.Tensor) -> torch.Tensor:
    """Per triplet, the fraction of people the metric agrees with (ties count half): LPIPS' 2AFC score."""
    return torch.where(d0 < d1, 1 - judge, torch.where(d1 < d0, judge, torch.full_like(judge, 0.5)))


@torch.no_grad()
def two_afc_score(
    args: argparse.Namespace,
    metric: LatentLPIPS,
    vae,  # type: ignore[no-untyped-def]
    scale: float,
    shift: float,
    device: torch.device,
    data: TwoAFCDataset | None = None,
) -> float:
    """The mean 2AFC agreement of the calibrated ``metric`` on the held-out ``--bapps_val_dir`` triplets."""
    data = data if data is not None else TwoAFCDataset(args.bapps_val_dir, args.resolution)
    loader = DataLoader(data, batch_size=args.calibration_batch_size, num_workers=args.num_workers)
    total, count = 0.0, 0
    for ref, p0, p1, judge in loader:
        zr, z0, z1 = (encode(vae, t.to(device), scale, shift, sample=False) for t in (ref, p0, p1))
        agree = two_afc_agreement(metric(zr, z0), metric(zr, z1), judge.to(device))
        total, count = total + float(agree.sum()), count + agree.numel()
    return total / count


def main(args: argparse.Namespace) -> dict:
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    # every folder is read before stage 1, so a typo or an incomplete BAPPS download fails now, not after it
    train_data = ImageFolderDataset(args.train_dir, args.resolution) if args.trunk is None else None
    bapps = TwoAFCDataset(args.bapps_dir, args.resolution)
    bapps_val = TwoAFCDataset(args.bapps_val_dir, args.resolution) if args.bapps_val_dir is not None else None
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    vae = load_vae(args.pretrained_vae, device)
    scale = args.scaling_factor if args.scaling_factor is not None else float(vae.config.scaling_factor)
    shift = args.shift_factor
    if shift is None:
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    c = vae.config.latent_channels
    logger.info("VAE: %d latent channels, scale %.5f, shift %.5f", c, scale, shift)

    if args.trunk is not None:
        trunk = load_trunk(args.trunk, c, scale, shift).to(device)
        metrics: dict = {"trunk": str(args.trunk)}
    else:
        classifier, metrics = train_classifier(args, vae, scale, shift, device, train_data)
        from safetensors.torch import save_file

        save_file(
            {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()},
            str(out / TRUNK_NAME),
            metadata={"in_channels": str(c), "scaling_factor": repr(scale), "shift_factor": repr(shift)},
        )
        trunk = classifier.net
    random.seed(args.seed)  # stage 2 draws the same numbers however stage 1 ran (trained, resumed or loaded)
    torch.manual_seed(args.seed)
    metric, cal = calibrate_heads(args, trunk, vae, scale, shift, device, bapps, bapps_val)
    metric.save_pretrained(out / "latent_lpips.safetensors")
    metrics.update(cal)
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    logger.info("done: %s", metrics)
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main(parse_args())
