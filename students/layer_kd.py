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

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import (
    DTypeError,
    OptionError,
    ShapeError,
    check_all_finite,
    check_bool,
    check_float_input,
    check_module,
    check_option,
    check_real,
    value_checks_enabled,
)
from .._modules import unwrap_model
from .._outputs import explain_dtype_errors, first_tensor
from ..losses.distances import DISTANCES, DistanceLike, _compute_distance, _work
from .feature_taps import FeatureTap, _resolve

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


def _check_distance(distance: Any) -> None:
    if isinstance(distance, str):
        check_option(distance, "distance", DISTANCES)
    elif not callable(distance):
        raise DTypeError(
            f"Expected `distance` to be one of {list(DISTANCES)} or a callable fn(input, target), but got "
            f"{type(distance).__name__}."
        )


def _check_features(features: Any, arg: str) -> Mapping[str, torch.Tensor]:
    if not isinstance(features, Mapping):
        raise DTypeError(
            f"Expected `{arg}` to be a dict {{key: tensor}} (e.g. FeatureTap.pop()), but got "
            f"{type(features).__name__}; pass {{}} when there are no features."
        )
    for key, value in features.items():
        check_float_input(value, f"{arg}[{key!r}]", finite=False)
    return features


def _mean_distance(a: torch.Tensor, b: torch.Tensor, distance: DistanceLike) -> torch.Tensor:
    """Batch-mean distance; MSE through torch's fused ``mse_loss`` (one pass forward and backward).

    Equal to ``compute_distance(a, b, "mse")`` (mean of per-sample means = global mean); the fused
    kernel halves the cost of the feature terms (``benchmarks/kd_hooks.py``).
    """
    if b.is_inference():  # a teacher run under torch.inference_mode(): autograd may not save it as it is
        b = b.clone()
    if isinstance(distance, str) and distance == "mse":
        return F.mse_loss(_work(a), _work(b))
    return _work(_compute_distance(a, b, distance, input_name="student", target_name="teacher", finite=False))


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
        student_output: Student prediction ``(B, ...)``, floating point.
        teacher_output: Teacher prediction of the same shape (detached here).
        student_features: ``{key: (B, ...)}`` student features (e.g. ``FeatureTap.pop()``); ``{}`` for
            output KD only.
        teacher_features: ``{key: (B, ...)}`` teacher features with the same keys and, key by key, the same
            shapes (detached here).
        target: Task target (noise, v, ...) of ``student_output``'s shape; ``None`` (the default) drops the
            task term (it is then 0).
        task_weight: Optional ``(B,)`` non-negative per-sample weights of the task term only (e.g. min-SNR);
            needs ``target``. ``None``: every sample weighs 1.
        output_weight: ``lambda_out``, the weight of the output-KD term (>= 0; SSD-1B: 0.5).
        feature_weight: ``lambda_feat``, the weight of the summed feature-KD terms (>= 0; SSD-1B: 0.5).
        normalize: Divide each layer's term by the teacher feature's mean square (+ ``eps``). Default
            ``False``: raw terms, as SSD-1B and BK-SDM.
        distance: Name from :data:`~diffdistill.losses.DISTANCES` or a callable ``fn(input, target)``
            (default MSE).
        eps: Guard of the normalisation (> 0).

    Returns:
        The float32 scalar loss (float64 for float64 inputs) and detached logs: ``loss``, ``task``,
        ``output_kd``, ``feature_kd`` and ``feature/<key>`` per layer (normalised when ``normalize``).

    Raises:
        DTypeError: an output, feature, ``target`` or ``task_weight`` is not a floating-point tensor; a
            feature mapping is not a dict; a weight is not a number; ``distance`` is neither a name nor a
            callable.
        ShapeError: an output or feature is empty; ``teacher_output`` or ``target`` differs in shape from
            ``student_output``; a teacher feature differs in shape from its student feature; ``task_weight``
            is not ``(B,)``.
        OptionError: the feature mappings have different keys; ``task_weight`` without ``target``; a weight
            is negative or not finite; ``eps`` is not > 0; ``distance`` is an unknown name; a task weight is
            negative (a value check).
        NonFiniteError: an output, feature, ``target`` or ``task_weight`` holds NaN or Inf (value checks, one
            device synchronisation for all of them).

    Example:
        >>> s, t = torch.zeros(2, 4), torch.ones(2, 4)
        >>> loss, logs = layer_kd_loss(s, t, {"f": torch.zeros(2, 3)}, {"f": torch.full((2, 3), 2.0)},
        ...                            target=torch.ones(2, 4))
        >>> loss.item(), logs["feature/f"].item()
        (3.5, 4.0)
    """
    return _layer_kd_loss(
        student_output,
        teacher_output,
        student_features,
        teacher_features,
        target,
        task_weight=task_weight,
        output_weight=output_weight,
        feature_weight=feature_weight,
        normalize=normalize,
        distance=distance,
        eps=eps,
    )


def _layer_kd_loss(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    student_features: Mapping[str, torch.Tensor],
    teacher_features: Mapping[str, torch.Tensor],
    target: torch.Tensor | None,
    *,
    task_weight: torch.Tensor | None,
    output_weight: float,
    feature_weight: float,
    normalize: bool,
    distance: DistanceLike,
    eps: float,
    inputs: Sequence[tuple[str, torch.Tensor]] = (),
    checked_options: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`layer_kd_loss`; ``inputs`` are the caller's inputs to check for finiteness first (in the same
    synchronisation), ``checked_options`` skips the checks of options a module validated once."""
    check_float_input(student_output, "student_output", finite=False)
    check_float_input(teacher_output, "teacher_output", finite=False)
    if teacher_output.shape != student_output.shape:
        raise ShapeError(
            f"Expected `student_output` and `teacher_output` to have the same shape, but got student_output "
            f"{tuple(student_output.shape)} and teacher_output {tuple(teacher_output.shape)}. Run the teacher "
            "on the student's batch (a CFG call doubles it) and compare the same parameterisation.",
            name="student_output/teacher_output",
            expected=tuple(student_output.shape),
            actual=tuple(teacher_output.shape),
        )
    if not checked_options:
        output_weight = check_real(output_weight, "output_weight", low=0.0)
        feature_weight = check_real(feature_weight, "feature_weight", low=0.0)
        check_bool(normalize, "normalize")
        eps = check_real(eps, "eps", low=0.0, strict=True)
        _check_distance(distance)
    _check_features(student_features, "student_features")
    _check_features(teacher_features, "teacher_features")
    if set(student_features) != set(teacher_features):
        missing_s = sorted(set(teacher_features) - set(student_features))
        missing_t = sorted(set(student_features) - set(teacher_features))
        raise OptionError(
            "Expected `student_features` and `teacher_features` to have the same keys, but the student lacks "
            f"{missing_s} and the teacher lacks {missing_t}. Tap the same layer keys on both networks."
        )
    keys = sorted(student_features)
    for key in keys:
        s_feat, t_feat = student_features[key], teacher_features[key]
        if s_feat.shape != t_feat.shape:
            raise ShapeError(
                f"Expected `student_features[{key!r}]` and `teacher_features[{key!r}]` to have the same shape, "
                f"but got student {tuple(s_feat.shape)} and teacher {tuple(t_feat.shape)}. Pair modules that "
                "keep the resolution and width, or drop this key.",
                name=f"student_features/teacher_features[{key!r}]",
                expected=tuple(t_feat.shape),
                actual=tuple(s_feat.shape),
            )
    finite: list[tuple[str, torch.Tensor]] = [*inputs]
    if target is not None:
        check_float_input(target, "target", finite=False)
        if target.shape != student_output.shape:
            raise ShapeError(
                f"Expected `target` to have the shape of the student's prediction (`student_output`) "
                f"{tuple(student_output.shape)}, but got "
                f"{tuple(target.shape)}. Pass the task target (noise, v, ...) of the student's prediction; "
                "shapes are not broadcast.",
                name="target",
                expected=tuple(student_output.shape),
                actual=tuple(target.shape),
            )
        finite.append(("target", target))
    if task_weight is not None:
        if target is None:
            raise OptionError(
                "Expected `target` with `task_weight`: the weights scale the task term, which needs a target "
                "(without one there is no task term and the weights would be ignored)."
            )
        check_float_input(task_weight, "task_weight", ndim=1, layout="(B,)", finite=False)
        if task_weight.shape[0] != student_output.shape[0]:
            raise ShapeError(
                f"Expected `task_weight` to have shape ({student_output.shape[0]},) (one weight per sample), "
                f"but got {tuple(task_weight.shape)}.",
                name="task_weight",
                expected=(student_output.shape[0],),
                actual=tuple(task_weight.shape),
            )
        finite.append(("task_weight", task_weight))
    finite += [("student_output", student_output), ("teacher_output", teacher_output)]
    finite += [(f"student_features[{k!r}]", student_features[k]) for k in keys]
    finite += [(f"teacher_features[{k!r}]", teacher_features[k]) for k in keys]
    check_all_finite(finite)
    if task_weight is not None and value_checks_enabled() and bool((task_weight < 0).any()):
        raise OptionError(
            f"Expected `task_weight` to be >= 0, but it holds negative values (min {float(task_weight.min())}). "
            "Per-sample task weights (min-SNR, ...) are non-negative; a negative weight rewards the error."
        )
    logs: dict[str, torch.Tensor] = {}
    zero = student_output.new_zeros((), dtype=torch.promote_types(student_output.dtype, torch.float32))
    if target is None:
        task = zero
    elif task_weight is None:
        task = _mean_distance(student_output, target, distance)
    else:
        per_sample = _compute_distance(
            student_output, target, distance, reduction="none", input_name="student_output", finite=False
        )
        task = (_work(per_sample) * _work(task_weight.detach())).mean()
    output_kd = _mean_distance(student_output, teacher_output.detach(), distance)
    feature_kd = zero
    for key in keys:
        s_feat, t_feat = student_features[key], teacher_features[key].detach()
        term = _mean_distance(s_feat, t_feat, distance)
        if normalize:
            term = term / (_work(t_feat).pow(2).mean() + eps)
        logs[f"feature/{key}"] = term.detach()
        feature_kd = feature_kd + term
    loss = task + output_weight * output_kd + feature_weight * feature_kd
    logs.update(
        loss=loss.detach(), task=task.detach(), output_kd=output_kd.detach(), feature_kd=feature_kd.detach()
    )
    return loss, logs


def _timestep_keyword(net: nn.Module) -> bool:
    """Whether ``net`` takes ``timestep`` by keyword: its ``forward`` has a ``timestep`` parameter that is not the
    second one (diffusers' SD3 / FLUX transformers: ``forward(hidden_states, encoder_hidden_states,
    pooled_projections, timestep, ...)``). A UNet (``forward(sample, timestep, ...)``) and any other network take it
    as the second positional argument, as before."""
    try:
        params = list(inspect.signature(unwrap_model(net).forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    return "timestep" in params and params.index("timestep") != 1


def _call(net: Callable[..., Any], by_keyword: bool, sample: torch.Tensor, timestep: Any, cond: Any) -> Any:
    if by_keyword:
        return net(sample, timestep=timestep, **cond)
    return net(sample, timestep, **cond)


def _pairs(student: nn.Module, teacher: nn.Module, layers: Any) -> dict[str, str]:
    """``{student module: teacher module}`` of ``layers``, every name resolved in its network."""
    if not isinstance(layers, Mapping):
        names = _resolve(student, layers, "layers", owner="the student ")
        _resolve(
            teacher, names, "layers", owner="the teacher "
        )  # every student name must exist in the teacher
        return {n: n for n in names}
    if not layers:
        raise OptionError(
            "Expected `layers` to pair at least one module, but the mapping is empty. Pass e.g. "
            "{'mid_block': 'mid_block'} or report.kd_pairs()."
        )
    pairs: dict[str, str] = {}
    for t_pattern, s_pattern in layers.items():
        if not isinstance(t_pattern, str) or not isinstance(s_pattern, str):
            raise DTypeError(
                "Expected `layers` to map teacher module names to student module names (str to str), but got "
                f"{type(t_pattern).__name__} {t_pattern!r} -> {type(s_pattern).__name__} {s_pattern!r}."
            )
        resolved = []
        for pattern, net, side in ((t_pattern, teacher, "teacher"), (s_pattern, student, "student")):
            found = _resolve(net, pattern, "layers", owner=f"the {side} ")
            if len(found) != 1:
                raise OptionError(
                    f"Expected the {side} name {pattern!r} in `layers` to name exactly one module, but it matched "
                    f"{len(found)}: {found[:5]}. Give one explicit name per pair."
                )
            resolved.append(found[0])
        t_name, s_name = resolved
        if s_name in pairs:
            raise OptionError(
                f"Expected each student module to appear once in `layers`, but {s_name!r} is paired with both "
                f"{pairs[s_name]!r} and {t_name!r}. Keep one pair per student module."
            )
        pairs[s_name] = t_name
    return pairs


class LayerKD(nn.Module):
    """Layer-level KD between a student and a frozen teacher, with the feature taps it needs.

    Args:
        student: The trained network (hooks are registered on its unwrapped module).
        teacher: The frozen network; it runs under ``torch.no_grad`` (set its eval mode and
            ``requires_grad_(False)`` yourself). It may be the student itself when each call passes a
            ``teacher_fn`` (a :class:`~diffdistill.students.TeacherView` of a LoRA student).
        layers: Module names / glob patterns present in both networks (for diffusers transformers also block
            indices, see :func:`~diffdistill.students.transformer_block_names`), or ``{teacher_name: student_name}``
            to pair renamed modules, e.g. ``{"mid_block": "mid_block.resnets.0"}`` (SSD-1B's single-resnet
            mid block) or :meth:`~diffdistill.students.BlockRemovalReport.kd_pairs` (each name must then
            resolve to exactly one module, and each student module appear once; for transformers
            :meth:`~diffdistill.students.TransformerBlockRemovalReport.kd_pairs`). At least one layer.
        output_weight: ``lambda_out`` (>= 0, default 0.5 as SSD-1B), see :func:`layer_kd_loss`.
        feature_weight: ``lambda_feat`` (>= 0, default 0.5 as SSD-1B), see :func:`layer_kd_loss`.
        normalize: Divide each layer's term by the teacher feature's mean square (default ``False``: raw).
        distance: Name from :data:`~diffdistill.losses.DISTANCES` or a callable (default MSE).
        eps: Guard of the normalisation (> 0).

    Raises:
        DTypeError: ``student`` / ``teacher`` is not an ``nn.Module``; ``layers`` is neither names nor a
            mapping of names; a weight is not a number; ``normalize`` is not a bool; ``distance`` is neither
            a name nor a callable.
        OptionError: ``layers`` is empty, names a module one of the networks lacks, maps a name to no or
            several modules, or pairs one student module twice; a weight is negative or not finite; ``eps``
            is not > 0; ``distance`` is an unknown name.

    The networks are not registered as sub-modules (``kd.parameters()`` is empty, so they are not
    optimised or saved twice). Calling ``kd(sample, timestep, target, **cond)`` runs the teacher and
    the student on the same inputs and returns ``(loss, logs)``; the taps are emptied in the call, so
    no feature outlives the step. Per-layer logs are keyed by the student's module name.

    Transformer backbones (diffusers ``SD3Transformer2DModel``, ``FluxTransformer2DModel``): the joint and
    single-stream blocks' image stream is compared (:data:`~diffdistill.students.IMAGE_STREAM_OUTPUT`), and
    ``timestep`` is passed by keyword to a network whose ``forward`` takes it after the text inputs, so
    ``kd(latents, timestep, target, encoder_hidden_states=..., pooled_projections=...)`` works for both
    families (FLUX also ``img_ids=``, ``txt_ids=``, ``guidance=``), with the timestep each expects: SD3
    ``sigma * 1000``, FLUX ``sigma`` (its ``forward`` multiplies by 1000).

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
        check_module(student, "student")
        check_module(teacher, "teacher")
        self.output_weight = check_real(output_weight, "output_weight", low=0.0)
        self.feature_weight = check_real(feature_weight, "feature_weight", low=0.0)
        self.normalize = check_bool(normalize, "normalize")
        _check_distance(distance)
        self.distance = distance
        self.eps = check_real(eps, "eps", low=0.0, strict=True)
        self.pairs: dict[str, str] = _pairs(student, teacher, layers)  # student name -> teacher name
        # Plain attributes (not sub-modules): the networks belong to the training loop.
        self.__dict__["_nets"] = (student, teacher)
        # diffusers transformers take `timestep` after the text inputs: pass it by name to them.
        self._timestep_kw = (_timestep_keyword(student), _timestep_keyword(teacher))
        self._warned: set[str] = set()
        self.student_tap = FeatureTap(student, {s: s for s in self.pairs})
        try:
            self.teacher_tap = FeatureTap(teacher, {s: t for s, t in self.pairs.items()}, detach=True)
        except Exception:  # pragma: no cover - the names were resolved above; leave no hook on the student
            self.student_tap.close()
            raise

    @property
    def student(self) -> nn.Module:
        """The student network.

        Returns:
            The ``student`` passed to the constructor (wrapper included).
        """
        return self.__dict__["_nets"][0]

    @property
    def teacher(self) -> nn.Module:
        """The teacher network.

        Returns:
            The ``teacher`` passed to the constructor (wrapper included).
        """
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

        A CFG call does not fit feature KD: a batched cond + uncond pass records a doubled batch (refused as
        a shape mismatch) and two separate passes leave the features of the last one; distil features from a
        single conditional pass.

        Args:
            sample: The networks' input ``(B, ...)`` (noisy latents), floating point, in the networks' dtype
                unless under autocast.
            timestep: Passed through unchanged to both networks (e.g. ``(B,)`` int64 timesteps, or None).
            target: Task target of the student's output shape (noise, v, ...). Defaults to ``None``: no task
                term, KD only.
            task_weight: Optional ``(B,)`` non-negative per-sample weights of the task term (needs ``target``).
            teacher_fn: Replaces the teacher call (e.g. a wrapper that adds conditioning, or
                :class:`~diffdistill.students.TeacherView` for a LoRA student whose teacher is the same network
                with adapters disabled: pass the network as both ``student`` and ``teacher``); it must run the
                tapped teacher exactly once, on the student's batch; it is called like the teacher (``timestep``
                by keyword when the teacher's ``forward`` takes it so). Defaults to ``None``: ``teacher(sample,
                timestep, **cond)``.
            **cond: Conditioning keyword arguments of both networks (``encoder_hidden_states=...``, ...).

        Returns:
            ``(loss, logs)`` of :func:`layer_kd_loss`: the float32 scalar loss with the student's graph, and
            detached logs (``loss``, ``task``, ``output_kd``, ``feature_kd``, ``feature/<student module>``).

        Raises:
            DTypeError: ``sample`` is not a floating-point tensor or its dtype does not fit a network (outside
                autocast); ``teacher_fn`` is not callable; a network or tapped module returns no tensor.
            ShapeError: ``sample`` is empty; a teacher and student feature (or output) differ in shape;
                ``target`` / ``task_weight`` do not fit (see :func:`layer_kd_loss`).
            OptionError: the KD is closed; ``teacher`` is the student itself and no ``teacher_fn`` is given (the
                student would distil from itself); a tapped module did not run in one of the networks; a task
                weight is negative (a value check); ``task_weight`` without ``target``.
            NonFiniteError: ``sample``, ``target``, ``task_weight``, an output or a feature holds NaN or Inf (a
                value check, one synchronisation per call).
        """
        student, teacher = self.__dict__["_nets"]
        if self.student_tap.closed or self.teacher_tap.closed:
            raise OptionError(
                "Expected an open LayerKD, but it is closed (its hooks were removed by close() or at the end of "
                "its `with` block), so it would record no features. Build a new LayerKD."
            )
        check_float_input(sample, "sample", finite=False)
        if teacher_fn is not None and not callable(teacher_fn):
            raise DTypeError(
                f"Expected `teacher_fn` to be callable like the teacher (e.g. TeacherView(unet)), but got "
                f"{type(teacher_fn).__name__}."
            )
        if teacher_fn is None and unwrap_model(teacher) is unwrap_model(student):
            raise OptionError(
                "Expected a teacher other than the student, but `teacher` is the student itself and no "
                "`teacher_fn` was given: the student would distil from its own output (a zero KD loss). For a "
                "LoRA student pass teacher_fn=TeacherView(unet)."
            )
        call = teacher_fn if teacher_fn is not None else teacher
        self.teacher_tap.pop()
        self.student_tap.pop()
        with torch.no_grad(), explain_dtype_errors("teacher", sample, "sample"):
            teacher_out = first_tensor(_call(call, self._timestep_kw[1], sample, timestep, cond), "teacher")
        teacher_feats = self.teacher_tap.pop()
        with explain_dtype_errors("student", sample, "sample"):
            student_out = first_tensor(
                _call(student, self._timestep_kw[0], sample, timestep, cond), "student"
            )
        student_feats = self.student_tap.pop()
        self.teacher_tap.pop()  # a LoRA teacher view shares the student's modules: its tap saw this run too
        for side, feats in (("student", student_feats), ("teacher", teacher_feats)):
            not_run = [
                key if side == "student" else self.pairs[key] for key in self.pairs if key not in feats
            ]
            if not_run:
                raise OptionError(
                    f"Expected every tapped {side} module to run in the {side}'s forward, but {not_run[:3]} did "
                    f"not (no output recorded). Tap modules on the forward path for these inputs"
                    + (", and make teacher_fn run the tapped teacher." if side == "teacher" else ".")
                )
        for key, s_feat in student_feats.items():
            _check_pair(teacher_feats[key], s_feat, self.pairs[key], key)
            if student_out.requires_grad and not s_feat.requires_grad and key not in self._warned:
                self._warned.add(key)
                logger.warning(
                    "student feature %r has no autograd graph, so its KD term trains nothing; reentrant "
                    "gradient checkpointing (use_reentrant=True) runs checkpointed modules under no_grad. "
                    "Use diffusers' default (non-reentrant) checkpointing.",
                    key,
                )
        return _layer_kd_loss(
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
            inputs=[("sample", sample)],
            checked_options=True,
        )

    def close(self) -> None:
        """Remove both taps' hooks (safe to call twice); the KD refuses to run after it."""
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
