"""``--compile``: the networks of a step through ``torch.compile``, one block at a time (regional compilation)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: The blocks compiled one by one: those diffusers' gradient checkpointing wraps in the SDXL UNet
#: (``ResnetBlock2D``, ``BasicTransformerBlock``) and in the FLUX / SD3 transformers.
REGIONS = (
    "ResnetBlock2D",
    "BasicTransformerBlock",
    "FluxTransformerBlock",
    "FluxSingleTransformerBlock",
    "JointTransformerBlock",
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


def compile_networks(
    args: argparse.Namespace,
    *networks: Any,
    whole: tuple[nn.Module | None, ...] = (),
    double_backward: tuple[Any, ...] = (),
) -> list[nn.Module]:
    """With ``--compile``, compile the blocks of ``networks`` in place (:data:`REGIONS`); without it, nothing.

    Call it once the networks are built (after any ``copy.deepcopy`` of them: ``nn.Module.__getstate__`` drops the
    compiled forward, so a copy -- e.g. a ``--use_ema`` copy made later -- runs eager) and before
    ``runtime.prepare``. ``None`` entries are skipped, a block reached twice (views of one base) is compiled once,
    and a network holding none of the blocks is left eager.

    Our choices (why), checked on the tiny SDXL UNet and the tiny FLUX transformer:

    * Regional, not whole-model: each *block* that diffusers' gradient checkpointing recomputes (SDXL's
      ``ResnetBlock2D`` / ``BasicTransformerBlock``, FLUX's ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock``,
      SD3's ``JointTransformerBlock``) gets ``module.compile()`` -- in place, so parameter names, state dicts,
      ``accelerator.prepare`` and the checkpoints are unchanged -- and the glue between blocks (embeddings,
      samplers, the checkpoint calls) stays eager. A whole-model compile fails with ``--shared_base`` and gradient
      checkpointing: the shared base recomputes each block under its forward pass's adapter through
      ``torch.utils.checkpoint``'s ``context_fn``, which dynamo does not trace (``NotImplementedError: checkpoint
      not implemented for ... context_fn``, torch 2.14). Here the checkpoint calls a compiled block whichever
      adapter is active. Blocks of one class share their compiled code (PyTorch's regional compilation recipe;
      diffusers' ``compile_repeated_blocks``), so compiling costs a few blocks, not the network.
    * Recompiles: dynamo guards a block on its parameters' shapes (SDXL's resnets change width between levels), the
      grad mode (teachers run under ``no_grad``), whether its input requires grad, and the LoRA layers' active
      adapter. The per-function recompile limit is raised to dynamo's default (8) times the number of distinct
      shapes of the most varied block class, so these variants stay compiled instead of falling back to eager.
    * Losses and heads stay eager unless given as ``whole`` (E-LatentLPIPS is ``fullgraph``-compilable, issue 24).
      Never pass as ``whole`` a network that runs a shared base's blocks without registering them (a
      ``backbone="shared"`` discriminator): dynamo would meet the ``context_fn`` above.
    * Engines: tested on one process (CPU, dynamo's ``eager`` backend in the suite, ``aot_eager`` by hand); under
      DDP the compiled blocks sit inside the wrapped model (DDP's hooks are on the parameters); FSDP2 and DeepSpeed
      with ``--compile`` are untested.

    Args:
        args: The parsed options (``compile``, ``compile_mode``, ``compile_backend``).
        *networks: Modules, ``SharedBase`` views, ``TeacherView`` s or ``None``: their blocks are compiled.
        whole: Modules compiled whole (``None`` entries skipped), e.g. E-LatentLPIPS.
        double_backward: Networks (also given in ``networks`` or not) whose input gradient is differentiated
            again (Diffusion2GAN's exact R1): left eager, since a compiled graph's backward has no backward of
            its own (AOT autograd).

    Raises:
        ValueError: a ``double_backward`` network runs blocks of another of ``networks`` (a shared base).

    Returns:
        The modules compiled by this call (empty without ``--compile``).
    """
    if not getattr(args, "compile", False):
        return []
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
    for module in targets.values():
        shapes.setdefault(type(module).__qualname__, set()).add(
            tuple(tuple(p.shape) for p in module.parameters())
        )
        if not _compiled(module):
            module.compile(backend=args.compile_backend, mode=mode)
            done.append(module)
    limit = DYNAMO_DEFAULT_RECOMPILES * max((len(s) for s in shapes.values()), default=1)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    logger.info(
        "torch.compile (backend %s, mode %s): %d blocks of %s; recompile limit %d",
        args.compile_backend,
        args.compile_mode,
        len(done),
        sorted(shapes),
        torch._dynamo.config.recompile_limit,
    )
    return done
