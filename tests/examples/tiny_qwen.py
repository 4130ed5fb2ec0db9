"""Fixture of the Qwen-Image example tests: a tiny ``QwenImagePipeline`` folder written to disk offline (random
weights, the tokenizer built in memory), so the ``examples/flow_*.py`` scripts load it like ``Qwen/Qwen-Image``.

Layout as the paper's (Qwen-Image Technical Report, arXiv 2508.02324, Sec. 2 model architecture: Qwen2.5-VL
condition encoder, a 16-channel VAE, a double-stream MMDiT); the sizes are our choice (milliseconds on a CPU):

- text encoder: ``Qwen2_5_VLForConditionalGeneration`` with 2 decoder layers of width :data:`TEXT_WIDTH` (2 heads
  of 8, one key/value head, multimodal RoPE sections 2 + 1 + 1 = half the head dimension as Qwen2.5-VL splits it)
  and a 1-block vision tower of width 16 (the class always builds one; text-only prompts never run it), float32;
- tokenizer: a byte-level BPE ``Qwen2Tokenizer`` (:func:`tiny_qwen_tokenizer`) whose merges spell the words of the
  pipeline's prompt template, so the template prefix the pipeline drops (``prompt_template_encode_start_idx`` = 34)
  encodes to exactly 34 tokens, as with Qwen2.5-VL's tokenizer, and a prompt keeps only its own tokens plus the
  5-token template suffix;
- VAE: ``AutoencoderKLQwenImage`` of base width 8 (4 levels of width 8, one residual block each: the spatial
  factor 8 needs 3 downsamplings; the default temporal downsampling, unused on single frames), 16 latent
  channels, Qwen-Image's per-channel ``latents_mean`` / ``latents_std`` (the constructor's defaults);
- transformer: ``QwenImageTransformer2DModel`` from :func:`tests.transformer_configs.tiny_qwen_transformer_config` (64 packed channels);
- scheduler: ``FlowMatchEulerDiscreteScheduler`` with Qwen-Image's config: exponential dynamic shift 0.5 / 0.9 over
  256 / 8192 image tokens, ``shift_terminal`` 0.02 (``Qwen/Qwen-Image``'s ``scheduler_config.json`` as third-party
  copies give it; not read from the hub here).

Images of 64 px give 8x8 latents: a 4x4 patch grid (packed latents ``(B, 16, 64)``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tests.examples.tiny_sdxl import _bytes_to_unicode
from tests.transformer_configs import tiny_qwen_transformer_config

TEXT_WIDTH = 16  # hidden size of the tiny Qwen2.5-VL text model = the transformer's joint_attention_dim
IMAGE_SIZE = 64  # pixels: 8x8 latents, 16 packed tokens

#: ``QwenImagePipeline.prompt_template_encode`` of diffusers 0.42.1 (the test checks it is still the pipeline's).
QWEN_IMAGE_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
#: Qwen2.5-VL's special tokens in their order of the real vocabulary (``<|endoftext|>`` is the pad token).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def _template_words() -> list[str]:
    """The byte-level pre-tokenized words of :data:`QWEN_IMAGE_PROMPT_TEMPLATE` outside its special tokens and
    the prompt slot (``"system"``, ``"Ġthe"``, ``","`` ...), in order, without repeats."""
    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    split = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    text = QWEN_IMAGE_PROMPT_TEMPLATE.replace("{}", "<|im_end|>")
    for token in QWEN_SPECIAL_TOKENS:
        text = text.replace(token, "\x00")
    words: list[str] = []
    for segment in text.split("\x00"):
        for word, _ in split.pre_tokenize_str(segment) if segment else []:
            if word not in words:
                words.append(word)
    return words


def tiny_qwen_tokenizer() -> Any:
    """A byte-level BPE ``Qwen2Tokenizer`` built in memory (no download): the 256 byte symbols (ids 0-255), the
    prefixes of the template's words, merged left to right (``s y`` -> ``sy``, ``sy s`` -> ``sys``, ...), then
    :data:`QWEN_SPECIAL_TOKENS`; pad token ``<|endoftext|>``, EOS ``<|im_end|>``, no BOS (as Qwen2.5-VL's).

    The merges spell every word of the pipeline's prompt template in one token, so the template prefix up to the
    prompt (``<|im_start|>system\\nDescribe ... background:<|im_end|>\\n<|im_start|>user\\n``) encodes to exactly
    34 tokens, the ``prompt_template_encode_start_idx`` the pipeline drops (as Qwen2.5-VL's tokenizer), and the
    suffix ``<|im_end|>\\n<|im_start|>assistant\\n`` to 5; other text falls back to (mostly) single bytes.
    """
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(_bytes_to_unicode().values())}
    merges: list[tuple[str, str]] = []
    for word in _template_words():
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                merges.append((word[: end - 1], word[end - 1]))
                vocab[word[:end]] = len(vocab)
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=32768,
        eos_token="<|im_end|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )


def _tiny_qwen_text_encoder(tokenizer: Any) -> Any:
    """A Qwen2.5-VL with 2 text layers of width :data:`TEXT_WIDTH` and a 1-block vision tower, random weights."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]},
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "patch_size": 2,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "window_size": 8,
            "out_hidden_size": TEXT_WIDTH,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)


def save_tiny_qwen_pipeline(folder: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny ``QwenImagePipeline`` folder (random weights, no download) to ``folder`` and return it.

    See the module docstring for the components; all weights float32, drawn from ``seed`` without touching the
    global random state.

    Args:
        folder: Where to write the pipeline (created; existing files of the same names are overwritten).
        seed: Seed of the random weights.

    Returns:
        ``folder`` as a :class:`~pathlib.Path`, loadable with ``QwenImagePipeline.from_pretrained``.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    root = Path(folder)
    tokenizer = tiny_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _tiny_qwen_text_encoder(tokenizer)
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
        transformer = QwenImageTransformer2DModel(**tiny_qwen_transformer_config())
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.save_pretrained(root, safe_serialization=True)
    return root
