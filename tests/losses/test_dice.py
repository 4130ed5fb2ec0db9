"""Tests of diffdistill.losses.dice and diffdistill.losses.soft_labels.

Reference vectors come from the official JDTLosses code (../shared/vectors/dice, see
../shared/reference/dice.md); independent checks recompute the losses from their definitions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from diffdistill import _checks
from diffdistill.errors import DTypeError, NonFiniteError, OptionError, ShapeError, value_checks
from diffdistill.losses import (
    DiceSemimetricLoss,
    boundary_label_smoothing,
    dice_semimetric_loss,
    multi_rater_soft_labels,
    teacher_soft_labels,
    uniform_label_smoothing,
)

VECTORS = Path(__file__).resolve().parent / "data" / "dice"  # copied from ../shared/vectors/dice
MANIFEST = VECTORS / "manifest.json"
CASES = json.loads(MANIFEST.read_text())["cases"] if MANIFEST.exists() else []
needs_vectors = pytest.mark.skipif(
    not CASES, reason="reference vectors (tests/losses/data/dice) not available"
)

# Golden values pinned inline so CI checks parity even without the shared folder (manifest "expected_loss").
GOLDEN = {1: 0.6951112199944962, 2: 0.7713182967128344, 11: 0.7140380872219659, 18: 0.6537828588625425}


def _load(case: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(VECTORS / case["file"]))


def _map_case(
    case: dict[str, Any], data: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, Any], str]:
    """Map the manifest's official constructor arguments onto our options.

    Returns (input tensor, options, name of the reference gradient tensor).
    """
    kwargs = dict(case["constructor_kwargs"])
    impl = case["impl"]
    options: dict[str, Any] = {}
    if impl == "jdt_head":  # JDTLoss @ 68ce8ac: class defaults alpha = beta = 1 (Jaccard), smooth = 1e-3
        options["alpha"] = kwargs.pop("alpha", 1.0)
        options["beta"] = kwargs.pop("beta", 1.0)
        weights = {
            "batch": kwargs.pop("mIoUD", 1.0),
            "image": kwargs.pop("mIoUI", 0.0),
            "class": kwargs.pop("mIoUC", 0.0),
        }
        options["aggregate"] = {k: v for k, v in weights.items() if v}
        hard = not data["label"].is_floating_point()
        mode_hard = kwargs.pop("active_classes_mode_hard", "PRESENT").lower()
        mode_soft = kwargs.pop("active_classes_mode_soft", "ALL").lower()
        options["active_classes"] = mode_hard if hard else mode_soft
        for name in ("ignore_index", "class_weights", "smooth", "gamma", "norm", "log_loss", "threshold"):
            if name in kwargs:
                options[name] = kwargs.pop(name)
        return data["logits"], options | _pop_rest(kwargs), "grad_logits"
    if impl == "jdt_2023_10":
        # Oct-2023 API: JDTLoss(from_logits=False, smooth=1.0 default, alpha/beta) called with classes="All"
        # on sigmoid probabilities = our multilabel mode on probabilities, every class active.
        options = {
            "alpha": kwargs.pop("alpha"),
            "beta": kwargs.pop("beta"),
            "from_logits": kwargs.pop("from_logits"),
            "smooth": 1.0,
            "mode": "multilabel",
            "active_classes": "all",
        }
        return data["prob"], options | _pop_rest(kwargs), "grad_prob"
    assert impl == "smp"
    # smp DiceLoss(mode="binary"): sigmoid, smooth=0, batch-level, class kept in the mean (every soft label
    # here has sum(y) > 0, so smp's "zero the loss where sum(y) == 0" never triggers; eps clamp inactive).
    assert bool((data["label"].sum() > 0).all())
    options = {"mode": kwargs.pop("mode"), "smooth": 0.0, "active_classes": "all"}
    return data["logits"], options | _pop_rest(kwargs), "grad_logits"


def _pop_rest(kwargs: dict[str, Any]) -> dict[str, Any]:
    assert not kwargs, f"unmapped official options: {kwargs}"
    return {}


@needs_vectors
@pytest.mark.parametrize("case", CASES, ids=[f"case_{c['id']:02d}" for c in CASES])
def test_reference_vectors(case: dict[str, Any]) -> None:
    data = _load(case)
    x, options, grad_key = _map_case(case, data)
    mask = data.get("keep_mask")
    x = x.clone().requires_grad_(True)
    loss = dice_semimetric_loss(x, data["label"], mask, **options)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, data["loss"], atol=1e-10, rtol=0)
    assert abs(loss.item() - case["expected_loss"]) < 1e-10
    loss.backward()
    if case["id"] == 22:
        # p == y is the kink of |p - y|; the official gradient 0 needs prob bitwise equal to the stored
        # label (their log_softmax().exp()); ours uses softmax, so only the loss is compared here and
        # test_zero_loss_and_gradient_at_soft_target checks the gradient with our own softmax.
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    else:
        torch.testing.assert_close(x.grad, data[grad_key], atol=1e-10, rtol=0)
    # float32 run against the official float32 value.
    label32 = data["label"].float() if data["label"].is_floating_point() else data["label"]
    loss32 = dice_semimetric_loss(x.detach().float(), label32, mask, **options)
    assert loss32.dtype == torch.float32
    expected32 = float(data["loss_f32"])
    assert abs(float(loss32) - expected32) <= 1e-5 * max(abs(expected32), 1e-30) + (
        1e-7 if expected32 == 0 else 0
    )
    # Active classes: NaN entries of reduction="none" are exactly the inactive ones.
    if "dbg_active_classes_D" in data and set(options.get("aggregate", {"batch": 1})) == {"batch"}:
        per_class = dice_semimetric_loss(x.detach(), data["label"], mask, **(options | {"reduction": "none"}))
        assert torch.equal(~torch.isnan(per_class), data["dbg_active_classes_D"])
    if "dbg_active_classes_IC" in data:
        per_pair = dice_semimetric_loss(
            x.detach(), data["label"], mask, **(options | {"aggregate": "image", "reduction": "none"})
        )
        assert torch.equal(~torch.isnan(per_pair), data["dbg_active_classes_IC"])


@needs_vectors
def test_reference_case_25_through_logits() -> None:
    case = next(c for c in CASES if c["id"] == 25)
    data = _load(case)
    logits = data["logits"].clone().requires_grad_(True)
    loss = dice_semimetric_loss(logits, data["label"], mode="multilabel", smooth=1.0, active_classes="all")
    loss.backward()
    torch.testing.assert_close(loss, data["loss"], atol=1e-10, rtol=0)
    torch.testing.assert_close(logits.grad, data["grad_logits"], atol=1e-10, rtol=0)


@needs_vectors
def test_soft_label_helpers_match_official_construction() -> None:
    by_id = {c["id"]: c for c in CASES}
    d4 = _load(by_id[4])  # MR: cat(1 - fg, fg), fg = mean of 7 raters
    mr = multi_rater_soft_labels(d4["raters"].long(), num_classes=2, dtype=torch.float64)
    torch.testing.assert_close(mr, d4["label"], atol=1e-12, rtol=0)
    d5 = _load(by_id[5])  # uniform label smoothing, eps = 0.1
    torch.testing.assert_close(
        uniform_label_smoothing(d5["hard_label"], 5, 0.1, dtype=torch.float64), d5["label"], atol=0, rtol=0
    )
    d6 = _load(by_id[6])  # boundary label smoothing, eps = 0.5, k = 3, ignored label = num_classes
    ls = boundary_label_smoothing(d6["hard_label"], 4, 0.5, 3, ignore_index=4, dtype=torch.float64)
    torch.testing.assert_close(ls, d6["label"], atol=0, rtol=0)
    torch.testing.assert_close(d6["hard_label"] != 4, d6["keep_mask"])


@pytest.mark.parametrize("case_id", sorted(GOLDEN))
def test_pinned_golden_values_match_manifest(case_id: int) -> None:
    if not CASES:
        pytest.skip("manifest not available")
    assert next(c for c in CASES if c["id"] == case_id)["expected_loss"] == GOLDEN[case_id]


# ---------------------------------------------------------------------------------------------------
# Independent checks
# ---------------------------------------------------------------------------------------------------


def _data(b: int = 2, c: int = 4, spatial: tuple[int, ...] = (6, 5), seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, *spatial, generator=g, dtype=dtype)
    labels = torch.randint(0, c, (b, *spatial), generator=g)
    soft = torch.softmax(2 * torch.randn(b, c, *spatial, generator=g, dtype=dtype), dim=1)
    return logits, labels, soft


def _classic_soft_dice(prob: torch.Tensor, onehot: torch.Tensor, smooth: float, per_image: bool = False):
    """1 - (2<p,y> + 2s) / (sum p + sum y + 2s), from its textbook definition (product form)."""
    dims = (2,) if per_image else (0, 2)
    b, c = prob.shape[:2]
    p, y = prob.reshape(b, c, -1), onehot.reshape(b, c, -1)
    inter = (p * y).sum(dims)
    return 1 - (2 * inter + 2 * smooth) / (p.sum(dims) + y.sum(dims) + 2 * smooth)


def test_hard_labels_equal_classic_soft_dice() -> None:
    logits, labels, _ = _data(c=5)
    labels[labels == 3] = 0  # class 3 absent -> not "present"
    prob = torch.softmax(logits, 1)
    onehot = F.one_hot(labels, 5).movedim(-1, 1).double()
    present = onehot.sum((0, 2, 3)) > 0
    expected = _classic_soft_dice(prob, onehot, 1e-3)[present].mean()
    torch.testing.assert_close(dice_semimetric_loss(logits, labels), expected, atol=1e-12, rtol=0)
    # per image: mean over present classes of each image, then over images
    per = _classic_soft_dice(prob, onehot, 1e-3, per_image=True)
    pres = onehot.flatten(2).sum(2) > 0
    expected_i = torch.stack([per[i][pres[i]].mean() for i in range(per.shape[0])]).mean()
    torch.testing.assert_close(dice_semimetric_loss(logits, labels, aggregate="image"), expected_i)
    # norm=2 is the V-Net squared form 1 - (2<p,y> + 2s) / (|p|^2 + |y|^2 + 2s)
    inter = (prob * onehot).sum((0, 2, 3))
    vnet = 1 - (2 * inter + 2e-3) / ((prob**2).sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 2e-3)
    torch.testing.assert_close(dice_semimetric_loss(logits, labels, norm=2), vnet[present].mean())
    # ... and the fused path equals the generic path (probabilities in, from_logits=False)
    torch.testing.assert_close(
        dice_semimetric_loss(prob, labels, from_logits=False), dice_semimetric_loss(logits, labels)
    )


def test_zero_loss_and_gradient_at_soft_target() -> None:
    logits, _, soft = _data()
    logits.requires_grad_(True)
    target = torch.softmax(logits.detach(), dim=1)  # bitwise our own prediction
    loss = dice_semimetric_loss(logits, target)
    loss.backward()
    assert loss.item() == 0.0
    assert float(logits.grad.abs().max()) == 0.0
    # On probabilities: 0 iff equal (semimetric), > 0 otherwise; symmetric.
    assert float(dice_semimetric_loss(soft, soft, from_logits=False)) == 0.0
    other = torch.softmax(torch.randn_like(soft), 1)
    d_pq = dice_semimetric_loss(soft, other, from_logits=False)
    assert float(d_pq) > 1e-3
    torch.testing.assert_close(d_pq, dice_semimetric_loss(other, soft, from_logits=False))
    # The classic product-form soft Dice is NOT zero at p == y (why the semimetric exists).
    classic = 1 - 2 * (soft * soft).sum((0, 2, 3)) / (2 * soft.sum((0, 2, 3)))
    assert float(classic.mean()) > 0.1


def test_jaccard_tversky_relations() -> None:
    logits, labels, soft = _data(seed=3)
    prob = torch.softmax(logits, 1)
    for target in (labels, soft):
        dice = 1 - dice_semimetric_loss(logits, target, smooth=0.0, reduction="none", active_classes="all")
        jac = 1 - dice_semimetric_loss(
            logits, target, alpha=1.0, beta=1.0, smooth=0.0, reduction="none", active_classes="all"
        )
        torch.testing.assert_close(jac, dice / (2 - dice))  # J = D / (2 - D)
        assert bool((jac <= dice + 1e-12).all())
    # Tversky(alpha, beta)(p, y) == Tversky(beta, alpha)(y, p): swapping roles swaps FP and FN.
    t1 = dice_semimetric_loss(prob, soft, from_logits=False, alpha=0.3, beta=0.7)
    t2 = dice_semimetric_loss(soft, prob, from_logits=False, alpha=0.7, beta=0.3)
    torch.testing.assert_close(t1, t2)
    # Tversky index from its definition with soft TP = sum min(p, y) (p, y >= 0).
    tp = torch.minimum(prob, soft).sum((0, 2, 3))
    fp, fn = prob.sum((0, 2, 3)) - tp, soft.sum((0, 2, 3)) - tp
    expected = (1 - (tp + 1e-3) / (tp + 0.3 * fp + 0.7 * fn + 1e-3)).mean()
    torch.testing.assert_close(t1, expected)


def test_gamma_log_loss_class_weights_classes() -> None:
    logits, _, soft = _data(c=4, seed=5)
    base = dice_semimetric_loss(logits, soft, reduction="none")
    torch.testing.assert_close(dice_semimetric_loss(logits, soft, gamma=2.0, reduction="none"), base**2)
    torch.testing.assert_close(
        dice_semimetric_loss(logits, soft, log_loss=True, reduction="none"), -torch.log(1 - base)
    )
    w = torch.tensor([0.5, 1.0, 2.0, 0.25], dtype=torch.float64)
    torch.testing.assert_close(dice_semimetric_loss(logits, soft, class_weights=w), (base * w).mean())
    torch.testing.assert_close(
        dice_semimetric_loss(logits, soft, class_weights=w.tolist(), reduction="none"), base * w
    )
    for bad in ([-1.0, 1.0, 1.0, 1.0], [float("nan"), 1.0, 1.0, 1.0], [float("inf"), 1.0, 1.0, 1.0]):
        with pytest.raises(ValueError, match=r"Expected `class_weights` to be finite and >= 0, but got \["):
            dice_semimetric_loss(logits, soft, class_weights=bad)
    torch.testing.assert_close(dice_semimetric_loss(logits, soft, classes=[1, 3]), base[[1, 3]].mean())
    sub = dice_semimetric_loss(logits, soft, classes=range(1, 4), reduction="none")
    assert bool(torch.isnan(sub[0])) and not bool(torch.isnan(sub[1:]).any())
    # gamma < 1 stays finite at a perfect class
    perfect = dice_semimetric_loss(soft, soft, from_logits=False, gamma=0.5)
    assert float(perfect) < 1e-6


def test_aggregates_and_reduction_none() -> None:
    logits, labels, _ = _data(b=3, c=4, seed=7)
    labels[0][labels[0] == 2] = 1  # class 2 absent in image 0
    per_class = dice_semimetric_loss(logits, labels, reduction="none")
    assert per_class.shape == (4,)
    torch.testing.assert_close(dice_semimetric_loss(logits, labels), per_class.nanmean())
    pairs = dice_semimetric_loss(logits, labels, aggregate="image", reduction="none")
    assert pairs.shape == (3, 4) and bool(torch.isnan(pairs[0, 2]))
    image = dice_semimetric_loss(logits, labels, aggregate="image")
    torch.testing.assert_close(image, pairs.nanmean(1).mean())
    klass = dice_semimetric_loss(logits, labels, aggregate="class")
    torch.testing.assert_close(klass, pairs.nanmean(0).mean())
    torch.testing.assert_close(
        dice_semimetric_loss(logits, labels, aggregate="class", reduction="none"), pairs, equal_nan=True
    )
    mixed = dice_semimetric_loss(logits, labels, aggregate={"batch": 0.2, "image": 0.5, "class": 0.3})
    torch.testing.assert_close(mixed, 0.2 * per_class.nanmean() + 0.5 * image + 0.3 * klass)


def test_image_and_class_terms_follow_official_definition() -> None:
    """L_I = mean_{b: n_b > 0} sum_c M_bc / n_b and L_C = mean_{c: n_c > 0} sum_b M_bc / n_c, M = loss * active."""
    logits, labels, _ = _data(b=4, c=5, seed=29)
    labels[labels == 4] = 0  # class 4 absent everywhere
    labels[2] = 255  # image 2 fully ignored: no active class
    labels[1][labels[1] == 1] = 3  # class 1 absent in image 1
    prob = torch.softmax(logits, 1)
    keep = (labels != 255).unsqueeze(1)
    onehot = F.one_hot(labels.masked_fill(labels == 255, 0), 5).movedim(-1, 1).double() * keep
    p = prob * keep
    tp, sp, sy = (p * onehot).sum((2, 3)), p.sum((2, 3)), onehot.sum((2, 3))
    loss = 1 - (tp + 1e-3) / (tp + 0.5 * (sp - tp) + 0.5 * (sy - tp) + 1e-3)
    active = sy > 0
    m = loss * active
    n_b, n_c = active.sum(1), active.sum(0)
    l_i = torch.stack([m[b].sum() / n_b[b] for b in range(4) if n_b[b] > 0]).mean()
    l_c = torch.stack([m[:, c].sum() / n_c[c] for c in range(5) if n_c[c] > 0]).mean()
    got = dice_semimetric_loss(logits, labels, ignore_index=255, aggregate={"image": 0.25, "class": 0.75})
    torch.testing.assert_close(got, 0.25 * l_i + 0.75 * l_c)


def test_mask_and_ignore_index() -> None:
    logits, labels, soft = _data(b=2, c=3, spatial=(4, 6), seed=11)
    keep_cols = torch.tensor([True, False, True, True, False, True])
    mask = keep_cols.expand(2, 4, 6)
    for target, sub_target in ((labels, labels[..., keep_cols]), (soft, soft[..., keep_cols])):
        for aggregate in ("batch", "image", "class"):
            masked = dice_semimetric_loss(logits, target, mask, aggregate=aggregate)
            dropped = dice_semimetric_loss(logits[..., keep_cols], sub_target, aggregate=aggregate)
            torch.testing.assert_close(masked, dropped)
    with_ignore = labels.masked_fill(~mask, 255)
    torch.testing.assert_close(
        dice_semimetric_loss(logits, with_ignore, ignore_index=255),
        dice_semimetric_loss(logits, labels, mask),
    )
    # mask and ignore_index combine (logical and): the mask also drops a pixel that holds a valid label
    narrower = mask.clone()
    narrower[0, 0, 0] = False
    both = dice_semimetric_loss(logits, with_ignore, narrower, ignore_index=255)
    torch.testing.assert_close(both, dice_semimetric_loss(logits, labels, narrower))
    assert not torch.allclose(both, dice_semimetric_loss(logits, labels, mask))
    # Pixels outside the mask may hold any value, as with ignore_index (not only with it): no error, and
    # the same loss, with value checks on and off.
    for checks in (True, False):
        _checks.set_value_checks(checks)
        try:
            torch.testing.assert_close(
                dice_semimetric_loss(logits, with_ignore, mask), dice_semimetric_loss(logits, labels, mask)
            )
            binary_logits, binary = logits[:, :1], (labels > 0).long()
            torch.testing.assert_close(
                dice_semimetric_loss(binary_logits, binary.masked_fill(~mask, 255), mask, mode="binary"),
                dice_semimetric_loss(binary_logits, binary, mask, mode="binary"),
            )
        finally:
            _checks.set_value_checks(True)


def test_integer_label_dtypes() -> None:
    logits, labels, _ = _data()
    expected = dice_semimetric_loss(logits, labels)
    for dtype in (torch.int32, torch.int16, torch.uint8, torch.int8):
        torch.testing.assert_close(dice_semimetric_loss(logits, labels.to(dtype)), expected)
    with_ignore = labels.clone().to(torch.uint8)
    with_ignore[0, 0, 0] = 255
    loss = dice_semimetric_loss(logits, with_ignore, ignore_index=255)
    assert bool(torch.isfinite(loss))


def test_no_active_class_gives_zero_with_graph() -> None:
    logits, labels, soft = _data()
    logits.requires_grad_(True)
    for aggregate in ("batch", "image", "class"):
        loss = dice_semimetric_loss(
            logits, torch.full_like(labels, 255), ignore_index=255, aggregate=aggregate
        )
        assert loss.requires_grad and loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, logits)
        assert float(grad.abs().max()) == 0.0
    # soft labels with everything masked, present mode
    loss = dice_semimetric_loss(
        logits, soft, torch.zeros_like(labels, dtype=torch.bool), active_classes="present"
    )
    assert loss.item() == 0.0 and loss.requires_grad


def test_sigmoid_modes_and_temperature() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 1, 5, 5, generator=g, dtype=torch.float64)
    hard = torch.randint(0, 2, (2, 5, 5), generator=g)
    binary = dice_semimetric_loss(logits, hard, mode="binary")
    multilabel = dice_semimetric_loss(logits, hard.unsqueeze(1), mode="multilabel")
    torch.testing.assert_close(binary, multilabel)
    prob = torch.sigmoid(logits)
    tp = (prob[:, 0] * hard).sum()
    torch.testing.assert_close(binary, 1 - (2 * tp + 2e-3) / (prob.sum() + hard.sum() + 2e-3))
    # soft binary target, both target layouts
    soft = torch.rand(2, 5, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        dice_semimetric_loss(logits, soft, mode="binary"),
        dice_semimetric_loss(logits, soft[:, None], mode="binary"),
    )
    # multilabel hard ignore_index masks single elements
    multi = torch.randint(0, 2, (2, 3, 4, 4), generator=g)
    ml_logits = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    ignored = multi.clone()
    ignored[0, 1, 0, 0] = -1
    keep = ignored != -1
    a = dice_semimetric_loss(ml_logits, ignored, mode="multilabel", ignore_index=-1)
    p = torch.sigmoid(ml_logits) * keep
    y = (multi * keep).double()
    tp = (p * y).sum((0, 2, 3))
    expected = (1 - (2 * tp + 2e-3) / (p.sum((0, 2, 3)) + y.sum((0, 2, 3)) + 2e-3)).mean()
    torch.testing.assert_close(a, expected)
    # temperature divides the logits
    logits4, labels4, soft4 = _data()
    torch.testing.assert_close(
        dice_semimetric_loss(logits4, soft4, temperature=2.5), dice_semimetric_loss(logits4 / 2.5, soft4)
    )
    torch.testing.assert_close(
        dice_semimetric_loss(logits4, labels4, temperature=0.5), dice_semimetric_loss(logits4 / 0.5, labels4)
    )


def test_3d_and_1d_inputs() -> None:
    logits, labels, soft = _data(b=2, c=3, spatial=(3, 4, 5), seed=13)
    for target, flat in ((labels, labels.reshape(2, 3, 20)), (soft, soft.reshape(2, 3, 3, 20))):
        torch.testing.assert_close(
            dice_semimetric_loss(logits, target), dice_semimetric_loss(logits.reshape(2, 3, 3, 20), flat)
        )
    vec = dice_semimetric_loss(logits.reshape(2, 3, 60), labels.reshape(2, 60))
    torch.testing.assert_close(vec, dice_semimetric_loss(logits, labels))


@pytest.mark.parametrize("target_kind", ["hard", "soft"])
@pytest.mark.parametrize("batch", [False, True])
def test_monai_soft_label_dice_oracle(target_kind: str, batch: bool) -> None:
    monai_losses = pytest.importorskip("monai.losses")
    logits, labels, soft = _data(b=2, c=4, seed=17)
    smooth = 1e-3
    oracle = monai_losses.DiceLoss(
        softmax=True,
        to_onehot_y=target_kind == "hard",
        batch=batch,
        soft_label=True,
        smooth_nr=2
        * smooth,  # MONAI: (2 TP + s') / (2 TP + FP + FN + s') ; ours: (TP + s) / (TP + (FP+FN)/2 + s)
        smooth_dr=2 * smooth,
    )
    target = labels.unsqueeze(1) if target_kind == "hard" else soft
    ours = dice_semimetric_loss(
        logits,
        labels if target_kind == "hard" else soft,
        smooth=smooth,
        active_classes="all",
        aggregate="batch" if batch else "image",
    )
    torch.testing.assert_close(ours, oracle(logits, target).double(), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"aggregate": {"image": 0.5, "class": 0.5}, "class_weights": [0.5, 1.0, 2.0]},
        {"norm": 2, "log_loss": True},
        {"gamma": 2.0, "alpha": 0.3, "beta": 0.7, "temperature": 2.0},
    ],
    ids=["default", "image-class-weights", "norm2-log", "gamma-tversky-temperature"],
)
def test_gradcheck(options: dict[str, Any]) -> None:
    logits, labels, soft = _data(b=2, c=3, spatial=(3, 3), seed=19)
    labels[0, 0, 0] = 255
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    mask[1, 2, :] = False
    logits.requires_grad_(True)

    def hard_fn(x: torch.Tensor) -> torch.Tensor:
        return dice_semimetric_loss(x, labels, mask, ignore_index=255, **options)

    def soft_fn(x: torch.Tensor) -> torch.Tensor:
        return dice_semimetric_loss(x, soft, mask, **options)

    assert torch.autograd.gradcheck(hard_fn, (logits,))
    assert torch.autograd.gradcheck(soft_fn, (logits,))


def test_gradcheck_sigmoid_modes() -> None:
    g = torch.Generator().manual_seed(23)
    logits = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, 2, 3, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: dice_semimetric_loss(x, target, mode="multilabel"), (logits,))
    one = logits[:, :1].detach().clone().requires_grad_(True)
    hard = (target[:, 0] > 0.5).long()
    assert torch.autograd.gradcheck(lambda x: dice_semimetric_loss(x, hard, mode="binary"), (one,))


def test_fused_path_refuses_double_backward() -> None:
    logits, labels, soft = _data()
    logits.requires_grad_(True)
    (grad,) = torch.autograd.grad(dice_semimetric_loss(logits, labels), logits, create_graph=True)
    with pytest.raises(
        RuntimeError, match=r"differentiate twice a function that was marked with @once_differentiable"
    ):
        grad.sum().backward()
    # the generic (soft-label) path supports it
    (grad,) = torch.autograd.grad(dice_semimetric_loss(logits, soft), logits, create_graph=True)
    grad.pow(2).sum().backward()


def test_module_equals_function_and_buffer() -> None:
    logits, labels, soft = _data(c=3)
    options = {
        "aggregate": {"batch": 0.5, "image": 0.5},
        "alpha": 0.4,
        "beta": 0.6,
        "class_weights": [1.0, 2.0, 0.3],  # 0.3: not a bf16 number
    }
    module = DiceSemimetricLoss(**options)
    assert "class_weights" in dict(module.named_buffers())
    assert "class_weights" in module.state_dict()
    for target in (labels, soft):
        torch.testing.assert_close(module(logits, target), dice_semimetric_loss(logits, target, **options))
    # a narrowing cast of a model holding the loss leaves the weights exact (audit 13: bf16 rounded them, the
    # loss moved by ~5e-4 relative); a widening one follows
    want = dice_semimetric_loss(logits, labels, **options)
    for dtype in (torch.bfloat16, torch.float16):
        cast = DiceSemimetricLoss(**options).to(dtype)
        assert cast.class_weights is not None and cast.class_weights.dtype == torch.float32
        assert torch.equal(cast(logits, labels), want)
    module = module.to(torch.float64)
    assert module.class_weights is not None and module.class_weights.dtype == torch.float64
    assert "alpha=0.4" in repr(module)
    plain = DiceSemimetricLoss()
    assert plain.class_weights is None
    torch.testing.assert_close(plain(logits, labels), dice_semimetric_loss(logits, labels))


@pytest.mark.compile
@pytest.mark.parametrize("target_kind", ["hard", "soft"])
def test_torch_compile_fullgraph(target_kind: str) -> None:
    torch._dynamo.reset()
    logits, labels, soft = _data(b=2, c=3, dtype=torch.float32)
    labels[0, 0, 0] = 255
    target = labels if target_kind == "hard" else soft
    mask = torch.ones(labels.shape, dtype=torch.bool)
    mask[0, 1] = False
    options = {
        "ignore_index": 255,
        "aggregate": {"batch": 1.0, "image": 0.5},
        "class_weights": [1.0, 2.0, 1.0],
    }

    def fn(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return dice_semimetric_loss(x, y, m, **options)

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    eager = fn(x1, target, mask)
    out = compiled(x2, target, mask)
    torch.testing.assert_close(out, eager)
    eager.backward()
    out.backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    # nothing active: 0 without a Python branch
    empty = compiled(logits, torch.full_like(labels, 255), mask) if target_kind == "hard" else None
    if empty is not None:
        assert empty.item() == 0.0
    module = torch.compile(DiceSemimetricLoss(**options), fullgraph=True, backend="eager")
    torch.testing.assert_close(module(logits, target, mask), eager.detach())


def test_precision_bf16_autocast_half_and_float64() -> None:
    logits, labels, soft = _data(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.nn.Conv2d(4, 4, 1)(logits)  # produces bfloat16 under autocast
        assert x.dtype == torch.bfloat16
        for target in (labels, soft.to(torch.bfloat16)):
            loss = dice_semimetric_loss(x, target)
            assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))
            loss.backward(retain_graph=True)
    half = dice_semimetric_loss(logits.half(), labels)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, dice_semimetric_loss(logits.half().float(), labels))
    assert dice_semimetric_loss(logits.double(), labels).dtype == torch.float64


def test_value_checks_can_be_disabled() -> None:
    logits, labels, _ = _data()
    bad = labels.clone()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"Expected `target` class indices in \[0, 4\)"):
        dice_semimetric_loss(logits, bad)
    _checks.set_value_checks(False)
    try:
        # Unchecked, the bad label reaches the indexing op itself (torch's error, not the check's).
        with pytest.raises(RuntimeError, match="out of bounds"):
            dice_semimetric_loss(logits, bad)
        unchecked = dice_semimetric_loss(logits, torch.full((2, 4, 6, 5), 0.5, dtype=torch.float64))
        assert bool(torch.isfinite(unchecked))  # soft labels summing to 2 over C: computed, not refused
    finally:
        _checks.set_value_checks(True)


try:  # property-based check against a direct transcription of the norm formulas
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None


if given is not None:

    @settings(max_examples=15, deadline=None)
    @given(
        b=st.integers(1, 3),
        c=st.integers(1, 4),
        n=st.integers(1, 7),
        alpha=st.floats(0.0, 2.0),
        beta=st.floats(0.0, 2.0),
        norm=st.sampled_from([1, 2]),
        seed=st.integers(0, 2**16),
    )
    def test_matches_norm_definition(
        b: int, c: int, n: int, alpha: float, beta: float, norm: int, seed: int
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(b, c, n, generator=g, dtype=torch.float64)
        labels = torch.randint(0, c, (b, n), generator=g)
        prob = torch.softmax(logits, 1)
        onehot = F.one_hot(labels, c).movedim(-1, 1).double()
        for y, present in ((onehot, onehot.amax((0, 2)) > 0.01), (torch.softmax(logits.flip(0), 1), None)):
            card = lambda v: (v.abs() ** norm).sum((0, 2))  # noqa: E731
            tp = (card(prob) + card(y) - card(prob - y)) / 2
            fp, fn = card(prob) - tp, card(y) - tp
            loss_c = 1 - (tp + 1e-3) / (tp + alpha * fp + beta * fn + 1e-3)
            expected = loss_c.mean() if present is None else loss_c[present].mean()
            target = labels if present is not None else y
            got = dice_semimetric_loss(logits, target, alpha=alpha, beta=beta, norm=norm)
            torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------
# Soft-label helpers
# ---------------------------------------------------------------------------------------------------


def test_soft_label_helpers_properties() -> None:
    labels = torch.randint(0, 3, (2, 5, 4, 6))  # 3D
    labels[0, 0, 0, 0] = 255
    for soft in (
        uniform_label_smoothing(labels, 3, 0.2, ignore_index=255),
        boundary_label_smoothing(labels, 3, 0.5, 3, ignore_index=255),
    ):
        assert soft.shape == (2, 3, 5, 4, 6)
        sums = soft.sum(1)
        assert float(sums[0, 0, 0, 0]) == 0.0
        kept = labels != 255
        torch.testing.assert_close(sums[kept], torch.ones(int(kept.sum())))
        assert bool((soft.argmax(1)[kept] == labels[kept]).all())
    # a single-class volume has no boundary
    flat = torch.zeros(1, 4, 4, dtype=torch.long)
    torch.testing.assert_close(boundary_label_smoothing(flat, 2), F.one_hot(flat, 2).movedim(-1, 1).float())
    # weighted raters, sequence input, pixels nobody labelled
    r1, r2 = torch.tensor([[0, 1, 255]]), torch.tensor([[1, 1, 255]])
    mr = multi_rater_soft_labels([r1, r2], 2, weights=[3.0, 1.0], ignore_index=255)
    torch.testing.assert_close(mr[0], torch.tensor([[0.75, 0.0, 0.0], [0.25, 1.0, 0.0]]))
    teacher = torch.randn(2, 3, 4, 4)
    t = teacher_soft_labels(teacher, 2.0)
    torch.testing.assert_close(t, torch.softmax(teacher / 2.0, 1))
    assert not t.requires_grad
    torch.testing.assert_close(teacher_soft_labels(teacher, mode="multilabel"), torch.sigmoid(teacher))
    assert teacher_soft_labels(teacher.half()).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# Error messages
# ---------------------------------------------------------------------------------------------------


def test_errors_on_label_values() -> None:
    logits, labels, _ = _data(c=4)
    bad = labels.clone()
    bad[0, 0, 0] = 255
    with pytest.raises(
        ValueError, match=r"class indices in \[0, 4\), but 1 value\(s\) are outside, e\.g\. \[255\]"
    ):
        dice_semimetric_loss(logits, bad)
    with pytest.raises(ValueError, match=r"pass ignore_index=<that value> or a `mask`"):
        dice_semimetric_loss(logits, bad)
    bad[0, 0, 1] = -1
    with pytest.raises(ValueError, match=r"e\.g\. \[-1\]\. Pixels equal to ignore_index=255 are skipped"):
        dice_semimetric_loss(logits, bad, ignore_index=255)
    with pytest.raises(ValueError, match=r"binary labels \(0 or 1\) in \[0, 2\)"):
        dice_semimetric_loss(logits[:, :1], torch.full_like(labels, 2), mode="binary")


def test_errors_on_soft_targets_and_input_values() -> None:
    logits, _, soft = _data()
    with pytest.raises(ValueError, match=r"sum to 1 over the class dimension \(dim 1\).*off by up to 1"):
        dice_semimetric_loss(logits, torch.full_like(soft, 0.5))
    with pytest.raises(
        ValueError, match=r"soft `target` values in \[0, 1\], but 1 value\(s\) are outside \(0 NaN"
    ):
        bad = soft.clone()
        bad[0, 0, 0, 0] = 1.5
        dice_semimetric_loss(logits, bad, mode="multilabel")
    with pytest.raises(ValueError, match=r"\(1 NaN"):
        bad = soft.clone()
        bad[0, 0, 0, 0] = float("nan")
        dice_semimetric_loss(logits, bad)
    # masked-out pixels may hold anything
    junk = soft.clone()
    junk[:, :, 0] = 0.0
    mask = torch.ones(2, 6, 5, dtype=torch.bool)
    mask[:, 0] = False
    dice_semimetric_loss(logits, junk, mask)
    for value in (float("nan"), float("inf")):
        bad_logits = logits.clone()
        bad_logits[1, 2, 3, 4] = value
        with pytest.raises(
            ValueError, match=r"`input` to be finite, but it holds 1 NaN/Inf value\(s\) out of 240"
        ):
            dice_semimetric_loss(bad_logits, soft)
    with pytest.raises(ValueError, match=r"`input` probabilities in \[0, 1\] with from_logits=False"):
        dice_semimetric_loss(logits, soft, from_logits=False)


def test_errors_on_shapes_and_dtypes() -> None:
    logits, labels, soft = _data(c=4)
    with pytest.raises(ShapeError, match=r"got `input` \(2, 4, 6, 5\) and `target` \(2, 6, 4\)"):
        dice_semimetric_loss(logits, labels[:, :, :4])
    with pytest.raises(ShapeError, match=r"got `input` \(2, 4, 6, 5\) and `target` \(2, 3, 6, 5\)"):
        dice_semimetric_loss(logits, soft[:, :3])
    with pytest.raises(
        ShapeError, match=r"mode='multilabel' expects .* got `input` \(2, 4, 6, 5\) and `target` \(2, 6, 5\)"
    ):
        dice_semimetric_loss(logits, labels, mode="multilabel")
    with pytest.raises(ShapeError, match=r"mode='binary' expects one channel.*got shape \(2, 4, 6, 5\)"):
        dice_semimetric_loss(logits, labels, mode="binary")
    with pytest.raises(ShapeError, match=r"mode='binary' expects `target` .* `target` \(2, 2, 6, 5\)"):
        dice_semimetric_loss(logits[:, :1], soft[:, :2], mode="binary")
    with pytest.raises(
        ShapeError, match=r"`mask` of shape \(B, \*spatial\) = \(2, 6, 5\) .* got `mask` \(2, 1, 6, 5\)"
    ):
        dice_semimetric_loss(logits, labels, torch.ones(2, 1, 6, 5, dtype=torch.bool))
    with pytest.raises(DTypeError, match=r"`mask` to be a bool tensor .* got dtype torch\.int64"):
        dice_semimetric_loss(logits, labels, torch.ones(2, 6, 5, dtype=torch.long))
    with pytest.raises(
        DTypeError, match=r"`input` to be a floating-point tensor, but got dtype torch\.int64"
    ):
        dice_semimetric_loss(labels[:, None], labels)
    with pytest.raises(DTypeError, match=r"Expected `target` to be a torch\.Tensor, but got list"):
        dice_semimetric_loss(logits, labels.tolist())
    with pytest.raises(ShapeError, match=r"`input` laid out as \(B, C, \*spatial\), but got shape \(4\)"):
        dice_semimetric_loss(torch.zeros(4), labels)
    with pytest.raises(ShapeError, match=r"`class_weights` of length C = 4 .* got shape \(3\)"):
        dice_semimetric_loss(logits, labels, class_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ShapeError, match=r"`class_weights` to be one-dimensional"):
        DiceSemimetricLoss(class_weights=[[1.0, 2.0]])
    with pytest.raises(
        OptionError,
        match=r"`classes` to be a non-empty list of channel indices in \[0, 4\), but got \[0, 4\]",
    ):
        dice_semimetric_loss(logits, labels, classes=[0, 4])
    with pytest.raises(DTypeError, match=r"integer or real floating tensor, but got torch\.complex64"):
        dice_semimetric_loss(logits, soft.to(torch.complex64))


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        (
            {"mode": "softmax"},
            OptionError,
            r"`mode` to be one of \['multiclass', 'multilabel', 'binary'\], but got 'softmax'",
        ),
        (
            {"aggregate": "dataset"},
            OptionError,
            r"`aggregate` to be one of \['batch', 'image', 'class'\], but got 'dataset'",
        ),
        (
            {"aggregate": {"pixel": 1.0}},
            OptionError,
            r"keys of `aggregate` to be among .* but got \['pixel'\]",
        ),
        (
            {"aggregate": {"image": -1.0}},
            OptionError,
            r"weights in `aggregate` to be finite, >= 0 and not all 0",
        ),
        ({"aggregate": 3}, OptionError, r"or a mapping of weights"),
        ({"aggregate": {"image": 1.0, "class": 1.0}, "reduction": "none"}, OptionError, r"mixes several"),
        ({"reduction": "sum"}, OptionError, r"`reduction` to be one of \['mean', 'none'\], but got 'sum'"),
        ({"norm": 3}, OptionError, r"`norm` to be one of \[1, 2\], but got 3"),
        ({"temperature": 0.0}, OptionError, r"`temperature` to be > 0, but got 0\.0"),
        ({"temperature": 2.0, "from_logits": False}, OptionError, r"`temperature` only divides logits"),
        ({"alpha": -0.1}, OptionError, r"`alpha` to be >= 0, but got -0\.1"),
        ({"beta": -1}, OptionError, r"`beta` to be >= 0, but got -1"),
        ({"gamma": 0}, OptionError, r"`gamma` to be > 0, but got 0"),
        ({"smooth": -1e-3}, OptionError, r"`smooth` to be >= 0"),
        ({"threshold": 1.5}, OptionError, r"`threshold` to lie in \[0, 1\], but got 1\.5"),
        (
            {"active_classes": "some"},
            OptionError,
            r"`active_classes` to be one of \['present', 'all', None\]",
        ),
        ({"ignore_index": 2.5}, DTypeError, r"`ignore_index` to be an int or None, but got float 2\.5"),
        ({"from_logits": 1}, DTypeError, r"`from_logits` to be True or False, but got int 1"),
        ({"log_loss": "yes"}, DTypeError, r"`log_loss` to be True or False, but got str 'yes'"),
    ],
)
def test_option_errors(options: dict[str, Any], error: type[Exception], pattern: str) -> None:
    logits, labels, _ = _data()
    with pytest.raises(error, match=pattern):
        dice_semimetric_loss(logits, labels, **options)
    with pytest.raises(error, match=pattern):
        DiceSemimetricLoss(**options)


def test_soft_label_helper_errors() -> None:
    labels = torch.randint(0, 3, (2, 4, 4))
    with pytest.raises(
        DTypeError, match=r"`target` to hold integer class indices, but got dtype torch\.float32"
    ):
        uniform_label_smoothing(labels.float(), 3)
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\) or ignore_index=None, but 1 value\(s\)"):
        bad = labels.clone()
        bad[0, 0, 0] = 3
        uniform_label_smoothing(bad, 3)
    with pytest.raises(OptionError, match=r"`num_classes` to be an int >= 1, but got 0"):
        uniform_label_smoothing(labels, 0)
    with pytest.raises(OptionError, match=r"`epsilon` to lie in \[0, 1\], but got 1\.5"):
        uniform_label_smoothing(labels, 3, 1.5)
    with pytest.raises(OptionError, match=r"`kernel_size` to be an odd positive int, but got 4"):
        boundary_label_smoothing(labels, 3, kernel_size=4)
    for make in (
        lambda: uniform_label_smoothing(labels, 3, dtype=torch.long),
        lambda: boundary_label_smoothing(labels, 3, dtype=torch.int32),
        lambda: multi_rater_soft_labels(torch.stack([labels, labels]), 3, dtype=torch.long),
    ):
        with pytest.raises(DTypeError, match=r"`dtype` \(of the soft labels\) to be a floating torch.dtype"):
            make()
    with pytest.raises(ShapeError, match=r"1 to 3 spatial dimensions, but got shape \(1, 2, 2, 2, 2\)"):
        boundary_label_smoothing(torch.zeros(1, 2, 2, 2, 2, dtype=torch.long), 3)
    with pytest.raises(ShapeError, match=r"`weights` of length R = 2 .* got shape \(3,\)"):
        multi_rater_soft_labels(torch.stack([labels, labels]), 3, weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"`weights` finite, >= 0 and not all 0"):
        multi_rater_soft_labels(torch.stack([labels, labels]), 3, weights=[1.0, -1.0])
    with pytest.raises(ShapeError, match=r"`annotations` laid out as \(R, B, \*spatial\)"):
        multi_rater_soft_labels(torch.zeros(3, dtype=torch.long), 3)
    with pytest.raises(OptionError, match=r"`temperature` to be > 0, but got -1"):
        teacher_soft_labels(torch.randn(2, 3, 4), -1)
    with pytest.raises(DTypeError, match=r"`logits` to be a floating-point tensor"):
        teacher_soft_labels(labels)
    with pytest.raises(ShapeError, match=r"`logits` laid out as \(B, C, \*spatial\)"):
        teacher_soft_labels(torch.randn(3))


# ---------------------------------------------------------------------------------------------------
# Bad inputs (issue 18): empty batches, non-finite values, wrong types; every message names the argument
# ---------------------------------------------------------------------------------------------------


def _labels() -> torch.Tensor:
    return torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(0))


DICE_BAD_INPUTS: list[tuple[str, Any, type[Exception], str]] = [
    # an empty batch / class / spatial dimension: torch's "aminmax(): cannot compute ... empty" before
    (
        "empty_batch",
        lambda x, y: dice_semimetric_loss(x[:0], y[:0]),
        ShapeError,
        r"`input` to hold at least one sample, but got shape \(0, 4, 6, 5\)",
    ),
    (
        "empty_spatial",
        lambda x, y: dice_semimetric_loss(x[:, :, :0], y[:, :0]),
        ShapeError,
        r"`input` to hold at least one sample, but got shape \(2, 4, 0, 5\)",
    ),
    (
        "empty_classes",
        lambda x, y: dice_semimetric_loss(x[:, :0], y),
        ShapeError,
        r"`input` to hold at least one sample, but got shape \(2, 0, 6, 5\)",
    ),
    (
        "empty_batch_module",
        lambda x, y: DiceSemimetricLoss(aggregate="image", reduction="none")(x[:0], y[:0]),
        ShapeError,
        r"`input` to hold at least one sample",
    ),
    # classes that are not ints were truncated silently (0.5 -> class 0, "12" -> classes 1 and 2)
    (
        "classes_float",
        lambda x, y: dice_semimetric_loss(x, y, classes=[0.5]),
        OptionError,
        r"`classes` to be a non-empty list of channel indices \(ints\), but got \[0\.5\]",
    ),
    (
        "classes_str",
        lambda x, y: dice_semimetric_loss(x, y, classes="12"),
        OptionError,
        r"`classes` to be a non-empty list of channel indices \(ints\), but got str '12'",
    ),
    (
        "classes_float_module",
        lambda x, y: DiceSemimetricLoss(classes=[1.7]),
        OptionError,
        r"`classes` to be a non-empty list of channel indices \(ints\)",
    ),
    (
        "classes_float_tensor",
        lambda x, y: dice_semimetric_loss(x, y, classes=torch.tensor([1.0])),
        OptionError,
        r"`classes` .* dtype torch\.float32",
    ),
    # wrong Python types: "new(): invalid data type 'str'" / "'>' not supported between 'str' and 'int'" before
    (
        "class_weights_str",
        lambda x, y: dice_semimetric_loss(x, y, class_weights="abc"),
        DTypeError,
        r"`class_weights` to be a sequence or tensor of C numbers, but got str 'abc'",
    ),
    (
        "class_weights_str_module",
        lambda x, y: DiceSemimetricLoss(class_weights="abc"),
        DTypeError,
        r"`class_weights` to be a sequence or tensor of C numbers",
    ),
    (
        "class_weights_bool",
        lambda x, y: dice_semimetric_loss(x, y, class_weights=[True] * 4),
        DTypeError,
        r"`class_weights` to hold real numbers, but got dtype torch\.bool",
    ),
    (
        "temperature_str",
        lambda x, y: dice_semimetric_loss(x, y, temperature="2"),
        DTypeError,
        r"`temperature` to be a real number, but got str '2'",
    ),
    (
        "alpha_none",
        lambda x, y: DiceSemimetricLoss(alpha=None),
        DTypeError,
        r"`alpha` to be a real number, but got NoneType",
    ),
    # infinite options gave a constant loss (alpha=inf: 1.0, gamma=inf: 0.0)
    (
        "alpha_inf",
        lambda x, y: dice_semimetric_loss(x, y, alpha=float("inf")),
        OptionError,
        r"`alpha` to be a finite number, but got inf",
    ),
    (
        "gamma_inf",
        lambda x, y: dice_semimetric_loss(x, y, gamma=float("inf")),
        OptionError,
        r"`gamma` to be a finite number, but got inf",
    ),
    (
        "smooth_inf_module",
        lambda x, y: DiceSemimetricLoss(smooth=float("inf")),
        OptionError,
        r"`smooth` to be a finite number",
    ),
]


@pytest.mark.parametrize(
    ("case", "call", "error", "pattern"), DICE_BAD_INPUTS, ids=[c[0] for c in DICE_BAD_INPUTS]
)
def test_dice_bad_inputs(case: str, call: Any, error: type[Exception], pattern: str) -> None:
    logits, labels, _ = _data()
    with pytest.raises(error, match=pattern):
        call(logits, labels)


def test_dice_numeric_options_accept_numpy_and_0d_tensors() -> None:
    np = pytest.importorskip("numpy")
    logits, labels, _ = _data()
    expected = dice_semimetric_loss(logits, labels, alpha=0.4, classes=[1, 2])
    for alpha, classes in ((np.float64(0.4), np.array([1, 2])), (torch.tensor(0.4), torch.tensor([1, 2]))):
        got = dice_semimetric_loss(logits, labels, alpha=alpha, classes=classes)
        torch.testing.assert_close(got, expected)


def test_numpy_ignore_index_is_an_int() -> None:
    np = pytest.importorskip("numpy")
    logits, labels, _ = _data()
    labels[0, 0, 0] = 255
    torch.testing.assert_close(
        dice_semimetric_loss(logits, labels, ignore_index=np.int64(255)),
        dice_semimetric_loss(logits, labels, ignore_index=255),
    )
    torch.testing.assert_close(
        uniform_label_smoothing(labels, 4, ignore_index=np.int64(255)),
        uniform_label_smoothing(labels, 4, ignore_index=255),
    )


def test_dice_nan_input_passes_with_value_checks_off() -> None:
    logits, labels, _ = _data()
    logits[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"`input` to be finite"):
        dice_semimetric_loss(logits, labels)
    with value_checks(False):  # no device sync: the NaN propagates
        assert bool(dice_semimetric_loss(logits, labels).isnan())


SOFT_LABEL_BAD_INPUTS: list[tuple[str, Any, type[Exception], str]] = [
    # empty batches returned an empty tensor silently
    (
        "uniform_empty",
        lambda: uniform_label_smoothing(_labels()[:0], 3),
        ShapeError,
        r"`target` to hold at least one sample, but got shape \(0, 4, 4\)",
    ),
    (
        "boundary_empty",
        lambda: boundary_label_smoothing(_labels()[:0], 3),
        ShapeError,
        r"`target` to hold at least one sample",
    ),
    (
        "multi_rater_empty_batch",
        lambda: multi_rater_soft_labels(torch.stack([_labels(), _labels()])[:, :0], 3),
        ShapeError,
        r"`annotations` to hold at least one sample, but got shape \(2, 0, 4, 4\)",
    ),
    (
        "teacher_empty",
        lambda: teacher_soft_labels(torch.randn(0, 3, 4)),
        ShapeError,
        r"`logits` to hold at least one sample",
    ),
    (
        "teacher_no_class",
        lambda: teacher_soft_labels(torch.randn(2, 0, 4)),
        ShapeError,
        r"`logits` to hold at least one sample, but got shape \(2, 0, 4\)",
    ),
    # zero raters gave all-zero labels; an empty list or unequal raters failed inside torch.stack
    (
        "multi_rater_no_rater",
        lambda: multi_rater_soft_labels(torch.zeros(0, 2, 4, dtype=torch.long), 3),
        ShapeError,
        r"`annotations` to hold at least one rater's label map \(R >= 1 in dim 0\)",
    ),
    (
        "multi_rater_empty_list",
        lambda: multi_rater_soft_labels([], 3),
        ShapeError,
        r"`annotations` to hold at least one rater's label map, but got an empty sequence",
    ),
    (
        "multi_rater_unequal",
        lambda: multi_rater_soft_labels([_labels(), _labels()[:1]], 3),
        ShapeError,
        r"shape of `annotations\[0\]` \(2, 4, 4\), but got `annotations\[1\]` \(1, 4, 4\)",
    ),
    (
        "multi_rater_lists",
        lambda: multi_rater_soft_labels([[0, 1], [1, 1]], 3),
        DTypeError,
        r"`annotations\[0\]` to be a torch\.Tensor, but got list",
    ),
    (
        "multi_rater_int",
        lambda: multi_rater_soft_labels(3, 3),
        DTypeError,
        r"`annotations` to be a tensor \(R, B, \*spatial\) or a sequence of R tensors",
    ),
    (
        "multi_rater_weights_str",
        lambda: multi_rater_soft_labels(torch.stack([_labels(), _labels()]), 3, weights="ab"),
        DTypeError,
        r"`weights` to be a sequence or tensor of R = 2 numbers, but got str 'ab'",
    ),
    # a 0-d label map failed with "tuple index out of range"
    (
        "uniform_0d",
        lambda: uniform_label_smoothing(torch.tensor(1), 3),
        ShapeError,
        r"`target` laid out as \(B, \*spatial\), but got shape \(\)",
    ),
    # a fractional ignore_index was accepted and never matched
    (
        "uniform_ignore_float",
        lambda: uniform_label_smoothing(_labels(), 3, ignore_index=2.5),
        DTypeError,
        r"`ignore_index` to be an int or None, but got float 2\.5",
    ),
    (
        "multi_rater_ignore_bool",
        lambda: multi_rater_soft_labels([_labels()], 3, ignore_index=True),
        DTypeError,
        r"`ignore_index` to be an int or None, but got bool True",
    ),
    # wrong Python types: "'<=' not supported between instances of 'float' and 'str'" before
    (
        "uniform_epsilon_str",
        lambda: uniform_label_smoothing(_labels(), 3, "0.1"),
        DTypeError,
        r"`epsilon` to be a real number, but got str '0\.1'",
    ),
    (
        "boundary_epsilon_inf",
        lambda: boundary_label_smoothing(_labels(), 3, float("inf")),
        OptionError,
        r"`epsilon` to be a finite number",
    ),
    (
        "teacher_temperature_str",
        lambda: teacher_soft_labels(torch.randn(2, 3, 4), "2"),
        DTypeError,
        r"`temperature` to be a real number, but got str '2'",
    ),
    (
        "teacher_temperature_inf",
        lambda: teacher_soft_labels(torch.randn(2, 3, 4), float("inf")),
        OptionError,
        r"`temperature` to be a finite number",
    ),
    # non-finite logits gave NaN soft labels (softmax of inf)
    (
        "teacher_nan",
        lambda: teacher_soft_labels(torch.tensor([[[0.0, float("nan")]]])),
        NonFiniteError,
        r"`logits` to be finite, but it holds 1 NaN/Inf",
    ),
    (
        "teacher_inf",
        lambda: teacher_soft_labels(torch.tensor([[[0.0], [float("inf")]]])),
        NonFiniteError,
        r"`logits` to be finite",
    ),
    (
        "teacher_bool",
        lambda: teacher_soft_labels(torch.ones(2, 3, 4, dtype=torch.bool)),
        DTypeError,
        r"`logits` to be a floating-point tensor, but got dtype torch\.bool",
    ),
    # mode="binary" with C channels applied C independent sigmoids silently
    (
        "teacher_binary_channels",
        lambda: teacher_soft_labels(torch.randn(2, 3, 4), mode="binary"),
        ShapeError,
        r"mode='binary' expects one channel, `logits` \(B, 1, \*spatial\), but got shape \(2, 3, 4\)",
    ),
]


@pytest.mark.parametrize(
    ("case", "call", "error", "pattern"), SOFT_LABEL_BAD_INPUTS, ids=[c[0] for c in SOFT_LABEL_BAD_INPUTS]
)
def test_soft_label_helper_bad_inputs(case: str, call: Any, error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        call()


def test_teacher_soft_labels_nan_passes_with_value_checks_off() -> None:
    with value_checks(False):
        soft = teacher_soft_labels(torch.tensor([[[0.0, float("nan")], [1.0, 1.0]]]))
    assert bool(soft.isnan().any())
