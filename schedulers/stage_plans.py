"""Declarative progressive training schedules that training loops iterate over.

A :class:`StagePlan` is an ordered, immutable list of :class:`Stage` records. It holds no behaviour:
the training loop reads each stage's fields (how many steps the student has, what the teacher does,
which loss and discriminator to use) and acts on them. Plans round-trip through JSON
(:meth:`StagePlan.to_dict` / :meth:`StagePlan.from_dict`) so they can live in a config file and be
logged with a run.

Presets: :meth:`StagePlan.sdxl_lightning` (Lin et al. 2024), :meth:`StagePlan.hyper_sd`
(Ren et al. 2024) and :meth:`StagePlan.mlcm` (Xie et al. 2024).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._checks import (
    DTypeError,
    OptionError,
    check_int,
    check_option,
    check_real,
)

__all__ = ["DISCRIMINATOR_MODES", "LOSS_KINDS", "Stage", "StagePlan"]

#: Loss kinds a stage may name (training loops map them to diffdistill.losses functions).
LOSS_KINDS: tuple[str, ...] = (
    "mse",
    "adversarial",
    "mse+adversarial",
    "consistency",
    "multistep_consistency",
    "tscd",
    "score",
    "x0_conversion",
)
#: Discriminator modes (SDXL-Lightning Sec. 3.3-3.4).
DISCRIMINATOR_MODES: tuple[str | None, ...] = (None, "conditional", "unconditional")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class Stage:
    """One stage of a progressive distillation.

    Args:
        name: unique label, used in logs and checkpoint folders.
        loss: one of :data:`LOSS_KINDS`.
        student_steps: inference steps of the student this stage trains (progressive distillation).
        teacher_steps: teacher ODE steps per student step (``n`` of SDXL-Lightning Eq. 16 / MLCM's ``p``).
        num_segments: trajectory segments ``k`` (Hyper-SD TSCD) or milestones ``M`` (MLCM).
        discriminator: ``None``, ``"conditional"`` or ``"unconditional"``.
        trainable: what is optimised: ``"lora"`` or ``"full"``.
        loss_weights: weights of the loss terms, e.g. ``{"mse": 0.5, "adversarial": 0.5}``.
        options: any further method-specific setting (guidance scale, skip, learning rate, ...).
        num_iterations: optional length of the stage; ``None`` means "until the loop decides".

    Raises:
        OptionError: if ``name`` is empty or not a string, ``loss`` / ``discriminator`` / ``trainable`` is not
            one of its allowed values, a step or segment count is neither None nor an int >= 1, an adversarial
            loss has no ``discriminator``, or a loss weight is not finite.
        DTypeError: if ``loss_weights`` / ``options`` is not a mapping, or a loss weight is not a real number.
    """

    name: str
    loss: str
    student_steps: int | None = None
    teacher_steps: int | None = None
    num_segments: int | None = None
    discriminator: str | None = None
    trainable: str = "lora"
    loss_weights: Mapping[str, float] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    num_iterations: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise OptionError(f"Expected `name` to be a non-empty string, but got {self.name!r}.")
        check_option(self.loss, "loss", LOSS_KINDS)
        check_option(self.discriminator, "discriminator", DISCRIMINATOR_MODES)
        check_option(self.trainable, "trainable", ("lora", "full"))
        for key in ("student_steps", "teacher_steps", "num_segments", "num_iterations"):
            value = getattr(self, key)
            if value is not None:
                try:  # stored as a Python int (2.0 or numpy.int64(2) -> 2: range() and JSON take it)
                    object.__setattr__(self, key, check_int(value, key, minimum=1, integral_float=True))
                except (DTypeError, OptionError):
                    raise OptionError(
                        f"Stage {self.name!r}: expected `{key}` to be None or an int >= 1, but got {value!r}."
                    ) from None
        for key in ("loss_weights", "options"):
            value = getattr(self, key)
            if not isinstance(value, Mapping):
                raise DTypeError(
                    f"Stage {self.name!r}: expected `{key}` to be a dict, but got {type(value).__name__}."
                )
        for key, weight in self.loss_weights.items():
            check_real(weight, f"loss_weights[{key!r}]", allow_tensor=True)
        if "adversarial" in self.loss and self.discriminator is None:
            raise OptionError(
                f"Stage {self.name!r}: loss {self.loss!r} needs `discriminator` ('conditional' or 'unconditional')."
            )
        # Own copies in JSON form (tuples become lists) so that a JSON round trip gives an equal Stage.
        object.__setattr__(self, "loss_weights", _jsonable(dict(self.loss_weights)))
        object.__setattr__(self, "options", _jsonable(dict(self.options)))

    def __hash__(self) -> int:
        return hash((self.name, self.loss, self.student_steps, self.num_segments))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field.

        Returns:
            ``{field: value}`` for every field; ``Stage(**d)`` rebuilds an equal stage.
        """
        return dataclasses.asdict(self)


class StagePlan:
    """An ordered sequence of :class:`Stage` s with unique names.

    Iterate over it, index it by position or by stage name (``plan["2->1/full"]``), and round-trip it
    through JSON with :meth:`to_dict` / :meth:`from_dict`.

    Args:
        stages: the stages in training order (at least one), each a :class:`Stage`.
        name: a label for the plan (default ``"custom"``).

    Raises:
        DTypeError: if ``stages`` is not iterable, a stage is not a :class:`Stage`, or ``name`` is not a string.
        OptionError: if ``stages`` is empty or two stages share a name.

    Example:
        >>> plan = StagePlan.sdxl_lightning()
        >>> [s.name for s in plan][:4]
        ['128->32', '32->8/conditional', '32->8/unconditional', '32->8/full']
        >>> plan["2->1/x0-conversion"].loss
        'x0_conversion'
        >>> import json
        >>> StagePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
        True
    """

    def __init__(self, stages: Sequence[Stage], name: str = "custom") -> None:
        if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Iterable):
            raise DTypeError(
                f"Expected `stages` to be a sequence of Stage objects, but got {type(stages).__name__}."
            )
        stages = tuple(stages)
        if not stages:
            raise OptionError("Expected `stages` to hold at least one Stage, but got none.")
        for i, stage in enumerate(stages):
            if not isinstance(stage, Stage):
                raise DTypeError(
                    f"Expected every entry of `stages` to be a Stage, but `stages[{i}]` is {type(stage).__name__}."
                )
        if not isinstance(name, str):
            raise DTypeError(f"Expected `name` to be a string, but got {type(name).__name__}.")
        names = [s.name for s in stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise OptionError(f"Expected unique stage names, but got duplicates {dupes}.")
        self.stages = stages
        self.name = name

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, key: int | str) -> Stage:
        if isinstance(key, str):
            for stage in self.stages:
                if stage.name == key:
                    return stage
            raise KeyError(f"No stage named {key!r}; stages are {[s.name for s in self.stages]}.")
        if isinstance(key, bool) or not isinstance(key, int):
            raise TypeError(
                f"Index a StagePlan by position (int) or stage name (str), not {type(key).__name__}."
            )
        if not -len(self.stages) <= key < len(self.stages):
            raise IndexError(f"Stage index {key} is out of range for a plan of {len(self.stages)} stage(s).")
        return self.stages[key]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StagePlan) and self.stages == other.stages and self.name == other.name

    def __hash__(self) -> int:
        return hash((self.name, tuple(s.name for s in self.stages)))

    def __repr__(self) -> str:
        return f"StagePlan({self.name!r}, [{', '.join(repr(s.name) for s in self.stages)}])"

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data.

        Returns:
            ``{"name": ..., "stages": [stage dicts]}``, JSON-serialisable.
        """
        return {"name": self.name, "stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StagePlan:
        """Inverse of :meth:`to_dict`.

        Args:
            data: ``{"name": ..., "stages": [stage dicts]}`` (``name`` defaults to ``"custom"``).

        Returns:
            The plan.

        Raises:
            DTypeError: if ``data`` or a stage entry is not a mapping, or ``data["stages"]`` is not a list.
            OptionError: if a stage has an unknown field (the message lists the allowed ones), the plan has no
                stage, or as :class:`Stage` / :class:`StagePlan` for the values.
        """
        if not isinstance(data, Mapping):
            raise DTypeError(
                f"Expected `data` to be a dict like StagePlan.to_dict() returns, but got {type(data).__name__}."
            )
        raw_stages = data.get("stages", [])
        if not isinstance(raw_stages, (list, tuple)):
            raise DTypeError(
                f"Expected `data['stages']` to be a list of stage dicts, but got {type(raw_stages).__name__}."
            )
        allowed = {f.name for f in dataclasses.fields(Stage)}
        stages = []
        for i, raw in enumerate(raw_stages):
            if not isinstance(raw, Mapping):
                raise DTypeError(
                    f"Expected `data['stages'][{i}]` to be a dict of Stage fields, but got {type(raw).__name__}."
                )
            unknown = sorted(set(raw) - allowed)
            if unknown:
                raise OptionError(f"Unknown Stage field(s) {unknown}; allowed fields are {sorted(allowed)}.")
            stages.append(Stage(**raw))
        return cls(stages, name=data.get("name", "custom"))

    # ------------------------------------------------------------------ presets
    @classmethod
    def sdxl_lightning(cls, mse_guidance_scale: float = 6.0) -> StagePlan:
        """SDXL-Lightning (Lin, Wang, Yang 2024, arXiv:2402.13929, Sec. 3.4-3.7).

        128 → 32 with MSE and CFG 6 on the teacher (the only CFG stage); then 32 → 8 → 4 → 2 → 1 with the
        non-saturating adversarial loss, each level training with the conditional discriminator first,
        then the unconditional one (Sec. 3.4). For 32 → 8, 8 → 4 and 4 → 2 that is a LoRA with the
        conditional D, the same LoRA with the unconditional D, merged, then the full UNet with the
        unconditional objective. The 1-step student has no LoRA (Sec. 3.7): its level converts the model
        to x0 prediction (Eq. 29), then trains the full x0-predicting UNet with the conditional D
        (``2->1/conditional``), then with the unconditional D (``2->1/full``).

        ``reset_discriminator`` (every adversarial stage has it): ``True`` where the stage starts a fresh
        discriminator -- at the start of each level (Sec. 3.6, "D is re-initialised at each stage") and
        where D changes from conditional to unconditional (the head's input width changes; the paper does
        not say whether the backbone carries over, so it starts fresh); ``False`` for the ``/full`` stages
        of 32 → 8, 8 → 4 and 4 → 2, which continue the unconditional discriminator of the level's
        ``/unconditional`` LoRA stage (same level, same objective).

        Stages with 1 and 2 student steps train at the extra timesteps {250, 500, 750, 1000} and re-noise D
        inputs to t* in {10, 250, 500, 750} with weights ``discriminator_timestep_weights`` (1:1:1:1) "at
        first", then ``discriminator_timestep_weights_stable`` (5:1:1:1, the 5 on t* = 10) "once training
        is stable" (Sec. 3.7; when to switch is the training loop's choice). Adversarial optimiser:
        Adam(beta1=0, beta2=0.99), lr 1e-6 (LoRA) / 5e-7 (full).

        Args:
            mse_guidance_scale: the teacher's CFG scale in the ``128->32`` MSE stage (Imagen convention;
                default 6, the paper's).

        Returns:
            The plan ``"sdxl_lightning"``.

        Raises:
            DTypeError: if ``mse_guidance_scale`` is not a real number.
            OptionError: if ``mse_guidance_scale`` is not finite.
        """
        mse_guidance_scale = check_real(mse_guidance_scale, "mse_guidance_scale", allow_tensor=True)
        stages = [
            Stage(
                "128->32",
                loss="mse",
                student_steps=32,
                teacher_steps=4,
                trainable="lora",
                options={"guidance_scale": mse_guidance_scale, "lr": 1e-5, "adam_betas": (0.9, 0.999)},
            )
        ]
        adv = {"lr_lora": 1e-6, "lr_full": 5e-7, "adam_betas": (0.0, 0.99), "guidance_scale": 1.0}
        for src, dst in ((32, 8), (8, 4), (4, 2), (2, 1)):
            extra: dict[str, Any] = {}
            if dst <= 2:
                extra = {
                    "extra_student_timesteps": (249, 499, 749, 999),
                    "discriminator_timesteps": (10, 250, 500, 750),
                    "discriminator_timestep_weights": (1, 1, 1, 1),
                    "discriminator_timestep_weights_stable": (5, 1, 1, 1),
                }
            base = f"{src}->{dst}"
            n = src // dst
            # Every level starts with the conditional D (Sec. 3.4). No 1-step LoRA: there it trains the
            # full x0-predicting UNet, after the x0 conversion.
            conditional = Stage(
                f"{base}/conditional",
                loss="adversarial",
                student_steps=dst,
                teacher_steps=n,
                discriminator="conditional",
                trainable="full" if dst == 1 else "lora",
                options={
                    **adv,
                    **extra,
                    "lr": adv["lr_full"] if dst == 1 else adv["lr_lora"],
                    **({"prediction_type": "sample"} if dst == 1 else {}),
                    "reset_discriminator": True,
                },
            )
            if dst == 1:
                stages.append(
                    Stage(
                        f"{base}/x0-conversion",
                        loss="x0_conversion",
                        student_steps=1,
                        trainable="full",
                        # the timesteps the 1-step student is then trained at (Sec. 3.7)
                        options={"timesteps": (249, 499, 749, 999)},
                    )
                )
                stages.append(conditional)
            else:
                stages.append(conditional)
                stages.append(
                    Stage(
                        f"{base}/unconditional",
                        loss="adversarial",
                        student_steps=dst,
                        teacher_steps=n,
                        discriminator="unconditional",
                        trainable="lora",
                        options={
                            **adv,
                            **extra,
                            "lr": adv["lr_lora"],
                            "merge_lora_after": True,
                            # conditional -> unconditional: a new head width, a fresh D
                            "reset_discriminator": True,
                        },
                    )
                )
            stages.append(
                Stage(
                    f"{base}/full",
                    loss="adversarial",
                    student_steps=dst,
                    teacher_steps=n,
                    discriminator="unconditional",
                    trainable="full",
                    options={
                        **adv,
                        **extra,
                        "lr": adv["lr_full"],
                        "prediction_type": "sample" if dst == 1 else "epsilon",
                        # continue the level's unconditional D (its /unconditional LoRA stage); the 1-step
                        # level's previous D is the conditional one of 2->1/conditional
                        "reset_discriminator": dst == 1,
                    },
                )
            )
        return cls(stages, name="sdxl_lightning")

    @classmethod
    def hyper_sd(cls, segments: Sequence[int] = (8, 4, 2, 1), num_inference_steps: int = 50) -> StagePlan:
        """Hyper-SD TSCD (Ren et al. 2024, arXiv:2404.13686, Sec. 3.1, 4.1): k = 8 → 4 → 2 → 1 on a LoRA.

        The paper's distance is a hybrid of MSE and the adversarial loss whose adversarial weight grows and
        MSE weight shrinks across stages, without numbers. Stage ``i`` of ``n`` here has
        ``loss_weights = {"mse": 1 - i/(n-1), "adversarial": i/(n-1)}`` (a documented choice of this
        library; override them for your run), so with the default ``(8, 4, 2, 1)``:

        * ``tscd-k8``: MSE only (adversarial weight 0, no discriminator);
        * ``tscd-k4``: 2/3 MSE + 1/3 adversarial (unconditional discriminator);
        * ``tscd-k2``: 1/3 MSE + 2/3 adversarial;
        * ``tscd-k1``: adversarial only (MSE weight 0).

        A single-stage plan is MSE only. lr 1e-6, batch 512 in the paper. The target EMA decay 0.95 is
        LCM's (the paper does not give its value): another library choice.

        What each stage's student is for: a ``k``-segment student is a DDIM sampler of ``k`` steps (or a
        multiple of ``k``) on the trailing grid whose points are the segment boundaries (``ddim_sample``
        with ``spaced_timesteps(k, "trailing")``; the paper's N-step LoRAs use diffusers'
        ``DDIMScheduler(timestep_spacing="trailing")``): each step moves to a boundary, which is what its
        consistency targets train. The ``k = 1`` stage moves along the whole trajectory to random ends
        ``t_end`` (CTM-style), so its 1-step sample is not the paper's one-step model. The one-step model
        comes from the separate one-step stage (Sec. 3.3: score distillation, :func:`~diffdistill.losses.dmd_loss`
        with an online fake score, plus an MSE "for stability", on pure noise fed at ``t = 999`` or ``800``),
        which this plan does not list: run it after the TSCD stages (``examples/sdxl_hyper_sd.py
        --one_step_steps``). The unified LoRA of the paper samples 1-8 steps with the TCD sampler
        (``tcd_sample``, ``eta`` = TCD's gamma).

        Args:
            segments: the segment counts ``k`` of the stages, in order (default ``(8, 4, 2, 1)``), distinct
                ints in ``[1, num_inference_steps]``.
            num_inference_steps: ``N``, the DDIM grid of :func:`~diffdistill.schedulers.tscd_segments`, an int
                >= 1 dividing 1000 (default 50).

        Returns:
            The plan ``"hyper_sd"``, one ``tscd-k{k}`` stage per segment count.

        Raises:
            DTypeError: if ``segments`` is not a sequence.
            OptionError: if ``segments`` is empty, holds a non-int, a repeated value or a value above
                ``num_inference_steps``, or ``num_inference_steps`` is not an int >= 1 dividing 1000.
        """
        if isinstance(segments, (str, bytes)) or not isinstance(segments, Iterable):
            raise DTypeError(
                f"Expected `segments` to be a sequence of ints (e.g. (8, 4, 2, 1)), but got {type(segments).__name__}."
            )
        segs = [
            check_int(k, f"segments[{i}]", minimum=1, integral_float=True) for i, k in enumerate(segments)
        ]
        if not segs:
            raise OptionError("Expected at least one segment count in `segments`, but got none.")
        n = check_int(num_inference_steps, "num_inference_steps", minimum=1, integral_float=True)
        if 1000 % n != 0:
            raise OptionError(
                f"Expected `num_inference_steps` to divide 1000 (tscd_segments' grid), but got {num_inference_steps!r}."
            )
        if max(segs) > n:
            raise OptionError(
                f"Expected every segment count <= `num_inference_steps` ({n}), but got segments={segs}."
            )
        stages = []
        for i, k in enumerate(segs):
            w_adv = i / (len(segs) - 1) if len(segs) > 1 else 0.0
            stages.append(
                Stage(
                    f"tscd-k{k}",
                    loss="tscd",
                    num_segments=k,
                    discriminator="unconditional" if w_adv > 0 else None,
                    trainable="lora",
                    loss_weights={"mse": round(1.0 - w_adv, 6), "adversarial": round(w_adv, 6)},
                    options={"num_inference_steps": num_inference_steps, "lr": 1e-6, "ema_decay": 0.95},
                )
            )
        return cls(stages, name="hyper_sd")

    @classmethod
    def mlcm(cls, num_segments: int = 8, guidance_scale: float = 8.0) -> StagePlan:
        """MLCM / TLCM (Xie et al. 2024, arXiv:2406.05768, Sec. 3.2-3.3, 5.1).

        Stage 1, MLCD: data-free multistep consistency, M = 8 milestones, skip 20, no EMA (online target
        under no_grad), teacher DDIM + CFG w = 8, 12k iterations at lr 1e-4. Stage 2, inter-segment LCD:
        consistency only at the milestones (skip T/M), states from a 4-step student sample re-noised to a
        milestone, a 3-step teacher solver over T/M, 2k iterations at lr 1e-5.

        Args:
            num_segments: ``M``, the number of milestones: an int dividing 1000 (default 8). Stage 1's skip of
                20 needs ``1000 / M >= 20``; override ``options["skip"]`` for more milestones.
            guidance_scale: the teacher's CFG scale (default 8, the paper's ``w``).

        Returns:
            The plan ``"mlcm"`` (stages ``mlcd`` and ``lcd-inter-segment``).

        Raises:
            DTypeError: if ``guidance_scale`` is not a real number.
            OptionError: if ``num_segments`` is not such an int or ``guidance_scale`` is not finite.
        """
        m = check_int(num_segments, "num_segments", minimum=1, integral_float=True)
        if 1000 % m != 0:
            raise OptionError(
                f"Expected `num_segments` to divide 1000 (stage 2 steps from milestone to milestone on the grid of "
                f"step 1000 / num_segments), but got {num_segments!r}. Use e.g. 4, 8, 10, 20, 25 or 50."
            )
        num_segments = m
        guidance_scale = check_real(guidance_scale, "guidance_scale", allow_tensor=True)
        stages = [
            Stage(
                "mlcd",
                loss="multistep_consistency",
                num_segments=num_segments,
                teacher_steps=1,
                num_iterations=12000,
                options={"skip": 20, "guidance_scale": guidance_scale, "target": "online", "lr": 1e-4},
            ),
            Stage(
                "lcd-inter-segment",
                loss="consistency",
                num_segments=num_segments,
                teacher_steps=3,
                num_iterations=2000,
                options={
                    "skip": 1000 // num_segments,
                    "on_grid": True,
                    "student_sample_steps": 4,
                    "guidance_scale": guidance_scale,
                    "target": "online",
                    "lr": 1e-5,
                },
            ),
        ]
        return cls(stages, name="mlcm")
