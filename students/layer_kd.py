"""Layer-level knowledge distillation (SSD-1B / Segmind-Vega; BK-SDM).

.. math::

    \\mathcal L = \\underbrace{\\frac1B\\sum_b w_b\\, d(\\epsilon_S^{(b)}, y^{(b)})}_{\\text{task}}
      + \\lambda_\\text{out}\\, d(\\epsilon_S, \\mathrm{sg}\\,\\epsilon_T)
      + \\lambda_\\text{feat} \\sum_l \\frac{d(F_S^l, \\mathrm{sg}\\,F_T^l)}{n_l}

with ``d`` the mean squared error (or another :data:`~diffdistill.losses.DISTANCES` entry), ``y`` the
task target (noise or v), ``w_b`` optional per-sample task weights (min-SNR, ...), and ``n_l = 1``
(raw, as in SSD-1B and BK-SDM) or ``n_l = mean((F_T^l)^2) + eps`` (per-layer normalisation, so that
no layer's raw scale dominates; BK-SDM issue #21 reports that the raw feature term does). SSD-1B's
``distill_sdxl.py`` hard-codes ``lambda_out = lambda_feat = 0.5`` (Gupta et al. 2024, arXiv:2401.02677;
BK-SDM: Kim et al. 2023, arXiv:2305.15798, whose README also uses 0.5). The task weights only scale the task term: ``distill_sdxl.py``
with ``--snr_gamma`` silently dropped both KD terms, which this loss cannot do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import OptionError, ShapeError, check_ndim, check_positive, check_tensor
from .._outputs import first_tensor
from ..losses.distances import DistanceLike, compute_distance
from .feature_taps import FeatureTap, resolve_module_names

__all__ = ["LayerKD", "layer_kd_loss"]

logger = logging.getLogger(__name__)


def _check_pair(t_feat: torch.Tensor, s_feat: torch.Tensor, t_name: str, s_name: str) -> None:
    if t_feat.shape != s_feat.shape:
        raise ShapeError(
            f"Expected teacher feature `{t_name}` and student feature `{s_name}` to have the same shape, but got "
            f"teacher {tuple(t_feat.shape)} and student {tuple(s_feat.shape)}. Pair modules that keep the "
            "resolution and width (e.g. whole attention blocks, not removed layers), or drop this pair.",
            name=f"{t_name}/{s_name}",
            expected=tuple(t_feat.shape),
            actual=tuple(s_feat.shape),
        )


def _work(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _mean_distance(a: torch.Tensor, b: torch.Tensor, distance: DistanceLike) -> torch.Tensor:
    """Batch-mean distance; MSE through torch's fused ``mse_loss`` (one pass forward and backward).

    Equal to ``compute_distance(a, b, "mse")`` (mean of per-sample means = global mean); the fused
    kernel halves the cost of the feature terms (``benchmarks/kd_hooks.py``).
    """
    if isinstance(distance, str) and distance == "mse":
        return F.mse_loss(_work(a), _work(b))
    return compute_distance(a, b, distance).float()


def layer_kd_loss(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    student_features: Mapping[str, torch.Tensor],
    teacher_features: Mapping[str, torch.Tensor],
    target: torch.Tensor | None = None,
    *,
    task_weight: torch.Tensor | None = None,
    output_weight: float = 0.5,
    feature_weight: float = 0.5,
    normalize: bool = False,
    distance: DistanceLike = "mse",
    eps: float = 1e-8,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """task + ``output_weight`` · output-KD + ``feature_weight`` · Σ feature-KD (module docstring formula).

    Args:
        student_output: student prediction ``(B, ...)``.
        teacher_output: teacher prediction, same shape (detached here).
        student_features: ``{key: (B, ...)}`` student features.
        teacher_features: ``{key: (B, ...)}`` teacher features with the same keys and shapes (detached).
        target: task target (noise, v, ...) of ``student_output``'s shape; ``None`` drops the task term.
        task_weight: optional ``(B,)`` per-sample weights of the task term only (e.g. min-SNR).
        output_weight, feature_weight: ``lambda_out`` and ``lambda_feat`` (SSD-1B: 0.5 and 0.5).
        normalize: divide each layer's term by the teacher feature's mean square (+ ``eps``).
        distance: name from :data:`~diffdistill.losses.DISTANCES` or a callable (default MSE).
        eps: guard of the normalisation.

    Returns:
        The float32 scalar loss and detached logs: ``loss``, ``task``, ``output_kd``, ``feature_kd``
        and ``feature/<key>`` per layer (normalised when ``normalize``).

    Example:
        >>> s, t = torch.zeros(2, 4), torch.ones(2, 4)
        >>> loss, logs = layer_kd_loss(s, t, {"f": torch.zeros(2, 3)}, {"f": torch.full((2, 3), 2.0)},
        ...                            target=torch.ones(2, 4))
        >>> loss.item(), logs["feature/f"].item()
        (3.5, 4.0)
    """
    check_tensor(student_output, "student_output")
    check_tensor(teacher_output, "teacher_output")
    _check_pair(teacher_output, student_output, "output", "output")
    check_positive(output_weight, "output_weight", strict=False)
    check_positive(feature_weight, "feature_weight", strict=False)
    if set(student_features) != set(teacher_features):
        missing_s = sorted(set(teacher_features) - set(student_features))
        missing_t = sorted(set(student_features) - set(teacher_features))
        raise OptionError(
            "Expected `student_features` and `teacher_features` to have the same keys, but the student lacks "
            f"{missing_s} and the teacher lacks {missing_t}. Tap the same layer keys on both networks."
        )
    logs: dict[str, torch.Tensor] = {}
    zero = student_output.new_zeros((), dtype=torch.float32)
    if target is None:
        task = zero
    else:
        check_tensor(target, "target")
        _check_pair(target, student_output, "target", "output")
        if task_weight is None:
            task = _mean_distance(student_output, target, distance)
        else:
            check_tensor(task_weight, "task_weight")
            check_ndim(task_weight, "task_weight", 1, "(B,)")
            if task_weight.shape[0] != student_output.shape[0]:
                raise ShapeError(
                    f"Expected `task_weight` to have shape ({student_output.shape[0]},) (one weight per sample), "
                    f"but got {tuple(task_weight.shape)}.",
                    name="task_weight",
                    expected=(student_output.shape[0],),
                    actual=tuple(task_weight.shape),
                )
            per_sample = compute_distance(student_output, target, distance, reduction="none").float()
            task = (per_sample * task_weight.detach().float()).mean()
    output_kd = _mean_distance(student_output, teacher_output.detach(), distance)
    feature_kd = zero
    for key in sorted(student_features):
        s_feat, t_feat = student_features[key], teacher_features[key].detach()
        _check_pair(t_feat, s_feat, key, key)
        term = _mean_distance(s_feat, t_feat, distance)
        if normalize:
            term = term / (t_feat.float().pow(2).mean() + eps)
        logs[f"feature/{key}"] = term.detach()
        feature_kd = feature_kd + term
    loss = task + output_weight * output_kd + feature_weight * feature_kd
    logs.update(
        loss=loss.detach(), task=task.detach(), output_kd=output_kd.detach(), feature_kd=feature_kd.detach()
    )
    return loss, logs


class LayerKD(nn.Module):
    """Layer-level KD between a student and a frozen teacher, with the feature taps it needs.

    Args:
        student: the trained network (hooks are registered on its unwrapped module).
        teacher: the frozen network; it runs under ``torch.no_grad`` (set its eval mode and
            ``requires_grad_(False)`` yourself).
        layers: module names / glob patterns present in both networks, or ``{teacher_name: student_name}``
            to pair renamed modules, e.g. ``{"mid_block": "mid_block.resnets.0"}`` (SSD-1B's single-resnet
            mid block) or :meth:`~diffdistill.students.BlockRemovalReport.kd_pairs`.
        output_weight, feature_weight, normalize, distance, eps: see :func:`layer_kd_loss`.

    The networks are not registered as sub-modules (``kd.parameters()`` is empty, so they are not
    optimised or saved twice). Calling ``kd(sample, timestep, target, **cond)`` runs the teacher and
    the student on the same inputs and returns ``(loss, logs)``; the taps are emptied in the call, so
    no feature outlives the step. Per-layer logs are keyed by the student's module name.

    Example:
        >>> class Net(torch.nn.Module):  # called as net(sample, timestep, **cond), like a UNet
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)
        ...     def forward(self, x, t):
        ...         return self.head(torch.tanh(self.body(x)))
        >>> student, teacher = Net(), Net()
        >>> with LayerKD(student, teacher, ["body"]) as kd:
        ...     loss, logs = kd(torch.randn(2, 4), None, target=torch.randn(2, 4))
        >>> sorted(logs), len(student.body._forward_hooks)
        (['feature/body', 'feature_kd', 'loss', 'output_kd', 'task'], 0)
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        layers: str | Sequence[str] | Mapping[str, str],
        *,
        output_weight: float = 0.5,
        feature_weight: float = 0.5,
        normalize: bool = False,
        distance: DistanceLike = "mse",
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        check_positive(output_weight, "output_weight", strict=False)
        check_positive(feature_weight, "feature_weight", strict=False)
        if isinstance(layers, Mapping):
            pairs = {str(s): str(t) for t, s in layers.items()}
        else:
            names = resolve_module_names(student, layers)
            resolve_module_names(teacher, names)  # every student name must exist in the teacher
            pairs = {n: n for n in names}
        self.pairs: dict[str, str] = pairs  # student name -> teacher name
        self.output_weight = float(output_weight)
        self.feature_weight = float(feature_weight)
        self.normalize = bool(normalize)
        self.distance = distance
        self.eps = float(eps)
        # Plain attributes (not sub-modules): the networks belong to the training loop.
        self.__dict__["_nets"] = (student, teacher)
        self._warned: set[str] = set()
        self.student_tap = FeatureTap(student, {s: s for s in pairs})
        try:
            self.teacher_tap = FeatureTap(teacher, {s: t for s, t in pairs.items()}, detach=True)
        except Exception:  # a teacher name that does not resolve: leave no hook on the student
            self.student_tap.close()
            raise

    @property
    def student(self) -> nn.Module:
        """The student network."""
        return self.__dict__["_nets"][0]

    @property
    def teacher(self) -> nn.Module:
        """The teacher network."""
        return self.__dict__["_nets"][1]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Any,
        target: torch.Tensor | None = None,
        *,
        task_weight: torch.Tensor | None = None,
        teacher_fn: Callable[..., Any] | None = None,
        **cond: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run teacher (no grad) and student on ``(sample, timestep, **cond)`` and return :func:`layer_kd_loss`.

        ``teacher_fn`` replaces the teacher call (e.g. a wrapper that adds conditioning, or
        :class:`~diffdistill.students.TeacherView` for a LoRA student whose teacher is the same network with
        adapters disabled: pass the network as both ``student`` and ``teacher``); it must run the tapped
        teacher exactly once, on the student's batch. A CFG call does not fit feature KD: a batched
        cond + uncond pass records a doubled batch (refused as a shape mismatch) and two separate passes
        leave the features of the last one; distil features from a single conditional pass.
        Arguments as in :func:`layer_kd_loss`; ``timestep`` is passed through unchanged.
        """
        student, teacher = self.__dict__["_nets"]
        call = teacher_fn if teacher_fn is not None else teacher
        self.teacher_tap.pop()
        self.student_tap.pop()
        with torch.no_grad():
            teacher_out = first_tensor(call(sample, timestep, **cond), "teacher")
        teacher_feats = self.teacher_tap.pop()
        student_out = first_tensor(student(sample, timestep, **cond), "student")
        student_feats = self.student_tap.pop()
        self.teacher_tap.pop()  # a LoRA teacher view shares the student's modules: its tap saw this run too
        for key, s_feat in student_feats.items():
            t_feat = teacher_feats.get(key)
            if t_feat is not None:
                _check_pair(t_feat, s_feat, self.pairs[key], key)
            if student_out.requires_grad and not s_feat.requires_grad and key not in self._warned:
                self._warned.add(key)
                logger.warning(
                    "student feature %r has no autograd graph, so its KD term trains nothing; reentrant "
                    "gradient checkpointing (use_reentrant=True) runs checkpointed modules under no_grad. "
                    "Use diffusers' default (non-reentrant) checkpointing.",
                    key,
                )
        return layer_kd_loss(
            student_out,
            teacher_out,
            student_feats,
            teacher_feats,
            target,
            task_weight=task_weight,
            output_weight=self.output_weight,
            feature_weight=self.feature_weight,
            normalize=self.normalize,
            distance=self.distance,
            eps=self.eps,
        )

    def close(self) -> None:
        """Remove both taps' hooks."""
        self.student_tap.close()
        self.teacher_tap.close()

    def __enter__(self) -> LayerKD:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def extra_repr(self) -> str:
        return (
            f"layers={len(self.pairs)}, output_weight={self.output_weight}, feature_weight={self.feature_weight}, "
            f"normalize={self.normalize}"
        )
