"""diffdistill.students: student construction and layer-level KD.

* :class:`EMA` -- exponential-moving-average targets.
* :class:`FeatureTap`, :class:`LayerKD`, :func:`layer_kd_loss` -- forward-hook feature KD (SSD-1B / BK-SDM), for
  UNets and transformers (:func:`transformer_block_names`, :func:`image_stream`, :data:`IMAGE_STREAM_OUTPUT`:
  the image stream of SD3 / FLUX joint and single-stream blocks; Wan's blocks return their image tokens).
* :class:`BlockRemovalSpec`, :data:`PRESETS`, :func:`student_config`, :func:`build_student` -- SSD-1B /
  Segmind-Vega / BK-SDM block removal with teacher-weight initialisation and a :class:`BlockRemovalReport`.
* :func:`start_chain`, :func:`remove_blocks`, :class:`BlockRemovalChain`, :class:`RemovalRound`,
  :func:`split_rounds`, :func:`removed_units`, :func:`infer_chain`, :func:`unet_flops`, :data:`ROUND_GROUPS` --
  progressive block removal in rounds (SSD-1B / Segmind-Vega), each from the previous round's student.
* :class:`TransformerBlockRemovalSpec`, :data:`TRANSFORMER_PRESETS`, :func:`transformer_student_config`,
  :func:`build_transformer_student`, :class:`TransformerBlockRemovalReport`, :func:`transformer_flops` -- block
  removal for SD3 / FLUX / Wan transformers (Flux.1-Lite-8B, Flux-Mini depths; ``"wan-half"``) with teacher init,
  KD pairs, parameter and FLOP counts.
* :func:`add_lora`, :func:`merge_lora`, :func:`save_lora`, :func:`load_lora`, :class:`TeacherView`,
  :func:`add_guidance_embedding` -- LoRA students (LCM-LoRA) and the LCM guidance embedding;
  :data:`LCM_LORA_TARGETS` (UNets), :data:`FLOW_LORA_TARGETS` (SD3 / FLUX transformers), :data:`WAN_LORA_TARGETS`
  (Wan), :data:`QWEN_IMAGE_LORA_TARGETS` (Qwen-Image).
* :class:`SharedBase`, :class:`AdapterView` -- one frozen base with named LoRA adapters as independent callables
  (real score / teacher, fake score, generator) without copying the base weights.
* :class:`X0Conversion` -- SDXL-Lightning's conversion to x0 prediction.
* :func:`frozen`, :func:`reshard` -- temporarily frozen networks and FSDP2 resharding around writes to
  sharded parameters (generator steps through a fake score or discriminator, swapped-in averages);
  :func:`shard_frozen` -- FSDP2 sharding of a network no optimiser owns (a frozen teacher copy), block by block.

diffusers, peft and safetensors are imported only inside the functions that need them.
"""

from __future__ import annotations

from .._modules import frozen, reshard, shard_frozen
from .block_removal import (
    PRESETS,
    BlockRemovalReport,
    BlockRemovalSpec,
    build_student,
    init_from_teacher,
    student_config,
)
from .ema import EMA
from .feature_taps import (
    IMAGE_STREAM_OUTPUT,
    FeatureTap,
    image_stream,
    in_backward_pass,
    resolve_module_names,
    transformer_block_names,
)
from .layer_kd import LayerKD, layer_kd_loss
from .lora import (
    FLOW_LORA_TARGETS,
    LCM_LORA_TARGETS,
    QWEN_IMAGE_LORA_TARGETS,
    WAN_LORA_TARGETS,
    TeacherView,
    adapters_disabled,
    add_guidance_embedding,
    add_lora,
    guidance_scale_embedding,
    load_lora,
    lora_state_dict,
    merge_lora,
    save_lora,
)
from .removal_rounds import (
    ROUND_GROUPS,
    BlockRemovalChain,
    RemovalRound,
    infer_chain,
    remove_blocks,
    removed_units,
    split_rounds,
    start_chain,
    unet_flops,
)
from .shared_base import AdapterView, SharedBase
from .transformer_block_removal import (
    TRANSFORMER_PRESETS,
    TransformerBlockRemovalReport,
    TransformerBlockRemovalSpec,
    build_transformer_student,
    transformer_flops,
    transformer_student_config,
)
from .x0_conversion import X0Conversion

__all__ = [
    "EMA",
    "FLOW_LORA_TARGETS",
    "IMAGE_STREAM_OUTPUT",
    "LCM_LORA_TARGETS",
    "PRESETS",
    "QWEN_IMAGE_LORA_TARGETS",
    "ROUND_GROUPS",
    "TRANSFORMER_PRESETS",
    "WAN_LORA_TARGETS",
    "AdapterView",
    "BlockRemovalChain",
    "BlockRemovalReport",
    "BlockRemovalSpec",
    "FeatureTap",
    "LayerKD",
    "RemovalRound",
    "SharedBase",
    "TeacherView",
    "TransformerBlockRemovalReport",
    "TransformerBlockRemovalSpec",
    "X0Conversion",
    "adapters_disabled",
    "add_guidance_embedding",
    "add_lora",
    "build_student",
    "build_transformer_student",
    "frozen",
    "guidance_scale_embedding",
    "image_stream",
    "in_backward_pass",
    "infer_chain",
    "init_from_teacher",
    "layer_kd_loss",
    "load_lora",
    "lora_state_dict",
    "merge_lora",
    "remove_blocks",
    "removed_units",
    "reshard",
    "resolve_module_names",
    "save_lora",
    "shard_frozen",
    "split_rounds",
    "start_chain",
    "student_config",
    "transformer_block_names",
    "transformer_flops",
    "transformer_student_config",
    "unet_flops",
]
