"""Numbered checkpoint folders (save, prune, exact resume) and the final diffusers-loadable weights."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from diffdistill.students import AdapterView, save_lora

from . import ema_release, runtime, student_sampler

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: str | os.PathLike[str]) -> list[Path]:
    """``checkpoint-N`` folders of ``output_dir``, oldest (smallest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
    ]
    return [p for _, p in sorted(found)]


CHECKPOINT_MARKER = "step.json"  # written last: a checkpoint-N folder without it is incomplete


def is_complete_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether the ``checkpoint-N`` folder ``path`` holds its completion marker (``step.json``), written by
    :func:`save_checkpoint` only after every process finished ``save_state``."""
    return (Path(path) / CHECKPOINT_MARKER).is_file()


def save_checkpoint(accelerator: Any, args: argparse.Namespace, step: int) -> Path:
    """``accelerator.save_state`` into ``output_dir/checkpoint-{step}``, keeping at most the total limit.

    The folder is marked complete (``step.json``, written atomically, with the step and the run's options,
    :func:`run_options`, which :func:`resume` compares with the resumed run's) once every process has saved, and only
    then are older checkpoints pruned: a save that fails (disk full, a killed job) leaves the previous
    checkpoints in place, and :func:`resume` skips the unmarked folder. Pruning keeps the newest
    ``--checkpoints_total_limit`` complete checkpoints (this one included) and removes incomplete folders
    older than this one (abandoned saves).
    """
    path = Path(args.output_dir) / f"checkpoint-{step}"
    marker = path / CHECKPOINT_MARKER
    if accelerator.is_main_process and marker.exists():
        marker.unlink()  # re-saving a step: the folder is incomplete until this save finishes
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()  # every process's files are written before the folder is marked
    if accelerator.is_main_process:
        tmp = path / f"{CHECKPOINT_MARKER}.tmp"
        tmp.write_text(json.dumps({"global_step": step, "options": run_options(args)}, indent=1))
        os.replace(tmp, marker)
        limit = getattr(args, "checkpoints_total_limit", None)
        if limit:  # None or 0: keep every checkpoint
            _prune_checkpoints(args.output_dir, path, limit)
    accelerator.wait_for_everyone()
    return path


def _prune_checkpoints(output_dir: str | os.PathLike[str], newest: Path, limit: int) -> None:
    """Remove complete checkpoints beyond the newest ``limit`` (``newest`` included, never removed) and
    incomplete folders older than ``newest``."""
    found = checkpoint_dirs(output_dir)  # oldest first
    older = found[: found.index(newest)] if newest in found else found
    others = [p for p in found if p != newest]
    complete = [p for p in others if is_complete_checkpoint(p)]
    stale = complete[: max(0, len(complete) - limit + 1)]
    stale += [p for p in older if not is_complete_checkpoint(p)]
    for folder in stale:
        shutil.rmtree(folder)


def resolve_checkpoint(args: argparse.Namespace) -> Path | None:
    """The folder ``--resume_from_checkpoint`` names (``None`` without one, or for ``latest`` with no complete
    checkpoint in ``--output_dir``); raises ``ValueError`` for a path that is not a ``checkpoint-N`` folder.

    ``latest`` is the newest *complete* checkpoint (with ``step.json``); newer folders without the marker
    (a save that did not finish) are skipped with a warning. Another value is a folder, or a folder name
    inside ``--output_dir``. Model-independent: the scripts' ``parse_args`` call it (through
    :func:`training.options.check_common_args`) so a typo fails before any model loads.
    """
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found = checkpoint_dirs(args.output_dir)
        complete = [p for p in found if is_complete_checkpoint(p)]
        newer = found[found.index(complete[-1]) + 1 :] if complete else found
        for skipped in newer:  # all incomplete: newer than the newest complete one
            logger.warning(
                "Skipping %s for --resume_from_checkpoint latest: it has no %s, so its save did not finish "
                "(delete the folder, or pass it as --resume_from_checkpoint to try it anyway).",
                skipped,
                CHECKPOINT_MARKER,
            )
        return complete[-1] if complete else None  # None: first launch of a job that always passes "latest"
    path = Path(args.resume_from_checkpoint)
    if not path.is_dir():
        path = Path(args.output_dir) / args.resume_from_checkpoint
    if not path.is_dir() or CHECKPOINT_RE.match(path.name) is None:
        names = ", ".join(p.name for p in checkpoint_dirs(args.output_dir)) or "none"
        raise ValueError(
            f"Expected --resume_from_checkpoint to be 'latest' or an existing checkpoint-N folder, but got "
            f"{args.resume_from_checkpoint!r} ({path} is not one): pass 'latest', a checkpoint-N folder, or "
            f"the name of one in --output_dir {args.output_dir} (found: {names})."
        )
    return path


def resume(accelerator: Any, args: argparse.Namespace) -> int:
    """Load ``--resume_from_checkpoint`` (``latest`` or a path, :func:`resolve_checkpoint`) and return its step
    (0 without one).

    The optimisers keep the hyper-parameters the script built them with from the options (lr, betas,
    weight decay, eps; :func:`reapply_optimizer_options`), not the checkpoint's, and the options recorded in
    the checkpoint are compared with this run's (:func:`compare_options`): each difference is logged.
    """
    path = resolve_checkpoint(args)
    if path is None:
        return 0
    if not is_complete_checkpoint(path):
        logger.warning(
            "%s has no %s: its save may not have finished; loading it as asked.", path, CHECKPOINT_MARKER
        )
    built = optimizer_options(accelerator)
    accelerator.load_state(str(path))
    reapply_optimizer_options(accelerator, built)
    compare_options(path, args)
    match = CHECKPOINT_RE.match(path.name)
    assert match is not None  # resolve_checkpoint returns checkpoint-N folders only
    return int(match.group(1))


OPTIMIZER_OPTIONS = ("lr", "betas", "weight_decay", "eps")  # an optimiser group's hyper-parameters


def optimizer_options(accelerator: Any) -> list[list[dict[str, Any]]]:
    """The hyper-parameters (:data:`OPTIMIZER_OPTIONS`) of each param group of each prepared optimiser."""
    return [
        [{k: group[k] for k in OPTIMIZER_OPTIONS if k in group} for group in opt.param_groups]
        for opt in getattr(accelerator, "_optimizers", ())
    ]


def reapply_optimizer_options(accelerator: Any, built: list[list[dict[str, Any]]]) -> None:
    """Put back the optimisers' hyper-parameters ``built`` (:func:`optimizer_options` before ``load_state``).

    ``accelerator.load_state`` restores each optimiser's ``param_groups`` -- lr, betas, weight decay -- from
    the checkpoint, which would silently override the options of the resumed run (``--learning_rate``,
    ``--adam_beta1/2``, ``--adam_weight_decay``, a preset's, ``--fake_learning_rate``...). Our choice: the
    options win (resuming with a lower lr is a common move), the moments and step counts come from the
    checkpoint, and each difference is logged.
    """
    for i, (opt, groups) in enumerate(zip(getattr(accelerator, "_optimizers", ()), built)):
        for j, (group, wanted) in enumerate(zip(opt.param_groups, groups)):
            for key, value in wanted.items():
                old = group.get(key)
                if _norm(old) != _norm(value):
                    msg = "Resumed optimiser %d (param group %d): %s %s in the checkpoint, %s from this run's options (used)."
                    logger.warning(msg, i, j, key, old, value)
                group[key] = value


def _norm(value: Any) -> Any:
    """A hyper-parameter in a comparable form (betas: a tuple; a 0-d tensor lr: a float)."""
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v) for v in value)
    return float(value) if hasattr(value, "item") else value


RESUME_FREE_OPTIONS = frozenset(
    {
        "output_dir",
        "resume_from_checkpoint",
        "max_train_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "report_to",
        "tracker_project_name",
        "validation_prompts",
        "validation_steps",
        "dataloader_num_workers",
        "cache_dir",
        "compile",
        "compile_mode",
        "compile_backend",
        "gradient_checkpointing",
        "allow_tf32",
        "preset_set",  # sdxl_sim's record of which options its preset filled (their values are compared)
    }
)  # options that change where or how fast a run goes, not what its steps compute


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run's options as recorded in each checkpoint's ``step.json``: ``vars(args)`` with JSON values."""

    def plain(v: Any) -> bool:
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        return v is None or isinstance(v, (bool, int, float, str))

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items()) if plain(v)}


def recorded_options(path: Path) -> dict[str, Any]:
    """The options checkpoint ``path`` recorded (:func:`run_options` of its run); ``{}`` if none (older checkpoints)."""
    try:
        recorded = json.loads((Path(path) / CHECKPOINT_MARKER).read_text()).get("options")
    except (OSError, ValueError, AttributeError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def compare_options(path: Path, args: argparse.Namespace) -> dict[str, tuple[Any, Any]]:
    """Log (warning) each option of this run that differs from the one recorded in checkpoint ``path``;
    returns them as ``{name: (recorded, now)}``.

    Options that only say where or how fast the run goes (:data:`RESUME_FREE_OPTIONS`) are not compared.
    Our choice: warn, not refuse. A fresh run into a folder that holds another run's checkpoints is
    already refused (:func:`training.options.check_output_dir`), so a difference here is a change the user
    made on purpose -- continuing a finished run with more steps or a next phase, a lower lr (applied,
    :func:`reapply_optimizer_options`) -- and which options are safe to change is the script's to say. A
    checkpoint written before the options were recorded is not compared."""
    recorded, now = recorded_options(path), run_options(args)
    if not recorded:
        return {}
    changed = {
        k: (recorded.get(k), now.get(k))
        for k in sorted(set(recorded) | set(now))
        if k not in RESUME_FREE_OPTIONS and recorded.get(k) != now.get(k)
    }
    msg = "Resuming %s with --%s %s, but it was saved by a run with --%s %s: the steps from here on differ."
    for name, (old, new) in changed.items():
        logger.warning(msg, path, name, new, name, old)
    return changed


def register_lora_checkpointing(accelerator: Any, models: dict[str, nn.Module]) -> None:
    """Checkpoint LoRA models as their adapters only: ``checkpoint-N/{name}_lora.safetensors``, and a model's
    adapters other than ``"default"`` as ``{name}_{adapter}_lora.safetensors`` (Hyper-SD's feedback LoRA).

    accelerate save/load pre-hooks (as in diffusers' LoRA training scripts): the save hook writes each
    model's adapter (:func:`diffdistill.students.save_lora`) and drops the model from the weights accelerate
    writes; the load hook reads the adapter back into the live model (same parameter objects, so the
    optimiser and an EMA keep tracking them) and drops the model from the ones accelerate loads. A model that
    is an :class:`~diffdistill.students.AdapterView` (one adapter of a ``--shared_base`` UNet) is written as
    that adapter alone, ``{name}_lora.safetensors``, and read back into it. Other
    prepared models (discriminators) are saved by accelerate as usual. Not used with FSDP / DeepSpeed
    (:func:`setup_checkpoints`): there accelerate writes every model's shards itself.
    """
    from diffdistill.students import load_lora

    targets = {name: accelerator.unwrap_model(m) for name, m in models.items()}

    def ours(prepared: list[Any]) -> dict[int, str]:
        unwrapped = [accelerator.unwrap_model(m) for m in prepared]
        return {i: name for name, t in targets.items() for i, m in enumerate(unwrapped) if m is t}

    def save_hook(prepared: list[Any], weights: list[Any], output_dir: str) -> None:
        found = ours(prepared)
        if accelerator.is_main_process:
            for name in found.values():
                if isinstance(targets[name], AdapterView):  # one adapter of a shared base (--shared_base)
                    targets[name].save(Path(output_dir) / f"{name}_lora.safetensors", prefix="")
                    continue
                for adapter, file in _adapter_files(targets[name], name):
                    save_lora(targets[name], Path(output_dir) / file, adapter_name=adapter, prefix="")
        if len(weights) == len(prepared):
            for i in sorted(found, reverse=True):
                weights.pop(i)

    def load_hook(prepared: list[Any], input_dir: str) -> None:
        found = ours(prepared)
        for i in sorted(found, reverse=True):
            if isinstance(targets[found[i]], AdapterView):  # its state dict has the file's (unprefixed) keys
                from safetensors.torch import load_file

                targets[found[i]].load_state_dict(
                    load_file(str(Path(input_dir) / f"{found[i]}_lora.safetensors"))
                )
                prepared.pop(i)
                continue
            for adapter, file in _adapter_files(targets[found[i]], found[i]):
                load_lora(targets[found[i]], Path(input_dir) / file, adapter_name=adapter, prefix="")
            prepared.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _adapter_files(model: nn.Module, name: str) -> list[tuple[str, str]]:
    """``(adapter, file name)`` of each LoRA adapter of ``model``: ``{name}_lora.safetensors`` for
    ``"default"``, ``{name}_{adapter}_lora.safetensors`` for the others."""
    adapters = sorted(getattr(model, "peft_config", None) or {"default": None})
    return [
        (a, f"{name}_lora.safetensors" if a == "default" else f"{name}_{a}_lora.safetensors")
        for a in adapters
    ]


def setup_checkpoints(
    accelerator: Any,
    args: argparse.Namespace,
    student: nn.Module,
    extra_lora: dict[str, nn.Module] | None = None,
) -> ema_release.ReleaseEMA | None:
    """What the checkpoints hold beyond accelerate's defaults; call after ``prepare``, before :func:`resume`.

    With ``--use_lora`` the student (named ``unet``) and the ``extra_lora`` models are checkpointed as
    adapters (:func:`register_lora_checkpointing`), except under FSDP / DeepSpeed. With ``--use_ema`` returns the :class:`ReleaseEMA` of the
    student's trainable parameters, registered for checkpointing; pass it to :func:`train_loop` and
    :func:`save_unet`.
    """
    if args.use_lora and not runtime.is_sharded(
        accelerator
    ):  # sharded: accelerate's own (whole-model) shards
        register_lora_checkpointing(accelerator, {"unet": student, **(extra_lora or {})})
    if not args.use_ema:
        return None
    ema = ema_release.ReleaseEMA(accelerator.unwrap_model(student), args.ema_decay, args.ema_warmup)
    ema_release.register_ema(accelerator, ema.ema, ema.params)
    return ema


def should_checkpoint(args: argparse.Namespace, step: int) -> bool:
    """Whether optimisation step ``step`` (1-based) is checkpointed: every ``--checkpointing_steps`` and at the
    last step (so a finished run relaunched with ``latest``, or continued with a larger ``--max_train_steps``,
    redoes nothing); never with ``--checkpointing_steps 0``."""
    every = args.checkpointing_steps
    return bool(every) and (step % every == 0 or step == args.max_train_steps)


def save_unet(
    accelerator: Any,
    unet: nn.Module,
    args: argparse.Namespace,
    subfolder: str = "unet",
    *,
    ema: ema_release.ReleaseEMA | None = None,
    folder: str = "",
) -> Path:
    """Final weights: LoRA file (``pytorch_lora_weights.safetensors``) or a full ``save_pretrained`` UNet,
    under ``--output_dir`` (or its sub-folder ``folder``, e.g. for a stage's intermediate weights), with the trained
    size in ``student_sampler.json`` (:func:`training.student_sampler.write_size_record`).

    With ``ema`` (``--use_ema``) the averaged weights are copied into ``unet`` first, so they are what is
    written (and what the model holds afterwards); mid-run, save inside ``ReleaseEMA.swapped_in()``
    instead, which puts the online weights back.

    Call on every process: the weights are ``accelerator.get_state_dict(unet)``, which gathers the shards
    of an FSDP model; the main process writes them (a full UNet as ``save_pretrained`` lays it out: config
    and ``diffusion_pytorch_model*.safetensors`` shards of at most 10 GB).
    """
    from huggingface_hub import save_torch_state_dict

    accelerator.wait_for_everyone()
    out = Path(args.output_dir) / folder
    model = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.copy_to_model()
    state = accelerator.get_state_dict(unet)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        student_sampler.write_size_record(args, out)  # the trained size, for evaluate.py
        if isinstance(model, AdapterView):  # --shared_base: the generator's adapter alone
            model.save(out / LORA_WEIGHT_NAME, state_dict=state)
            path = out / LORA_WEIGHT_NAME
        elif args.use_lora:
            save_lora(model, out / LORA_WEIGHT_NAME, state_dict=state)
            path = out / LORA_WEIGHT_NAME
        else:
            path = out / subfolder
            model.save_config(path)
            _fix_class_name(path / "config.json", model)
            # FSDP2's gathered tensors can be views into a larger buffer (Wan's scale_shift_table), which the
            # safetensors writer refuses as "shared": each tensor is written from its own storage
            state = {
                k: v.detach().clone() if v.untyped_storage().nbytes() != v.nbytes else v
                for k, v in state.items()
            }
            save_torch_state_dict(
                state,
                path,
                filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                max_shard_size="10GB",
                metadata={"format": "pt"},
            )
    else:
        path = out / (LORA_WEIGHT_NAME if args.use_lora else subfolder)
    accelerator.wait_for_everyone()
    return path


def _fix_class_name(config_file: Path, model: nn.Module) -> None:
    """Write the model's own class in ``_class_name``: FSDP2 (``fully_shard``) swaps the instance's class for
    a generated ``FSDP<Name>`` subclass, which diffusers' ``save_config`` would record."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return
    if not isinstance(model, FSDPModule):
        return
    own = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    config = json.loads(config_file.read_text())
    config["_class_name"] = own.__name__
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
