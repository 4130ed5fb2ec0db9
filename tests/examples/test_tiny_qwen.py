"""The tiny offline Qwen-Image pipeline of :mod:`tests.examples.tiny_qwen`: it loads with
``QwenImagePipeline.from_pretrained``, its tokenizer matches the pipeline's prompt template (34 dropped prefix
tokens), its scheduler is Qwen-Image's, and a 2-step true-CFG call gives finite outputs of the expected shapes with
the text padding mask honoured."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.examples.tiny_qwen import (
    IMAGE_SIZE,
    QWEN_IMAGE_PROMPT_TEMPLATE,
    TEXT_WIDTH,
    save_tiny_qwen_pipeline,
)

PROMPTS = ["a cat", "a much longer prompt: an astronaut riding a horse on the moon, oil painting"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from diffusers import QwenImagePipeline

    folder = save_tiny_qwen_pipeline(tmp_path_factory.mktemp("qwen") / "pipe")
    pipeline = QwenImagePipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _call(pipe: Any, prompt: str | list[str], latents: torch.Tensor, output_type: str) -> torch.Tensor:
    n = 1 if isinstance(prompt, str) else len(prompt)
    return pipe(
        prompt,
        negative_prompt=" " if n == 1 else [" "] * n,
        true_cfg_scale=4.0,
        num_inference_steps=2,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        latents=latents,
        output_type=output_type,
    ).images


def test_tiny_qwen_folder_layout(tmp_path: Path) -> None:
    folder = save_tiny_qwen_pipeline(tmp_path / "q", seed=1)
    assert folder == tmp_path / "q"
    names = {"model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vae"}
    assert {p.name for p in folder.iterdir()} == names


def test_tiny_qwen_tokenizer_matches_template(pipe: Any) -> None:
    assert pipe.prompt_template_encode == QWEN_IMAGE_PROMPT_TEMPLATE
    start = pipe.prompt_template_encode_start_idx
    prefix = QWEN_IMAGE_PROMPT_TEMPLATE.split("{}")[0]
    ids = pipe.tokenizer(prefix).input_ids
    assert len(ids) == start == 34
    assert pipe.tokenizer.decode(ids) == prefix
    full = pipe.tokenizer(QWEN_IMAGE_PROMPT_TEMPLATE.format("a cat")).input_ids
    assert (
        full[:start] == ids
    )  # the dropped tokens are exactly the prefix: no merge across the prompt boundary
    assert pipe.tokenizer.decode(full[start:]) == "a cat<|im_end|>\n<|im_start|>assistant\n"
    assert (pipe.tokenizer.pad_token, pipe.tokenizer.eos_token) == ("<|endoftext|>", "<|im_end|>")


def test_tiny_qwen_scheduler_is_qwen_image(pipe: Any) -> None:
    config = {k: pipe.scheduler.config[k] for k in ("base_shift", "max_shift", "base_image_seq_len")}
    config.update(
        {k: pipe.scheduler.config[k] for k in ("max_image_seq_len", "shift_terminal", "time_shift_type")}
    )
    assert config == {
        "base_shift": 0.5,
        "max_shift": 0.9,
        "base_image_seq_len": 256,
        "max_image_seq_len": 8192,
        "shift_terminal": 0.02,
        "time_shift_type": "exponential",
    }
    assert pipe.scheduler.config.use_dynamic_shifting
    # 3 steps at 16 image tokens, by hand: mu = 0.5 + (16 - 256) * 0.4 / 7936, sigma <- e^mu / (e^mu + 1/sigma - 1)
    # on linspace(1, 1/3, 3), then stretched so the last sigma is shift_terminal: 1 - (1 - s) * 0.98 / (1 - s_last).
    mu = 0.5 + (16 - 256) * (0.9 - 0.5) / (8192 - 256)
    shifted = [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in (1.0, 2 / 3, 1 / 3)]
    expected = [1 - (1 - s) * 0.98 / (1 - shifted[-1]) for s in shifted] + [0.0]
    pipe.scheduler.set_timesteps(sigmas=[1.0, 2 / 3, 1 / 3], mu=mu)
    torch.testing.assert_close(pipe.scheduler.sigmas, torch.tensor(expected), rtol=0, atol=1e-6)


def test_tiny_qwen_encode_prompt_masks_padding(pipe: Any) -> None:
    tokens = [len(pipe.tokenizer(QWEN_IMAGE_PROMPT_TEMPLATE.format(p)).input_ids) - 34 for p in PROMPTS]
    assert tokens[0] == 9 and tokens[1] > tokens[0]  # "a", "Ġc", "a", "t" + 5 suffix tokens
    embeds, mask = pipe.encode_prompt(PROMPTS)
    assert embeds.shape == (2, tokens[1], TEXT_WIDTH) and embeds.dtype == torch.float32
    assert mask is not None and mask.sum(dim=1).tolist() == tokens
    assert mask[0, : tokens[0]].all() and not mask[0, tokens[0] :].any()
    assert embeds[0, tokens[0] :].abs().max() == 0 and torch.isfinite(embeds).all()
    # Causal decoder, right padding: the short prompt's states do not see the padding, so they match it alone.
    alone, alone_mask = pipe.encode_prompt(PROMPTS[0])
    assert alone_mask is None and alone.shape == (1, tokens[0], TEXT_WIDTH)
    torch.testing.assert_close(embeds[:1, : tokens[0]], alone, rtol=1e-5, atol=1e-5)


def test_tiny_qwen_pipeline_call(pipe: Any) -> None:
    latents = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    packed = _call(pipe, "a cat", latents[:1], "latent")
    assert packed.shape == (1, 16, 64) and torch.isfinite(packed).all()
    assert not torch.equal(packed, latents[:1])
    image = _call(pipe, "a cat", latents[:1], "pt")
    assert image.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(image).all()
    assert image.min() >= 0 and image.max() <= 1
    # Batched with a longer prompt, the short one's padded text tokens are masked out of the joint attention: same
    # result as alone (float32 round-off of different batch shapes only).
    batched = _call(pipe, PROMPTS, latents, "latent")
    assert batched.shape == (2, 16, 64)
    torch.testing.assert_close(batched[:1], packed, rtol=1e-5, atol=1e-5)
