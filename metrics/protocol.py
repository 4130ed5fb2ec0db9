"""The protocol record of an evaluation run, and the refusal to compare runs measured differently.

FID and CLIP score move by whole points with the prompt set, the number of images, the resize filter, the
evaluation resolution and the CLIP backbone (Parmar et al., CVPR 2022, Sec. 3-4 for the resize; DMD2 evaluates
SDXL on COCO-10k at 512 px, GigaGAN / SiD-LSG on COCO-2014 val 30k). Every run writes an
:class:`EvaluationProtocol` beside its numbers; :func:`check_comparable` refuses to put two runs in one table
unless everything except the generator (by default) matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import DTypeError, OptionError, ProtocolMismatchError

__all__ = [
    "EvaluationProtocol",
    "check_comparable",
    "file_sha256",
    "files_sha256",
    "hash_prompts",
    "hub_commit",
    "module_sha256",
    "package_versions",
    "weights_identity",
]


def _check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Iterable):
        raise DTypeError(
            f"Expected `prompts` to be a list of strings, but got {type(prompts).__name__}. Read a prompt file "
            "with Path(path).read_text().splitlines()."
        )
    out = list(prompts)
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise DTypeError(f"Expected every prompt to be a str, but prompts[{i}] is {type(p).__name__}.")
    return out


def hash_prompts(prompts: Iterable[str]) -> str:
    """The SHA-256 identity of a prompt set: ``sha256("\\n".join(prompts).encode("utf-8")).hexdigest()``.

    Exactly: the prompts in their order, joined with one line feed (``"\\n"``, no trailing one), encoded as
    UTF-8, hashed with SHA-256, written as 64 lowercase hex digits. A prompt file with one prompt per line and
    no final newline hashes to the same value (``hashlib.sha256(path.read_bytes())``). Order matters (seeds
    are assigned by position).

    Args:
        prompts: The prompts, in evaluation order.

    Returns:
        The hex digest.

    Raises:
        DTypeError: ``prompts`` is a single string or holds a non-string.
        OptionError: A prompt contains a line feed (the join would be ambiguous).

    Example:
        >>> from diffdistill.metrics import hash_prompts
        >>> hash_prompts(["a cat", "a dog"])[:16]
        'f658c42ad55fc07e'
    """
    items = _check_prompts(prompts)
    for i, p in enumerate(items):
        if "\n" in p:
            raise OptionError(
                f"prompts[{i}] contains a line feed, which would make the joined prompt set ambiguous. Replace "
                "line breaks inside prompts with spaces first."
            )
    return hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of distributions (``importlib.metadata``), ``"not installed"`` for missing ones.

    Args:
        names: Distribution names as pip knows them (``"torch"``, ``"clean-fid"``, ``"open-clip-torch"``).

    Returns:
        ``{name: version}``, in the order given.

    Raises:
        DTypeError: ``names`` is a single string or holds a non-string.

    Example:
        >>> from diffdistill.metrics import package_versions
        >>> sorted(package_versions(["torch", "surely-not-a-package"]).items())[1]
        ('torch', ...)
    """
    from importlib import metadata

    if isinstance(names, str) or not isinstance(names, Iterable):
        raise DTypeError(
            f"Expected `names` to be a list of distribution names, but got {type(names).__name__}."
        )
    out: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str):
            raise DTypeError(f"Expected every name to be a str, but got {type(name).__name__}.")
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _update_from_file(digest: Any, path: Path) -> None:
    """Feed the bytes of ``path`` to ``digest`` in 16 MiB blocks (constant memory, any file size)."""
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes (what ``sha256sum`` prints), read in 16 MiB blocks.

    Args:
        path: A file.

    Returns:
        The hex digest.

    Example:
        >>> import tempfile
        >>> from diffdistill.metrics.protocol import file_sha256
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = (Path(folder) / "w.bin").write_bytes(b"abc")
        ...     file_sha256(Path(folder) / "w.bin")[:12]
        'ba7816bf8f01'
    """
    digest = hashlib.sha256()
    _update_from_file(digest, Path(path))
    return digest.hexdigest()


def files_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 identity of weights on disk: of a file's name and bytes, or of a folder's top-level files
    (sorted by name; each name, a NUL byte, then its bytes). Files are read in 16 MiB blocks, so a checkpoint of
    any size hashes in constant memory (about 1 s per GB).

    Another checkpoint saved under the same path changes it; the same files under another folder name do not
    (a folder's own name is not hashed).

    Args:
        path: A file or a folder.

    Returns:
        The hex digest.

    Raises:
        FileNotFoundError: ``path`` does not exist.

    Example:
        >>> import tempfile
        >>> from diffdistill.metrics.protocol import files_sha256
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = (Path(folder) / "w.bin").write_bytes(b"1234")
        ...     len(files_sha256(folder))
        64
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"No file or folder at `{root}` to hash.")
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.iterdir() if p.is_file())
    for file in files:
        digest.update(file.name.encode("utf-8") + b"\0")
        _update_from_file(digest, file)
    return digest.hexdigest()


def module_sha256(module: Any) -> str:
    """The SHA-256 identity of a module's weights: every ``state_dict`` entry in order, its name, dtype, shape
    and bytes (copied to the CPU one tensor at a time). Computed once per module object and kept on it (frozen
    evaluation backbones do not change during a run).

    Args:
        module: An ``nn.Module``.

    Returns:
        The hex digest.

    Raises:
        DTypeError: ``module`` is not an ``nn.Module``.

    Example:
        >>> import torch
        >>> from diffdistill.metrics.protocol import module_sha256
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> module_sha256(a) == module_sha256(a), module_sha256(a) == module_sha256(b)
        (True, False)
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise DTypeError(f"Expected `module` to be an nn.Module, but got {type(module).__name__}.")
    cached = module.__dict__.get("_diffdistill_sha256")
    if cached is not None:
        return str(cached)
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    module.__dict__["_diffdistill_sha256"] = digest.hexdigest()
    return str(module.__dict__["_diffdistill_sha256"])


def hub_commit(
    repo_id: str, revision: str | None = None, *, filename: str = "config.json", cache_dir: str | None = None
) -> str | None:
    """The commit a Hub id resolves to in the local Hugging Face cache (what ``from_pretrained`` loaded), read
    offline: the snapshot folder that holds ``filename`` for ``revision`` (default ``main``).

    Args:
        repo_id: The Hub id (``"openai/clip-vit-large-patch14"``).
        revision: A branch, tag or commit (``None``: ``main``).
        filename: A file of the repository's root that the loader fetched.
        cache_dir: The cache (``None``: huggingface_hub's default, ``HF_HUB_CACHE``).

    Returns:
        The 40-hex-digit commit, or None when the file is not cached (or huggingface_hub is not installed).

    Example:
        >>> from diffdistill.metrics.protocol import hub_commit
        >>> hub_commit("surely-not/a-cached-repo") is None
        True
    """
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers / diffusers
        return None
    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    except ValueError:  # not a valid repository id (e.g. a path that does not exist)
        return None
    if not isinstance(found, str):
        return None
    commit = Path(found).parent.name
    return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None


def weights_identity(
    source: str | os.PathLike[str] | None, *, revision: str | None = None, filename: str = "config.json"
) -> dict[str, str]:
    """What identifies the weights a backbone was loaded from, for a protocol record: a local file or folder by
    its content (:func:`files_sha256`, ``{"weights_sha256": ...}``), a Hub id by the commit it resolved to
    (:func:`hub_commit`, ``{"commit": ...}``; ``{}`` when not cached), a name from a registry (an open_clip
    ``pretrained`` tag) or None by nothing (``{}``: the name is the identity).

    Args:
        source: A path, a Hub id, a registry tag, or None.
        revision: The Hub revision asked for.
        filename: A root file of the Hub repository (see :func:`hub_commit`).

    Returns:
        ``{"weights_sha256": ...}``, ``{"commit": ...}`` or ``{}``.

    Example:
        >>> from diffdistill.metrics.protocol import weights_identity
        >>> weights_identity(None), weights_identity("laion2b_s12b_b42k")
        ({}, {})
    """
    if source is None:
        return {}
    path = Path(source)
    if path.exists():
        return {"weights_sha256": files_sha256(path)}
    name = str(source)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        commit = hub_commit(name, revision, filename=filename)
        return {} if commit is None else {"commit": commit}
    return {}


_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def _jsonable(value: Any) -> Any:
    """Tuples as lists, recursively (what a JSON round trip gives), so that comparisons are stable."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclasses.dataclass
class EvaluationProtocol:
    """Everything that decides what an evaluation number means, written beside the number.

    Fields group into what is measured (prompt set, seeds, resolution), how it is measured (preprocessing,
    backbones, package versions) and what produced the images (``generator``: excluded from comparisons by
    default, since comparing generators is the point of a table).

    Args:
        prompt_set: A name for the prompt set (e.g. ``"coco2014-val-30k"``, ``"dmd2-coco10k"``).
        prompt_sha256: :func:`hash_prompts` of the prompts in evaluation order (64 hex digits; stored in lower
            case, as :func:`hash_prompts` writes them, so an upper-case copy compares equal).
        prompt_count: The number of prompts (= images per model).
        seeds: How seeds were chosen: a base seed (``seed + prompt index``), a list, or a description.
        resolution: The generation resolution, an int or ``[height, width]``.
        preprocessing: How images are brought to each metric (e.g. ``{"fid": "clean-fid clean resize 299",
            "eval_resolution": 512}``).
        backbones: Per metric, its backbone and convention (:meth:`CLIPScore.protocol` / :meth:`FID.protocol`).
        versions: Package versions (:func:`package_versions`).
        generator: What made the images: model id, LoRA / UNet / transformer, sampler, steps, guidance.
        extra: Anything else that matters (free form, compared too).

    Raises:
        DTypeError: A field has the wrong type.
        OptionError: ``prompt_count`` is negative or ``prompt_sha256`` is not 64 hex digits.

    Example:
        >>> from diffdistill.metrics import EvaluationProtocol, check_comparable
        >>> prompts = ["a cat", "a dog"]
        >>> base = EvaluationProtocol.for_prompts("toy", prompts, seeds=0, resolution=64)
        >>> student = dataclasses.replace(base, generator={"steps": 4})
        >>> check_comparable(base, student)  # generators may differ
        >>> try:
        ...     check_comparable(base, dataclasses.replace(base, resolution=128))
        ... except ValueError as err:
        ...     print(str(err).splitlines()[1])
          resolution: 64 != 128
    """

    prompt_set: str
    prompt_sha256: str
    prompt_count: int
    seeds: int | list[int] | str | None = None
    resolution: int | list[int] | None = None
    preprocessing: dict[str, Any] = dataclasses.field(default_factory=dict)
    backbones: dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    generator: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_set, str):
            raise DTypeError(f"Expected `prompt_set` to be a str, but got {type(self.prompt_set).__name__}.")
        if not isinstance(self.prompt_sha256, str) or len(self.prompt_sha256) != 64:
            raise OptionError(
                f"Expected `prompt_sha256` to be 64 hex digits (hash_prompts(prompts)), but got {self.prompt_sha256!r}."
            )
        if not _HEX64.fullmatch(self.prompt_sha256):  # digits and a-f only: no "0x", "_", sign or spaces
            raise OptionError(f"`prompt_sha256` is not hexadecimal: {self.prompt_sha256!r}.")
        self.prompt_sha256 = self.prompt_sha256.lower()
        if (
            isinstance(self.prompt_count, bool)
            or not isinstance(self.prompt_count, int)
            or self.prompt_count < 0
        ):
            raise OptionError(
                f"Expected `prompt_count` to be an integer >= 0, but got {self.prompt_count!r}."
            )
        for name in ("preprocessing", "backbones", "versions", "generator", "extra"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise DTypeError(f"Expected `{name}` to be a dict, but got {type(value).__name__}.")
            setattr(self, name, _jsonable(value))
        self.resolution = _jsonable(self.resolution)
        self.seeds = _jsonable(self.seeds)

    @classmethod
    def for_prompts(cls, prompt_set: str, prompts: Sequence[str], **fields: Any) -> EvaluationProtocol:
        """A protocol whose hash and count are computed from the prompts themselves.

        Args:
            prompt_set: The prompt set's name.
            prompts: The prompts, in evaluation order.
            **fields: The other fields.

        Returns:
            The protocol.

        Raises:
            DTypeError: See :func:`hash_prompts` and the class.
        """
        items = _check_prompts(prompts)
        return cls(
            prompt_set=prompt_set, prompt_sha256=hash_prompts(items), prompt_count=len(items), **fields
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict.

        Returns:
            The dict.
        """
        return _jsonable(dataclasses.asdict(self))

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the protocol as indented, key-sorted JSON.

        Args:
            path: The file.

        Raises:
            TypeError: A field holds something JSON cannot represent.
        """
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> EvaluationProtocol:
        """Read a protocol written by :meth:`to_json`.

        Args:
            path: The file.

        Returns:
            The protocol.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            OptionError: The JSON holds unknown or missing fields.
        """
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")), source=f"`{path}`")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "the record") -> EvaluationProtocol:
        """The protocol of a :meth:`to_dict` mapping (e.g. the ``"protocol"`` entry of a results file).

        Args:
            data: The fields.
            source: How errors name where ``data`` came from.

        Returns:
            The protocol.

        Raises:
            DTypeError: ``data`` is not a mapping.
            OptionError: ``data`` holds unknown or missing fields.
        """
        if not isinstance(data, Mapping):
            raise DTypeError(f"Expected a protocol mapping in {source}, but got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise OptionError(
                f"{source} holds unknown protocol field(s) {unknown}; known fields are {sorted(names)}. Put free-form "
                "entries under `extra`."
            )
        try:
            return cls(**data)
        except TypeError as err:
            raise OptionError(f"{source} is not a complete protocol record: {err}.") from err


def _entry_name(path: tuple[str, ...]) -> str:
    """The printed name of a nested entry: keys joined with dots (``backbones.fid.reference``); a key that holds a
    dot or a bracket is written as a quoted subscript (``extra["a.b"]``), so that ``{"a.b": x}`` and
    ``{"a": {"b": x}}`` get different names."""
    name = path[0]
    for key in path[1:]:
        name += f"[{json.dumps(key)}]" if ("." in key or "[" in key or not key) else f".{key}"
    return name


def _flatten(value: Any, path: tuple[str, ...]) -> dict[tuple[str, ...], Any]:
    """The leaves of a nested dict by their key paths (an empty dict is a leaf: it differs from a missing one)."""
    if isinstance(value, Mapping) and value:
        out: dict[tuple[str, ...], Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, (*path, str(k))))
        return out
    return {path: value}


def _same(a: Any, b: Any) -> bool:
    """Equality of recorded values, where a NaN equals a NaN (a protocol is comparable with itself) and a bool
    differs from the number it equals in Python (``True`` / ``1``: JSON keeps them apart)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


_MISSING = "<missing>"


def check_comparable(
    a: EvaluationProtocol, b: EvaluationProtocol, ignore: Iterable[str] = ("generator",)
) -> None:
    """Raise unless two runs were measured under the same protocol (their numbers can share a table).

    Every field is compared; dict fields are compared entry by entry (dotted names such as
    ``backbones.clip_score.backbone``; a key holding a dot is written as a subscript, ``extra["a.b"]``, so it
    never collides with a nested ``{"a": {"b": ...}}``), and the error lists every difference with both values.
    NaN equals NaN (a record is comparable with itself and with its JSON round trip); ``True`` differs from ``1``.

    Args:
        a: The first run's protocol.
        b: The second run's protocol.
        ignore: Field names or entry-name prefixes to skip, written as in the error message (default:
            ``("generator",)``; e.g. add ``"versions"`` to compare runs across package upgrades, or
            ``"backbones.fid.reference_file"`` for a renamed copy of the same FID reference).

    Raises:
        DTypeError: ``a`` or ``b`` is not an :class:`EvaluationProtocol`, or ``ignore`` is a single string or
            holds a non-string.
        ProtocolMismatchError: A compared field differs (a ``ValueError``).
    """
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, EvaluationProtocol):
            raise DTypeError(
                f"Expected `{name}` to be an EvaluationProtocol, but got {type(value).__name__}. Read one with "
                "EvaluationProtocol.from_json(path)."
            )
    if isinstance(ignore, str):
        raise DTypeError(
            f"Expected `ignore` to be a list of field names, but got the string {ignore!r}: wrap it in a list."
        )
    skip = tuple(ignore)
    for s in skip:
        if not isinstance(s, str):
            raise DTypeError(f"Expected every entry of `ignore` to be a str, but got {type(s).__name__}.")
    flat_a = {k: v for f in dataclasses.fields(a) for k, v in _flatten(getattr(a, f.name), (f.name,)).items()}
    flat_b = {k: v for f in dataclasses.fields(b) for k, v in _flatten(getattr(b, f.name), (f.name,)).items()}
    differences: dict[str, tuple[Any, Any]] = {}
    for path in sorted(set(flat_a) | set(flat_b)):
        key = _entry_name(path)
        if any(key == s or key.startswith((s + ".", s + "[")) for s in skip):
            continue
        va, vb = flat_a.get(path, _MISSING), flat_b.get(path, _MISSING)
        if not _same(va, vb):
            differences[key] = (va, vb)
    if differences:
        lines = [f"  {k}: {va!r} != {vb!r}" for k, (va, vb) in differences.items()]
        raise ProtocolMismatchError(
            f"The two runs were evaluated under different protocols ({len(differences)} field(s) differ; "
            f"ignored: {list(skip)}):\n"
            + "\n".join(lines)
            + "\nRe-evaluate one run under the other's protocol "
            "(or pass ignore=[...] for fields you know do not matter).",
            differences=differences,
        )
