"""The `train` section: processes, batch, schedule, optimizer, precision, and when to evaluate and checkpoint."""

import dataclasses
from dataclasses import InitVar
from typing import Literal

from llm.config import FieldError, Validated, param


@dataclasses.dataclass(frozen=True)
class TrainConfig(Validated):
    nproc_per_node: int = param(1, ge=1)  # processes per machine, as torchrun's --nproc_per_node
    strategy: Literal["ddp", "fsdp"] = "ddp"  # when more than one process
    batch_size: int = param(16, ge=1)  # sequences per micro-step, per process
    grad_accum_steps: int = param(1, ge=1)  # micro-steps per optimizer step
    max_steps: int = param(1000, ge=1)  # optimizer steps
    lr: float = param(1e-3, gt=0)  # peak learning rate, after warmup
    min_lr: float = param(1e-4, ge=0)  # learning rate at max_steps, after cosine decay; at most lr
    warmup_steps: int = param(100, ge=0)  # linear warmup from 0; at most max_steps
    weight_decay: float = param(0.1, ge=0)  # AdamW decay, on weights with 2 or more dimensions only
    beta1: float = param(0.9, ge=0, lt=1)
    beta2: float = param(0.95, ge=0, lt=1)
    grad_clip: float = param(1.0, ge=0)  # max global gradient norm; 0 disables clipping
    # share of training rows made periodic: their first 8-64 tokens repeated to the end, which teaches the model to
    # copy from its context (llm/data.py); 0 = natural text only
    periodic_rows: float = param(0.0, ge=0, le=1)
    # adamw: AdamW for every weight. muon: Muon for the 2-D weights inside the blocks, AdamW (lr above) for
    # embeddings, the head, norms and biases.
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = param(0.02, gt=0)  # Muon's peak learning rate, on the same warmup and cosine schedule as lr
    muon_momentum: float = param(0.95, ge=0, lt=1)  # Nesterov momentum of Muon
    muon_ns_steps: int = param(5, ge=1, le=20)  # Newton-Schulz iterations that orthogonalise each update
    # bfloat16: autocast (weights and optimizer stay float32); auto: bf16 where the device multiplies bf16 in
    # hardware, else float32
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    eval_interval: int = param(100, ge=1)  # steps between validation losses (and at the end)
    eval_batches: int = param(8, ge=1)  # fixed validation batches per evaluation
    log_interval: int = param(10, ge=1)  # steps between log lines and MLflow metrics
    checkpoint_interval: int = param(200, ge=1)  # steps between checkpoints (and at the end)
    keep_checkpoints: int = param(3, ge=1)  # newest checkpoints kept in models/checkpoints/
    seed: int = param(1337, ge=0)  # initial weights, data windows and dropout
    # with nproc_per_node > 1: restarts of all workers (from the last checkpoint) when one fails
    max_restarts: int = param(0, ge=0)
    section: InitVar[str] = "train"  # the params section named in errors (from_mapping passes the one it read)

    def validate(self) -> None:
        if self.min_lr > self.lr:
            raise FieldError("min_lr", f"must be <= lr ({self.lr}), got {self.min_lr}")
        if self.warmup_steps > self.max_steps:
            raise FieldError("warmup_steps", f"must be <= max_steps ({self.max_steps}), got {self.warmup_steps}")
