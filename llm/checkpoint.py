"""Checkpoints that resume exactly, under any world size, and never execute code when loaded.

A checkpoint is a folder step_NNNNNNNN/ written whole and atomically (temp folder, fsync, rename) by rank 0
from full (gathered) state dicts, so a run saved by N processes resumes on M:
  model.safetensors   weights, float32, by parameter name (a tied alias such as lm_head.weight is stored once)
  optimizer.pt        the state of every optimizer (AdamW, and Muon if used) by parameter name, the torch RNG,
                      and what else the loop keeps as tensors (the attention record); read with
                      torch.load(weights_only=True)
  state.json          a CheckpointState: step, tokens seen, fingerprint of the run, the history so far, configs,
                      numpy/python RNG states; read back only through CheckpointState.from_dict, which checks it
"""

import dataclasses
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llm.distributed import Runtime
from llm.errors import first_line
from llm.fileio import atomic_dir, remove_stale_temps
from llm.history import HistoryRow
from llm.model import tied_aliases
from llm.throughput import ThroughputMeter

log = logging.getLogger(__name__)

_NAME = re.compile(r"step_(\d{8})")


def checkpoint_path(root: Path, step: int) -> Path:
    """The folder of the checkpoint after `step` steps."""
    return Path(root) / f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder's name says it was taken after."""
    return int(_NAME.fullmatch(Path(path).name).group(1))


def _state_dicts():
    """torch's state-dict API for (possibly sharded) models, imported on first use: it takes two seconds,
    which listing and reading checkpoints (the evaluate stage) need not pay."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


def gather_weights(model: torch.nn.Module, runtime: Runtime) -> dict[str, torch.Tensor]:
    """Full float32 weights on CPU, on rank 0 (empty elsewhere); a collective when distributed."""
    api = _state_dicts()
    options = api.StateDictOptions(full_state_dict=True, cpu_offload=runtime.distributed)
    aliases = tied_aliases(model)
    weights = api.get_model_state_dict(model, options=options)
    return {name: t.detach().to("cpu").contiguous() for name, t in weights.items() if name not in aliases}


def checkpoint_dirs(root: Path) -> list[Path]:
    """Checkpoints under `root`, newest first."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


@dataclasses.dataclass(frozen=True)
class CheckpointState:
    """state.json: where a run stands after `step` steps, and what it needs besides tensors to go on exactly.
    Its one writer is `to_dict`, its one reader `from_dict`, which checks every field before a byte is trusted."""

    step: int  # optimizer steps done
    tokens_seen: int  # training tokens consumed, over all ranks
    fingerprint: str  # the run's identity (llm/train.py run_fingerprint): only the same run resumes
    history: tuple[HistoryRow, ...]  # one row per log step so far
    row_losses: tuple[float, ...]  # the losses of the steps since the last history row
    throughput: dict[str, float]  # ThroughputMeter.state_dict(): the run's speed so far
    model_config: dict[str, Any]  # the configs the run was made with, for a reader of the folder
    train_config: dict[str, Any]
    tracker_run_id: str | None = None  # the experiment tracker's run, so a resumed run logs to the same one
    # The host RNGs at the checkpoint (the torch RNG is a tensor, in optimizer.pt); taken when the record is made.
    numpy_rng: list = dataclasses.field(default_factory=lambda: _numpy_rng_state())
    python_rng: list = dataclasses.field(default_factory=lambda: _python_rng_state())

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "history": [row.to_dict() for row in self.history],
                "row_losses": list(self.row_losses)}

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> "CheckpointState":
        """The state of the checkpoint folder `path`; ValueError names the field that is missing, of the wrong
        type or does not restore (its step must be the folder's), so that resume can fall back to the
        previous checkpoint instead of failing halfway through restoring this one."""
        if not isinstance(data, dict):
            raise ValueError("state.json is not a JSON object")
        for field, kind in _STATE_TYPES.items():
            if not isinstance(data.get(field), kind) or isinstance(data.get(field), bool):
                raise ValueError(f"state.json field {field!r} is missing or not a {kind.__name__}")
        if checkpoint_step(path) != data["step"]:
            raise ValueError(f"state.json says step {data['step']}")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in data["row_losses"]):
            raise ValueError("state.json field 'row_losses' holds a non-number")
        try:
            history = tuple(HistoryRow.from_dict(row) for row in data["history"])
        except ValueError as err:
            raise ValueError(f"state.json field 'history': {err}") from None
        if not all(isinstance(data["throughput"].get(k), int | float) for k in ThroughputMeter.STATE_KEYS):
            raise ValueError("state.json field 'throughput' is incomplete")
        try:
            np.random.RandomState().set_state(_from_json_numpy(data["numpy_rng"]))
            random.Random().setstate(_from_json_python(data["python_rng"]))
        except (TypeError, ValueError) as err:
            raise ValueError(f"state.json holds an RNG state that does not restore ({err})") from None
        run_id = data.get("tracker_run_id")
        return cls(step=data["step"], tokens_seen=data["tokens_seen"], fingerprint=data["fingerprint"],
                   history=history, row_losses=tuple(float(v) for v in data["row_losses"]),
                   throughput=data["throughput"], model_config=data["model_config"],
                   train_config=data["train_config"], tracker_run_id=run_id if isinstance(run_id, str) else None,
                   numpy_rng=data["numpy_rng"], python_rng=data["python_rng"])

    def restore_host_rngs(self) -> None:
        np.random.set_state(_from_json_numpy(self.numpy_rng))
        random.setstate(_from_json_python(self.python_rng))


# state.json's fields that must be there, with their JSON types (the rest are checked by from_dict).
_STATE_TYPES = {"step": int, "tokens_seen": int, "fingerprint": str, "history": list, "row_losses": list,
                "throughput": dict, "model_config": dict, "train_config": dict, "numpy_rng": list,
                "python_rng": list}


class Checkpoint(NamedTuple):
    """A checkpoint as read from disk."""

    state: CheckpointState
    weights: dict[str, torch.Tensor]  # by parameter name, a tied alias once
    bundle: dict[str, Any]  # optimizer.pt: "optimizer", "torch_rng" and the loop's extra tensors


def read_state(path: Path) -> CheckpointState | None:
    """A checkpoint's state.json when it reads whole and checks, else None (with a warning: the folder is
    damaged, and resume passes it over)."""
    try:
        return CheckpointState.from_dict(json.loads((Path(path) / "state.json").read_text()), Path(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as err:
        log.warning("checkpoint %s: state.json does not read (%s): passed over", path, first_line(err))
        return None


def read_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> Checkpoint:
    """The whole checkpoint from disk; raises on any damage. No code is executed. With `shapes` (the model's
    weights as a checkpoint stores them, by name: weight_shapes), weights of another model's names or shapes are
    damage too (ValueError), found before anything is restored: restoring them failed halfway, on every rerun."""
    state = CheckpointState.from_dict(json.loads((path / "state.json").read_text()), path)
    weights = load_file(str(path / "model.safetensors"))
    if shapes is not None:
        _check_shapes(weights, shapes)
    bundle = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    return Checkpoint(state, weights, bundle)


def weight_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The full shape of each weight `model` checkpoints (a tied alias once), without gathering anything: a
    sharded (FSDP) parameter reports its whole shape."""
    aliases = tied_aliases(model)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items() if name not in aliases}


def _check_shapes(weights: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    missing, unexpected = sorted(shapes.keys() - weights.keys()), sorted(weights.keys() - shapes.keys())
    if missing or unexpected:
        (name, problem) = (missing[0], "is missing") if missing else (unexpected[0], "is not in this model")
        raise ValueError(f"model.safetensors holds another model's weights: {name} {problem}")
    for name, shape in sorted(shapes.items()):
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"model.safetensors holds another model's weights: {name} is "
                             f"{list(weights[name].shape)}, this model's is {list(shape)}")


def save_checkpoint(root: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                    state: CheckpointState, keep: int, runtime: Runtime, extra: dict[str, Any] | None = None) -> None:
    """Every rank calls this (the state is gathered); rank 0 writes step_NNNNNNNN/ for `state.step` and keeps the
    newest `keep`. `extra` (tensors, by name) goes into optimizer.pt beside the optimizer state."""
    weights = gather_weights(model, runtime)
    api = _state_dicts()
    options = api.StateDictOptions(full_state_dict=True, cpu_offload=runtime.distributed)
    optimizer_state = api.get_optimizer_state_dict(model, optimizers, options=options)
    if runtime.is_main:
        remove_stale_temps(Path(root), _NAME.pattern)  # what a killed run left, whatever its step
        with atomic_dir(checkpoint_path(root, state.step)) as tmp:
            save_file(weights, str(tmp / "model.safetensors"))
            torch.save({"optimizer": optimizer_state, "torch_rng": torch.get_rng_state(), **(extra or {})},
                       tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps(state.to_dict(), indent=2))
            for file in tmp.iterdir():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        for old in checkpoint_dirs(root)[keep:]:
            shutil.rmtree(old)
    runtime.barrier()


def restore_checkpoint(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], loaded: Checkpoint | None,
                       runtime: Runtime) -> None:
    """Load what rank 0 read (`loaded`; None on other ranks) into the (possibly sharded) model and optimizer
    of every rank. A collective when distributed. Rank 0 (or the only process) also restores its RNGs."""
    api = _state_dicts()
    options = api.StateDictOptions(full_state_dict=True, broadcast_from_rank0=runtime.distributed, strict=True)
    weights, optimizer_state = {}, {}
    if loaded is not None:
        weights = {**loaded.weights, **{alias: loaded.weights[name] for alias, name in tied_aliases(model).items()}}
        optimizer_state = loaded.bundle["optimizer"]
    api.set_model_state_dict(model, weights, options=options)
    api.set_optimizer_state_dict(model, optimizers, optimizer_state, options=options)
    if loaded is not None:
        torch.set_rng_state(loaded.bundle["torch_rng"])
        loaded.state.restore_host_rngs()


def _numpy_rng_state() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _from_json_numpy(state: list) -> tuple:
    name, keys, pos, has_gauss, gauss = state
    return name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _from_json_python(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss
