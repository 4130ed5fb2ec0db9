"""Human-preference scores of (image, prompt) pairs: ImageReward, HPSv2.1, PickScore and the LAION aesthetic score.

These are the four preference numbers the few-step SDXL papers report beside CLIP score (Hyper-SD, Ren et al.
2024, Table 2: aesthetic, ImageReward, PickScore; MLCM, Xie et al. 2024: CLIP, aesthetic, ImageReward; HPSv2
in SDXL-Lightning / DMD2 user studies). Each class accumulates a mean with the same ``update(images, prompts)``
/ ``compute()`` / ``all_reduce()`` / ``reset()`` / ``protocol()`` interface as :class:`CLIPScore`; images are
float ``(N, 3, H, W)`` in ``[0, 1]`` and are scored as the uint8 images a PNG file would hold.

* :class:`ImageRewardScore` -- ImageReward (Xu et al., NeurIPS 2023): a BLIP-based reward model, called
  through the ``image-reward`` package's public API (``ImageReward.load(name, device, download_root)`` and
  ``.score(prompt, image)``), which returns the reward already standardised by the package (``(r - 0.1672) /
  1.0333``). We pass PIL images, as DMD2's ``compute_image_reward`` does; the package's first releases read
  ``score``'s image from a file path only, later ones take a PIL image or a path.
* :class:`HPSv21Score` -- Human Preference Score v2.1 (Wu et al., "Human Preference Score v2", 2023): an
  OpenCLIP ViT-H/14 fine-tuned on HPDv2; the score is the cosine of its L2-normalised image and text features
  (the diagonal of ``image_features @ text_features.T`` in the ``hpsv2`` package's ``img_score.score``). Its
  images are not centre-cropped: HPSv2's own open_clip fork pads them to a square (:class:`HPSPreprocess`).

How each scorer brings a (possibly non-square) image to its backbone, as its original package does:

* ImageReward: the package's own ``_transform(224)`` (``ImageReward/ImageReward.py``): torchvision ``Resize(224,
  BICUBIC)`` of the shorter side on the PIL image, ``CenterCrop(224)``, ``ToTensor``, OpenAI CLIP normalisation;
  we hand the package the whole uint8 PIL image and it applies that transform itself.
* HPSv2.1: ``hpsv2/img_score.py`` builds its model with ``light_augmentation=True``, which makes its open_clip
  fork's validation transform ``image_transform(..., resize_longest_max=True)`` (``hpsv2/src/open_clip/factory.py``
  and ``transform.py``): ``ToTensor``, ``ResizeMaxSize(224)`` -- the longer side to 224, bicubic, on the float
  tensor -- zero padding (black) to 224 x 224, then normalisation; :class:`HPSPreprocess`.
* PickScore: its model card's ``AutoProcessor`` of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (transformers'
  ``CLIPImageProcessor``: the shorter side to 224, PIL bicubic, centre crop with floor offsets, rescale,
  normalise). transformers >= 5 defaults to a torchvision re-implementation of it; we load the PIL one (what the
  model card's transformers 4 ran; the two differ by up to 2 uint8 levels per pixel).
* Aesthetic: ``clip.load("ViT-L/14")``'s preprocess (``improved-aesthetic-predictor/simple_inference.py``, OpenAI
  ``clip/clip.py`` ``_transform``): ``Resize(224, BICUBIC)`` of the shorter side on the PIL image, ``CenterCrop(224)``,
  ``ToTensor``, normalisation -- open_clip's validation transform for ``ViT-L-14`` / ``openai`` is the same.
* :class:`PickScore` -- PickScore (Kirstain et al., "Pick-a-Pic", NeurIPS 2023, Sec. 4): a CLIP-H fine-tuned
  on Pick-a-Pic; the score is ``logit_scale.exp() * cos(E_image, E_text)`` (the model card's ``calc_probs``
  before the softmax). ``logit_scale.exp()`` is 100 for ``yuvalkirstain/PickScore_v1``, so SDXL scores ~22;
  Hyper-SD's table prints the same number divided by 100 (0.229).
* :class:`AestheticScore` -- the LAION aesthetic predictor v2 (C. Schuhmann, ``improved-aesthetic-predictor``,
  ``sac+logos+ava1-l14-linearMSE.pth``): a 5-layer MLP (768-1024-128-64-16-1, dropout between the first
  layers, no non-linearity) on the L2-normalised CLIP ViT-L/14 image embedding; scores ~5-6 on SDXL images.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DTypeError
from .clip_score import (
    CLIPScore,
    PromptImageMetric,
    _check_images_prompts,
    _load_open_clip,
    _load_transformers_clip,
    _to_pil,
    _transformers_identity,
    _TransformersImageEncoder,
    _TransformersPreprocess,
    _TransformersTextEncoder,
)
from .fid import _require, check_float_images
from .protocol import files_sha256, weights_identity

__all__ = ["AestheticMLP", "AestheticScore", "HPSPreprocess", "HPSv21Score", "ImageRewardScore", "PickScore"]

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_REPO, HPS_V21_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageRewardScore(PromptImageMetric):
    """Mean ImageReward of (image, prompt) pairs, scored by the ``image-reward`` package (Xu et al. 2023).

    Args:
        scorer: ``scorer(prompt, pil_image) -> float`` (a one-element list is accepted too): the package's
            ``ImageReward.load(name).score``, or a stand-in in tests.
        description: How the scorer is named in :meth:`protocol`.

    Raises:
        DTypeError: ``scorer`` is not callable.

    Example:
        >>> from diffdistill.metrics import ImageRewardScore
        >>> metric = ImageRewardScore(lambda prompt, image: float(len(prompt)))
        >>> metric.update(torch.rand(2, 3, 8, 8), ["a", "abc"])
        >>> metric.compute()
        2.0
    """

    metric_name = "imagereward"

    def __init__(self, scorer: Callable[[str, Any], Any], *, description: str = "custom scorer") -> None:
        super().__init__()
        if not callable(scorer):
            raise DTypeError(
                f"Expected `scorer` to be callable (prompt, image) -> float, got {type(scorer).__name__}."
            )
        self.scorer = scorer
        self.description = description

    @classmethod
    def from_pretrained(
        cls,
        name: str = "ImageReward-v1.0",
        *,
        device: torch.device | str | None = None,
        download_root: str | None = None,
    ) -> ImageRewardScore:
        """Load ImageReward through its package (downloads the weights on first use).

        Args:
            name: The checkpoint name ``ImageReward.load`` takes.
            device: Where the model runs (``None``: the package's default, CUDA when available).
            download_root: The package's download folder (``None``: its default).

        Returns:
            The metric.

        Raises:
            MissingDependencyError: ``image-reward`` is not installed (``pip install image-reward``).
        """
        rm = _require("ImageReward", "image-reward", "ImageRewardScore.from_pretrained")
        kwargs: dict[str, Any] = {}
        if device is not None:
            kwargs["device"] = str(device)
        if download_root is not None:
            kwargs["download_root"] = download_root
        model = rm.load(name, **kwargs)
        version = getattr(rm, "__version__", "unknown")
        return cls(model.score, description=f"image-reward {version} {name}")

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-pair rewards ``(N,)`` (float64).

        Args:
            images: Float ``(N, 3, H, W)`` images in ``[0, 1]``.
            prompts: ``N`` prompts.

        Returns:
            The rewards.

        Raises:
            DTypeError: Wrong input types, or the scorer returned no number.
            ShapeError: Wrong shapes.
        """
        x, prompts = _check_images_prompts(images, prompts)
        out = []
        with torch.no_grad():
            for prompt, image in zip(prompts, _to_pil(x)):
                value = self.scorer(prompt, image)
                if isinstance(value, (list, tuple)) and len(value) == 1:
                    value = value[0]
                try:
                    out.append(float(value))
                except (TypeError, ValueError) as err:
                    raise DTypeError(
                        f"The ImageReward scorer returned {type(value).__name__}; expected a number per image."
                    ) from err
        return torch.tensor(out, dtype=torch.float64)

    def protocol(self) -> dict[str, Any]:
        """The scorer, for a protocol record.

        Returns:
            A JSON-serialisable dict.
        """
        return {"metric": self.metric_name, "backbone": self.description} | self._weights_entry()


class HPSPreprocess:
    """HPSv2's validation transform: the longer side to ``image_size`` (bicubic), zero padding to a square.

    ``hpsv2/img_score.py`` builds its model with ``create_model_and_transforms(..., light_augmentation=True)``,
    and its open_clip fork (``hpsv2/src/open_clip/factory.py``) then builds the validation transform with
    ``image_transform(image_size, is_train=False, resize_longest_max=True)`` (fill colour 0). That transform
    (``hpsv2/src/open_clip/transform.py``) is, on the PIL image the package is given:

    1. ``ToTensor()``: float32 ``uint8 / 255`` (we round the float images to uint8 first, as a PNG holds them);
    2. ``ResizeMaxSize(image_size)``: ``scale = image_size / max(H, W)``; the tensor is resized to
       ``(round(H * scale), round(W * scale))`` (Python's ``round``: halves to even) with torchvision's
       ``F.resize(..., BICUBIC)`` -- on the float tensor, so without clamping, and with antialiasing (torchvision
       >= 0.17's default for tensors; the package pins no torchvision) -- then padded with ``fill=0`` by
       ``[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]`` (left, top, right, bottom: centred,
       the odd pixel on the right / bottom);
    3. ``Normalize`` with OpenAI CLIP's mean / std -- after the padding, so the border is ``-mean / std``, black.

    The fork skips step 2 when the longer side already equals ``image_size`` (a non-square image then reaches the
    ViT at the wrong size and fails); we still pad it. The package scores under ``torch.cuda.amp.autocast``
    (fp16 on a GPU); we run the backbone in the dtype it is given.

    Args:
        image_size: The model's input side (224 for HPS's ViT-H/14).
        mean: Per-channel normalisation mean (OpenAI CLIP's, which HPS's ``laion2B-s32B-b79K`` config uses).
        std: Per-channel normalisation std.

    Raises:
        DTypeError: ``image_size`` is not an integer, or ``mean`` / ``std`` are not three numbers.
        OptionError: ``image_size`` < 1 or a std entry is not positive.

    Example:
        >>> from diffdistill.metrics.preference import HPSPreprocess
        >>> HPSPreprocess(16)(torch.rand(2, 3, 12, 20)).shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
    ) -> None:
        from .._checks import check_int, check_real

        self.image_size = check_int(image_size, "image_size", minimum=1)
        for name, values in (("mean", mean), ("std", std)):
            if isinstance(values, str) or not isinstance(values, Sequence) or len(values) != 3:
                raise DTypeError(
                    f"Expected `{name}` to be three numbers (one per channel), but got {values!r}."
                )
        self.mean = tuple(check_real(m, "mean") for m in mean)
        self.std = tuple(check_real(v, "std", low=0.0, strict=True) for v in std)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(round(H * s), round(W * s))`` with ``s = image_size / max(H, W)`` (``ResizeMaxSize``).

        Args:
            height: Image height.
            width: Image width.

        Returns:
            The resized ``(height, width)`` before padding.
        """
        scale = self.image_size / float(max(height, width))
        return round(height * scale), round(width * scale)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Float ``(N, 3, H, W)`` images in ``[0, 1]`` -> normalised ``(N, 3, image_size, image_size)`` pixels.

        Args:
            images: The images (rounded to uint8 levels first, as the PNG files the package would read).

        Returns:
            The pixel input of HPS's ViT.

        Raises:
            DTypeError: ``images`` is not a float tensor.
            ShapeError: ``images`` is not ``(N, 3, H, W)``.
        """
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as tvf

        x = check_float_images(images, "Permute channels-last images with images.permute(0, 3, 1, 2)")
        x = (x.detach().float().clamp(0, 1) * 255.0).round() / 255.0  # PIL uint8 -> ToTensor
        height, width = x.shape[-2:]
        new_h, new_w = self.resized_size(height, width)
        if (new_h, new_w) != (height, width):
            x = tvf.resize(x, [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
        pad_h, pad_w = self.image_size - new_h, self.image_size - new_w
        x = torch.nn.functional.pad(
            x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0
        )
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def __repr__(self) -> str:
        return (
            f"HPSv2 ResizeMaxSize({self.image_size}, bicubic antialias, longer side; zero pad centred) + "
            f"Normalize(mean={self.mean}, std={self.std})"
        )


class HPSv21Score(CLIPScore):
    """Mean HPSv2.1 of (image, prompt) pairs: the cosine of HPS's OpenCLIP ViT-H/14 image and text features.

    HPSv2 (Wu et al. 2023) scores a pair by ``image_features @ text_features.T`` of its fine-tuned OpenCLIP
    model, whose features are L2-normalised: a CLIP score with ``scale=1`` (about 0.27-0.32 for SDXL-class
    models; some tables multiply by 100). The constructor takes the same three callables as
    :class:`CLIPScore`; :meth:`from_pretrained` builds them.

    Args:
        image_encoder: Pixel input -> ``(N, E)`` image embeddings.
        text_encoder: ``N`` prompts -> ``(N, E)`` text embeddings.
        preprocess: Float images -> pixel input (HPS: :class:`HPSPreprocess`, its fork's pad-to-square transform).
        description: How the model is named in :meth:`protocol`.

    Raises:
        DTypeError: An encoder / preprocess is not callable.
    """

    metric_name = "hpsv21"

    def __init__(
        self,
        image_encoder: Callable[[Any], torch.Tensor],
        text_encoder: Callable[[list[str]], torch.Tensor],
        preprocess: Callable[[torch.Tensor], Any],
        *,
        description: str | None = None,
    ) -> None:
        super().__init__(image_encoder, text_encoder, preprocess, scale=1.0, description=description)

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike[str] | None = None,
        *,
        device: torch.device | str | None = None,
        model_name: str = "ViT-H-14",
    ) -> HPSv21Score:
        """HPSv2.1: open_clip ViT-H-14 with the weights of ``HPS_v2.1_compressed.pt``.

        The checkpoint is the one the ``hpsv2`` package downloads for ``hps_version="v2.1"`` (file
        ``HPS_v2.1_compressed.pt`` of the Hub repository ``xswu/HPSv2``); its ``state_dict`` is loaded into
        open_clip's ViT-H-14 (the ``hpsv2`` package itself is not needed). ``checkpoint=None`` downloads it with
        ``huggingface_hub`` on first use. Images are brought to the model by :class:`HPSPreprocess` (HPSv2's own
        longer-side resize and zero padding), not by open_clip's resize-shorter-side + centre crop.

        Args:
            checkpoint: A local ``HPS_v2.1_compressed.pt``; ``None`` downloads it.
            device: Where the model runs (``None``: CPU).
            model_name: The open_clip architecture (ViT-H-14 for HPSv2 / v2.1; a tiny one in tests).

        Returns:
            The metric.

        Raises:
            FileNotFoundError: ``checkpoint`` does not exist.
            MissingDependencyError: open_clip (or huggingface_hub, to download) is not installed.
        """
        if checkpoint is None:
            hub = _require("huggingface_hub", "huggingface_hub", "Downloading the HPSv2.1 checkpoint")
            checkpoint = hub.hf_hub_download(HPS_REPO, HPS_V21_FILE)
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(
                f"No HPSv2.1 checkpoint at `{path}`. Download {HPS_V21_FILE} from the Hub repository {HPS_REPO} "
                "(or pass checkpoint=None to download it)."
            )
        model, _, tokenizer = _load_open_clip(model_name, None, None)
        side: Any = getattr(model.visual, "image_size", 224)
        preprocess = HPSPreprocess(int(side[0] if isinstance(side, (tuple, list)) else side))
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        if device is not None:
            model = model.to(device)
        from .clip_score import _OpenCLIPImageEncoder, _OpenCLIPTextEncoder

        metric = cls(
            _OpenCLIPImageEncoder(model),
            _OpenCLIPTextEncoder(model, tokenizer),
            preprocess,
            description=f"HPSv2.1 open_clip {model_name} + {path.name}",
        )
        metric.model = model
        metric.weights = {"weights_sha256": files_sha256(path)}  # the checkpoint by content, not by file name
        return metric


class PickScore(CLIPScore):
    """Mean PickScore of (image, prompt) pairs: ``logit_scale.exp() * cos(E_image, E_text)`` (Kirstain et al. 2023).

    Args:
        image_encoder: Pixel input -> ``(N, E)`` image embeddings.
        text_encoder: ``N`` prompts -> ``(N, E)`` text embeddings.
        preprocess: Float images -> pixel input.
        logit_scale: The model's ``logit_scale.exp()`` (100 for PickScore_v1).
        description: How the model is named in :meth:`protocol`.

    Raises:
        DTypeError: An encoder / preprocess is not callable.
        OptionError: ``logit_scale`` is not a positive finite number.
    """

    metric_name = "pickscore"

    def __init__(
        self,
        image_encoder: Callable[[Any], torch.Tensor],
        text_encoder: Callable[[list[str]], torch.Tensor],
        preprocess: Callable[[torch.Tensor], Any],
        logit_scale: float,
        *,
        description: str | None = None,
    ) -> None:
        super().__init__(image_encoder, text_encoder, preprocess, scale=logit_scale, description=description)

    @classmethod
    def from_pretrained(
        cls,
        model: Any = PICKSCORE_MODEL,
        processor: Any = PICKSCORE_PROCESSOR,
        *,
        device: torch.device | str | None = None,
    ) -> PickScore:
        """PickScore_v1 (transformers ``CLIPModel``) with the CLIP-ViT-H-14-laion2B processor, as its model card.

        The processor's image part runs in its PIL implementation (``CLIPImageProcessorPil`` under transformers >=
        5), the one the model card's transformers 4 ran: the shorter side to 224 (PIL bicubic), centre crop at
        offsets ``margin // 2``, rescale, normalise.

        Args:
            model: A ``CLIPModel`` or the id / folder of one (default ``yuvalkirstain/PickScore_v1``).
            processor: A ``CLIPProcessor`` or the id / folder of one (default
                ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
            device: Where the model runs (``None``: where it is).

        Returns:
            The metric.

        Raises:
            DTypeError: ``model`` / ``processor`` have the wrong type.
            MissingDependencyError: transformers is not installed.
        """
        clip, proc = _load_transformers_clip(model, processor, device)
        name = getattr(clip.config, "_name_or_path", "") or type(clip).__name__
        metric = cls(
            _TransformersImageEncoder(clip),
            _TransformersTextEncoder(clip, proc.tokenizer),
            _TransformersPreprocess(proc.image_processor),
            float(clip.logit_scale.exp()),
            description=f"PickScore transformers CLIPModel {name}",
        )
        metric.model = clip
        metric.weights = _transformers_identity(model, clip)
        return metric


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor v2 head: 768-1024-128-64-16-1 linear layers, dropout, no activation.

    Layer names (``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``) match the state dict of
    ``sac+logos+ava1-l14-linearMSE.pth`` so that it loads as is.

    Args:
        input_size: The CLIP embedding size (768 for ViT-L/14).

    Raises:
        DTypeError: ``input_size`` is not an integer.
        OptionError: ``input_size`` < 1.

    Example:
        >>> from diffdistill.metrics import AestheticMLP
        >>> AestheticMLP(8)(torch.randn(2, 8)).shape
        torch.Size([2, 1])
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        from .._checks import check_int

        self.input_size = check_int(input_size, "input_size", minimum=1)
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores of (already L2-normalised) embeddings.

        Args:
            embeddings: ``(N, input_size)``.

        Returns:
            ``(N, 1)`` scores.
        """
        return self.layers(embeddings)


class AestheticScore(PromptImageMetric):
    """Mean LAION aesthetic score (predictor v2) of images: ``MLP(E_image / ||E_image||)``.

    Prompts are accepted (and ignored) so that every preference metric has the same ``update``.

    Args:
        image_encoder: Pixel input -> ``(N, E)`` CLIP image embeddings (ViT-L/14 for the LAION weights).
        preprocess: Float images -> pixel input (the CLIP model's own preprocessing).
        mlp: The head (an :class:`AestheticMLP` with the LAION weights).
        description: How the model is named in :meth:`protocol`.

    Raises:
        DTypeError: ``image_encoder`` / ``preprocess`` is not callable, or ``mlp`` is not a module.

    Example:
        >>> from diffdistill.metrics import AestheticMLP, AestheticScore
        >>> metric = AestheticScore(lambda px: px.flatten(1)[:, :8], lambda images: images, AestheticMLP(8))
        >>> metric.update(torch.rand(3, 3, 4, 4), ["a", "b", "c"])
        >>> metric.count
        3
    """

    metric_name = "aesthetic"

    def __init__(
        self,
        image_encoder: Callable[[Any], torch.Tensor],
        preprocess: Callable[[torch.Tensor], Any],
        mlp: nn.Module,
        *,
        description: str = "custom encoder",
    ) -> None:
        super().__init__()
        for name, fn in (("image_encoder", image_encoder), ("preprocess", preprocess)):
            if not callable(fn):
                raise DTypeError(f"Expected `{name}` to be callable, but got {type(fn).__name__}.")
        if not isinstance(mlp, nn.Module):
            raise DTypeError(
                f"Expected `mlp` to be an nn.Module (AestheticMLP), but got {type(mlp).__name__}."
            )
        self.image_encoder, self.preprocess = image_encoder, preprocess
        self.mlp = mlp.eval().requires_grad_(False)
        self.description = description
        self.model: Any = None

    @classmethod
    def from_pretrained(
        cls,
        weights: str | os.PathLike[str] | None = None,
        *,
        clip_name: str = "ViT-L-14",
        clip_pretrained: str | None = "openai",
        device: torch.device | str | None = None,
    ) -> AestheticScore:
        """The LAION predictor: open_clip ViT-L/14 (OpenAI weights, as ``clip.load("ViT-L/14")``) + the MLP.

        Args:
            weights: The MLP weights, ``sac+logos+ava1-l14-linearMSE.pth`` from
                github.com/christophschuhmann/improved-aesthetic-predictor (a state dict; ``.safetensors`` too);
                ``None`` downloads that file once into torch's hub cache (``torch.hub.get_dir()``).
            clip_name: The open_clip architecture.
            clip_pretrained: Its pretrained tag (``None``: random weights, for tests).
            device: Where the models run (``None``: CPU).

        Returns:
            The metric.

        Raises:
            FileNotFoundError: ``weights`` does not exist.
            MissingDependencyError: open_clip is not installed.
        """
        if weights is None:
            folder = Path(torch.hub.get_dir()) / "checkpoints"
            folder.mkdir(parents=True, exist_ok=True)
            weights = folder / AESTHETIC_FILE
            if not weights.exists():
                torch.hub.download_url_to_file(AESTHETIC_URL, str(weights))
        path = Path(weights)
        if not path.exists():
            raise FileNotFoundError(
                f"No aesthetic-predictor weights at `{path}`. Download sac+logos+ava1-l14-linearMSE.pth from "
                "github.com/christophschuhmann/improved-aesthetic-predictor."
            )
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model, preprocess, _ = _load_open_clip(clip_name, clip_pretrained, device)
        mlp = AestheticMLP(int(state["layers.0.weight"].shape[1]))
        mlp.load_state_dict(state)
        if device is not None:
            mlp = mlp.to(device)
        from .clip_score import _OpenCLIPImageEncoder

        metric = cls(
            _OpenCLIPImageEncoder(model),
            preprocess,
            mlp,
            description=f"LAION aesthetic v2 {path.name} on open_clip {clip_name} pretrained={clip_pretrained}",
        )
        metric.model = model
        clip_identity = weights_identity(clip_pretrained)
        metric.weights = {"weights_sha256": files_sha256(path)} | {
            f"clip_{k}": v for k, v in clip_identity.items()
        }
        return metric

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-image aesthetic scores ``(N,)`` (float64).

        Args:
            images: Float ``(N, 3, H, W)`` images in ``[0, 1]``.
            prompts: ``N`` prompts (ignored by the score).

        Returns:
            The scores.

        Raises:
            DTypeError: Wrong input types.
            ShapeError: Wrong shapes.
        """
        x, _ = _check_images_prompts(images, prompts)
        with torch.no_grad():
            emb = self.image_encoder(self.preprocess(x)).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            param = next(self.mlp.parameters(), None)
            if param is not None:
                emb = emb.to(device=param.device, dtype=param.dtype)
            return self.mlp(emb).reshape(-1).double().cpu()

    def protocol(self) -> dict[str, Any]:
        """The model and its preprocessing, for a protocol record.

        Returns:
            A JSON-serialisable dict.
        """
        return {
            "metric": self.metric_name,
            "backbone": self.description,
            "preprocess": repr(self.preprocess),
        } | self._weights_entry()
