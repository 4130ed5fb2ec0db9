"""Comparing two training runs that took the same steps by numerically different paths.

DDP, FSDP2 and DeepSpeed ZeRO sum the per-process gradients in different orders, a resumed run reloads its
state into freshly allocated buffers (whose alignment can change which SIMD path a kernel takes), and other
CPUs pick other kernels. All of that changes float32 gradients in their last bits only. Adam's update
``lr · m̂ / (√v̂ + ε)`` is a sign-like normalisation in its first steps, so at the few entries whose gradient is
near zero such a last-bit change can move a weight by a sizeable fraction of the learning rate. An absolute
tolerance in float32 ulps therefore fails on some machines without any bug (issue 18: ZeRO-2 vs DDP differed by
1.47e-6 at one entry of 116 tensors on another CPU).

What a bug looks like is a different *update*: a lost optimizer state, a skipped or doubled micro-batch, a
gradient not reduced across processes or a penalty dropped by one engine changes the step by O(1) of its size.
So two runs are compared against the size of the update they made, overall and per tensor, never against ulps.
The measured gaps from reduction order are <= 1e-3 of the update (noted at each call); the bound used is
``REL = 1e-2``, ten times that and a hundred times below what a bug produces.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

#: Largest accepted ``|gap| / |update|`` for two paths that differ only in float32 summation order.
REL = 1e-2


def assert_same_update(
    got: Mapping[str, torch.Tensor],
    want: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    *,
    rel: float = REL,
    what: str = "runs",
) -> None:
    """``got`` and ``want`` (state dicts after the same steps from ``start``) made the same update.

    Overall, ``‖got − want‖ ≤ rel · ‖want − start‖`` over all tensors; per tensor, the gap's RMS is at most
    ``rel`` times the RMS of that tensor's update plus the RMS of the whole update (a tensor whose own update
    is ~0, such as a LoRA ``A`` whose ``B`` starts at zero, is judged by the update's overall scale). Also
    asserts that ``want`` trained at all.
    """
    assert got.keys() == want.keys(), f"{what}: different tensors {sorted(set(got) ^ set(want))[:5]}"
    assert set(want) <= set(start), f"{what}: no start value for {sorted(set(want) - set(start))[:5]}"
    update = {k: want[k].double() - start[k].double() for k in want}
    gap = {k: got[k].double() - want[k].double() for k in want}
    update_norm = torch.sqrt(sum(u.square().sum() for u in update.values()))
    gap_norm = torch.sqrt(sum(g.square().sum() for g in gap.values()))
    assert float(update_norm) > 0, f"{what}: the reference run did not change any weight"
    ratio = float(gap_norm / update_norm)
    assert ratio <= rel, f"{what}: gap / update = {ratio:.3g} > {rel} (the runs made different updates)"
    numel = sum(u.numel() for u in update.values())
    rms_all = float(update_norm) / numel**0.5
    for k in want:
        rms_gap = float(gap[k].square().mean().sqrt())
        rms_update = float(update[k].square().mean().sqrt())
        assert rms_gap <= rel * (rms_update + rms_all), (
            f"{what}: at {k} the gap's RMS {rms_gap:.3g} exceeds {rel} x (its update's RMS {rms_update:.3g} "
            f"+ the whole update's RMS {rms_all:.3g})"
        )


def adam_first_update_norm(optimizer_state: Mapping[str, object]) -> float:
    """Norm of the first Adam(W) step ``lr · m̂ / (√v̂ + ε)`` over all parameters, from a saved optimizer state.

    For a network whose weights before the step were not saved: its first update is recovered from the moments
    the step left (weight decay, the same in both runs, is left out).
    """
    groups = optimizer_state["param_groups"]
    state = optimizer_state["state"]
    total = torch.zeros((), dtype=torch.float64)
    for group in groups:  # type: ignore[union-attr]
        beta1, beta2 = group["betas"]
        for idx in group["params"]:
            s = state.get(idx)  # type: ignore[union-attr]
            if not s:
                continue
            step = float(s["step"])
            m_hat = s["exp_avg"].double() / (1 - beta1**step)
            v_hat = s["exp_avg_sq"].double() / (1 - beta2**step)
            total += (group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])).square().sum()
    return float(total.sqrt())
