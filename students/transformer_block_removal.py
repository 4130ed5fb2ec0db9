"""Block removal for rectified-flow transformers (SD3 / SD3.5 MMDiT, FLUX, Qwen-Image, Wan): drop whole blocks.

A transformer student keeps a subset of the teacher's blocks in their order: SD3's joint blocks
(``transformer_blocks``), FLUX's double-stream (``transformer_blocks``) and single-stream
(``single_transformer_blocks``) blocks, Qwen-Image's double-stream blocks (``transformer_blocks``, all alike), Wan's
video blocks (``blocks``: self-attention over all frames'
tokens, cross-attention to the text, feed-forward; all alike, so any subset builds a valid student). :func:`transformer_student_config` writes the diffusers config of that
student, :func:`build_transformer_student` builds it and copies every kept block from the teacher by name (the
block indices remapped: student ``transformer_blocks.j`` <- teacher ``transformer_blocks.m(j)``; every other
module keeps its name), and the :class:`TransformerBlockRemovalReport` lists the removed blocks, the parameters
and FLOPs removed (FLOPs counted on the meta device at a given latent size and text length,
:func:`transformer_flops`) and the KD pairs: each student block matches the output (image stream) of the
teacher block it was initialised from (:meth:`TransformerBlockRemovalReport.kd_pairs`, for
:class:`~diffdistill.students.LayerKD`), as Flux-Mini's feature alignment (student block ``x`` against teacher
block ``4x``, TencentARC/flux-mini README); ``kd_pairs("span_end")`` pairs it instead with the last teacher block
of the span it replaces (our choice).

Blocks are indexed in execution order (:func:`~diffdistill.students.transformer_block_names`); a spec keeps
blocks by count (``int``), fraction of the teacher's (``float``, rounded half up, at least 1) or explicit indices,
chosen by a rule (``"spread"``: evenly spaced, first and last included; ``"first"``; ``"last"``), or every
``stride``-th block of the whole sequence.

SD3's last joint block is *context-pre-only* (diffusers builds block ``num_layers - 1`` with
``context_pre_only=True``: its text stream has no output projection, no feed-forward, and an
``AdaLayerNormContinuous`` (scale, shift) instead of the six-way ``AdaLayerNormZero``), so whichever block a
student ends with becomes context-pre-only:

* the teacher's last block kept (``"spread"``, ``"last"``): copied as is;
* the teacher's last block removed: the student's last block is the teacher's full block ``m``; its image
  stream keeps every weight, the text-stream output weights (``attn.to_add_out``, ``ff_context``) are dropped,
  and the continuous norm takes the (shift, scale) rows of the teacher block's ``norm1_context`` in (scale,
  shift) order. The student block's image output then equals the teacher block's exactly (its text q/k/v are
  those of the teacher block), and the report's ``notes`` say so.

Presets (:data:`TRANSFORMER_PRESETS`; counts scale to tiny configs by the fraction of the published depth):

================  =================================================================================================
``"flux-lite-8b"``  FLUX: 8 of 19 double-stream blocks kept (spread: 0, 3, 5, 8, 10, 13, 15, 18 of FLUX.1-dev),
                    all 38 single-stream blocks: 8.163 B parameters (FLUX.1-dev 11.901 B). Architecture of
                    Freepik's Flux.1-Lite-8B as inferred [calc]: its 16.33 GB bf16 transformer is 8.16 B
                    parameters. One double block is 0.340 B, one single block 0.142 B, and three whole-block
                    removals give 8.163 B within 0.2 MB of each other: 11 doubles; 6 doubles + 12 singles; 1 double
                    + 24 singles. Freepik's card analyses only MMDiT (double) blocks (skipping an early one hurts,
                    others barely), hence 11 doubles: moderately sure of the depths, not sure of the blocks (not
                    listed): which 8 is our choice (spread, block 0 kept).
``"flux-mini"``     FLUX: every 4th block of the 57 (stride 4): double 0, 4, 8, 12, 16 and single 1, 5, ..., 37
                    of FLUX.1-dev, i.e. 5 + 10 blocks, 3.179 B parameters; TencentARC's Flux-Mini (19 + 38 ->
                    5 + 10, 3.2 B, feature alignment of student block x to teacher block 4x: exactly the KD
                    pairs of this preset). Flux-Mini initialises from "several most important blocks", not
                    listed: initialising from the KD targets is our choice.
``"sd3-half"``      SD3 / SD3.5: every other joint block, first and last kept (spread 0.5; SD3.5-Medium 24 -> 12,
                    SD3.5-Large 38 -> 19). Our choice: TinyFusion's depth ratio (DiT-XL/2 28 -> 14, arXiv:2412.01199)
                    without its learned (Gumbel-softmax) layer selection.
``"sd3-early"``     SD3 / SD3.5: the first half of the joint blocks (the last block removed, so the student's last
                    block is converted to context-pre-only, see above). Our choice, after HierarchicalPrune
                    (arXiv:2508.04663, abstract: keep early blocks, prune late ones) without its sensitivity
                    analysis.
``"wan-half"``      Wan 2.1 / 2.2 (``WanTransformer3DModel``): every other block, first and last kept (spread 0.5;
                    Wan2.1-T2V-1.3B 30 -> 15 blocks, 1.42 B -> 0.74 B parameters). Our choice, TinyFusion's depth
                    ratio as ``"sd3-half"``. No published block-pruned Wan is reproduced: we know of none with a
                    fixed, listed block subset (PARE, arXiv:2605.27336, prunes Wan2.1-14B's attention heads and routes
                    blocks per input and step, which is not a static student).
``"qwen-half"``     Qwen-Image (``QwenImageTransformer2DModel``): every other double-stream block, first and last
                    kept (spread 0.5; Qwen-Image 60 -> 30 blocks). Our choice, TinyFusion's depth ratio as
                    ``"sd3-half"``; PPCL (arXiv:2511.16156, Qwen-Image 20 B -> 10 B) removes contiguous spans found
                    by linear probes and CKA, not reproduced here.
================  =================================================================================================

Qwen-Image's FLOPs are counted on packed latents (as FLUX's) with 512 text tokens (``QwenImagePipeline``'s
``max_sequence_length``). Wan's FLOPs are counted for video latents ``(frames, height, width)`` (default ``(21, 60, 104)``: 81 frames at
480 x 832, Wan's VAE compressing time by 4 and space by 8) and 512 umT5 tokens (``WanPipeline``'s
``max_sequence_length``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .._checks import DTypeError, OptionError, ShapeError, check_bool, check_module, check_option
from .._modules import unwrap_model
from .block_removal import _spread_indices

__all__ = [
    "TRANSFORMER_PRESETS",
    "TransformerBlockRemovalReport",
    "TransformerBlockRemovalSpec",
    "build_transformer_student",
    "transformer_flops",
    "transformer_student_config",
]

logger = logging.getLogger(__name__)

BlockKeep = int | float | Sequence[int] | None
"""``None`` keeps every block; an ``int`` is a count, a ``float`` in (0, 1] a fraction of the teacher's blocks
(rounded half up, at least 1), a sequence the kept indices."""
KeepRule = Literal["first", "last", "spread"] | Callable[[int, int], Sequence[int]]

_SD3, _FLUX, _WAN = "SD3Transformer2DModel", "FluxTransformer2DModel", "WanTransformer3DModel"
_QWEN = "QwenImageTransformer2DModel"
_CLASSES = (_SD3, _FLUX, _QWEN, _WAN)
_LISTS = {"blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}
_LIST_ORDER = (
    "transformer_blocks",
    "single_transformer_blocks",
    "blocks",
)  # execution order of the block lists
_WAN_LATENT = (21, 60, 104)  # 81 frames at 480 x 832 (Wan 2.1's VAE: time / 4, space / 8)


def _main_list(kind: str) -> str:
    """The attribute of the joint / double-stream / Wan block list that a spec's ``blocks`` field keeps."""
    return "blocks" if kind == _WAN else "transformer_blocks"


def _check_keep(value: Any, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, list, tuple)):
        raise DTypeError(
            f"Expected `{what}` to be None (keep all), an int (blocks kept), a float in (0, 1] (fraction kept) or "
            f"a tuple of block indices, but got {type(value).__name__} {value!r}."
        )
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise OptionError(f"Expected the fraction `{what}` to lie in (0, 1], but got {value!r}.")
    if isinstance(value, int) and value < 1:
        raise OptionError(
            f"Expected `{what}` to be >= 1 (a student keeps a block of each kind), but got {value}."
        )
    if isinstance(value, (list, tuple)):
        if not value:
            raise OptionError(f"Expected `{what}` to list at least one block index, but it is empty.")
        for i in value:
            if isinstance(i, bool) or not isinstance(i, int):
                raise DTypeError(
                    f"Expected every entry of `{what}` to be an int block index, but got {type(i).__name__} {i!r}."
                )
        if len(set(value)) != len(value):
            raise OptionError(f"Expected the indices in `{what}` to be distinct, but got {list(value)}.")


@dataclass(frozen=True)
class TransformerBlockRemovalSpec:
    """Which transformer blocks a student keeps.

    Args:
        name: Label used in reports (default ``"custom"``).
        blocks: Joint (SD3) / double-stream (FLUX) / Wan blocks kept: None (all, the default), a count, a fraction
            of the teacher's or the kept indices (negative indices count from the end).
        single_blocks: FLUX's single-stream blocks kept, as ``blocks`` (must stay None for SD3 and Wan).
        rule: Which blocks a count or fraction keeps: ``"spread"`` (the default: evenly spaced, first and last
            included, ties rounded half up: depth 6 -> 3 keeps 0, 3, 5, as UNet
            block removal's ``"spread"``), ``"first"``, ``"last"`` or ``fn(teacher_count, student_count) -> indices``.
        stride: Keep every ``stride``-th block of the whole execution order (FLUX: double then single blocks),
            starting at block 0, instead of ``blocks`` / ``single_blocks`` (Flux-Mini: 4). Default None.

    Raises:
        DTypeError: a field has the wrong type (a string count, a non-int index or stride).
        OptionError: a count < 1, a fraction outside (0, 1], an empty or repeated index list, an unknown rule,
            a stride < 1 or a stride together with ``blocks`` / ``single_blocks``.

    Example:
        >>> TransformerBlockRemovalSpec(blocks=0.5).rule
        'spread'
    """

    name: str = "custom"
    blocks: BlockKeep = None
    single_blocks: BlockKeep = None
    rule: KeepRule = "spread"
    stride: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise DTypeError(
                f"Expected `name` to be a string, but got {type(self.name).__name__} {self.name!r}."
            )
        _check_keep(self.blocks, "blocks")
        _check_keep(self.single_blocks, "single_blocks")
        if not callable(self.rule) and self.rule not in ("first", "last", "spread"):
            raise OptionError(
                f"Expected `rule` to be one of ['first', 'last', 'spread'] or a callable, but got {self.rule!r}."
            )
        if self.stride is not None:
            if isinstance(self.stride, bool) or not isinstance(self.stride, int):
                raise DTypeError(
                    f"Expected `stride` to be an int or None, but got {type(self.stride).__name__}."
                )
            if self.stride < 1:
                raise OptionError(f"Expected `stride` to be >= 1, but got {self.stride}.")
            if self.blocks is not None or self.single_blocks is not None:
                raise OptionError(
                    "Expected either `stride` or `blocks` / `single_blocks`, but got both: a stride picks the blocks "
                    "of the whole sequence itself."
                )

    def replace(self, **changes: Any) -> TransformerBlockRemovalSpec:
        """A copy with some fields changed, e.g. ``TRANSFORMER_PRESETS["sd3-half"].replace(rule="first")``.

        Args:
            **changes: New values of fields, by name (checked as by the constructor).

        Returns:
            A new spec (this one is frozen and unchanged).

        Raises:
            OptionError: a name is not a field, or a new value is out of range.
            DTypeError: a new value has the wrong type.
        """
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise OptionError(
                f"Expected fields of TransformerBlockRemovalSpec ({sorted(fields)}), but got {unknown}."
            )
        return dataclasses.replace(self, **changes)


TRANSFORMER_PRESETS: dict[str, TransformerBlockRemovalSpec] = {
    "flux-lite-8b": TransformerBlockRemovalSpec(name="flux-lite-8b", blocks=8 / 19),
    "flux-mini": TransformerBlockRemovalSpec(name="flux-mini", stride=4),
    "sd3-half": TransformerBlockRemovalSpec(name="sd3-half", blocks=0.5),
    "sd3-early": TransformerBlockRemovalSpec(name="sd3-early", blocks=0.5, rule="first"),
    "wan-half": TransformerBlockRemovalSpec(name="wan-half", blocks=0.5),
    "qwen-half": TransformerBlockRemovalSpec(name="qwen-half", blocks=0.5),
}
"""Named :class:`TransformerBlockRemovalSpec` s (see the module docstring for the published models they follow)."""

_PRESET_CLASS = {
    "flux-lite-8b": _FLUX,
    "flux-mini": _FLUX,
    "sd3-half": _SD3,
    "sd3-early": _SD3,
    "wan-half": _WAN,
    "qwen-half": _QWEN,
}


def _as_spec(spec: Any) -> TransformerBlockRemovalSpec:
    if isinstance(spec, TransformerBlockRemovalSpec):
        return spec
    if isinstance(spec, str):
        check_option(spec, "spec", TRANSFORMER_PRESETS)
        return TRANSFORMER_PRESETS[spec]
    raise DTypeError(
        f"Expected `spec` to be a preset name {sorted(TRANSFORMER_PRESETS)} or a TransformerBlockRemovalSpec, but "
        f"got {type(spec).__name__}."
    )


def _class_of(config: Mapping[str, Any], model: nn.Module | None = None) -> str:
    """``"SD3Transformer2DModel"``, ``"FluxTransformer2DModel"``, ``"QwenImageTransformer2DModel"`` or
    ``"WanTransformer3DModel"``: from the model's class (or a base class: FSDP2 subclasses it), diffusers'
    ``_class_name`` or the config's keys (FLUX has ``num_single_layers``, Wan ``ffn_dim``, Qwen-Image
    ``axes_dims_rope`` without single layers)."""
    name: Any
    if model is not None:
        name = next((c.__name__ for c in type(model).__mro__ if c.__name__ in _CLASSES), type(model).__name__)
    else:
        name = config.get("_class_name")
    if name is None:
        name = (
            _FLUX
            if "num_single_layers" in config
            else _WAN
            if "ffn_dim" in config
            else _QWEN
            if "axes_dims_rope" in config
            else _SD3
            if "num_layers" in config
            else None
        )
    if name not in _CLASSES:
        raise DTypeError(
            f"Expected a diffusers SD3Transformer2DModel, FluxTransformer2DModel, QwenImageTransformer2DModel or "
            f"WanTransformer3DModel (or their configs), but got "
            f"{name or type(config).__name__}. Other transformers: tap their blocks with FeatureTap / LayerKD and "
            "build the student yourself."
        )
    return str(name)


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"Expected the config's `{what}` to be an int >= 1, but got {value!r}.")
    return value


def _pick(keep: BlockKeep, rule: KeepRule, n: int, what: str) -> list[int]:
    """Kept indices (sorted) of ``n`` teacher blocks."""
    if keep is None:
        return list(range(n))
    if isinstance(keep, (list, tuple)):
        idx = []
        for i in keep:
            if not -n <= i < n:
                raise OptionError(
                    f"Expected every index in `{what}` to lie in [-{n}, {n}) (the teacher has {n} such blocks), but "
                    f"got {i}."
                )
            idx.append(i % n)
        if len(set(idx)) != len(idx):
            raise OptionError(
                f"Expected the indices in `{what}` to name distinct blocks, but got {list(keep)}."
            )
        return sorted(idx)
    k = max(1, math.floor(keep * n + 0.5)) if isinstance(keep, float) else int(keep)  # type: ignore[arg-type]
    if k > n:
        raise OptionError(
            f"Expected `{what}` to keep at most the teacher's {n} blocks, but it keeps {k}. Removal cannot add blocks."
        )
    if callable(rule):
        idx = sorted(int(i) for i in rule(n, k))
        if len(idx) != k or len(set(idx)) != k or not all(0 <= i < n for i in idx):
            raise OptionError(f"Expected `rule` to return {k} distinct indices in [0, {n}), but got {idx}.")
        return idx
    if rule == "first":
        return list(range(k))
    if rule == "last":
        return list(range(n - k, n))
    return _spread_indices(n, k)


@dataclass
class _Plan:
    kind: str
    config: dict[str, Any]
    kept: dict[str, list[int]]  # block list -> kept teacher indices
    teacher_counts: dict[str, int]


def _plan(teacher_config: Mapping[str, Any], spec: TransformerBlockRemovalSpec, kind: str) -> _Plan:
    """What ``spec`` keeps of a teacher of family ``kind``: the one place both public builders go through, so
    both refuse a preset of another family (by the spec's name, e.g. ``"flux-mini"`` for an SD3 teacher;
    ``TRANSFORMER_PRESETS[...].replace(...)`` keeps the name, a custom name is not checked)."""
    if isinstance(spec.name, str) and _PRESET_CLASS.get(spec.name, kind) != kind:
        raise OptionError(
            f"Expected a preset for {kind}, but {spec.name!r} is for {_PRESET_CLASS[spec.name]}. Presets: "
            f"{sorted(n for n, c in _PRESET_CLASS.items() if c == kind)}."
        )
    config = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    main = _main_list(kind)
    default_layers = {_SD3: 18, _FLUX: 19, _QWEN: 60, _WAN: 40}[kind]
    counts = {main: _count(config.get("num_layers", default_layers), "num_layers")}
    if kind == _FLUX:
        counts["single_transformer_blocks"] = _count(config.get("num_single_layers", 38), "num_single_layers")
    elif spec.single_blocks is not None:
        what = {
            _SD3: "an SD3 transformer (it has joint blocks only)",
            _QWEN: "a Qwen-Image transformer (one block list)",
            _WAN: "a Wan transformer (one block list)",
        }[kind]
        raise OptionError(
            f"Expected `single_blocks` to be None for {what}, but got {spec.single_blocks!r}. Use `blocks`."
        )
    if spec.stride is not None:
        order = [(name, i) for name, n in counts.items() for i in range(n)]
        picked = order[:: spec.stride]
        kept = {name: [i for lst, i in picked if lst == name] for name in counts}
    else:
        kept = {main: _pick(spec.blocks, spec.rule, counts[main], "blocks")}
        if kind == _FLUX:
            kept["single_transformer_blocks"] = _pick(
                spec.single_blocks, spec.rule, counts["single_transformer_blocks"], "single_blocks"
            )
    for name, idx in kept.items():
        if not idx:
            raise OptionError(
                f"Expected the student to keep at least one of the teacher's {counts[name]} `{name}`, but the spec "
                f"keeps none (stride {spec.stride}). Use a smaller stride or explicit `blocks` / `single_blocks`."
            )
    config["num_layers"] = len(kept[main])
    if kind == _FLUX:
        config["num_single_layers"] = len(kept["single_transformer_blocks"])
    elif kind == _SD3:
        dual = {int(i) for i in config.get("dual_attention_layers", ()) or ()}
        config["dual_attention_layers"] = tuple(
            j for j, m in enumerate(kept["transformer_blocks"]) if m in dual
        )
    return _Plan(kind=kind, config=config, kept=kept, teacher_counts=counts)


def transformer_student_config(
    teacher_config: Mapping[str, Any], spec: str | TransformerBlockRemovalSpec
) -> dict[str, Any]:
    """The diffusers config of the block-removed student (SD3 / FLUX / Qwen-Image / Wan transformer).

    Only the depths change (``num_layers``, FLUX's ``num_single_layers``) and, for SD3.5, the
    ``dual_attention_layers`` indices, remapped to the student's blocks; widths stay the teacher's.

    Args:
        teacher_config: The teacher's config (``model.config`` or the dict it was built from); the family is read
            from diffusers' ``_class_name`` or, without it, from the keys (``num_single_layers``: FLUX; ``ffn_dim``:
            Wan; ``axes_dims_rope`` alone: Qwen-Image).
        spec: A :data:`TRANSFORMER_PRESETS` name or a :class:`TransformerBlockRemovalSpec`.

    Returns:
        A new config dict (diffusers' private ``_*`` keys dropped), ready for ``from_config``.

    Raises:
        DTypeError: ``teacher_config`` is not a mapping of an SD3, FLUX, Qwen-Image or Wan transformer; ``spec`` is
            neither a preset name nor a spec.
        OptionError: an unknown preset or a preset of another family (e.g. ``"flux-mini"`` for an SD3 config); a
            spec that does not fit the teacher (an index out of range, more blocks than the teacher has,
            ``single_blocks`` for SD3 / Qwen-Image / Wan, a stride that leaves a block list empty).

    Example:
        >>> cfg = {"num_layers": 24, "dual_attention_layers": tuple(range(13))}  # SD3.5-Medium's depths
        >>> student = transformer_student_config(cfg, "sd3-half")
        >>> student["num_layers"], student["dual_attention_layers"]
        (12, (0, 1, 2, 3, 4, 5))
    """
    if not isinstance(teacher_config, Mapping):
        raise DTypeError(
            f"Expected `teacher_config` to be a mapping (model.config), but got {type(teacher_config).__name__}."
        )
    spec = _as_spec(spec)
    return _plan(teacher_config, spec, _class_of(teacher_config)).config


@dataclass
class TransformerBlockRemovalReport:
    """What :func:`build_transformer_student` did.

    Args:
        spec: The spec applied.
        config: The student config (``from_config``-ready).
        module_map: Student block -> the teacher block it was initialised from (every other module keeps its
            name), e.g. ``{"transformer_blocks.1": "transformer_blocks.3"}``.
        removed: The teacher blocks the student has no copy of, in execution order.
        teacher_parameters: Parameter count of the teacher.
        student_parameters: Parameter count of the student.
        teacher_flops: FLOPs of one teacher forward at batch 1 (:func:`transformer_flops`), None when not counted.
        student_flops: The same for the student.
        flops_at: The ``latent_size`` (Wan: ``[frames, height, width]``) and ``text_tokens`` the FLOPs were counted
            at.
        initialized: Whether weights were copied (not on the meta device). Default ``False``.
        notes: Remarks (e.g. an SD3 block converted to context-pre-only). Default empty.

    Raises:
        Nothing: a plain record, filled by :func:`build_transformer_student` (which checks its inputs).

    Example:
        >>> r = TransformerBlockRemovalReport(TransformerBlockRemovalSpec(), {}, {}, [], 100, 60, 10, 5)
        >>> r.removed_fraction, r.removed_flops_fraction
        (0.4, 0.5)
    """

    spec: TransformerBlockRemovalSpec
    config: dict[str, Any]
    module_map: dict[str, str]
    removed: list[str]
    teacher_parameters: int
    student_parameters: int
    teacher_flops: int | None = None
    student_flops: int | None = None
    flops_at: dict[str, Any] = field(default_factory=dict)
    initialized: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def removed_fraction(self) -> float:
        """``1 - student_parameters / teacher_parameters``.

        Returns:
            The fraction of the teacher's parameters the student does not have.
        """
        return 1.0 - self.student_parameters / max(1, self.teacher_parameters)

    @property
    def removed_flops_fraction(self) -> float | None:
        """``1 - student_flops / teacher_flops`` (None when the FLOPs were not counted).

        Returns:
            The fraction of the teacher's forward FLOPs the student does not spend, or None.
        """
        if self.teacher_flops is None or self.student_flops is None:
            return None
        return 1.0 - self.student_flops / max(1, self.teacher_flops)

    def kd_pairs(self, target: Literal["source", "span_end"] = "source") -> dict[str, str]:
        """``{teacher block: student block}`` for :class:`~diffdistill.students.LayerKD` (image-stream outputs).

        Args:
            target: Which teacher block each student block matches. ``"source"`` (the default): the block it was
                initialised from, as Flux-Mini's feature alignment (student block x -> teacher block 4x for the
                ``"flux-mini"`` preset). ``"span_end"`` (our choice, for students that should replace whole spans):
                the last teacher block before the next kept one, in execution order, so student block j stands for
                teacher blocks ``m(j) ... m(j+1) - 1`` and the last student block for everything up to the
                teacher's last block.

        Returns:
            A new dict ``{teacher module name: student module name}``, one entry per student block.

        Raises:
            OptionError: an unknown ``target``.
        """
        check_option(target, "target", ["source", "span_end"])
        if target == "source":
            return {t: s for s, t in self.module_map.items()}
        order = sorted(
            [*self.module_map.values(), *self.removed],
            key=lambda name: (_LIST_ORDER.index(name.split(".")[0]), int(name.split(".")[1])),
        )
        position = {name: i for i, name in enumerate(order)}
        students = sorted(self.module_map, key=lambda s: position[self.module_map[s]])
        pairs: dict[str, str] = {}
        for j, s_name in enumerate(students):
            end = position[self.module_map[students[j + 1]]] - 1 if j + 1 < len(students) else len(order) - 1
            pairs[order[end]] = s_name
        return pairs

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (a callable rule as its name).

        Returns:
            The fields plus ``removed_fraction`` and ``removed_flops_fraction``.
        """
        spec = dataclasses.asdict(self.spec)
        if callable(spec["rule"]):
            spec["rule"] = getattr(spec["rule"], "__name__", repr(spec["rule"]))
        for key in ("blocks", "single_blocks"):
            if isinstance(spec[key], tuple):
                spec[key] = list(spec[key])
        return {
            "spec": spec,
            "config": json.loads(json.dumps(self.config)),
            "module_map": dict(self.module_map),
            "removed": list(self.removed),
            "teacher_parameters": self.teacher_parameters,
            "student_parameters": self.student_parameters,
            "removed_fraction": self.removed_fraction,
            "teacher_flops": self.teacher_flops,
            "student_flops": self.student_flops,
            "removed_flops_fraction": self.removed_flops_fraction,
            "flops_at": dict(self.flops_at),
            "initialized": self.initialized,
            "notes": list(self.notes),
        }


def _translate(key: str, module_map: Mapping[str, str]) -> str:
    parts = key.split(".")
    if len(parts) > 2 and parts[0] in _LIST_ORDER:
        prefix = f"{parts[0]}.{parts[1]}"
        if prefix in module_map:
            return module_map[prefix] + key[len(prefix) :]
    return key


def _context_norm_rows(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """``AdaLayerNormZero`` rows (shift_msa, scale_msa, gate_msa, ...) -> ``AdaLayerNormContinuous`` (scale, shift)."""
    return torch.cat([weight[dim : 2 * dim], weight[:dim]], dim=0)


def _init_weights(
    student: nn.Module, teacher: nn.Module, module_map: Mapping[str, str], converted: str | None, dim: int
) -> None:
    t_state = teacher.state_dict()
    new_state: dict[str, torch.Tensor] = {}
    for s_key, s_value in student.state_dict().items():
        t_key = _translate(s_key, module_map)
        value = t_state.get(t_key)
        if value is None:
            raise OptionError(
                f"Expected the teacher to have `{t_key}` (source of student `{s_key}`), but it has no such entry: the "
                "teacher's weights do not match its config."
            )
        if converted is not None and s_key.startswith(converted + ".norm1_context.linear."):
            value = _context_norm_rows(value, dim)
        if value.shape != s_value.shape:
            raise ShapeError(
                f"Expected teacher `{t_key}` and student `{s_key}` to have the same shape, but got teacher "
                f"{tuple(value.shape)} and student {tuple(s_value.shape)}.",
                name=s_key,
                expected=tuple(s_value.shape),
                actual=tuple(value.shape),
            )
        new_state[s_key] = value.detach().to(dtype=s_value.dtype)
    student.load_state_dict(new_state, strict=True)


def build_transformer_student(
    teacher: nn.Module,
    spec: str | TransformerBlockRemovalSpec,
    *,
    init_weights: bool = True,
    count_flops: bool = True,
    latent_size: int | Sequence[int] | None = None,
    text_tokens: int | None = None,
) -> tuple[nn.Module, TransformerBlockRemovalReport]:
    """Build the block-removed student of a diffusers SD3 / FLUX / Qwen-Image / Wan transformer, initialised from the
    teacher.

    Args:
        teacher: The teacher (``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ``QwenImageTransformer2DModel``
            or ``WanTransformer3DModel``; wrappers are unwrapped). On
            the meta device the student is built on the meta device too and no weights are copied (sizes only).
        spec: A :data:`TRANSFORMER_PRESETS` name or a :class:`TransformerBlockRemovalSpec`.
        init_weights: Copy the kept blocks (and every other module) from the teacher. Default ``True``;
            ``False`` leaves diffusers' random initialisation.
        count_flops: Count both networks' FLOPs on the meta device (:func:`transformer_flops`, cached per config).
            Default ``True``.
        latent_size: Latent height and width of the FLOP count (see :func:`transformer_flops`).
        text_tokens: Text tokens of the FLOP count (see :func:`transformer_flops`).

    Returns:
        ``(student, report)``; the student has the teacher's dtype and device and is in train mode.

    Raises:
        DTypeError: ``teacher`` is not an SD3 / FLUX / Qwen-Image / Wan transformer; ``spec`` is neither a preset name
            nor a spec;
            ``init_weights`` / ``count_flops`` is not a bool.
        OptionError: an unknown preset or a spec that does not fit the teacher (see
            :func:`transformer_student_config`); a bad ``latent_size`` / ``text_tokens``; the teacher's weights do
            not match its config.
        ImportError: diffusers is not installed.

    Example:
        >>> from diffusers import SD3Transformer2DModel
        >>> teacher = SD3Transformer2DModel(sample_size=8, num_layers=4, attention_head_dim=8,
        ...     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        ...     pooled_projection_dim=16, pos_embed_max_size=16)
        >>> student, report = build_transformer_student(teacher, "sd3-half", count_flops=False)
        >>> report.module_map, report.removed
        ({'transformer_blocks.0': 'transformer_blocks.0', 'transformer_blocks.1': 'transformer_blocks.3'}, \
['transformer_blocks.1', 'transformer_blocks.2'])
    """
    spec = _as_spec(spec)
    check_bool(init_weights, "init_weights")
    check_bool(count_flops, "count_flops")
    check_module(teacher, "teacher")
    teacher = unwrap_model(teacher)
    config = getattr(teacher, "config", None)
    if not isinstance(config, Mapping):
        raise DTypeError(
            f"Expected `teacher` to be a diffusers SD3 / FLUX / Qwen-Image / Wan transformer (with a "
            f"`.config`), but got {type(teacher).__name__}."
        )
    kind = _class_of(config, teacher)
    plan = _plan(config, spec, kind)
    if count_flops:
        _flops_args(config, kind, latent_size, text_tokens)  # refuse bad sizes before building anything
    module_map: dict[str, str] = {}
    removed: list[str] = []
    for lst, kept in plan.kept.items():
        module_map.update({f"{lst}.{j}": f"{lst}.{m}" for j, m in enumerate(kept)})
        removed += [f"{lst}.{i}" for i in range(plan.teacher_counts[lst]) if i not in set(kept)]
    notes: list[str] = []
    converted = None
    if kind == _SD3:
        last_t = plan.teacher_counts["transformer_blocks"] - 1
        last_s = len(plan.kept["transformer_blocks"]) - 1
        if plan.kept["transformer_blocks"][-1] != last_t:
            converted = f"transformer_blocks.{last_s}"
            notes.append(
                f"SD3: the teacher's context-pre-only last block transformer_blocks.{last_t} is removed; student "
                f"{converted} (from teacher {module_map[converted]}) is context-pre-only: its text-stream output "
                "weights (attn.to_add_out, ff_context) are dropped and norm1_context keeps the (shift, scale) rows, "
                "so its image output equals the teacher block's."
            )
    cls: Any = type(teacher)
    ref: torch.Tensor = next(teacher.parameters(), torch.empty(0))
    on_meta = ref.device.type == "meta"
    with torch.device("meta") if on_meta else torch.device(ref.device):
        student = cls.from_config(plan.config)
    if student.dtype != ref.dtype:
        student = student.to(dtype=ref.dtype)
    if init_weights and not on_meta:
        dim = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        _init_weights(student, teacher, module_map, converted, dim)
    student.train()
    report = TransformerBlockRemovalReport(
        spec=spec,
        config=plan.config,
        module_map=module_map,
        removed=removed,
        teacher_parameters=sum(p.numel() for p in teacher.parameters()),
        student_parameters=sum(p.numel() for p in student.parameters()),
        initialized=bool(init_weights and not on_meta),
        notes=notes,
    )
    if count_flops:
        size, tokens = _flops_args(config, kind, latent_size, text_tokens)
        report.teacher_flops = transformer_flops(config, latent_size=size, text_tokens=tokens)
        report.student_flops = transformer_flops(
            {**plan.config, "_class_name": kind}, latent_size=size, text_tokens=tokens
        )
        report.flops_at = {
            "latent_size": list(size) if isinstance(size, tuple) else size,
            "text_tokens": tokens,
        }
    logger.info(
        "transformer block removal %r: %d -> %d parameters (%.1f%% removed), %d block(s) dropped",
        spec.name,
        report.teacher_parameters,
        report.student_parameters,
        100 * report.removed_fraction,
        len(removed),
    )
    return student, report


def _flops_args(config: Mapping[str, Any], kind: str, latent_size: Any, text_tokens: Any) -> tuple[Any, int]:
    if kind == _WAN:
        return _wan_flops_args(config, latent_size, text_tokens)
    size = (
        latent_size if latent_size is not None else (config.get("sample_size", 128) if kind == _SD3 else 128)
    )
    tokens = text_tokens if text_tokens is not None else (333 if kind == _SD3 else 512)
    for value, what in ((size, "latent_size"), (tokens, "text_tokens")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"Expected `{what}` to be an int >= 1, but got {value!r}.")
    patch = int(config.get("patch_size", 2 if kind == _SD3 else 1))
    step = patch if kind == _SD3 else 2
    if size % step:
        raise OptionError(
            f"Expected `latent_size` to be a multiple of {step} (the {'patch size' if kind == _SD3 else '2x2 packing'} "
            f"of {kind}), but got {size}."
        )
    return int(size), int(tokens)


def _wan_flops_args(
    config: Mapping[str, Any], latent_size: Any, text_tokens: Any
) -> tuple[tuple[int, ...], int]:
    """Wan: ``latent_size`` an int (one frame of size x size) or ``(frames, height, width)``; text tokens."""
    size: Any = _WAN_LATENT if latent_size is None else latent_size
    if isinstance(size, int) and not isinstance(size, bool):
        size = (1, size, size)
    ok = isinstance(size, (list, tuple)) and len(size) == 3
    if not ok or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in size):
        raise OptionError(
            f"Expected `latent_size` of a Wan transformer to be an int >= 1 (one square frame) or (frames, height, "
            f"width) ints >= 1 (default {_WAN_LATENT}: 81 frames at 480 x 832), but got {latent_size!r}."
        )
    tokens = 512 if text_tokens is None else text_tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise OptionError(f"Expected `text_tokens` to be an int >= 1, but got {tokens!r}.")
    patch = tuple(int(p) for p in config.get("patch_size", (1, 2, 2)))
    if any(n % p for n, p in zip(size, patch)):
        raise OptionError(
            f"Expected `latent_size` (frames, height, width) to be multiples of the patch size {patch} of "
            f"{_WAN}, but got {tuple(size)}."
        )
    return tuple(int(n) for n in size), int(tokens)


def transformer_flops(
    model: nn.Module | Mapping[str, Any],
    *,
    latent_size: int | Sequence[int] | None = None,
    text_tokens: int | None = None,
) -> int:
    """Floating-point operations of one SD3 / FLUX / Qwen-Image / Wan transformer forward at batch 1 (meta device).

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products, convolutions and attention, 2
    FLOPs per multiply-add) on a copy built on the meta device (no weight memory), cached per config.

    Args:
        model: The transformer, or its config (with diffusers' ``_class_name``, FLUX's ``num_single_layers`` or
            Wan's ``ffn_dim``).
        latent_size: Latent height and width (VAE latents, before patching). Default: SD3 the config's
            ``sample_size`` (128, 1024 px); FLUX and Qwen-Image 128 (1024 px: 64 x 64 = 4096 packed image tokens). Wan: an int
            (one square frame) or ``(frames, height, width)``, default ``(21, 60, 104)`` (81 frames at 480 x 832:
            21 x 30 x 52 = 32760 tokens).
        text_tokens: Length of the text sequence. Default: SD3 333 (77 CLIP + 256 T5, as the SD3 pipelines);
            FLUX 512 (``max_sequence_length`` of FLUX.1-dev); Qwen-Image 512 and Wan 512 (their pipelines').

    Returns:
        The FLOP count.

    Raises:
        DTypeError: ``model`` is neither an SD3 / FLUX / Qwen-Image / Wan transformer nor its config.
        OptionError: ``latent_size`` / ``text_tokens`` not an int >= 1, or a latent size the patching does not
            divide.
        ImportError: diffusers is not installed.

    Example:
        >>> cfg = {"_class_name": "FluxTransformer2DModel", "in_channels": 16, "num_layers": 2,
        ...        "num_single_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
        ...        "joint_attention_dim": 16, "pooled_projection_dim": 16, "axes_dims_rope": (2, 2, 4)}
        >>> transformer_flops(cfg, latent_size=8, text_tokens=4) > transformer_flops(
        ...     {**cfg, "num_single_layers": 1}, latent_size=8, text_tokens=4)
        True
    """
    if isinstance(model, Mapping):
        config: Mapping[str, Any] = model
        kind = _class_of(config)
    else:
        inner = unwrap_model(model) if isinstance(model, nn.Module) else model
        config = getattr(inner, "config", None)  # type: ignore[assignment]
        if not isinstance(config, Mapping):
            raise DTypeError(
                f"Expected `model` to be a diffusers SD3 / FLUX transformer or its config (or a Wan one), but got "
                f"{type(model).__name__}."
            )
        kind = _class_of(config, inner)
    size, tokens = _flops_args(config, kind, latent_size, text_tokens)
    clean = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return _flops_of(kind, json.dumps(clean, sort_keys=True), size, tokens)


@functools.lru_cache(maxsize=32)
def _flops_of(kind: str, key: str, size: Any, tokens: int) -> int:
    import diffusers
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads(key)
    meta = torch.device("meta")
    with meta:
        model = getattr(diffusers, kind).from_config(config)
    if kind == _WAN:
        frames, height, width_ = size
        video = torch.zeros(1, int(config.get("in_channels", 16)), frames, height, width_, device=meta)
        text = torch.zeros(1, tokens, int(config.get("text_dim", 4096)), device=meta)
        with FlopCounterMode(display=False) as counter:
            model(video, timestep=torch.zeros(1, device=meta), encoder_hidden_states=text, return_dict=False)
        return int(counter.get_total_flops())
    width = int(config.get("joint_attention_dim", 3584 if kind == _QWEN else 4096))
    text = torch.zeros(1, tokens, width, device=meta)
    if kind == _QWEN:  # packed latents, one (frame, rows, columns) grid, no pooled embedding
        n = (size // 2) ** 2
        packed = torch.zeros(1, n, int(config.get("in_channels", 64)), device=meta)
        with FlopCounterMode(display=False) as counter:
            model(
                packed,
                encoder_hidden_states=text,
                timestep=torch.zeros(1, device=meta),
                img_shapes=[[(1, size // 2, size // 2)]],
                return_dict=False,
            )
        return int(counter.get_total_flops())
    pooled = int(config.get("pooled_projection_dim", 2048 if kind == _SD3 else 768))
    kwargs: dict[str, Any] = {
        "encoder_hidden_states": text,
        "pooled_projections": torch.zeros(1, pooled, device=meta),
        "timestep": torch.zeros(1, device=meta),
        "return_dict": False,
    }
    if kind == _SD3:
        sample = torch.zeros(1, int(config.get("in_channels", 16)), size, size, device=meta)
    else:
        n = (size // 2) ** 2
        sample = torch.zeros(1, n, int(config.get("in_channels", 64)), device=meta)
        kwargs["img_ids"] = torch.zeros(n, 3, device=meta)
        kwargs["txt_ids"] = torch.zeros(tokens, 3, device=meta)
        if config.get("guidance_embeds", False):
            kwargs["guidance"] = torch.zeros(1, device=meta)
    with FlopCounterMode(display=False) as counter:
        model(sample, **kwargs)
    return int(counter.get_total_flops())
