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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._checks import OptionError, check_option

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
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise OptionError(
                    f"Stage {self.name!r}: expected `{key}` to be None or an int >= 1, but got {value!r}."
                )
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
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)


class StagePlan:
    """An ordered sequence of :class:`Stage` s with unique names.

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
        stages = tuple(stages)
        if not stages:
            raise OptionError("Expected `stages` to hold at least one Stage, but got none.")
        for i, stage in enumerate(stages):
            if not isinstance(stage, Stage):
                raise OptionError(
                    f"Expected every stage to be a Stage, but stage {i} is {type(stage).__name__}."
                )
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
        return self.stages[key]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StagePlan) and self.stages == other.stages and self.name == other.name

    def __hash__(self) -> int:
        return hash((self.name, tuple(s.name for s in self.stages)))

    def __repr__(self) -> str:
        return f"StagePlan({self.name!r}, [{', '.join(repr(s.name) for s in self.stages)}])"

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., "stages": [stage dicts]}``, JSON-serialisable."""
        return {"name": self.name, "stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StagePlan:
        """Inverse of :meth:`to_dict`; unknown stage fields raise with the allowed list."""
        allowed = {f.name for f in dataclasses.fields(Stage)}
        stages = []
        for raw in data.get("stages", []):
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
        """
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

        The distance is MSE + adversarial; the paper increases the adversarial weight and lowers the MSE
        weight across stages without giving numbers. The default weights move linearly from
        (mse 1.0, adversarial 0.0) at the first stage to (mse 0.0, adversarial 1.0) at the last; they are a
        documented choice of this library, so override them for your run; the last stage is purely
        adversarial (MSE weight 0). lr 1e-6, batch 512 in the paper. The target EMA decay 0.95 is LCM's
        (the paper does not give its value): another library choice.
        """
        segs = [int(k) for k in segments]
        if not segs:
            raise OptionError("Expected at least one segment count in `segments`, but got none.")
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
        """
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
