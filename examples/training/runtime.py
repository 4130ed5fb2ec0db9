"""The accelerate / DeepSpeed / FSDP runtime: accelerator, optimisers, backward, autocast, clipping."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import wan_experts

logger = logging.getLogger(__name__)


def weight_dtype_of(accelerator: Any) -> torch.dtype:
    """The dtype of frozen weights under the accelerator's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_accelerator(
    args: argparse.Namespace, project_name: str, *, find_unused_parameters: bool = False
) -> Any:
    """``Accelerator`` with mixed precision, gradient accumulation and trackers from ``args``; the scripts' log lines
    at INFO on the main process (``logging.basicConfig``, unless logging is configured already).

    Refuses a run without ``--resume_from_checkpoint`` into an ``--output_dir`` that holds checkpoints
    (:func:`training.options.check_output_dir`). ``find_unused_parameters``: DDP's option of that name, for a model part of whose trainable weights get no
    gradient in some steps (e.g. one of two LoRA adapters frozen mid-run); it costs a graph walk per step.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    from . import options

    options.check_output_dir(args)  # before any model loads, and before this run writes into the folder
    out = Path(args.output_dir)
    report_to = None if args.report_to in (None, "none") else args.report_to
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=handlers,
    )
    # The scripts' recipe and progress lines (logger.info) on the main process, warnings only on the others (as
    # diffusers' training scripts); a no-op when the root logger already has a handler (e.g. under pytest).
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    check_fsdp_version(accelerator)
    check_accumulation(accelerator, args)
    if distributed_kind(accelerator) == "DEEPSPEED":
        configure_deepspeed(accelerator, args)
    if report_to is not None:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name or project_name, config=config)
    return accelerator


def check_accumulation(accelerator: Any, args: argparse.Namespace) -> None:
    """Refuse a gradient accumulation that differs from ``--gradient_accumulation_steps``.

    The scripts run ``--gradient_accumulation_steps`` micro-batches per optimisation step, and accelerate
    decides when gradients are synchronised (and, under DeepSpeed, when the engines step) from its own
    count, which an accelerate DeepSpeed config sets (``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``, 1 unless
    changed) and a DeepSpeed config file may set too: a mismatch would step the optimisers at every
    micro-batch.
    """
    wanted = int(args.gradient_accumulation_steps)
    found = {
        "the accelerate config (ACCELERATE_GRADIENT_ACCUMULATION_STEPS)": accelerator.gradient_accumulation_steps
    }
    if distributed_kind(accelerator) == "DEEPSPEED":
        found["the DeepSpeed config"] = accelerator.state.deepspeed_plugin.get_value(
            "gradient_accumulation_steps"
        )
    for where, value in found.items():
        if value not in (None, "auto") and int(value) != wanted:
            raise ValueError(
                f"Expected the gradient accumulation of {where} to be --gradient_accumulation_steps = {wanted}, "
                f'but it is {value}: set gradient_accumulation_steps to {wanted} there (or to "auto" in a '
                f"DeepSpeed config file), or pass --gradient_accumulation_steps {value}."
            )


def check_fsdp_version(accelerator: Any) -> None:
    """Refuse FSDP1: the scripts' FSDP handling (:func:`diffdistill.students.frozen`, ``reshard``, EMAs of
    ``DTensor`` shards, one ``prepare`` per model) is written for and tested with FSDP2 (``fully_shard``)."""
    if distributed_kind(accelerator) == "FSDP" and not accelerator.is_fsdp2:
        raise ValueError(
            "These scripts support FSDP2 only, but the accelerate config selects FSDP1: set "
            "fsdp_version: 2 in the accelerate config, or launch with `accelerate launch --use_fsdp "
            "--fsdp_version 2 ...` (or use DDP or DeepSpeed)."
        )


def configure_deepspeed(accelerator: Any, args: argparse.Namespace) -> None:
    """Fit accelerate's DeepSpeed config to the scripts (called by :func:`make_accelerator`).

    - The ``"auto"`` (or absent) micro batch and clipping come from ``--train_batch_size`` and ``--max_grad_norm``
      (accelerate would read the batch from a prepared ``DataLoader``, which the scripts do not use -- they
      draw their batches themselves, :class:`StepSource` -- and clip at 1.0). Values the user's DeepSpeed
      config sets explicitly win (DeepSpeed applies them); a differing one is logged.
    - ZeRO-3 gathers the partitioned weights when the final model is written
      (``stage3_gather_16bit_weights_on_model_save``; without it ``get_state_dict`` refuses). The weights
      are written in the engine's parameter dtype: bf16 under ``--mixed_precision bf16``.
    - ``--use_ema`` is refused under ZeRO-3: the average is kept of the student's parameters in place, and
      ZeRO-3 leaves each process only a flat slice of them (use ZeRO-1/2 or FSDP for an EMA); so is ``--compile``
      (``training.compilation.check_engine``).
    """
    from . import compilation

    compilation.check_engine(accelerator, args)  # --compile under ZeRO-3
    plugin = accelerator.state.deepspeed_plugin
    if zero_stage(accelerator) == 3:
        if args.use_ema:
            raise ValueError(
                "--use_ema is not supported under DeepSpeed ZeRO-3 (each process holds only a flat slice of "
                "the student's parameters): use ZeRO stage 1 or 2, or FSDP, in the accelerate config, or "
                "drop --use_ema."
            )
        plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    # accelerate derives train_batch_size (micro x accumulation x processes) from the micro batch.
    wanted = {
        "train_micro_batch_size_per_gpu": int(args.train_batch_size),
        "gradient_clipping": float(args.max_grad_norm or 0.0),
    }
    for key, value in wanted.items():
        if plugin.get_value(key) in (None, "auto"):  # absent: DeepSpeed's defaults are 1 and no clipping
            plugin.deepspeed_config[key] = value
        elif plugin.get_value(key) != value:
            logger.warning(
                "The DeepSpeed config sets %s = %s (used); the script's options give %s.",
                key,
                plugin.get_value(key),
                value,
            )


def adamw(
    params: Sequence[nn.Parameter] | Any,
    args: argparse.Namespace,
    lr: float | None = None,
    *,
    betas: tuple[float, float] | None = None,
    weight_decay: float | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with the shared options (``lr`` / ``betas`` / ``weight_decay``
    given here override ``--learning_rate``, ``--adam_beta1/2`` and ``--adam_weight_decay``)."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("Expected trainable parameters, but every parameter has requires_grad=False.")
    return torch.optim.AdamW(
        trainable,
        lr=args.learning_rate if lr is None else lr,
        betas=(args.adam_beta1, args.adam_beta2) if betas is None else betas,
        weight_decay=args.adam_weight_decay if weight_decay is None else weight_decay,
    )


def prepare(accelerator: Any, *pairs: tuple[nn.Module, torch.optim.Optimizer]) -> list[Any]:
    """``accelerator.prepare`` each ``(model, optimiser)`` pair in its own call; returns them in order.

    accelerate's FSDP2 shards one model per ``prepare`` call (its optimiser must come with it); under DDP
    or a single process this is the same as one call with every object (same order of models and
    optimisers in the checkpoints).

    fp16 with gradient accumulation is refused once the run has more than one optimiser -- counting those
    of earlier ``prepare`` calls (``accelerator._optimizers``), so a script that prepares its networks one
    call at a time (MLCM's generator, fake score and GAN head) is refused like one that prepares them together.
    """
    earlier = len(getattr(accelerator, "_optimizers", ()))
    if (
        earlier + len(pairs) > 1
        and accelerator.mixed_precision == "fp16"
        and accelerator.gradient_accumulation_steps > 1
        and distributed_kind(accelerator) != "DEEPSPEED"  # each DeepSpeed engine has its own loss scale
    ):
        raise ValueError(
            "fp16 with --gradient_accumulation_steps > 1 trains two networks or more (here "
            f"{earlier + len(pairs)} optimisers in the run) on one loss scale: accelerate "
            "updates it at each optimiser step, so the second network's earlier micro-batches would be "
            "unscaled with a scale they were not scaled with. Use --mixed_precision bf16 (no loss scaling), "
            "or --gradient_accumulation_steps 1."
        )
    prepared: list[Any] = []
    for model, optimizer in pairs:
        prepared.extend(accelerator.prepare(model, optimizer))
    return prepared


def backward(accelerator: Any, loss: torch.Tensor, model: nn.Module) -> None:
    """``accelerator.backward(loss)`` for a loss that trains ``model`` (a prepared model).

    Under DeepSpeed each prepared model is its own engine, whose ``backward`` also steps its optimiser at
    the end of an accumulation cycle; ``accelerator.backward`` always uses the *first* prepared engine, so a
    second trained model (discriminator, fake score) would never step. Here the loss goes to ``model``'s own
    engine through accelerate's ``DeepSpeedEngineWrapper`` (the code path ``accelerator.backward`` runs for
    the first). Elsewhere this is ``accelerator.backward(loss)``.
    """
    if distributed_kind(accelerator) == "DEEPSPEED":
        from accelerate.utils import DeepSpeedEngineWrapper

        DeepSpeedEngineWrapper(model).backward(loss, sync_gradients=accelerator.sync_gradients)
    else:
        accelerator.backward(loss)


def forward_model(accelerator: Any, model: nn.Module) -> nn.Module:
    """What to call for a prepared ``model`` in a pass that must not train it: a frozen discriminator or fake
    score in the generator's update (inside :func:`diffdistill.students.frozen`).

    Under DeepSpeed the engine's own module: a call of the engine arms its end-of-backward gradient
    reduction, which the generator's backward then runs with none of the engine's gradients (ZeRO-2 fails
    in ``reduce_ipg_grads``). Elsewhere ``model`` itself.
    """
    return accelerator.unwrap_model(model) if distributed_kind(accelerator) == "DEEPSPEED" else model


def autocast(accelerator: Any) -> contextlib.AbstractContextManager[Any]:
    """``accelerator.autocast()``, also under DeepSpeed.

    accelerate leaves mixed precision to DeepSpeed there (its ``autocast`` does nothing), and DeepSpeed holds
    the engines' weights in bf16 / fp16 without casting their inputs: the scripts' float32 latents and
    embeddings would meet bf16 weights (a dtype error). The block then runs under ``torch.autocast`` in the
    mixed-precision dtype, as under DDP / FSDP.
    """
    if distributed_kind(accelerator) == "DEEPSPEED" and accelerator.mixed_precision in ("bf16", "fp16"):
        return torch.autocast(accelerator.device.type, dtype=weight_dtype_of(accelerator))
    return accelerator.autocast()


def zero_stage(accelerator: Any) -> int | None:
    """The DeepSpeed ZeRO stage of the run (``None`` when it does not run DeepSpeed)."""
    if distributed_kind(accelerator) != "DEEPSPEED":
        return None
    return int(accelerator.state.deepspeed_plugin.get_value("zero_optimization.stage", 0))


def gathers_parameters(accelerator: Any) -> bool:
    """Whether the prepared models' weights are sharded and gathered in every forward (FSDP2, DeepSpeed ZeRO-3): then
    every process must call them the same number of times (``TeacherSolver(synchronize=True)`` for a teacher that
    is such a model, e.g. a LoRA student with its adapters off)."""
    return distributed_kind(accelerator) == "FSDP" or zero_stage(accelerator) == 3


def distributed_kind(accelerator: Any) -> str:
    """accelerate's distributed type by name: ``"NO"``, ``"MULTI_GPU"``, ``"FSDP"``, ``"DEEPSPEED"``, ..."""
    return str(accelerator.distributed_type).rsplit(".", 1)[-1]


def is_sharded(accelerator: Any) -> bool:
    """Whether accelerate shards the prepared models' parameters (FSDP or DeepSpeed)."""
    return distributed_kind(accelerator) in ("FSDP", "DEEPSPEED")


def shard_frozen_teacher(accelerator: Any, teacher: nn.Module) -> bool:
    """Under FSDP2, shard a frozen teacher copy over the processes (:func:`diffdistill.students.shard_frozen`: its
    blocks, then the root), as nothing else shards a model no optimiser owns: each process then holds
    ``1 / num_processes`` of it (FLUX.1 in bf16: 24 GB whole). A no-op without FSDP2 (DDP, DeepSpeed, no
    distributed run). Every process must make the same calls into it afterwards (validation runs on every process
    when sharded). Returns whether it was sharded."""
    if distributed_kind(accelerator) != "FSDP":
        return False
    from diffdistill.students import shard_frozen

    blocks = shard_frozen(teacher)
    logger.info(
        "sharded the frozen teacher over %d processes (%d blocks and the root)",
        accelerator.num_processes,
        blocks,
    )
    return True


def clip_and_step(accelerator: Any, optimizer: torch.optim.Optimizer, params: Any, max_norm: float) -> None:
    """Clip (when gradients are synchronised), step and zero an optimiser.

    Only ``optimizer``'s gradients are unscaled (fp16): ``accelerator.clip_grad_norm_`` unscales those of
    *every* prepared optimiser, so with two optimisers (generator and discriminator / fake score) and
    gradient accumulation the other one's accumulated gradients would be unscaled now and again at its own
    step. The clipping is torch's ``clip_grad_norm_`` -- under FSDP over the (``DTensor``) shards, the norm
    of the whole model's gradient (accelerate's own FSDP path identifies the model by comparing parameter
    lists, which fails when two prepared models have equally many parameters). Under DeepSpeed the
    engine has already clipped (at ``--max_grad_norm``, :func:`configure_deepspeed`) and stepped in
    :func:`backward`; its optimiser wrapper's ``step`` and ``zero_grad`` do nothing.
    """
    params = list(params)
    if accelerator.sync_gradients and distributed_kind(accelerator) != "DEEPSPEED":
        wan_experts.drop_unused_grads(
            accelerator, params
        )  # Wan 2.2 A14B: an expert unused everywhere is not stepped
    clip = accelerator.sync_gradients and max_norm and max_norm > 0 and math.isfinite(max_norm)
    if clip and distributed_kind(accelerator) != "DEEPSPEED":
        accelerator.unscale_gradients(optimizer=optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in params if p.requires_grad], max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
