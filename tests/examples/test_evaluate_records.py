"""What ``examples/evaluate.py`` records and refuses about how its numbers were made (audit 12): reference
statistics checked against the run, non-finite images refused, a teacher at its pipeline's own steps, a COCO
protocol's name only when the run follows it, factories and package versions in the record, ``--images`` folders'
seed and quantisation recorded as declared. Stand-in metrics (``tiny_metrics.py``) on 24 px random images: each
test takes about a second.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.examples import tiny_metrics
from tests.examples.example_modules import load_example, load_script

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("scipy")

evaluate = load_script("evaluate")
generation = load_example("evaluation.generation")
metric_specs = load_example("evaluation.metric_specs")
coco_prompts = load_example("evaluation.coco_prompts")

FEATURES = "tests.examples.tiny_metrics:tiny_features"


def _write_images(folder: Path, n: int, size: int = 24, seed: int = 0) -> None:
    generation.generate_images(
        lambda prompts, gens: torch.stack([torch.rand(3, size, size, generator=g) for g in gens]),
        [f"prompt {i}" for i in range(n)],
        range(n),
        folder,
        seed=seed,
        batch_size=8,
    )


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """12 generated 24 px images, 12 reference 48 px images, a prompt file."""
    (tmp_path / "p.txt").write_text("\n".join(f"prompt {i}" for i in range(12)))
    _write_images(tmp_path / "gen", 12)
    _write_images(tmp_path / "ref", 12, size=48, seed=100)
    return {"gen": tmp_path / "gen", "ref": tmp_path / "ref", "prompts": tmp_path / "p.txt", "root": tmp_path}


def _scored(folders: dict[str, Path], out: str, *extra: str) -> list[str]:
    return [
        "--images", str(folders["gen"]), "--prompts_file", str(folders["prompts"]), "--quantization", "round",
        "--output_dir", str(folders["root"] / out), *extra,
    ]  # fmt: skip


def _fake_pipeline_folder(path: Path) -> Path:
    """A pipeline folder with only model_index.json: parse_args accepts it, and loading it would fail."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return path


def test_reference_statistics_that_do_not_fit_the_run_are_refused_before_generating(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffdistill.metrics import FID, FeatureStatistics

    stats = folders["root"] / "ref.npz"
    folder_run = [
        "--reference_dir",
        str(folders["ref"]),
        "--eval_resolution",
        "32",
        "--fid_features",
        FEATURES,
    ]
    saved = evaluate.main(
        evaluate.parse_args(_scored(folders, "a", *folder_run, "--save_reference_stats", str(stats)))
    )
    sidecar = json.loads(Path(f"{stats}.json").read_text())
    assert sidecar["stats_sha256"] == FeatureStatistics.load(stats).sha256()
    assert sidecar["feature_extractor"]["feature_extractor_factory"] == FEATURES
    # the same statistics, resolution and extractor: accepted, and the record is the folder run's
    same = evaluate.main(
        evaluate.parse_args(
            _scored(
                folders,
                "b",
                "--reference_stats",
                str(stats),
                "--eval_resolution",
                "32",
                "--fid_features",
                FEATURES,
            )
        )
    )
    assert same["protocol"] == saved["protocol"] and same["metrics"]["fid"] == pytest.approx(
        saved["metrics"]["fid"]
    )

    # refused before generating: a generating run whose pipeline must never load
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the pipeline was loaded before the reference statistics were checked")

    monkeypatch.setattr(evaluate.generation, "load_pipeline", never)
    pipeline = _fake_pipeline_folder(folders["root"] / "pipe")
    generating = [
        "--pretrained_model_name_or_path", str(pipeline), "--prompts_file", str(folders["prompts"]),
        "--resolution", "64", "--output_dir", str(folders["root"] / "c"), "--reference_stats", str(stats),
        "--fid_features", FEATURES,
    ]  # fmt: skip
    with pytest.raises(
        ValueError, match=r"--eval_resolution 16\), but ref.npz.json records eval_resolution 32"
    ):
        evaluate.main(evaluate.parse_args([*generating, "--eval_resolution", "16"]))
    assert not (folders["root"] / "c" / "images").exists()
    # another extractor of the same class (other weights): its hash differs
    other = {"fid": FID(tiny_metrics.TinyFeatures(seed=1), reference=stats)}
    with pytest.raises(ValueError, match=r"this run's FID feature extractor .* but ref.npz.json records"):
        evaluate.main(evaluate.parse_args([*generating, "--eval_resolution", "32"]), metrics=other)
    # statistics of another dimension: refused whatever the sidecar says
    FeatureStatistics(4).update(torch.randn(10, 4, dtype=torch.float64)).save(folders["root"] / "four.npz")
    with pytest.raises(ValueError, match=r"to hold 8-dimensional statistics .* but they have 4 features"):
        evaluate.main(
            evaluate.parse_args([*generating, "--reference_stats", str(folders["root"] / "four.npz")])
        )
    # the .npz replaced after its sidecar was written (a re-made reference): the sidecar is stale
    FeatureStatistics(8).update(torch.randn(20, 8, dtype=torch.float64)).save(stats)
    with pytest.raises(ValueError, match=r"the .npz was replaced after its sidecar was written"):
        evaluate.main(evaluate.parse_args([*generating, "--eval_resolution", "32"]))
    assert not (folders["root"] / "c" / "images").exists()


def test_non_finite_images_are_refused_before_they_are_written(tmp_path: Path) -> None:
    def sampler(prompts: list[str], gens: list[torch.Generator]) -> torch.Tensor:
        out = torch.stack([torch.rand(3, 8, 8, generator=g) for g in gens])
        if len(out) == 4 and gens[0].initial_seed() == 4:  # the second batch: image 5 NaN, image 7 +inf
            out[1, 0, 2, 3] = float("nan")
            out[3] = float("inf")
        return out

    prompts = [f"p{i}" for i in range(8)]
    with pytest.raises(ValueError, match=r"for 2 of 4 images \(indices \[5, 7\]\).* float16 VAE .* diverged"):
        generation.generate_images(sampler, prompts, range(8), tmp_path, seed=0, batch_size=4)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
    with pytest.raises(ValueError, match=r"NaN / infinite values for 1 of 2 images \(indices \[1\]\)"):
        generation.to_uint8(torch.stack([torch.zeros(3, 2, 2), torch.full((3, 2, 2), float("nan"))]))


def test_a_teacher_without_steps_samples_at_its_pipelines_default(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    (tmp_path / "p.txt").write_text("a cat\n")
    pipeline = _fake_pipeline_folder(tmp_path / "pipe")
    argv = ["--pretrained_model_name_or_path", str(pipeline), "--prompts_file", str(tmp_path / "p.txt"),
            "--output_dir", str(tmp_path / "t"), "--teacher"]  # fmt: skip
    args = evaluate.parse_args(argv)
    assert args.num_inference_steps is None and "num_inference_steps" not in generation.call_kwargs(args)
    pipe = object.__new__(StableDiffusionXLPipeline)  # only its call's signature is read
    generation.fill_teacher_steps(pipe, args)
    assert args.num_inference_steps == 50 and generation.call_kwargs(args)["num_inference_steps"] == 50
    assert args.saved_sampler["sources"]["steps"] == "pipeline default 50"
    # given steps are kept; a student keeps DEFAULT_STEPS
    given = evaluate.parse_args([*argv, "--num_inference_steps", "8"])
    generation.fill_teacher_steps(pipe, given)
    assert given.num_inference_steps == 8
    student = evaluate.parse_args([a for a in argv if a != "--teacher"])
    assert student.num_inference_steps == generation.DEFAULT_STEPS

    class NoDefault:
        def __call__(self, prompt: str, num_inference_steps: int) -> None: ...

    with pytest.raises(ValueError, match=r"Expected --num_inference_steps with --teacher: NoDefault's call"):
        generation.fill_teacher_steps(NoDefault(), evaluate.parse_args(argv))


def test_a_coco_protocol_is_named_only_when_the_run_follows_it(tmp_path: Path) -> None:
    ann = {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(20)],
        "annotations": [
            {"id": 100 + i, "image_id": i, "caption": f"a photo of thing {i}"} for i in range(20)
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    prompts_file = coco_prompts.build_prompt_file(
        "dmd2-coco10k", tmp_path / "coco", annotations=tmp_path / "ann.json", count=8
    )
    prompts = prompts_file.read_text().splitlines()
    clip = {"clip_score": object()}
    follows = dict(prompts_file=str(prompts_file), prompt_set=None, seed=0, eval_resolution=512,
                   clip_eval_resolution=256, clip_prefix="A photo depicts ")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metric_specs.prompt_set(argparse.Namespace(**follows), prompts, clip) == ("dmd2-coco10k", [])
    # DMD2's prompts without its resize and prefix: named as modified, with the deviations
    off = argparse.Namespace(
        **follows | {"eval_resolution": None, "clip_eval_resolution": None, "clip_prefix": ""}
    )
    with pytest.warns(
        UserWarning, match=r"does not follow that protocol: eval_resolution None \(protocol: 512\)"
    ):
        name, deviations = metric_specs.prompt_set(off, prompts, clip)
    assert name == "dmd2-coco10k (modified)"
    assert deviations == [
        "eval_resolution None (protocol: 512)",
        "clip_eval_resolution None (protocol: 256)",
        "clip_prefix '' (protocol: 'A photo depicts ')",
    ]
    # the CLIP settings count only with a CLIP score; the first 4 prompts are not the protocol's set
    with pytest.warns(UserWarning, match=r"4 prompts of the protocol's 8"):
        assert metric_specs.prompt_set(off, prompts[:4], {})[1] == [
            "4 prompts of the protocol's 8",
            "eval_resolution None (protocol: 512)",
        ]
    # another file in the folder (a hand-made subset) does not inherit the name
    subset = prompts_file.with_name("first4.txt")
    subset.write_text("\n".join(prompts[:4]))
    args = argparse.Namespace(**follows | {"prompts_file": str(subset)})
    with pytest.warns(UserWarning, match=r"prompts file first4.txt is not the one selection.json describes"):
        record = metric_specs.evaluation_protocol(
            args, prompts[:4], clip | {"clip_score": tiny_metrics.tiny_clip_score()}, generator=None,
            image_size=(512, 512),
        )  # fmt: skip
    assert record["prompt_set"] == "dmd2-coco10k (modified)"
    assert record["extra"]["protocol_deviations"][0].startswith("prompts file first4.txt")
    records = evaluate.records
    records.write_results(
        tmp_path / "run" / "results.json", {"metrics": {"clip_score": 0.3}, "protocol": record}
    )
    table = records.comparison_table([tmp_path / "run"])
    assert "prompt set dmd2-coco10k (modified)" in table
    assert "Deviations from the prompt file's protocol: prompts file first4.txt" in table
    # --prompt_set names the set as given
    named = argparse.Namespace(**follows | {"prompt_set": "mine", "seed": 3})
    assert metric_specs.prompt_set(named, prompts, clip) == ("mine", [])


def test_factories_backbone_hashes_versions_and_declared_images_are_recorded(
    folders: dict[str, Path],
) -> None:
    clip = "tests.examples.tiny_metrics:tiny_clip_score"
    argv = _scored(
        folders, "a", "--reference_dir", str(folders["ref"]), "--fid_features", FEATURES, "--clip", clip
    )
    record = evaluate.main(evaluate.parse_args(argv))
    backbones = record["protocol"]["backbones"]
    assert backbones["fid"]["feature_extractor_factory"] == FEATURES
    # the extractor's weights: those of the factory's network, not of another of the same class
    own, other = (_fid_with(tiny_metrics.TinyFeatures(seed=s)).protocol() for s in (0, 1))
    assert backbones["fid"]["feature_extractor_sha256"] == own["feature_extractor_sha256"]
    assert own["feature_extractor_sha256"] != other["feature_extractor_sha256"]
    assert backbones["clip_score"]["factory"] == "tests.examples.tiny_metrics:tiny_clip_score"
    assert len(backbones["clip_score"]["weights"]["state_dict_sha256"]) == 64
    assert {"scipy", "numpy", "torchvision"} <= set(record["protocol"]["versions"])
    # --images without generation.json: seed and quantisation declared (here given), not read
    assert record["protocol"]["generator"] == {
        "images": "made elsewhere (no generation.json)",
        "declared": {"seed": 0, "quantization": "round", "quantization_source": "--quantization"},
    }
    assert "| a | images | - |" in evaluate.records.comparison_table([folders["root"] / "a"])

    # a factory's metric object with a model of its own and no weights record: the model's state_dict
    class Scorer:
        model = torch.nn.Linear(2, 1)

        def protocol(self) -> dict[str, Any]:
            return {"metric": "mine"}

    scorer = Scorer()
    setattr(scorer, metric_specs.FACTORY_ATTRIBUTE, "my.module:scorer")
    from diffdistill.metrics.protocol import module_sha256

    assert metric_specs.metric_protocols({"mine": scorer})["mine"] == {
        "metric": "mine", "factory": "my.module:scorer", "state_dict_sha256": module_sha256(Scorer.model),
    }  # fmt: skip


def _fid_with(extractor: Any) -> Any:
    from diffdistill.metrics import FID

    return FID(extractor)


def test_generation_json_records_the_versions_and_a_resume_with_others_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffdistill.metrics import protocol

    folder, prompts, gen = tmp_path / "images", ["a", "b"], {"model": "m"}
    generation.check_resume(folder, prompts, 0, gen, write=True)
    generation.generate_images(
        lambda p, g: torch.rand(len(p), 3, 8, 8), prompts[:1], [0], folder, seed=0, batch_size=1
    )
    first = generation.read_manifest(folder)
    assert (
        first["versions"] == protocol.package_versions(metric_specs.PACKAGES)
        and not first["resumed_versions"]
    )
    now = dict(first["versions"], torch="99.0")
    monkeypatch.setattr(protocol, "package_versions", lambda names: dict(now))
    with pytest.warns(UserWarning, match=r"other package versions \(torch: .*'99.0'.* resumed_versions"):
        generation.check_resume(folder, prompts, 0, gen, write=True)
    manifest = generation.read_manifest(folder)
    assert manifest["versions"] == first["versions"] and manifest["resumed_versions"] == [now]
    entry = generation.with_generation_versions(gen, folder)
    assert entry["generation_versions"] == first["versions"] and entry["resumed_versions"] == [now]
    # a complete folder rescored under yet other versions: nothing is added, nothing mixes
    generation.generate_images(
        lambda p, g: torch.rand(len(p), 3, 8, 8), prompts, [1], folder, seed=0, batch_size=1
    )
    now["torch"] = "100.0"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generation.check_resume(folder, prompts, 0, gen, write=True)
    assert generation.read_manifest(folder)["resumed_versions"] == [dict(now, torch="99.0")]


def test_a_hub_pipeline_is_recorded_by_its_resolved_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    snapshot = tmp_path / "models--org--pipe" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (tmp_path / "models--org--pipe" / "refs").mkdir()
    (tmp_path / "models--org--pipe" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    hub = argparse.Namespace(pretrained_model_name_or_path="org/pipe", revision=None)
    assert generation.model_commit(hub) == {"model_commit": commit}
    local = argparse.Namespace(pretrained_model_name_or_path=str(snapshot), revision=None)
    assert (
        generation.model_commit(local) == {}
    )  # a folder: named by its path (the student weights are hashed)


def test_runs_with_different_metric_sets_compare_on_the_metrics_they_share(tmp_path: Path) -> None:
    """``--compare`` of a run without ``--precision_recall`` and one with it: one table, "-" where a run has no
    number. Two runs that both measured a metric must have measured it alike (another k is refused, naming the
    field), whichever run lacks it -- every pair is checked, not only each against the first."""
    from diffdistill.errors import ProtocolMismatchError
    from diffdistill.metrics import EvaluationProtocol

    fid = {"metric": "fid", "feature_extractor": "X"}

    def run(name: str, metrics: dict[str, float], backbones: dict[str, Any]) -> Path:
        protocol = EvaluationProtocol.for_prompts(
            "p", ["a cat", "a dog"], seeds=0, resolution=64, backbones=backbones, versions={"torch": "x"}
        )
        path = tmp_path / name / "results.json"
        evaluate.records.write_results(
            path, {"metrics": metrics, "protocol": protocol.to_dict(), "label": name}
        )
        return path.parent

    pr = {"precision": 0.5, "recall": 0.25, "density": 0.75, "coverage": 0.5}
    plain = run("plain", {"fid": 3.0}, {"fid": fid})
    k3 = run(
        "k3",
        {"fid": 2.0, **pr},
        {"fid": fid, "precision_recall": {"metric": "precision_recall", "nearest_k": 3}},
    )
    k5 = run(
        "k5",
        {"fid": 2.0, **pr},
        {"fid": fid, "precision_recall": {"metric": "precision_recall", "nearest_k": 5}},
    )
    table = evaluate.records.comparison_table([plain, k3])
    assert "| run | sampler | guidance | fid | precision | recall | density | coverage |" in table
    assert "| plain | images | - | 3.00 | - | - | - | - |" in table
    assert "| k3 | images | - | 2.00 | 0.5000 | 0.2500 | 0.7500 | 0.5000 |" in table
    with pytest.raises(
        ProtocolMismatchError,
        match=r"(?s)Cannot compare .*k3 and .*k5.*backbones.precision_recall.nearest_k: 3 != 5",
    ):
        evaluate.records.comparison_table([plain, k3, k5])
    other_fid = run("other", {"fid": 1.0}, {"fid": {**fid, "feature_extractor": "Y"}})
    with pytest.raises(ProtocolMismatchError, match=r"backbones.fid.feature_extractor"):
        evaluate.records.comparison_table([k3, other_fid])  # a shared metric still has to agree
