"""The flow example scripts and ``training`` modules the flow-script tests use, and the fixture they share.

Importing this module skips the importing test module without the training extras (diffusers, peft, accelerate),
sets cuBLAS's deterministic workspace and loads each module once (:func:`tests.examples.example_modules.load_example`).
A test module takes the fixture by importing it with the modules it uses::

    from tests.examples.flow_scripts import deterministic_runs, flow_dmd2  # noqa: F401 (autouse fixture)
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from tests.examples.example_modules import load_example
from tests.examples.tiny_sdxl import deterministic_kernels

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

flow_dmd2 = load_example("flow_dmd2")
flow_ladd = load_example("flow_ladd")
flow_tscd = load_example("flow_tscd")
flow_kd = load_example("flow_kd")
flow_models = load_example("training.flow_models")
flow_families = load_example("training.flow_families")
flow_encoding = load_example("training.flow_encoding")
flow_options = load_example("training.flow_options")
flow_critics = load_example("training.flow_critics")
wan_experts = load_example("training.wan_experts")
data_sources = load_example("training.data_sources")
caption_folders = load_example("training.caption_folders")
sdxl_encoding = load_example("training.sdxl_encoding")
loop = load_example("training.loop")
generation = load_example("evaluation.generation")


@pytest.fixture(autouse=True)
def deterministic_runs() -> Iterator[None]:
    """Each test of a module that imports this fixture runs under :func:`tests.examples.tiny_sdxl.deterministic_kernels`
    (deterministic CUDA kernels; nothing changes on the CPU)."""
    with deterministic_kernels():
        yield
