"""LayerKD: hand computation, normalisation, task weighting, teacher no-grad, errors, tiny SDXL run."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffdistill.errors import DTypeError, NonFiniteError, OptionError, ShapeError, value_checks
from diffdistill.students import LayerKD, build_student, layer_kd_loss


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Net(nn.Module):
    """``net(x, t)`` with two tappable stages and a tuple-returning block."""

    def __init__(self, width: int = 6, reentrant_checkpoint: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.mid = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, 4)
        self.reentrant_checkpoint = reentrant_checkpoint

    def forward(self, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        h = self.stem(x) if t is None else self.stem(x) * (1 + t[:, None])
        h = checkpoint(self.mid, h, use_reentrant=True) if self.reentrant_checkpoint else self.mid(h)
        return self.head(h)


def make_pair(seed: int = 0) -> tuple[Net, Net]:
    torch.manual_seed(seed)
    return Net(), Net()


def test_equals_hand_computation_with_per_layer_logs() -> None:
    student, teacher = make_pair()
    x, t, target = torch.randn(3, 4), torch.rand(3), torch.randn(3, 4)
    kd = LayerKD(student, teacher, ["stem", "mid"], output_weight=0.3, feature_weight=0.7)
    loss, logs = kd(x, t, target)
    assert kd.student_tap.features == {} and kd.teacher_tap.features == {}  # nothing kept after the step
    kd.close()
    with torch.no_grad():
        s_stem, t_stem = student.stem(x), teacher.stem(x)  # the tapped outputs (before the t scaling)
        s_mid, t_mid = student.mid(s_stem * (1 + t[:, None])), teacher.mid(t_stem * (1 + t[:, None]))
        s_out, t_out = student.head(s_mid), teacher.head(t_mid)
        task = F.mse_loss(s_out, target)
        out_kd = F.mse_loss(s_out, t_out)
        f_stem, f_mid = F.mse_loss(s_stem, t_stem), F.mse_loss(s_mid, t_mid)
        expected = task + 0.3 * out_kd + 0.7 * (f_stem + f_mid)
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(logs["task"], task)
    torch.testing.assert_close(logs["output_kd"], out_kd)
    torch.testing.assert_close(logs["feature/stem"], f_stem)
    torch.testing.assert_close(logs["feature/mid"], f_mid)
    torch.testing.assert_close(logs["feature_kd"], f_stem + f_mid)
    assert loss.dtype == torch.float32 and not logs["loss"].requires_grad
    assert all(len(m._forward_hooks) == 0 for net in (student, teacher) for m in net.modules())


def test_ssd1b_default_weights_and_normalisation() -> None:
    s_out, t_out, target = torch.zeros(2, 3), torch.ones(2, 3), torch.full((2, 3), 2.0)
    s_feats = {"a": torch.zeros(2, 5), "b": torch.zeros(2, 1, 2)}
    t_feats = {"a": torch.full((2, 5), 10.0), "b": torch.full((2, 1, 2), 0.1)}
    raw, logs = layer_kd_loss(s_out, t_out, s_feats, t_feats, target)
    assert raw.item() == pytest.approx(4.0 + 0.5 * 1.0 + 0.5 * (100.0 + 0.01))
    # Per-layer normalisation: each term divided by the teacher feature's mean square -> 1 + 1.
    norm, logs = layer_kd_loss(s_out, t_out, s_feats, t_feats, target, normalize=True)
    assert norm.item() == pytest.approx(4.0 + 0.5 + 0.5 * 2.0, rel=1e-5)
    assert logs["feature/a"].item() == pytest.approx(1.0, rel=1e-5)
    assert logs["feature/b"].item() == pytest.approx(1.0, rel=1e-5)
    # No target: pure KD (task term 0).
    kd_only, logs = layer_kd_loss(s_out, t_out, {}, {})
    assert kd_only.item() == pytest.approx(0.5) and logs["task"].item() == 0.0


def test_task_weighting_never_drops_kd_terms() -> None:
    """The min-SNR branch of distill_sdxl.py dropped both KD terms; here weights scale the task only."""
    student, teacher = make_pair(1)
    x, t, target = torch.randn(4, 4), torch.rand(4), torch.randn(4, 4)
    with LayerKD(student, teacher, ["stem", "mid"]) as kd:
        _, plain = kd(x, t, target)
        snr_weight = torch.tensor([0.1, 0.5, 1.0, 5.0])
        _, logs = kd(x, t, target, task_weight=snr_weight)
        zero, logs_zero = kd(x, t, target, task_weight=torch.zeros(4))
    per_sample = (student(x, t) - target).pow(2).mean(dim=1).detach()
    torch.testing.assert_close(logs["task"], (snr_weight * per_sample).mean())
    torch.testing.assert_close(logs["output_kd"], plain["output_kd"])
    torch.testing.assert_close(logs["feature_kd"], plain["feature_kd"])
    assert logs_zero["task"].item() == 0.0
    torch.testing.assert_close(zero.detach(), 0.5 * plain["output_kd"] + 0.5 * plain["feature_kd"])
    assert zero.item() > 0.0
    with pytest.raises(
        ShapeError, match=r"Expected `task_weight` to have shape \(4,\) \(one weight per sample\)"
    ):
        layer_kd_loss(
            torch.zeros(4, 2), torch.zeros(4, 2), {}, {}, torch.zeros(4, 2), task_weight=torch.ones(3)
        )


def test_teacher_runs_under_no_grad_and_only_student_gets_gradients() -> None:
    student, teacher = make_pair(2)
    grad_enabled = []
    teacher.stem.register_forward_hook(lambda *a: grad_enabled.append(torch.is_grad_enabled()))
    with LayerKD(student, teacher, ["stem", "mid"]) as kd:
        loss, _ = kd(torch.randn(2, 4), torch.rand(2), torch.randn(2, 4))
    loss.backward()
    assert grad_enabled == [False]
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert list(kd.parameters()) == [] and kd.student is student and kd.teacher is teacher
    assert "layers=2" in repr(kd)


def test_shape_mismatch_names_both_modules() -> None:
    torch.manual_seed(0)
    student, teacher = Net(width=6), Net(width=8)
    kd = LayerKD(student, teacher, {"mid": "stem"})  # a renamed pair: teacher `mid`, student `stem`
    with pytest.raises(
        ShapeError,
        match=r"teacher feature `mid` and student feature `stem` to have the same shape, but got teacher "
        r"\(2, 8\) and student \(2, 6\)",
    ):
        kd(torch.randn(2, 4), None)
    kd.close()
    with LayerKD(student, Net(width=6), {"mid": "stem"}) as kd:  # same shapes: a valid renamed pair
        _, logs = kd(torch.randn(2, 4), None)
    assert "feature/stem" in logs
    with pytest.raises(
        ShapeError, match=r"Expected `student_output` and `teacher_output` to have the same shape"
    ):
        layer_kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), {}, {})
    with pytest.raises(OptionError, match=r"the student lacks \['b'\] and the teacher lacks \['a'\]"):
        layer_kd_loss(torch.zeros(2), torch.zeros(2), {"a": torch.zeros(2)}, {"b": torch.zeros(2)})
    with pytest.raises(OptionError, match=r"Expected `output_weight` to be >= 0"):
        LayerKD(student, teacher, ["stem"], output_weight=-1.0)
    with pytest.raises(
        OptionError, match=r"Expected 'head2' in `layers` to name a sub-module of the student Net"
    ):
        LayerKD(student, teacher, ["head2"])
    # A teacher name that does not resolve (mapping form): no hook is left behind on the student.
    with pytest.raises(OptionError, match=r"'bodyy'"):
        LayerKD(student, teacher, {"bodyy": "stem"})
    assert all(not m._forward_hooks for m in student.modules())


def test_warns_when_a_student_feature_has_no_graph(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    student, teacher = Net(reentrant_checkpoint=True), Net()
    with (
        caplog.at_level(logging.WARNING, logger="diffdistill.students.layer_kd"),
        LayerKD(student, teacher, ["mid.0"]) as kd,
    ):
        kd(torch.randn(2, 4), None, torch.randn(2, 4))
        kd(torch.randn(2, 4), None, torch.randn(2, 4))
    assert sum("has no autograd graph" in r.message for r in caplog.records) == 1


def test_tiny_sdxl_ssd1b_student_with_report_pairs() -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    teacher = diffusers.UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=[1, 2],
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=8,
        use_linear_projection=True,
    ).requires_grad_(False)
    student, report = build_student(teacher, "ssd-1b")
    pairs = report.kd_pairs("sub_block")
    assert pairs["mid_block"] == "mid_block.resnets.0"
    x = torch.randn(2, 4, 16, 16)
    cond = {
        "encoder_hidden_states": torch.randn(2, 3, 32),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 32), "time_ids": torch.rand(2, 6)},
    }
    with LayerKD(student, teacher, pairs) as kd:
        loss, logs = kd(x, torch.tensor([999, 500]), torch.randn_like(x), **cond)
        loss.backward()
    assert {f"feature/{s}" for s in pairs.values()} <= set(logs)
    # Kept modules start from the teacher's weights, so all but the changed layers match closely.
    assert logs["feature/down_blocks.0.resnets.0"].item() == 0.0
    assert logs["feature/mid_block.resnets.0"].item() > 0.0  # the student's mid has no attention
    assert student.conv_in.weight.grad is not None
    assert all(len(m._forward_hooks) == 0 for m in student.modules())


# --- bad inputs (issue 18): refused at the boundary, with the argument's name and a fix ---

_NAN = float("nan")


def _kd_args(**changes):
    args = {
        "student_output": torch.zeros(2, 4),
        "teacher_output": torch.ones(2, 4),
        "student_features": {"f": torch.zeros(2, 3)},
        "teacher_features": {"f": torch.ones(2, 3)},
        "target": torch.ones(2, 4),
    }
    args.update(changes)
    return args


@pytest.mark.parametrize(
    ("changes", "kwargs", "error", "match"),
    [
        # integer / bool tensors: a finite number before
        (
            {"student_output": torch.zeros(2, 4, dtype=torch.long)},
            {},
            DTypeError,
            r"`student_output` to be a floating",
        ),
        (
            {"teacher_output": torch.ones(2, 4, dtype=torch.bool)},
            {},
            DTypeError,
            r"`teacher_output` to be a floating",
        ),
        ({"target": torch.ones(2, 4, dtype=torch.long)}, {}, DTypeError, r"`target` to be a floating-point"),
        (
            {"student_features": {"f": torch.zeros(2, 3, dtype=torch.long)}},
            {},
            DTypeError,
            r"`student_features\['f'\]` to be a floating-point",
        ),
        (
            {"student_features": {"f": [0.0]}},
            {},
            DTypeError,
            r"`student_features\['f'\]` to be a torch.Tensor",
        ),
        ({"student_features": None}, {}, DTypeError, r"`student_features` to be a dict \{key: tensor\}"),
        # empty batch: NaN before
        (
            {
                "student_output": torch.zeros(0, 4),
                "teacher_output": torch.zeros(0, 4),
                "target": torch.zeros(0, 4),
            },
            {},
            ShapeError,
            r"`student_output` to hold at least one sample",
        ),
        (
            {"student_features": {"f": torch.zeros(0, 3)}, "teacher_features": {"f": torch.zeros(0, 3)}},
            {},
            ShapeError,
            r"`student_features\['f'\]` to hold at least one sample",
        ),
        # non-finite values: a NaN / inf loss before
        ({"student_output": torch.full((2, 4), _NAN)}, {}, NonFiniteError, r"`student_output` to be finite"),
        (
            {"teacher_output": torch.full((2, 4), float("inf"))},
            {},
            NonFiniteError,
            r"`teacher_output` to be finite",
        ),
        ({"target": torch.full((2, 4), _NAN)}, {}, NonFiniteError, r"`target` to be finite"),
        (
            {"teacher_features": {"f": torch.full((2, 3), _NAN)}},
            {},
            NonFiniteError,
            r"`teacher_features\['f'\]` to be finite",
        ),
        ({}, {"task_weight": torch.tensor([1.0, _NAN])}, NonFiniteError, r"`task_weight` to be finite"),
        # shapes that would broadcast, weights that would be ignored or reward the error
        (
            {"target": torch.ones(2, 1)},
            {},
            ShapeError,
            r"`target` to have the shape of the student's prediction",
        ),
        (
            {"target": None},
            {"task_weight": torch.ones(2)},
            OptionError,
            r"Expected `target` with `task_weight`",
        ),
        ({}, {"task_weight": torch.tensor([1.0, -1.0])}, OptionError, r"Expected `task_weight` to be >= 0"),
        ({}, {"task_weight": torch.ones(2, dtype=torch.long)}, DTypeError, r"`task_weight` to be a floating"),
        # options
        (
            {},
            {"output_weight": "0.5"},
            DTypeError,
            r"Expected `output_weight` to be a real number, but got str",
        ),
        ({}, {"feature_weight": _NAN}, OptionError, r"Expected `feature_weight` to be a finite number"),
        ({}, {"eps": 0.0}, OptionError, r"Expected `eps` to be > 0.0, but got 0.0"),
        ({}, {"normalize": "yes"}, DTypeError, r"Expected `normalize` to be True or False"),
        ({}, {"distance": 3}, DTypeError, r"Expected `distance` to be one of \['mse'"),
    ],
)
def test_layer_kd_loss_refuses_bad_inputs(changes, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        layer_kd_loss(**_kd_args(**changes), **kwargs)


def test_layer_kd_loss_value_checks_can_be_switched_off() -> None:
    with value_checks(False):  # no device synchronisation: the NaN propagates
        loss, _ = layer_kd_loss(**_kd_args(student_output=torch.full((2, 4), _NAN)))
    assert loss.isnan()


def test_layer_kd_refuses_bad_arguments() -> None:
    student, teacher = make_pair()
    with pytest.raises(DTypeError, match=r"Expected `teacher` to be a torch.nn.Module, but got NoneType"):
        LayerKD(student, None, ["stem"])  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"Expected `layers` to name at least one module, but it is empty"):
        LayerKD(student, teacher, [])
    with pytest.raises(OptionError, match=r"Expected `layers` to pair at least one module"):
        LayerKD(student, teacher, {})
    with pytest.raises(DTypeError, match=r"Expected `layers` to be a module name or a list .* got NoneType"):
        LayerKD(student, teacher, None)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"'mid' in `layers` to name a sub-module of the teacher Linear"):
        LayerKD(student, nn.Linear(4, 4), ["mid"])
    with pytest.raises(OptionError, match=r"each student module to appear once in `layers`.*'stem'"):
        LayerKD(student, teacher, {"stem": "stem", "mid": "stem"})  # one dropped silently before
    with pytest.raises(OptionError, match=r"Expected `eps` to be > 0.0"):
        LayerKD(student, teacher, ["stem"], eps=-1.0)
    assert all(not m._forward_hooks for net in (student, teacher) for m in net.modules())


def test_layer_kd_call_refuses_bad_inputs() -> None:
    student, teacher = make_pair()
    with LayerKD(student, teacher, ["stem", "mid"]) as kd:
        with pytest.raises(
            DTypeError, match=r"Expected `sample` to be a floating-point tensor, but got dtype torch.int64"
        ):
            kd(torch.ones(2, 4, dtype=torch.long), None)
        with pytest.raises(ShapeError, match=r"Expected `sample` to hold at least one sample"):
            kd(torch.zeros(0, 4), None)  # NaN loss before
        with pytest.raises(NonFiniteError, match=r"Expected `sample` to be finite"):
            kd(torch.full((2, 4), _NAN), None)
        # torch's "mat1 and mat2 must have the same dtype" named neither the argument nor a fix
        with pytest.raises(
            DTypeError,
            match=r"`teacher` failed on `sample` of dtype torch.(bfloat16|float64) .*cast `sample`",
        ):
            kd(torch.zeros(2, 4, dtype=torch.bfloat16), None)
        with pytest.raises(DTypeError, match=r"Expected `teacher_fn` to be callable"):
            kd(torch.zeros(2, 4), None, teacher_fn="teacher")
        with pytest.raises(
            ShapeError, match=r"Expected `target` to have the shape of the student's prediction"
        ):
            kd(torch.zeros(2, 4), None, torch.zeros(2, 1))
        with value_checks(False):
            loss, _ = kd(torch.full((2, 4), _NAN), None)
        assert loss.isnan()
    with pytest.raises(OptionError, match=r"Expected an open LayerKD, but it is closed"):
        kd(torch.zeros(2, 4), None)  # recorded no features after close: output KD only, silently, before


def test_layer_kd_refuses_the_student_as_its_own_teacher_and_modules_that_did_not_run() -> None:
    student, _ = make_pair()
    with (
        LayerKD(student, student, ["stem"]) as kd,
        pytest.raises(OptionError, match=r"`teacher` is the student itself"),
    ):
        kd(torch.zeros(2, 4), None)  # a zero KD loss before

    class Skip(Net):
        def forward(self, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
            return self.head(self.stem(x))  # `mid` never runs

    student, teacher = make_pair()
    with (
        LayerKD(Skip(), teacher, ["mid"]) as kd,
        pytest.raises(OptionError, match=r"every tapped student module to run .* \['mid'\] did not"),
    ):
        kd(torch.zeros(2, 4), None)


@pytest.mark.parametrize("distance", ["mse", "l1", "pseudo_huber"])
def test_teacher_run_under_inference_mode(distance: str) -> None:
    """A teacher run under ``torch.inference_mode()`` gives inference tensors, which autograd may not save: every
    distance must still train the student (the fused MSE saved the teacher tensor as it was)."""
    student_out = torch.randn(2, 4, requires_grad=True)
    feat = torch.randn(2, 3, requires_grad=True)
    with torch.inference_mode():
        teacher_out, teacher_feat = torch.randn(2, 4), torch.randn(2, 3)
    loss, _ = layer_kd_loss(student_out, teacher_out, {"f": feat}, {"f": teacher_feat}, distance=distance)
    loss.backward()
    assert student_out.grad is not None and feat.grad is not None
    plain, _ = layer_kd_loss(
        student_out, teacher_out.clone(), {"f": feat}, {"f": teacher_feat.clone()}, distance=distance
    )
    torch.testing.assert_close(loss.detach(), plain.detach(), atol=0, rtol=0)


def test_float64_stays_float64_in_every_term() -> None:
    """Task weights and normalisation used to compute in float32 for float64 inputs."""
    g = torch.Generator().manual_seed(0)
    s_out, t_out, target = (torch.randn(3, 4, dtype=torch.float64, generator=g) for _ in range(3))
    s_feat, t_feat = (torch.randn(3, 5, dtype=torch.float64, generator=g) for _ in range(2))
    weight = torch.tensor([0.1, 1.0, 3.0], dtype=torch.float64)
    loss, logs = layer_kd_loss(
        s_out, t_out, {"f": s_feat}, {"f": t_feat}, target, task_weight=weight, normalize=True, distance="l1"
    )
    task = (weight * (s_out - target).abs().mean(1)).mean()
    output_kd = (s_out - t_out).abs().mean()
    feature = (s_feat - t_feat).abs().mean() / (t_feat.pow(2).mean() + 1e-8)
    assert loss.dtype == torch.float64 and logs["task"].dtype == torch.float64
    torch.testing.assert_close(loss, task + 0.5 * output_kd + 0.5 * feature, atol=0, rtol=1e-14)
