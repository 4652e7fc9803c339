"""The training loop: AdamW, warmup + cosine schedule, gradient accumulation, clipping, bf16 autocast,
periodic evaluation, checkpoints and exact resume."""

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import llm.data
import llm.model
from llm.checkpoint import (
    checkpoint_dirs,
    gather_weights,
    read_checkpoint,
    read_state,
    restore_checkpoint,
    save_checkpoint,
)
from llm.config import TrainConfig
from llm.data import VAL_STREAM, TokenWindows, read_meta
from llm.distributed import Runtime
from llm.model import GPT, GPTConfig
from llm.parallel import gradient_sync, parallelize

log = logging.getLogger(__name__)

# Modules whose code shapes a run's trajectory: a checkpoint made by other code is not resumed.
CODE = {"model": llm.model, "train": sys.modules[__name__], "data": llm.data}

# Dense bf16 peak FLOP/s of known accelerators (vendor datasheets, without sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = cfg.max_steps - cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / decay_steps if decay_steps > 0 else 1.0
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings (>= 2-D), none on biases and norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.cache
def peak_flops(device: torch.device, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from): a datasheet for known GPUs, else measured here with
    large matmuls in `dtype`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_FLOPS.items():
            if key in name and dtype == "bfloat16":
                return flops, f"datasheet {key} bf16 dense"
    return measure_matmul_flops(device, dtype), f"measured {dtype} matmul on {device.type}"


def measure_matmul_flops(device: torch.device, dtype: str, n: int = 2048, trials: int = 5) -> float:
    """Best of `trials` timings of n x n matmuls: the best is the machine's capability, the rest is noise
    from whatever else shares it."""
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    generator = torch.Generator(device).manual_seed(0)  # leaves the global RNG (dropout) untouched
    a = torch.randn(n, n, device=device, dtype=torch_dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=torch_dtype, generator=generator)
    a @ b
    _sync(device)
    repeats = 4 if device.type == "cpu" else 50
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_fingerprint(model_cfg: GPTConfig, cfg: TrainConfig, tokens_dir: Path) -> str:
    """What a checkpoint must share with this run to be resumed: the model, the data, the code of the
    model and the loop, and every setting that shapes the trajectory (not logging, checkpointing, compile
    or activation checkpointing). So a run whose params or code changed starts fresh, as DVC expects."""
    meta = read_meta(tokens_dir)
    shaping = {k: v for k, v in dataclasses.asdict(cfg).items()
               if k not in {"compile", "activation_checkpointing", "eval_interval", "eval_batches", "log_interval",
                            "checkpoint_interval", "keep_checkpoints", "nproc_per_node", "strategy"}}
    data = {"tokenizer_sha256": meta["tokenizer_sha256"], "splits": meta["splits"]}
    code = {name: hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest() for name, module in CODE.items()}
    blob = json.dumps({"model": dataclasses.asdict(model_cfg), "train": shaping, "data": data, "code": code},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def resumable_state(model_cfg: GPTConfig, cfg: TrainConfig, tokens_dir: Path,
                    checkpoint_dir: Path) -> dict[str, Any] | None:
    """state.json of the checkpoint `train` would resume from (the newest readable one, if it belongs to
    this run), or None for a fresh start. It does not check the weights; `train` does."""
    fingerprint = run_fingerprint(model_cfg, cfg, tokens_dir)
    for path in checkpoint_dirs(checkpoint_dir):
        state = read_state(path)
        if state is not None:
            return state if state.get("fingerprint") == fingerprint else None
    return None


@dataclasses.dataclass
class TrainResult:
    model: GPT  # the trained model, uncompiled (sharded under FSDP)
    weights: dict[str, torch.Tensor]  # its full weights on rank 0 (empty on other ranks), tied aliases once
    metrics: dict[str, Any]  # what metrics/train.json holds
    history: list[dict[str, Any]]  # one row per log step: step, train_loss, val_loss, lr, tokens_per_sec, ...
    step_losses: list[float]  # the training loss of every step this process ran
    resumed_from: int  # step the run resumed from (0: a fresh start)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, data: TokenWindows, cfg: TrainConfig, runtime: Runtime) -> float:
    """Mean loss over `cfg.eval_batches` fixed validation batches (the same ones at every evaluation),
    averaged over ranks, each rank taking its slice of every batch."""
    model.eval()
    total = torch.zeros((), device=runtime.device)
    for i in range(cfg.eval_batches):
        x, y = data.batch(cfg.batch_size, cfg.seed, VAL_STREAM, runtime.rank, runtime.world_size, micro_step=i,
                          device=runtime.device)
        with autocast(runtime.device, cfg.dtype):
            _, loss = model(x, y)
        total += loss.detach().float()
    model.train()
    return runtime.mean(total).item() / cfg.eval_batches


def initial_model(model_cfg: GPTConfig, seed: int) -> GPT:
    """The weights training starts from: a function of the config and train.seed alone."""
    torch.manual_seed(seed)
    return GPT(model_cfg)


def train(model_cfg: GPTConfig, cfg: TrainConfig, tokens_dir: Path, checkpoint_dir: Path,
          runtime: Runtime | torch.device | str, on_log: Callable[[dict[str, Any]], None] | None = None,
          stop_after: int | None = None, run_state: dict[str, Any] | None = None) -> TrainResult:
    """Train from scratch, or resume from the newest compatible checkpoint in `checkpoint_dir`.

    Every rank of a distributed run calls this; rank 0 alone writes checkpoints and calls `on_log` with each
    log row (the moment to send metrics to a tracker). `stop_after` ends the run after that many steps, as
    an interruption would (tests use it to check resume). `run_state` (JSON) is saved in every checkpoint,
    for the caller to read back with `resumable_state` (the tracker's run id, so a resumed run logs there)."""
    if not isinstance(runtime, Runtime):
        runtime = Runtime(device=torch.device(runtime))
    device = runtime.device
    fingerprint = run_fingerprint(model_cfg, cfg, tokens_dir)
    train_data = TokenWindows(tokens_dir, "train", model_cfg.block_size, model_cfg.vocab_size)
    val_data = TokenWindows(tokens_dir, "val", model_cfg.block_size, model_cfg.vocab_size)

    model = initial_model(model_cfg, cfg.seed).to(device)  # the same initial weights on every rank
    step_model = parallelize(model, runtime, cfg.strategy, cfg.dtype, cfg.compile, cfg.activation_checkpointing)
    optimizer = configure_optimizer(model, cfg, device)

    loaded = None  # read by rank 0 alone, then broadcast into every rank's (possibly sharded) state
    if runtime.is_main:
        for path in checkpoint_dirs(checkpoint_dir):
            state = read_state(path)
            if state is not None and state.get("fingerprint") != fingerprint:
                log.warning("checkpoint %s is from a different model, data, training config or code: not "
                            "resuming; starting fresh and removing the old checkpoints", path)
                for old in checkpoint_dirs(checkpoint_dir):
                    shutil.rmtree(old)
                break
            try:
                loaded = read_checkpoint(path)
            except Exception as err:  # damaged or truncated: any error from json, torch or safetensors
                log.warning("checkpoint %s is damaged (%s): trying the previous one", path, str(err).splitlines()[0])
                continue
            log.info("resuming from %s (step %d of %d)", path, loaded[0]["step"], cfg.max_steps)
            break
    state = loaded[0] if loaded else {}
    start_step, tokens_seen, state = runtime.broadcast((state.get("step", 0), state.get("tokens_seen", 0), state))
    if start_step > 0:
        restore_checkpoint(model, optimizer, loaded, runtime)
    if runtime.distributed:  # dropout differs across ranks (one process restores its exact RNG instead)
        torch.manual_seed(hash((cfg.seed, runtime.rank, start_step)) % 2**63)

    global_batch = cfg.batch_size * cfg.grad_accum_steps * runtime.world_size
    tokens_per_step = global_batch * model_cfg.block_size
    flops_per_token = model.flops_per_token()
    # One rank measures the peak (ranks sharing a CPU would slow each other); MFU is over all devices.
    peak, peak_source = runtime.broadcast(peak_flops(device, cfg.dtype) if runtime.is_main else None)
    peak *= runtime.world_size
    log.info("model %s: %.2fM parameters; global batch %d sequences (%d per rank x %d accumulation x %d ranks) "
             "= %d tokens per step; peak %.1f TFLOP/s (%s)", model_cfg.arch, model.num_params() / 1e6, global_batch,
             cfg.batch_size, cfg.grad_accum_steps, runtime.world_size, tokens_per_step, peak / 1e12, peak_source)

    history: list[dict[str, Any]] = []
    step_losses: list[float] = []
    pending_losses: list[torch.Tensor] = []  # read back once per log interval: one device sync
    val_loss, tokens_per_sec, total_time, total_tokens = float("nan"), 0.0, 0.0, 0
    last_step = cfg.max_steps if stop_after is None else min(cfg.max_steps, start_step + stop_after)
    interval_start, interval_steps = time.perf_counter(), 0
    model.train()
    for step in range(start_step, last_step):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum_steps):
            x, y = train_data.batch(cfg.batch_size, cfg.seed, step, runtime.rank, runtime.world_size,
                                    micro_step=micro, device=device)
            with gradient_sync(step_model, model, enabled=micro == cfg.grad_accum_steps - 1):
                with autocast(device, cfg.dtype):
                    _, loss = step_model(x, y)
                (loss / cfg.grad_accum_steps).backward()
            loss_sum += loss.detach()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pending_losses.append(loss_sum / cfg.grad_accum_steps)
        done = step + 1
        tokens_seen += tokens_per_step
        interval_steps += 1

        evaluate_now = done % cfg.eval_interval == 0 or done == cfg.max_steps
        if done % cfg.log_interval == 0 or done == last_step or evaluate_now:
            losses = runtime.mean(torch.stack(pending_losses).float()).tolist()
            pending_losses.clear()
            step_losses.extend(losses)
            _sync(device)
            seconds = time.perf_counter() - interval_start
            tokens_per_sec = interval_steps * tokens_per_step / seconds
            if step > start_step:  # the first interval pays for compilation and warm-up
                total_time += seconds
                total_tokens += interval_steps * tokens_per_step
            if evaluate_now:
                val_loss = evaluate_loss(step_model, val_data, cfg, runtime)
            row = {
                "step": done,
                "train_loss": sum(losses) / len(losses),
                "val_loss": val_loss if evaluate_now else None,
                "lr": lr,
                "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                "tokens_per_sec": tokens_per_sec,
                "mfu": flops_per_token * tokens_per_sec / peak,
                "tokens_seen": tokens_seen,
            }
            history.append(row)
            if on_log is not None and runtime.is_main:
                on_log(row)
        if done % cfg.checkpoint_interval == 0 or done == last_step:
            run_tokens_per_sec = total_tokens / total_time if total_time else tokens_per_sec
            snapshot = {"train_loss": history[-1]["train_loss"] if history else None, "val_loss": val_loss,
                        "tokens_per_sec": run_tokens_per_sec}
            save_checkpoint(checkpoint_dir, done, model, optimizer,
                            {**(run_state or {}), "fingerprint": fingerprint, "tokens_seen": tokens_seen,
                             "metrics": snapshot,
                             "model_config": dataclasses.asdict(model_cfg), "train_config": dataclasses.asdict(cfg)},
                            cfg.keep_checkpoints, runtime)
        if done % cfg.log_interval == 0 or done == last_step or evaluate_now:
            interval_start, interval_steps = time.perf_counter(), 0

    tokens_per_sec = total_tokens / total_time if total_time else 0.0
    final_train = history[-1]["train_loss"] if history else float("nan")
    if start_step == last_step:  # nothing left to do: the resumed checkpoint already finished the run
        log.info("the checkpoint at step %d already completes this run", start_step)
        resumed = state.get("metrics", {})
        val_loss = evaluate_loss(step_model, val_data, cfg, runtime)
        final_train = resumed.get("train_loss") or float("nan")
        tokens_per_sec = resumed.get("tokens_per_sec") or 0.0
    metrics = {
        "train_loss": final_train,
        "val_loss": val_loss,
        "tokens_per_sec": tokens_per_sec,
        "mfu": flops_per_token * tokens_per_sec / peak,
        "steps": last_step,
        "tokens_seen": tokens_seen,
        "parameters": model.num_params(),
        "flops_per_token": flops_per_token,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "resumed_from_step": start_step,
    }
    return TrainResult(model, gather_weights(model, runtime), metrics, history, step_losses, start_step)
