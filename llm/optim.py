"""The optimizers: AdamW alone, or Muon for the hidden matrices with AdamW for the rest.

Muon (Keller Jordan, 2024) replaces each 2-D weight's momentum update by the nearest semi-orthogonal matrix
(all singular values near 1), computed with a few Newton-Schulz iterations: every direction of the update
moves by about the same amount, so rare directions learn as fast as common ones. It suits the matrices
inside the blocks; embeddings, the output head, norms and biases stay with AdamW.

torch.optim.Muon supplies the hyperparameters, their checks and the state layout (one `momentum_buffer` per
weight); ours changes its step in two ways torch's lacks:
- the Newton-Schulz iteration runs in the run's dtype: torch's always runs it in bf16, which CPUs without
  bf16 matmul instructions (AVX2 only) emulate about 100x slower than float32;
- under FSDP2 a weight and its gradient are row shards (DTensors): each rank gathers the whole momentum
  update, orthogonalises it (the same result on every rank, as Newton-Schulz is not row-separable) and keeps
  its own rows. Under DDP each rank holds the whole averaged gradient and orthogonalises it alike.
"""

import math

import torch

from llm.configs.train import TrainConfig

# Quintic Newton-Schulz coefficients tuned to push singular values in (0, 1] towards 1 in few steps
# (Keller Jordan's): the result has singular values in roughly [0.7, 1.2], which trains as well as exact.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(update: torch.Tensor, steps: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to `update` (rows x cols, or a stack of them: batch x rows x cols),
    approximately: U V^T of its SVD U S V^T, by `steps` Newton-Schulz iterations computed in `dtype`. Returned
    in update's dtype."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    x = x if x.dim() == 3 else x.unsqueeze(0)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix x x^T is the smaller one
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # Frobenius >= spectral norm: singular values <= 1
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2, one kernel
        x = torch.baddbmm(x, poly, x, beta=a)  # a x + (b G + c G^2) x
    x = x.mT if tall else x
    return x.reshape(update.shape).to(update.dtype)


class Muon(torch.optim.Muon):
    """Muon with Nesterov momentum, decoupled weight decay and torch's "original" lr scaling
    (lr * sqrt(max(1, rows / cols))), orthogonalising in `ns_dtype` and handling FSDP2 shards. Matrices of one
    shape (the same projection in every block) are orthogonalised together, as one batch."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float, ns_steps: int,
                 ns_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                         ns_steps=ns_steps)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            params = [param for param in group["params"] if param.grad is not None]
            updates = []
            for param in params:
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(param.grad, 1 - momentum)
                updates.append(param.grad.lerp(buf, momentum))  # Nesterov: the gradient pushed along the momentum
            for param, update in zip(params, self._orthogonalize(updates, group["ns_steps"]), strict=True):
                rows, cols = param.shape
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr * math.sqrt(max(1.0, rows / cols)))

    def _orthogonalize(self, updates: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
        """Each update orthogonalised whole. A DTensor (FSDP2's row shard) is gathered first (every rank then
        computes the same whole result) and comes back as this rank's rows."""
        whole = [update.full_tensor() if hasattr(update, "full_tensor") else update for update in updates]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, matrix in enumerate(whole):
            by_shape.setdefault(tuple(matrix.shape), []).append(i)
        result: list[torch.Tensor] = [torch.empty(0)] * len(whole)
        for indices in by_shape.values():
            stacked = orthogonalize(torch.stack([whole[i] for i in indices]), steps, self.ns_dtype)
            for i, ortho in zip(indices, stacked, strict=True):
                result[i] = ortho
        return [_like(ortho, update) for ortho, update in zip(result, updates, strict=True)]


def _like(whole: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """`whole` laid out as `update`: itself for a plain tensor, this rank's shard for a DTensor (no comms)."""
    if not hasattr(update, "full_tensor"):
        return whole
    from torch.distributed.tensor import DTensor, Replicate

    mesh = update.device_mesh
    replicated = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, update.placements)


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """The weights Muon trains: the 2-D matrices inside the transformer blocks, and the token shift's."""
    return (name.startswith("blocks.") or name.startswith("token_shift.")) and param.dim() == 2


def peak_lrs(cfg: TrainConfig) -> dict[str, float]:
    """The peak lr of each optimizer a run of `cfg` steps, by name: AdamW's train.lr and, with `optimizer:
    muon`, Muon's train.muon_lr. Every parameter group takes its optimizer's; the schedule scales them alike."""
    return {"adamw": cfg.lr, **({"muon": cfg.muon_lr} if cfg.optimizer == "muon" else {})}


def configure_optimizers(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW with weight decay on >= 2-D weights (none on biases and norm gains); with `optimizer: muon`, the
    hidden matrices go to Muon instead. Each parameter group records its peak lr (`peak_lr`, from `peak_lrs`);
    `set_lr` scales every group along the schedule."""
    peaks = peak_lrs(cfg)
    muon: list[torch.nn.Parameter] = []
    rest: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (muon if cfg.optimizer == "muon" and is_hidden_matrix(name, param) else rest).append(param)
    adamw_groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay, "peak_lr": peaks["adamw"]},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "peak_lr": peaks["adamw"]},
    ]
    # No empty group (a model without biases or norm gains has no 1-D weights): torch's state-dict API
    # refuses empty groups when there are several optimizers.
    adamw_groups = [group for group in adamw_groups if group["params"]]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(adamw_groups, lr=peaks["adamw"], betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    ]
    if muon:
        ns_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        optimizers.append(Muon([{"params": muon, "peak_lr": peaks["muon"]}], lr=peaks["muon"],
                               weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                               ns_steps=cfg.muon_ns_steps, ns_dtype=ns_dtype))
    return optimizers


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = cfg.max_steps - cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / decay_steps if decay_steps > 0 else 1.0
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)


def lr_scale(step: int, cfg: TrainConfig) -> float:
    """The schedule's factor for step `step`: every parameter group's lr is its peak lr times this."""
    return lr_at(step, cfg) / cfg.lr


def scheduled_lr(peak_lr: float, scale: float) -> float:
    """A group's lr at a step: its peak lr times the schedule's factor for that step."""
    return peak_lr * scale


def set_lr(optimizers: list[torch.optim.Optimizer], scale: float) -> None:
    """Every group's lr = its peak lr x `scale` (the schedule's factor for this step: `lr_scale`)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr(group["peak_lr"], scale)


def group_lrs(step: int, cfg: TrainConfig) -> dict[str, float]:
    """Each optimizer's lr, by name (as `peak_lrs`), at step `step`: what `set_lr` gives its groups there, to
    the last bit. What the guide plots."""
    scale = lr_scale(step, cfg)
    return {name: scheduled_lr(peak, scale) for name, peak in peak_lrs(cfg).items()}
