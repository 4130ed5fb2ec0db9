"""The record of an evaluation: ``results.json`` (numbers + the protocol they were measured under) and the table of
several runs, refused when their protocols differ.

``results.json``::

    {"metrics": {"fid": 19.3, "clip_score": 0.33, ...},
     "protocol": {...},            # diffdistill.metrics.protocol.EvaluationProtocol, as JSON
     "num_images": 10000, "images_dir": "out/student/images", "label": "student", "command": [...]}

The protocol holds what makes two numbers comparable -- the prompt set's hash and size, the seeds, the generated
and evaluated resolutions, the resize, the FID reference, the backbones and their versions -- and, under
``generator``, how the images were made (model, student weights, sampler, steps, guidance). ``--compare`` puts runs
in one table only when everything but ``generator`` agrees: a teacher and its students differ there by design
(every paper's table has the teacher at its own steps and guidance beside the students), and nowhere else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_NAME = "results.json"
METRIC_ORDER = (
    "fid",
    "precision",
    "recall",
    "density",
    "coverage",
    "clip_score",
    "frame_consistency",
    "imagereward",
    "hpsv21",
    "pickscore",
    "aesthetic",
)
"""Column order of :func:`comparison_table` (other metrics follow, sorted)."""


def write_results(path: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as JSON to ``path`` atomically (temporary file, then rename); return ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_results(path: str | Path) -> dict[str, Any]:
    """A ``results.json`` (or the one inside a run folder).

    Raises:
        ValueError: if the file is missing or lacks ``metrics`` / ``protocol``.
    """
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_NAME
    if not p.is_file():
        raise ValueError(
            f"Expected {path} to be a results.json written by examples/evaluate.py, but it does not exist."
        )
    record = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or "metrics" not in record or "protocol" not in record:
        raise ValueError(
            f"Expected {p} to hold 'metrics' and 'protocol' (examples/evaluate.py's results.json)."
        )
    record.setdefault("label", p.parent.name)
    return record


def protocol_of(record: dict[str, Any]) -> Any:
    """The :class:`~diffdistill.metrics.protocol.EvaluationProtocol` of a results record.

    Raises:
        ValueError: if the record's protocol has unknown or missing fields.
    """
    from diffdistill.metrics.protocol import EvaluationProtocol

    return EvaluationProtocol.from_dict(record["protocol"], source="the results record's `protocol`")


def check_same_protocol(records: Sequence[dict[str, Any]], paths: Sequence[str]) -> None:
    """Refuse (``ProtocolMismatchError``, a ``ValueError`` listing every differing field) when two runs' protocols
    differ in anything but ``generator`` and the backbones of metrics only one of the two measured.

    Every pair of runs is checked: a metric measured by some runs only (``--precision_recall``, ``--clip``) leaves
    the others comparable on the metrics they share (the table shows "-" where a run has no number), while two
    runs that both measured it must have measured it the same way."""
    from diffdistill.errors import ProtocolMismatchError
    from diffdistill.metrics.protocol import check_comparable

    protocols = [protocol_of(r) for r in records]
    for i in range(len(protocols)):
        for j in range(i + 1, len(protocols)):
            a, b = protocols[i], protocols[j]
            one_only = sorted(set(a.backbones or {}) ^ set(b.backbones or {}))
            try:
                check_comparable(a, b, ignore=("generator", *(f"backbones.{k}" for k in one_only)))
            except ProtocolMismatchError as err:
                raise ProtocolMismatchError(
                    f"Cannot compare {paths[i]} and {paths[j]}: they were measured under different protocols. {err}",
                    differences=err.differences,
                ) from err


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"


def _describe(record: dict[str, Any]) -> tuple[str, str, str]:
    """(label, sampler, guidance) of a run from its protocol's ``generator`` entry."""
    gen = record["protocol"].get("generator") or {}
    steps = gen.get("timesteps") or gen.get("sigmas") or gen.get("num_inference_steps")
    n = len(steps) if isinstance(steps, list) else steps
    sampler = f"{gen['scheduler']}, {n} steps" if "scheduler" in gen else "images"  # else: --images, declared
    guidance = "-" if gen.get("guidance_scale") is None else f"{gen['guidance_scale']:g}"
    role, label = gen.get("role"), str(record.get("label", ""))
    return (f"{label} ({role})" if role and role != label else label), sampler, guidance


def comparison_table(paths: Sequence[str | Path]) -> str:
    """A markdown table of the runs' numbers, one row per run, after checking their protocols agree.

    Args:
        paths: ``results.json`` files or run folders.

    Returns:
        The table (header, separator, rows), then a line naming the shared protocol's prompt set.

    Raises:
        ValueError: if fewer than one path is given, a file is not a results record, or two protocols differ.
    """
    if not paths:
        raise ValueError("Expected at least one results.json to --compare, but got none.")
    names = [str(p) for p in paths]
    records = [read_results(p) for p in paths]
    check_same_protocol(records, names)
    present = {k for r in records for k in r["metrics"]}
    columns = [m for m in METRIC_ORDER if m in present] + sorted(present - set(METRIC_ORDER))
    lines = ["| run | sampler | guidance | " + " | ".join(columns) + " |"]
    lines.append("|---|---|---|" + "---|" * len(columns))
    for record in records:
        label, sampler, guidance = _describe(record)
        cells = [_fmt(record["metrics"].get(m)) for m in columns]
        lines.append(f"| {label} | {sampler} | {guidance} | " + " | ".join(cells) + " |")
    protocol = records[0]["protocol"]
    lines.append("")
    lines.append(
        f"Protocol: prompt set {protocol['prompt_set']} ({protocol['prompt_count']} prompts, sha256 "
        f"{protocol['prompt_sha256'][:12]}...), seed {protocol['seeds']}, resolution {protocol['resolution']}, "
        f"eval resolution {protocol['preprocessing'].get('eval_resolution')}."
    )
    deviations = (protocol.get("extra") or {}).get("protocol_deviations")
    if deviations:  # the prompt file's protocol, not followed (evaluation.metric_specs.prompt_set)
        lines.append("Deviations from the prompt file's protocol: " + "; ".join(deviations) + ".")
    return "\n".join(lines)
