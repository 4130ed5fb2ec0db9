"""The training loop: steps, checkpoints, validation and the progress bar."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import torch

from . import checkpoints, data_sources, ema_release


def progress_bar(accelerator: Any, args: argparse.Namespace, initial: int) -> Any:
    """tqdm over optimisation steps, shown on the local main process only."""
    from tqdm.auto import tqdm

    return tqdm(
        total=args.max_train_steps,
        initial=initial,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )


def train_loop(
    accelerator: Any,
    args: argparse.Namespace,
    global_step: int,
    train_step: Any,
    validate: Any = None,
    *,
    data: data_sources.StepSource | None = None,
    ema: ema_release.ReleaseEMA | None = None,
    ema_due: Any = None,
    after_step: Any = None,
) -> int:
    """Run ``train_step(generator, step) -> logs`` until ``--max_train_steps``; log, checkpoint, show progress.

    ``train_step`` is called ``gradient_accumulation_steps`` times per optimisation step (one micro-batch
    each; wrap its update in ``accelerator.accumulate``) with the generator of :func:`step_generator` and
    the 0-based index of the optimisation step it contributes to. ``validate(step)`` runs every
    ``--validation_steps`` and after the last step. ``data`` (a :class:`StepSource`) starts its prefetching
    workers at the resume step; ``ema`` (:func:`setup_checkpoints`) is updated after every optimisation
    step for which ``ema_due(step)`` (0-based; default: every step) holds -- a score-distillation run averages
    the steps in which its generator stepped (``score_distillation.CriticUpdates.generator_steps_at``), as DMD2's
    line of code updates the generator's EMA after the generator's optimiser step only -- and with it
    ``validate`` samples the averaged weights (swapped in, then back). ``after_step(step)``
    runs on every process after each optimisation step, before its checkpoint (e.g. to write a stage's
    weights: a run resumed from that checkpoint has them, and one resumed from an earlier checkpoint redoes
    the step and writes them again).
    Returns the final step count.
    """
    bar = progress_bar(accelerator, args, global_step)
    if data is not None:
        data.start(
            global_step,
            args.max_train_steps,
            seed=args.seed,
            process_index=accelerator.process_index,
            accumulation=args.gradient_accumulation_steps,
        )
    while global_step < args.max_train_steps:
        logs: dict[str, torch.Tensor] = {}
        for micro in range(args.gradient_accumulation_steps):
            gen = data_sources.step_generator(args.seed, global_step, accelerator.process_index, micro)
            logs = train_step(gen, global_step) or {}
        if ema is not None and (ema_due is None or ema_due(global_step)):
            ema.update()
        global_step += 1
        bar.update(1)
        values = scalar_logs(logs)
        bar.set_postfix({k: f"{v:.4g}" for k, v in list(values.items())[:3]})
        accelerator.log(values, step=global_step)
        if after_step is not None:  # before the checkpoint: a resume from it never skips what this writes
            after_step(global_step)
        if checkpoints.should_checkpoint(args, global_step):
            checkpoints.save_checkpoint(accelerator, args, global_step)
        if validate is not None and (
            global_step % args.validation_steps == 0 or global_step == args.max_train_steps
        ):
            with ema.swapped_in() if ema is not None else contextlib.nullcontext():
                validate(global_step)  # with --use_ema: samples of the average, as released
    bar.close()
    if data is not None:
        data.close()
    return global_step


def scalar_logs(logs: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """Detached 0-d tensors to floats for the trackers (one sync per logged step)."""
    return {prefix + k: float(v) for k, v in logs.items() if torch.is_tensor(v) and v.numel() == 1}
