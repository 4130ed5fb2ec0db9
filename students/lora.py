"""LoRA students through peft, their teacher view, adapter files, and the LCM guidance-scale embedding.

LCM-LoRA (Luo et al. 2023, arXiv:2311.05556) and the diffusers ``train_lcm_distill_lora_sdxl.py``
script train a LoRA on the teacher UNet; the teacher is the *same* UNet with its adapters disabled,
so one copy of the weights serves both. SDXL-Lightning (Lin et al. 2024, arXiv:2402.13929) trains its
LoRAs on "all conv/linear layers except conv_in/conv_out and the shared time-embedding linears",
which is the :data:`LCM_LORA_TARGETS` list. The full (non-LoRA) LCM student takes the guidance scale
``w`` through ``time_cond_proj_dim`` (:func:`add_guidance_embedding`, :func:`guidance_scale_embedding`).

peft and safetensors are imported inside the functions (``pip install 'diffdistill[train]'``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import operator
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._checks import OptionError, check_ndim, check_option, check_positive, check_tensor
from .._modules import unwrap_model

__all__ = [
    "LCM_LORA_TARGETS",
    "TeacherView",
    "adapters_disabled",
    "add_guidance_embedding",
    "add_lora",
    "guidance_scale_embedding",
    "load_lora",
    "lora_state_dict",
    "merge_lora",
    "save_lora",
]

logger = logging.getLogger(__name__)

LCM_LORA_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
"""The 14 module-name suffixes of diffusers' LCM-LoRA SDXL script and DMD2: attention q/k/v/out, the
transformer ``proj_in``/``proj_out`` and feed-forward, every resnet conv / shortcut / time projection and
the down/up-sampler convs. Not targeted: ``conv_in``, ``conv_out``, ``time_embedding.linear_1/2`` and
SDXL's ``add_embedding`` linears."""

_META_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def _peft(what: str) -> Any:
    try:
        import peft
    except ImportError as err:  # pragma: no cover - peft is installed in dev environments
        raise ImportError(f"`{what}` requires `peft`: pip install 'diffdistill[train]'") from err
    return peft


def _tuner_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """``(name, layer)`` of every peft tuner layer (typed ``Any``: peft's layer API is dynamic)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in unwrap_model(model).named_modules() if isinstance(m, BaseTunerLayer)]


def add_lora(
    model: nn.Module,
    *,
    rank: int = 64,
    alpha: float | None = None,
    targets: Sequence[str] = LCM_LORA_TARGETS,
    adapter_name: str = "default",
    dropout: float = 0.0,
    freeze_base: bool = True,
    init_lora_weights: bool | str = True,
) -> nn.Module:
    """Add a peft LoRA adapter (``W + (alpha / rank) B A``) to ``model`` in place and return it.

    Args:
        model: a diffusers model (its ``add_adapter`` is used, so diffusers' LoRA APIs work on it) or any
            ``nn.Module`` (peft ``inject_adapter_in_model``); wrappers are unwrapped.
        rank, alpha: LoRA rank ``r`` and ``lora_alpha`` (default ``alpha = rank``: scale 1; LCM-LoRA SDXL
            uses r = alpha = 64).
        targets: module-name suffixes to adapt (default :data:`LCM_LORA_TARGETS`).
        adapter_name: peft adapter name.
        dropout: LoRA dropout.
        freeze_base: set ``requires_grad=False`` on every non-LoRA parameter.
        init_lora_weights: peft's option (``True``: ``B = 0``, so the model is unchanged at first).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> net = add_lora(net, rank=2, targets=["0"])
        >>> sorted(n for n, p in net.named_parameters() if p.requires_grad)
        ['0.lora_A.default.weight', '0.lora_B.default.weight']
    """
    peft = _peft("add_lora")
    try:
        if isinstance(rank, bool):
            raise TypeError
        rank = operator.index(rank)  # ints, numpy integers
    except TypeError:
        raise OptionError(
            f"Expected `rank` to be a positive int, but got {type(rank).__name__} {rank!r}: pass e.g. rank=64 "
            "(peft would truncate a float rank while alpha keeps it, so the scaling alpha / rank changes)."
        ) from None
    check_positive(rank, "rank")
    config = peft.LoraConfig(
        r=int(rank),
        lora_alpha=float(rank if alpha is None else alpha),
        target_modules=list(targets),
        lora_dropout=float(dropout),
        init_lora_weights=init_lora_weights,
    )
    inner: Any = unwrap_model(model)  # diffusers/peft attributes are dynamic
    if callable(getattr(inner, "add_adapter", None)) and hasattr(inner, "config"):
        inner.add_adapter(config, adapter_name=adapter_name)
    else:
        peft.inject_adapter_in_model(config, inner, adapter_name=adapter_name)
        configs = dict(getattr(inner, "peft_config", {}) or {})
        configs[adapter_name] = config
        inner.peft_config = configs
    if freeze_base:
        for name, param in inner.named_parameters():
            if "lora_" not in name:
                param.requires_grad_(False)
            elif f".{adapter_name}." in name:
                param.requires_grad_(True)
    n_train = sum(p.numel() for n, p in inner.named_parameters() if "lora_" in n and f".{adapter_name}." in n)
    logger.info(
        "LoRA %r: rank %d, %d layer(s), %d parameters", adapter_name, rank, len(_tuner_layers(inner)), n_train
    )
    return model


def _require_adapters(layers: list[Any], model: nn.Module, what: str) -> None:
    if not layers:
        raise OptionError(
            f"Expected `model` ({type(unwrap_model(model)).__name__}) to have LoRA adapters for {what}, but it "
            "has none (never added, or removed by merge_lora): the 'teacher' would be the student itself. "
            "Keep a separate frozen copy of the teacher for a full (or merged) student."
        )


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which ``model`` runs without its LoRA adapters (the LCM-LoRA teacher).

    Raises OptionError for a model without LoRA layers (e.g. after :func:`merge_lora`), which would
    otherwise run unchanged.

    The adapters' ``requires_grad`` flags are restored on exit (peft's ``enable_adapters`` would reset
    them).

    Example:
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), rank=1, targets=["0"])
        >>> _ = torch.nn.init.ones_(net[0].lora_B["default"].weight)
        >>> x = torch.randn(3, 2)
        >>> with adapters_disabled(net):
        ...     torch.allclose(net(x), x @ net[0].base_layer.weight.T + net[0].base_layer.bias)
        True
    """
    layers = [m for _, m in _tuner_layers(model)]
    _require_adapters(layers, model, "adapters_disabled")
    grads = {p: p.requires_grad for m in layers for p in m.parameters()}
    was_disabled = [bool(m.disable_adapters) for m in layers]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield model
    finally:
        for m, disabled in zip(layers, was_disabled):
            m.enable_adapters(not disabled)
        for p, flag in grads.items():
            p.requires_grad_(flag)


class TeacherView:
    """The teacher of a LoRA student: the same model, run under ``torch.no_grad`` with adapters disabled.

    With ``grad=True`` the autograd graph is kept (the adapters stay disabled), as SIM / SiD need for the
    real score: their generator gradient flows through the teacher's *input*. The model's own parameters
    then receive gradients too, so step only the generator's optimiser (or freeze them).

    Not an ``nn.Module`` (it holds no weights of its own), so attaching it to a module does not register
    the model twice.

    Example:
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), rank=1, targets=["0"])
        >>> teacher = TeacherView(net)
        >>> teacher(torch.randn(1, 2)).requires_grad
        False
        >>> TeacherView(net, grad=True)(torch.randn(1, 2, requires_grad=True)).requires_grad
        True
    """

    def __init__(self, model: nn.Module, *, grad: bool = False) -> None:
        _require_adapters(_tuner_layers(model), model, "TeacherView")
        self.model = model
        self.grad = grad

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()), adapters_disabled(self.model):
            return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        return f"TeacherView({type(unwrap_model(self.model)).__name__})"


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge the active adapters into the base weights and remove every LoRA layer (peft ``merge_and_unload``).

    The returned model (the same object, unwrapped modules replaced in place) has the plain layer types
    again, computes what the adapter model computed, and no longer reports a peft config.

    Example:
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), rank=1, targets=["0"])
        >>> _ = torch.nn.init.ones_(net[0].lora_B["default"].weight)
        >>> x = torch.randn(3, 2)
        >>> y = net(x)
        >>> merged = merge_lora(net)
        >>> type(merged[0]).__name__, torch.allclose(merged(x), y, atol=1e-6)
        ('Linear', True)
    """
    inner: Any = unwrap_model(model)
    layers = _tuner_layers(inner)
    for name, layer in layers:
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = inner.get_submodule(parent_name) if parent_name else inner
        setattr(parent, child, layer.get_base_layer())
    if hasattr(inner, "peft_config"):
        with contextlib.suppress(AttributeError):
            del inner.peft_config
    if getattr(inner, "_hf_peft_config_loaded", False):
        inner._hf_peft_config_loaded = False
    logger.info("merged and removed %d LoRA layer(s)", len(layers))
    return model


def _lora_config(model: nn.Module, adapter_name: str) -> Any:
    configs = getattr(unwrap_model(model), "peft_config", None) or {}
    if adapter_name not in configs:
        raise OptionError(
            f"Expected `adapter_name` to be one of {sorted(configs)}, but got {adapter_name!r}. "
            "Add the adapter with add_lora() first."
        )
    return configs[adapter_name]


def lora_state_dict(
    model: nn.Module, adapter_name: str = "default", *, state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft/diffusers form: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``.

    ``state_dict``: take the values from this full state dict of ``model`` (same keys as
    ``model.state_dict()``) instead of the model's own tensors -- e.g. the gathered
    ``accelerator.get_state_dict(model)`` of a model sharded by FSDP, whose parameters are shards.

    Example:
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), rank=1, targets=["0"])
        >>> sorted(lora_state_dict(net))
        ['0.lora_A.weight', '0.lora_B.weight']
    """
    peft = _peft("lora_state_dict")
    _lora_config(model, adapter_name)
    return dict(
        peft.get_peft_model_state_dict(
            unwrap_model(model),
            state_dict=None if state_dict is None else dict(state_dict),
            adapter_name=adapter_name,
        )
    )


def _config_metadata(config: Any) -> dict[str, Any]:
    targets = config.target_modules
    return {
        "r": int(config.r),
        "lora_alpha": float(config.lora_alpha),
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        "lora_dropout": float(config.lora_dropout),
        "bias": str(config.bias),
        "use_dora": bool(getattr(config, "use_dora", False)),
    }


def save_lora(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    prefix: str = "unet",
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Save an adapter as one safetensors file in diffusers' LoRA form.

    Keys are ``f"{prefix}.{module}.lora_A.weight"`` etc. and the file metadata holds the LoRA config under
    ``lora_adapter_metadata`` (keys ``f"{prefix}.r"``, ...), so ``unet.load_lora_adapter(folder,
    weight_name=..., prefix="unet")`` and ``pipe.load_lora_weights`` read it (rank *and* alpha), and
    :func:`load_lora` reads it back into any model. ``prefix=""`` writes bare peft keys. ``state_dict``: the
    values to write, as for :func:`lora_state_dict` (a sharded model's gathered full state dict).

    Example:
        >>> import tempfile, os
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), rank=1, targets=["0"])
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_lora(net, os.path.join(d, "a.safetensors"))
        ...     fresh = load_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), os.path.join(d, "a.safetensors"))
        >>> type(fresh[0]).__name__
        'Linear'
    """
    from safetensors.torch import save_file

    config = _lora_config(model, adapter_name)
    pre = f"{prefix}." if prefix else ""
    tensors = {
        pre + k: v.detach().contiguous().cpu()
        for k, v in lora_state_dict(model, adapter_name, state_dict=state_dict).items()
    }
    meta = {pre + k: v for k, v in _config_metadata(config).items()}
    save_file(
        tensors, os.fspath(path), metadata={"format": "pt", _META_KEY: json.dumps(meta, sort_keys=True)}
    )
    logger.info("saved LoRA %r (%d tensors) to %s", adapter_name, len(tensors), os.fspath(path))


def load_lora(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    prefix: str = "unet",
    strict: bool = True,
) -> nn.Module:
    """Load a :func:`save_lora` file (or a diffusers LoRA file with metadata) into ``model`` and return it.

    A missing adapter ``adapter_name`` is created first with the file's rank, alpha and targets; without
    metadata the rank is read from the ``lora_A`` shapes and alpha defaults to the rank.

    Raises:
        OptionError: the file has no key under ``prefix``, or (``strict``) some adapter weights are
            missing or unexpected.
    """
    peft = _peft("load_lora")
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        raw_meta = (f.metadata() or {}).get(_META_KEY)
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    pre = f"{prefix}." if prefix else ""
    state = {k[len(pre) :]: v for k, v in tensors.items() if k.startswith(pre)}
    if not state:
        raise OptionError(
            f"Expected keys starting with {pre!r} in {os.fspath(path)}, but found {sorted(tensors)[:3]}. "
            "Pass the prefix it was saved with (prefix='' for bare peft keys)."
        )
    meta = json.loads(raw_meta) if raw_meta else {}
    meta = {k[len(pre) :]: v for k, v in meta.items() if k.startswith(pre)}
    inner: Any = unwrap_model(model)
    if adapter_name not in (getattr(inner, "peft_config", None) or {}):
        ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
        rank = int(meta.get("r", max(ranks)))
        targets = meta.get("target_modules") or sorted(
            {k.split(".lora_A.")[0] for k in state if ".lora_A." in k}
        )
        add_lora(
            inner,
            rank=rank,
            alpha=meta.get("lora_alpha", rank),
            targets=targets,
            adapter_name=adapter_name,
            dropout=float(meta.get("lora_dropout", 0.0)),
        )
    result = peft.set_peft_model_state_dict(inner, state, adapter_name=adapter_name)
    if strict:
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        missing = [
            k for k in getattr(result, "missing_keys", []) if "lora_" in k and f".{adapter_name}." in k
        ]
        if unexpected or missing:
            raise OptionError(
                f"Expected the file to match adapter {adapter_name!r} exactly, but {len(missing)} weight(s) are "
                f"missing (e.g. {missing[:2]}) and {len(unexpected)} unexpected (e.g. {unexpected[:2]}). "
                "Check `prefix` and the targets, or pass strict=False."
            )
    return model


def guidance_scale_embedding(
    w: torch.Tensor, embedding_dim: int = 256, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Sinusoidal embedding of guidance scales, as LCM's ``get_guidance_scale_embedding`` (``w`` · 1000).

    .. math:: e(w) = [\\sin(1000 w f_k), \\cos(1000 w f_k)]_k,\\quad f_k = 10000^{-k/(d/2 - 1)}

    Args:
        w: ``(B,)`` guidance scales.
        embedding_dim: ``d`` (the UNet's ``time_cond_proj_dim``); odd sizes are zero-padded.

    Returns:
        ``(B, embedding_dim)`` embedding, passed as ``unet(..., timestep_cond=...)``.

    Example:
        >>> guidance_scale_embedding(torch.tensor([0.0, 7.5]), 8).shape
        torch.Size([2, 8])
    """
    check_tensor(w, "w")
    check_ndim(w, "w", 1, "(B,)")
    check_positive(embedding_dim, "embedding_dim")
    half = embedding_dim // 2
    if half < 2:
        raise OptionError(f"Expected `embedding_dim` to be >= 4, but got {embedding_dim}.")
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -(math.log(10000.0) / (half - 1)))
    args = (w.to(dtype) * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def add_guidance_embedding(
    unet: nn.Module,
    time_cond_proj_dim: int = 256,
    *,
    init: str = "zeros",
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Give a diffusers UNet a guidance-scale input: ``time_embedding.cond_proj`` and ``time_cond_proj_dim``.

    diffusers' ``TimestepEmbedding`` adds ``cond_proj(timestep_cond)`` to the sinusoidal time features
    when ``timestep_cond`` is passed. ``init="zeros"`` keeps the teacher's output exactly (the LCM student
    starts as the teacher); ``init="uniform"`` is ``nn.Linear``'s default, what the full LCM script gets
    from ``from_config`` (LCM issue #45: random init). The config is updated, so ``save_pretrained`` /
    ``from_config`` rebuild the same layer.

    Example:
        >>> from diffusers import UNet2DConditionModel
        >>> unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
        ...     norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "UpBlock2D"), cross_attention_dim=8, mid_block_type=None)
        >>> x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 2, 8)
        >>> before = unet(x, t, c).sample
        >>> unet = add_guidance_embedding(unet, 16)
        >>> after = unet(x, t, c, timestep_cond=guidance_scale_embedding(torch.tensor([7.5]), 16)).sample
        >>> unet.config.time_cond_proj_dim, torch.allclose(before, after)
        (16, True)
    """
    check_positive(time_cond_proj_dim, "time_cond_proj_dim")
    check_option(init, "init", ["zeros", "uniform"])
    inner: Any = unwrap_model(unet)
    embedding: Any = getattr(inner, "time_embedding", None)
    linear_1 = getattr(embedding, "linear_1", None)
    if not isinstance(linear_1, nn.Linear):
        raise OptionError(
            f"Expected a diffusers UNet with `time_embedding.linear_1`, but {type(inner).__name__} has none."
        )
    if getattr(embedding, "cond_proj", None) is not None:
        raise OptionError(
            "Expected a UNet without a guidance embedding, but `time_embedding.cond_proj` exists already "
            f"(time_cond_proj_dim={getattr(getattr(inner, 'config', None), 'time_cond_proj_dim', '?')})."
        )
    proj = nn.Linear(
        int(time_cond_proj_dim),
        linear_1.in_features,
        bias=False,
        device=linear_1.weight.device,
        dtype=linear_1.weight.dtype,
    )
    with torch.no_grad():
        if init == "zeros":
            proj.weight.zero_()
        else:
            bound = 1.0 / math.sqrt(time_cond_proj_dim)
            proj.weight.uniform_(-bound, bound, generator=generator)
    embedding.cond_proj = proj
    if callable(getattr(inner, "register_to_config", None)):
        changes: dict[str, Any] = {"time_cond_proj_dim": int(time_cond_proj_dim)}
        defaults = inner.config.get("_use_default_values")
        if defaults is not None:  # from_config would otherwise reset the key to its default (None)
            changes["_use_default_values"] = [k for k in defaults if k != "time_cond_proj_dim"]
        inner.register_to_config(**changes)
    return unet
