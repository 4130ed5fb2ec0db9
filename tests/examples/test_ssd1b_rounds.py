"""examples/sdxl_ssd1b_kd.py in rounds (issue 19 part 3): a student continued from the previous round's, a
teacher other than the source, the block-removal record per round, and exact resume within a round.

CPU smoke runs of 1-2 steps on the tiny 3-level SDXL pipeline (SDXL's layout: what the ``ssd-1b`` preset
needs). Round 1 removes the mid block's attention and second resnet from the source; round 2 starts from round
1's saved student, removes the down path's transformer layers and learns from a second teacher (the source UNet
with perturbed weights, as a fine-tuned SDXL would be).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from tests.examples.example_modules import load_example
from tests.examples.tiny_sdxl import TINY_SDXL_3LEVEL_UNET, deterministic_kernels, save_tiny_sdxl_pipeline
from tests.state_compare import assert_same_update

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
MID = ["mid_block.attentions.0", "mid_block.resnets.1"]
# ssd-1b on the tiny UNet's level 2 (4 transformer layers per attention): 0.4 x 4 -> 2 kept, "spread": 0 and 3
DOWN = [f"down_blocks.2.attentions.{a}.transformer_blocks.{b}" for a in (0, 1) for b in (1, 2)]


@pytest.fixture(autouse=True)
def _deterministic_kernels() -> Any:
    """Deterministic kernels on a GPU (resume is compared against the size of one step); a no-op on CPU."""
    with deterministic_kernels():
        yield


def _script() -> ModuleType:
    return load_example("sdxl_ssd1b_kd")


def _unet(path: Path) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(path))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny 3-level pipeline, 3 captioned images, and a second teacher (perturbed copy of its UNet)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("ssd1b_rounds")
    model = save_tiny_sdxl_pipeline(root / "model", seed=0, unet_overrides=TINY_SDXL_3LEVEL_UNET)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red cube", "a blue sphere", "a green cone"]):
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(caption)
    teacher2 = _unet(model / "unet")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in teacher2.parameters():
            p.add_(0.05 * p.std().nan_to_num() * torch.randn(p.shape, generator=g))
    teacher2.save_pretrained(str(root / "teacher2"))
    return {"model": model, "images": images, "teacher2": root / "teacher2"}


def _argv(tiny: dict[str, Path], out: Path, *extra: str, steps: int = 2) -> list[str]:
    return [
        *("--pretrained_model_name_or_path", str(tiny["model"]), "--train_data_dir", str(tiny["images"])),
        *("--output_dir", str(out), "--resolution", "128", "--train_batch_size", "2"),
        *("--max_train_steps", str(steps), "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"),
        *("--learning_rate", "1e-4", "--report_to", "none", "--seed", "3"),
        *extra,
    ]


def _record(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "unet" / "block_removal.json").read_text())


@pytest.fixture(scope="module")
def round1(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Round 1 (one step): the mid block, from the source, with the source as teacher."""
    out = tmp_path_factory.mktemp("round1")
    script = _script()
    script.main(script.parse_args(_argv(tiny, out, "--preset", "ssd-1b", "--round", "1", steps=1)))
    return out


def test_round1_removes_the_mid_block_and_records_it(tiny: dict[str, Path], round1: Path) -> None:
    s1 = _unet(round1 / "unet")
    source = _unet(tiny["model"] / "unet")
    assert s1.config.mid_block_type == "UNetMidBlock2D"
    assert list(s1.config.transformer_layers_per_block) == [1, 2, 4]  # round 1 leaves the down path alone
    record = _record(round1)
    (r,) = record["rounds"]
    assert r["name"] == "round 1: ssd-1b round 1" and r["removed"] == MID
    assert r["info"]["teacher"] == str(tiny["model"].resolve())
    n = sum(p.numel() for p in s1.parameters())
    removed = sum(p.numel() for u in MID for p in source.get_submodule(u).parameters())
    assert r["parameters"] == n == record["source_parameters"] - removed
    assert r["flops"] < record["source_flops"]
    assert record["summary"][2].startswith("1 round 1: ssd-1b round 1 | 2 | ")
    assert (round1 / "block_removal.json").is_file()  # also written before training, beside the checkpoints


def test_round2_continues_round1_with_another_teacher_and_resumes_exactly(
    tiny: dict[str, Path], round1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _script()
    starts: list[dict[str, torch.Tensor]] = []
    teachers: list[tuple[torch.nn.Module, dict[str, str]]] = []
    remove_blocks, layer_kd = script.remove_blocks, script.LayerKD

    def spy_remove(*a: Any, **kw: Any) -> Any:
        student, chain = remove_blocks(*a, **kw)
        starts.append({k: v.detach().clone() for k, v in student.state_dict().items()})
        return student, chain

    def spy_kd(student: Any, teacher: Any, pairs: dict[str, str], **kw: Any) -> Any:
        teachers.append((teacher, dict(pairs)))
        return layer_kd(student, teacher, pairs, **kw)

    monkeypatch.setattr(script, "remove_blocks", spy_remove)
    monkeypatch.setattr(script, "LayerKD", spy_kd)
    round2 = [
        *("--student_model", str(round1), "--teacher_model", str(tiny["teacher2"])),
        *("--preset", "ssd-1b", "--round", "2", "--kd_level", "layer"),
    ]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    script.main(script.parse_args(_argv(tiny, out_a, *round2)))

    # The round-2 student starts from round 1's trained student, not from the source.
    s1, source = _unet(round1 / "unet").state_dict(), _unet(tiny["model"] / "unet").state_dict()
    start = starts[0]
    assert torch.equal(start["conv_in.weight"], s1["conv_in.weight"])
    assert not torch.equal(start["conv_in.weight"], source["conv_in.weight"])  # round 1 trained it
    kept = "down_blocks.2.attentions.0.transformer_blocks.{}.attn1.to_q.weight"
    assert torch.equal(start[kept.format(1)], s1[kept.format(3)])  # kept layers 0 and 3 of 4
    assert torch.equal(start["mid_block.resnets.0.conv1.weight"], s1["mid_block.resnets.0.conv1.weight"])

    # The teacher is --teacher_model's UNet, and the feature pairs name its modules (the source's layout).
    teacher, pairs = teachers[0]
    want = _unet(tiny["teacher2"]).state_dict()
    assert all(torch.equal(v.float().cpu(), want[k]) for k, v in teacher.state_dict().items())
    assert pairs["mid_block"] == "mid_block.resnets.0"
    assert (
        pairs["down_blocks.2.attentions.0.transformer_blocks.3"]
        == "down_blocks.2.attentions.0.transformer_blocks.1"
    )
    assert "down_blocks.2.attentions.0.transformer_blocks.2" not in pairs  # removed in round 2
    s2 = _unet(out_a / "unet")
    for t_name, s_name in pairs.items():
        teacher.get_submodule(t_name), s2.get_submodule(s_name)

    # The record covers both rounds: what each removed, parameters per round, the teachers.
    record = _record(out_a)
    r1, r2 = record["rounds"]
    assert r1 == _record(round1)["rounds"][0]
    assert r2["removed"] == DOWN and r2["name"] == "round 2: ssd-1b round 2"
    assert r2["info"]["teacher"] == str(tiny["teacher2"].resolve()) and r2["info"]["kd_level"] == "layer"
    removed = sum(p.numel() for k, p in source.items() if any(k.startswith(u + ".") for u in DOWN))
    assert r2["parameters"] == sum(p.numel() for p in s2.parameters()) == r1["parameters"] - removed
    assert list(s2.config.transformer_layers_per_block) == [1, 2, 2]
    assert [line.split(" | ")[1] for line in record["summary"][1:]] == ["0", "2", "4"]

    # Resume within round 2: the same second step as the uninterrupted run (against that step's size).
    from safetensors.torch import load_file

    script.main(
        script.parse_args(
            [*_argv(tiny, out_b, *round2), "--resume_from_checkpoint", str(out_a / "checkpoint-1")]
        )
    )
    at_step1 = load_file(str(out_a / "checkpoint-1" / "model.safetensors"))
    b = _unet(out_b / "unet").state_dict()
    assert_same_update(b, s2.state_dict(), at_step1, what="resumed vs uninterrupted round 2")
    assert _record(out_b)["rounds"] == record["rounds"]


def test_round_options_are_checked_with_the_reason(
    tiny: dict[str, Path], round1: Path, tmp_path: Path
) -> None:
    script = _script()
    with pytest.raises(ValueError, match=r"Expected --round in 1\.\.3"):
        script.parse_args(_argv(tiny, tmp_path, "--round", "4"))
    with pytest.raises(ValueError, match=r"Pass --round .* or --remove .*, not both"):
        script.parse_args(_argv(tiny, tmp_path, "--round", "1", "--remove", "mid_block"))
    again = _argv(tiny, tmp_path / "again", "--student_model", str(round1), "--remove", "mid_block.resnets.1")
    with pytest.raises(
        ValueError, match=r"'mid_block.resnets.1' is already gone: round 1 \('round 1: ssd-1b"
    ):
        script.main(script.parse_args(again))
    # a teacher of another layout (the 2-level tiny UNet) has no modules to pair with the student's
    other = tmp_path / "other"
    save_tiny_sdxl_pipeline(other, seed=1)
    wrong = _argv(tiny, tmp_path / "wrong", "--student_model", str(round1), "--teacher_model", str(other))
    with pytest.raises(ValueError, match=r"architecture of the chain's source or of one of its 2 round"):
        script.main(script.parse_args(wrong))


def test_a_student_without_its_record_gets_an_inferred_history(
    tiny: dict[str, Path], round1: Path, tmp_path: Path
) -> None:
    script = _script()
    bare = tmp_path / "bare"
    shutil.copytree(round1 / "unet", bare)
    (bare / "block_removal.json").unlink()
    source = _unet(tiny["model"] / "unet")
    chain = script.read_chain(str(bare), source.config, _unet(bare).config)
    assert chain.removed == MID and chain.rounds[0].info["inferred"] is True
    assert (
        script.read_chain(str(round1), source.config, _unet(bare).config).rounds[0].name.startswith("round 1")
    )
