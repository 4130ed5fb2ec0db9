"""Block removal: derive a smaller diffusers UNet from a teacher's config and initialise it from the teacher.

SSD-1B and Segmind-Vega (Gupta et al. 2024, arXiv:2401.02677) shrink SDXL by removing transformer
layers and the mid block's attention; BK-SDM (Kim et al. 2023, arXiv:2305.15798; segmind/distill-sd
``prepare_unet``) shrinks SD1.5 by removing residual/attention pairs and, for "tiny", the innermost
stage. Here a :class:`BlockRemovalSpec` describes what stays, :func:`student_config` turns a
``UNet2DConditionModel`` config into a config diffusers builds with ``from_config`` (including the
asymmetric ``reverse_transformer_layers_per_block`` form and a single-resnet ``UNetMidBlock2D`` mid
block), and :func:`build_student` builds it, copies every kept module from the teacher by name and
returns a :class:`BlockRemovalReport` mapping each student module to its teacher source.

Presets (levels are counted from the highest resolution, level 0; fractions are of the teacher's
depth, rounded half up, at least 1, so the SDXL presets also apply to tiny SDXL-structured configs):

=================  ==================================================================================
``"ssd-1b"``       mid block -> one resnet (its attention and second resnet go); level-2 down
                   attentions keep 0.4 of their transformer layers (SDXL 10 -> 4); up level 2 keeps
                   (0.4, 0.4, 1.0) (-> [4, 4, 10]), up level 1 keeps (1.0, 0.5, 0.5) (-> [2, 1, 1]); all
                   resnets stay. SDXL gives ``transformer_layers_per_block=[1, 2, 4]``,
                   ``reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], 1]``,
                   ``mid_block_type="UNetMidBlock2D"``: 1.331B parameters (published 1.3B; SDXL 2.567B).
``"vega"``         mid block -> one resnet; level 1 keeps 0.5 (2 -> 1) and level 2 keeps 0.2 (10 -> 2) of
                   the transformer layers, down and up alike; all resnets stay. SDXL gives
                   ``transformer_layers_per_block=[1, 1, 2]`` with ``reverse_transformer_layers_per_block``
                   None (the same up depths as ``[[2, 2, 2], [1, 1, 1], 1]``): 0.745B (published 0.74B: down 247M,
                   mid 31M, up 460M -- matched exactly).
``"bk-sdm-base"``  distill-sd ``sd_small``: one resnet(+attention) per down block, the second removed; up
                   blocks keep their first and third (``resnets[1] = resnets[2]``); mid kept. SD1.5
                   (0.860B) gives 0.579B (BK-SDM-Base, published 0.58B).
``"bk-sdm-small"`` BK-SDM-Small: as base, without the mid block: 0.482B (published 0.49B).
``"bk-sdm-tiny"``  distill-sd ``sd_tiny``: as small, plus the innermost stage (``down_blocks[3]``,
                   ``up_blocks[0]``) removed: 0.323B (BK-SDM-Tiny, published 0.33B).
=================  ==================================================================================

Progressive rounds (SSD-1B / Segmind-Vega: blocks removed in rounds, each from the previous round's trained
student) are in :mod:`diffdistill.students.removal_rounds`.

The SDXL preset depths are those of the released configs (``segmind/SSD-1B``: ``reverse_transformer_
layers_per_block`` [[4,4,10],[2,1,1],1] as quoted in onediff issue #570, down [1,2,4]; Segmind-Vega:
down [1,1,2], up [[2,2,2],[1,1,1],1]; both with a one-resnet mid block, as in ComfyUI's
``model_detection.py`` entries ``SSD_1B`` / ``Segmind_Vega``). Which transformer layers of a block are
kept is not published; :attr:`BlockRemovalSpec.keep_transformer_layers` chooses (default ``"spread"``:
evenly spaced, first and last included).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .._checks import (
    DTypeError,
    OptionError,
    ShapeError,
    check_bool,
    check_module,
    check_option,
)
from .._modules import unwrap_model

__all__ = [
    "PRESETS",
    "BlockRemovalReport",
    "BlockRemovalSpec",
    "build_student",
    "init_from_teacher",
    "student_config",
]

logger = logging.getLogger(__name__)

Depth = int | float
"""An ``int`` is an absolute number of transformer layers; a ``float`` in (0, 1] a fraction of the teacher's."""
LevelDepth = Depth | Sequence[Depth] | None
KeepRule = Literal["first", "last", "spread"] | Callable[[int, int], Sequence[int]]

_MID_TYPES = ("keep", "resnet", "none")
_PRIVATE_KEYS = ("_use_default_values", "_name_or_path")


def _level_tuple(values: Any, what: str, example: str) -> Sequence[Any]:
    if not isinstance(values, (list, tuple)):
        raise DTypeError(
            f"Expected `{what}` to be a per-level tuple (level 0 = highest resolution; None keeps a level) or None, "
            f"but got {type(values).__name__} {values!r}; e.g. {what}={example}."
        )
    return values


def _check_count(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DTypeError(
            f"Expected `{what}` to be an int (a resnet count) or None, but got {type(value).__name__} {value!r}."
        )
    if value < 1:
        raise OptionError(f"Expected `{what}` to be >= 1 (every level keeps a resnet), but got {value}.")


def _check_depth(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DTypeError(
            f"Expected `{what}` to be an int (layers kept), a float in (0, 1] (fraction kept) or None, but got "
            f"{type(value).__name__} {value!r}."
        )
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise OptionError(f"Expected the fraction `{what}` to lie in (0, 1], but got {value!r}.")
    if isinstance(value, int) and value < 1:
        raise OptionError(f"Expected `{what}` to be >= 1 (a kept attention keeps a layer), but got {value}.")


@dataclass(frozen=True)
class BlockRemovalSpec:
    """What a student keeps of a ``UNet2DConditionModel`` teacher.

    Every per-level tuple is indexed by resolution level, 0 = highest resolution (``down_blocks[i]``
    and ``up_blocks[n - 1 - i]``); a shorter tuple leaves the remaining levels as they are, and ``None``
    keeps a level.

    Args:
        name: Label used in reports (default ``"custom"``).
        layers_per_block: Resnets (and attention pairs) per down block, per level (ints >= 1, None keeps a
            level); the matching up block gets one more. Down blocks keep their first ones; up blocks keep their
            first ones and their last (whose skip input comes from the level above), as distill-sd's
            ``resnets[1] = resnets[2]``. Default None: every level keeps its resnets.
        down_transformer_layers: Transformer layers per down attention, per level: an int >= 1 (absolute), a
            float in (0, 1] (fraction of the teacher's), a per-layer tuple of those, or None (the teacher's).
            Default None: all kept.
        up_transformer_layers: The same for up blocks, per-layer tuples in the up block's layer order.
        mid_block: ``"keep"`` (default), ``"resnet"`` (one ``UNetMidBlock2D`` resnet, SSD-1B/Vega) or
            ``"none"``.
        drop_innermost: Remove the lowest-resolution stage (``down_blocks[-1]``, ``up_blocks[0]``), as
            BK-SDM-Tiny; needs equal widths of the two innermost levels. Default ``False``.
        keep_transformer_layers: Which teacher transformer layers a shortened attention keeps: ``"first"``,
            ``"last"``, ``"spread"`` (the default: evenly spaced, first and last included, ties rounded half up as in
            transformer block removal) or ``fn(teacher_depth, student_depth) -> indices``.

    The constructor checks the types and ranges it can without a teacher (the fit to a teacher config is
    checked by :func:`student_config` / :func:`build_student`). Entries past the teacher's levels are
    ignored (so the SDXL presets also apply to tiny SDXL-structured configs; a custom spec logs a warning).

    Raises:
        DTypeError: a field has the wrong type (e.g. an int where a per-level tuple is expected, a string
            depth, a non-bool ``drop_innermost``).
        OptionError: an unknown ``mid_block`` or ``keep_transformer_layers`` name; a resnet count < 1; a depth
            < 1 or a fraction outside (0, 1].

    Example:
        >>> spec = BlockRemovalSpec(mid_block="resnet", up_transformer_layers=(None, (2, 1, 1)))
        >>> spec.mid_block, spec.up_transformer_layers[1]
        ('resnet', (2, 1, 1))
    """

    name: str = "custom"
    layers_per_block: tuple[int | None, ...] | None = None
    down_transformer_layers: tuple[LevelDepth, ...] | None = None
    up_transformer_layers: tuple[LevelDepth, ...] | None = None
    mid_block: Literal["keep", "resnet", "none"] = "keep"
    drop_innermost: bool = False
    keep_transformer_layers: KeepRule = "spread"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise DTypeError(
                f"Expected `name` to be a string, but got {type(self.name).__name__} {self.name!r}."
            )
        if self.layers_per_block is not None:
            for i, k in enumerate(_level_tuple(self.layers_per_block, "layers_per_block", "(1, 1, 1, 1)")):
                if k is not None:
                    _check_count(k, f"layers_per_block[{i}]")
        for what in ("down_transformer_layers", "up_transformer_layers"):
            values = getattr(self, what)
            if values is None:
                continue
            for i, entry in enumerate(_level_tuple(values, what, "(None, 0.5, 0.2)")):
                if isinstance(entry, (list, tuple)):
                    for j, v in enumerate(entry):
                        _check_depth(v, f"{what}[{i}][{j}]")
                elif entry is not None:
                    _check_depth(entry, f"{what}[{i}]")
        check_option(self.mid_block, "mid_block", _MID_TYPES)
        check_bool(self.drop_innermost, "drop_innermost")
        rule = self.keep_transformer_layers
        if not callable(rule) and rule not in ("first", "last", "spread"):
            raise OptionError(
                "Expected `keep_transformer_layers` to be one of ['first', 'last', 'spread'] or a callable, but "
                f"got {rule!r}."
            )

    def replace(self, **changes: Any) -> BlockRemovalSpec:
        """A copy with some fields changed, e.g. ``PRESETS["ssd-1b"].replace(keep_transformer_layers="first")``.

        Args:
            **changes: New values of fields, by name (checked as by the constructor).

        Returns:
            A new :class:`BlockRemovalSpec` (this one is frozen and unchanged).

        Raises:
            OptionError: a name is not a field of :class:`BlockRemovalSpec`, or a new value is out of range.
            DTypeError: a new value has the wrong type.
        """
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise OptionError(f"Expected fields of BlockRemovalSpec ({sorted(fields)}), but got {unknown}.")
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, BlockRemovalSpec] = {
    "ssd-1b": BlockRemovalSpec(
        name="ssd-1b",
        down_transformer_layers=(None, None, 0.4),
        up_transformer_layers=(None, (1.0, 0.5, 0.5), (0.4, 0.4, 1.0)),
        mid_block="resnet",
    ),
    "vega": BlockRemovalSpec(
        name="vega",
        down_transformer_layers=(None, 0.5, 0.2),
        up_transformer_layers=(None, 0.5, 0.2),
        mid_block="resnet",
    ),
    "bk-sdm-base": BlockRemovalSpec(name="bk-sdm-base", layers_per_block=(1, 1, 1, 1), mid_block="keep"),
    "bk-sdm-small": BlockRemovalSpec(name="bk-sdm-small", layers_per_block=(1, 1, 1, 1), mid_block="none"),
    "bk-sdm-tiny": BlockRemovalSpec(
        name="bk-sdm-tiny", layers_per_block=(1, 1, 1, 1), mid_block="none", drop_innermost=True
    ),
}
"""Named :class:`BlockRemovalSpec` s (see the module docstring for what each removes)."""


def _as_spec(spec: str | BlockRemovalSpec) -> BlockRemovalSpec:
    if isinstance(spec, BlockRemovalSpec):
        return spec
    if isinstance(spec, str):
        check_option(spec, "spec", sorted(PRESETS))
        return PRESETS[spec]
    raise DTypeError(
        f"Expected `spec` to be a preset name or a BlockRemovalSpec, but got {type(spec).__name__}."
    )


def _per_block(value: Any, n: int, what: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise OptionError(f"Expected `{what}` to have {n} entries (one per block), but got {len(value)}.")
        return list(value)
    return [value] * n


def _config_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(
            f"Expected the teacher config's `{what}` to hold ints, but got {type(value).__name__} {value!r}. Pass "
            "the UNet's own config (unet.config)."
        )
    return value


def _per_layer(value: Any, n_layers: int, what: str) -> list[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != n_layers:
            raise OptionError(f"Expected `{what}` to list {n_layers} layer depths, but got {list(value)}.")
        return [_config_int(v, what) for v in value]
    return [_config_int(value, what)] * n_layers


@dataclass
class _Layout:
    """A UNet config reduced to per-level, per-layer numbers (up lists in diffusers' up order)."""

    down_types: list[str]
    up_types: list[str]
    layers: list[int]
    down_depths: list[list[int]]
    up_depths: list[list[int]]
    mid_type: str | None

    @property
    def levels(self) -> int:
        return len(self.down_types)


def _layout(config: Mapping[str, Any]) -> _Layout:
    down_types = config.get("down_block_types", ())
    up_types = config.get("up_block_types", ())
    if not isinstance(down_types, (list, tuple)) or not isinstance(up_types, (list, tuple)):
        raise OptionError(
            "Expected `down_block_types` and `up_block_types` of the teacher config to be lists of block type "
            f"names, but got {type(down_types).__name__} and {type(up_types).__name__}. Pass `unet.config`."
        )
    down_types, up_types = list(down_types), list(up_types)
    n = len(down_types)
    if n == 0 or len(up_types) != n:
        raise OptionError(
            "Expected a UNet2DConditionModel config with as many `down_block_types` as `up_block_types`, "
            f"but got {len(down_types)} and {len(up_types)}. Pass `unet.config`."
        )
    layers = [
        _config_int(v, "layers_per_block")
        for v in _per_block(config.get("layers_per_block", 2), n, "layers_per_block")
    ]
    tl = _per_block(config.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    down = [_per_layer(tl[i], layers[i], f"transformer_layers_per_block[{i}]") for i in range(n)]
    rev = config.get("reverse_transformer_layers_per_block")
    rev_list = (
        list(reversed(tl)) if rev is None else _per_block(rev, n, "reverse_transformer_layers_per_block")
    )
    up = [
        _per_layer(rev_list[u], layers[n - 1 - u] + 1, f"reverse_transformer_layers_per_block[{u}]")
        for u in range(n)
    ]
    return _Layout(
        down_types, up_types, layers, down, up, config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    )


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type


def _resolve_depth(value: Depth, teacher_depth: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DTypeError(f"Expected `{what}` to be an int or a float, but got {type(value).__name__}.")
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise OptionError(f"Expected the fraction `{what}` to lie in (0, 1], but got {value!r}.")
        return max(1, math.floor(value * teacher_depth + 0.5))
    if not 1 <= value <= teacher_depth:
        raise OptionError(
            f"Expected `{what}` to lie in [1, {teacher_depth}] (the teacher's depth), but got {value!r}. "
            "Block removal cannot add layers."
        )
    return int(value)


def _level_depths(entry: LevelDepth, teacher: list[int], what: str) -> list[int]:
    if entry is None:
        return list(teacher)
    if isinstance(entry, (list, tuple)):
        if len(entry) != len(teacher):
            raise OptionError(
                f"Expected `{what}` to list {len(teacher)} per-layer depths (the student's layers), but got "
                f"{len(entry)}: {list(entry)}."
            )
        return [_resolve_depth(v, d, f"{what}[{j}]") for j, (v, d) in enumerate(zip(entry, teacher))]
    scalar: Depth = entry  # type: ignore[assignment]  # not a sequence here
    return [_resolve_depth(scalar, d, what) for d in teacher]


def _level_entry(values: tuple[Any, ...] | None, level: int) -> Any:
    """A spec field's entry for ``level`` (None where the field or the entry is absent: the teacher's)."""
    return values[level] if values is not None and level < len(values) else None


def _attention_entry(
    values: tuple[Any, ...] | None, level: int, has_attention: bool, block_type: str, side: str
) -> Any:
    """The spec's transformer depth for ``level`` (None: the teacher's); refused on a level without attention."""
    entry = _level_entry(values, level)
    if entry is not None and not has_attention:
        raise OptionError(
            f"Expected `{side}_transformer_layers[{level}]` to be None: level {level} ({block_type}) has no "
            f"attention, but got {entry!r}."
        )
    return entry


def _spread_indices(n: int, k: int) -> list[int]:
    """The ``"spread"`` keep rule: ``k`` of ``n`` indices evenly spaced, first and last included.

    Index ``j`` keeps ``floor(j (n - 1) / (k - 1) + 1/2)``, rounded half up as the fractions of a depth are, in
    integer arithmetic (so a tie is a tie: depth 6 -> 3 keeps ``[0, 3, 5]``). Shared by UNet block removal
    (``BlockRemovalSpec.keep_transformer_layers``) and transformer block removal
    (``TransformerBlockRemovalSpec.rule``), so the two agree on the same numbers. No
    preset depends on the tie: the SDXL presets' depths (10 -> 4 / 2, 2 -> 1) and FLUX's 19 -> 8 have none; the
    ties ``"wan-half"`` (Wan2.1-1.3B 30 -> 15: block 15, not 14) and ``"sd3-half"`` (SD3.5-Large 38 -> 19: block 19,
    not 18) meet are our choice, not a published list.

    Args:
        n: The teacher's count (>= 1).
        k: How many to keep (1 <= ``k`` <= ``n``; 1 keeps index 0).

    Returns:
        The ``k`` kept indices, increasing.

    Example:
        >>> _spread_indices(10, 4), _spread_indices(6, 3), _spread_indices(5, 1)
        ([0, 3, 6, 9], [0, 3, 5], [0])
    """
    if k == 1:
        return [0]
    return [(2 * j * (n - 1) + (k - 1)) // (2 * (k - 1)) for j in range(k)]


def _keep_indices(rule: KeepRule, teacher_depth: int, student_depth: int) -> list[int]:
    if callable(rule):
        idx = [int(i) for i in rule(teacher_depth, student_depth)]
        if (
            len(idx) != student_depth
            or len(set(idx)) != student_depth
            or not all(0 <= i < teacher_depth for i in idx)
        ):
            raise OptionError(
                f"Expected `keep_transformer_layers` to return {student_depth} distinct indices in "
                f"[0, {teacher_depth}), but got {idx}."
            )
        return sorted(idx)
    if rule == "first":
        return list(range(student_depth))
    if rule == "last":
        return list(range(teacher_depth - student_depth, teacher_depth))
    if rule == "spread":
        return _spread_indices(teacher_depth, student_depth)
    raise OptionError(
        f"Expected `keep_transformer_layers` to be one of ['first', 'last', 'spread'] or a callable, but got {rule!r}."
    )


@dataclass
class _Plan:
    config: dict[str, Any]
    module_map: dict[str, str]


def _plan(
    teacher_config: Mapping[str, Any],
    spec: BlockRemovalSpec,
    kept_layers: Mapping[str, Sequence[int]] | None = None,
) -> _Plan:
    """The student config and module map for ``spec``; ``kept_layers`` (teacher attention name -> the
    teacher transformer-layer indices it keeps) overrides the spec's depth and keep rule per attention."""
    kept_layers = kept_layers or {}
    if not isinstance(teacher_config, Mapping):
        raise DTypeError(
            f"Expected `teacher_config` to be a UNet2DConditionModel config (a mapping: `unet.config`), but got "
            f"{type(teacher_config).__name__}."
        )
    check_option(spec.mid_block, "spec.mid_block", _MID_TYPES)
    lay = _layout(teacher_config)
    n = lay.levels
    for what in ("layers_per_block", "down_transformer_layers", "up_transformer_layers"):
        values = getattr(spec, what)
        extra = [] if values is None else [v for v in values[n:] if v is not None]
        if extra and spec.name not in PRESETS:  # the presets are written for SDXL / SD1.5 depth on purpose
            logger.warning(
                "spec %r: `%s` has entries for %d levels but the teacher has %d; the entries past level %d (%s) "
                "are ignored. Level 0 is the highest resolution.",
                spec.name,
                what,
                len(values),
                n,
                n - 1,
                extra,
            )
    n_out = n - 1 if spec.drop_innermost else n
    widths = list(_per_block(teacher_config.get("block_out_channels", ()), n, "block_out_channels"))
    if spec.drop_innermost:
        if n < 2:
            raise OptionError(
                "Expected at least two levels for `drop_innermost=True`, but the teacher has one."
            )
        if widths[-1] != widths[-2]:
            raise OptionError(
                "Expected the two innermost levels to have the same width for `drop_innermost=True`, but "
                f"block_out_channels ends with {widths[-2:]}; the remaining up blocks would not fit."
            )

    # Resnets per level and which teacher indices they come from.
    layers: list[int] = []
    down_keep: list[list[int]] = []
    up_keep: list[list[int]] = []  # indexed by level
    for i in range(n_out):
        k = _level_entry(spec.layers_per_block, i)
        k = lay.layers[i] if k is None else k
        if not 1 <= k <= lay.layers[i]:
            raise OptionError(
                f"Expected `layers_per_block[{i}]` to lie in [1, {lay.layers[i]}] (the teacher's), but got {k}."
            )
        layers.append(k)
        down_keep.append(list(range(k)))
        up_keep.append([*range(k), lay.layers[i]])

    module_map: dict[str, str] = {}
    rule = spec.keep_transformer_layers

    def map_attention(s_attn: str, t_attn: str, t_depth: int, s_depth: int) -> None:
        module_map[s_attn] = t_attn
        keep = kept_layers[t_attn] if t_attn in kept_layers else _keep_indices(rule, t_depth, s_depth)
        for s_l, t_l in enumerate(keep):
            module_map[f"{s_attn}.transformer_blocks.{s_l}"] = f"{t_attn}.transformer_blocks.{t_l}"

    down_depths: list[list[int]] = []
    for i in range(n_out):
        teacher_depths = [lay.down_depths[i][t] for t in down_keep[i]]
        has_attn = _has_attention(lay.down_types[i])
        entry = _attention_entry(spec.down_transformer_layers, i, has_attn, lay.down_types[i], "down")
        depths = _level_depths(entry, teacher_depths, f"down_transformer_layers[{i}]")
        for s_j, t_j in enumerate(down_keep[i]):
            depths[s_j] = len(kept_layers.get(f"down_blocks.{i}.attentions.{t_j}", range(depths[s_j])))
        down_depths.append(depths)
        module_map[f"down_blocks.{i}"] = f"down_blocks.{i}"
        for s_j, t_j in enumerate(down_keep[i]):
            module_map[f"down_blocks.{i}.resnets.{s_j}"] = f"down_blocks.{i}.resnets.{t_j}"
            if has_attn:
                map_attention(
                    f"down_blocks.{i}.attentions.{s_j}",
                    f"down_blocks.{i}.attentions.{t_j}",
                    teacher_depths[s_j],
                    depths[s_j],
                )
        if i < n_out - 1:
            module_map[f"down_blocks.{i}.downsamplers.0"] = f"down_blocks.{i}.downsamplers.0"

    up_depths: list[list[int]] = []
    shift = n - n_out
    for u in range(n_out):
        level = n_out - 1 - u
        t_u = u + shift
        teacher_depths = [lay.up_depths[t_u][t] for t in up_keep[level]]
        has_attn = _has_attention(lay.up_types[t_u])
        entry = _attention_entry(spec.up_transformer_layers, level, has_attn, lay.up_types[t_u], "up")
        depths = _level_depths(entry, teacher_depths, f"up_transformer_layers[{level}]")
        for s_j, t_j in enumerate(up_keep[level]):
            depths[s_j] = len(kept_layers.get(f"up_blocks.{t_u}.attentions.{t_j}", range(depths[s_j])))
        up_depths.append(depths)
        module_map[f"up_blocks.{u}"] = f"up_blocks.{t_u}"
        for s_j, t_j in enumerate(up_keep[level]):
            module_map[f"up_blocks.{u}.resnets.{s_j}"] = f"up_blocks.{t_u}.resnets.{t_j}"
            if has_attn:
                map_attention(
                    f"up_blocks.{u}.attentions.{s_j}",
                    f"up_blocks.{t_u}.attentions.{t_j}",
                    teacher_depths[s_j],
                    depths[s_j],
                )
        if u < n_out - 1:
            module_map[f"up_blocks.{u}.upsamplers.0"] = f"up_blocks.{t_u}.upsamplers.0"

    mid_type = lay.mid_type
    if spec.mid_block == "none":
        mid_type = None
    elif spec.mid_block == "resnet":
        if mid_type not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
            raise OptionError(
                f"Expected a teacher mid block of type UNetMidBlock2DCrossAttn or UNetMidBlock2D for "
                f"mid_block='resnet', but got {mid_type!r}."
            )
        mid_type = "UNetMidBlock2D"
        module_map["mid_block"] = "mid_block"
        module_map["mid_block.resnets.0"] = "mid_block.resnets.0"
    elif mid_type is not None:
        # diffusers builds the mid block with the innermost level's transformer depth
        # (transformer_layers_per_block[-1]): "keep" must not change that depth.
        t_mid, s_mid = lay.down_depths[n - 1][0], down_depths[-1][0]
        if _has_attention(mid_type) and s_mid != t_mid:
            raise OptionError(
                f"Expected the innermost level to keep the teacher's transformer depth ({t_mid}) with "
                f"mid_block='keep': diffusers builds the mid block with that level's depth, so the student's "
                f"mid block would silently get {s_mid} of the teacher's {t_mid} transformer layers. Keep the "
                "innermost depth, or use mid_block='resnet' / 'none'."
            )
        module_map["mid_block"] = "mid_block"

    config = {k: v for k, v in dict(teacher_config).items() if k not in _PRIVATE_KEYS}
    if spec.drop_innermost:
        for key in ("block_out_channels", "down_block_types"):
            config[key] = list(config[key])[:-1]
        config["up_block_types"] = list(config["up_block_types"])[1:]
        for key in (
            "attention_head_dim",
            "num_attention_heads",
            "cross_attention_dim",
            "only_cross_attention",
        ):
            if isinstance(config.get(key), (list, tuple)):
                config[key] = list(config[key])[:-1]
    config["layers_per_block"] = layers[0] if len(set(layers)) == 1 else layers
    down_cfg: list[Any] = [d[0] if len(set(d)) == 1 else d for d in down_depths]
    up_cfg: list[Any] = [d[0] if len(set(d)) == 1 else d for d in up_depths]
    symmetric = all(isinstance(v, int) for v in down_cfg) and up_cfg == list(reversed(down_cfg))
    config["transformer_layers_per_block"] = down_cfg
    config["reverse_transformer_layers_per_block"] = None if symmetric else up_cfg
    config["mid_block_type"] = mid_type
    return _Plan(config, module_map)


def student_config(teacher_config: Mapping[str, Any], spec: str | BlockRemovalSpec) -> dict[str, Any]:
    """The config of the student that ``spec`` keeps of a ``UNet2DConditionModel`` teacher config.

    ``UNet2DConditionModel.from_config(student_config(unet.config, "ssd-1b"))`` builds the student; the
    config is JSON-serialisable and the layer lists are per block (an int when uniform, a per-layer list
    otherwise), with ``reverse_transformer_layers_per_block`` set whenever the up path differs from the
    mirrored down path.

    Args:
        teacher_config: The teacher's ``UNet2DConditionModel`` config (``unet.config`` or a dict with at least
            ``down_block_types``, ``up_block_types`` and ``block_out_channels``).
        spec: A :data:`PRESETS` name or a :class:`BlockRemovalSpec`.

    Returns:
        The student's config: a new dict (the teacher's keys with the removal applied; diffusers' private
        ``_use_default_values`` / ``_name_or_path`` dropped).

    Raises:
        DTypeError: ``teacher_config`` is not a mapping; ``spec`` is neither a preset name nor a spec.
        OptionError: an unknown preset; a config that is not a UNet's (block lists of unequal length, non-int
            depths); a spec that does not fit it (more levels than the teacher, resnet counts or depths above the
            teacher's, depths on levels without attention, ``drop_innermost`` with unequal innermost widths, a
            ``mid_block='keep'`` whose innermost depth changes, a ``keep_transformer_layers`` callable returning
            wrong indices).

    Example:
        >>> sdxl_like = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        ...              "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        ...              "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
        ...              "transformer_layers_per_block": [1, 2, 10]}
        >>> cfg = student_config(sdxl_like, "ssd-1b")
        >>> cfg["transformer_layers_per_block"], cfg["reverse_transformer_layers_per_block"], cfg["mid_block_type"]
        ([1, 2, 4], [[4, 4, 10], [2, 1, 1], 1], 'UNetMidBlock2D')
    """
    return _plan(teacher_config, _as_spec(spec)).config


_UNIT = re.compile(
    r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)(\.(resnets|attentions|downsamplers|upsamplers)\.\d+)?"
    r"(\.transformer_blocks\.\d+)?$"
)


def _translate(name: str, module_map: Mapping[str, str], prefixes: Sequence[str]) -> str:
    for prefix in prefixes:  # longest first
        if name == prefix or name.startswith(prefix + "."):
            return module_map[prefix] + name[len(prefix) :]
    return name


def _sorted_prefixes(module_map: Mapping[str, str]) -> list[str]:
    return sorted(module_map, key=lambda p: -p.count("."))


@dataclass
class BlockRemovalReport:
    """What :func:`build_student` did.

    Args:
        spec: The spec applied.
        config: The student config (``from_config``-ready).
        module_map: Student module -> teacher module it was initialised from (blocks, resnets, attentions,
            transformer blocks, samplers, mid block; every other module keeps its name).
        removed: Teacher modules none of whose parameters reach the student (the largest such units).
        teacher_parameters: Parameter count of the teacher.
        student_parameters: Parameter count of the student.
        initialized: Whether weights were copied (not on the meta device). Default ``False``.
        notes: Free-form remarks (default empty).

    Example:
        >>> r = BlockRemovalReport(BlockRemovalSpec(), {}, {}, [], 100, 60)
        >>> r.removed_fraction
        0.4
    """

    spec: BlockRemovalSpec
    config: dict[str, Any]
    module_map: dict[str, str]
    removed: list[str]
    teacher_parameters: int
    student_parameters: int
    initialized: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def removed_fraction(self) -> float:
        """``1 - student_parameters / teacher_parameters``.

        Returns:
            The fraction of the teacher's parameters the student does not have.
        """
        return 1.0 - self.student_parameters / max(1, self.teacher_parameters)

    def kd_pairs(self, level: Literal["block", "sub_block", "layer"] = "sub_block") -> dict[str, str]:
        """``{teacher_module: student_module}`` pairs for :class:`~diffdistill.students.LayerKD`.

        The teacher's whole mid block pairs with the student's single resnet when ``mid_block="resnet"``.

        Args:
            level: ``"block"``: down/up blocks and the mid block; ``"sub_block"`` (the default, SSD-1B's):
                every kept resnet and attention, plus the mid block; ``"layer"``: also every kept transformer
                block.

        Returns:
            A new dict ``{teacher module name: student module name}``.

        Raises:
            OptionError: an unknown ``level``.
        """
        check_option(level, "level", ["block", "sub_block", "layer"])
        pairs: dict[str, str] = {}
        for s_name, t_name in self.module_map.items():
            if s_name.startswith("mid_block"):
                continue
            depth = s_name.count(".")
            is_block = depth == 1
            is_sub = depth == 3 and (".resnets." in s_name or ".attentions." in s_name)
            is_layer = ".transformer_blocks." in s_name
            if (
                (level == "block" and is_block)
                or (level == "sub_block" and is_sub)
                or (level == "layer" and (is_sub or is_layer))
            ):
                pairs[t_name] = s_name
        if "mid_block.resnets.0" in self.module_map and self.spec.mid_block == "resnet":
            pairs["mid_block"] = "mid_block" if level == "block" else "mid_block.resnets.0"
        elif "mid_block" in self.module_map:
            pairs["mid_block"] = "mid_block"
        return pairs

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (the spec's callable rule, if any, as its name).

        Returns:
            ``{"spec", "config", "module_map", "removed", "teacher_parameters", "student_parameters",
            "removed_fraction", "initialized"}``.
        """
        spec = dataclasses.asdict(self.spec)
        rule = spec["keep_transformer_layers"]
        spec["keep_transformer_layers"] = (
            rule if isinstance(rule, str) else getattr(rule, "__name__", repr(rule))
        )
        return {
            "spec": spec,
            "config": self.config,
            "module_map": dict(self.module_map),
            "removed": list(self.removed),
            "teacher_parameters": self.teacher_parameters,
            "student_parameters": self.student_parameters,
            "removed_fraction": self.removed_fraction,
            "initialized": self.initialized,
        }


def _removed_units(teacher_names: Sequence[str], used: set[str]) -> list[str]:
    unused_by_unit: dict[str, bool] = {}
    for name in teacher_names:
        parts = name.split(".")
        for cut in range(1, len(parts)):
            unit = ".".join(parts[:cut])
            if _UNIT.match(unit):
                unused_by_unit[unit] = unused_by_unit.get(unit, True) and name not in used
    removed = sorted(u for u, unused in unused_by_unit.items() if unused)
    return [u for u in removed if not any(u.startswith(r + ".") for r in removed if r != u)]


def init_from_teacher(student: nn.Module, teacher: nn.Module, module_map: Mapping[str, str]) -> set[str]:
    """Copy every student parameter/buffer from the teacher entry it maps to; return the teacher keys used.

    Names are translated by the longest matching prefix of ``module_map`` (student module -> teacher
    module); unmapped names are looked up unchanged. Values are converted to the student's dtype (a bf16
    teacher initialises a float32 student) and copied onto the student's device, in place.

    Args:
        student: The student network (wrappers unwrapped), with real (not meta) weights.
        teacher: The teacher it was derived from (wrappers unwrapped), with real weights.
        module_map: ``{student module name: teacher module name}`` (e.g.
            :attr:`BlockRemovalReport.module_map`); ``{}`` copies by identical names.

    Returns:
        The teacher's state-dict keys that were copied.

    Raises:
        DTypeError: ``student`` / ``teacher`` is not an ``nn.Module``; ``module_map`` is not a mapping of
            strings to strings.
        OptionError: a student entry has no teacher counterpart (a teacher of another architecture, or a
            ``module_map`` from another spec); a network is on the meta device (no weights to copy or to
            receive).
        ShapeError: a student entry and its teacher source differ in shape (a teacher of another width).

    Example:
        >>> t, s = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> sorted(init_from_teacher(s, t, {"0": "1"}))
        ['1.bias', '1.weight']
        >>> torch.equal(s[0].weight, t[1].weight)
        True
    """
    check_module(student, "student")
    check_module(teacher, "teacher")
    if not isinstance(module_map, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in module_map.items()
    ):
        raise DTypeError(
            "Expected `module_map` to map student module names to teacher module names (str to str), e.g. "
            f"report.module_map, but got {type(module_map).__name__}."
        )
    student, teacher = unwrap_model(student), unwrap_model(teacher)
    for net, what in ((teacher, "teacher"), (student, "student")):
        if any(t.device.type == "meta" for t in itertools.chain(net.parameters(), net.buffers())):
            raise OptionError(
                f"Expected the {what} to hold weights, but it is on the meta device. Load its weights first (or, "
                f"for the student, materialise it with .to_empty(device=...)); build_student(teacher, spec, "
                "init_weights=False) sizes a student without copying."
            )
    prefixes = _sorted_prefixes(module_map)
    t_state = teacher.state_dict()
    new_state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for s_key, s_value in student.state_dict().items():
        t_key = _translate(s_key, module_map, prefixes)
        if t_key not in t_state:
            raise OptionError(
                f"Expected the teacher to have `{t_key}` (source of student `{s_key}`), but it has no such entry. "
                "Check that the student config was derived from this teacher's config (a teacher of another "
                "architecture), and that `module_map` comes from the same spec."
            )
        t_value = t_state[t_key]
        if t_value.shape != s_value.shape:
            raise ShapeError(
                f"Expected teacher `{t_key}` and student `{s_key}` to have the same shape, but got teacher "
                f"{tuple(t_value.shape)} and student {tuple(s_value.shape)}: the student was not derived from "
                "this teacher (another width or config). Build it from this teacher with "
                "build_student(teacher, spec).",
                name=s_key,
                expected=tuple(s_value.shape),
                actual=tuple(t_value.shape),
            )
        new_state[s_key] = t_value.detach().to(dtype=s_value.dtype)
        used.add(t_key)
    student.load_state_dict(new_state, strict=True)
    return used


def build_student(
    teacher: nn.Module,
    spec: str | BlockRemovalSpec,
    *,
    init_weights: bool = True,
) -> tuple[nn.Module, BlockRemovalReport]:
    """Build the block-removed student of a diffusers ``UNet2DConditionModel`` and initialise it from it.

    Args:
        teacher: The teacher UNet (wrappers are unwrapped). On the meta device the student is built on the
            meta device too and no weights are copied (sizes only).
        spec: A :data:`PRESETS` name or a :class:`BlockRemovalSpec`.
        init_weights: Copy the kept modules' weights from the teacher (by :attr:`BlockRemovalReport.module_map`).
            Default ``True``; ``False`` leaves diffusers' random initialisation.

    Returns:
        ``(student, report)``; the student has the teacher's dtype and device and is in train mode.

    Raises:
        DTypeError: ``teacher`` has no diffusers config (not a ``UNet2DConditionModel``); ``spec`` is neither a
            preset name nor a spec; ``init_weights`` is not a bool.
        OptionError: an unknown preset, or a spec that does not fit the teacher (see :func:`student_config`);
            the teacher's weights do not match its own config.
        ShapeError: a copied weight differs in shape from the student's (see :func:`init_from_teacher`).
        ImportError: diffusers is not installed.

    Example:
        >>> from diffusers import UNet2DConditionModel
        >>> teacher = UNet2DConditionModel(
        ...     sample_size=8, block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4,
        ...     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        ...     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        ...     cross_attention_dim=8, attention_head_dim=4, transformer_layers_per_block=[1, 2])
        >>> student, report = build_student(teacher, "ssd-1b")
        >>> report.config["reverse_transformer_layers_per_block"], report.removed[:2]
        ([[2, 1, 1], 1], ['mid_block.attentions.0', 'mid_block.resnets.1'])
    """
    from diffusers import UNet2DConditionModel

    spec = _as_spec(spec)
    check_bool(init_weights, "init_weights")
    check_module(teacher, "teacher")
    teacher = unwrap_model(teacher)
    config = getattr(teacher, "config", None)
    if not isinstance(config, Mapping):
        raise DTypeError(
            f"Expected `teacher` to be a diffusers UNet2DConditionModel (with a `.config`), but got "
            f"{type(teacher).__name__}."
        )
    plan = _plan(config, spec)
    ref: torch.Tensor = next(teacher.parameters(), torch.empty(0))
    on_meta = ref.device.type == "meta"
    with torch.device("meta") if on_meta else torch.device(ref.device):
        student = UNet2DConditionModel.from_config(plan.config)
    if student.dtype != ref.dtype:
        student = student.to(dtype=ref.dtype)
    prefixes = _sorted_prefixes(plan.module_map)
    t_names = [n for n, _ in teacher.state_dict().items()]
    if init_weights and not on_meta:
        used = init_from_teacher(student, teacher, plan.module_map)
    else:
        used = {_translate(k, plan.module_map, prefixes) for k in student.state_dict()}
        missing = sorted(used - set(t_names))
        if missing:
            raise OptionError(
                f"Expected the teacher to have {missing[:3]} (mapped from the student), but it does not."
            )
    report = BlockRemovalReport(
        spec=spec,
        config=plan.config,
        module_map=plan.module_map,
        removed=_removed_units(t_names, used),
        teacher_parameters=sum(p.numel() for p in teacher.parameters()),
        student_parameters=sum(p.numel() for p in student.parameters()),
        initialized=bool(init_weights and not on_meta),
    )
    logger.info(
        "block removal %r: %d -> %d parameters (%.1f%% removed), %d teacher unit(s) dropped",
        spec.name,
        report.teacher_parameters,
        report.student_parameters,
        100 * report.removed_fraction,
        len(report.removed),
    )
    return student, report


# --- Progressive rounds: each round removes blocks from the previous round's student ---------------------
