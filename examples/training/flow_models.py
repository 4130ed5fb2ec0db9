"""Loading SD3 / FLUX / Qwen-Image / Wan components, the flow denoiser (packing), latents, schedule, student, saving."""

# The flow scripts (``examples/flow_*.py``) use the same plumbing as the SDXL ones (runtime, checkpoints, loop,
# EMA); what differs per model family lives here:
#
# - :func:`load_flow` reads the family from ``model_index.json`` (:func:`training.flow_families.model_family`) and
#   loads each ``[library, class]`` entry the way the pipeline does (``from_pretrained(subfolder=name)``).
# - :class:`FlowDenoiser` makes the transformers one denoiser ``denoiser(sample, timestep, **cond) -> velocity`` of
#   the sample's shape (images ``(B, C, h, w)``, Wan's videos ``(B, C, f, h, w)``) with ``timestep`` = sigma * 1000
#   (the schedule's model timestep, :func:`flow_schedule`), so losses, samplers and solvers never see FLUX's or
#   Qwen-Image's packed tokens.
# - :func:`encode_latents` / :func:`decode_latents`: the family's latent normalisation read from the VAE config
#   (``(z - shift_factor) * scaling_factor``; SD3 0.0609 / 1.5305, FLUX 0.1159 / 0.3611; Wan's and Qwen-Image's
#   per-channel ``(z - latents_mean) / latents_std``).
# - :func:`flow_schedule`: the training :class:`~diffdistill.schedulers.NoiseSchedule` with the model's shift at a
#   resolution (SD3 / Wan static; FLUX / Qwen-Image ``mu`` of the token count, Esser et al. 2024 Sec. 5.3.2).
# - :func:`make_trainable` / :func:`load_teacher`: LoRA on the family's targets
#   (:func:`training.flow_families.lora_targets`) or the full transformer. The families: :mod:`training.flow_families`.
# - :func:`save_transformer`: a LoRA file that ``pipeline_class.load_lora_weights`` loads (written by the
#   pipeline class's own ``save_lora_weights``), or a ``save_pretrained`` transformer folder.

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoints, flow_families, sdxl_encoding, sdxl_models, wan_experts
from .flow_families import CFG_FAMILIES, FAMILY_NAMES, PACKED_FAMILIES, VARIANT_NAMES
from .flow_packing import image_ids, pack_latents, unpack_latents


@dataclass
class FlowComponents:
    """The parts of an SD3 / FLUX / Qwen-Image / Wan pipeline a distillation script uses.

    ``text_encoders`` / ``tokenizers`` in the pipeline's order (SD3: CLIP-L, CLIP-G, T5; FLUX: CLIP-L, T5; Qwen-Image
    Qwen2.5-VL; Wan umT5); ``pipeline_class`` is the pipeline's class (its ``encode_prompt`` and
    ``save_lora_weights`` are used).
    """

    family: str
    transformer: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any
    pipeline_class: Any
    cache_tag: str = ""
    variant: str = ""
    _text_pipeline: Any = field(default=None, repr=False)

    @property
    def uses_cfg(self) -> bool:
        """Whether the family is guided by classifier-free guidance (:data:`CFG_FAMILIES`: SD3, Wan)."""
        return self.family in CFG_FAMILIES

    @property
    def has_experts(self) -> bool:
        """Whether the transformer is Wan 2.2 A14B's two experts (:class:`training.wan_experts.WanExperts`)."""
        return self.variant == "wan-a14b"

    @property
    def is_video(self) -> bool:
        """Whether the latents are videos ``(B, C, f, h, w)`` (Wan)."""
        return self.family == "wan"

    @property
    def name(self) -> str:
        """The model's name for messages (``"SD3 / SD3.5"``, ``"FLUX.1"``, ``"Wan 2.1"``, ``"Wan 2.2 TI2V-5B"``)."""
        return VARIANT_NAMES[self.variant or self.family]

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae, *self.text_encoders]

    def text_pipeline(self) -> Any:
        """The pipeline with its text encoders and tokenizers only (no transformer, no VAE): what
        ``encode_prompt`` needs."""
        if self._text_pipeline is None:
            if self.family in ("wan", "qwen"):  # one text encoder (umT5 / Qwen2.5-VL), no VAE
                self._text_pipeline = self.pipeline_class(
                    tokenizer=self.tokenizers[0],
                    text_encoder=self.text_encoders[0],
                    vae=None,
                    scheduler=self.noise_scheduler,
                    transformer=None,
                )
                return self._text_pipeline
            names = ("text_encoder", "text_encoder_2", "text_encoder_3")
            toks = ("tokenizer", "tokenizer_2", "tokenizer_3")
            parts = dict(zip(names, self.text_encoders)) | dict(zip(toks, self.tokenizers))
            self._text_pipeline = self.pipeline_class(
                transformer=None, vae=None, scheduler=self.noise_scheduler, **parts
            )
        return self._text_pipeline


def load_flow(args: argparse.Namespace) -> FlowComponents:
    """Load transformer, VAE, text encoders, tokenizers and the scheduler of an SD3 / FLUX / Qwen-Image / Wan pipeline
    (``--pretrained_model_name_or_path``, ``--revision``, ``--variant``; ``--pretrained_vae_model_name_or_path``
    replaces the VAE)."""
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    path, rev, var = args.pretrained_model_name_or_path, args.revision, args.variant
    variant = flow_families.model_variant(path, rev)
    index = DiffusionPipeline.load_config(path, revision=rev)
    libraries = {"diffusers": diffusers, "transformers": transformers}

    def load(name: str, **kw: Any) -> Any:
        library, cls = index[name]
        return getattr(libraries[library], cls).from_pretrained(path, subfolder=name, revision=rev, **kw)

    encoders = [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if n in index]
    with sdxl_models.zero3_init_disabled():
        vae_path = args.pretrained_vae_model_name_or_path
        return FlowComponents(
            family=flow_families.family_of(variant),
            variant=variant,
            transformer=wan_experts.load_experts(
                getattr(diffusers, index["transformer"][1]),
                path,
                wan_experts.boundary_timestep(index, load("scheduler")),
                revision=rev,
                variant=var,
            )
            if variant == "wan-a14b"
            else load("transformer", variant=var),
            vae=getattr(diffusers, index["vae"][1]).from_pretrained(vae_path, revision=rev)
            if vae_path
            else load("vae"),
            text_encoders=[load(n, variant=var) for n in encoders],
            tokenizers=[load(n.replace("text_encoder", "tokenizer")) for n in encoders],
            noise_scheduler=load("scheduler"),
            pipeline_class=getattr(diffusers, index["_class_name"]),
            cache_tag=sdxl_models.model_cache_tag(args),
        )


def vae_scale_factor(vae: Any) -> int:
    """The VAE's spatial downsampling, as the pipelines compute it: ``2 ** (levels - 1)`` (8 for SD3 / FLUX), Wan's
    ``scale_factor_spatial`` (8) or Qwen-Image's ``2 ** len(temperal_downsample)`` (8)."""
    config = vae.config
    spatial = getattr(config, "scale_factor_spatial", None)
    if spatial:
        return int(spatial)
    if (
        getattr(config, "temperal_downsample", None) is not None
    ):  # AutoencoderKLQwenImage (diffusers' spelling)
        return 2 ** len(config.temperal_downsample)
    return 2 ** (len(config.block_out_channels) - 1)


def latent_frames(vae: Any, num_frames: int) -> int:
    """Latent frames of a ``num_frames`` video: ``(num_frames - 1) // scale_factor_temporal + 1`` (Wan's causal
    VAE keeps the first frame and compresses each later group of 4: 81 -> 21), as ``WanPipeline`` computes it."""
    return (num_frames - 1) // int(vae.config.scale_factor_temporal) + 1


def latent_shape(
    parts: FlowComponents,
    batch: int,
    resolution: int,
    num_frames: int | None = None,
    width: int | None = None,
) -> tuple[int, ...]:
    """``(B, C, h, w)`` of the latents of ``resolution`` x ``width`` px images (``width`` default: square; C from
    the VAE config, 16), or ``(B, C, f, h, w)`` of ``num_frames``-frame videos for Wan (default: the variant's,
    :func:`training.flow_families.default_num_frames`; Wan 2.2 TI2V-5B's VAE: C 48, factor 16)."""
    h, w = (side // vae_scale_factor(parts.vae) for side in (resolution, width or resolution))
    channels = int(getattr(parts.vae.config, "latent_channels", None) or parts.vae.config.z_dim)
    if parts.is_video:
        return (
            batch,
            channels,
            latent_frames(parts.vae, num_frames or flow_families.default_num_frames(parts.variant)),
            h,
            w,
        )
    return (batch, channels, h, w)


def encode_latents(vae: Any, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Normalised latents ``(z - shift_factor) * scaling_factor`` of images in [-1, 1] (a posterior sample drawn
    with ``generator``); both factors from the VAE config (:func:`training.sdxl_encoding.latent_scale`). Wan's
    videos: :func:`training.sdxl_encoding.encode_videos` (``StepData.latents_batch``)."""
    return sdxl_encoding.encode_images(vae, images, generator)


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] ``(B, 3, H, W)`` float32 on the CPU from normalised latents, or Wan's videos
    ``(B, 3, F, H, W)`` from ``(B, C, f, h, w)``: :func:`training.sdxl_encoding.decode_latents` (``z / scale +
    shift``, per channel for the Wan-family VAEs of Wan and Qwen-Image, as their pipelines decode)."""
    return sdxl_encoding.decode_latents(vae, latents)


def flow_schedule(
    parts: FlowComponents, resolution: int, *, width: int | None = None, terminal_stretch: bool = True
) -> Any:
    """The training schedule of the model at ``resolution`` x ``width`` px (default square), from its scheduler config.

    SD3: the static ``shift`` (3.0). FLUX and Qwen-Image (``use_dynamic_shifting``): ``mu`` of the packed image
    token count ``H W / 16^2`` with the config's base / max shift, as their pipelines compute it. Wan: the
    ``flow_shift`` of its ``UniPCMultistepScheduler`` (3.0 for Wan 2.1 T2V at 480p). The model timestep is sigma *
    1000 for every family (:class:`FlowDenoiser` hands FLUX and Qwen-Image their sigma).
    ``terminal_stretch=False`` drops a ``shift_terminal`` (Qwen-Image: 0.02) from the schedule's sampling grids:
    the stretch pins the last of N grid sigmas at it, which for a few-step generator's grid makes its last step
    a near-clean one (the training table is the same either way)."""
    from diffdistill.schedulers import NoiseSchedule, packed_image_seq_len

    scheduler = parts.noise_scheduler
    if not terminal_stretch and scheduler.config.get("shift_terminal"):
        scheduler = type(scheduler).from_config(scheduler.config, shift_terminal=None)
    config = scheduler.config
    kwargs: dict[str, Any] = {"timestep_scale": 1000.0}
    if config.get("use_dynamic_shifting", False):
        kwargs["image_seq_len"] = packed_image_seq_len(
            resolution, width or resolution, vae_scale_factor=vae_scale_factor(parts.vae)
        )
    return NoiseSchedule.from_scheduler(scheduler, **kwargs)


class FlowDenoiser(nn.Module):
    """An SD3 / FLUX / Qwen-Image / Wan transformer as ``forward(sample, timestep, **cond) -> velocity`` of
    ``sample``'s shape (images ``(B, C, h, w)``; Wan's videos ``(B, C, f, h, w)``).

    ``timestep`` is sigma * 1000 (float, ``(B,)`` or a number): SD3 and Wan take it as it is (``WanPipeline``
    hands its UniPC timesteps, ``int(1000 sigma)``; a float is the same embedding without the rounding); FLUX
    and Qwen-Image take sigma (their pipelines pass ``timestep.to(latents.dtype) / 1000``, done the same way here). ``cond``
    holds ``encoder_hidden_states`` ``(B, L, D)`` (Wan: its only condition, umT5's states), ``pooled_projections``
    ``(B, P)`` (SD3 / FLUX) and, for a guidance-distilled
    FLUX (``guidance_embeds``, FLUX.1-dev), optionally ``guidance`` ``(B,)`` (default: ``guidance`` given here,
    the ``--guidance`` option; FluxPipeline's default 3.5). FLUX latents are packed into 2x2 patches with
    ``img_ids`` / zero ``txt_ids`` and the output unpacked (reference/flow.md Sec. 3); Qwen-Image's the same way
    with ``img_shapes`` and its text mask ``encoder_hidden_states_mask`` ``(B, L)`` from ``cond``.

    Args:
        transformer: the transformer (possibly wrapped by accelerate: DDP / FSDP).
        family: ``"sd3"``, ``"flux"``, ``"qwen"`` or ``"wan"``.
        guidance: the embedded guidance of a guidance-distilled FLUX (ignored by other models).
    """

    def __init__(self, transformer: nn.Module, family: str, guidance: float | None = None) -> None:
        super().__init__()
        if family not in FAMILY_NAMES:
            raise ValueError(f"Expected family 'sd3', 'flux', 'qwen' or 'wan', but got {family!r}.")
        self.transformer = transformer
        self.family = family
        from diffdistill._modules import unwrap_model

        inner: Any = unwrap_model(transformer)
        self.guidance_embeds = bool(getattr(inner.config, "guidance_embeds", False))
        self.guidance = guidance

    def model_inputs(
        self, sample: torch.Tensor, timestep: Any, **cond: Any
    ) -> tuple[torch.Tensor, dict[str, Any], tuple[int, int] | None]:
        """``(hidden_states, keyword arguments, grid_size)`` of the transformer call the pipeline would make:
        SD3 ``(sample, {timestep, ...cond}, None)``; Wan ``(sample, {timestep, encoder_hidden_states}, None)``
        (a ``pooled_projections`` in ``cond`` is dropped: Wan has none); FLUX ``(packed, {timestep: sigma, img_ids,
        txt_ids, guidance, ...cond}, (h/2, w/2))``; Qwen-Image ``(packed, {timestep: sigma, img_shapes,
        encoder_hidden_states, encoder_hidden_states_mask}, (h/2, w/2))`` (``grid_size`` as the LADD
        discriminator takes packed tokens)."""
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = (t.expand(b) if t.ndim == 0 else t).to(torch.float32)
        kwargs = dict(cond)
        if self.family not in PACKED_FAMILIES:  # SD3, Wan: the latents as they are
            kwargs.pop("guidance", None)
            if self.family == "wan":
                kwargs.pop("pooled_projections", None)
            return sample, {"timestep": t, **kwargs}, None
        h, w = sample.shape[-2:]
        guidance = kwargs.pop("guidance", None)
        if self.guidance_embeds:
            g = self.guidance if guidance is None else guidance
            if g is None:
                raise ValueError(
                    "This FLUX transformer takes an embedded guidance scale (guidance_embeds, FLUX.1-dev): pass "
                    "--guidance (FluxPipeline's default is 3.5)."
                )
            kwargs["guidance"] = torch.as_tensor(g, device=sample.device, dtype=torch.float32).expand(b)
        kwargs["timestep"] = t.to(sample.dtype) / 1000
        if self.family == "qwen":  # QwenImagePipeline: one (frame, rows, columns) patch grid per sample
            kwargs.pop("pooled_projections", None)
            kwargs["img_shapes"] = [[(1, h // 2, w // 2)]] * b
        else:
            ehs = kwargs["encoder_hidden_states"]
            kwargs["img_ids"] = image_ids(h, w, sample.device, ehs.dtype)
            kwargs["txt_ids"] = torch.zeros(ehs.shape[1], 3, device=sample.device, dtype=ehs.dtype)
        return pack_latents(sample), kwargs, (h // 2, w // 2)

    def forward(self, sample: torch.Tensor, timestep: Any, **cond: Any) -> torch.Tensor:
        hidden, kwargs, grid = self.model_inputs(sample, timestep, **cond)
        out = self.transformer(hidden_states=hidden, return_dict=False, **kwargs)[0]
        if grid is None:
            return out
        return unpack_latents(out, *sample.shape[-2:])


def euler_sample(
    denoiser: Any, noise: torch.Tensor, sigmas: list[float], cond: dict[str, Any]
) -> torch.Tensor:
    """A few-step sample on the explicit grid ``sigmas`` (descending, then 0): Euler
    ``x <- x + (sigma' - sigma) v`` from ``noise`` at ``sigmas[0]``, diffusers' ``FlowMatchEulerDiscreteScheduler``
    step (float32 state)."""
    x = noise.float()
    for s, s_next in zip(sigmas, [*sigmas[1:], 0.0]):
        t = torch.full((x.shape[0],), 1000.0 * s, device=x.device)
        v = denoiser(x.to(noise.dtype), t, **cond).float()
        x = x + (s_next - s) * v
    return x


def make_trainable(
    args: argparse.Namespace,
    transformer: nn.Module,
    device: Any,
    dtype: torch.dtype,
    *,
    family: str = "sd3",
) -> nn.Module:
    """Make ``transformer`` trainable in place: a float32 LoRA (``--lora_rank``, ``--lora_alpha``) on the family's
    :func:`training.flow_families.lora_targets` (``family``) over a frozen ``dtype`` base (``--use_lora``), or the whole transformer (float32);
    ``--gradient_checkpointing`` on. As :func:`training.sdxl_models.make_trainable` for the UNet."""
    from diffdistill.students import add_lora

    if args.use_lora:
        transformer.requires_grad_(False)
        sdxl_models.to_frozen_dtype(transformer, device, dtype)
        targets = flow_families.lora_targets(family)
        add_lora(transformer, rank=args.lora_rank, alpha=args.lora_alpha, targets=targets)
        sdxl_models.upcast_trainable(transformer)
    else:
        transformer.to(device).train().requires_grad_(True)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer


def load_teacher(
    args: argparse.Namespace, parts: FlowComponents, device: Any, dtype: torch.dtype
) -> nn.Module:
    """A frozen, eval-mode teacher transformer in ``dtype`` on ``device``, loaded again from
    ``--pretrained_model_name_or_path`` straight in ``dtype`` (not a copy of the float32 student: at FLUX's
    12 B parameters that copy would hold a second 48 GB of float32 weights in host memory)."""
    kwargs = {"revision": args.revision, "variant": args.variant, "torch_dtype": dtype}
    with sdxl_models.zero3_init_disabled():
        if isinstance(parts.transformer, wan_experts.WanExperts):  # Wan 2.2 A14B: both experts
            high = type(parts.transformer.transformer)
            path, boundary = args.pretrained_model_name_or_path, parts.transformer.boundary_timestep
            teacher = wan_experts.load_experts(high, path, boundary, **kwargs)
        else:
            teacher = type(parts.transformer).from_pretrained(
                args.pretrained_model_name_or_path, subfolder="transformer", **kwargs
            )
    sdxl_models.freeze(teacher)
    return teacher.to(device)


def place_frozen(parts: FlowComponents, device: Any, dtype: torch.dtype) -> None:
    """Freeze the VAE and text encoders and move them to ``device`` (the VAE stays float32 under fp16)."""
    sdxl_models.freeze(*parts.frozen_modules())
    for m in parts.text_encoders:
        m.to(device, dtype=dtype)
    parts.vae.to(device, dtype=torch.float32 if dtype == torch.float16 else dtype)


def save_transformer(
    accelerator: Any,
    transformer: nn.Module,
    args: argparse.Namespace,
    parts: FlowComponents,
    *,
    ema: Any = None,
) -> Path:
    """Final weights under ``--output_dir``: with ``--use_lora`` ``pytorch_lora_weights.safetensors`` written by
    ``parts.pipeline_class.save_lora_weights(transformer_lora_layers=...)`` (keys ``transformer.<module>.lora_A
    .weight``, the LoRA config in the metadata), which ``pipeline.load_lora_weights(OUTPUT_DIR)`` loads;
    otherwise a ``transformer/`` folder (``save_pretrained`` layout, :func:`training.checkpoints.save_unet`).
    With ``ema`` the average is written. Call on every process (FSDP gathers the shards)."""
    if not args.use_lora:
        return checkpoints.save_unet(accelerator, transformer, args, "transformer", ema=ema)
    from diffdistill.students import lora_state_dict

    accelerator.wait_for_everyone()
    out = Path(args.output_dir)
    model = accelerator.unwrap_model(transformer)
    if ema is not None:
        ema.copy_to_model()
    state = accelerator.get_state_dict(transformer)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        layers = {k: v.detach().cpu() for k, v in lora_state_dict(model, state_dict=state).items()}
        config = model.peft_config["default"]
        wan_experts.write_lora(parts, out, layers, config, checkpoints.LORA_WEIGHT_NAME)
    accelerator.wait_for_everyone()
    return out / checkpoints.LORA_WEIGHT_NAME
