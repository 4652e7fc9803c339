"""What is applied to a model from outside it: activation checkpointing and compilation."""

import functools

import torch
from torch.utils.checkpoint import checkpoint

from llm.model import GPT


def apply_activation_checkpointing(model: GPT) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them: memory for
    compute. Parameters and state_dict keys are unchanged."""
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def compile_model(model: GPT) -> torch.nn.Module:
    return torch.compile(model)
