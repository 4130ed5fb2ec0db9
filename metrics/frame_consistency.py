"""Frame consistency of generated videos: the mean cosine similarity of CLIP image embeddings of their frames.

Esser et al., "Structure and Content-Guided Video Synthesis with Diffusion Models" (Gen-1, ICCV 2023), measure
temporal consistency by computing the CLIP image embedding of every output frame and averaging the cosine similarity
of consecutive frames; Wu et al., "Tune-A-Video" (ICCV 2023), report the same quantity under the name "frame
consistency", described there as an average over all pairs of video frames (our reading; ``pairs="all"``). For
a video of ``F`` frames with unit CLIP image embeddings ``e_1 ... e_F``::

    consecutive (Gen-1, default):  c = 1 / (F - 1) * sum_{f=1}^{F-1} <e_f, e_{f+1}>
    all pairs  (``pairs="all"``):   c = 2 / (F (F - 1)) * sum_{f<g} <e_f, e_g>

and the metric is the mean of ``c`` over the videos (every video weighs the same, whatever its frame count).
We default to consecutive pairs (our choice: it is the definition the Gen-1 paper states explicitly, it measures
frame-to-frame flicker rather than how far a video moves over its length, and it costs ``F - 1`` products instead of
``F (F - 1) / 2``). Both conventions are reported as a raw cosine here (``scale=1``); tables that print it in
percent use ``scale=100``. The backbone and preprocessing are those of a :class:`~diffdistill.metrics.CLIPScore`
(:meth:`FrameConsistency.from_clip_score`: the text-video alignment "CLIPSIM" and the consistency then share one
CLIP model), and :meth:`FrameConsistency.protocol` records them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._checks import check_float_input, check_option, check_real
from ..errors import DTypeError, ShapeError
from ._dist import RunningMean
from .fid import check_unit_range

__all__ = ["FrameConsistency"]

PAIRS = ("consecutive", "all")


def check_float_videos(
    videos: Any,
    min_frames: int = 2,
    why: str = "frame consistency compares frames",
    instead: str = "Score single images with CLIPScore instead.",
) -> torch.Tensor:
    """Float videos ``(N, F, 3, H, W)`` in ``[0, 1]`` with ``F >= min_frames`` (the range check is a value check);
    ``why`` and ``instead`` complete the frame-count error (why the frames are needed, what to do instead).

    Args:
        videos: The value the caller passed.
        min_frames: The fewest frames a video may have.
        why: Why that many frames are needed (error message).
        instead: What to do with shorter videos (error message).

    Returns:
        ``videos``, typed as a tensor.

    Raises:
        DTypeError: ``videos`` is not a floating-point tensor.
        ShapeError: ``videos`` is not ``(N, F, 3, H, W)``, or ``F < min_frames``.
        OptionError: ``videos`` lie outside ``[0, 1]`` (value checks on).
    """
    x = check_float_input(videos, "videos", ndim=5, layout="(N, F, 3, H, W)")
    if x.shape[2] != 3:
        raise ShapeError(
            f"Expected float `videos` laid out as (N, F, 3, H, W) with 3 (RGB) channels, but got shape "
            f"{tuple(x.shape)}. Diffusers' video pipelines give this layout with output_type='pt'; permute "
            "(N, 3, F, H, W) latent-style layouts with videos.permute(0, 2, 1, 3, 4).",
            name="videos",
            expected="(N, F, 3, H, W)",
            actual=tuple(x.shape),
        )
    if x.shape[1] < min_frames:
        raise ShapeError(
            f"Expected at least {min_frames} frames per video ({why}), but `videos` has shape {tuple(x.shape)} "
            f"({x.shape[1]} frame{'s' if x.shape[1] != 1 else ''}). {instead}",
            name="videos",
            expected=f"F >= {min_frames}",
            actual=tuple(x.shape),
        )
    check_unit_range(x, "videos", "video")
    return x


class FrameConsistency(RunningMean):
    """Mean over videos of the average cosine similarity of CLIP image embeddings of their frame pairs.

    See the module docstring for the formula and the two conventions (``pairs="consecutive"``, Gen-1's, the
    default; ``pairs="all"``, every pair of frames). Built from two callables, as :class:`CLIPScore` is:
    ``preprocess`` maps float frames ``(M, 3, H, W)`` in ``[0, 1]`` to the backbone's pixel input and
    ``image_encoder`` maps that to ``(M, E)`` embeddings; :meth:`from_clip_score` takes both from a CLIP score
    (its named backbones apply the model's own preprocessing to the frames rounded to uint8, as read back from PNG
    files). The accumulator is a float64 sum of per-video values and a count of videos, summed over processes by
    :meth:`all_reduce`.

    Args:
        image_encoder: Pixel input -> ``(M, E)`` image embeddings.
        preprocess: Float frames ``(M, 3, H, W)`` in ``[0, 1]`` -> pixel input.
        pairs: ``"consecutive"`` (Gen-1, default) or ``"all"`` (every pair of frames).
        scale: Multiplier of the cosine (1: raw cosine; 100 as some tables print it).
        description: How the backbone is named in :meth:`protocol`.

    Raises:
        DTypeError: ``image_encoder`` / ``preprocess`` are not callable, or ``description`` is not a str.
        OptionError: ``pairs`` is not one of the two conventions, or ``scale`` is not positive and finite.

    Example:
        >>> import torch
        >>> from diffdistill.metrics import FrameConsistency
        >>> metric = FrameConsistency(image_encoder=lambda px: px.mean(dim=(2, 3)), preprocess=lambda x: x)
        >>> still = torch.rand(1, 1, 3, 8, 8).expand(2, 4, 3, 8, 8)  # two videos of one repeated frame
        >>> metric.update(still)
        >>> round(metric.compute(), 6)
        1.0
    """

    metric_name = "frame_consistency"
    _update_args = "videos"

    def __init__(
        self,
        image_encoder: Callable[[Any], Any],
        preprocess: Callable[[torch.Tensor], Any],
        *,
        pairs: str = "consecutive",
        scale: float = 1.0,
        description: str | None = None,
    ) -> None:
        for name, fn in (("image_encoder", image_encoder), ("preprocess", preprocess)):
            if not callable(fn):
                raise DTypeError(f"Expected `{name}` to be callable, but got {type(fn).__name__}.")
        check_option(pairs, "pairs", PAIRS)
        if description is not None and not isinstance(description, str):
            raise DTypeError(
                f"Expected `description` to be a str or None, but got {type(description).__name__}."
            )
        self.image_encoder = image_encoder
        self.preprocess = preprocess
        self.pairs = pairs
        self.scale = check_real(scale, "scale", low=0.0, strict=True)
        self.description = description or "custom encoder"
        super().__init__()

    @classmethod
    def from_clip_score(
        cls, clip_score: Any, *, pairs: str = "consecutive", scale: float = 1.0
    ) -> FrameConsistency:
        """The frame consistency on the image side of a CLIP score (:class:`~diffdistill.metrics.CLIPScore`): its
        image encoder, preprocessing and backbone description.

        Args:
            clip_score: A ``CLIPScore`` (anything with ``image_encoder``, ``preprocess`` and ``description``).
            pairs: See the class.
            scale: See the class.

        Returns:
            The metric.

        Raises:
            DTypeError: ``clip_score`` lacks an image encoder or preprocessing.
        """
        encoder, preprocess = (
            getattr(clip_score, "image_encoder", None),
            getattr(clip_score, "preprocess", None),
        )
        if encoder is None or preprocess is None:
            raise DTypeError(
                f"Expected `clip_score` to be a CLIPScore (with image_encoder and preprocess), but got "
                f"{type(clip_score).__name__}."
            )
        description = getattr(clip_score, "description", None)
        return cls(encoder, preprocess, pairs=pairs, scale=scale, description=description)

    def embeddings(self, videos: torch.Tensor) -> torch.Tensor:
        """Unit CLIP image embeddings ``(N, F, E)`` (float64) of every frame of a batch of videos.

        Args:
            videos: Float ``(N, F, 3, H, W)`` videos in ``[0, 1]``, ``F >= 2``.

        Returns:
            The embeddings, each of norm 1.

        Raises:
            DTypeError: ``videos`` is not a float tensor.
            ShapeError: ``videos`` is not ``(N, F, 3, H, W)`` with ``F >= 2``, or the encoder's output is not
                ``(N * F, E)``.
            OptionError: ``videos`` lie outside ``[0, 1]`` (value checks on).
        """
        from .clip_score import _embedding

        x = check_float_videos(videos)
        n, f = x.shape[:2]
        with torch.no_grad():
            emb = _embedding(self.image_encoder(self.preprocess(x.flatten(0, 1))))
        if emb.ndim != 2 or emb.shape[0] != n * f:
            raise ShapeError(
                f"The image encoder returned embeddings {tuple(emb.shape)} for {n * f} frames; expected "
                f"({n * f}, E).",
                name="image_encoder",
                expected=(n * f, "E"),
                actual=tuple(emb.shape),
            )
        emb = emb.double()
        return (emb / emb.norm(dim=-1, keepdim=True)).reshape(n, f, -1).cpu()

    def video_scores(self, videos: torch.Tensor) -> torch.Tensor:
        """Per-video consistency ``(N,)`` (float64), ``scale`` times the mean cosine over the frame pairs.

        Args:
            videos: Float ``(N, F, 3, H, W)`` videos in ``[0, 1]``, ``F >= 2``.

        Returns:
            The scores.

        Raises:
            DTypeError: ``videos`` is not a float tensor.
            ShapeError: ``videos`` is not ``(N, F, 3, H, W)`` with ``F >= 2``.
            OptionError: ``videos`` lie outside ``[0, 1]`` (value checks on).
        """
        e = self.embeddings(videos)
        if self.pairs == "consecutive":
            cos = (e[:, 1:] * e[:, :-1]).sum(dim=-1).mean(dim=1)
        else:
            f = e.shape[1]
            gram = e @ e.transpose(1, 2)
            upper = torch.triu(torch.ones(f, f, dtype=torch.bool), diagonal=1)
            cos = gram[:, upper].mean(dim=1)
        return self.scale * cos

    def update(self, videos: torch.Tensor) -> None:
        """Score a batch of videos and add the scores to the running mean.

        Args:
            videos: Float ``(N, F, 3, H, W)`` videos in ``[0, 1]``, ``F >= 2`` (diffusers' ``output_type="pt"``
                layout).

        Raises:
            DTypeError: ``videos`` is not a float tensor.
            ShapeError: ``videos`` is not ``(N, F, 3, H, W)`` with ``F >= 2``.
            OptionError: ``videos`` lie outside ``[0, 1]`` (value checks on).
        """
        self._add(self.video_scores(videos))

    def protocol(self) -> dict[str, Any]:
        """The backbone, its preprocessing and the convention, for a protocol record.

        Returns:
            A JSON-serialisable dict.
        """
        return {
            "metric": self.metric_name,
            "backbone": self.description,
            "preprocess": repr(self.preprocess),
            "pairs": self.pairs,
            "definition": (
                "mean over videos of the mean cosine of CLIP image embeddings of "
                + ("consecutive frames (Gen-1)" if self.pairs == "consecutive" else "all pairs of frames")
            ),
            "scale": self.scale,
        }
