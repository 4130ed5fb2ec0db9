"""``--compile``: the networks of a step through ``torch.compile``, one block at a time (regional compilation)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import runtime

logger = logging.getLogger(__name__)

#: The blocks compiled one by one: those diffusers' gradient checkpointing wraps in the SDXL UNet
#: (``ResnetBlock2D``, ``BasicTransformerBlock``) and in the FLUX / SD3 transformers.
REGIONS = (
    "ResnetBlock2D",
    "BasicTransformerBlock",
    "FluxTransformerBlock",
    "FluxSingleTransformerBlock",
    "JointTransformerBlock",
    "QwenImageTransformerBlock",
    "WanTransformerBlock",
)
DYNAMO_DEFAULT_RECOMPILES = 8  # torch._dynamo.config.recompile_limit's default: compiles per function


def _modules_of(network: Any) -> Iterator[nn.Module]:
    """The modules a network runs: its own, and for a shared-base view (``AdapterView.shared_base``,
    ``shared_critics.ActiveAdapter._base``) or a ``TeacherView`` (``.model``) those of the model it calls."""
    base = getattr(network, "shared_base", None) or getattr(network, "_base", None)
    if base is not None and isinstance(getattr(base, "model", None), nn.Module):
        yield from base.model.modules()
    if isinstance(network, nn.Module):
        yield from network.modules()
    elif isinstance(getattr(network, "model", None), nn.Module):
        yield from network.model.modules()


def _compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def check_engine(accelerator: Any, args: argparse.Namespace) -> None:
    """Refuse ``--compile`` under DeepSpeed ZeRO-3 (called by ``runtime.configure_deepspeed``, before any model
    loads, and by :func:`compile_networks`). Raises ``ValueError`` with the fix."""
    if getattr(args, "compile", False) and runtime.zero_stage(accelerator) == 3:
        raise ValueError(
            "--compile is not supported under DeepSpeed ZeRO-3: its parameter-fetching hooks on every layer split "
            "each compiled block into one graph per layer (and exhaust dynamo's recompile limit). Use ZeRO stage "
            "1 or 2 or FSDP2 in the accelerate config, or drop --compile."
        )


def compile_networks(
    args: argparse.Namespace,
    *networks: Any,
    whole: tuple[nn.Module | None, ...] = (),
    double_backward: tuple[Any, ...] = (),
    accelerator: Any = None,
) -> list[nn.Module]:
    """With ``--compile``, compile the blocks of ``networks`` in place (:data:`REGIONS`); without it, nothing.

    Call it once the networks are built (after any ``copy.deepcopy`` of them: ``nn.Module.__getstate__`` drops the
    compiled forward, so a copy -- e.g. a ``--use_ema`` copy made later -- runs eager) and before
    ``runtime.prepare``. ``None`` entries are skipped, a block reached twice (views of one base) is compiled once,
    and a network holding none of the blocks is left eager.

    Our choices (why), checked on the tiny SDXL UNet and the tiny FLUX transformer:

    * Regional, not whole-model: each *block* that diffusers' gradient checkpointing recomputes (SDXL's
      ``ResnetBlock2D`` / ``BasicTransformerBlock``, FLUX's ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock``,
      SD3's ``JointTransformerBlock``, Qwen-Image's ``QwenImageTransformerBlock``, Wan's ``WanTransformerBlock``) gets ``module.compile()`` -- in place, so parameter names, state dicts,
      ``accelerator.prepare`` and the checkpoints are unchanged -- and the glue between blocks (embeddings,
      samplers, the checkpoint calls) stays eager. A whole-model compile fails with ``--shared_base`` and gradient
      checkpointing: the shared base recomputes each block under its forward pass's adapter through
      ``torch.utils.checkpoint``'s ``context_fn``, which dynamo does not trace (``NotImplementedError: checkpoint
      not implemented for ... context_fn``, torch 2.14). Here the checkpoint calls a compiled block whichever
      adapter is active. Blocks of one class share their compiled code (PyTorch's regional compilation recipe;
      diffusers' ``compile_repeated_blocks``), so compiling costs a few blocks, not the network.
    * Losses and heads stay eager unless given as ``whole`` (E-LatentLPIPS is ``fullgraph``-compilable, issue 24).
      Never pass as ``whole`` a network that runs a shared base's blocks without registering them (a
      ``backbone="shared"`` discriminator): dynamo would meet the ``context_fn`` above.
    * Recompiles: dynamo guards a block on its parameters' shapes (SDXL's resnets change width between levels), the
      grad mode (teachers run under ``no_grad``), whether its input requires grad, which optional inputs are
      ``None``, and the LoRA layers' active adapter (each adapter, or all off). The per-function recompile limit
      (all blocks of one class share their code, hence one limit) is raised to dynamo's default (8) times the
      number of distinct shapes of the most varied block class times the adapter states (LoRA adapter names in
      the blocks, plus one for "off"), so these variants stay compiled instead of falling back to eager.
      Measured on the tiny FLUX of ``flow_dmd2`` (two adapters, gradient checkpointing, 2 steps): 7 variants of
      the single-stream block on one process, 11 under FSDP2, where the adapter of the view not running is
      sharded (a ``DTensor``, not a ``Parameter``: another guard) -- over the former limit of 8.
    * Engines: compiled and eager runs make the same update on one process (tests/examples/test_script_compile.py)
      and on 2 CPU processes under FSDP2 and DeepSpeed ZeRO-2 (tests/examples/test_compile_sharded.py, dynamo's
      ``eager`` backend: bitwise equal; by hand, ``aot_eager`` and inductor: gap / update <= 5.5e-4, and DDP:
      equal). Under DDP the compiled blocks sit inside the wrapped model (DDP's hooks are on the parameters).
      Under FSDP2 a block may be sharded before this call (``SharedBase.fully_shard``; FSDP2 renames its class
      ``FSDP<Name>``, hence the blocks are found by class name over the MRO) or after it, by ``prepare`` (a
      transformer-based auto-wrap policy; the compiled forward is an instance attribute and survives
      ``fully_shard``). Either way FSDP2's unshard / reshard hooks are ``torch.compiler.disable``d and run
      eagerly around the block's graph (measured: no graph break). ZeRO-2 leaves the modules alone. **ZeRO-3 is
      refused**: it fetches the partitioned weights in ``torch.compiler.disable``d forward hooks on every layer
      *inside* a block (each linear, conv, norm), so each block breaks into one graph per layer and dynamo hits
      the recompile limit (measured on the tiny SDXL UNet); DeepSpeed's own compiler is the route there.

    Args:
        args: The parsed options (``compile``, ``compile_mode``, ``compile_backend``).
        *networks: Modules, ``SharedBase`` views, ``TeacherView`` s or ``None``: their blocks are compiled.
        whole: Modules compiled whole (``None`` entries skipped), e.g. E-LatentLPIPS.
        double_backward: Networks (also given in ``networks`` or not) whose input gradient is differentiated
            again (Diffusion2GAN's exact R1): left eager, since a compiled graph's backward has no backward of
            its own (AOT autograd).
        accelerator: The run's ``Accelerator``, whose engine is checked (the scripts pass theirs); ``None``: one
            process without accelerate (the benchmarks).

    Raises:
        ValueError: a ``double_backward`` network runs blocks of another of ``networks`` (a shared base); the run
            is DeepSpeed ZeRO-3.

    Returns:
        The modules compiled by this call (empty without ``--compile``).
    """
    if not getattr(args, "compile", False):
        return []
    if accelerator is not None:
        check_engine(accelerator, args)
    mode = None if args.compile_mode == "default" else args.compile_mode
    eager = {id(m) for n in double_backward for m in _modules_of(n)}
    targets: dict[int, nn.Module] = {}
    for network in networks:
        if network is None or any(network is n for n in double_backward):
            continue
        # By class name over the MRO: FSDP2's fully_shard swaps a module's class for an "FSDP<Name>" subclass.
        blocks = [m for m in _modules_of(network) if any(c.__name__ in REGIONS for c in type(m).__mro__)]
        if any(id(m) in eager for m in blocks):
            raise ValueError(
                f"--compile: {type(network).__name__} shares its blocks with a network differentiated twice (exact "
                "R1), which torch.compile's graphs do not support (one shared base): pass --r1_approximate_sigma "
                "(APT's finite-difference R1, plain forwards), or drop --compile."
            )
        if not blocks:
            logger.debug("--compile: %s holds none of %s: left eager", type(network).__name__, REGIONS)
        targets.update((id(b), b) for b in blocks)
    targets.update((id(m), m) for m in whole if m is not None)
    done: list[nn.Module] = []
    shapes: dict[str, set[tuple[Any, ...]]] = {}
    adapters: set[str] = set()
    for module in targets.values():
        shapes.setdefault(type(module).__qualname__, set()).add(
            tuple(tuple(p.shape) for p in module.parameters())
        )
        adapters.update(_lora_adapters(module))
        if not _compiled(module):
            module.compile(backend=args.compile_backend, mode=mode)
            done.append(module)
    limit = (
        DYNAMO_DEFAULT_RECOMPILES * max((len(s) for s in shapes.values()), default=1) * (len(adapters) + 1)
    )
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    logger.info(
        "torch.compile (backend %s, mode %s): %d blocks of %s, LoRA adapters %s; recompile limit %d",
        args.compile_backend,
        args.compile_mode,
        len(done),
        sorted(shapes),
        sorted(adapters),
        torch._dynamo.config.recompile_limit,
    )
    return done


def _lora_adapters(module: nn.Module) -> set[str]:
    """The names of the (peft) LoRA adapters inside ``module``: the keys of its LoRA layers' ``lora_A``."""
    names: set[str] = set()
    for m in module.modules():
        lora_a = getattr(m, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict):
            names.update(lora_a.keys())
    return names
