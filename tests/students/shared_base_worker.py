"""Worker of ``test_shared_base.py``'s 2-process tests: SharedBase views under accelerate's DDP or FSDP2 (CPU, gloo).

Run by ``torchrun --nproc_per_node 2`` (DDP: ``ACCELERATE_USE_CPU=true``; FSDP2: through
``tests/examples/sharded_cpu_launch.py``) with the output folder as its argument. Each process trains the
generator and fake-score views of one shared tiny SDXL UNet, each prepared with its own optimiser as the scripts
do, on its half of a batch for a few alternating SGD steps; rank 0 first runs the same steps in one process on
the whole batch (``reference.pt``). With ``--shard_base`` the frozen base is sharded too
(:meth:`SharedBase.fully_shard`, FSDP2 only). Each rank then writes its full adapter weights, whether the base changed, and
what a fresh base restored by ``accelerator.load_state`` from the run's ``save_state`` checkpoint holds
(``rank{r}.pt``); rank 0 also saves the generator adapter from the gathered state dict.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from diffdistill.discriminators import sdxl_conditions, tiny_sdxl_unet_config
from diffdistill.students import SharedBase, add_lora, frozen

GEN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1"]
FAKE_TARGETS = ["to_q", "to_v", "conv2"]
BATCH, STEPS, LR = 4, 3, 0.05


def build() -> SharedBase:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
    torch.manual_seed(1)
    add_lora(unet, rank=4, targets=GEN_TARGETS, adapter_name="generator", init_lora_weights=False)
    add_lora(unet, rank=2, targets=FAKE_TARGETS, adapter_name="fake", init_lora_weights=False)
    return SharedBase(unet)


def batch() -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(BATCH, 4, 16, 16, generator=g)
    t = torch.tensor([999, 700, 300, 50])
    ehs, added = sdxl_conditions(tiny_sdxl_unet_config(), BATCH, seq_len=4, generator=g)
    return x, t, {"encoder_hidden_states": ehs, "added_cond_kwargs": added}


def part(x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], rank: int, world: int) -> tuple[Any, ...]:
    n = BATCH // world
    sl = slice(rank * n, (rank + 1) * n)
    return (
        x[sl],
        t[sl],
        {
            "encoder_hidden_states": cond["encoder_hidden_states"][sl],
            "added_cond_kwargs": {k: v[sl] for k, v in cond["added_cond_kwargs"].items()},
        },
    )


def train(
    base: SharedBase, gen: Any, fake: Any, opts: tuple[Any, Any], data: tuple[Any, ...], backward: Any
) -> None:
    """Alternating SIM-like steps: the generator through the real and the (frozen) fake score, then the fake
    score on the detached samples."""
    opt_g, opt_f = opts
    x, t, cond = data
    real = base.view(None)
    for _ in range(STEPS):
        x_gen = gen(x, t, **cond, return_dict=False)[0]
        with frozen(fake):
            loss = real(x_gen, t, **cond, return_dict=False)[0] - fake(x_gen, t, **cond, return_dict=False)[0]
            backward(loss.square().mean())
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        backward((fake(x_gen.detach(), t, **cond, return_dict=False)[0] - x).square().mean())
        opt_f.step()
        opt_f.zero_grad(set_to_none=True)


def full(view: Any) -> dict[str, torch.Tensor]:
    """The adapter's weights as full tensors (FSDP2's DTensor shards gathered; a collective call)."""
    out = {}
    for name, p in view.named_parameters():
        value = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.replace("module.", "", 1) if name.startswith("module.") else name] = value.detach().clone()
    return out


def frozen_weights(base: SharedBase) -> dict[str, torch.Tensor]:
    """The base's frozen weights (full tensors: gathered where the base is sharded)."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in base.model.named_parameters()
        if "lora_" not in n
    }


def prepared(accelerator: Any, base: SharedBase) -> tuple[Any, Any, Any, Any]:
    gen, fake = base.view("generator"), base.view("fake")
    opt_g = torch.optim.SGD(gen.parameters(), lr=LR)
    opt_f = torch.optim.SGD(fake.parameters(), lr=LR)
    gen, opt_g = accelerator.prepare(gen, opt_g)
    fake, opt_f = accelerator.prepare(fake, opt_f)
    return gen, opt_g, fake, opt_f


def main(out_dir: Path, shard_base: bool = False) -> None:
    from accelerate import Accelerator
    from accelerate.state import PartialState

    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    rank, world = state.process_index, state.num_processes
    x, t, cond = batch()
    if rank == 0:  # one process on the whole batch
        ref = build()
        gen, fake = ref.view("generator"), ref.view("fake")
        start = {"generator_start": full(gen), "fake_start": full(fake)}
        opts = (torch.optim.SGD(gen.parameters(), lr=LR), torch.optim.SGD(fake.parameters(), lr=LR))
        train(ref, gen, fake, opts, (x, t, cond), lambda loss: loss.backward())
        torch.save({"generator": full(gen), "fake": full(fake), **start}, out_dir / "reference.pt")
    state.wait_for_everyone()

    accelerator = Accelerator()
    base = build()
    if shard_base:
        base.fully_shard()
    before = frozen_weights(base)
    gen, opt_g, fake, opt_f = prepared(accelerator, base)
    train(base, gen, fake, (opt_g, opt_f), part(x, t, cond, rank, world), accelerator.backward)
    result: dict[str, Any] = {
        "kind": str(accelerator.distributed_type).rsplit(".", 1)[-1],
        "base_unchanged": all(torch.equal(p, before[n]) for n, p in frozen_weights(base).items()),
        "generator": full(gen),
        "fake": full(fake),
        # the prepared views' parameters are the base's LoRA parameters (FSDP2: the DTensor shards it installed)
        "shared": {p for p in gen.parameters()}
        == {p for n, p in base.model.named_parameters() if ".generator." in n},
        "sharded": all(type(p).__name__ == "DTensor" for p in [*gen.parameters(), *fake.parameters()]),
        "base_sharded": all(
            type(p).__name__ == "DTensor" for n, p in base.model.named_parameters() if "lora_" not in n
        ),
    }
    with torch.no_grad():
        result["output"] = gen(x[:1], t[:1], **part(x, t, cond, 0, BATCH)[2], return_dict=False)[0].detach()
    ckpt = out_dir / "ckpt"
    accelerator.save_state(str(ckpt))
    accelerator.wait_for_everyone()

    # each adapter alone as a LoRA file, from the gathered state dict (a collective call under FSDP2)
    gathered = accelerator.get_state_dict(gen)
    if rank == 0:
        from safetensors.torch import load_file

        accelerator.unwrap_model(gen).save(out_dir / "generator.safetensors", state_dict=gathered)
        saved = load_file(out_dir / "generator.safetensors")
        result["saved_file"] = len(saved) == len(result["generator"]) and all(
            torch.equal(saved["unet." + k], v) for k, v in result["generator"].items()
        )

    # a fresh base (replicated, also when the trained one was sharded) and views, restored from the checkpoint
    # by a second accelerator (its own prepared objects)
    loader = Accelerator()
    fresh = build()
    gen2, _, fake2, _ = prepared(loader, fresh)
    loader.load_state(str(ckpt))
    result["loaded_generator"], result["loaded_fake"] = full(gen2), full(fake2)
    with torch.no_grad():
        result["loaded_output"] = gen2(x[:1], t[:1], **part(x, t, cond, 0, BATCH)[2], return_dict=False)[
            0
        ].detach()
    torch.save(result, out_dir / f"rank{rank}.pt")
    loader.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]), shard_base="--shard_base" in sys.argv[2:])
