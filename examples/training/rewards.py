"""Reward models named on the command line (``--reward_model module:callable``): loading and freezing."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from . import sdxl_models

#: How a ``--reward_model`` is called; every script that takes one documents it with this text.
REWARD_CALL = '"module:callable", called as fn(images in [-1, 1] (B, 3, H, W), prompts) -> (B,) scores'


def load_reward_model(spec: str, option: str = "--reward_model") -> Any:
    """The callable named by ``"package.module:name"`` (``name`` may be dotted: ``module:Class.method``).

    Raises ``ValueError`` with the expected form, naming the command-line ``option`` that gave ``spec``, when
    ``spec`` is malformed or names no callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"Expected {option} as 'module:callable', e.g. 'my_rewards:aesthetic', but got {spec!r}."
        )
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"Expected {option} {spec!r} to name a callable, but it is {type(obj).__name__}.")
    return obj


def frozen_reward_model(spec: str, device: Any, option: str = "--reward_model") -> Any:
    """:func:`load_reward_model`, loaded whole even under DeepSpeed ZeRO-3 (as the frozen text encoders); an
    ``nn.Module`` reward is frozen (eval mode, no gradients to its weights) and moved to ``device``."""
    with sdxl_models.zero3_init_disabled():
        reward = load_reward_model(spec, option)
    if isinstance(reward, torch.nn.Module):
        sdxl_models.freeze(reward)
        reward.to(device)
    return reward
