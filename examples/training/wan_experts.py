"""Wan 2.2 A14B's two experts as one transformer (or discriminator) switched by timestep, one expert's training range, LoRA files."""

# Wan 2.2 A14B (text-to-video) is two 14 B transformers of one architecture: ``WanPipeline`` runs ``transformer``
# (the high-noise expert) at the steps whose timestep is at least ``boundary_ratio * num_train_timesteps`` (0.875 x
# 1000 for T2V A14B) and ``transformer_2`` (the low-noise expert) below, each with its own CFG scale
# (``guidance_scale`` 4.0 / ``guidance_scale_2`` 3.0; the Wan 2.2 repository's T2V A14B config). :class:`WanExperts`
# makes them one module with the single transformer's call, so the flow scripts' denoiser, LoRA, shared base,
# gradient checkpointing, FSDP2 sharding and checkpoints handle a two-expert model as they handle one transformer:
#
# - each sample of a call runs on the expert the pipeline would use at its timestep (a batch with both kinds is
#   split and the outputs put back in order);
# - distributed runs stay in step: with more than one process every call runs both experts (an expert with no sample
#   here on one sample, its output weighted 0), so each process makes the same expert calls whatever its samples,
#   FSDP2's gathers match and DDP gets a gradient for every parameter; no collective of its own (processes may make
#   different numbers of calls, e.g. TSCD's teacher trajectories);
# - LoRA adapters sit on both experts (module names ``transformer.blocks...`` / ``transformer_2.blocks...``) and
#   are saved as two files that ``WanPipeline.load_lora_weights`` loads (the second with
#   ``load_into_transformer_2=True``): :func:`split_lora`.

from __future__ import annotations

import itertools
import json
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

EXPERTS = ("transformer", "transformer_2")
"""The experts' names: ``WanPipeline``'s components, the module prefixes in :class:`WanExperts`."""

_ROUTERS: list[Any] = []  # weak references to every WanExperts / ExpertDiscriminators, in construction order


class _Routed(nn.Module):
    """What :class:`WanExperts` and :class:`ExpertDiscriminators` share: ``used``, per branch what ran on real
    samples with gradients enabled and is not yet accounted for by an optimiser step (:func:`drop_unused_grads`):
    ``None`` when the branch ran at all, and the name of each LoRA adapter active in it then."""

    def _register(self, track: bool = True) -> None:
        self.used: list[set[str | None]] = [set(), set()]
        self._tuner_layers: list[Any] = [None, None]
        if track:  # a transient composition (validation) is not tracked
            _ROUTERS.append(weakref.ref(self))

    def branches(self) -> list[nn.Module]:
        raise NotImplementedError

    def mark_used(self, index: int) -> None:
        """Record that branch ``index`` runs on real samples now, under the adapters active in it (read from
        one of its peft LoRA layers: a shared base or ``set_adapter`` switches every layer together; a branch
        without one is searched again at the next call, so adapters added after a first forward count)."""
        layer = self._tuner_layers[index]
        if layer is None:
            layer = next((m for m in self.branches()[index].modules() if _adapter_dict(m)), None)
            self._tuner_layers[index] = layer
        self.used[index].add(None)
        if layer is not None and not layer.disable_adapters:
            self.used[index].update(layer.active_adapters)


class WanExperts(_Routed):
    """Wan 2.2 A14B's ``transformer`` (high noise) and ``transformer_2`` (low noise) as one transformer.

    ``forward`` takes ``WanTransformer3DModel``'s arguments with one timestep per sample (``(B,)``, ``1000 sigma``)
    and runs each sample on ``transformer`` where ``timestep >= boundary_timestep`` and on ``transformer_2``
    elsewhere, as ``WanPipeline`` switches (its UniPC timesteps are integers, and ``floor(1000 sigma) >= 875`` iff
    ``1000 sigma >= 875``, so a float timestep picks the same expert). Tensor arguments with the batch's first
    dimension are split with the samples. With more than one ``torch.distributed`` process every call runs both
    experts, an expert with no sample here on the first sample with its output weighted 0 (our choice: FSDP2 gathers
    an expert's shards on every process that calls it and DDP expects a gradient for every parameter, so the
    processes must make the same expert calls; deciding that from every process's samples would take a collective
    per call, which processes making different numbers of calls, e.g. TSCD's teacher trajectories, would not
    match; the extra pass is one sample; when no process used an expert in a step, its zero gradient is dropped
    before the optimiser step, :func:`drop_unused_grads`). One process runs only the experts its samples need.

    Args:
        transformer: the high-noise expert.
        transformer_2: the low-noise expert (the same class and config).
        boundary_timestep: ``boundary_ratio * num_train_timesteps`` (T2V A14B: 875).
    """

    def __init__(
        self,
        transformer: nn.Module,
        transformer_2: nn.Module,
        boundary_timestep: float,
        *,
        track: bool = True,
    ) -> None:
        super().__init__()
        if not (isinstance(transformer, type(transformer_2)) or isinstance(transformer_2, type(transformer))):
            raise ValueError(
                f"Expected the two Wan 2.2 experts to be one class, but got {type(transformer).__name__} and "
                f"{type(transformer_2).__name__}."
            )
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary_timestep = float(boundary_timestep)
        self._register(track)
        # FSDP2 units: the blocks and each expert (whose own weights, e.g. its patch embedding, then unshard when the
        # expert is called directly, as LADD's discriminators call it)
        self._no_split_modules = [
            *(getattr(transformer, "_no_split_modules", None) or ()),
            type(transformer).__name__,
        ]

    @property
    def config(self) -> Any:
        """The high-noise expert's config (the experts share their architecture)."""
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.transformer, "is_gradient_checkpointing", False))

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Any = None) -> None:
        """Checkpoint both experts' blocks (diffusers' ``enable_gradient_checkpointing``, same function)."""
        for expert in (self.transformer, self.transformer_2):
            if gradient_checkpointing_func is None:
                expert.enable_gradient_checkpointing()
            else:
                expert.enable_gradient_checkpointing(gradient_checkpointing_func=gradient_checkpointing_func)

    def disable_gradient_checkpointing(self) -> None:
        for expert in (self.transformer, self.transformer_2):
            expert.disable_gradient_checkpointing()

    def experts(self) -> list[tuple[str, nn.Module]]:
        """``[("transformer", high), ("transformer_2", low)]``."""
        return [(name, getattr(self, name)) for name in EXPERTS]

    def branches(self) -> list[nn.Module]:
        return [self.transformer, self.transformer_2]

    def forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, return_dict: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor]:
        t = per_sample_timestep(timestep, hidden_states)

        def run(expert: nn.Module) -> Any:
            return lambda **kw: [expert(return_dict=False, **kw)[0]]

        high = t >= self.boundary_timestep
        (out,) = route(
            [run(self.transformer), run(self.transformer_2)],
            high,
            {"hidden_states": hidden_states, "timestep": t, **kwargs},
            self.mark_used,
        )
        return (out,)


class ExpertDiscriminators(_Routed):
    """Two discriminators (LADD heads on each Wan 2.2 A14B expert's blocks) as one, switched by timestep as the
    experts are: each sample's logits come from ``discriminator`` (on the high-noise ``transformer``) where
    ``timestep >= boundary_timestep`` and from ``discriminator_2`` (on ``transformer_2``) elsewhere, so the heads read
    the features of the expert ``WanPipeline`` runs at that noise level. Our choice: one set of heads per expert (the
    experts' features differ), trained together; distributed runs make both calls as :class:`WanExperts` does.

    Args:
        discriminator: the high-noise expert's discriminator (e.g. ``LADDDiscriminator(experts.transformer, ...)``).
        discriminator_2: the low-noise expert's.
        boundary_timestep: the experts' switch (:attr:`WanExperts.boundary_timestep`).
    """

    def __init__(
        self, discriminator: nn.Module, discriminator_2: nn.Module, boundary_timestep: float
    ) -> None:
        super().__init__()
        self.discriminator = discriminator
        self.discriminator_2 = discriminator_2
        self.boundary_timestep = float(boundary_timestep)
        self._register()

    def branches(self) -> list[nn.Module]:
        return [self.discriminator, self.discriminator_2]

    def forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, **kwargs: Any
    ) -> list[torch.Tensor]:
        """The logit maps (one per readout block, as each discriminator returns them) of every sample, from the
        discriminator of its expert; ``kwargs`` are the discriminators' (``grid_size``, ``encoder_hidden_states`` ...)."""
        t = per_sample_timestep(timestep, hidden_states)
        calls = [_as_list(d) for d in (self.discriminator, self.discriminator_2)]
        return route(
            calls,
            t >= self.boundary_timestep,
            {"hidden_states": hidden_states, "timestep": t, **kwargs},
            self.mark_used,
        )


def per_expert(model: nn.Module, build: Any) -> nn.Module:
    """``build(model)`` (a discriminator on ``model``'s blocks), or for :class:`WanExperts` one per expert as
    :class:`ExpertDiscriminators` (``build(transformer)``, ``build(transformer_2)``, switched at the boundary)."""
    if not isinstance(model, WanExperts):
        return build(model)
    return ExpertDiscriminators(build(model.transformer), build(model.transformer_2), model.boundary_timestep)


def _as_list(module: nn.Module) -> Any:
    """``module``'s call returning a list (a discriminator's logit maps)."""
    return lambda **kw: list(module(**kw))


def per_sample_timestep(timestep: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """``timestep`` as a ``(B,)`` tensor on the samples' device (``ValueError`` for another shape)."""
    b = hidden_states.shape[0]
    t = torch.as_tensor(timestep, device=hidden_states.device)
    if t.ndim != 1 or t.shape[0] != b:
        raise ValueError(
            f"Expected one timestep per sample ({b},) for the Wan 2.2 experts, but got shape {tuple(t.shape)}."
        )
    return t


def route(
    branches: list[Any], high: torch.Tensor, kwargs: dict[str, Any], mark_used: Any = None
) -> list[torch.Tensor]:
    """Run each sample on ``branches[0]`` where ``high`` (``(B,)`` bool) and on ``branches[1]`` elsewhere, and put
    the outputs back in sample order. A branch is called with ``kwargs`` (its tensors with the batch's first
    dimension cut to its samples) and returns a list of tensors with the batch first; a branch with the whole
    batch makes its own call. With more than one ``torch.distributed`` process a branch with no sample here runs
    on the first sample, its outputs weighted 0 (see :class:`WanExperts`); one host read per call. ``mark_used(i)``
    is called when branch ``i`` runs on real samples with gradients enabled (:func:`drop_unused_grads`)."""
    b = high.shape[0]
    n_high = int(high.sum())
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    every_branch = distributed and torch.distributed.get_world_size() > 1
    outs: list[torch.Tensor] | None = None
    anchor: Any = 0.0
    for i, (branch, mask, n) in enumerate(zip(branches, (high, ~high), (n_high, b - n_high))):
        if n and mark_used is not None and torch.is_grad_enabled():
            mark_used(i)
        if n == b:  # the whole batch: the branch's own call
            outs = list(branch(**kwargs))
        elif n:
            index = mask.nonzero().squeeze(1)
            parts = branch(**_take(kwargs, index, b))
            if outs is None:
                outs = [p.new_zeros((b, *p.shape[1:])) for p in parts]
            outs = [o.index_put((index,), p) for o, p in zip(outs, parts)]
        elif every_branch:  # no sample here, but processes stay in step: one sample, weight 0
            parts = branch(**_take(kwargs, slice(0, 1), b))
            anchor = anchor + sum(0.0 * p.nan_to_num(0.0, 0.0, 0.0).sum() for p in parts)
    assert outs is not None  # every sample is high or low noise
    if isinstance(anchor, float):
        return outs
    return [o + anchor.to(o.dtype) for o in outs]


def drop_unused_grads(accelerator: Any, params: list[Any]) -> None:
    """Before an optimiser step: set ``grad`` to None for the parameters (of ``params``) that no process used on a
    real sample with gradients enabled since the last step -- a LoRA adapter's parameters of an expert (or
    per-expert discriminator) that never ran with that adapter active, the other parameters of an expert that never
    ran -- then forget the usage. On one process such parameters have no gradient anyway; with several, the
    weight-0 pass (:func:`route`) gave them a zero gradient, on which AdamW would still take a momentum (and
    weight-decay) step that a one-process run does not: with ``grad`` None the optimiser skips them, as one process
    does. Per adapter, since two adapters of one base (a shared base's generator and fake score) may run on different
    experts in one step (SiD's generator loss differentiates through the fake score). Only the usage of ``params``'
    own adapters (and of the branches' other parameters among ``params``) is forgotten: the optimisers of one model
    step one after another (generator, fake score, GAN heads), each after all its micro-batches. One all-reduce of
    the usage flags (MAX) per call, over the routers owning any of ``params``, in construction order (the same on
    every process)."""
    _ROUTERS[:] = [ref for ref in _ROUTERS if ref() is not None]  # forget collected ones
    routers = [ref() for ref in _ROUTERS]
    if not routers:  # no two-expert model in this run: nothing to look up
        return
    ids = {id(p) for p in params}
    mine = [r for r in routers if any(id(p) in ids for m in r.branches() for p in m.parameters())]
    if not mine:
        return
    # per branch: flag 0 "ran at all", then one flag per adapter (sorted names: the same list on every process)
    branches = [(r, i, m) for r in mine for i, m in enumerate(r.branches())]
    slots = [[None, *sorted(_adapter_names(m))] for _, _, m in branches]
    flags = torch.tensor(
        [int(name in r.used[i]) for (r, i, _), names in zip(branches, slots) for name in names],
        dtype=torch.int32,
    )
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        flags = flags.to(accelerator.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    values = iter(flags.tolist())
    for (router, index, module), names in zip(branches, slots):
        ran = dict(zip(names, (next(values) for _ in names)))
        stepped: set[str | None] = set()
        for name, p in module.named_parameters():
            if id(p) in ids:
                key = _adapter_of(name, ran)
                stepped.add(key)
                if not ran[key]:
                    p.grad = None
        # forget only what this optimiser's step accounts for: another optimiser of the same model (the fake score's
        # after the generator's, the GAN heads' after the fake score's, the next micro-batches' sync) keeps its usage
        router.used[index] -= stepped


def _adapter_dict(module: nn.Module) -> Any:
    """A peft LoRA layer's ``lora_A`` (its adapters by name), or None for another module."""
    lora_a = getattr(module, "lora_A", None)
    return lora_a if isinstance(lora_a, nn.ModuleDict) and hasattr(module, "active_adapters") else None


def _adapter_names(module: nn.Module) -> set[str]:
    """The names of the peft LoRA adapters inside ``module``."""
    return {name for m in module.modules() for name in (_adapter_dict(m) or ())}


def _adapter_of(param_name: str, names: Any) -> str | None:
    """The adapter a parameter belongs to (peft names it ``...lora_A.<adapter>.weight``, ``lora_B``,
    ``lora_magnitude_vector``, ``lora_embedding_A`` ...), or None for a parameter of no adapter (``names``: the
    adapters' names)."""
    parts = param_name.split(".")
    for kind, name in itertools.pairwise(parts):
        if kind.startswith("lora_") and name in names:
            return name
    return None


def _take(kwargs: dict[str, Any], index: Any, batch: int) -> dict[str, Any]:
    """``kwargs`` with the batch's rows ``index`` of every tensor whose first dimension is ``batch``."""
    return {
        k: v[index] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch else v
        for k, v in kwargs.items()
    }


def with_expert(experts: WanExperts, name: str, module: nn.Module) -> WanExperts:
    """``experts`` with expert ``name`` (``"transformer"`` / ``"transformer_2"``) replaced by ``module`` (e.g. a
    block-removed student of it): the pipeline a one-expert distillation makes."""
    parts = dict(experts.experts())
    parts[name] = module
    return WanExperts(parts["transformer"], parts["transformer_2"], experts.boundary_timestep, track=False)


def expert_timesteps(draw: Any, model_timestep: Any, name: str, boundary: float, batch: int) -> torch.Tensor:
    """``batch`` training timesteps of expert ``name`` only: candidates from ``draw(n)`` (indices into the schedule's
    table, e.g. :func:`diffdistill.schedulers.flow_density_timesteps`), kept where ``model_timestep(t)`` (``1000
    sigma``) is in the expert's range (``transformer``: ``>= boundary``, ``transformer_2``: below), in draw order:
    the density restricted to that range (rejection sampling; a deterministic function of the generator
    ``draw`` uses)."""
    kept: list[torch.Tensor] = []
    count = 0
    for _ in range(1000):
        t = draw(4 * batch)
        high = model_timestep(t) >= boundary
        t = t[high if name == "transformer" else ~high]
        kept.append(t)
        count += len(t)
        if count >= batch:
            return torch.cat(kept)[:batch]
    raise ValueError(
        f"Drew {count} of {batch} timesteps of expert {name} (boundary {boundary}) in 1000 tries: the timestep density "
        "puts (almost) no mass on its range; use another --weighting_scheme or --logit_mean."
    )


def load_experts(cls: Any, path: str, boundary_timestep: float, **kwargs: Any) -> WanExperts:
    """Both experts of a Wan 2.2 A14B pipeline folder or hub id (``cls.from_pretrained(path, subfolder=...,
    **kwargs)``) as :class:`WanExperts`."""
    high, low = (cls.from_pretrained(path, subfolder=name, **kwargs) for name in EXPERTS)
    return WanExperts(high, low, boundary_timestep)


def boundary_timestep(index: dict[str, Any], scheduler: Any) -> float:
    """``WanPipeline``'s switch: ``boundary_ratio * scheduler.config.num_train_timesteps``."""
    return float(index["boundary_ratio"]) * float(scheduler.config.num_train_timesteps)


def split_lora(layers: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A :class:`WanExperts` LoRA state (``transformer.blocks...`` / ``transformer_2.blocks...``) as one state per
    expert, keys relative to it (what ``WanPipeline.save_lora_weights(transformer_lora_layers=...)`` takes)."""
    out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in EXPERTS}
    for key, value in layers.items():
        name, _, rest = key.partition(".")
        if name not in out:
            raise ValueError(f"Expected a LoRA key under transformer. or transformer_2., but got {key!r}.")
        out[name][rest] = value
    return out


def lora_files(output_dir: str | Path, weight_name: str) -> dict[str, Path]:
    """Where a two-expert run writes each expert's LoRA: ``weight_name`` for the high-noise expert (what
    ``pipe.load_lora_weights(output_dir, weight_name=weight_name)`` loads) and ``<stem>_transformer_2.safetensors``
    for the low-noise one (``pytorch_lora_weights_transformer_2.safetensors`` beside the default name)."""
    out, name = Path(output_dir), Path(weight_name)
    return {"transformer": out / name.name, "transformer_2": out / f"{name.stem}_transformer_2{name.suffix}"}


def write_lora(parts: Any, out: Path, layers: dict[str, Any], config: Any, weight_name: str) -> None:
    """Write LoRA ``layers`` (module keys; the adapter's peft ``config``) as ``out/weight_name`` with
    ``parts.pipeline_class.save_lora_weights`` (keys ``transformer.<module>``, the config in the metadata), which
    ``pipeline.load_lora_weights(out, weight_name=weight_name)`` loads; for Wan 2.2 A14B's experts
    (``parts.has_experts``) one file each (:func:`lora_files`; the low-noise one loads with
    ``load_into_transformer_2=True``)."""
    metadata = json.loads(json.dumps(config.to_dict(), default=sorted))
    files = lora_files(out, weight_name) if parts.has_experts else {"": out / weight_name}
    per_file = split_lora(layers) if parts.has_experts else {"": layers}
    for name, path in files.items():
        parts.pipeline_class.save_lora_weights(
            out,
            transformer_lora_layers=per_file[name],
            transformer_lora_adapter_metadata=metadata,
            weight_name=path.name,
        )
