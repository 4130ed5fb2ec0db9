"""What distinguishes the SD3 / FLUX / Qwen-Image / Wan families in the flow scripts: pipelines, guidance, LoRA."""

# One table per fact, read by ``training.flow_models`` (loading, the denoiser), ``training.flow_encoding`` (prompts),
# ``training.flow_options`` (option checks) and the scripts (guidance, LoRA targets, LADD heads, sampling grids):
#
# - :func:`model_family` reads a pipeline folder's ``model_index.json`` (``_class_name`` -> family; other pipelines
#   and the Wan 2.2 variants the scripts do not build are refused with the reason);
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
FAMILY_NAMES = {"sd3": "SD3 / SD3.5", "flux": "FLUX.1", "qwen": "Qwen-Image", "wan": "Wan 2.1"}
CFG_FAMILIES = ("sd3", "qwen", "wan")
"""The families guided by classifier-free guidance against an unconditional pass (FLUX.1-dev embeds its guidance
as an input instead; reference/flow.md pitfall 1)."""
PACKED_FAMILIES = ("flux", "qwen")
"""The families whose transformer takes 2x2 patches of the latents as packed tokens ``(B, h/2 * w/2, 4C)``."""
DEFAULT_GUIDANCE_SCALE = {"sd3": 7.0, "qwen": 4.0, "wan": 5.0}
"""The pipelines' default classifier-free guidance scale (``StableDiffusion3Pipeline`` 7.0, ``QwenImagePipeline``'s
``true_cfg_scale`` 4.0, ``WanPipeline`` 5.0)."""
UNCOND_PROMPT = {"qwen": " "}
"""The negative prompt of a family's unconditional branch when it is not the empty prompt: Qwen-Image's pipeline
enables true CFG only with a negative prompt, and diffusers' Qwen-Image docs pass ``negative_prompt=" "``."""
DEFAULT_RESOLUTION = {"wan": 480}
"""A family's default ``--resolution`` when it is not 1024: Wan 2.1 generates 480p (480 x 832; the 14B model also
720p), and a square 1024 video of 81 frames is 2.6x the tokens of 480 x 832."""
DEFAULT_NUM_FRAMES = 81
"""``WanPipeline``'s default video length (frames; Wan 2.1 generates ``4k + 1`` frames, 81 = 5 s at 16 fps)."""

FLOW_LORA_TARGETS = _LIBRARY_FLOW_LORA_TARGETS
"""LoRA targets of the transformer: :data:`diffdistill.students.FLOW_LORA_TARGETS`, the default ``target_modules``
of diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py`` (attention q/k/v/out of both streams and both
feed-forwards; FLUX's single-stream blocks get their ``attn.to_q/k/v``). diffusers' SD3 DreamBooth script takes
the eight attention names only by default; we add the feed-forwards for SD3 too (our choice: one list, the
attention + FF linears of both families)."""


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


def model_family(path: str, revision: str | None = None) -> str:
    """``"sd3"``, ``"flux"``, ``"qwen"`` or ``"wan"`` from the ``_class_name`` of ``model_index.json`` (folder or hub).

    Wan: the single-transformer text-to-video pipelines (Wan 2.1 T2V 1.3B / 14B). Refused with the reason: Wan 2.2
    A14B (two experts, ``transformer_2`` switched at ``boundary_ratio``: which expert a distilled step runs is a
    recipe of its own) and Wan 2.2 TI2V-5B (``expand_timesteps``: a timestep per token)."""
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
    if name == "WanPipeline":
        second = index.get("transformer_2")
        if (second and second[0] is not None) or index.get("boundary_ratio") is not None:
            raise ValueError(
                f"{path} is a two-expert Wan 2.2 pipeline (transformer_2, boundary_ratio): the flow scripts distil "
                "one transformer. Distil Wan 2.1 (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, -14B-Diffusers), or one expert "
                "as its own single-transformer pipeline folder."
            )
        if index.get("expand_timesteps"):
            raise ValueError(
                f"{path} sets expand_timesteps (Wan 2.2 TI2V-5B: a timestep per token for its image-conditioned "
                "frames), which the flow scripts' denoiser does not build. Distil a Wan 2.1 text-to-video model."
            )
    return FAMILIES[name]
