"""Progressive block removal in rounds (SSD-1B / Segmind-Vega, Gupta et al. 2024, arXiv:2401.02677).

Progressive rounds (SSD-1B / Segmind-Vega remove blocks in rounds, each from the previous round's trained
student): :func:`start_chain` makes the source round 0; :func:`remove_blocks` removes named units (source module
names, the same in every round; :func:`removed_units` / :func:`split_rounds` give a preset's, whole or per round)
from the latest student and copies what it keeps; the :class:`BlockRemovalChain` it returns records every round
(units, parameters, FLOPs by :func:`unet_flops`), pairs the latest student with a teacher of the source's or any
earlier round's layout (:meth:`BlockRemovalChain.kd_pairs`) and saves as JSON; :func:`infer_chain` recovers the
history of a student saved without one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .._checks import DTypeError, OptionError, check_bool, check_module
from .._modules import unwrap_model
from .block_removal import (
    _UNIT,
    BlockRemovalReport,
    BlockRemovalSpec,
    KeepRule,
    _as_spec,
    _has_attention,
    _Layout,
    _layout,
    _per_block,
    _Plan,
    _plan,
    _removed_units,
    _sorted_prefixes,
    _translate,
    init_from_teacher,
)

__all__ = [
    "ROUND_GROUPS",
    "BlockRemovalChain",
    "RemovalRound",
    "infer_chain",
    "remove_blocks",
    "removed_units",
    "split_rounds",
    "start_chain",
    "unet_flops",
]

logger = logging.getLogger(__name__)


ROUND_GROUPS: tuple[tuple[str, ...], ...] = (("mid_block",), ("down_blocks",), ("up_blocks",))
"""How :func:`split_rounds` splits a preset by default: round 1 the mid block, round 2 the down path, round 3
the up path. Our choice: the paper removes blocks progressively, guided by layer-level losses (Gupta et al.
2024, abstract and method), in an order of its own that this split does not claim to reproduce; only the
preset's end point is the released model's.

It suits the SDXL presets ``"ssd-1b"`` and ``"vega"``, which remove transformer layers and mid-block parts: the
three rounds hold what they name. The BK-SDM presets remove resnet/attention pairs, and an up block has one
resnet more than its down block (``layers_per_block + 1``), so the up path's removals go with the down path's:
with these groups round 2 takes them and round 3 is empty (``"bk-sdm-base"``: round 1 too, it keeps the mid
block). For BK-SDM, name the rounds you want, e.g. ``(("mid_block",), ("down_blocks", "up_blocks"))``."""


def _clean_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy of a UNet config without diffusers' private ``_*`` keys (tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def _meta_unet(config: Mapping[str, Any]) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))


@functools.lru_cache(maxsize=32)
def _state_names_of(key: str) -> tuple[str, ...]:
    return tuple(_meta_unet(json.loads(key)).state_dict())


def _state_names(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The state-dict keys of the UNet ``config`` builds (built on the meta device; cached by config)."""
    return _state_names_of(json.dumps(_clean_config(config), sort_keys=True))


def _units(names: Sequence[str]) -> set[str]:
    """Every removable unit (block, resnet, attention, sampler, transformer layer) that owns one of ``names``."""
    units: set[str] = set()
    for name in names:
        parts = name.split(".")
        for cut in range(1, len(parts)):
            unit = ".".join(parts[:cut])
            if _UNIT.match(unit):
                units.add(unit)
    return units


def _architecture(config: Mapping[str, Any]) -> tuple[Any, ...]:
    """What decides a UNet's module names and shapes (the layout and widths), not its weights."""
    lay = _layout(config)
    widths = list(_per_block(config.get("block_out_channels", ()), lay.levels, "block_out_channels"))
    return (
        lay.down_types,
        lay.up_types,
        lay.layers,
        lay.down_depths,
        lay.up_depths,
        lay.mid_type,
        widths,
        config.get("cross_attention_dim"),
        config.get("in_channels", 4),
    )


def _inverse(module_map: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    inverse = {v: k for k, v in module_map.items()}
    return inverse, _sorted_prefixes(inverse)


def _used_by(config: Mapping[str, Any], module_map: Mapping[str, str]) -> set[str]:
    prefixes = _sorted_prefixes(module_map)
    return {_translate(k, module_map, prefixes) for k in _state_names(config)}


def removed_units(teacher_config: Mapping[str, Any], spec: str | BlockRemovalSpec) -> list[str]:
    """The teacher units (largest first) that ``spec`` removes: :attr:`BlockRemovalReport.removed` without weights.

    Args:
        teacher_config: The teacher's ``UNet2DConditionModel`` config.
        spec: A :data:`PRESETS` name or a :class:`BlockRemovalSpec`.

    Returns:
        Sorted module names of the teacher, none inside another (e.g. ``"mid_block.attentions.0"``,
        ``"down_blocks.2.attentions.0.transformer_blocks.1"``).

    Raises:
        DTypeError: ``spec`` is neither a preset name nor a spec; ``teacher_config`` is not a mapping.
        OptionError: an unknown preset, or a spec that does not fit the config (see :func:`student_config`).
        ImportError: diffusers is not installed.

    Example:
        >>> cfg = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        ...        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "block_out_channels": [8, 16],
        ...        "norm_num_groups": 4, "cross_attention_dim": 8, "attention_head_dim": 4,
        ...        "transformer_layers_per_block": [1, 2]}
        >>> units = removed_units(cfg, "vega")
        >>> units[:3]
        ['down_blocks.1.attentions.0.transformer_blocks.1', 'down_blocks.1.attentions.1.transformer_blocks.1', 'mid_block.attentions.0']
    """
    plan = _plan(teacher_config, _as_spec(spec))
    return _removed_units(_state_names(teacher_config), _used_by(plan.config, plan.module_map))


def split_rounds(
    teacher_config: Mapping[str, Any],
    spec: str | BlockRemovalSpec,
    groups: Sequence[Sequence[str]] = ROUND_GROUPS,
) -> list[list[str]]:
    """Split what ``spec`` removes from a teacher into rounds, for :func:`remove_blocks`.

    Each removed unit (see :func:`removed_units`) goes to the first group with a prefix that owns it (a prefix
    is a module name such as ``"mid_block"``, ``"up_blocks"`` or ``"up_blocks.1"``). Every round is then checked
    to leave a diffusers-loadable UNet (with the rounds before it): a round whose units cannot leave without
    units of a later round takes those over (logged; e.g. BK-SDM's up-path resnets, which go with the down-path
    resnets of their level, into the down-path round), and a round that removes units before the units that
    make them removable is refused. So applying the rounds in order with :func:`remove_blocks` works round by
    round and ends at the student :func:`build_student` builds from ``spec``. The default groups suit
    ``"ssd-1b"`` and ``"vega"`` (see :data:`ROUND_GROUPS`; for BK-SDM they give an empty last round).

    Args:
        teacher_config: The teacher's (the chain's source) ``UNet2DConditionModel`` config.
        spec: A :data:`PRESETS` name or a :class:`BlockRemovalSpec`.
        groups: One tuple of module-name prefixes per round. Default :data:`ROUND_GROUPS` (mid block, down
            path, up path: our choice).

    Returns:
        One sorted list of teacher unit names per group (a group left with none of the units gets ``[]``; a unit
        taken over by an earlier round is in that round's list).

    Raises:
        DTypeError: ``groups`` is not a sequence of sequences of strings.
        OptionError: a prefix names no module of the teacher; a removed unit is owned by no group; a round
            removes units that no unit of it or of a later round makes removable (the units are named: put
            them in a later group); an unknown preset or a spec that does not fit (see :func:`student_config`).
        ImportError: diffusers is not installed.

    Example:
        >>> cfg = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        ...        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "block_out_channels": [8, 16],
        ...        "norm_num_groups": 4, "cross_attention_dim": 8, "attention_head_dim": 4,
        ...        "transformer_layers_per_block": [1, 2]}
        >>> [len(r) for r in split_rounds(cfg, "vega")]
        [2, 2, 3]
    """
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise DTypeError(
            "Expected `groups` to be a sequence of prefix tuples, one per round, e.g. "
            f"(('mid_block',), ('down_blocks',), ('up_blocks',)), but got {type(groups).__name__}."
        )
    units = sorted(_units(_state_names(teacher_config)))
    for r, group in enumerate(groups):
        if (
            isinstance(group, str)
            or not isinstance(group, Sequence)
            or not all(isinstance(p, str) for p in group)
        ):
            raise DTypeError(
                f"Expected `groups[{r}]` to be a tuple of module-name prefixes (e.g. ('mid_block',)), but got "
                f"{group!r}."
            )
        for prefix in group:
            if not any(u == prefix or u.startswith(prefix + ".") for u in units):
                raise OptionError(
                    f"Expected `groups[{r}]` to hold module-name prefixes of the teacher (e.g. 'mid_block', "
                    f"'down_blocks', 'up_blocks.1'), but {prefix!r} owns no module of it."
                )
    rounds: list[list[str]] = [[] for _ in groups]
    for unit in removed_units(teacher_config, spec):
        owner = next(
            (r for r, g in enumerate(groups) if any(unit == p or unit.startswith(p + ".") for p in g)), None
        )
        if owner is None:
            raise OptionError(
                f"Expected `groups` to own every unit the spec removes, but {unit!r} matches none of "
                f"{[list(g) for g in groups]}. Add its prefix to a round."
            )
        rounds[owner].append(unit)
    return _buildable_rounds(teacher_config, rounds, groups)


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _buildable_rounds(
    teacher_config: Mapping[str, Any], rounds: list[list[str]], groups: Sequence[Sequence[str]]
) -> list[list[str]]:
    """``rounds`` with every cumulative round a loadable UNet: a round whose units need units of later rounds
    (the units the loadable UNet closest to it removes as well) takes them over; a round that removes a unit too
    early (one no later unit makes removable with it) is refused, naming the units."""
    rounds = [list(r) for r in rounds]
    done: set[str] = set()
    for k in range(len(rounds)):
        while rounds[k]:
            cumulative = _largest(done | set(rounds[k]))
            got = _removal_plan(teacher_config, cumulative, f"round {k + 1}")[3]
            if got == cumulative:
                break
            needed = sorted(got - cumulative)
            later = [(r, u) for r in range(k + 1, len(rounds)) for u in rounds[r]]
            pull = [(r, u) for r, u in later if any(_overlaps(u, n) for n in needed)]
            uncovered = [n for n in needed if not any(_overlaps(u, n) for _, u in pull)]
            early = sorted(cumulative - got)
            if early or uncovered or not pull:
                what = (
                    f"removes {early} before the units that make them removable"
                    if early
                    else f"needs {uncovered} as well, which no later round removes"
                )
                raise OptionError(
                    f"Expected every round of `groups` to leave a diffusers-loadable UNet, but round {k + 1} "
                    f"({list(groups[k])}) {what} (a down resnet goes with its attention and the up resnets of its "
                    "level, the last ones first; the mid block loses its attention and second resnet together; the "
                    "innermost stage goes with its downsampler). Put those units in one group, or in a later group "
                    "than the units they need."
                )
            moved = [u for _, u in pull]
            logger.info(
                "split_rounds: round %d (%s) takes %s from later rounds: they must be removed with it",
                k + 1,
                list(groups[k]),
                moved,
            )
            for r, u in pull:
                rounds[r].remove(u)
            rounds[k] = sorted(rounds[k] + moved)
        done |= set(rounds[k])
    return rounds


_TRANSFORMER_LAYER = re.compile(r"^(.+\.attentions\.\d+)\.transformer_blocks\.(\d+)$")


def _attention_depth(lay: _Layout, attention: str) -> int | None:
    m = re.match(r"^(down|up)_blocks\.(\d+)\.attentions\.(\d+)$", attention)
    if m is None:
        return None
    side, b, j = m.group(1), int(m.group(2)), int(m.group(3))
    depths = lay.down_depths if side == "down" else lay.up_depths
    return depths[b][j] if b < len(depths) and j < len(depths[b]) else None


def _largest(units: set[str]) -> set[str]:
    """``units`` without those inside another of them."""
    return {u for u in units if not any(u.startswith(a + ".") for a in units)}


def _removal_plan(
    source_config: Mapping[str, Any], removed: set[str], name: str
) -> tuple[BlockRemovalSpec, dict[str, list[int]], _Plan, set[str]]:
    """The spec, per-attention kept layers and plan that ``removed`` asks of the source (down resnets counted, mid
    block and transformer layers as named), and the units that plan really removes (largest only): these equal
    ``_largest(removed)`` exactly when the removal is a diffusers-loadable UNet."""
    removed = _largest(removed)
    lay = _layout(source_config)
    n = lay.levels
    mid: Literal["keep", "resnet", "none"] = "keep"
    if "mid_block" in removed:
        mid = "none"
    elif removed & {"mid_block.attentions.0", "mid_block.resnets.1"}:
        mid = "resnet"
    layers = tuple(
        max(1, lay.layers[i] - sum(f"down_blocks.{i}.resnets.{j}" in removed for j in range(lay.layers[i])))
        for i in range(n)
    )
    gone: dict[str, set[int]] = {}
    for unit in removed:
        m = _TRANSFORMER_LAYER.match(unit)
        if m:
            gone.setdefault(m.group(1), set()).add(int(m.group(2)))
    kept: dict[str, list[int]] = {}
    for attention, idx in sorted(gone.items()):
        depth = _attention_depth(lay, attention)
        if depth is None:
            continue  # e.g. the mid block's transformer layers: refused by the round trip below
        kept[attention] = [b for b in range(depth) if b not in idx]
        if not kept[attention]:
            raise OptionError(
                f"Expected every kept attention to keep at least one transformer layer, but `remove` takes all "
                f"{depth} of `{attention}`. Remove the attention itself (with its resnet) instead."
            )
    spec = BlockRemovalSpec(
        name=name, layers_per_block=layers, mid_block=mid, drop_innermost=f"down_blocks.{n - 1}" in removed
    )
    plan = _plan(source_config, spec, kept)
    return (
        spec,
        kept,
        plan,
        set(_removed_units(_state_names(source_config), _used_by(plan.config, plan.module_map))),
    )


def _plan_without(
    source_config: Mapping[str, Any], removed: set[str], name: str
) -> tuple[BlockRemovalSpec, dict[str, list[int]], _Plan]:
    """The spec, per-attention kept layers and plan of the source with exactly the units ``removed`` gone."""
    spec, kept, plan, got = _removal_plan(source_config, removed, name)
    removed = _largest(removed)
    if got != removed:
        shown = f"{sorted(removed)[:6]}{' ...' if len(removed) > 6 else ''}"
        needs = f" needs {sorted(got - removed)} as well" if got - removed else ""
        alone = f" cannot remove {sorted(removed - got)} alone" if removed - got else ""
        raise OptionError(
            f"Expected the removed units to form a diffusers-loadable UNet, but removing {shown}{needs}"
            f"{' and' if needs and alone else ''}{alone} (a down resnet goes with its attention and the last ones "
            "go first, an up block keeps its last resnet, the mid block loses its attention and second resnet "
            "together, and the innermost stage goes with its downsampler). Add or drop those names."
        )
    return spec, kept, plan


def unet_flops(
    unet: nn.Module | Mapping[str, Any], *, sample_size: int | None = None, tokens: int = 77
) -> int:
    """Floating-point operations of one ``UNet2DConditionModel`` forward at batch 1 (counted on the meta device).

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (the operations it counts: matrix products,
    convolutions and attention, 2 FLOPs per multiply-add) on a copy built on the meta device, so no memory is
    spent on weights; a count takes about two seconds of Python dispatch, and is cached per config.

    Args:
        unet: The UNet, or its config.
        sample_size: Latent height and width (default the config's ``sample_size``: 128 for SDXL, 1024 px).
        tokens: Text tokens of the cross-attention context (default 77).

    Returns:
        The FLOP count.

    Raises:
        DTypeError: ``unet`` has no diffusers config and is not a mapping.
        OptionError: a config whose conditioning this cannot build (class embeddings, an addition embedding
            other than SDXL's ``"text_time"``, per-block cross-attention widths); a bad ``sample_size`` or
            ``tokens``.
        ImportError: diffusers is not installed.

    Example:
        >>> cfg = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        ...        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "block_out_channels": [8, 16],
        ...        "norm_num_groups": 4, "cross_attention_dim": 8, "attention_head_dim": 4, "sample_size": 8}
        >>> unet_flops(cfg) > unet_flops({**cfg, "mid_block_type": "UNetMidBlock2D"})
        True
    """
    config = unet if isinstance(unet, Mapping) else getattr(unwrap_model(unet), "config", None)
    if not isinstance(config, Mapping):
        raise DTypeError(
            f"Expected `unet` to be a diffusers UNet2DConditionModel or its config, but got {type(unet).__name__}."
        )
    size = config.get("sample_size", 64) if sample_size is None else sample_size
    for value, what in ((size, "sample_size"), (tokens, "tokens")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"Expected `{what}` to be an int >= 1, but got {value!r}.")
    width = config.get("cross_attention_dim", 1280)
    if not isinstance(width, int) or config.get("class_embed_type") is not None:
        raise OptionError(
            "Expected a UNet config with one int `cross_attention_dim` and no class embedding, but got "
            f"cross_attention_dim={width!r}, class_embed_type={config.get('class_embed_type')!r}."
        )
    kind = config.get("addition_embed_type")
    if kind not in (None, "text_time"):
        raise OptionError(f"Expected `addition_embed_type` None or 'text_time' (SDXL), but got {kind!r}.")
    return _flops_of(json.dumps(_clean_config(config), sort_keys=True), size, tokens)


@functools.lru_cache(maxsize=32)
def _flops_of(key: str, size: int, tokens: int) -> int:
    """:func:`unet_flops` of a checked config (JSON ``key``), cached: a count takes seconds on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads(key)
    width, kind = config.get("cross_attention_dim", 1280), config.get("addition_embed_type")
    model = _meta_unet(config)
    meta = torch.device("meta")
    kwargs: dict[str, Any] = {}
    if kind == "text_time":
        time_dim = int(config["addition_time_embed_dim"])
        text_dim = int(config["projection_class_embeddings_input_dim"]) - 6 * time_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(1, text_dim, device=meta),
            "time_ids": torch.zeros(1, 6, device=meta),
        }
    sample = torch.zeros(1, int(config.get("in_channels", 4)), size, size, device=meta)
    context = torch.zeros(1, tokens, width, device=meta)
    with FlopCounterMode(display=False) as counter:
        model(sample, torch.zeros(1, device=meta), context, **kwargs)
    return int(counter.get_total_flops())


@dataclass
class RemovalRound:
    """One round of a :class:`BlockRemovalChain`: what it removed and the student it left.

    Args:
        name: Label of the round (e.g. ``"round 2: down path"``).
        removed: Units of the chain's source removed in this round (source names).
        config: The student's config after the round (``from_config``-ready).
        module_map: Student module -> source module it descends from (as :attr:`BlockRemovalReport.module_map`).
        parameters: The student's parameter count after the round.
        flops: FLOPs of one forward after the round (:func:`unet_flops`), or None if not counted.
        info: Free-form JSON-serialisable notes (the training script records the teacher and steps here).

    Example:
        >>> RemovalRound("round 1", ["mid_block.attentions.0"], {}, {}, 10).removed
        ['mid_block.attentions.0']
    """

    name: str
    removed: list[str]
    config: dict[str, Any]
    module_map: dict[str, str]
    parameters: int
    flops: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class BlockRemovalChain:
    """A student's block-removal history: the source UNet (round 0) and every round since.

    SSD-1B and Segmind-Vega are made in rounds, each removing blocks from the previous round's trained student
    (Gupta et al. 2024: "progressive removal using layer-level losses"). Unit names are always the source's, so a round can say
    what it removes whatever earlier rounds did, and :meth:`kd_pairs` maps the latest student to a teacher of
    the source's architecture (the SDXL fine-tunes the paper switches to) or of any earlier round's. Built by
    :func:`start_chain` and extended by :func:`remove_blocks`; saved with :meth:`to_dict` next to a student.

    Args:
        source_config: The source UNet's config (round 0).
        source_parameters: Its parameter count.
        source_flops: Its FLOPs per forward (:func:`unet_flops`), or None.
        rounds: The rounds so far, oldest first. Default none.

    Example:
        >>> chain = BlockRemovalChain({"block_out_channels": [8]}, 100)
        >>> chain.removed, chain.parameters
        ([], 100)
    """

    source_config: dict[str, Any]
    source_parameters: int
    source_flops: int | None = None
    rounds: list[RemovalRound] = field(default_factory=list)

    @property
    def removed(self) -> list[str]:
        """Every source unit removed so far.

        Returns:
            Sorted source module names.
        """
        return sorted({u for r in self.rounds for u in r.removed})

    @property
    def config(self) -> dict[str, Any]:
        """The latest student's config (the source's before any round).

        Returns:
            The config dict.
        """
        return self.rounds[-1].config if self.rounds else self.source_config

    @property
    def parameters(self) -> int:
        """The latest student's parameter count.

        Returns:
            The count.
        """
        return self.rounds[-1].parameters if self.rounds else self.source_parameters

    def _map(self, k: int) -> dict[str, str]:
        if k == 0:
            return _plan(self.source_config, BlockRemovalSpec(name="source")).module_map
        return self.rounds[k - 1].module_map

    def _config(self, k: int) -> dict[str, Any]:
        return self.source_config if k == 0 else self.rounds[k - 1].config

    def round_of(self, config: Mapping[str, Any]) -> int:
        """Which architecture of the chain ``config`` has: 0 the source's, ``k`` the student's after round ``k``.

        Used to pair a teacher's modules with the student's: a fine-tuned SDXL has the source's architecture
        (0); a teacher that is an earlier round's student has that round's. The latest match wins.

        Args:
            config: A ``UNet2DConditionModel`` config (e.g. the teacher's ``unet.config``).

        Returns:
            The round index.

        Raises:
            OptionError: no architecture of the chain matches (a teacher of another model family or width).
        """
        want = _architecture(config)
        for k in range(len(self.rounds), -1, -1):
            if _architecture(self._config(k)) == want:
                return k
        raise OptionError(
            f"Expected a UNet with the architecture of the chain's source or of one of its {len(self.rounds)} "
            "round(s) (for the feature-KD pairs), but its layout differs from all of them. A teacher must be "
            "the source model, a fine-tune of it, or an earlier round's student."
        )

    def report(self, teacher_round: int = 0) -> BlockRemovalReport:
        """The latest student against the architecture after ``teacher_round`` (0: the source), as one report.

        Args:
            teacher_round: 0 for a teacher of the source's architecture, ``k`` for the student after round ``k``.
                Default 0.

        Returns:
            A :class:`BlockRemovalReport` whose ``module_map`` names that architecture's modules, whose
            ``removed`` lists (in its names) what the later rounds removed, and whose :meth:`~BlockRemovalReport.kd_pairs`
            give the feature-KD pairs.

        Raises:
            OptionError: ``teacher_round`` is not in ``[0, len(rounds)]``.
        """
        if isinstance(teacher_round, bool) or not isinstance(teacher_round, int):
            raise OptionError(f"Expected `teacher_round` to be an int, but got {teacher_round!r}.")
        if not 0 <= teacher_round <= len(self.rounds):
            raise OptionError(
                f"Expected `teacher_round` to lie in [0, {len(self.rounds)}] (0: the source; k: after round k), "
                f"but got {teacher_round}."
            )
        spec, _, _ = _plan_without(self.source_config, set(self.removed), "chain")
        inverse, prefixes = _inverse(self._map(teacher_round))
        module_map = {s: _translate(t, inverse, prefixes) for s, t in self._map(len(self.rounds)).items()}
        later = sorted({u for r in self.rounds[teacher_round:] for u in r.removed})
        teacher_params = (
            self.source_parameters if teacher_round == 0 else self.rounds[teacher_round - 1].parameters
        )
        return BlockRemovalReport(
            spec=spec,
            config=self.config,
            module_map=module_map,
            removed=[_translate(u, inverse, prefixes) for u in later],
            teacher_parameters=teacher_params,
            student_parameters=self.parameters,
            initialized=True,
        )

    def kd_pairs(
        self, level: Literal["block", "sub_block", "layer"] = "sub_block", teacher_round: int = 0
    ) -> dict[str, str]:
        """``{teacher module: student module}`` for :class:`~diffdistill.students.LayerKD`, across all rounds.

        Args:
            level: As :meth:`BlockRemovalReport.kd_pairs` (default ``"sub_block"``, SSD-1B's).
            teacher_round: The teacher's architecture (see :meth:`round_of`). Default 0, the source's.

        Returns:
            A new dict.

        Raises:
            OptionError: an unknown ``level`` or a ``teacher_round`` out of range.
        """
        return self.report(teacher_round).kd_pairs(level)

    def summary(self) -> list[str]:
        """One line per round: units removed, parameters and FLOPs, removed in the round and in total.

        Returns:
            Text lines (a header, round 0 = the source, then each round).
        """

        def flops(value: int | None) -> str:
            return "-" if value is None else f"{value / 1e9:.4g} GFLOPs"

        def drop(before: float | None, after: float | None) -> str:
            if before is None or after is None or before == 0:
                return "-"
            return f"-{100 * (before - after) / before:.1f}%"

        lines = ["round | units removed | parameters (round, total) | FLOPs (round, total)"]
        lines.append(f"0 source | 0 | {self.source_parameters} | {flops(self.source_flops)}")
        params, fl = float(self.source_parameters), self.source_flops
        for k, r in enumerate(self.rounds, 1):
            lines.append(
                f"{k} {r.name} | {len(r.removed)} | {r.parameters} ({drop(params, r.parameters)}, "
                f"{drop(self.source_parameters, r.parameters)}) | {flops(r.flops)} ({drop(fl, r.flops)}, "
                f"{drop(self.source_flops, r.flops)})"
            )
            params, fl = float(r.parameters), r.flops
        return lines

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record (:meth:`from_dict` reads it back).

        Returns:
            ``{"source_config", "source_parameters", "source_flops", "rounds": [{"name", "removed", "config",
            "module_map", "parameters", "flops", "info"}, ...], "summary"}``.
        """
        return {
            "source_config": self.source_config,
            "source_parameters": self.source_parameters,
            "source_flops": self.source_flops,
            "rounds": [dataclasses.asdict(r) for r in self.rounds],
            "summary": self.summary(),
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> BlockRemovalChain:
        """Read a record written by :meth:`to_dict`.

        Args:
            record: The mapping (e.g. ``json.load`` of the file a training script saved beside its student).

        Returns:
            The chain.

        Raises:
            OptionError: a key is missing or a round has the wrong fields.
        """
        if not isinstance(record, Mapping) or not {"source_config", "source_parameters", "rounds"} <= set(
            record
        ):
            raise OptionError(
                "Expected a block-removal record with 'source_config', 'source_parameters' and 'rounds' (written "
                f"by BlockRemovalChain.to_dict), but got {sorted(record) if isinstance(record, Mapping) else record!r}."
            )
        names = {f.name for f in dataclasses.fields(RemovalRound)}
        rounds = []
        for k, r in enumerate(record["rounds"], 1):
            if not isinstance(r, Mapping) or not set(r) <= names:
                raise OptionError(
                    f"Expected round {k} of the record to have the fields {sorted(names)}, but got {r!r}."
                )
            rounds.append(RemovalRound(**r))
        return cls(
            dict(record["source_config"]),
            int(record["source_parameters"]),
            record.get("source_flops"),
            rounds,
        )


def start_chain(source: nn.Module, *, count_flops: bool = True) -> BlockRemovalChain:
    """A :class:`BlockRemovalChain` with no rounds yet: the source UNet is round 0.

    Args:
        source: The source ``UNet2DConditionModel`` (e.g. SDXL's; meta weights are fine).
        count_flops: Count its FLOPs with :func:`unet_flops`. Default ``True``.

    Returns:
        The chain.

    Raises:
        DTypeError: ``source`` is not a diffusers UNet; ``count_flops`` is not a bool.
        ImportError: diffusers is not installed.

    Example:
        >>> from diffusers import UNet2DConditionModel
        >>> unet = UNet2DConditionModel(
        ...     sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
        ...     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=4,
        ...     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        >>> start_chain(unet, count_flops=False).rounds
        []
    """
    check_module(source, "source")
    check_bool(count_flops, "count_flops")
    source = unwrap_model(source)
    config = getattr(source, "config", None)
    if not isinstance(config, Mapping):
        raise DTypeError(
            f"Expected `source` to be a diffusers UNet2DConditionModel (with a `.config`), but got "
            f"{type(source).__name__}."
        )
    return BlockRemovalChain(
        source_config=_clean_config(config),
        source_parameters=sum(p.numel() for p in source.parameters()),
        source_flops=unet_flops(config) if count_flops else None,
    )


def remove_blocks(
    student: nn.Module,
    chain: BlockRemovalChain,
    remove: Sequence[str] = (),
    *,
    name: str | None = None,
    init_weights: bool = True,
    count_flops: bool = True,
    info: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, BlockRemovalChain]:
    """One progressive round: remove units from the latest student of ``chain`` and start from its weights.

    SSD-1B / Segmind-Vega (Gupta et al. 2024, progressive removal): each round starts from the previous round's
    trained student, not from the source. ``remove`` names units of the *source* (as :func:`removed_units` and
    :func:`split_rounds` give them), so the same names work in every round. The new student copies every kept
    module from ``student`` (by the composed module maps).

    Args:
        student: The latest student of ``chain`` (the source itself before the first round), with weights.
        chain: Its history (:func:`start_chain` for the source, or :meth:`BlockRemovalChain.from_dict`).
        remove: Source unit names to remove this round (blocks, resnets, attentions, samplers, transformer
            layers; none inside another). Empty: a round that changes nothing but is recorded (e.g. a new teacher),
            and ``student`` itself is returned.
        name: Label of the round (default ``"round k"``).
        init_weights: Copy the kept weights from ``student``. Default ``True``.
        count_flops: Count the new student's FLOPs (:func:`unet_flops`). Default ``True``.
        info: JSON-serialisable notes stored with the round (e.g. the teacher). Default none.

    Returns:
        ``(new_student, new_chain)``; ``chain`` is unchanged. The new student has ``student``'s dtype and device
        and is in train mode.

    Raises:
        DTypeError: ``student`` is not a diffusers UNet; ``chain`` is not a :class:`BlockRemovalChain`; ``remove``
            is not a sequence of strings; a flag is not a bool.
        OptionError: ``student`` is not the chain's latest student (another architecture); a name is not a unit
            of the source; a unit is already gone (removed in an earlier round, or inside another name of
            ``remove``) or listed twice; the units left do not form a diffusers UNet (which names are missing is
            said); an attention would keep no transformer layer.
        ImportError: diffusers is not installed.

    Example:
        >>> from diffusers import UNet2DConditionModel
        >>> unet = UNet2DConditionModel(
        ...     sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
        ...     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=4,
        ...     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=[1, 2])
        >>> chain = start_chain(unet, count_flops=False)
        >>> s1, chain = remove_blocks(unet, chain, ["mid_block.attentions.0", "mid_block.resnets.1"], count_flops=False)
        >>> s2, chain = remove_blocks(s1, chain, ["down_blocks.1.attentions.0.transformer_blocks.1"], count_flops=False)
        >>> s2.config.mid_block_type, s2.config.transformer_layers_per_block, len(chain.removed)
        ('UNetMidBlock2D', [1, [1, 2]], 3)
    """
    from diffusers import UNet2DConditionModel

    check_module(student, "student")
    if not isinstance(chain, BlockRemovalChain):
        raise DTypeError(
            f"Expected `chain` to be a BlockRemovalChain (start_chain(source) before the first round), but got "
            f"{type(chain).__name__}."
        )
    if (
        isinstance(remove, str)
        or not isinstance(remove, Sequence)
        or not all(isinstance(u, str) for u in remove)
    ):
        raise DTypeError(
            "Expected `remove` to be a sequence of source module names (e.g. ['mid_block.attentions.0', "
            f"'mid_block.resnets.1']), but got {remove!r}."
        )
    for flag, what in ((init_weights, "init_weights"), (count_flops, "count_flops")):
        check_bool(flag, what)
    student = unwrap_model(student)
    config = getattr(student, "config", None)
    if not isinstance(config, Mapping):
        raise DTypeError(
            f"Expected `student` to be a diffusers UNet2DConditionModel (with a `.config`), but got "
            f"{type(student).__name__}."
        )
    k = len(chain.rounds)
    if _architecture(config) != _architecture(chain.config):
        raise OptionError(
            f"Expected `student` to be the chain's latest student (after round {k}), but its architecture differs "
            "(transformer depths, resnets or mid block). Pass the student saved with this record, or the record "
            "saved with this student."
        )
    source_units = _units(_state_names(chain.source_config))
    earlier = {u: r for r, rnd in enumerate(chain.rounds, 1) for u in rnd.removed}
    for unit in remove:
        if unit not in source_units:
            raise OptionError(
                f"Expected `remove` to name units of the source UNet (its module names, e.g. "
                f"'mid_block.attentions.0', 'down_blocks.2.attentions.1.transformer_blocks.3'), but got {unit!r}: "
                "no such unit. Names are the source's in every round, not the pruned student's."
            )
        for gone, r in earlier.items():
            if unit == gone or unit.startswith(gone + "."):
                raise OptionError(
                    f"Expected `remove` to name units the student still has, but {unit!r} is already gone: round "
                    f"{r} ({chain.rounds[r - 1].name!r}) removed {gone!r}."
                )
        inside = [u for u in remove if u != unit and unit.startswith(u + ".")]
        if inside or list(remove).count(unit) > 1:
            raise OptionError(
                f"Expected each unit once in `remove`, but {unit!r} is listed twice or inside {inside}."
            )
    round_name = f"round {k + 1}" if name is None else name
    if not isinstance(round_name, str):
        raise DTypeError(f"Expected `name` to be a string, but got {type(round_name).__name__}.")
    notes = dict(info or {})
    if not remove:
        new_round = RemovalRound(
            round_name,
            [],
            dict(chain.config),
            dict(chain._map(k)),
            chain.parameters,
            chain.rounds[-1].flops if chain.rounds else chain.source_flops,
            notes,
        )
        return student, dataclasses.replace(chain, rounds=[*chain.rounds, new_round])
    removed = set(chain.removed) | set(remove)
    _, _, plan = _plan_without(chain.source_config, removed, round_name)
    ref: torch.Tensor = next(student.parameters(), torch.empty(0))
    on_meta = ref.device.type == "meta"
    with torch.device("meta") if on_meta else torch.device(ref.device):
        new = UNet2DConditionModel.from_config(plan.config)
    if new.dtype != ref.dtype:
        new = new.to(dtype=ref.dtype)
    if init_weights and not on_meta:
        inverse, prefixes = _inverse(chain._map(k))
        to_previous = {s: _translate(t, inverse, prefixes) for s, t in plan.module_map.items()}
        init_from_teacher(new, student, to_previous)
    new.train()
    new_round = RemovalRound(
        name=round_name,
        removed=sorted(remove),
        config=_clean_config(plan.config),
        module_map=dict(plan.module_map),
        parameters=sum(p.numel() for p in new.parameters()),
        flops=unet_flops(plan.config) if count_flops else None,
        info=notes,
    )
    logger.info(
        "block removal %s: %d unit(s), %d -> %d parameters",
        round_name,
        len(remove),
        chain.parameters,
        new_round.parameters,
    )
    return new, dataclasses.replace(chain, rounds=[*chain.rounds, new_round])


def infer_chain(
    source_config: Mapping[str, Any],
    student_config: Mapping[str, Any],
    *,
    keep_transformer_layers: KeepRule = "spread",
    count_flops: bool = True,
) -> BlockRemovalChain:
    """The chain of a block-removed student saved without its record (e.g. the released ``segmind/SSD-1B``).

    The student's layout (levels, resnets, transformer depths, mid block) fixes which source blocks and how many
    transformer layers each attention kept; *which* layers an attention kept is not in a config, so it is
    assumed by ``keep_transformer_layers``. The result holds one round named ``"inferred"`` whose
    ``info`` says so; only the ``"layer"`` KD pairs and later transformer-layer names depend on the assumption.

    Args:
        source_config: The source's ``UNet2DConditionModel`` config (e.g. SDXL's).
        student_config: The student's config.
        keep_transformer_layers: Which source transformer layers a shortened attention is assumed to have kept
            (as :attr:`BlockRemovalSpec.keep_transformer_layers`). Default ``"spread"``.
        count_flops: Count both networks' FLOPs (:func:`unet_flops`). Default ``True``.

    Returns:
        The chain (round 0 the source, round 1 the student).

    Raises:
        DTypeError: a config is not a mapping; ``count_flops`` is not a bool.
        OptionError: the student is not a block removal of the source (other widths or block types, deeper
            attentions, more levels); an unknown keep rule.
        ImportError: diffusers is not installed.

    Example:
        >>> from diffdistill.students import student_config
        >>> cfg = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        ...        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "block_out_channels": [8, 16],
        ...        "norm_num_groups": 4, "cross_attention_dim": 8, "attention_head_dim": 4,
        ...        "transformer_layers_per_block": [1, 2]}
        >>> chain = infer_chain(cfg, student_config(cfg, "vega"), count_flops=False)
        >>> chain.removed == removed_units(cfg, "vega")
        True
    """
    for value, what in ((source_config, "source_config"), (student_config, "student_config")):
        if not isinstance(value, Mapping):
            raise DTypeError(
                f"Expected `{what}` to be a UNet config (a mapping), but got {type(value).__name__}."
            )
    check_bool(count_flops, "count_flops")
    src, stu = _layout(source_config), _layout(student_config)
    n, n_s = src.levels, stu.levels
    if n_s not in (n, n - 1):
        raise OptionError(
            f"Expected the student to have the source's {n} levels (or one fewer), but it has {n_s}: it is not a "
            "block removal of this source."
        )

    def level_depths(types: list[str], depths: list[list[int]], i: int) -> tuple[int, ...] | None:
        return tuple(depths[i]) if _has_attention(types[i]) else None

    mid: Literal["keep", "resnet", "none"] = "keep"
    if stu.mid_type is None and src.mid_type is not None:
        mid = "none"
    elif stu.mid_type == "UNetMidBlock2D" and src.mid_type != "UNetMidBlock2D":
        mid = "resnet"
    spec = BlockRemovalSpec(
        name="inferred",
        layers_per_block=tuple(stu.layers),
        down_transformer_layers=tuple(level_depths(stu.down_types, stu.down_depths, i) for i in range(n_s)),
        up_transformer_layers=tuple(
            level_depths(stu.up_types, stu.up_depths, n_s - 1 - level) for level in range(n_s)
        ),
        mid_block=mid,
        drop_innermost=n_s == n - 1,
        keep_transformer_layers=keep_transformer_layers,
    )
    try:
        plan = _plan(source_config, spec)
    except (OptionError, DTypeError) as err:
        raise OptionError(f"Expected the student to be a block removal of the source, but: {err}") from err
    if _architecture(plan.config) != _architecture(student_config):
        raise OptionError(
            "Expected the student to be a block removal of the source (same widths and block types, fewer "
            "resnets, transformer layers or mid-block parts), but no removal of the source gives its layout."
        )
    used = _used_by(plan.config, plan.module_map)
    count = lambda cfg: sum(p.numel() for p in _meta_unet(_clean_config(cfg)).parameters())  # noqa: E731
    rule = keep_transformer_layers if isinstance(keep_transformer_layers, str) else "callable"
    return BlockRemovalChain(
        source_config=_clean_config(source_config),
        source_parameters=count(source_config),
        source_flops=unet_flops(source_config) if count_flops else None,
        rounds=[
            RemovalRound(
                name="inferred",
                removed=_removed_units(_state_names(source_config), used),
                config=_clean_config(student_config),
                module_map=dict(plan.module_map),
                parameters=count(student_config),
                flops=unet_flops(student_config) if count_flops else None,
                info={"inferred": True, "keep_transformer_layers": rule},
            )
        ],
    )
