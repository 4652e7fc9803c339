"""What is applied to a model from outside it: activation checkpointing, DDP or FSDP2, compilation."""

import contextlib
import functools

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from llm.distributed import Runtime
from llm.model import GPT


def apply_activation_checkpointing(model: GPT) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them: memory for
    compute. Parameters and state_dict keys are unchanged."""
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_fsdp(model: GPT, dtype: str) -> None:
    """FSDP2: shard each block, then the rest (embeddings, final norm, head) as the root group. With
    bf16, parameters are gathered in bf16 and gradients reduced in float32."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == "bfloat16" else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def apply_compile(model: GPT) -> None:
    """Compile each block in place (regional compilation): every block has the same code, so one graph is
    traced and reused for all of them, and its elementwise work (norms, rotary, squared ReLU) is fused. The
    training loss (ChunkedHeadLoss, an autograd Function looping over chunks of rows) stays eager: compiled
    whole, the model's graph broke there and ran slower than eager; its elementwise pass compiled on its own
    bought ~7 % more but needs an out-of-place form, slower when eager (docs/benchmarks.md). Parameter names
    and state_dict keys are unchanged."""
    for block in model.blocks:
        block.compile()


def parallelize(model: GPT, runtime: Runtime, strategy: str, dtype: str, compile: bool,
                activation_checkpointing: bool) -> torch.nn.Module:
    """Apply, in order: activation checkpointing, compile (per block), DDP or FSDP2 (when there are several
    ranks). Returns the module to call in the training step (`model` itself keeps its plain parameter names)."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    step_model: torch.nn.Module = model
    if runtime.distributed and strategy == "fsdp":
        apply_fsdp(model, dtype)
    elif runtime.distributed:
        device_ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
        step_model = DistributedDataParallel(model, device_ids=device_ids)
    return step_model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 holds `model`'s parameters as shards (each rank has a slice of every weight)."""
    return isinstance(model, FSDPModule)


def gradient_sync(step_model: torch.nn.Module, model: GPT, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on accumulation micro-steps that are not the last."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if isinstance(step_model, DistributedDataParallel) and not enabled:
        return step_model.no_sync()
    return contextlib.nullcontext()
