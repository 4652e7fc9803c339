"""The training loop: AdamW or Muon (llm/optim.py), warmup + cosine schedule, gradient accumulation, clipping,
bf16 autocast, periodic evaluation, checkpoints and exact resume.

`train` reads as the loop alone; each rule it follows has one home here: which checkpoint a run resumes
from (`scan_checkpoints`), one optimizer step (`train_step`), when a step logs, evaluates or checkpoints
(`is_log_step`, `is_eval_step`, `is_checkpoint_step`), and what the run reports (`final_metrics`).
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import llm.data
import llm.model
import llm.optim
from llm.attention import AttentionRecord, attention_frame, frame_model
from llm.checkpoint import (
    checkpoint_dirs,
    gather_weights,
    read_checkpoint,
    read_state,
    restore_checkpoint,
    save_checkpoint,
)
from llm.configs.train import TrainConfig
from llm.data import VAL_STREAM, TokenWindows
from llm.distributed import Runtime
from llm.errors import Interrupted, TrainingDiverged
from llm.model import GPT, GPTConfig, initial_model
from llm.optim import configure_optimizers, set_lr
from llm.parallel import gradient_sync, is_sharded, parallelize
from llm.shards import TokensMeta, read_meta
from llm.signals import StopSignals
from llm.throughput import ThroughputMeter, peak_flops

log = logging.getLogger(__name__)

# Modules whose code shapes a run's trajectory: a checkpoint made by other code is not resumed.
CODE = {"model": llm.model, "train": sys.modules[__name__], "data": llm.data, "optim": llm.optim}

# Settings that do not change the trajectory: a run may resume with other values of these.
NOT_SHAPING = {"compile", "activation_checkpointing", "eval_interval", "eval_batches", "log_interval",
               "checkpoint_interval", "keep_checkpoints", "nproc_per_node", "strategy", "max_restarts"}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = cfg.max_steps - cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / decay_steps if decay_steps > 0 else 1.0
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)


def has_fast_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 matrices in hardware: a CUDA GPU that supports bf16, or a CPU with
    AVX-512 BF16 or AMX. Elsewhere (AVX2-only CPUs: most laptops, older servers) torch emulates bf16
    matmuls, about 100x slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """train.dtype as the run computes: "auto" becomes bfloat16 where the device has fast bf16, else float32.
    Decided by the hardware's features, not a timing, so the same machine always resolves the same way."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if has_fast_bf16(device) else "float32"


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- when a step logs, evaluates, checkpoints --------------------------------------------------------------

def is_eval_step(done: int, cfg: TrainConfig) -> bool:
    """Validation loss after every eval_interval steps and after the last step of the run."""
    return done % cfg.eval_interval == 0 or done == cfg.max_steps


def is_log_step(done: int, cfg: TrainConfig, last_step: int) -> bool:
    """A history row (and a device sync) every log_interval steps, at every evaluation and at the end."""
    return done % cfg.log_interval == 0 or done == last_step or is_eval_step(done, cfg)


def is_checkpoint_step(done: int, cfg: TrainConfig, last_step: int) -> bool:
    return done % cfg.checkpoint_interval == 0 or done == last_step


# --- which checkpoint a run resumes from -------------------------------------------------------------------

def run_fingerprint(model_cfg: GPTConfig, cfg: TrainConfig, meta: TokensMeta,
                    attention_ids: list[int] | None = None) -> str:
    """What a checkpoint must share with this run to be resumed: the model, the data, the code of the
    model and the loop, every setting that shapes the trajectory (NOT_SHAPING excluded) and the tokens whose
    attention is recorded. So a run whose params or code changed starts fresh, as DVC expects."""
    shaping = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_SHAPING}
    data = {"tokenizer_sha256": meta.tokenizer_sha256, "splits": dataclasses.asdict(meta)["splits"]}
    code = {name: hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest() for name, module in CODE.items()}
    blob = json.dumps({"model": dataclasses.asdict(model_cfg), "train": shaping, "data": data, "code": code,
                       **({"attention_ids": list(attention_ids)} if attention_ids else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class CheckpointScan:
    resumable: list[tuple[Path, dict[str, Any]]]  # this run's checkpoints with their state.json, newest first
    foreign: bool  # the newest checkpoint is another run's (model, data, config or code changed)


def scan_checkpoints(checkpoint_dir: Path, fingerprint: str) -> CheckpointScan:
    """The rule for resuming: the newest checkpoint whose state.json reads decides whose folder this is. If it
    is this run's, its readable checkpoints are candidates, newest first; if not, the run starts fresh."""
    readable = [(path, state) for path in checkpoint_dirs(checkpoint_dir) if (state := read_state(path)) is not None]
    if readable and readable[0][1].get("fingerprint") != fingerprint:
        return CheckpointScan([], foreign=True)
    return CheckpointScan([(p, s) for p, s in readable if s.get("fingerprint") == fingerprint], foreign=False)


def resumable_state(model_cfg: GPTConfig, cfg: TrainConfig, tokens_dir: Path, checkpoint_dir: Path,
                    attention_ids: list[int] | None = None) -> dict[str, Any] | None:
    """state.json of the checkpoint `train` would resume from, or None for a fresh start (the caller's view,
    e.g. to reopen the run's tracker; it does not check the weights, which `train` does)."""
    scan = scan_checkpoints(checkpoint_dir, run_fingerprint(model_cfg, cfg, read_meta(tokens_dir), attention_ids))
    return scan.resumable[0][1] if scan.resumable else None


def load_resume_point(checkpoint_dir: Path, fingerprint: str) -> tuple | None:
    """(state, weights, optimizer bundle) of the newest checkpoint of this run that reads whole, else None.
    Another run's checkpoints are removed, so the folder holds one run."""
    scan = scan_checkpoints(checkpoint_dir, fingerprint)
    if scan.foreign:
        log.warning("checkpoints in %s are from a different model, data, training config or code: not "
                    "resuming; starting fresh and removing the old checkpoints", checkpoint_dir)
        for old in checkpoint_dirs(checkpoint_dir):
            shutil.rmtree(old)
    for path, _ in scan.resumable:
        try:
            loaded = read_checkpoint(path)
        except Exception as err:  # damaged or truncated: any error from json, torch or safetensors
            log.warning("checkpoint %s is damaged (%s): trying the previous one", path, str(err).splitlines()[0])
            continue
        log.info("resuming from %s (step %d)", path, loaded[0]["step"])
        return loaded
    return None


# --- divergence --------------------------------------------------------------------------------------------

def last_good_checkpoint(checkpoint_dir: Path) -> str:
    """Where the user can go back to after a divergence (no checkpoint ever holds non-finite values)."""
    newest = checkpoint_dirs(checkpoint_dir)
    kept = f"the last good checkpoint, {newest[0]}, is kept" if newest else "no checkpoint was written"
    return f"{kept}; lower train.lr (or train.muon_lr), or set train.grad_clip"


def check_finite(losses: list[float], done: int, checkpoint_dir: Path) -> None:
    """Stop a run whose loss became inf or nan (it never recovers: the weights are poisoned)."""
    bad = next((loss for loss in losses if not math.isfinite(loss)), None)
    if bad is not None:
        raise TrainingDiverged(f"training diverged: the loss became {bad} by step {done}; "
                               f"{last_good_checkpoint(checkpoint_dir)}")


def weights_finite(model: torch.nn.Module) -> bool:
    """Whether every weight (this rank's shard, under FSDP) is finite: checked before each checkpoint."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    return bool(torch.stack([p.detach().isfinite().all() for p in local]).all())


# --- one step ----------------------------------------------------------------------------------------------

def train_step(step_model: torch.nn.Module, model: GPT, optimizers: list[torch.optim.Optimizer],
               data: TokenWindows, cfg: TrainConfig, step: int, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step (0-based `step`): set its lr, accumulate grad_accum_steps micro-batches, clip,
    update. Returns (mean loss of this rank's micro-batches, global grad norm), both still on the device."""
    set_lr(optimizers, lr_at(step, cfg) / cfg.lr)
    loss_sum = torch.zeros((), device=runtime.device)
    for micro in range(cfg.grad_accum_steps):
        x, y = data.batch(cfg.batch_size, cfg.seed, step, runtime.rank, runtime.world_size, micro_step=micro,
                          device=runtime.device)
        with gradient_sync(step_model, model, enabled=micro == cfg.grad_accum_steps - 1):
            with autocast(runtime.device, cfg.dtype):
                _, loss = step_model(x, y)
            (loss / cfg.grad_accum_steps).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss_sum / cfg.grad_accum_steps, grad_norm


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


def record_attention(record: AttentionRecord | None, model: GPT, runtime: Runtime, step: int) -> None:
    """Add the attention after `step` steps to the record, which rank 0 keeps. A collective under FSDP, whose
    ranks hold shards of the weights: they are gathered for the frame."""
    if record is None:
        return
    weights = gather_weights(model, runtime) if is_sharded(model) else None
    if runtime.is_main:
        record.add(step, attention_frame(frame_model(model, weights), record.ids))


# --- the run -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
    model: GPT  # the trained model, uncompiled (sharded under FSDP)
    weights: dict[str, torch.Tensor]  # its full weights on rank 0 (empty on other ranks), tied aliases once
    metrics: dict[str, Any]  # what metrics/train.json holds
    history: list[dict[str, Any]]  # one row per log step of the whole run (restored across resumes)
    step_losses: list[float]  # the training loss of every step this process ran
    resumed_from: int  # step the run resumed from (0: a fresh start)
    attention: AttentionRecord | None  # on rank 0: the attention at step 0 and every evaluation


def final_metrics(history: list[dict[str, Any]], meter: ThroughputMeter, model: GPT, steps: int,
                  tokens_seen: int, peak_source: str, resumed_from: int, dtype: str) -> dict[str, Any]:
    """metrics/train.json: the last logged train loss and val loss of the run, its speed, its size."""
    val_losses = [row["val_loss"] for row in history if row["val_loss"] is not None]
    return {
        "train_loss": history[-1]["train_loss"] if history else math.nan,
        "val_loss": val_losses[-1] if val_losses else math.nan,
        "tokens_per_sec": meter.run_tokens_per_sec,
        "mfu": meter.run_mfu,
        "steps": steps,
        "tokens_seen": tokens_seen,
        "parameters": model.num_params(),
        "flops_per_token": meter.flops_per_token,
        "peak_flops": meter.run_peak,
        "peak_flops_source": peak_source,
        "dtype": dtype,  # what train.dtype resolved to
        "resumed_from_step": resumed_from,
    }


def train(model_cfg: GPTConfig, cfg: TrainConfig, tokens_dir: Path, checkpoint_dir: Path,
          runtime: Runtime | torch.device | str, on_log: Callable[[dict[str, Any]], None] | None = None,
          stop_after: int | None = None, run_state: dict[str, Any] | None = None,
          stop: StopSignals | None = None, attention_ids: list[int] | None = None) -> TrainResult:
    """Train from scratch, or resume from the newest compatible checkpoint in `checkpoint_dir`.

    Every rank of a distributed run calls this; rank 0 alone writes checkpoints and calls `on_log` with each
    history row (the moment to send metrics to a tracker). `stop_after` ends the run after that many steps, as
    an interruption would (tests use it to check resume). `run_state` (JSON) is saved in every checkpoint,
    for the caller to read back with `resumable_state` (the tracker's run id, so a resumed run logs there).
    With `stop`, a SIGINT or SIGTERM ends the run after the current step and a checkpoint (Interrupted); a
    non-finite loss or weight ends it before any checkpoint holds one (TrainingDiverged). With
    `attention_ids`, the attention on those tokens is recorded at step 0 and at every evaluation."""
    runtime = runtime if isinstance(runtime, Runtime) else Runtime(device=torch.device(runtime))
    device = runtime.device
    cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype, device))
    meta = read_meta(tokens_dir)
    fingerprint = run_fingerprint(model_cfg, cfg, meta, attention_ids)
    train_data, val_data = (TokenWindows(meta.shard_paths(tokens_dir, split), model_cfg.block_size,
                                         model_cfg.vocab_size, f"{tokens_dir}: the {split} split")
                            for split in ("train", "val"))
    model = initial_model(model_cfg, cfg.seed).to(device)  # the same initial weights on every rank
    step_model = parallelize(model, runtime, cfg.strategy, cfg.dtype, cfg.compile, cfg.activation_checkpointing)
    optimizers = configure_optimizers(model, cfg, device)

    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * runtime.world_size * model_cfg.block_size
    # One rank measures the peak (ranks sharing a CPU would slow each other); MFU is over all devices.
    peak, peak_source = runtime.broadcast(peak_flops(device, cfg.dtype) if runtime.is_main else None)
    meter = ThroughputMeter(tokens_per_step, model.flops_per_token(), peak * runtime.world_size, device)
    log.info("model %s: %.2fM parameters; %s; %d tokens per step (%d sequences per rank x %d accumulation x %d "
             "ranks x %d); %s; peak %.0f GFLOP/s (%s)", model_cfg.arch, model.num_params() / 1e6, cfg.optimizer,
             tokens_per_step, cfg.batch_size, cfg.grad_accum_steps, runtime.world_size, model_cfg.block_size,
             cfg.dtype, peak / 1e9, peak_source)

    loaded = load_resume_point(checkpoint_dir, fingerprint) if runtime.is_main else None
    state = runtime.broadcast(loaded[0] if loaded else {"step": 0, "tokens_seen": 0, "history": []})
    record = AttentionRecord(list(attention_ids)) if attention_ids else None
    if state["step"] > 0:
        restore_checkpoint(model, optimizers, loaded, runtime)
        meter.load_state_dict(state["throughput"])
        if record is not None and runtime.is_main:
            record = AttentionRecord.from_tensors(loaded[2]["attention"])
    else:
        record_attention(record, model, runtime, 0)
    if runtime.distributed:  # dropout differs across ranks (one process restores its exact RNG instead)
        torch.manual_seed(hash((cfg.seed, runtime.rank, state["step"])) % 2**63)

    start_step, tokens_seen, history = state["step"], state["tokens_seen"], state["history"]
    last_step = cfg.max_steps if stop_after is None else min(cfg.max_steps, start_step + stop_after)
    step_losses: list[float] = []
    row_losses: list[float] = state.get("row_losses", [])  # the next history row's steps so far (in checkpoints)
    device_losses: list[torch.Tensor] = []  # read back when a row or a checkpoint is due: one device sync
    model.train()
    for step in range(start_step, last_step):
        loss, grad_norm = train_step(step_model, model, optimizers, train_data, cfg, step, runtime)
        device_losses.append(loss)
        meter.step()
        done, tokens_seen = step + 1, tokens_seen + tokens_per_step
        signum = runtime.max(stop.received) if stop is not None else 0
        log_now = is_log_step(done, cfg, last_step)
        checkpoint_now = is_checkpoint_step(done, cfg, last_step) or signum > 0
        if log_now or checkpoint_now:
            losses = runtime.mean(torch.stack(device_losses).float()).tolist()
            device_losses.clear()
            check_finite(losses, done, checkpoint_dir)
            row_losses += losses
            step_losses += losses
        if log_now:
            tokens_per_sec = meter.lap()
            with meter.paused():
                val_loss = evaluate_loss(step_model, val_data, cfg, runtime) if is_eval_step(done, cfg) else None
                if val_loss is not None:
                    record_attention(record, model, runtime, done)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            history.append({"step": done, "train_loss": sum(row_losses) / len(row_losses), "val_loss": val_loss,
                            "lr": lr_at(step, cfg), "grad_norm": float(grad_norm), "tokens_per_sec": tokens_per_sec,
                            "mfu": meter.mfu(tokens_per_sec), "tokens_seen": tokens_seen})
            row_losses = []
            if on_log is not None and runtime.is_main:
                on_log(history[-1])
        if checkpoint_now:
            if runtime.max(int(not weights_finite(model))):
                raise TrainingDiverged(f"training diverged: the weights hold inf or nan after step {done}; "
                                       f"{last_good_checkpoint(checkpoint_dir)}")
            with meter.paused():
                save_checkpoint(checkpoint_dir, done, model, optimizers,
                                {**(run_state or {}), "fingerprint": fingerprint, "tokens_seen": tokens_seen,
                                 "history": history, "row_losses": row_losses, "throughput": meter.state_dict(),
                                 "model_config": dataclasses.asdict(model_cfg),
                                 "train_config": dataclasses.asdict(cfg)},
                                cfg.keep_checkpoints, runtime,
                                extra={"attention": record.tensors()} if record is not None else None)
        if signum:
            raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} after step {done} of "
                                      f"{cfg.max_steps}: checkpoint {checkpoint_dir / f'step_{done:08d}'} written; "
                                      f"run the stage again to resume from it")

    if start_step == last_step:
        log.info("the checkpoint at step %d already completes this run", start_step)
    metrics = final_metrics(history, meter, model, last_step, tokens_seen, peak_source, start_step, cfg.dtype)
    return TrainResult(model, gather_weights(model, runtime), metrics, history, step_losses, start_step,
                       record if runtime.is_main else None)
