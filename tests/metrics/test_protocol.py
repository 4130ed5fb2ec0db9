"""The protocol record: exact prompt hash, JSON round trip, refusal to compare differing runs."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from diffdistill.errors import DTypeError, OptionError, ProtocolMismatchError
from diffdistill.metrics import EvaluationProtocol, check_comparable, hash_prompts, package_versions

PROMPTS = ["A man riding a wave on top of a surfboard.", "Un café très chaud ☕", "two dogs"]


def test_hash_is_sha256_of_the_lines_joined_with_line_feeds(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes("\n".join(PROMPTS).encode("utf-8"))
    assert hash_prompts(PROMPTS) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert hash_prompts(PROMPTS) != hash_prompts(PROMPTS[::-1])  # order matters
    assert hash_prompts([]) == hashlib.sha256(b"").hexdigest()
    with pytest.raises(OptionError, match=r"prompts\[1\] contains a line feed"):
        hash_prompts(["a", "b\nc"])
    with pytest.raises(DTypeError, match=r"Expected `prompts` to be a list of strings, but got str"):
        hash_prompts("a cat")
    with pytest.raises(DTypeError, match=r"prompts\[0\] is int"):
        hash_prompts([1])


def _protocol(**changes: object) -> EvaluationProtocol:
    base = EvaluationProtocol.for_prompts(
        "coco-test",
        PROMPTS,
        seeds=0,
        resolution=(1024, 1024),
        preprocessing={"fid": "clean", "eval_resolution": 512},
        backbones={"clip_score": {"backbone": "open_clip ViT-g-14", "scale": 1.0}},
        versions={"clean-fid": "0.1.35"},
        generator={"model": "sdxl", "steps": 4},
        extra={"note": "x"},
    )
    return dataclasses.replace(base, **changes)


def test_json_round_trip(tmp_path: Path) -> None:
    protocol = _protocol()
    assert protocol.prompt_count == 3 and protocol.resolution == [1024, 1024]
    protocol.to_json(tmp_path / "protocol.json")
    back = EvaluationProtocol.from_json(tmp_path / "protocol.json")
    assert back == protocol
    check_comparable(protocol, back)
    (tmp_path / "bad.json").write_text('{"prompt_set": "x", "colour": 1}')
    with pytest.raises(OptionError, match=r"unknown protocol field\(s\) \['colour'\]"):
        EvaluationProtocol.from_json(tmp_path / "bad.json")
    (tmp_path / "short.json").write_text('{"prompt_set": "x"}')
    with pytest.raises(OptionError, match=r"is not a complete protocol record"):
        EvaluationProtocol.from_json(tmp_path / "short.json")
    assert EvaluationProtocol.from_dict(protocol.to_dict()) == protocol
    with pytest.raises(OptionError, match=r"the results' protocol holds unknown protocol field"):
        EvaluationProtocol.from_dict({"colour": 1}, source="the results' protocol")
    with pytest.raises(DTypeError, match=r"Expected a protocol mapping in the record, but got list"):
        EvaluationProtocol.from_dict([])


def test_check_comparable_lists_every_difference() -> None:
    a = _protocol()
    check_comparable(a, _protocol(generator={"model": "student", "steps": 1}))  # generators may differ
    b = _protocol(
        resolution=[512, 512],
        backbones={"clip_score": {"backbone": "open_clip ViT-B-32", "scale": 1.0}},
        versions={"clean-fid": "0.1.36", "open-clip-torch": "3.3.0"},
    )
    with pytest.raises(ProtocolMismatchError, match=r"4 field\(s\) differ") as info:
        check_comparable(a, b)
    message = str(info.value)
    assert "resolution: [1024, 1024] != [512, 512]" in message
    assert "backbones.clip_score.backbone: 'open_clip ViT-g-14' != 'open_clip ViT-B-32'" in message
    assert "versions.clean-fid: '0.1.35' != '0.1.36'" in message
    assert "versions.open-clip-torch: '<missing>' != '3.3.0'" in message
    assert set(info.value.differences) == {
        "resolution",
        "backbones.clip_score.backbone",
        "versions.clean-fid",
        "versions.open-clip-torch",
    }
    assert isinstance(info.value, ValueError)
    check_comparable(a, b, ignore=("generator", "versions", "resolution", "backbones.clip_score"))
    with pytest.raises(ProtocolMismatchError, match=r"generator.steps: 4 != 1"):
        check_comparable(a, _protocol(generator={"model": "sdxl", "steps": 1}), ignore=())
    with pytest.raises(DTypeError, match=r"Expected `ignore` to be a list of field names"):
        check_comparable(a, a, ignore="generator")
    with pytest.raises(DTypeError, match=r"Expected `b` to be an EvaluationProtocol"):
        check_comparable(a, a.to_dict())  # type: ignore[arg-type]


def test_protocol_field_checks_and_package_versions() -> None:
    with pytest.raises(OptionError, match=r"Expected `prompt_sha256` to be 64 hex digits"):
        EvaluationProtocol("x", "abc", 1)
    with pytest.raises(OptionError, match=r"`prompt_sha256` is not hexadecimal"):
        EvaluationProtocol("x", "z" * 64, 1)
    with pytest.raises(OptionError, match=r"Expected `prompt_count` to be an integer >= 0"):
        EvaluationProtocol("x", "0" * 64, -1)
    with pytest.raises(DTypeError, match=r"Expected `backbones` to be a dict, but got list"):
        EvaluationProtocol("x", "0" * 64, 1, backbones=[])  # type: ignore[arg-type]
    versions = package_versions(["torch", "clean-fid", "surely-not-installed-xyz"])
    assert versions["surely-not-installed-xyz"] == "not installed"
    import torch

    assert torch.__version__.startswith(versions["torch"])
    with pytest.raises(DTypeError, match=r"Expected `names` to be a list of distribution names"):
        package_versions("torch")


def test_prompt_hash_is_normalised_to_lower_case_and_only_plain_hex_is_accepted() -> None:
    """An upper-case copy of a hash is the same prompt set; "0x", "_" and signs (which ``int(s, 16)`` takes) are
    not hex digits."""
    digest = hash_prompts(PROMPTS)
    upper = EvaluationProtocol("coco-test", digest.upper(), 3)
    assert upper.prompt_sha256 == digest
    check_comparable(upper, EvaluationProtocol.for_prompts("coco-test", PROMPTS))
    for bad in ("0x" + digest[2:], digest[:10] + "_" + digest[11:], "+" + digest[1:], " " + digest[1:]):
        with pytest.raises(OptionError, match=r"`prompt_sha256` is not hexadecimal"):
            EvaluationProtocol("x", bad, 1)


def test_dotted_keys_do_not_collide_with_nested_keys_and_nan_equals_itself(tmp_path: Path) -> None:
    """``{"a.b": 1}`` against ``{"a": {"b": 1}}`` differs (both entries named apart in the message); a NaN entry
    leaves a record comparable with itself and with its JSON round trip; ``True`` is not ``1``."""
    dotted, nested = _protocol(extra={"a.b": 1}), _protocol(extra={"a": {"b": 1}})
    with pytest.raises(ProtocolMismatchError, match=r"2 field\(s\) differ") as info:
        check_comparable(dotted, nested)
    assert set(info.value.differences) == {'extra["a.b"]', "extra.a.b"}
    assert "extra[\"a.b\"]: 1 != '<missing>'" in str(info.value)
    check_comparable(dotted, nested, ignore=["extra"])
    check_comparable(dotted, _protocol(extra={"a.b": 2}), ignore=['extra["a.b"]'])
    nan = _protocol(extra={"fid_reference": {"score": float("nan"), "scores": [1.0, float("nan")]}})
    check_comparable(nan, nan)
    nan.to_json(tmp_path / "nan.json")
    check_comparable(nan, EvaluationProtocol.from_json(tmp_path / "nan.json"))
    with pytest.raises(ProtocolMismatchError, match=r"extra.fid_reference.score: nan != 1.0"):
        check_comparable(
            nan, _protocol(extra={"fid_reference": {"score": 1.0, "scores": [1.0, float("nan")]}})
        )
    clip = {"backbone": "open_clip ViT-g-14"}
    with pytest.raises(ProtocolMismatchError, match=r"backbones.clip_score.scale: 1.0 != True"):
        check_comparable(_protocol(), _protocol(backbones={"clip_score": clip | {"scale": True}}))
    check_comparable(_protocol(), _protocol(backbones={"clip_score": clip | {"scale": 1}}))  # 1 == 1.0
    with pytest.raises(DTypeError, match=r"Expected every entry of `ignore` to be a str, but got int"):
        check_comparable(dotted, dotted, ignore=[3])  # type: ignore[list-item]
