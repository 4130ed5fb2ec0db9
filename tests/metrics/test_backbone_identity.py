"""Backbones are recorded by what their weights are, not by the path or class that named them (audit 12, item 3):
local checkpoints by content (:func:`files_sha256`), modules by their ``state_dict`` (:func:`module_sha256`), Hub ids
by the commit the local cache resolved (:func:`hub_commit`, tested on a cache laid out here: no network)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from diffdistill.errors import DTypeError
from diffdistill.metrics import FID, CLIPScore, HPSv21Score
from diffdistill.metrics.protocol import files_sha256, hub_commit, module_sha256, weights_identity
from tests.metrics import tiny_clip

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_files_and_modules_hash_their_content_not_their_name(tmp_path: Path) -> None:
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights 1")
    (folder / "config.json").write_text("{}")
    first = files_sha256(folder)
    shutil.copytree(folder, tmp_path / "copy")
    assert files_sha256(tmp_path / "copy") == first  # the same files elsewhere: the same backbone
    (folder / "model.safetensors").write_bytes(b"weights 2")
    assert files_sha256(folder) != first  # other weights at the same path: another backbone
    with pytest.raises(FileNotFoundError, match=r"No file or folder at"):
        files_sha256(tmp_path / "missing")
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert module_sha256(a) != module_sha256(b)
    b.load_state_dict(a.state_dict())
    b.__dict__.pop("_diffdistill_sha256")
    assert module_sha256(a) == module_sha256(b)
    with pytest.raises(DTypeError, match=r"Expected `module` to be an nn.Module, but got str"):
        module_sha256("net")
    # FID's custom extractors: by their weights
    fid = FID(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4)))
    assert fid.protocol()["feature_extractor_sha256"] == module_sha256(fid.feature_extractor)


def test_local_clip_and_hps_checkpoints_are_recorded_by_their_sha256(tmp_path: Path) -> None:
    import open_clip

    # a transformers folder re-saved with other weights at the same path: another record
    folder = tmp_path / "clip"
    records = []
    for seed in (0, 1):
        model, processor = tiny_clip.transformers_clip(seed)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        metric = CLIPScore.from_transformers(str(folder))
        records.append(metric.protocol())
        assert metric.protocol()["weights"] == {"weights_sha256": files_sha256(folder)}
    assert records[0]["backbone"] == records[1]["backbone"] and records[0]["weights"] != records[1]["weights"]
    # a model object: its state_dict
    model, processor = tiny_clip.transformers_clip(0)
    assert CLIPScore.from_transformers(model, processor).protocol()["weights"] == {
        "state_dict_sha256": module_sha256(model)
    }
    # open_clip with a local checkpoint (a registry tag is its own name), HPSv2.1's checkpoint
    name = tiny_clip.register_open_clip()
    torch.manual_seed(3)
    source, _, _ = open_clip.create_model_and_transforms(name, pretrained=None)
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": source.state_dict()}, checkpoint)
    assert CLIPScore.from_open_clip(name, str(checkpoint)).protocol()["weights"] == {
        "weights_sha256": files_sha256(checkpoint)
    }
    assert "weights" not in CLIPScore.from_open_clip(name, None).protocol()
    hps = HPSv21Score.from_pretrained(checkpoint, model_name=name).protocol()
    assert hps["weights"] == {"weights_sha256": files_sha256(checkpoint)}


def test_hub_ids_are_recorded_by_the_commit_the_cache_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    repo = tmp_path / "models--org--clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "snapshots" / COMMIT / "config.json").write_text("{}")
    assert hub_commit("org/clip", cache_dir=str(tmp_path)) == COMMIT
    assert hub_commit("org/clip", "v2", cache_dir=str(tmp_path)) is None  # a revision not in the cache
    assert hub_commit("org/clip", filename="model_index.json", cache_dir=str(tmp_path)) is None
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert weights_identity("org/clip") == {"commit": COMMIT}
    assert weights_identity("org/other") == {}  # not cached: the id is all there is
    assert weights_identity("laion2b_s12b_b42k") == {} and weights_identity(None) == {}
