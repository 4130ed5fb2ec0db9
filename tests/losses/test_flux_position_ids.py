"""FLUX's shared position ids without a batch dimension (audit 10, defect 2).

``FluxPipeline`` calls ``FluxTransformer2DModel`` with ``img_ids (L, 3)`` / ``txt_ids (T, 3)``, one set for the
batch. The consistency losses, lazy R1's subset and classifier-free guidance's cond / uncond concatenation pass
such 2-D ``img_ids`` / ``txt_ids`` through whole (the rule of ``concat_conditions``): each call here must equal the
same call with the ids built inside a wrapper of the model (or, for the R1 subset, in the deprecated 3-D form,
which is indexed like any batched tensor). ``L == B`` (a 2x2 token grid, batch 4) so that a shape test on dim 0
could not tell the ids from a batched tensor: the rule goes by name and rank.
"""

from __future__ import annotations

import logging

import pytest
import torch

from diffdistill.discriminators import LADDDiscriminator
from diffdistill.errors import OptionError, ShapeError
from diffdistill.losses import lazy_r1_penalty, lcm_consistency_loss, mix_and_match, tscd_loss
from diffdistill.schedulers import NoiseSchedule, TeacherSolver, concat_conditions
from tests.transformer_configs import tiny_flux_transformer

B, H, W, T_TXT = 4, 2, 2, 5
SCHED = NoiseSchedule.flow_matching(mu=1.15, timestep_scale=1.0)  # FLUX takes sigma


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.zeros(H * W, 3)
    img[:, 1] = torch.arange(H * W) // W
    img[:, 2] = torch.arange(H * W) % W
    return img, torch.zeros(T_TXT, 3)


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_transformer(guidance_embeds=False)  # real CFG: no embedded guidance


@pytest.fixture(scope="module")
def conds():
    g = torch.Generator().manual_seed(1)
    text = {
        "encoder_hidden_states": torch.randn(B, T_TXT, 16, generator=g),
        "pooled_projections": torch.randn(B, 16, generator=g),
    }
    null = {"encoder_hidden_states": torch.zeros(1, T_TXT, 16), "pooled_projections": torch.zeros(1, 16)}
    return text, null


def _nets(flux):
    img_ids, txt_ids = _ids()

    def with_ids(x, t, **kw):  # the ids come in the conditioning, as FluxPipeline passes them
        return flux(x, timestep=t, **kw).sample

    def wrapped(x, t, **kw):  # the ids built inside a wrapper of the model
        return flux(x, timestep=t, img_ids=img_ids, txt_ids=txt_ids, **kw).sample

    return with_ids, wrapped, {"img_ids": img_ids, "txt_ids": txt_ids}


def test_cfg_predict_passes_shared_ids_through(flux, conds):
    with_ids, wrapped, ids = _nets(flux)
    text, null = conds
    x = torch.randn(B, H * W, 16, generator=torch.Generator().manual_seed(0))
    got = TeacherSolver(with_ids, SCHED, guidance_scale=3.0).predict(x, 600, {**text, **ids}, {**null, **ids})
    want = TeacherSolver(wrapped, SCHED, guidance_scale=3.0).predict(x, 600, text, null)
    torch.testing.assert_close(got, want)
    # equal ids in another tensor are the same ids; other ids cannot share one batched call
    other = {k: v.clone() for k, v in ids.items()}
    both = concat_conditions({**text, **ids}, {**null, **other}, batch=B)
    assert both["img_ids"] is ids["img_ids"] and both["encoder_hidden_states"].shape[0] == 2 * B
    with pytest.raises(
        OptionError, match=r"`cond\['img_ids'\]` \(4, 3\) and `uncond\['img_ids'\]` \(4, 3\) are "
    ):
        concat_conditions({**text, **ids}, {**null, **ids, "img_ids": ids["img_ids"] + 1}, batch=B)
    # another unbatched tensor is still refused, and the message names the rule
    with pytest.raises(ShapeError, match=r"`cond\['pos'\]`.*only as 2-D `img_ids` / `txt_ids`"):
        concat_conditions({**text, "pos": torch.zeros(3, 2)}, {**null, "pos": torch.zeros(3, 2)}, batch=B)


@pytest.mark.parametrize("loss", ["lcm", "tscd"])
def test_consistency_losses_take_shared_ids(flux, conds, loss):
    with_ids, wrapped, ids = _nets(flux)
    text, null = conds
    x0 = torch.randn(B, H * W, 16, generator=torch.Generator().manual_seed(2))

    def run(net, cond, uncond):
        teacher = TeacherSolver(net, SCHED, guidance_scale=3.0)
        gen = torch.Generator().manual_seed(3)
        if loss == "lcm":
            return lcm_consistency_loss(net, teacher, x0, cond, uncond, num_ddim_timesteps=10, generator=gen)[
                0
            ]
        return tscd_loss(
            net, teacher, x0, cond, uncond, num_segments=2, num_inference_steps=4, generator=gen
        )[0]

    with torch.no_grad():
        got = run(with_ids, {**text, **ids}, {**null, **ids})
        want = run(wrapped, text, null)
    assert float(want) > 0
    torch.testing.assert_close(got, want)


def test_lazy_r1_subset_and_mix_and_match_keep_shared_ids(flux, conds, caplog):
    text, _ = conds
    img_ids, txt_ids = _ids()
    disc = LADDDiscriminator(flux, every=2, norm_groups=4)
    real = torch.randn(B, H * W, 16, generator=torch.Generator().manual_seed(4))
    base = {**text, "timestep": torch.tensor([0.3, 0.5, 0.7, 0.9]), "grid_size": (H, W)}
    shared = {**base, "img_ids": img_ids, "txt_ids": txt_ids}
    # the deprecated 3-D form (diffusers reads ids[0]) is batched and indexed like any tensor
    batched = {**base, "img_ids": img_ids.expand(B, -1, -1), "txt_ids": txt_ids.expand(B, -1, -1)}

    def r1(cond):
        return lazy_r1_penalty(
            disc, real, step=0, num_samples=2, cond=cond, generator=torch.Generator().manual_seed(5)
        )

    with caplog.at_level(logging.ERROR, logger="diffusers"):  # silence the 3-D deprecation warning
        got, got_logs = r1(shared)
        want, want_logs = r1(batched)
    assert float(want.detach()) > 0
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_logs["r1_grad_sq"], want_logs["r1_grad_sq"])
    neg = mix_and_match(real, shared, mismatch="cond", generator=torch.Generator().manual_seed(6))
    assert neg.cond["img_ids"] is img_ids and neg.cond["txt_ids"] is txt_ids
    assert torch.equal(neg.cond["pooled_projections"], text["pooled_projections"][neg.permutation])
    # ids alone are nothing to mismatch (L == B does not make them per-sample)
    with pytest.raises(OptionError, match="holds no tensor with batch size 4"):
        mix_and_match(real, {"img_ids": img_ids}, mismatch="cond")
