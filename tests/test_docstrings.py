"""Every public callable documents its parameters, its result and its errors (issue 18, part 3).

pydoclint (``make lint``) checks that the ``Args:`` / ``Returns:`` sections of every public function and
method match the signature. Its ``Raises:`` check only sees ``raise`` statements in the body, and nearly all
input errors here are raised by the shared validators of ``_checks.py``, so this test asks instead that every
public function and class exported by a subpackage has a ``Raises:`` section (classes: in the class docstring
or ``__init__``'s), and that its ``Args:`` section names every parameter.
"""

from __future__ import annotations

import inspect
import re

import pytest

import diffdistill

SUBPACKAGES = ("errors", "losses", "schedulers", "discriminators", "students", "metrics")

# Result containers and constants: built by the library, not from user input, so they raise nothing.
NO_RAISES = {
    "errors.MissingDependencyError",  # exception types: raised, not raising
    "errors.ProtocolMismatchError",
    "metrics.MissingDependencyError",
    "metrics.ProtocolMismatchError",
    "losses.ConsistencyPair",
    "losses.MixAndMatch",
    "losses.RenoisedSamples",
    "schedulers.SamplerOutput",
    "schedulers.FlowSigmaGrid",  # result of flow_sigma_grid
    "schedulers.TimestepSample",
    "schedulers.Stage",
    "discriminators.BackboneMode",
    "discriminators.sdxl_unet_config",  # config dicts: no input to check
    "discriminators.tiny_sdxl_unet_config",
    "students.BlockRemovalReport",
    "students.BlockRemovalChain",  # records the library builds (start_chain / remove_blocks / from_json)
    "students.RemovalRound",
    "students.in_backward_pass",  # no arguments
    "errors.DTypeError",
    "errors.NonFiniteError",
    "errors.OptionError",
    "errors.ShapeError",
    "errors.value_checks_enabled",
    "errors.set_value_checks",
    "errors.value_checks",
}


def _public_callables() -> list[tuple[str, object]]:
    out = []
    for sub in SUBPACKAGES:
        module = getattr(diffdistill, sub)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out.append((f"{sub}.{name}", obj))
    return out


def _doc_and_signature(obj: object) -> tuple[str, inspect.Signature | None]:
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        init = obj.__dict__.get("__init__")
        if init is not None and init.__doc__:
            doc += "\n" + (inspect.getdoc(init) or "")
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            sig = None
        return doc, sig
    return doc, inspect.signature(obj)  # type: ignore[arg-type]


def _params(sig: inspect.Signature | None) -> list[str]:
    if sig is None:
        return []
    return [
        p.name
        for p in sig.parameters.values()
        if p.name not in {"self", "cls"} and p.kind not in {p.VAR_POSITIONAL, p.VAR_KEYWORD}
    ]


CALLABLES = _public_callables()


def test_public_callables_are_found() -> None:
    assert len(CALLABLES) > 80


@pytest.mark.parametrize(("qualname", "obj"), CALLABLES, ids=[q for q, _ in CALLABLES])
def test_public_callable_documents_args_and_raises(qualname: str, obj: object) -> None:
    doc, sig = _doc_and_signature(obj)
    assert doc.strip(), f"{qualname} has no docstring"
    params = _params(sig)
    if params and not (inspect.isclass(obj) and issubclass(obj, tuple)):
        assert "Args:" in doc, f"{qualname} takes {params} but its docstring has no Args: section"
        args_block = doc.split("Args:", 1)[1]
        for p in params:
            assert re.search(rf"^\s+\*?\*?{re.escape(p)}\b.*:", args_block, re.MULTILINE), (
                f"{qualname}: parameter `{p}` is not described in its Args: section"
            )
    if qualname not in NO_RAISES:
        assert "Raises:" in doc, f"{qualname} has no Raises: section naming the errors a caller can hit"
