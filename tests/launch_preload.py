"""What the fork server of :mod:`tests.preloaded_launch` imports once, before it forks any process.

A launched test process (an example script on 2 CPU processes, a worker function) spends 5-8 s of CPU importing
torch, diffusers, transformers, peft, accelerate and DeepSpeed before it does any work, each process of each launch.
Forked from a server that has imported them, it starts with them in ``sys.modules``. Only importing is done here:
no tensor work (a forked process must not inherit an OpenMP thread pool), no process group, no threads.

The list names what the example scripts, ``examples/training`` and the workers import; a name that this
environment's packages do not have is skipped (the process then imports what it needs itself, as a fresh one does).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

MODULES = (
    "torch",
    "torch.distributed",
    "torch.distributed.fsdp",
    "torch.nn.parallel",
    "torch.utils.checkpoint",
    "torch._dynamo",
    "accelerate",
    "accelerate.state",
    "accelerate.utils",
    "transformers",
    "peft",
    "deepspeed",
    "diffusers",
    "safetensors.torch",
    "PIL.Image",
    "numpy",
    "diffdistill",
    "diffdistill.losses",
    "diffdistill.schedulers",
    "diffdistill.students",
    "diffdistill.discriminators",
    "diffdistill.metrics",
    "tests.examples.sharded_cpu_launch",
    "training",  # examples/training: the scripts' shared package (they put examples/ first on sys.path)
)

# Lazily imported attributes: ``from diffusers import X`` imports X's module on first access.
ATTRIBUTES = {
    "diffusers": (
        "DiffusionPipeline",
        "StableDiffusionXLPipeline",
        "StableDiffusion3Pipeline",
        "FluxPipeline",
        "QwenImagePipeline",
        "WanPipeline",
        "UNet2DConditionModel",
        "AutoencoderKL",
        "AutoencoderKLWan",
        "AutoencoderKLQwenImage",
        "SD3Transformer2DModel",
        "FluxTransformer2DModel",
        "QwenImageTransformer2DModel",
        "WanTransformer3DModel",
        "EulerDiscreteScheduler",
        "DDPMScheduler",
        "LCMScheduler",
        "FlowMatchEulerDiscreteScheduler",
    ),
    "transformers": (
        "CLIPTextModel",
        "CLIPTextModelWithProjection",
        "CLIPTokenizer",
        "T5EncoderModel",
        "T5TokenizerFast",
        "UMT5EncoderModel",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2Tokenizer",
    ),
}


def preload() -> list[str]:
    """Import :data:`MODULES` and :data:`ATTRIBUTES`; return what could not be imported."""
    if str(EXAMPLES) not in sys.path:
        sys.path.append(str(EXAMPLES))
    missing = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    for package, names in ATTRIBUTES.items():
        if package in sys.modules:
            for attribute in names:
                try:
                    getattr(sys.modules[package], attribute)
                except (AttributeError, ImportError):
                    missing.append(f"{package}.{attribute}")
    return missing


MISSING = preload()
