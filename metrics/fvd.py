"""Fréchet Video Distance: the Fréchet distance of I3D features of video clips (Unterthiner et al. 2018).

Unterthiner, van Steenkiste, Kurach, Marinier, Michalski, Gelly, "Towards Accurate Generative Models of Video: A
New Metric & Challenges" (arXiv:1812.01717): FVD is FID (Heusel et al. 2017) with the image network replaced by an
I3D action-recognition network trained on Kinetics-400 (Carreira & Zisserman 2017), whose pre-softmax logits of a
clip are its features. The number papers report today is StyleGAN-V's (Skorokhodov et al., CVPR 2022, "FVD_16"):
its TorchScript port of the TF-Hub I3D (``i3d_torchscript.pt``) called on uint8 clips ``(N, 3, T, H, W)`` with
``rescale=True, resize=True, return_features=True`` (the network maps uint8 to ``[-1, 1]`` and resizes to 224 px
itself), 400 features per clip, clips of 16 consecutive frames. :class:`I3DFeatures` makes that call on a local
copy of the file; :class:`FVD` takes the first ``num_frames`` (16) frames of every video, generated and reference,
and reuses :class:`~diffdistill.metrics.FID`'s float64 statistics and Fréchet distance.

Where we differ from StyleGAN-V (documented in :meth:`FVD.protocol`): the covariance is the unbiased ``1 / (n - 1)``
estimate (StyleGAN-V's ``FeatureStats`` divides by ``n``; the FVD differs by a factor ``(n - 1) / n`` on the
covariance terms, 5e-4 relative at 2048 clips), and the clip is the first ``num_frames`` frames of each video
(StyleGAN-V draws real clips at a random offset in each video; generated clips start at frame 0 there too). The
network resizes every frame to 224 x 224 itself, so non-square videos (Wan's 480 x 832) are squashed, as they would
be in StyleGAN-V's call on its square data sets: such FVDs compare with FVDs of videos of the same size only.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._checks import check_int
from ..errors import DTypeError, ShapeError
from .fid import FID, FeatureStatistics, _describe_extractor
from .frame_consistency import check_float_videos
from .protocol import file_sha256

__all__ = ["FVD", "I3DFeatures"]

#: StyleGAN-V's TorchScript I3D, the file :class:`I3DFeatures` loads (it is not downloaded here).
I3D_FILE = "i3d_torchscript.pt"
I3D_SOURCE = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt (StyleGAN-V's src/metrics/frechet_video_distance.py)"


def videos_to_uint8_clips(videos: Any) -> torch.Tensor:
    """Float videos ``(N, T, 3, H, W)`` in ``[0, 1]`` as the uint8 clips ``(N, 3, T, H, W)`` the I3D takes, rounded
    half up as StyleGAN-V quantises its generated videos (``(x * 127.5 + 128).clamp(0, 255)`` of ``[-1, 1]``
    frames, i.e. ``floor(255 x + 0.5)`` of ``[0, 1]`` ones); frames read back from PNG files are exact.

    Args:
        videos: float ``(N, T, 3, H, W)`` in ``[0, 1]``.

    Returns:
        uint8 ``(N, 3, T, H, W)``.

    Raises:
        DTypeError: ``videos`` is not a floating-point tensor.
        ShapeError: ``videos`` is not ``(N, T, 3, H, W)``.
        OptionError: ``videos`` lie outside ``[0, 1]`` (value checks on).

    Example:
        >>> from diffdistill.metrics.fvd import videos_to_uint8_clips
        >>> clip = videos_to_uint8_clips(torch.full((1, 2, 3, 4, 4), 0.5))
        >>> tuple(clip.shape), clip.dtype, int(clip[0, 0, 0, 0, 0])  # 127.5 rounds half up
        ((1, 3, 2, 4, 4), torch.uint8, 128)
    """
    x = check_float_videos(videos, min_frames=1)
    return (x.float() * 255 + 0.5).floor().clamp(0, 255).to(torch.uint8).permute(0, 2, 1, 3, 4).contiguous()


class I3DFeatures(nn.Module):
    """FVD's video features: StyleGAN-V's TorchScript I3D (Kinetics-400), loaded from a local file.

    ``forward`` quantises float videos ``(N, T, 3, H, W)`` in ``[0, 1]`` to uint8 clips ``(N, 3, T, H, W)``
    (:func:`videos_to_uint8_clips`) and calls the network as StyleGAN-V's FVD does: ``rescale=True, resize=True,
    return_features=True`` (uint8 to ``[-1, 1]`` and the resize to 224 px happen inside the network), returning
    its 400 pre-softmax features per clip. The file is read on first use (or :meth:`load`), not at construction,
    and is never downloaded: get ``i3d_torchscript.pt`` from StyleGAN-V (:data:`I3D_SOURCE`).

    Args:
        path: The TorchScript file (``i3d_torchscript.pt``).

    Raises:
        FileNotFoundError: ``path`` is not a file (with where to get it).

    Example:
        >>> from diffdistill.metrics import I3DFeatures
        >>> try:
        ...     I3DFeatures("missing/i3d_torchscript.pt")
        ... except FileNotFoundError as err:
        ...     print(str(err).split(". ")[0])
        Expected the TorchScript I3D of FVD at missing/i3d_torchscript.pt, but there is no such file
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"Expected the TorchScript I3D of FVD at {self.path}, but there is no such file. Download "
                f"{I3D_FILE} from {I3D_SOURCE} and pass its path."
            )
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        self.net: Any = None

    @property
    def loaded(self) -> bool:
        """Whether the network has been read from the file."""
        return self.net is not None

    def load(self) -> Any:
        """Read the TorchScript network onto this module's device (once).

        Returns:
            The network (a ``torch.jit.ScriptModule``), frozen, in eval mode.
        """
        if self.net is None:
            device = self.get_buffer("_device_anchor").device
            with (
                warnings.catch_warnings()
            ):  # the published network is TorchScript: torch.jit.load is how it loads
                warnings.filterwarnings(
                    "ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning
                )
                self.net = torch.jit.load(str(self.path), map_location=device).eval()
            for p in self.net.parameters():
                p.requires_grad_(False)
        return self.net

    def sha256(self) -> str:
        """The SHA-256 of the TorchScript file (recorded by :meth:`FVD.protocol`: another network under the same
        name must not compare as the same protocol).

        Returns:
            The hex digest.
        """
        return file_sha256(self.path)

    def train(self, mode: bool = True) -> I3DFeatures:
        """Frozen: stays in eval mode whatever ``mode`` is (DESIGN.md convention 6).

        Args:
            mode: Ignored.

        Returns:
            ``self``.
        """
        return super().train(False)

    def forward(self, videos: Any) -> torch.Tensor:
        """The I3D features of a batch of videos.

        Args:
            videos: float ``(N, T, 3, H, W)`` in ``[0, 1]`` (every frame is used: :class:`FVD` cuts the clips).

        Returns:
            float32 ``(N, D)`` features (400 for StyleGAN-V's I3D), on this module's device.

        Raises:
            DTypeError: ``videos`` is not a floating-point tensor, or the network returned no floating tensor.
            ShapeError: ``videos`` is not ``(N, T, 3, H, W)``, or the network returned other than ``(N, D)``.
            OptionError: ``videos`` lie outside ``[0, 1]`` (value checks on).
        """
        clips = videos_to_uint8_clips(videos).to(self.get_buffer("_device_anchor").device)
        with torch.no_grad():
            out = self.load()(clips, rescale=True, resize=True, return_features=True)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise DTypeError(
                f"Expected the I3D in {self.path} to return floating features (N, D), but got "
                f"{getattr(out, 'dtype', type(out).__name__)}. Pass StyleGAN-V's {I3D_FILE}."
            )
        if out.ndim < 2 or out.shape[0] != clips.shape[0]:
            raise ShapeError(
                f"Expected the I3D in {self.path} to return features (N, D) for {clips.shape[0]} clips, but got shape "
                f"{tuple(out.shape)}. Pass StyleGAN-V's {I3D_FILE}.",
                name="features",
                expected=f"({clips.shape[0]}, D)",
                actual=tuple(out.shape),
            )
        return out.float().flatten(1)


class FVD(FID):
    """Fréchet Video Distance accumulated over batches of videos (update / all_reduce / compute / reset).

    :class:`~diffdistill.metrics.FID` on clips: every video passed to :meth:`update` (generated, or the reference
    with ``real=True``) is cut to its first ``num_frames`` frames and mapped to features by ``feature_extractor``
    (:class:`I3DFeatures` for the published number); the statistics, the all-reduce over processes and the Fréchet
    distance are FID's. See the module docstring for the protocol and where it differs from StyleGAN-V's.

    Args:
        feature_extractor: A callable mapping videos ``(N, num_frames, 3, H, W)`` to ``(N, D)`` features, e.g.
            ``I3DFeatures("i3d_torchscript.pt")``; tests pass a small stand-in.
        num_frames: Frames per clip (StyleGAN-V's FVD_16: 16).
        reference: Reference statistics, an ``.npz`` path, or ``None`` to accumulate them with ``update(videos,
            real=True)``.

    Raises:
        DTypeError: ``feature_extractor`` is not callable, ``num_frames`` not an integer, ``reference`` of a wrong
            type.
        OptionError: ``num_frames`` < 1.
        FileNotFoundError: ``reference`` is a path that does not exist.

    Example:
        >>> from diffdistill.metrics import FVD
        >>> extractor = lambda v: v.mean(dim=(1, 3, 4))  # (N, T, 3, H, W) -> (N, 3), a stand-in
        >>> fvd = FVD(extractor, num_frames=4)
        >>> videos = torch.rand(16, 6, 3, 8, 8)
        >>> fvd.update(videos, real=True)
        >>> fvd.update(videos)
        >>> abs(fvd.compute()) < 1e-6  # a set against itself
        True
    """

    def __init__(
        self,
        feature_extractor: Callable[[Any], torch.Tensor],
        num_frames: int = 16,
        reference: FeatureStatistics | str | os.PathLike[str] | None = None,
    ) -> None:
        if feature_extractor is None:
            raise DTypeError(
                "Expected `feature_extractor` to be callable (videos -> (N, D) features), e.g. "
                f"I3DFeatures('{I3D_FILE}'), but got None (FVD has no default network: the I3D is not downloaded)."
            )
        super().__init__(feature_extractor, reference)
        self.num_frames = check_int(num_frames, "num_frames", minimum=1)

    def update(self, videos: Any, real: bool = False) -> None:
        """Fold the features of a batch of videos' first ``num_frames`` frames into the generated (or reference)
        statistics.

        Args:
            videos: float ``(N, T, 3, H, W)`` in ``[0, 1]`` with ``T >= num_frames``.
            real: ``True`` for reference videos (only when no ``reference`` was given).

        Raises:
            DTypeError: ``videos`` is not a floating tensor, ``real`` not a bool, or the extractor returned no
                floating tensor.
            ShapeError: ``videos`` is not ``(N, T, 3, H, W)``, is shorter than ``num_frames``, or the extractor
                returned other than ``(N, D)``.
            OptionError: ``videos`` lie outside ``[0, 1]``; ``real=True`` with fixed ``reference`` statistics.
        """
        x = check_float_videos(
            videos,
            min_frames=self.num_frames,
            why=f"FVD scores clips of the first num_frames={self.num_frames} frames",
            instead="Generate longer videos, leave the short ones out, or lower num_frames (recorded in the protocol).",
        )
        super().update(x[:, : self.num_frames], real=real)

    def protocol(self) -> dict[str, Any]:
        """What a protocol record should hold about this metric: FID's entries with ``metric`` ``"fvd"``, the clip
        (``num_frames``, ``"first frames"``), the covariance estimate, and the extractor (for :class:`I3DFeatures`
        the file name, its SHA-256 and the StyleGAN-V call).

        Returns:
            The record's dict.

        Raises:
            ShapeError: The given reference statistics hold fewer than 2 feature vectors.
        """
        out = super().protocol()
        out["metric"] = "fvd"
        out["num_frames"] = self.num_frames
        out["clip"] = "the first num_frames frames of every video (generated and reference)"
        out["covariance"] = "unbiased 1/(n-1) (StyleGAN-V: 1/n)"
        extractor = self.feature_extractor
        if isinstance(extractor, I3DFeatures):
            out["feature_extractor"] = (
                f"TorchScript I3D {extractor.path.name} on uint8 (N, 3, T, H, W) clips (rounded half up), "
                "rescale=True, resize=True, return_features=True (StyleGAN-V's FVD call)"
            )
            out["feature_extractor_sha256"] = extractor.sha256()
        else:
            out["feature_extractor"] = _describe_extractor(extractor)
        return out
