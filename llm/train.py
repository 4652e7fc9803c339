"""The training loop: AdamW or Muon (llm/optim.py), warmup + cosine schedule, gradient accumulation, clipping,
bf16 autocast, periodic evaluation, checkpoints and exact resume.

A run is a `Trainer`, as torchtitan's is: its set-up builds what the run is once, `resume` restores a
checkpoint, `fit` is the loop and reads as the algorithm. Each rule the loop follows has one home here: which
checkpoint a run resumes from (`newest_of_run`), one optimizer step (`Trainer.train_step`), when a step logs,
evaluates or checkpoints (`is_log_step`, `is_eval_step`, `is_checkpoint_step`), and what the run reports
(`Trainer.final_metrics`). What a checkpoint and a history row hold are records owned by llm/checkpoint.py and
llm/history.py.
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
from types import ModuleType
from typing import Any, Protocol

import torch

import llm.data
import llm.model
import llm.optim
from llm.attention import AttentionRecord, attention_frame, frame_model
from llm.checkpoint import (
    Checkpoint,
    CheckpointState,
    checkpoint_dirs,
    checkpoint_path,
    gather_weights,
    read_checkpoint,
    read_state,
    restore_checkpoint,
    save_checkpoint,
    weight_shapes,
)
from llm.configs.train import TrainConfig
from llm.data import VAL_STREAM, TokenWindows
from llm.distributed import Runtime
from llm.errors import Interrupted, TrainingDiverged, first_line
from llm.history import HistoryRow
from llm.model import GPT, GPTConfig, initial_model, tied_aliases
from llm.optim import configure_optimizers, lr_at, lr_scale, set_lr
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

def code_sha256(module: ModuleType) -> str:
    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()


def run_fingerprint(model_cfg: GPTConfig, cfg: TrainConfig, data_identity: dict[str, Any],
                    attention_ids: list[int] | None = None) -> str:
    """What a checkpoint must share with this run to be resumed: the model, the data (and the weights it starts
    from, for a fine-tuning: `data_identity`), the code of the model and the loop, every setting that shapes
    the trajectory (NOT_SHAPING excluded) and the tokens whose attention is recorded. So a run whose params or
    code changed starts fresh, as DVC expects."""
    shaping = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_SHAPING}
    code = {name: code_sha256(module) for name, module in CODE.items()}
    blob = json.dumps({"model": dataclasses.asdict(model_cfg), "train": shaping, "data": data_identity, "code": code,
                       **({"attention_ids": list(attention_ids)} if attention_ids else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class Batches(Protocol):
    """Where a run's batches come from: (x, y) of shape (batch_size, block_size) for this rank, a pure function
    of (seed, step, rank, world size, micro-step). A target of llm.model.IGNORE is trained on nothing."""

    def batch(self, batch_size: int, seed: int, step: int, rank: int = 0, world_size: int = 1, micro_step: int = 0,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclasses.dataclass(frozen=True)
class TrainingData:
    train: Batches
    val: Batches  # the fixed validation batches draw from here
    identity: dict[str, Any]  # JSON that changes when the data (or the starting weights) do: in the fingerprint


def pretraining_data(meta: TokensMeta, tokens_dir: Path, block_size: int, vocab_size: int,
                     periodic_rows: float = 0.0) -> TrainingData:
    """Random windows of the token shards' train and val splits; `periodic_rows` of the train rows periodic."""
    train, val = (TokenWindows(meta.shard_paths(tokens_dir, split), block_size, vocab_size,
                               f"{tokens_dir}: the {split} split", periodic_rows if split == "train" else 0.0)
                  for split in ("train", "val"))
    identity = {"tokenizer_sha256": meta.tokenizer_sha256, "splits": dataclasses.asdict(meta)["splits"]}
    return TrainingData(train, val, identity)


def newest_of_run(checkpoint_dir: Path, fingerprint: str) -> list[tuple[Path, CheckpointState]] | None:
    """The rule for resuming: the newest checkpoint whose state.json reads decides whose folder this is. If it
    is this run's, its checkpoints that read are the candidates, newest first; if another run's (model, data,
    config or code changed), None: the run starts fresh."""
    readable = [(path, state) for path in checkpoint_dirs(checkpoint_dir) if (state := read_state(path)) is not None]
    if readable and readable[0][1].fingerprint != fingerprint:
        return None
    return readable


def load_resume_point(checkpoint_dir: Path, fingerprint: str,
                      shapes: dict[str, tuple[int, ...]] | None = None) -> Checkpoint | None:
    """The newest checkpoint of this run that reads whole (and holds weights of `shapes`, the model's), else
    None. Another run's checkpoints are removed, so the folder holds one run."""
    candidates = newest_of_run(checkpoint_dir, fingerprint)
    if candidates is None:
        log.warning("checkpoints in %s are from a different model, data, training config or code: not "
                    "resuming; starting fresh and removing the old checkpoints", checkpoint_dir)
        for old in checkpoint_dirs(checkpoint_dir):
            shutil.rmtree(old)
        candidates = []
    for path, _ in candidates:
        try:
            loaded = read_checkpoint(path, shapes)
        except Exception as err:  # damaged or truncated: any error from json, torch or safetensors
            log.warning("checkpoint %s is damaged (%s): trying the previous one", path, first_line(err))
            continue
        log.info("resuming from %s (step %d)", path, loaded.state.step)
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


# --- the run -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Progress:
    """Where the loop stands: what a checkpoint restores, and what the next history row collects."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    history: list[HistoryRow] = dataclasses.field(default_factory=list)
    row_losses: list[float] = dataclasses.field(default_factory=list)  # the steps since the last history row


@dataclasses.dataclass
class TrainResult:
    model: GPT  # the trained model, uncompiled (sharded under FSDP)
    weights: dict[str, torch.Tensor]  # its full weights on rank 0 (empty on other ranks), tied aliases once
    metrics: dict[str, Any]  # what metrics/train.json holds
    history: list[HistoryRow]  # one row per log step of the whole run (restored across resumes)
    step_losses: list[float]  # the training loss of every step this process ran
    resumed_from: int  # step the run resumed from (0: a fresh start)
    attention: AttentionRecord | None  # on rank 0: the attention at step 0 and every evaluation


class Trainer:
    """One training run. `__init__` builds what the run is, once (data, model and its parallel wrapper,
    optimizers, throughput meter, attention record); `resume` restores the newest checkpoint of this run, if
    any; `fit` is the loop. Every rank of a distributed run makes one; rank 0 alone writes checkpoints and
    calls `on_log`.

    Pretraining hands it the token shards' windows (`pretraining_data`); fine-tuning (llm/sft.py) reuses the set-up
    and the loop with other `data` (conversations, whose targets mask what is not trained) and `initial_weights`
    (the base model's)."""

    def __init__(self, model_cfg: GPTConfig, cfg: TrainConfig, data: TrainingData, checkpoint_dir: Path,
                 runtime: Runtime, attention_ids: list[int] | None = None,
                 initial_weights: dict[str, torch.Tensor] | None = None) -> None:
        self.runtime, self.checkpoint_dir = runtime, checkpoint_dir
        self.cfg = cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype, runtime.device))
        self.model_cfg = model_cfg
        self.fingerprint = run_fingerprint(model_cfg, cfg, data.identity, attention_ids)
        self.train_data, self.val_data = data.train, data.val
        self.model = initial_model(model_cfg, cfg.seed)  # the same initial weights on every rank
        if initial_weights is not None:
            aliases = {alias: initial_weights[name] for alias, name in tied_aliases(self.model).items()}
            self.model.load_state_dict({**initial_weights, **aliases}, strict=True)
        self.model.to(runtime.device)
        self.step_model = parallelize(self.model, runtime, cfg.strategy, cfg.dtype, cfg.compile,
                                      cfg.activation_checkpointing)
        self.optimizers = configure_optimizers(self.model, cfg, runtime.device)
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * runtime.world_size * model_cfg.block_size
        # One rank measures the peak (ranks sharing a CPU would slow each other); MFU is over all devices.
        peak, self.peak_source = runtime.broadcast(peak_flops(runtime.device, cfg.dtype) if runtime.is_main else None)
        self.meter = ThroughputMeter(self.tokens_per_step, self.model.flops_per_token(), peak * runtime.world_size,
                                     runtime.device)
        self.record = AttentionRecord(list(attention_ids)) if attention_ids else None
        log.info("model %s: %.2fM parameters; %s; %d tokens per step (%d sequences per rank x %d accumulation x %d "
                 "ranks x %d); %s; peak %.0f GFLOP/s (%s)", model_cfg.arch, self.model.num_params() / 1e6,
                 cfg.optimizer, self.tokens_per_step, cfg.batch_size, cfg.grad_accum_steps, runtime.world_size,
                 model_cfg.block_size, cfg.dtype, peak / 1e9, self.peak_source)

    def resume(self) -> tuple[Progress, str | None]:
        """Restore the newest checkpoint of this run (a collective); (where the run stands, the tracker run id the
        checkpoint recorded). A fresh start records the attention of the initial weights instead."""
        loaded = (load_resume_point(self.checkpoint_dir, self.fingerprint, weight_shapes(self.model))
                  if self.runtime.is_main else None)
        state = self.runtime.broadcast(loaded.state if loaded else None)
        if state is None:
            self.record_attention(0)
            progress, run_id = Progress(), None
        else:
            restore_checkpoint(self.model, self.optimizers, loaded, self.runtime)
            self.meter.load_state_dict(state.throughput)
            if self.record is not None and self.runtime.is_main:
                self.record = AttentionRecord.from_tensors(loaded.bundle["attention"])
            progress = Progress(state.step, state.tokens_seen, list(state.history), list(state.row_losses))
            run_id = state.tracker_run_id
        if self.runtime.distributed:  # dropout differs across ranks (one process restores its exact RNG instead)
            torch.manual_seed(hash((self.cfg.seed, self.runtime.rank, progress.step)) % 2**63)
        return progress, run_id

    def fit(self, progress: Progress, on_log: Callable[[HistoryRow], None] | None = None,
            stop_after: int | None = None, stop: StopSignals | None = None,
            tracker_run_id: str | None = None) -> TrainResult:
        """Train from `progress` (what `resume` returned) to train.max_steps, or for `stop_after` steps, as an
        interruption would end it (tests use it to check resume). With `stop`, a SIGINT or SIGTERM ends the run
        after the current step and a checkpoint (Interrupted); a non-finite loss or weight ends it before any
        checkpoint holds one (TrainingDiverged). `tracker_run_id` is kept in every checkpoint."""
        cfg, runtime = self.cfg, self.runtime
        start_step = progress.step
        last_step = cfg.max_steps if stop_after is None else min(cfg.max_steps, start_step + stop_after)
        step_losses: list[float] = []
        device_losses: list[torch.Tensor] = []  # read back when a row or a checkpoint is due: one device sync
        self.model.train()
        for step in range(start_step, last_step):
            loss, grad_norm = self.train_step(step)
            device_losses.append(loss)
            self.meter.step()
            progress.step, progress.tokens_seen = step + 1, progress.tokens_seen + self.tokens_per_step
            signum = runtime.max(stop.received) if stop is not None else 0
            log_now = is_log_step(progress.step, cfg, last_step)
            checkpoint_now = is_checkpoint_step(progress.step, cfg, last_step) or signum > 0
            if log_now or checkpoint_now:
                losses = runtime.mean(torch.stack(device_losses).float()).tolist()
                device_losses.clear()
                check_finite(losses, progress.step, self.checkpoint_dir)
                progress.row_losses += losses
                step_losses += losses
            if log_now:
                progress.history.append(self.history_row(progress, grad_norm))
                progress.row_losses = []
                if on_log is not None and runtime.is_main:
                    on_log(progress.history[-1])
            if checkpoint_now:
                self.save(progress, tracker_run_id)
            if signum:
                written = checkpoint_path(self.checkpoint_dir, progress.step)
                raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} after step {progress.step} of "
                                          f"{cfg.max_steps}: checkpoint {written} written; run the stage again to "
                                          "resume from it")
        if start_step == last_step:
            log.info("the checkpoint at step %d already completes this run", start_step)
        return TrainResult(self.model, gather_weights(self.model, runtime), self.final_metrics(progress, start_step),
                           progress.history, step_losses, start_step, self.record if runtime.is_main else None)

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step (0-based `step`): set its lr, accumulate grad_accum_steps micro-batches, clip,
        update. Returns (mean loss of this rank's micro-batches, global grad norm), both still on the device."""
        cfg, runtime = self.cfg, self.runtime
        set_lr(self.optimizers, lr_scale(step, cfg))
        loss_sum = torch.zeros((), device=runtime.device)
        for micro in range(cfg.grad_accum_steps):
            x, y = self.train_data.batch(cfg.batch_size, cfg.seed, step, runtime.rank, runtime.world_size,
                                         micro_step=micro, device=runtime.device)
            with gradient_sync(self.step_model, self.model, enabled=micro == cfg.grad_accum_steps - 1):
                with autocast(runtime.device, cfg.dtype):
                    _, loss = self.step_model(x, y)
                (loss / cfg.grad_accum_steps).backward()
            loss_sum += loss.detach()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss_sum / cfg.grad_accum_steps, grad_norm

    @torch.no_grad()
    def evaluate_loss(self) -> float:
        """Mean loss over `eval_batches` fixed validation batches (the same ones at every evaluation), averaged
        over ranks, each rank taking its slice of every batch."""
        cfg, runtime = self.cfg, self.runtime
        self.step_model.eval()
        total = torch.zeros((), device=runtime.device)
        for i in range(cfg.eval_batches):
            x, y = self.val_data.batch(cfg.batch_size, cfg.seed, VAL_STREAM, runtime.rank, runtime.world_size,
                                       micro_step=i, device=runtime.device)
            with autocast(runtime.device, cfg.dtype):
                _, loss = self.step_model(x, y)
            total += loss.detach().float()
        self.step_model.train()
        return runtime.mean(total).item() / cfg.eval_batches

    def record_attention(self, step: int) -> None:
        """Add the attention after `step` steps to the record, which rank 0 keeps. A collective under FSDP, whose
        ranks hold shards of the weights: they are gathered for the frame."""
        if self.record is None:
            return
        weights = gather_weights(self.model, self.runtime) if is_sharded(self.model) else None
        if self.runtime.is_main:
            self.record.add(step, attention_frame(frame_model(self.model, weights), self.record.ids))

    def history_row(self, progress: Progress, grad_norm: torch.Tensor) -> HistoryRow:
        """The row of a log step: the lap's speed, and the validation loss (and attention) on eval steps, which
        the meter does not count."""
        tokens_per_sec = self.meter.lap()
        with self.meter.paused():
            val_loss = self.evaluate_loss() if is_eval_step(progress.step, self.cfg) else None
            if val_loss is not None:
                self.record_attention(progress.step)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        return HistoryRow(step=progress.step, tokens_seen=progress.tokens_seen,
                          train_loss=sum(progress.row_losses) / len(progress.row_losses), val_loss=val_loss,
                          lr=lr_at(progress.step - 1, self.cfg), grad_norm=float(grad_norm),
                          tokens_per_sec=tokens_per_sec, mfu=self.meter.mfu(tokens_per_sec))

    def save(self, progress: Progress, tracker_run_id: str | None) -> None:
        """A checkpoint of `progress`, once every rank's weights are known to be finite."""
        if self.runtime.max(int(not weights_finite(self.model))):
            raise TrainingDiverged(f"training diverged: the weights hold inf or nan after step {progress.step}; "
                                   f"{last_good_checkpoint(self.checkpoint_dir)}")
        with self.meter.paused():
            state = CheckpointState(step=progress.step, tokens_seen=progress.tokens_seen, fingerprint=self.fingerprint,
                                    history=tuple(progress.history), row_losses=tuple(progress.row_losses),
                                    throughput=self.meter.state_dict(),
                                    model_config=dataclasses.asdict(self.model_cfg),
                                    train_config=dataclasses.asdict(self.cfg), tracker_run_id=tracker_run_id)
            extra = {"attention": self.record.tensors()} if self.record is not None else None
            save_checkpoint(self.checkpoint_dir, self.model, self.optimizers, state, self.cfg.keep_checkpoints,
                            self.runtime, extra=extra)

    def final_metrics(self, progress: Progress, resumed_from: int) -> dict[str, Any]:
        """metrics/train.json: the last logged train loss and val loss of the run, its speed, its size."""
        val_losses = [row.val_loss for row in progress.history if row.val_loss is not None]
        return {
            "train_loss": progress.history[-1].train_loss if progress.history else math.nan,
            "val_loss": val_losses[-1] if val_losses else math.nan,
            "tokens_per_sec": self.meter.run_tokens_per_sec,
            "mfu": self.meter.run_mfu,
            "steps": progress.step,
            "tokens_seen": progress.tokens_seen,
            "parameters": self.model.num_params(),
            "flops_per_token": self.meter.flops_per_token,
            "peak_flops": self.meter.run_peak,
            "peak_flops_source": self.peak_source,
            "dtype": self.cfg.dtype,  # what train.dtype resolved to
            "resumed_from_step": resumed_from,
        }


def train(model_cfg: GPTConfig, cfg: TrainConfig, tokens_dir: Path, checkpoint_dir: Path,
          runtime: Runtime | torch.device | str, on_log: Callable[[HistoryRow], None] | None = None,
          stop_after: int | None = None, stop: StopSignals | None = None,
          attention_ids: list[int] | None = None) -> TrainResult:
    """Train from scratch, or resume from the newest checkpoint of this run in `checkpoint_dir`: a Trainer set
    up, resumed and run to the end (see Trainer.fit for `on_log`, `stop_after`, `stop`)."""
    runtime = runtime if isinstance(runtime, Runtime) else Runtime(device=torch.device(runtime))
    data = pretraining_data(read_meta(tokens_dir), tokens_dir, model_cfg.block_size, model_cfg.vocab_size,
                            cfg.periodic_rows)
    trainer = Trainer(model_cfg, cfg, data, checkpoint_dir, runtime, attention_ids)
    progress, _ = trainer.resume()
    return trainer.fit(progress, on_log=on_log, stop_after=stop_after, stop=stop)
