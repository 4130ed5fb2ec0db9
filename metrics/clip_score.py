"""CLIP score: the cosine similarity of CLIP image and text embeddings, averaged over (image, prompt) pairs.

CLIP score (Hessel et al., "CLIPScore: A Reference-free Evaluation Metric for Image Captioning", EMNLP 2021,
Sec. 3, Eq. 1: ``w * max(cos(E_I, E_T), 0)`` with ``w = 2.5``) is reported in two conventions by the
text-to-image distillation papers:

* the raw cosine, e.g. 0.332 for SDXL on COCO-10k in DMD2 (Yin et al. 2024, Table 3) or 0.347 / 0.346 in
  Diffusion2GAN (Kang et al. 2024) and GigaGAN (Kang et al. 2023): ``CLIPScore(..., scale=1.0)`` (the
  default);
* ``100 * cos`` as torchmetrics' ``CLIPScore`` reports it, e.g. 33.16 for SDXL in Hyper-SD (Ren et al. 2024,
  Table 2) or SDXS: ``CLIPScore(..., scale=100.0, clamp_mean=True)``. torchmetrics clamps the *mean*:
  ``max(mean(100 cos), 0)`` (``functional/multimodal/clip_score.py``: ``score.mean(0)`` then ``torch.max(score,
  0)``; the module's ``compute`` clamps ``score / n_samples``), where Hessel et al. clamp each pair
  (``clamp_negative=True``: ``mean(100 max(cos, 0))``). The two agree unless a pair's cosine is negative, which is
  rare for real CLIP models on generated images.

The number also depends on the backbone (ViT-B/32, ViT-L/14, ViT-g/14 ... and which pretrained weights) and on
its preprocessing; :meth:`CLIPScore.protocol` records all three so that two runs can be checked for
comparability (:func:`diffdistill.metrics.check_comparable`), and what identifies the weights beyond their name
(``weights``: a local checkpoint's SHA-256, a Hub id's resolved commit, a model object's ``state_dict`` hash), so
that other weights saved at the same path do not compare as the same backbone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._checks import check_bool, check_real
from ..errors import DTypeError, OptionError, ShapeError
from ._dist import RunningMean
from .fid import _require, check_float_images

__all__ = ["CLIPScore"]


def _check_images_prompts(images: Any, prompts: Any) -> tuple[torch.Tensor, list[str]]:
    """The checks every prompt-image metric runs: float ``(N, 3, H, W)`` in [0, 1] and ``N`` prompts."""
    x = check_float_images(images, "Permute channels-last images with images.permute(0, 3, 1, 2)")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise DTypeError(
            f"Expected `prompts` to be a list of strings (one per image), but got {type(prompts).__name__}. "
            "For one prompt and several images pass [prompt] * len(images)."
        )
    prompts = list(prompts)
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise DTypeError(f"Expected every entry of `prompts` to be a str, but got {bad[0]}.")
    if len(prompts) != x.shape[0]:
        raise ShapeError(
            f"Expected one prompt per image: `images` holds {x.shape[0]} images but `prompts` holds "
            f"{len(prompts)} strings.",
            name="images/prompts",
            expected=x.shape[0],
            actual=len(prompts),
        )
    return x, prompts


def _to_pil(images: torch.Tensor) -> list[Any]:
    """Float ``(N, 3, H, W)`` images in [0, 1] as RGB PIL images, rounded to uint8 as saving a PNG does."""
    image_mod = _require("PIL.Image", "pillow", "Image-based metrics")
    arr = (images.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1)
    return [image_mod.fromarray(a.numpy(), mode="RGB") for a in arr]


def _embedding(out: Any) -> torch.Tensor:
    """The embedding tensor of a CLIP ``get_*_features`` result (a tensor, or an output whose pooler is projected)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise DTypeError(f"Could not read an embedding from a {type(out).__name__}; expected a tensor.")


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class _OpenCLIPPreprocess:
    """An open_clip transform (PIL in, tensor out) applied to float image batches, image by image.

    Args:
        transform: open_clip's validation transform.
    """

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.transform(img) for img in _to_pil(images)])

    def __repr__(self) -> str:
        return f"uint8 PIL -> {self.transform!r}".replace("\n", " ")


class _OpenCLIPImageEncoder:
    """``model.encode_image`` on the model's device.

    Args:
        model: The open_clip model.
    """

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(_module_device(self.model)))


class _OpenCLIPTextEncoder:
    """``model.encode_text(tokenizer(prompts))`` on the model's device.

    Args:
        model: The open_clip model.
        tokenizer: Its tokenizer.
    """

    def __init__(self, model: Any, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.model, self.tokenizer = model, tokenizer

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(_module_device(self.model)))


class _TransformersPreprocess:
    """A transformers CLIP image processor applied to float image batches (as uint8 PIL images), through its PIL
    implementation (:func:`_pil_image_processor`; the processor passed in is left as it is).

    Args:
        image_processor: The ``CLIPImageProcessor``.
    """

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = _pil_image_processor(image_processor)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_processor(images=_to_pil(images), return_tensors="pt")["pixel_values"]

    def __repr__(self) -> str:
        p = self.image_processor
        keys = ("size", "crop_size", "resample", "do_center_crop", "image_mean", "image_std")
        fields = ", ".join(f"{k}={getattr(p, k)!r}" for k in keys if hasattr(p, k))
        return f"uint8 PIL -> {type(p).__name__}({fields})"


class _TransformersImageEncoder:
    """``model.get_image_features(pixel_values)`` on the model's device.

    Args:
        model: The transformers ``CLIPModel``.
    """

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return _embedding(self.model.get_image_features(pixel_values=pixels.to(_module_device(self.model))))


class _TransformersTextEncoder:
    """``model.get_text_features`` of the tokenised prompts (padded, truncated to the model's context).

    Args:
        model: The transformers ``CLIPModel``.
        tokenizer: Its tokenizer.
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        max_length = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        device = _module_device(self.model)
        return _embedding(
            self.model.get_text_features(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
            )
        )


def _load_open_clip(
    name: str, pretrained: str | None, device: torch.device | str | None, cache_dir: str | None = None
) -> tuple[torch.nn.Module, _OpenCLIPPreprocess, Callable[[list[str]], torch.Tensor]]:
    """An open_clip model (eval, frozen), its validation transform and its tokenizer.

    OpenAI's CLIP weights were trained with QuickGELU; open_clip's plain names (``ViT-L-14``) build nn.GELU and
    only warn when loaded with ``pretrained="openai"``, which silently changes every embedding. We force
    QuickGELU for the ``openai`` tag (same as naming ``ViT-L-14-quickgelu``).
    """
    open_clip = _require("open_clip", "open-clip-torch", "An open_clip backbone")
    model, _, transform = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, cache_dir=cache_dir, force_quick_gelu=pretrained == "openai"
    )
    model = model.eval().requires_grad_(False)
    if device is not None:
        model = model.to(device)
    return model, _OpenCLIPPreprocess(transform), open_clip.get_tokenizer(name)


def _load_transformers_clip(
    model_or_path: Any, processor: Any, device: torch.device | str | None
) -> tuple[Any, Any]:
    """A transformers CLIP model (eval, frozen) and its processor (image processor + tokenizer)."""
    transformers = _require("transformers", "transformers", "A transformers CLIP backbone")
    if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
        model = transformers.CLIPModel.from_pretrained(str(model_or_path))
        if processor is None:
            processor = str(model_or_path)
    elif isinstance(model_or_path, torch.nn.Module):
        model = model_or_path
        if processor is None:
            raise OptionError(
                "CLIPScore.from_transformers(model, processor=None): a model object needs its processor "
                "(a CLIPProcessor, or the id / path to load one from)."
            )
    else:
        raise DTypeError(
            f"Expected `model_or_path` to be a transformers CLIPModel or a model id / path, but got "
            f"{type(model_or_path).__name__}."
        )
    if isinstance(processor, str) or hasattr(processor, "__fspath__"):
        processor = transformers.AutoProcessor.from_pretrained(str(processor))
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise DTypeError(
            f"Expected `processor` to hold an image_processor and a tokenizer (a CLIPProcessor), but got "
            f"{type(processor).__name__}."
        )
    model = model.eval().requires_grad_(False)
    if device is not None:
        model = model.to(device)
    return model, processor


def _transformers_identity(model_or_path: Any, model: torch.nn.Module) -> dict[str, str]:
    """The weights' identity of a transformers backbone: a folder's files or a Hub id's commit
    (:func:`~diffdistill.metrics.protocol.weights_identity`), or the ``state_dict`` hash of a model object."""
    from .protocol import module_sha256, weights_identity

    if isinstance(model_or_path, torch.nn.Module):
        return {"state_dict_sha256": module_sha256(model)}
    return weights_identity(str(model_or_path))


def _pil_image_processor(image_processor: Any) -> Any:
    """The PIL implementation of a transformers image processor (the same settings), where it has one.

    transformers 4 processed images with PIL and NumPy (``CLIPImageProcessor``: ``PIL.Image.resize`` of the shorter
    side, bicubic; a centre crop at offsets ``(size - crop) // 2``; rescale and normalise). transformers >= 5 makes
    ``CLIPImageProcessor`` a torchvision re-implementation and names the PIL one ``CLIPImageProcessorPil``; 4.x's
    optional ``CLIPImageProcessorFast`` is the torchvision one there. They differ by up to 2 uint8 levels per pixel
    (torchvision's antialiased bicubic on uint8 tensors vs PIL's). CLIP scores and PickScore were published with the
    PIL path (PickScore's model card, torchmetrics' ``CLIPScore``), so we use it.
    """
    import transformers

    name = type(image_processor).__name__
    for candidate in (f"{name}Pil", name[: -len("Fast")] if name.endswith("Fast") else ""):
        cls = getattr(transformers, candidate, None) if candidate else None
        if cls is not None and cls is not type(image_processor):
            settings = {k: v for k, v in image_processor.to_dict().items() if k != "image_processor_type"}
            return cls.from_dict(settings)
    return image_processor


class PromptImageMetric(RunningMean):
    """The accumulator every prompt-image metric shares: a float64 sum of per-pair scores and their count
    (:class:`~diffdistill.metrics._dist.RunningMean`: ``compute`` / ``reset`` / ``all_reduce`` / ``count``).

    Subclasses define :meth:`scores`; ``update`` is the same for all.
    """

    metric_name = "score"
    _update_args = "images, prompts"
    weights: dict[str, str] = {}  # noqa: RUF012 -- replaced (never changed in place) by the named constructors
    """What identifies the backbone's weights beyond its name (:func:`~diffdistill.metrics.protocol.weights_identity`:
    a local checkpoint's SHA-256, a Hub id's resolved commit, a model object's ``state_dict`` hash), recorded by
    :meth:`protocol` as ``weights`` when not empty."""

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:  # pragma: no cover
        """Per-pair scores ``(N,)`` (float64) of a batch, without accumulating them.

        Args:
            images: Float ``(N, 3, H, W)`` images in ``[0, 1]``.
            prompts: ``N`` prompts.

        Returns:
            The scores.
        """
        raise NotImplementedError

    def update(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        """Score a batch of (image, prompt) pairs and add the scores to the running mean.

        Args:
            images: Float ``(N, 3, H, W)`` images in ``[0, 1]``.
            prompts: ``N`` prompts, one per image.

        Raises:
            DTypeError: ``images`` is not a float tensor or ``prompts`` not a list of str.
            ShapeError: ``images`` is not ``(N, 3, H, W)``, or ``len(prompts) != N``.
            OptionError: ``images`` lie outside ``[0, 1]`` (value checks on).
        """
        self._add(self.scores(images, prompts))

    def protocol(self) -> dict[str, Any]:
        """What a protocol record should hold about this metric.

        Returns:
            A JSON-serialisable dict (metric name, backbone, preprocessing, convention; no counts: those are
            results).
        """
        return {"metric": self.metric_name} | self._weights_entry()

    def _weights_entry(self) -> dict[str, Any]:
        return {"weights": dict(self.weights)} if self.weights else {}


class CLIPScore(PromptImageMetric):
    """Mean CLIP score of (image, prompt) pairs: ``scale * cos(E_image, E_text)`` (optionally ``max(cos, 0)``).

    Built from three callables, so that any CLIP implementation fits: ``preprocess`` maps float images
    ``(N, 3, H, W)`` in ``[0, 1]`` to the backbone's pixel input, ``image_encoder`` maps that to ``(N, E)``
    embeddings and ``text_encoder`` maps a list of ``N`` prompts to ``(N, E)`` embeddings. The named
    constructors :meth:`from_open_clip` and :meth:`from_transformers` use the backbone's own preprocessing,
    applied to the images rounded to uint8 (as when they are read back from PNG files), and record it in
    :meth:`protocol`. A non-square image is not squashed: its shorter side is resized to the model's size and the
    middle square kept -- open_clip's validation transform (``open_clip/transform.py``: torchvision ``Resize(size,
    BICUBIC)`` on the PIL image, the longer side ``int(size * long / short)``, ``CenterCrop`` at offsets
    ``round(margin / 2)``), or transformers' ``CLIPImageProcessor`` in its PIL implementation (PIL bicubic, the same
    sizes, offsets ``margin // 2``; see :func:`_pil_image_processor` for why not transformers >= 5's torchvision
    default).

    Conventions (see the module docstring): the default ``scale=1.0`` reports the raw cosine (DMD2, GigaGAN,
    Diffusion2GAN: ~0.33 for SDXL); ``scale=100.0, clamp_mean=True`` gives torchmetrics' ``CLIPScore``
    (Hyper-SD, SDXS: ~33), ``max(mean(100 cos), 0)``; ``clamp_negative=True`` clamps each pair instead, as
    Hessel et al.'s Eq. 1 (``mean(scale * max(cos, 0))``, with ``scale=2.5`` their CLIP-S).

    Args:
        image_encoder: Pixel input -> ``(N, E)`` image embeddings.
        text_encoder: ``N`` prompts -> ``(N, E)`` text embeddings.
        preprocess: Float images ``(N, 3, H, W)`` in ``[0, 1]`` -> pixel input.
        scale: Multiplier of the cosine (1 or 100 in the papers).
        clamp_negative: Whether each pair's negative cosine counts as 0 (Hessel et al.'s ``max(cos, 0)``, per
            pair: :meth:`scores` and the mean are clamped).
        clamp_mean: Whether :meth:`compute` returns ``max(mean, 0)`` (torchmetrics' ``CLIPScore``: the mean over
            every pair accumulated, on all processes after :meth:`all_reduce`, is clamped; :meth:`scores` are
            not).
        description: How the backbone is named in :meth:`protocol` (e.g. ``"open_clip ViT-B-32 openai"``).

    Raises:
        DTypeError: An encoder / preprocess is not callable, or an option has the wrong type.
        OptionError: ``scale`` is not a positive finite number.

    Example:
        >>> from diffdistill.metrics import CLIPScore
        >>> table = torch.nn.Embedding(10, 8)  # a "text encoder": one embedding per prompt length
        >>> metric = CLIPScore(
        ...     image_encoder=lambda px: px.flatten(1)[:, :8],
        ...     text_encoder=lambda prompts: table(torch.tensor([len(p) for p in prompts])),
        ...     preprocess=lambda images: images,
        ... )
        >>> metric.update(torch.rand(4, 3, 4, 4), ["a cat", "a dog", "a car", "a cup"])
        >>> -1.0 <= metric.compute() <= 1.0
        True
    """

    metric_name = "clip_score"

    def __init__(
        self,
        image_encoder: Callable[[Any], torch.Tensor],
        text_encoder: Callable[[list[str]], torch.Tensor],
        preprocess: Callable[[torch.Tensor], Any],
        *,
        scale: float = 1.0,
        clamp_negative: bool = False,
        clamp_mean: bool = False,
        description: str | None = None,
    ) -> None:
        super().__init__()
        for name, fn in (
            ("image_encoder", image_encoder),
            ("text_encoder", text_encoder),
            ("preprocess", preprocess),
        ):
            if not callable(fn):
                raise DTypeError(f"Expected `{name}` to be callable, but got {type(fn).__name__}.")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.preprocess = preprocess
        self.scale = check_real(scale, "scale", low=0.0, strict=True)
        self.clamp_negative = check_bool(clamp_negative, "clamp_negative")
        self.clamp_mean = check_bool(clamp_mean, "clamp_mean")
        if description is not None and not isinstance(description, str):
            raise DTypeError(
                f"Expected `description` to be a str or None, but got {type(description).__name__}."
            )
        self.description = description or "custom encoders"
        self.model: Any = None  # the backbone, when a named constructor built it

    @classmethod
    def from_open_clip(
        cls,
        name: str,
        pretrained: str | None,
        *,
        device: torch.device | str | None = None,
        scale: float = 1.0,
        clamp_negative: bool = False,
        clamp_mean: bool = False,
        cache_dir: str | None = None,
    ) -> CLIPScore:
        """A CLIP score with an open_clip backbone, e.g. ``("ViT-g-14", "laion2b_s12b_b42k")``.

        The weights are downloaded by open_clip on first use unless cached (``pretrained=None``: random
        weights, for tests). The preprocessing is open_clip's validation transform for that model. With
        ``pretrained="openai"`` the model uses QuickGELU, as OpenAI's CLIP was trained (open_clip's plain
        names would build GELU and only warn).

        Args:
            name: The open_clip model name (``open_clip.list_models()``).
            pretrained: The pretrained tag (``open_clip.list_pretrained()``), a local checkpoint, or None.
            device: Where the model runs (``None``: CPU).
            scale: See the class.
            clamp_negative: See the class.
            clamp_mean: See the class.
            cache_dir: open_clip's download cache.

        Returns:
            The metric.

        Raises:
            MissingDependencyError: open_clip is not installed (``pip install open-clip-torch``).
        """
        model, preprocess, tokenizer = _load_open_clip(name, pretrained, device, cache_dir)
        open_clip = _require("open_clip", "open-clip-torch", "An open_clip backbone")
        metric = cls(
            _OpenCLIPImageEncoder(model),
            _OpenCLIPTextEncoder(model, tokenizer),
            preprocess,
            scale=scale,
            clamp_negative=clamp_negative,
            clamp_mean=clamp_mean,
            description=f"open_clip {name} pretrained={pretrained} (open_clip {open_clip.__version__})",
        )
        metric.model = model
        from .protocol import weights_identity

        metric.weights = weights_identity(
            pretrained
        )  # a local checkpoint by content; a registry tag is its name
        return metric

    @classmethod
    def from_transformers(
        cls,
        model_or_path: Any,
        processor: Any = None,
        *,
        device: torch.device | str | None = None,
        scale: float = 1.0,
        clamp_negative: bool = False,
        clamp_mean: bool = False,
    ) -> CLIPScore:
        """A CLIP score with a transformers ``CLIPModel`` (e.g. ``"openai/clip-vit-large-patch14"``).

        Args:
            model_or_path: A ``CLIPModel`` or the id / folder to load one from.
            processor: Its ``CLIPProcessor`` (or the id / folder to load one from); ``None`` loads it from
                ``model_or_path`` (required when a model object is passed).
            device: Where the model runs (``None``: where it is).
            scale: See the class.
            clamp_negative: See the class.
            clamp_mean: See the class.

        Returns:
            The metric.

        Raises:
            DTypeError: ``model_or_path`` / ``processor`` have the wrong type.
            OptionError: A model object was passed without its processor.
            MissingDependencyError: transformers is not installed.
        """
        model, processor = _load_transformers_clip(model_or_path, processor, device)
        transformers = _require("transformers", "transformers", "A transformers CLIP backbone")
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        metric = cls(
            _TransformersImageEncoder(model),
            _TransformersTextEncoder(model, processor.tokenizer),
            _TransformersPreprocess(processor.image_processor),
            scale=scale,
            clamp_negative=clamp_negative,
            clamp_mean=clamp_mean,
            description=f"transformers CLIPModel {name} (transformers {transformers.__version__})",
        )
        metric.model = model
        metric.weights = _transformers_identity(model_or_path, model)
        return metric

    def cosines(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Raw cosine similarities ``(N,)`` (float64) of a batch's image and text embeddings.

        Args:
            images: Float ``(N, 3, H, W)`` images in ``[0, 1]``.
            prompts: ``N`` prompts.

        Returns:
            The cosines.

        Raises:
            DTypeError: Wrong input types (see :meth:`update`).
            ShapeError: Wrong shapes, or embeddings of different shapes.
        """
        x, prompts = _check_images_prompts(images, prompts)
        with torch.no_grad():
            img = self.image_encoder(self.preprocess(x))
            txt = self.text_encoder(prompts)
        img, txt = img.double(), txt.double().to(img.device)
        if img.shape != txt.shape or img.ndim != 2 or img.shape[0] != x.shape[0]:
            raise ShapeError(
                f"The encoders returned image embeddings {tuple(img.shape)} and text embeddings "
                f"{tuple(txt.shape)}; expected both ({x.shape[0]}, E).",
                name="image_encoder/text_encoder",
                expected=(x.shape[0], "E"),
                actual=(tuple(img.shape), tuple(txt.shape)),
            )
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (img * txt).sum(dim=-1).cpu()

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-pair CLIP scores ``(N,)`` (float64), ``scale * cos`` (or ``scale * max(cos, 0)``).

        Args:
            images: Float ``(N, 3, H, W)`` images in ``[0, 1]``.
            prompts: ``N`` prompts.

        Returns:
            The scores.

        Raises:
            DTypeError: Wrong input types (see :meth:`update`).
            ShapeError: Wrong shapes.
        """
        cos = self.cosines(images, prompts)
        if self.clamp_negative:
            cos = cos.clamp_min(0.0)
        return self.scale * cos

    def compute(self) -> float:
        """The mean score over every pair accumulated, ``max(mean, 0)`` with ``clamp_mean`` (torchmetrics').

        Returns:
            The mean, as a Python float.

        Raises:
            OptionError: Nothing was accumulated.
        """
        mean = super().compute()
        return 0.0 if self.clamp_mean and mean < 0.0 else mean  # NaN stays NaN, as torch.max gives it

    def protocol(self) -> dict[str, Any]:
        """The backbone, its preprocessing and the convention, for a protocol record.

        Returns:
            A JSON-serialisable dict.
        """
        return {
            "metric": self.metric_name,
            "backbone": self.description,
            "preprocess": repr(self.preprocess),
            "scale": self.scale,
            "clamp_negative": self.clamp_negative,
            "clamp_mean": self.clamp_mean,
        } | self._weights_entry()
