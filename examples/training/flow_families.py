"""What distinguishes the SD3 / FLUX / Qwen-Image / Wan families in the flow scripts: pipelines, guidance, LoRA."""

# One table per fact, read by ``training.flow_models`` (loading, the denoiser), ``training.flow_encoding`` (prompts),
# ``training.flow_options`` (option checks) and the scripts (guidance, LoRA targets, LADD heads, sampling grids):
#
# - :func:`model_family` reads a pipeline folder's ``model_index.json`` (``_class_name`` -> family; other pipelines
#   are refused with the reason), :func:`model_variant` the Wan generation within the family (Wan 2.1, Wan 2.2
#   TI2V-5B, Wan 2.2 A14B's two experts);
# - CFG or embedded guidance, packed latents, the pipelines' default guidance scale, negative prompt and video
#   length;
# - :func:`lora_targets`, :func:`guidance_rescale` (Qwen-Image's true-CFG renormalisation),
#   :func:`ladd_text_pooling`, :func:`pipeline_grid`.

from __future__ import annotations

from typing import Any

from diffdistill.students import FLOW_LORA_TARGETS as _LIBRARY_FLOW_LORA_TARGETS
from diffdistill.students import QWEN_IMAGE_LORA_TARGETS, WAN_LORA_TARGETS

FAMILIES = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "QwenImagePipeline": "qwen",
    "WanPipeline": "wan",
}
FAMILY_NAMES = {"sd3": "SD3 / SD3.5", "flux": "FLUX.1", "qwen": "Qwen-Image", "wan": "Wan"}
VARIANT_NAMES = {**FAMILY_NAMES, "wan": "Wan 2.1", "wan-ti2v": "Wan 2.2 TI2V-5B", "wan-a14b": "Wan 2.2 A14B"}
"""A model's name for messages, by variant (:func:`model_variant`; a family is its own variant but for Wan)."""
CFG_FAMILIES = ("sd3", "qwen", "wan")
"""The families guided by classifier-free guidance against an unconditional pass (FLUX.1-dev embeds its guidance
as an input instead; reference/flow.md pitfall 1)."""
PACKED_FAMILIES = ("flux", "qwen")
"""The families whose transformer takes 2x2 patches of the latents as packed tokens ``(B, h/2 * w/2, 4C)``."""
DEFAULT_GUIDANCE_SCALE = {"sd3": 7.0, "qwen": 4.0, "wan": 5.0}
"""The pipelines' default classifier-free guidance scale (``StableDiffusion3Pipeline`` 7.0, ``QwenImagePipeline``'s
``true_cfg_scale`` 4.0, ``WanPipeline`` 5.0)."""
DEFAULT_GUIDANCE_SCALE_2 = {"wan-a14b": 3.0}
"""A two-expert variant's default CFG scale of its low-noise expert (``WanPipeline``'s ``guidance_scale_2``); its
``guidance_scale`` (high noise) is :func:`default_guidance_scale`'s. Wan 2.2 T2V A14B: 3.0 and 4.0, the
``sample_guide_scale = (3.0, 4.0)`` (low, high noise) of the Wan 2.2 repository's T2V A14B config."""
UNCOND_PROMPT = {"qwen": " "}
"""The negative prompt of a family's unconditional branch when it is not the empty prompt: Qwen-Image's pipeline
enables true CFG only with a negative prompt, and diffusers' Qwen-Image docs pass ``negative_prompt=" "``."""
DEFAULT_RESOLUTION = {"wan": 480, "wan-a14b": 480, "wan-ti2v": 704}
"""A variant's default ``--resolution`` (the height; ``--width`` defaults to it) when it is not 1024: Wan 2.1 and
Wan 2.2 A14B generate 480p (480 x 832; the 14B models also 720p), and a square 1024 video of 81 frames is 2.6x the
tokens of 480 x 832; Wan 2.2 TI2V-5B generates 704 x 1280 (its 16x VAE)."""
DEFAULT_NUM_FRAMES = {"wan": 81, "wan-a14b": 81, "wan-ti2v": 121}
"""A video variant's default length in frames (``4k + 1``): ``WanPipeline``'s default 81 (5 s at 16 fps); Wan 2.2
TI2V-5B's 121 (5 s at 24 fps, its published inference setting)."""

SD35_ATTN2_TARGETS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
"""SD3.5-Medium's MMDiT-X blocks (``dual_attention_layers``, blocks 0-12) have a second image-stream attention,
``attn2``, whose names the ``attn.*`` suffixes do not match (123 M weights of SD3.5-Medium)."""

FLOW_LORA_TARGETS = (*_LIBRARY_FLOW_LORA_TARGETS, *SD35_ATTN2_TARGETS)
"""LoRA targets of the transformer: :data:`diffdistill.students.FLOW_LORA_TARGETS`, the default ``target_modules``
of diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py`` (attention q/k/v/out of both streams and both
feed-forwards; FLUX's single-stream blocks get their ``attn.to_q/k/v``), and SD3.5-Medium's second attention
(:data:`SD35_ATTN2_TARGETS`). diffusers' SD3 DreamBooth script takes the eight attention names only by default; we
add the feed-forwards for SD3 too, and ``attn2`` where the blocks have it (our choice: one list, every attention and
FF linear of both families)."""


def lora_targets(family: str) -> Any:
    """The LoRA targets of a family's transformer: :data:`FLOW_LORA_TARGETS` (SD3 / FLUX),
    :data:`diffdistill.students.QWEN_IMAGE_LORA_TARGETS` (Qwen-Image: the same attention + feed-forward set on its
    ``img_mlp`` / ``txt_mlp``) or, for Wan, :data:`diffdistill.students.WAN_LORA_TARGETS` (self- and
    cross-attention q/k/v/o of every block, as finetrainers' Wan LoRA)."""
    return {"wan": WAN_LORA_TARGETS, "qwen": QWEN_IMAGE_LORA_TARGETS}.get(family, FLOW_LORA_TARGETS)


def ladd_text_pooling(family: str) -> str | None:
    """The ``text_pooling`` of LADD heads on a family's teacher: None (the pooled text embedding, SD3 / FLUX) or
    ``"mean"`` (the mean prompt token: Qwen-Image and Wan have no pooled embedding; our choice)."""
    return None if family in ("sd3", "flux") else "mean"


def pipeline_grid(family: str) -> str:
    """The :func:`diffdistill.schedulers.flow_pipeline_grid` recipe of a family's pipeline (``QwenImagePipeline``
    builds FLUX's: ``linspace(1, 1/N, N)`` shifted by the resolution's ``mu``)."""
    return "flux" if family == "qwen" else family


def guidance_rescale(family: str) -> Any:
    """What a family's pipeline does to its guided output, for :class:`diffdistill.schedulers.TeacherSolver`'s
    ``guidance_rescale``: Qwen-Image's true-CFG renormalisation of each packed 2x2 token to the conditional norm
    (:func:`diffdistill.schedulers.rescale_guidance_norm`, ``patch_size=2``); None for the others."""
    import functools

    from diffdistill.schedulers import rescale_guidance_norm

    return functools.partial(rescale_guidance_norm, patch_size=2) if family == "qwen" else None


def default_guidance_scale(variant: str) -> float:
    """A CFG variant's default ``guidance_scale`` (:data:`DEFAULT_GUIDANCE_SCALE`; Wan 2.2 A14B's high-noise
    expert 4.0)."""
    return {"wan-a14b": 4.0}.get(variant, DEFAULT_GUIDANCE_SCALE[family_of(variant)])


def expert_guidance(parts: Any, scale: float, scale_2: float | None) -> Any:
    """The teacher's CFG scale as :class:`diffdistill.schedulers.TeacherSolver` takes it: ``scale``, or for Wan
    2.2 A14B's experts a guidance schedule of the model timestep, ``scale`` where the high-noise expert runs
    (``t >= boundary``) and ``scale_2`` below, as ``WanPipeline``'s ``guidance_scale`` / ``guidance_scale_2``."""
    if not parts.has_experts:
        return scale
    import torch

    boundary, high, low = parts.transformer.boundary_timestep, float(scale), float(scale_2)

    def by_expert(t: Any) -> Any:
        return torch.where(t >= boundary, high, low)

    return by_expert


def check_expert_scale(parts: Any, option: str, value: float | None, high: float | None) -> float | None:
    """A two-expert model's low-noise CFG option ``option`` (``value``), refused for one-transformer models. Unset,
    it is ``high`` (the high-noise expert's scale as the user gave it, as ``WanPipeline`` takes ``guidance_scale_2 =
    guidance_scale`` when only that is given) or, with neither given, the recipe's
    (:data:`DEFAULT_GUIDANCE_SCALE_2`: 3.0 beside 4.0). Raises ``ValueError``."""
    if not parts.has_experts:
        if value is not None:
            raise ValueError(
                f"{option} is the CFG scale of Wan 2.2 A14B's low-noise expert, but {parts.name} has one "
                f"transformer: drop {option}."
            )
        return None
    if value is not None and not value >= 1:
        raise ValueError(f"Expected {option} >= 1 (1: no guidance), but got {value}.")
    if value is not None:
        return value
    return DEFAULT_GUIDANCE_SCALE_2[parts.variant] if high is None else high


def family_of(variant: str) -> str:
    """The family of a variant (``"wan-ti2v"`` -> ``"wan"``; a family is its own variant)."""
    return variant.split("-")[0]


def default_num_frames(variant: str) -> int:
    """A video variant's default ``--num_frames`` (:data:`DEFAULT_NUM_FRAMES`; 81 for any other Wan)."""
    return DEFAULT_NUM_FRAMES.get(variant, DEFAULT_NUM_FRAMES["wan"])


def model_family(path: str, revision: str | None = None) -> str:
    """``"sd3"``, ``"flux"``, ``"qwen"`` or ``"wan"`` from the ``_class_name`` of ``model_index.json`` (folder or hub);
    other pipelines are refused with the reason. :func:`model_variant` tells the Wan generations apart."""
    return family_of(model_variant(path, revision))


def model_variant(path: str, revision: str | None = None) -> str:
    """The family (:func:`model_family`) or, for ``WanPipeline`` folders, the variant: ``"wan"`` (Wan 2.1 T2V 1.3B /
    14B, one transformer), ``"wan-ti2v"`` (Wan 2.2 TI2V-5B, ``expand_timesteps``; its text-to-video mode, where the
    pipeline's per-token timesteps all equal the step's) or ``"wan-a14b"`` (Wan 2.2 A14B: the high-noise expert
    ``transformer`` and the low-noise ``transformer_2``, switched at ``boundary_ratio``)."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(path, revision=revision)
    name = index.get("_class_name")
    if name not in FAMILIES:
        raise ValueError(
            f"Expected --pretrained_model_name_or_path {path} to be a StableDiffusion3Pipeline (SD3 / SD3.5), "
            f"FluxPipeline (FLUX.1), QwenImagePipeline (Qwen-Image) or WanPipeline (Wan 2.1 text-to-video) folder, "
            f"but its model_index.json names "
            f"{name!r}. The SDXL scripts (examples/sdxl_*.py) take SDXL pipelines."
        )
    family = FAMILIES[name]
    if family != "wan":
        return family
    second = index.get("transformer_2")
    experts = bool(second and second[0] is not None)
    if experts != (index.get("boundary_ratio") is not None):
        raise ValueError(
            f"Expected {path} to have both transformer_2 and boundary_ratio (Wan 2.2 A14B) or neither, but its "
            f"model_index.json has transformer_2={second!r}, boundary_ratio={index.get('boundary_ratio')!r}."
        )
    if experts and index.get("expand_timesteps"):
        raise ValueError(
            f"{path} has two experts and expand_timesteps, which no published Wan has: the flow scripts build Wan 2.1, "
            "Wan 2.2 TI2V-5B (expand_timesteps) and Wan 2.2 A14B (two experts)."
        )
    if experts:
        return "wan-a14b"
    return "wan-ti2v" if index.get("expand_timesteps") else "wan"
