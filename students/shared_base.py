"""One frozen base network shared by a teacher, a fake score and a generator, each a named LoRA adapter.

Score-distillation methods keep three networks of the teacher's size: the frozen teacher (the *real* score),
a trainable *fake* score, and the one-step generator (SIM, Luo et al. 2024, arXiv:2410.16794, Sec. 3 / Alg. 1;
SiD, Zhou et al. 2024, arXiv:2404.04057; DMD / DMD2, Yin et al. 2024, arXiv:2311.18828 / 2405.14867).
When the generator and the fake score are LoRAs of the teacher (as LCM-LoRA, Luo et al. 2023,
arXiv:2311.05556, and DMD2's SDXL LoRA runs train them), all three are the *same* base weights with a
different set of adapters switched on: the real score with none, the fake score with its adapter, the
generator with its own. :class:`SharedBase` holds that one base and hands out :class:`AdapterView` callables:

* ``base.view("generator")`` / ``base.view("fake")``: the base with only that adapter active. Its
  ``parameters()`` / ``state_dict()`` are the adapter's weights only (the very ``Parameter`` objects of the
  base's LoRA layers, under their peft file names ``<module>.lora_A.weight``), so an optimiser,
  ``accelerator.prepare``, DDP or FSDP2 given the view sees that adapter and nothing else.
* ``base.view(None)``: every adapter off (the teacher / real score; no parameters; gradients still reach
  its input, as SIM / SiD need).
* ``with base.active("fake"): ...``: run the model or any of its submodules (a discriminator's feature
  extractor that calls ``unet.down_blocks``) under one adapter (``None``: under none).

Our choices (why):

* Switching adapters flips the peft tuner layers' active-adapter and disabled state directly and never
  touches ``requires_grad`` (peft's ``set_adapter`` / ``enable_adapters`` would: the fake score would be
  frozen by running the generator). Every LoRA weight is made trainable once, at construction; every other
  weight is frozen and the base is put in eval mode (conventions 6). A test pins the peft internals used.
* The active adapter is a property of each call: a view restores the previous state when it returns, so
  calls nest (the fake score called inside the generator's loss, the real score inside ``active("fake")``).
  Outside any call the base runs with every adapter off.
* Gradient checkpointing (:meth:`SharedBase.enable_gradient_checkpointing`) recomputes each block in the
  backward pass under the adapter that was active when the block ran forward (torch's ``checkpoint`` with a
  ``context_fn``); plain ``model.enable_gradient_checkpointing()`` would recompute under whatever is active
  during the backward pass, so a view refuses to run on a model checkpointed that way.
* As with any checkpointing, keep the ``requires_grad`` flags of the forward pass until its backward has run
  (e.g. call ``backward`` inside ``frozen(fake)``, as :class:`~diffdistill.losses.AlternatingUpdate` does): a
  recomputation with other flags saves other tensors, which torch's checkpoint rejects.
* Move the model to its device before making views: ``accelerator.prepare(view)`` moves only the adapter.
* Distributed: each trained view is prepared with its own optimiser (DDP or FSDP2 then hold only that adapter);
  the base stays replicated, or under FSDP2 is sharded once by :meth:`SharedBase.fully_shard` (tested on 2 CPU
  processes both ways).

peft is needed (``pip install 'diffdistill[train]'``); diffusers only for models that are diffusers models.
"""

from __future__ import annotations

import contextlib
import logging
import re
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .._checks import DTypeError, OptionError, check_mapping, check_module
from .._modules import shard_frozen, unwrap_model
from .lora import _check_adapter_name, _trained_with_adapters, _tuner_layers, add_lora, save_lora

__all__ = ["AdapterView", "SharedBase"]

logger = logging.getLogger(__name__)

# The peft tuner-layer attributes this module reads and writes (pinned by tests/students/test_shared_base.py):
# ``_active_adapter`` (what ``active_adapters`` returns), ``_disable_adapters`` (what ``disable_adapters``
# returns), ``merged_adapters`` and the per-adapter ``lora_A`` / ``lora_B`` / ``lora_dropout`` /
# ``lora_magnitude_vector`` dicts.
_PEFT_ATTRIBUTES = (
    "_active_adapter",
    "_disable_adapters",
    "merged_adapters",
    "lora_A",
    "lora_B",
    "lora_dropout",
)
_UNSUPPORTED = ("lora_embedding_A", "lora_embedding_B")


def _adapter_configs(inner: nn.Module) -> dict[str, Any]:
    return dict(getattr(inner, "peft_config", None) or {})


class _Recompute:
    """Context of a checkpointed block's recomputation: ``state`` active inside, the previous state after.

    Re-enterable (a stack of previous states), unlike a generator context: a double backward (exact R1's
    ``autograd.grad(..., create_graph=True)`` then ``backward``) recomputes the same block twice.

    Args:
        base: The :class:`SharedBase` to switch.
        state: The adapter that was active in the block's forward pass (``None``: none).
    """

    def __init__(self, base: SharedBase, state: str | None) -> None:
        self._base = base
        self._state = state
        self._previous: list[str | None] = []

    def __enter__(self) -> None:
        self._previous.append(self._base._state)
        self._base._switch(self._state)

    def __exit__(self, *exc: object) -> None:
        self._base._switch(self._previous.pop())


class _AdapterCheckpoint:
    """The ``gradient_checkpointing_func`` of a shared base: torch's non-reentrant checkpoint whose recomputation
    runs under the adapter that was active in the forward pass (``context_fn``). Holds the base weakly (the
    model holds this object), and ``deepcopy`` keeps it as is.

    Args:
        base: The :class:`SharedBase` whose adapter state travels with each checkpointed block.
    """

    def __init__(self, base: SharedBase) -> None:
        self._base = weakref.ref(base)

    def __deepcopy__(self, memo: dict[int, Any]) -> _AdapterCheckpoint:
        return self

    def __call__(self, module: Any, *args: Any, **kwargs: Any) -> Any:
        base = self._base()
        if (
            base is None
        ):  # the SharedBase is gone: an ordinary checkpoint (nothing switches adapters any more)
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, **kwargs)
        state = base._state

        def context_fn() -> tuple[
            contextlib.AbstractContextManager[Any], contextlib.AbstractContextManager[Any]
        ]:
            return contextlib.nullcontext(), _Recompute(base, state)

        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False, context_fn=context_fn, **kwargs
        )


class SharedBase:
    """A frozen base network with named LoRA adapters, handed out as independent callables (:class:`AdapterView`).

    The real score / teacher is ``view(None)`` (every adapter off), the fake score and the generator are
    ``view("fake")`` and ``view("generator")`` -- one copy of the base weights instead of three (SIM Sec. 3,
    SiD, DMD2 keep three networks; see the module docstring for why this is safe). Gradients reach only the
    adapter of the view that ran (the other adapters are not in its graph; the base is frozen). Under DDP or
    FSDP2 prepare each trained view with its own optimiser, ``accelerator.prepare(gen, opt_g)``,
    ``accelerator.prepare(fake, opt_f)``: the base is not a submodule of any view, so it stays replicated, or,
    under FSDP2, is sharded once by :meth:`fully_shard` before the views are prepared.

    Construction makes every LoRA weight trainable, freezes every other weight and puts the base in eval mode
    (a view's ``train()`` switches only its adapter's dropout). Outside any view call the model runs with every
    adapter off.

    Args:
        model: A network with peft LoRA adapters (:func:`~diffdistill.students.add_lora` with ``adapter_name``,
            diffusers' ``add_adapter`` / ``load_lora_adapter``), or one to which ``adapters`` adds them. Wrappers
            are unwrapped for the layer search; ``model`` itself is what the views call.
        adapters: ``{name: add_lora options}`` of adapters to add first, e.g. ``{"generator": {"rank": 64},
            "fake": {"rank": 64, "targets": [...]}}`` (``rank``, ``alpha``, ``targets``, ``dropout``,
            ``init_lora_weights`` of :func:`~diffdistill.students.add_lora`). Defaults to ``None``: use the
            adapters the model has.

    Raises:
        DTypeError: ``model`` is not an ``nn.Module``; ``adapters`` is not a mapping of mappings.
        OptionError: the model has no LoRA adapter; an adapter is merged into the base, or adapts an embedding
            layer (not supported); the model has a guidance embedding trained with the adapters (which adapter
            would own it is ambiguous); the installed peft lacks the layer attributes this class switches; an
            ``adapters`` entry is refused by ``add_lora``.
        ImportError: peft is not installed.

    Example:
        >>> from diffdistill.students import SharedBase
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.SiLU(), torch.nn.Linear(3, 3))
        >>> base = SharedBase(net, adapters={"generator": {"rank": 2, "targets": ["0", "2"],
        ...     "init_lora_weights": False}, "fake": {"rank": 1, "targets": ["2"], "init_lora_weights": False}})
        >>> gen, fake, real = base.view("generator"), base.view("fake"), base.view(None)
        >>> sorted(name for name, _ in fake.named_parameters())
        ['2.lora_A.weight', '2.lora_B.weight']
        >>> z = torch.randn(4, 3)
        >>> x = gen(z)
        >>> (real(x) - fake(x)).square().mean().backward()
        >>> [p.grad is not None for p in gen.parameters()], net[0].base_layer.weight.grad is None
        ([True, True, True, True], True)
    """

    def __init__(self, model: nn.Module, adapters: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        check_module(model, "model")
        inner: Any = unwrap_model(model)
        if adapters is not None:
            for name, options in check_mapping(
                adapters,
                "adapters",
                what="adapter names to add_lora options",
                example="{'fake': {'rank': 64}}",
            ).items():
                opts = check_mapping(
                    options, f"adapters[{name!r}]", what="add_lora options", example="{'rank': 64}"
                )
                if "adapter_name" in opts or "freeze_base" in opts:
                    raise OptionError(
                        f"Expected `adapters[{name!r}]` to hold add_lora options other than adapter_name and "
                        f"freeze_base (the key is the name; the base is always frozen), but got {sorted(opts)}."
                    )
                add_lora(inner, adapter_name=_check_adapter_name(name), **opts)
        layers = [m for _, m in _tuner_layers(inner)]
        configs = _adapter_configs(inner)
        if not layers or not configs:
            raise OptionError(
                f"Expected `model` ({type(inner).__name__}) to have LoRA adapters, but it has none (never added, or "
                "removed by merge_lora). Add them first, add_lora(model, adapter_name='fake', ...), or pass "
                "adapters={'generator': {'rank': 64}, 'fake': {'rank': 64}}."
            )
        for layer in layers:
            missing = [a for a in _PEFT_ATTRIBUTES if not hasattr(layer, a)]
            if missing:  # pragma: no cover - a peft upgrade renamed its internals
                raise OptionError(
                    f"Expected peft's LoRA layers ({type(layer).__name__}) to have {missing}, which SharedBase "
                    "switches directly; this peft version does not. Install a peft version this release was tested "
                    "with (see pyproject.toml)."
                )
            if any(getattr(layer, a, None) for a in _UNSUPPORTED):
                raise OptionError(
                    f"Expected LoRA adapters on linear / conv layers, but {type(layer).__name__} adapts an "
                    "embedding (lora_embedding_A), which SharedBase does not support. Leave embeddings out of "
                    "`targets`."
                )
        self.model = model
        self._inner = inner
        self._layers = layers
        self._state: str | None = None
        self._views: dict[str | None, AdapterView] = {}
        self._checkpoint = _AdapterCheckpoint(self)
        self._checkpointed = [m for m in inner.modules() if hasattr(m, "gradient_checkpointing")]
        self._check_layers(None)
        extras = _trained_with_adapters(inner)
        if extras:
            raise OptionError(
                f"Expected no guidance embedding trained with the adapters (it is shared by every adapter, so no "
                f"view could own it), but {[n for n, _ in extras]} is marked so. Build the shared base from a "
                "model without add_guidance_embedding, or train that student without SharedBase."
            )
        for name, param in inner.named_parameters():
            param.requires_grad_("lora_" in name)
        inner.eval()
        self._switch(None)
        logger.info("shared base %s with adapters %s", type(inner).__name__, self.adapter_names)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The adapters of the model (sorted names)."""
        return tuple(sorted(_adapter_configs(self._inner)))

    def _check_layers(self, adapter_name: str | None) -> None:
        """Refuse an adapter that was removed, or layers merged or replaced since construction."""
        configs = _adapter_configs(self._inner)
        if not configs:
            raise OptionError(
                "Expected the model to keep its LoRA layers, but they were removed (merge_lora / unload) after the "
                "SharedBase was built. Build a new SharedBase from a model with adapters."
            )
        if adapter_name is not None and adapter_name not in configs:
            raise OptionError(
                f"Expected `adapter_name` to be one of the model's adapters {list(self.adapter_names)} (or None for "
                f"every adapter off), but got {adapter_name!r}: it was never added, or was deleted or merged since. "
                "Add it with add_lora(model, adapter_name=...) before building the SharedBase."
            )
        for layer in self._layers:
            if layer.merged_adapters:
                raise OptionError(
                    f"Expected unmerged LoRA layers, but adapter(s) {layer.merged_adapters} are merged into the base "
                    "weights (peft merge): every view would run them. Unmerge them (layer.unmerge()) or build the "
                    "SharedBase from an unmerged model."
                )

    def _switch(self, adapter_name: str | None) -> None:
        """Set every tuner layer to run ``adapter_name`` only (``None``: no adapter) without touching
        ``requires_grad``."""
        active = [adapter_name] if adapter_name is not None else None
        for layer in self._layers:
            if active is not None:
                layer._active_adapter = active
            layer._disable_adapters = active is None
        self._state = adapter_name

    @contextlib.contextmanager
    def _switched(self, adapter_name: str | None) -> Iterator[None]:
        """``adapter_name`` active inside the block, the previous state after (no checks: checkpoint recompute)."""
        previous = self._state
        self._switch(adapter_name)
        try:
            yield
        finally:
            self._switch(previous)

    def _check_checkpointing(self) -> None:
        for module in self._checkpointed:
            if getattr(module, "gradient_checkpointing", False) is True and (
                getattr(module, "_gradient_checkpointing_func", None) is not self._checkpoint
            ):
                raise OptionError(
                    f"Expected gradient checkpointing of a shared base to be switched on by "
                    f"SharedBase.enable_gradient_checkpointing(), but {type(module).__name__} was checkpointed "
                    "another way (model.enable_gradient_checkpointing()): its backward pass would recompute blocks "
                    "under the wrong adapter. Call base.enable_gradient_checkpointing() instead."
                )

    @contextlib.contextmanager
    def active(self, adapter_name: str | None) -> Iterator[nn.Module]:
        """Context in which the model (and any of its submodules) runs with only ``adapter_name`` active.

        The previous state comes back on exit, so blocks nest. ``requires_grad`` flags are not touched.

        Args:
            adapter_name: An adapter of the model, or ``None`` for every adapter off (the teacher / real score;
                a discriminator's frozen features).

        Yields:
            The model (what :class:`SharedBase` was built with).

        Raises:
            DTypeError: ``adapter_name`` is neither a string nor None.
            OptionError: ``adapter_name`` is not (or no longer) an adapter of the model; its layers were merged
                or removed; gradient checkpointing was switched on other than by
                :meth:`enable_gradient_checkpointing`.

        Example:
            >>> from diffdistill.students import SharedBase
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
            >>> base = SharedBase(net, adapters={"fake": {"rank": 1, "targets": ["0"]}})
            >>> with base.active("fake") as model:
            ...     model[0].active_adapters, model[0].disable_adapters
            (['fake'], False)
            >>> net[0].disable_adapters
            True
        """
        if adapter_name is not None:
            _check_adapter_name(adapter_name)
        self._check_layers(adapter_name)
        self._check_checkpointing()
        with self._switched(adapter_name):
            yield self.model

    def view(self, adapter_name: str | None) -> AdapterView:
        """The model with only ``adapter_name`` active, as an ``nn.Module`` holding that adapter's weights.

        Args:
            adapter_name: An adapter of the model, or ``None`` for every adapter off (no parameters).

        Returns:
            The :class:`AdapterView` of that adapter (the same object on every call).

        Raises:
            DTypeError: ``adapter_name`` is neither a string nor None.
            OptionError: ``adapter_name`` is not an adapter of the model.

        Example:
            >>> from diffdistill.students import SharedBase
            >>> base = SharedBase(torch.nn.Sequential(torch.nn.Linear(2, 2)), adapters={"g": {"rank": 1,
            ...     "targets": ["0"]}})
            >>> [n for n, _ in base.view("g").named_parameters()], list(base.view(None).parameters())
            (['0.lora_A.weight', '0.lora_B.weight'], [])
        """
        if adapter_name is not None:
            _check_adapter_name(adapter_name)
        self._check_layers(adapter_name)
        if adapter_name not in self._views:
            self._views[adapter_name] = AdapterView(self, adapter_name)
        return self._views[adapter_name]

    def enable_gradient_checkpointing(self) -> None:
        """Switch on the model's gradient checkpointing so each block is recomputed in the backward pass under the
        adapter that was active when it ran forward.

        diffusers' ``enable_gradient_checkpointing(gradient_checkpointing_func=...)`` with torch's non-reentrant
        ``checkpoint`` whose ``context_fn`` re-activates that adapter for the recomputation (our choice: the
        views' calls have returned by the time backward runs, so the state must travel with each block).

        Raises:
            OptionError: the model has no ``enable_gradient_checkpointing(gradient_checkpointing_func=...)`` (not a
                diffusers model).

        Example:
            >>> from diffusers import UNet2DConditionModel
            >>> from diffdistill.discriminators import tiny_sdxl_unet_config
            >>> from diffdistill.students import SharedBase
            >>> base = SharedBase(UNet2DConditionModel(**tiny_sdxl_unet_config()), adapters={"fake": {"rank": 2}})
            >>> base.enable_gradient_checkpointing()
            >>> base.model.is_gradient_checkpointing
            True
        """
        enable = getattr(self._inner, "enable_gradient_checkpointing", None)
        if not callable(enable):
            raise OptionError(
                f"Expected a diffusers model with enable_gradient_checkpointing(gradient_checkpointing_func=...), but "
                f"{type(self._inner).__name__} has none. Checkpoint its blocks yourself with torch.utils.checkpoint "
                "inside `with base.active(name):` and a context_fn that re-enters it."
            )
        enable(gradient_checkpointing_func=self._checkpoint)

    def fully_shard(self, **kwargs: Any) -> None:
        """Shard the frozen base weights over the processes with FSDP2 (``fully_shard``), leaving the adapters to
        the views.

        Each block named in the model's ``_no_split_modules`` (diffusers: resnet / transformer blocks) and then the
        model itself become FSDP2 modules over their frozen weights; every LoRA weight is an ``ignored_params``
        entry, so ``accelerator.prepare(view, optimizer)`` (FSDP2) shards each adapter with its own view and
        optimiser. Call it after moving the model to its device and before preparing the views. Our choice (why):
        the frozen base dominates memory (FLUX.1: 22 GiB in bf16) and no optimiser owns it, so it is sharded once
        here rather than by any view.

        Args:
            **kwargs: ``fully_shard`` options (``mesh``, ``reshard_after_forward``, ``mp_policy``,
                ``offload_policy``); ``ignored_params`` is set here.

        Raises:
            OptionError: ``ignored_params`` is passed; torch has no FSDP2; the process group is not initialised.

        Example:
            >>> from diffdistill.students import SharedBase
            >>> base = SharedBase(torch.nn.Sequential(torch.nn.Linear(2, 2)), adapters={"g": {"rank": 1,
            ...     "targets": ["0"]}})
            >>> base.fully_shard()  # doctest: +SKIP
        """
        if "ignored_params" in kwargs:
            raise OptionError(
                "Expected fully_shard options other than `ignored_params`: SharedBase ignores the LoRA weights "
                "itself (the views shard them)."
            )
        lora = [p for n, p in self._inner.named_parameters() if "lora_" in n]
        shard_frozen(self._inner, ignored_params=lora, **kwargs)

    def __repr__(self) -> str:
        return f"SharedBase({type(self._inner).__name__}, adapters={list(self.adapter_names)})"


class AdapterView(nn.Module):
    """The shared base with one adapter active (``None``: none), holding only that adapter's weights.

    Made by :meth:`SharedBase.view`. ``view(*args, **kwargs)`` returns what the model returns. The base is not
    a registered submodule: ``parameters()``, ``state_dict()``, ``to()``, ``train()`` and any wrapper (DDP,
    FSDP2, accelerate) see only the adapter's LoRA layers, under peft's file names
    (``<module>.lora_A.weight``; the state dict is what :func:`~diffdistill.students.save_lora` writes without
    its prefix). The view of ``None`` has no parameters (do not ``prepare`` it; call it directly).

    Args:
        base: The :class:`SharedBase`.
        adapter_name: The adapter, or ``None``.

    Raises:
        DTypeError: ``base`` is not a :class:`SharedBase`.
    """

    def __init__(self, base: SharedBase, adapter_name: str | None) -> None:
        if not isinstance(base, SharedBase):
            raise DTypeError(
                f"Expected `base` to be a SharedBase, but got {type(base).__name__}; use SharedBase(model).view(name)."
            )
        super().__init__()
        self.shared_base = base
        self.adapter_name = adapter_name
        if adapter_name is None:
            return
        for path, layer in _tuner_layers(base._inner):
            if adapter_name not in layer.lora_A:
                continue
            leaf: nn.Module = self
            for part in path.split("."):
                child = leaf._modules.get(part)
                if child is None:
                    if hasattr(leaf, part):
                        raise OptionError(
                            f"Expected module names that do not clash with AdapterView's attributes, but the "
                            f"model's `{path}` uses `{part}`."
                        )
                    child = nn.Module()
                    leaf.add_module(part, child)
                leaf = child
            leaf.add_module("lora_A", layer.lora_A[adapter_name])
            leaf.add_module("lora_B", layer.lora_B[adapter_name])
            leaf.add_module("lora_dropout", layer.lora_dropout[adapter_name])
            magnitude = getattr(layer, "lora_magnitude_vector", None) or {}
            if adapter_name in magnitude:
                leaf.add_module("lora_magnitude_vector", magnitude[adapter_name])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the base model with only this view's adapter active.

        Args:
            *args: The model's positional arguments.
            **kwargs: The model's keyword arguments.

        Returns:
            What the model returns.
        """
        with self.shared_base.active(self.adapter_name) as model:
            return model(*args, **kwargs)

    @property
    def config(self) -> Any:
        """The base model's ``config`` (a diffusers model's), so code that reads ``model.config`` (a pipeline, a
        wrapper such as the examples' ``FlowDenoiser``) takes a view as it takes the model.

        Raises:
            AttributeError: the base model has no ``config``.
        """
        return self.shared_base._inner.config

    def save(
        self, path: Any, *, prefix: str = "unet", state_dict: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Save this adapter alone as a diffusers LoRA safetensors file (:func:`~diffdistill.students.save_lora`).

        Args:
            path: The ``.safetensors`` file to write (its folder must exist).
            prefix: Key prefix (default ``"unet"``; ``"transformer"`` for SD3 / FLUX pipelines; ``""``: bare keys).
            state_dict: Values to write instead of the weights: this view's state dict as a sharded run gathers
                it (``accelerator.get_state_dict(view)``, keys ``<module>.lora_A.weight``). Defaults to ``None``.

        Raises:
            OptionError: this is the view of ``None`` (no adapter to save).
        """
        if self.adapter_name is None:
            raise OptionError(
                "Expected the view of an adapter, but this is the view of None (no weights to save)."
            )
        full = None
        if state_dict is not None:
            part = f".{self.adapter_name}."
            full = {
                re.sub(
                    r"\.(lora_A|lora_B|lora_magnitude_vector)\.", lambda m: f".{m.group(1)}{part}", k, count=1
                ): v
                for k, v in state_dict.items()
            }
        save_lora(
            self.shared_base.model, path, adapter_name=self.adapter_name, prefix=prefix, state_dict=full
        )

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}, base={type(self.shared_base._inner).__name__}"
