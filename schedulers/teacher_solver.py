"""A teacher ODE solver with classifier-free guidance: n DDIM steps from ``t`` to ``t_to``.

Used as the multi-step teacher of progressive distillation (SDXL-Lightning Eq. 16), the one-step
teacher of LCM / TSCD, MLCM's p-step inter-segment solver and its data-free trajectory states.

Schedule-agnostic: the network is called with :meth:`NoiseSchedule.model_timestep` of the index (a VP
UNet the integer index itself, a rectified-flow transformer :math:`\\sigma \\cdot` ``timestep_scale``), and
on a flow schedule the DDIM step is the exact Euler step of the flow ODE. Guidance-distilled teachers
(FLUX.1-dev) take the scale as an input instead of running an unconditional pass: ``guidance_input``.
Teachers whose pipelines rescale the guided output get the same rescale: ``guidance_rescale``
(:func:`rescale_guidance_std`, Lin et al. 2024 / diffusers' ``guidance_rescale``; :func:`rescale_guidance_norm`,
Qwen-Image's true-CFG renormalisation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from .._checks import (
    SHARED_CONDITION_HINT,
    DTypeError,
    OptionError,
    ShapeError,
    check_bool,
    check_dtype_floating,
    check_finite,
    check_float_input,
    check_int,
    check_mapping,
    check_nonempty,
    check_option,
    check_real,
    check_same_shape,
    check_tensor,
    is_shared_condition,
    value_checks_enabled,
)
from .._modules import unwrap_model
from .._outputs import check_prediction, explain_dtype_errors, first_tensor
from .noise_schedule import NoiseSchedule, TimestepLike

__all__ = [
    "GUIDANCE_CONVENTIONS",
    "TeacherSolver",
    "apply_guidance",
    "concat_conditions",
    "rescale_guidance_norm",
    "rescale_guidance_std",
]

GUIDANCE_CONVENTIONS: tuple[str, ...] = ("imagen", "lcm")
GuidanceConvention = Literal["imagen", "lcm"]


# ---------------------------------------------------------------------------------------------------
# checks shared with the few-step samplers
# ---------------------------------------------------------------------------------------------------
def _noop_scale(convention: str) -> float:
    """The guidance scale that means "no guidance" in ``convention`` (Imagen: 1, LCM: 0)."""
    return 1.0 if convention == "imagen" else 0.0


def _check_scale(w: Any, name: str = "guidance_scale") -> float | torch.Tensor:
    """A finite real number, or a 0-d / 1-D real tensor (its length is checked against the batch later)."""
    if isinstance(w, torch.Tensor):
        if w.dtype == torch.bool or w.is_complex():
            raise DTypeError(f"Expected `{name}` to be a real number or tensor, but got dtype {w.dtype}.")
        if w.ndim > 1:
            raise ShapeError(
                f"Expected `{name}` to be a number or one value per sample (B,), but got shape {tuple(w.shape)}.",
                name=name,
                expected="() or (B,)",
                actual=tuple(w.shape),
            )
        check_finite(w, name)
        return w
    return check_real(w, name)


def _check_scale_or_schedule(w: Any) -> Any:
    """:func:`_check_scale`, or a callable guidance schedule ``w(model_t)`` as it is (its results are checked per
    call by :func:`_scheduled_scale`)."""
    if callable(w) and not isinstance(w, torch.Tensor):
        return w
    return _check_scale(w)


def _scheduled_scale(schedule: Callable[[torch.Tensor], Any], model_t: torch.Tensor) -> float | torch.Tensor:
    """The scale a guidance schedule gives at the model timesteps ``model_t`` ``(B,)``: a real number, or a 0-d /
    ``(B,)`` / ``(1,)`` real tensor (dtype and shape checked; no value check, which would sync the device every
    step)."""
    w = schedule(model_t)
    if isinstance(w, torch.Tensor):
        if w.dtype == torch.bool or w.is_complex() or w.ndim > 1:
            raise DTypeError(
                f"Expected the guidance_scale schedule to return a real number or a real (B,) tensor, but it "
                f"returned a {w.dtype} tensor of shape {tuple(w.shape)}."
            )
        _check_scale_batch(w, model_t.shape[0], "guidance_scale(t)")
        return w
    return check_real(w, "guidance_scale(t)")


def _check_scale_batch(w: float | torch.Tensor, batch: int, name: str = "guidance_scale") -> None:
    if isinstance(w, torch.Tensor) and w.ndim == 1 and w.shape[0] not in (1, batch):
        raise ShapeError(
            f"Expected `{name}` to be a number or one value per sample ({batch},), but got shape "
            f"{tuple(w.shape)}.",
            name=name,
            expected=(batch,),
            actual=tuple(w.shape),
        )


def _check_state(x_t: Any, name: str = "x_t") -> torch.Tensor:
    """A floating ``(B, ...)`` tensor with at least one sample and finite entries (a value check)."""
    check_tensor(x_t, name)
    check_dtype_floating(x_t, name)
    if x_t.ndim < 1:
        raise ShapeError(
            f"Expected `{name}` to have a batch dimension, (B, ...): image latents (B, C, H, W), video latents "
            "(B, C, F, H, W) or any (B, ...), but got a 0-d tensor.",
            name=name,
            expected="(B, ...)",
            actual=(),
        )
    check_nonempty(x_t, name)
    check_finite(x_t, name)
    return x_t


# ---------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------
def apply_guidance(
    cond_out: torch.Tensor,
    uncond_out: torch.Tensor,
    guidance_scale: float | torch.Tensor,
    convention: str = "imagen",
) -> torch.Tensor:
    """Classifier-free guidance, with the convention named explicitly.

    * ``"imagen"`` (Ho & Salimans 2022; diffusers pipelines): :math:`u + w (c - u)`; ``w = 1`` is no guidance.
    * ``"lcm"`` (the LCM distillation scripts): :math:`c + w (c - u)`, i.e. Imagen with ``w + 1``;
      ``w = 0`` is no guidance.

    Args:
        cond_out: the conditional model output :math:`c`, floating, ``(B, ...)``.
        uncond_out: the unconditional model output :math:`u`, floating, the shape of ``cond_out`` (no
            broadcasting: a ``(B, 1)`` against a ``(B, C)`` raises).
        guidance_scale: :math:`w`, a finite number or one value per sample (shape ``(B,)`` or ``(1,)``).
        convention: ``"imagen"`` (the default) or ``"lcm"``.

    Returns:
        The guided output, shape and dtype of ``cond_out``.

    Raises:
        DTypeError: if an output is not a floating tensor or ``guidance_scale`` is not real.
        ShapeError: if the outputs are empty or differ in shape, or ``guidance_scale`` is neither a number nor
            one value per sample.
        NonFiniteError: if an output or a tensor ``guidance_scale`` holds NaN / Inf (a value check).
        OptionError: if ``convention`` is unknown or a number ``guidance_scale`` is not finite.

    Example:
        >>> c, u = torch.ones(2, 3), torch.zeros(2, 3)
        >>> apply_guidance(c, u, 7.5)[0, 0].item(), apply_guidance(c, u, 6.5, "lcm")[0, 0].item()
        (7.5, 7.5)
    """
    check_option(convention, "convention", GUIDANCE_CONVENTIONS)
    check_float_input(cond_out, "cond_out", finite=False)
    check_float_input(uncond_out, "uncond_out", finite=False)
    check_same_shape(cond_out, uncond_out, "cond_out", "uncond_out")
    w = _check_scale(guidance_scale)
    _check_scale_batch(w, cond_out.shape[0] if cond_out.ndim else 1)
    check_finite(cond_out, "cond_out")
    check_finite(uncond_out, "uncond_out")
    return _guide(cond_out, uncond_out, w, convention)


def rescale_guidance_std(guided: torch.Tensor, cond_out: torch.Tensor, phi: float = 0.7) -> torch.Tensor:
    """Lin et al.'s guidance rescale: bring the guided output's standard deviation back to the conditional one's.

    Lin, Liu, Li, Yang, "Common Diffusion Noise Schedules and Sample Steps are Flawed", WACV 2024, Sec. 3.4
    (Eq. 15-16; diffusers' ``guidance_rescale`` of the SD / SDXL pipelines, ``rescale_noise_cfg``):
    :math:`\\hat g = g \\cdot \\mathrm{std}(c) / \\mathrm{std}(g)`, then :math:`\\phi \\hat g + (1 - \\phi) g`, with
    the (unbiased) standard deviations per sample over every other dimension. ``phi = 0`` is no rescale; the
    paper uses 0.7. As in diffusers, nothing guards the division: a guided output constant over a sample has
    zero spread and no finite rescale.

    Args:
        guided: the guided output :math:`g` (:func:`apply_guidance`), floating, ``(B, ...)``.
        cond_out: the conditional output :math:`c`, the shape of ``guided``.
        phi: the rescale weight :math:`\\phi` in ``[0, 1]`` (default 0.7, the paper's).

    Returns:
        The rescaled output, shape and dtype of ``guided``.

    Raises:
        DTypeError: if an output is not a floating tensor or ``phi`` is not a real number.
        ShapeError: if the outputs differ in shape or hold one value per sample (no spread to rescale).
        OptionError: if ``phi`` is outside ``[0, 1]``.
        NonFiniteError: if an output holds NaN / Inf (a value check).

    Example:
        >>> c = torch.tensor([[1.0, -1.0]])
        >>> rescale_guidance_std(3 * c, c, phi=1.0).tolist()  # CFG tripled the spread; the rescale undoes it
        [[1.0, -1.0]]
    """
    phi = check_real(phi, "phi", low=0.0, high=1.0)
    _check_rescale_inputs(guided, cond_out)
    return _rescale_std(guided, cond_out, phi)


def _check_rescale_inputs(guided: Any, cond_out: Any) -> None:
    check_float_input(guided, "guided", finite=False)
    check_float_input(cond_out, "cond_out", finite=False)
    check_same_shape(guided, cond_out, "guided", "cond_out")
    if guided.ndim < 2 or guided[0].numel() < 2:
        raise ShapeError(
            f"Expected `guided` of shape (B, ...) with at least 2 values per sample to rescale, but got shape "
            f"{tuple(guided.shape)}.",
            name="guided",
            expected="(B, C, ...)",
            actual=tuple(guided.shape),
        )
    check_finite(guided, "guided")
    check_finite(cond_out, "cond_out")


def _rescale_std(guided: torch.Tensor, cond_out: torch.Tensor, phi: float) -> torch.Tensor:
    dims = tuple(range(1, guided.ndim))
    work = torch.promote_types(guided.dtype, torch.float32)  # half precision upcast, float64 kept
    g, c = guided.to(work), cond_out.to(work)
    rescaled = g * (c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True))
    return (phi * rescaled + (1 - phi) * g).to(guided.dtype)


def rescale_guidance_norm(
    guided: torch.Tensor, cond_out: torch.Tensor, patch_size: int = 1, *, packed: bool = False
) -> torch.Tensor:
    """Qwen-Image's true-CFG renormalisation: each token of the guided output scaled to the conditional norm.

    ``QwenImagePipeline`` (diffusers 0.42.1, ``true_cfg_scale``) rescales the guided velocity of every packed
    token to the norm of the conditional one, :math:`g_i \\leftarrow g_i \\lVert c_i \\rVert / \\lVert g_i \\rVert`
    with norms over the token's channels (reference/flow.md pitfall 10): ``torch.norm(noise_pred, dim=-1)`` on
    its packed tokens ``(B, L, 4C)``. Two layouts:

    * ``packed=True``: the transformer's own layout ``(B, L, D)`` (what a TeacherSolver around the bare
      ``QwenImageTransformer2DModel`` sees): the norm runs over the last dimension, the pipeline's formula.
    * ``packed=False`` (the default): channel-first latents ``(B, C, ...)``. On unpacked latents ``(B, C, h, w)``
      a token is the ``patch_size x patch_size`` patch of all channels (Qwen-Image / FLUX packing: 2, so each
      norm runs over 4C values); with ``patch_size = 1`` (image ``(B, C, H, W)`` or video ``(B, C, F, H, W)``
      latents) the norm runs over the channels at each position. A 3-D tensor is refused here: ``(B, L, D)`` is
      the packed layout, where a channel-first norm would rescale each channel across the tokens instead.

    As in the pipeline, nothing guards the division: a guided token of norm 0 gives NaN.

    Args:
        guided: the guided output :math:`g` (:func:`apply_guidance`), floating, ``(B, C, ...)`` (or ``(B, ..., D)``
            with ``packed=True``).
        cond_out: the conditional output :math:`c`, the shape of ``guided``.
        patch_size: the side of a packed token in the latent grid (Qwen-Image: 2); > 1 needs ``(B, C, h, w)``
            with ``h`` and ``w`` multiples of it, and ``packed=False``.
        packed: the outputs are packed tokens with the channels last (default False).

    Returns:
        The rescaled output, shape and dtype of ``guided``.

    Raises:
        DTypeError: if an output is not a floating tensor, ``patch_size`` is not an int or ``packed`` not a bool.
        ShapeError: if the outputs differ in shape, ``patch_size`` > 1 meets a tensor that is not
            ``(B, C, h, w)`` with ``h`` and ``w`` divisible by it, or a 3-D tensor comes without ``packed=True``.
        OptionError: if ``patch_size`` < 1, or > 1 with ``packed=True``.
        NonFiniteError: if an output holds NaN / Inf (a value check).

    Example:
        >>> c, g = torch.tensor([[[[3.0]], [[4.0]]]]), torch.tensor([[[[6.0]], [[8.0]]]])  # (1, 2, 1, 1)
        >>> rescale_guidance_norm(g, c).flatten().tolist()  # norm 10 -> 5, direction kept
        [3.0, 4.0]
        >>> rescale_guidance_norm(g.reshape(1, 1, 2), c.reshape(1, 1, 2), packed=True).flatten().tolist()
        [3.0, 4.0]
    """
    p = check_int(patch_size, "patch_size", minimum=1)
    packed = check_bool(packed, "packed")
    _check_rescale_inputs(guided, cond_out)
    if packed:
        if p > 1:
            raise OptionError(
                f"`packed=True` takes packed tokens (B, L, D), each already a patch, but got patch_size={p}. Drop "
                "`patch_size` (or pass unpacked latents (B, C, h, w) with packed=False)."
            )
        work = torch.promote_types(guided.dtype, torch.float32)
        g, c = guided.to(work), cond_out.to(work)
        ratio = torch.linalg.vector_norm(c, dim=-1, keepdim=True) / torch.linalg.vector_norm(
            g, dim=-1, keepdim=True
        )
        return (g * ratio).to(guided.dtype)
    if guided.ndim == 3:
        raise ShapeError(
            f"Expected `guided` laid out channel-first, (B, C, H, W) or (B, C, F, H, W), but got the 3-D shape "
            f"{tuple(guided.shape)}, the layout of packed tokens (B, L, D) (QwenImageTransformer2DModel's input and "
            "output), where QwenImagePipeline takes the norm over the last dimension. Pass packed=True (e.g. "
            "functools.partial(rescale_guidance_norm, packed=True) as guidance_rescale), or unpacked latents with "
            "patch_size=2.",
            name="guided",
            expected="(B, C, H, W) or packed=True",
            actual=tuple(guided.shape),
        )
    if p > 1 and (guided.ndim != 4 or guided.shape[-1] % p or guided.shape[-2] % p):
        raise ShapeError(
            f"Expected `guided` of shape (B, C, h, w) with h and w divisible by patch_size={p}, but got shape "
            f"{tuple(guided.shape)}.",
            name="guided",
            expected=f"(B, C, {p}k, {p}m)",
            actual=tuple(guided.shape),
        )
    return _rescale_norm(guided, cond_out, p)


def _rescale_norm(guided: torch.Tensor, cond_out: torch.Tensor, p: int) -> torch.Tensor:
    work = torch.promote_types(guided.dtype, torch.float32)
    g, c = guided.to(work), cond_out.to(work)
    if p == 1:
        scale = torch.linalg.vector_norm(c, dim=1, keepdim=True) / torch.linalg.vector_norm(
            g, dim=1, keepdim=True
        )
        return (g * scale).to(guided.dtype)
    b, ch, h, w = g.shape

    def patches(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, ch, h // p, p, w // p, p)

    dims = (1, 3, 5)
    ratio = torch.linalg.vector_norm(patches(c), dim=dims, keepdim=True) / torch.linalg.vector_norm(
        patches(g), dim=dims, keepdim=True
    )
    return (patches(g) * ratio).reshape(b, ch, h, w).to(guided.dtype)


def _guide(
    cond_out: torch.Tensor, uncond_out: torch.Tensor, w: float | torch.Tensor, convention: str
) -> torch.Tensor:
    """:func:`apply_guidance` on validated inputs."""
    if isinstance(w, torch.Tensor):
        w = w.to(device=cond_out.device, dtype=torch.promote_types(cond_out.dtype, torch.float32))
        w = w.reshape(w.shape + (1,) * (cond_out.ndim - w.ndim))
    diff = cond_out - uncond_out
    base = uncond_out if convention == "imagen" else cond_out
    return (base + w * diff).to(cond_out.dtype)


def concat_conditions(cond: Mapping[str, Any], uncond: Mapping[str, Any], batch: int) -> dict[str, Any]:
    """Stack conditional and unconditional model kwargs into one batch of ``2 * batch`` (cond first).

    Tensors are concatenated along dim 0; a tensor with batch 1 (e.g. one shared null-text embedding) is
    expanded to ``batch``; nested dicts (SDXL's ``added_cond_kwargs``) are handled recursively; any other
    value must be equal in both.

    **Values without a batch dimension.** One rule, shared by every place of the library that batches
    conditioning (this function, so every classifier-free-guided :class:`TeacherSolver` call; the consistency
    losses; :func:`~diffdistill.losses.lazy_r1_penalty`'s subset and
    :func:`~diffdistill.losses.mix_and_match`): a 2-D tensor under the keyword ``img_ids`` or ``txt_ids`` is the
    position ids of a FLUX-family transformer, shared by the whole batch, and is passed through as it is
    (not concatenated, not indexed). That is how diffusers' ``FluxPipeline`` (0.42.1) calls
    ``FluxTransformer2DModel``: ``txt_ids`` ``(T, 3)`` from ``encode_prompt`` and ``img_ids`` ``(L, 3)`` from
    ``_prepare_latent_image_ids``, one set for the batch, also under ``true_cfg_scale`` (the same ids for both
    passes). Here ``cond`` and ``uncond`` must then hold the same ids (the same tensor, or equal values: a value
    check); the deprecated 3-D form ``(B, L, 3)`` is batched like any tensor. The rule goes by name and rank, so
    ``L == B`` cannot make shared ids look batched; other unbatched inputs belong inside a wrapper of the model.

    Args:
        cond: the conditional model kwargs (tensors with batch ``batch`` or 1 in dim 0, shared position ids,
            nested dicts, others).
        uncond: the unconditional model kwargs, with the same keys.
        batch: ``B``, the batch size of the states, an int >= 1.

    Returns:
        A new dict with the keys of ``cond``: tensors of batch ``2 * batch``, other values as given.

    Raises:
        DTypeError: if ``cond`` or ``uncond`` is not a mapping, or ``batch`` is not an int.
        OptionError: if the keys differ, ``batch`` is < 1, a non-tensor value differs, or shared position ids
            differ between ``cond`` and ``uncond`` (their values: a value check).
        ShapeError: if a tensor's dim 0 is neither ``batch`` nor 1 (and it is no shared position id).

    Example:
        >>> c = {"encoder_hidden_states": torch.ones(2, 77, 8), "added_cond_kwargs": {"time_ids": torch.ones(2, 6)}}
        >>> u = {"encoder_hidden_states": torch.zeros(1, 77, 8), "added_cond_kwargs": {"time_ids": torch.ones(2, 6)}}
        >>> both = concat_conditions(c, u, batch=2)
        >>> tuple(both["encoder_hidden_states"].shape), tuple(both["added_cond_kwargs"]["time_ids"].shape)
        ((4, 77, 8), (4, 6))
        >>> ids = torch.zeros(16, 3)  # FLUX's img_ids (L, 3): shared, passed through
        >>> concat_conditions({"img_ids": ids}, {"img_ids": ids}, batch=2)["img_ids"] is ids
        True
    """
    for name, value in (("cond", cond), ("uncond", uncond)):
        if not isinstance(value, Mapping):
            raise DTypeError(
                f"Expected `{name}` to be a dict of model keyword arguments, but got {type(value).__name__}."
            )
    batch = check_int(batch, "batch", minimum=1)
    return _concat(cond, uncond, batch, "")


def _concat(cond: Mapping[str, Any], uncond: Mapping[str, Any], batch: int, prefix: str) -> dict[str, Any]:
    if set(cond) != set(uncond):
        where = f" in {prefix}" if prefix else ""
        raise OptionError(
            f"Expected `cond` and `uncond` to have the same keys{where}, but got "
            f"cond {sorted(cond)} and uncond {sorted(uncond)}."
        )
    out: dict[str, Any] = {}
    for key in cond:
        a, b = cond[key], uncond[key]
        path = f"{prefix}[{key!r}]"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out[key] = _concat(a, b, batch, path)
        elif is_shared_condition(key, a) or is_shared_condition(key, b):
            out[key] = _shared_ids(a, b, path)
        elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            parts = []
            for name, v in (("cond", a), ("uncond", b)):
                if v.ndim == 0 or v.shape[0] not in (1, batch):
                    raise ShapeError(
                        f"Expected `{name}{path}` to have batch size {batch} or 1 in dim 0, but got shape "
                        f"{tuple(v.shape)}. {SHARED_CONDITION_HINT}",
                        name=f"{name}{path}",
                        expected=(batch,),
                        actual=tuple(v.shape),
                    )
                parts.append(v.expand(batch, *v.shape[1:]))
            out[key] = torch.cat(parts, dim=0)
        elif a is b or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b):
            out[key] = a
        else:
            raise OptionError(
                f"Cannot batch `cond{path}` ({type(a).__name__}) with `uncond{path}` ({type(b).__name__}): "
                "non-tensor values must be equal in both."
            )
    return out


def _shared_ids(a: Any, b: Any, path: str) -> torch.Tensor:
    """The shared position ids of ``cond`` and ``uncond`` (see :func:`concat_conditions`): one tensor for both."""
    same = a is b or (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.shape == b.shape
        and (not value_checks_enabled() or torch.equal(a, b.to(a.device)))
    )
    if not same:
        shape = lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__  # noqa: E731
        raise OptionError(
            f"`cond{path}` {shape(a)} and `uncond{path}` {shape(b)} are position ids shared by the batch (2-D "
            "img_ids / txt_ids, no batch dimension), but they differ: the conditional and unconditional passes "
            "run as one batch, which has one set of ids. Pass the same ids in both (FluxPipeline does; text of "
            "another length needs the unconditional embeddings padded to the conditional ones' length)."
        )
    return a


def _stride_timesteps(
    tt: torch.Tensor,
    tto: torch.Tensor,
    num_steps: int,
    stride: float,
    total: int,
    names: tuple[str, str, str, str] = ("t", "t_to", "num_steps", "stride"),
) -> torch.Tensor:
    """:meth:`TeacherSolver.step_timesteps` with a stride, on validated ``(B,)`` timesteps.

    ``names`` are the public names of ``t``, ``t_to``, ``num_steps`` and ``stride`` in the reach check's
    message (the losses pass theirs).
    """
    # float64 where the device has it (exact grid ties, e.g. 937.5); MPS has no float64.
    u = (tt + 1).to(torch.float32 if tt.device.type == "mps" else torch.float64)
    u_to = tto + 1
    # The exact time of u: the teacher-grid point T - j s that rounds to u (j = floor or ceil of (T - u) / s),
    # else u itself (an off-grid start, e.g. SDXL-Lightning's extra student timesteps).
    j = torch.floor((total - u) / stride)
    exact = u
    for cand in (j + 1, j):
        point = total - cand * stride
        exact = torch.where(torch.round(point) == u, point, exact)
    k = torch.arange(num_steps + 1, device=tt.device, dtype=u.dtype).unsqueeze(1)
    u_k = torch.round(exact.unsqueeze(0) - k * stride).long()
    if value_checks_enabled():
        reach = u_k[-1].clamp(min=0)
        backwards, short = torch.stack([(tto > tt).any(), (u_to < reach - 1).any()]).tolist()
        if backwards:
            n_t, n_to = names[:2]
            raise OptionError(
                f"Expected `{n_to}` <= `{n_t}` (the solve runs towards the clean end, t = -1), but got "
                f"{n_t}={tt.tolist()} and {n_to}={tto.tolist()}."
            )
        if short:
            n_t, n_to, n_steps, n_stride = names
            raise OptionError(
                f"Expected `{n_to}` to be reached by `{n_steps}` ({num_steps}) steps of `{n_stride}` ({stride}) "
                f"from `{n_t}`, i.e. {n_to} >= {(reach - 2).tolist()}, but got {n_t}={tt.tolist()} and "
                f"{n_to}={tto.tolist()}. Raise `{n_steps}`, or pass the stride of the teacher's own grid "
                "(T / its number of steps)."
            )
    u_k = torch.maximum(u_k, u_to.unsqueeze(0))
    u_k[-1] = u_to
    return u_k - 1


def _check_sigma_model(model: Any, schedule: NoiseSchedule) -> None:
    """Refuse a bare FLUX / Qwen-Image transformer (known by class, over the MRO of the unwrapped module, so an
    FSDP2 ``FSDP<Name>`` subclass counts) on a flow schedule whose ``timestep_scale`` is not 1: those transformers
    take :math:`\\sigma` and multiply by 1000 inside (``FluxPipeline`` / ``QwenImagePipeline`` pass
    ``timestep / 1000``), so ``1000 sigma`` would reach them as ``10^6 sigma``. Wrappers (any callable that is
    not such a module) are not inspected: they may rescale the timestep themselves."""
    if not isinstance(model, torch.nn.Module) or schedule.kind != "flow" or schedule.timestep_scale == 1.0:
        return
    names = [cls.__name__ for cls in type(unwrap_model(model)).__mro__]
    family = next((n for n in names if n.startswith(("Flux", "QwenImage"))), None)
    if family is not None:
        raise OptionError(
            f"`model` is a {family}, which takes sigma and multiplies it by 1000 inside (its pipeline passes "
            f"timestep / 1000), but `schedule` has timestep_scale={schedule.timestep_scale}: the network would be "
            "called at timestep_scale times the noise level. Build the schedule with timestep_scale=1.0, e.g. "
            "NoiseSchedule.from_scheduler(pipe.scheduler, image_seq_len=..., timestep_scale=1.0)."
        )


class TeacherSolver:
    """Run a frozen denoiser with classifier-free guidance and DDIM steps.

    The conditional and unconditional passes are batched into one call. No gradient is recorded
    (``torch.no_grad``) unless ``grad=True`` is passed to :meth:`predict` / :meth:`solve`.

    Guidance defaults agree with the few-step samplers (:func:`~diffdistill.schedulers.lcm_sample` and
    the others): the convention defaults to ``"imagen"`` and an omitted ``guidance_scale`` means *no
    guidance in the chosen convention* (1 for Imagen, 0 for LCM), so only the conditional pass runs. Pass
    both explicitly for CFG, e.g. ``guidance_scale=7.5, guidance="imagen"`` or ``guidance_scale=6.5,
    guidance="lcm"`` (the same guidance).

    The model sees ``x_t`` in the dtype it was given: a bf16 ``x_t`` into a float32 model without autocast
    fails inside the model, which is reported as a :class:`~diffdistill.errors.DTypeError` that says how to
    fix it (the solver does not cast behind the caller's back).

    The model's timestep input is :meth:`~diffdistill.schedulers.NoiseSchedule.model_timestep` of the index
    (DESIGN convention 10): on a VP schedule the int64 index itself (SD / SDXL UNets), on a flow schedule a
    float32 :math:`\\sigma_t \\cdot` ``timestep_scale`` (SD3 / Wan: :math:`1000\\sigma`; FLUX: build the schedule
    with ``timestep_scale=1.0``, since its transformer multiplies by 1000 inside; a bare FLUX / Qwen-Image
    transformer on another scale is refused). Outputs are read in
    ``prediction_type`` (a flow model's ``"flow"``: :math:`v = \\epsilon - x_0`, Esser et al. 2024, Sec. 2).

    **Guidance-distilled teachers.** FLUX.1-dev was trained with guidance distillation: it takes the scale as
    an input embedding (``guidance=``, a ``(B,)`` tensor) and has no unconditional pass (reference/flow.md
    §3; diffusers' ``FluxPipeline`` passes ``torch.full([B], w, float32)``). Give ``guidance_input="guidance"``
    (the model's keyword): every call is then one conditional pass with ``guidance=w``, ``uncond`` is refused
    and a ``guidance_scale`` is required. The scale is read in the chosen convention and handed to the model in
    diffusers' (Imagen) one: ``"lcm"`` / rCM / PCM's :math:`c + w(c-u)` passes ``w + 1``.

    Args:
        model: any callable ``model(x_t, t, **cond)`` returning a tensor of the shape of ``x_t`` (or a
            diffusers output / tuple / dict whose first tensor is the prediction), e.g. a
            ``UNet2DConditionModel``; ``t`` is a ``(B,)`` tensor from ``schedule.model_timestep``: int64
            indices (VP) or float32 :math:`\\sigma \\cdot` ``timestep_scale`` (flow).
        schedule: the :class:`~diffdistill.schedulers.NoiseSchedule` the model was trained with.
        guidance_scale: default CFG scale (a finite number or a ``(B,)`` tensor); ``None`` (the default)
            means no guidance in the chosen convention (with ``guidance_input``: none, so each call must
            pass one). Or a *guidance schedule*: a callable of the model's timestep input ``(B,)`` (what
            :meth:`model_timestep` gives) returning a number or a ``(B,)`` tensor, called at every prediction:
            a scale that depends on the noise level, e.g. Wan 2.2 A14B's two experts (``WanPipeline``'s
            ``guidance_scale`` where ``t >= boundary_ratio * 1000``, ``guidance_scale_2`` below) or a guidance
            interval (Kynkäänniemi et al. 2024, arXiv:2404.07724: guidance on a middle band of noise levels
            only). A sample whose scale is the no-op one still gets both passes when others in its batch are
            guided.
        guidance: ``"imagen"`` (:math:`u + w(c-u)`, the default) or ``"lcm"`` (:math:`c + w(c-u)`); see
            :func:`apply_guidance`.
        prediction_type: the model's output type (default: the schedule's).
        guidance_input: the keyword through which a guidance-distilled model takes its scale (FLUX.1-dev:
            ``"guidance"``), or ``None`` (the default: classifier-free guidance with two passes).
        guidance_rescale: what the teacher's pipeline does to the guided output, applied after every guided
            prediction (not when only the conditional pass runs): ``None`` (the default) nothing; a number
            :math:`\\phi` in ``[0, 1]``: :func:`rescale_guidance_std` (Lin et al. 2024, diffusers'
            ``guidance_rescale``); a callable ``(guided, cond_out) -> tensor``, e.g.
            ``functools.partial(rescale_guidance_norm, patch_size=2)`` for Qwen-Image (``QwenImagePipeline``'s
            true CFG) on unpacked latents, ``functools.partial(rescale_guidance_norm, packed=True)`` on the
            transformer's packed tokens.
        synchronize: make every ``torch.distributed`` process call the model the same number of times where the
            number depends on the samples: a :meth:`solve` step with ``stride`` that moves none of this process's
            samples is skipped only when it moves none on any process (one ``all_reduce`` a solve), and
            :func:`~diffdistill.losses.teacher_trajectory_states` runs every process's step groups. For a teacher
            whose weights are sharded and gathered in each call (FSDP2, DeepSpeed ZeRO-3, e.g. a LoRA student
            with its adapters off): mismatched calls desynchronise the collectives. Results are unchanged.
            Default ``False``.

    Raises:
        OptionError: if ``model`` is not callable, ``schedule`` is not a :class:`NoiseSchedule`, ``model`` is a
            bare FLUX / Qwen-Image transformer (known by its class) and ``schedule.timestep_scale`` is not 1,
            ``guidance`` or ``prediction_type`` is unknown, a number ``guidance_scale`` is not finite, ``guidance_input``
            is not an identifier, a number ``guidance_rescale`` is outside ``[0, 1]``, or ``guidance_rescale``
            meets ``guidance_input``.
        DTypeError: if ``guidance_scale`` is not a real number or tensor, ``guidance_input`` is not a
            string or None, ``guidance_rescale`` is neither a number, a callable nor None, or ``synchronize`` is
            not a bool.
        ShapeError: if a tensor ``guidance_scale`` has more than one dimension.
        NonFiniteError: if a tensor ``guidance_scale`` holds NaN / Inf (a value check).

    Example:
        >>> sched = NoiseSchedule.from_betas()
        >>> model = lambda x, t, scale: x * scale  # a toy epsilon-predictor with a "condition"
        >>> solver = TeacherSolver(model, sched, guidance_scale=2.0)
        >>> x = torch.randn(2, 4, 8, 8)
        >>> cond, uncond = {"scale": torch.full((2, 1, 1, 1), 0.2)}, {"scale": torch.zeros(1, 1, 1, 1)}
        >>> x_prev = solver.solve(x, torch.tensor([999, 500]), torch.tensor([759, 250]), cond, uncond, num_steps=3)
        >>> x_prev.shape
        torch.Size([2, 4, 8, 8])
        >>> flux_like = lambda x, t, guidance: x * (t / 1000 + guidance).view(-1, 1)  # a flow model, embedded w
        >>> dev = TeacherSolver(flux_like, NoiseSchedule.flow_matching(shift=3.0), guidance_scale=3.5,
        ...                     guidance_input="guidance")
        >>> dev.predict(torch.ones(1, 2), 499).tolist()  # t = 1000 sigma_499 = 750: 1 * (0.75 + 3.5)
        [[4.25, 4.25]]
    """

    def __init__(
        self,
        model: Callable[..., Any],
        schedule: NoiseSchedule,
        *,
        guidance_scale: float | torch.Tensor | Callable[[torch.Tensor], Any] | None = None,
        guidance: GuidanceConvention = "imagen",
        prediction_type: str | None = None,
        guidance_input: str | None = None,
        guidance_rescale: float | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        synchronize: bool = False,
    ) -> None:
        if not callable(model):
            raise OptionError(
                f"Expected `model` to be callable model(x_t, t, **cond), but got {type(model).__name__}."
            )
        if not isinstance(schedule, NoiseSchedule):
            raise OptionError(
                f"Expected `schedule` to be a NoiseSchedule, but got {type(schedule).__name__}. "
                "Build one with NoiseSchedule.from_scheduler(diffusers_scheduler)."
            )
        check_option(guidance, "guidance", GUIDANCE_CONVENTIONS)
        _check_sigma_model(model, schedule)
        if guidance_input is not None:
            if not isinstance(guidance_input, str):
                raise DTypeError(
                    f"Expected `guidance_input` to be a model keyword (str, FLUX.1-dev: 'guidance') or None, but "
                    f"got {type(guidance_input).__name__}."
                )
            if not guidance_input.isidentifier():
                raise OptionError(
                    f"Expected `guidance_input` to be a model keyword name (FLUX.1-dev: 'guidance'), but got "
                    f"{guidance_input!r}."
                )
        if guidance_rescale is not None and guidance_input is not None:
            raise OptionError(
                f"`guidance_rescale` rescales classifier-free guidance's combination of two passes, but this solver "
                f"drives a guidance-distilled model (guidance_input={guidance_input!r}) with one pass: drop "
                "`guidance_rescale`."
            )
        if guidance_rescale is not None and not callable(guidance_rescale):
            check_real(guidance_rescale, "guidance_rescale", low=0.0, high=1.0)
        if not isinstance(synchronize, bool):
            raise DTypeError(f"Expected `synchronize` to be a bool, but got {type(synchronize).__name__}.")
        self.synchronize = synchronize
        self.model = model
        self.schedule = schedule
        self.guidance = guidance
        self.guidance_input = guidance_input
        self.guidance_rescale = guidance_rescale
        self.guidance_scale: float | torch.Tensor | Callable[[torch.Tensor], Any] | None
        if guidance_scale is not None:
            self.guidance_scale = _check_scale_or_schedule(guidance_scale)
        else:  # embedded guidance has no neutral value: each call must then name its scale
            self.guidance_scale = None if guidance_input is not None else _noop_scale(guidance)
        self.prediction_type = schedule._prediction_type(prediction_type)

    def _is_noop_guidance(self, w: float | torch.Tensor | None) -> bool:
        if isinstance(w, torch.Tensor) or w is None:
            return False
        return float(w) == _noop_scale(self.guidance)

    def _scale(self, guidance_scale: Any, batch: int) -> Any:
        w = self.guidance_scale if guidance_scale is None else _check_scale_or_schedule(guidance_scale)
        if w is not None and not callable(w):
            _check_scale_batch(w, batch)
        return w

    def model_timestep(self, tt: torch.Tensor) -> torch.Tensor:
        """What the model is called with at validated indices ``tt``: the index (VP) or
        :meth:`NoiseSchedule.model_timestep` (flow: float32 :math:`\\sigma \\cdot` ``timestep_scale``).

        Args:
            tt: int64 timestep indices in ``[-1, T-1]`` (already validated), any shape.

        Returns:
            The model's timestep input, the shape of ``tt``, on its device.

        Example:
            >>> solver = TeacherSolver(lambda x, t: x, NoiseSchedule.flow_matching(shift=3.0))
            >>> solver.model_timestep(torch.tensor([999, 499])).tolist()
            [1000.0, 750.0]
        """
        # Already validated indices: the unchecked path, so no device sync in the sampling loops.
        return self.schedule._model_timestep(tt)

    def _embedded_scale(self, w: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The ``(B,)`` float32 guidance input of a guidance-distilled model, in diffusers' (Imagen) convention."""
        batch = like.shape[0]
        if isinstance(w, torch.Tensor):
            g = w.to(device=like.device, dtype=torch.float32).reshape(-1).expand(batch)
        else:
            g = torch.full((batch,), float(w), device=like.device, dtype=torch.float32)
        return g + 1.0 if self.guidance == "lcm" else g

    def predict(
        self,
        x_t: torch.Tensor,
        t: TimestepLike,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
        guidance_scale: float | torch.Tensor | Callable[[torch.Tensor], Any] | None = None,
        *,
        grad: bool = False,
    ) -> torch.Tensor:
        """The guided model output at ``(x_t, t)`` in the model's prediction type.

        With a no-op scale (1 for Imagen, 0 for LCM) only the conditional pass runs and ``uncond`` may be
        omitted; any other scale needs ``uncond`` (OptionError otherwise: guidance is never skipped
        silently). With ``guidance_input`` (a guidance-distilled model) one conditional pass runs with the
        scale as that keyword, and ``uncond`` must be None.

        Args:
            x_t: noisy states ``(B, ...)``, floating, in the dtype the model takes.
            t: a scalar timestep or one per sample (``(B,)``), in ``[-1, T-1]``.
            cond: the model's conditional keyword arguments (default: none).
            uncond: the unconditional keyword arguments, same keys as ``cond`` (needed for real guidance).
            guidance_scale: CFG scale (or guidance schedule) for this call (default: the solver's ``guidance_scale``).
            grad: record the autograd graph (default off: the teacher is frozen).

        Returns:
            The (guided) prediction, shape of ``x_t``, in the model's output dtype.

        Raises:
            DTypeError: if ``x_t`` is not a floating tensor, ``cond`` / ``uncond`` is not a mapping,
                ``guidance_scale`` is not real, the model returns no floating tensor, or the model fails on
                ``x_t``'s dtype (e.g. bf16 states into a float32 model without autocast).
            ShapeError: if ``x_t`` has no batch dimension or is empty, ``t`` or ``guidance_scale`` is neither a
                scalar nor one per sample, a condition has another batch size, or the model's output is not
                the shape of ``x_t``.
            NonFiniteError: if ``x_t`` or a tensor ``guidance_scale`` holds NaN / Inf (a value check).
            OptionError: if ``uncond`` is missing for a real guidance scale, a ``t`` is outside ``[-1, T-1]``
                (a value check), a number ``guidance_scale`` is not finite, or ``cond`` / ``uncond`` keys differ;
                with ``guidance_input``: if ``uncond`` is given, no scale is given, or ``cond`` already holds
                that keyword.

        Example:
            >>> solver = TeacherSolver(lambda x, t, scale: x * scale, NoiseSchedule.from_betas(), guidance_scale=3.0)
            >>> x = torch.ones(2, 1)
            >>> solver.predict(x, 500, {"scale": torch.ones(2, 1)}, {"scale": torch.zeros(1, 1)}).tolist()
            [[3.0], [3.0]]
        """
        _check_state(x_t)
        cond_kw = check_mapping(cond, "cond")
        uncond_kw = None if uncond is None else check_mapping(uncond, "uncond")
        w = self._scale(guidance_scale, x_t.shape[0])
        tt = self.schedule.batch_timesteps(t, x_t)
        return self._predict(x_t, tt, cond_kw, uncond_kw, w, grad)

    def _predict(
        self,
        x_t: torch.Tensor,
        tt: torch.Tensor,
        cond: dict[str, Any],
        uncond: dict[str, Any] | None,
        w: float | torch.Tensor | None,
        grad: bool,
    ) -> torch.Tensor:
        """:meth:`predict` on validated inputs: no value checks (the sampling loops call it every step)."""
        tt = tt.expand(x_t.shape[0]) if tt.ndim == 0 or tt.shape[0] == 1 else tt
        model_t = self.model_timestep(tt)
        if callable(w) and not isinstance(
            w, torch.Tensor
        ):  # a guidance schedule: its scale at these timesteps
            w = _scheduled_scale(w, model_t)
        if self.guidance_input is not None:
            return self._predict_embedded(self.guidance_input, x_t, model_t, cond, uncond, w, grad)
        noop = self._is_noop_guidance(w)
        if uncond is None and not noop:
            noop_value = _noop_scale(self.guidance)
            if isinstance(w, torch.Tensor):  # never read for a no-op: that would sync the device every step
                scale = f"a tensor ({tuple(w.shape)})"
                how = (
                    f"the no-op guidance_scale ({noop_value}) as a Python number for the conditional output alone (a "
                    "tensor scale always runs both passes, whatever its values)"
                )
            else:
                scale, how = (
                    repr(w),
                    f"a no-op guidance_scale ({noop_value}) for the conditional output alone",
                )
            raise OptionError(
                f"Expected `uncond` for classifier-free guidance with guidance_scale={scale} "
                f"({self.guidance} convention), but got None. Pass the unconditional inputs, or {how}."
            )
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if noop or uncond is None:  # (uncond is None only with a no-op scale, checked above)
                with explain_dtype_errors("model", x_t, "x_t"):
                    pred = first_tensor(self.model(x_t, model_t, **cond))
                check_prediction(pred, x_t, "model", input_name="x_t")
                return pred
            both = concat_conditions(cond, uncond, x_t.shape[0])
            x_both = torch.cat([x_t, x_t])
            with explain_dtype_errors("model", x_t, "x_t"):
                out = first_tensor(self.model(x_both, torch.cat([model_t, model_t]), **both))
            check_prediction(
                out,
                x_both,
                "model",
                input_name="x_t",
                note=" (the conditional and unconditional passes are batched: 2B samples)",
            )
            c_out, u_out = out.chunk(2, dim=0)
            guided = _guide(c_out, u_out, _noop_scale(self.guidance) if w is None else w, self.guidance)
            return self._rescale(guided, c_out)

    def _rescale(self, guided: torch.Tensor, c_out: torch.Tensor) -> torch.Tensor:
        """The ``guidance_rescale`` of a guided prediction (checked: a callable's result keeps the shape)."""
        rescale = self.guidance_rescale
        if rescale is None:
            return guided
        if not callable(rescale):
            return _rescale_std(guided, c_out, float(rescale))
        out = rescale(guided, c_out)
        check_prediction(out, guided, "guidance_rescale", input_name="guided")
        return out

    def _predict_embedded(
        self,
        name: str,
        x_t: torch.Tensor,
        model_t: torch.Tensor,
        cond: dict[str, Any],
        uncond: dict[str, Any] | None,
        w: float | torch.Tensor | None,
        grad: bool,
    ) -> torch.Tensor:
        """One conditional pass of a guidance-distilled model with the scale as its ``guidance_input`` ``name``."""
        if uncond is not None:
            raise OptionError(
                f"This TeacherSolver drives a guidance-distilled model (guidance_input={name!r}, e.g. FLUX.1-dev), "
                "which has no unconditional pass, but got `uncond`. Drop `uncond`: the scale is passed as "
                f"`{name}=`."
            )
        if w is None:
            raise OptionError(
                f"Expected a `guidance_scale` for the guidance-distilled model (guidance_input={name!r}), but got "
                "None: the model takes the scale as an input and has no neutral value. Pass guidance_scale= to "
                "TeacherSolver or to this call (FLUX.1-dev: 3.5)."
            )
        if name in cond:
            raise OptionError(
                f"`cond` already holds {name!r}, which the solver passes itself (guidance_input={name!r}). Pass "
                "the scale as `guidance_scale` instead."
            )
        kwargs = {**cond, name: self._embedded_scale(w, x_t)}
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            with explain_dtype_errors("model", x_t, "x_t"):
                pred = first_tensor(self.model(x_t, model_t, **kwargs))
            check_prediction(pred, x_t, "model", input_name="x_t")
        return pred

    def step_timesteps(
        self,
        t: TimestepLike,
        t_to: TimestepLike,
        num_steps: int,
        like: torch.Tensor,
        *,
        stride: float | None = None,
    ) -> torch.Tensor:
        """The ``num_steps + 1`` timesteps ``t = t_0 >= t_1 >= ... >= t_n = t_to`` of :meth:`solve`.

        Without ``stride`` (the default; LCM's DDIM jumps, MLCM): :math:`t_i = t - \\lfloor i (t - t_{to}) / n
        \\rfloor`, ``[t, t_to]`` evenly split, integer, exact at both ends, every step at least one timestep.

        With ``stride`` :math:`s` (SDXL-Lightning Sec. 2.3: a distilled N-step teacher runs on its own grid,
        :math:`s = T/N`), on the continuous clock :math:`u = t + 1` (``u = 0`` the clean end):
        :math:`u_i = \\max(\\mathrm{round}(u^* - i s), u_{to})` for ``i < n`` and :math:`u_n = u_{to}`, where
        :math:`u^*` is the exact time of ``t``: the teacher-grid point :math:`T - j s` whose rounding is
        ``u`` where there is one (``N`` need not divide ``T``), else ``u`` itself (e.g. the extra
        timesteps of SDXL-Lightning's 1- and 2-step students). Steps clamped at ``t_to`` have zero length
        (``t_i == t_{i+1}``), per sample; :meth:`solve` skips them. E.g. a 2-step teacher (``s = 500``)
        from ``t = 249`` to the clean end gives ``249, -1, -1``.

        Args:
            t: where the solve starts, a scalar or one per sample (``(B,)``), in ``[-1, T-1]``.
            t_to: where it ends, a scalar or one per sample; without ``stride`` ``t - t_to >= num_steps``,
                with it ``t_to`` at most one index above ``t - n s`` (``n`` steps of the stride reach it).
            num_steps: ``n``, an int >= 1.
            like: the batch ``(B, ...)`` (only its device and batch size are read).
            stride: the teacher's step length ``s`` in timesteps, a real number in ``(0, T]``; ``None`` (the
                default) splits ``[t, t_to]`` evenly.

        Returns:
            int64 tensor of shape ``(n + 1, B)`` on ``like``'s device.

        Raises:
            DTypeError: if ``like`` is not a tensor, a timestep is not integer-valued, ``num_steps`` is not
                an int or ``stride`` is not a real number.
            ShapeError: if ``t`` / ``t_to`` is neither a scalar nor one per sample.
            OptionError: if ``num_steps`` is < 1, ``stride`` is outside ``(0, T]``, a timestep is outside
                ``[-1, T-1]``, without ``stride`` some ``t - t_to < num_steps``, or with it some ``t_to > t`` or
                ``t_to`` not reached by ``n`` steps of the stride (the last four are value checks).

        Example:
            >>> s = TeacherSolver(lambda x, t: x, NoiseSchedule.from_betas())
            >>> s.step_timesteps(999, 874, 3, torch.zeros(1)).flatten().tolist()
            [999, 958, 916, 874]
            >>> s.step_timesteps(torch.tensor([749, 249]), -1, 2, torch.zeros(2), stride=500).T.tolist()
            [[749, 249, -1], [249, -1, -1]]
        """
        num_steps = check_int(num_steps, "num_steps", minimum=1, integral_float=True)
        total = self.schedule.num_train_timesteps
        if stride is not None:
            stride = check_real(stride, "stride", low=0, strict=True, high=total)
        tt = self.schedule.batch_timesteps(t, like, "t")
        tto = self.schedule.batch_timesteps(t_to, like, "t_to")
        batch = like.shape[0] if like.ndim else 1
        tt, tto = tt.expand(batch) if tt.ndim == 0 else tt, tto.expand(batch) if tto.ndim == 0 else tto
        if stride is not None:
            return _stride_timesteps(tt, tto, num_steps, stride, total)
        span = tt - tto
        if value_checks_enabled() and bool((span < num_steps).any()):
            raise OptionError(
                f"Expected `t - t_to >= num_steps` ({num_steps}) so that every teacher step moves at least one "
                f"timestep, but got t={tt.tolist()} and t_to={tto.tolist()}."
            )
        i = torch.arange(num_steps + 1, device=tt.device).unsqueeze(1)
        return tt.unsqueeze(0) - torch.div(i * span.unsqueeze(0), num_steps, rounding_mode="floor")

    def solve(
        self,
        x_t: torch.Tensor,
        t: TimestepLike,
        t_to: TimestepLike,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
        num_steps: int = 1,
        guidance_scale: float | torch.Tensor | Callable[[torch.Tensor], Any] | None = None,
        *,
        return_trajectory: bool = False,
        grad: bool = False,
        state_dtype: torch.dtype | None = None,
        stride: float | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Integrate the probability-flow ODE from ``t`` to ``t_to`` with ``num_steps`` guided DDIM steps.

        ``t`` and ``t_to`` may differ per sample; the steps are :meth:`step_timesteps`: ``[t, t_to]`` evenly
        split, or with ``stride`` the teacher's own stride (SDXL-Lightning Sec. 2.3), where a sample whose
        step has zero length (clamped at ``t_to``) keeps its state and a step that moves no sample calls no
        model. Inputs are checked once, before the first model call.

        Args:
            x_t: states at ``t``, ``(B, ...)``, floating, in the dtype the model takes.
            t: where the solve starts, a scalar or one per sample (``(B,)``), in ``[-1, T-1]``.
            t_to: where it ends (earlier than ``t`` by at least ``num_steps``; ``-1`` is the clean end).
            cond: the model's conditional keyword arguments (default: none).
            uncond: the unconditional keyword arguments (needed for real guidance).
            num_steps: guided DDIM steps ``n``, an int >= 1 (default 1).
            guidance_scale: CFG scale for this solve (default: the solver's ``guidance_scale``).
            return_trajectory: return the ``n + 1`` states (``x_t`` first) instead of the last one.
            grad: record the autograd graph (default off: the teacher is frozen).
            state_dtype: a floating dtype (e.g. float32 for bf16 ``x_t``) that keeps the states, and the
                result, in that dtype while the model is still called on ``x_t``'s dtype: the solution is
                then not rounded to bf16 at each step. Default: ``x_t``'s dtype.
            stride: the teacher's step length ``s = T/N`` of an N-step teacher, a real number in ``(0, T]``
                (see :meth:`step_timesteps`). Default ``None``: ``[t, t_to]`` evenly split.

        Returns:
            :math:`x_{t_{to}}` of the shape of ``x_t``, or with ``return_trajectory=True`` the list of the
            ``n + 1`` states including ``x_t`` (a skipped step repeats its state).

        Raises:
            DTypeError: if ``x_t`` is not a floating tensor, ``state_dtype`` is not a floating dtype, a
                condition is not a mapping, ``num_steps`` is not an int, ``stride`` is not a real number, or as
                :meth:`predict` for the model calls.
            ShapeError: if ``x_t`` has no batch dimension or is empty, a timestep / ``guidance_scale`` is
                neither a scalar nor one per sample, or as :meth:`predict`.
            NonFiniteError: if ``x_t`` or a tensor ``guidance_scale`` holds NaN / Inf (a value check).
            OptionError: if ``num_steps`` is < 1, ``stride`` is outside ``(0, T]``, some timestep is outside
                ``[-1, T-1]``, some ``t - t_to < num_steps`` (without ``stride``) or ``t_to`` is above ``t`` or
                out of the stride's reach (value checks), or ``uncond`` is missing for a real guidance scale.
        """
        _check_state(x_t)
        if state_dtype is not None and not (
            isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point
        ):
            raise DTypeError(
                f"Expected `state_dtype` to be a floating torch.dtype (e.g. torch.float32) or None, but got "
                f"{state_dtype!r}."
            )
        cond_kw = check_mapping(cond, "cond")
        uncond_kw = None if uncond is None else check_mapping(uncond, "uncond")
        w = self._scale(guidance_scale, x_t.shape[0])
        steps = self.step_timesteps(t, t_to, num_steps, x_t, stride=stride)
        n = steps.shape[0] - 1
        x = x_t if state_dtype is None else x_t.to(state_dtype)
        trajectory = [x]
        moving = steps[1:] != steps[:-1]  # (n, B): False only for the zero-length steps of a stride
        # Which steps move some sample (one read of the timesteps; the even split moves every sample); with
        # `synchronize`, some sample of any process (every process then makes the same model calls).
        if stride is None:
            any_moving = [True] * n
        else:
            flags = moving.any(dim=1).to(torch.int32)
            if self.synchronize and torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            any_moving = flags.bool().tolist()
        for i in range(n):
            if not any_moving[i]:  # every sample is already at t_to: no model call
                trajectory.append(x)
                continue
            out = self._predict(x.to(x_t.dtype), steps[i], cond_kw, uncond_kw, w, grad)
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                x_next = self.schedule._ddim(out, x, steps[i], steps[i + 1], self.prediction_type)
                if stride is not None:  # samples whose step has zero length stay where they are
                    keep = moving[i].reshape(-1, *([1] * (x.ndim - 1)))
                    x_next = torch.where(keep, x_next, x)
            x = x_next
            trajectory.append(x)
        return trajectory if return_trajectory else x
