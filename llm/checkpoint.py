"""Checkpoints that resume exactly, under any world size, and never execute code when loaded.

A checkpoint is a folder step_NNNNNNNN/ written whole and atomically (temp folder, fsync, rename) by rank 0
from full (gathered) state dicts, so a run saved by N processes resumes on M:
  model.safetensors   weights, float32, by parameter name (a tied alias such as lm_head.weight is stored once)
  optimizer.pt        the state of every optimizer (AdamW, and Muon if used) by parameter name, the torch RNG,
                      and what else the loop keeps as tensors (the attention record); read with
                      torch.load(weights_only=True)
  state.json          step, tokens seen, fingerprint of the run, configs, numpy/python RNG states
"""

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llm.distributed import Runtime
from llm.fileio import atomic_dir, remove_stale_temps
from llm.model import tied_aliases

log = logging.getLogger(__name__)

_NAME = re.compile(r"step_(\d{8})")


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


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                    state: dict[str, Any], keep: int, runtime: Runtime, extra: dict[str, Any] | None = None) -> None:
    """Every rank calls this (the state is gathered); rank 0 writes step_NNNNNNNN/ and keeps the newest `keep`.
    `extra` (tensors, by name) goes into optimizer.pt beside the optimizer state."""
    weights = gather_weights(model, runtime)
    api = _state_dicts()
    options = api.StateDictOptions(full_state_dict=True, cpu_offload=runtime.distributed)
    optimizer_state = api.get_optimizer_state_dict(model, optimizers, options=options)
    if runtime.is_main:
        remove_stale_temps(Path(root), _NAME.pattern)  # what a killed run left, whatever its step
        with atomic_dir(Path(root) / f"step_{step:08d}") as tmp:
            save_file(weights, str(tmp / "model.safetensors"))
            torch.save({"optimizer": optimizer_state, "torch_rng": torch.get_rng_state(), **(extra or {})},
                       tmp / "optimizer.pt")
            full_state = {**state, "step": step, "numpy_rng": _numpy_rng_state(), "python_rng": _python_rng_state()}
            (tmp / "state.json").write_text(json.dumps(full_state, indent=2))
            for file in tmp.iterdir():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        for old in checkpoint_dirs(root)[keep:]:
            shutil.rmtree(old)
    runtime.barrier()


# state.json's fields and their JSON types; check_state refuses a file without them (damaged or edited).
STATE_FIELDS = {"step": int, "tokens_seen": int, "fingerprint": str, "history": list, "row_losses": list,
                "throughput": dict, "numpy_rng": list, "python_rng": list}


def check_state(state: Any, path: Path) -> None:
    """Raise ValueError unless `state` (a checkpoint's state.json) has every field, of its type, its step is
    the folder's and its RNG states restore: so a damaged field sends resume to the previous checkpoint
    instead of failing halfway through restoring this one."""
    if not isinstance(state, dict):
        raise ValueError("state.json is not a JSON object")
    for field, kind in STATE_FIELDS.items():
        if not isinstance(state.get(field), kind) or isinstance(state.get(field), bool):
            raise ValueError(f"state.json field {field!r} is missing or not a {kind.__name__}")
    if path.name != f"step_{state['step']:08d}":
        raise ValueError(f"state.json says step {state['step']}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in state["row_losses"]):
        raise ValueError("state.json field 'row_losses' holds a non-number")
    if not all(isinstance(row, dict) and isinstance(row.get("step"), int) for row in state["history"]):
        raise ValueError("state.json field 'history' holds a row without a step")
    if not all(isinstance(state["throughput"].get(k), int | float) for k in ("run_tokens", "run_seconds")):
        raise ValueError("state.json field 'throughput' is incomplete")
    try:
        np.random.RandomState().set_state(_from_json_numpy(state["numpy_rng"]))
        random.Random().setstate(_from_json_python(state["python_rng"]))
    except (TypeError, ValueError) as err:
        raise ValueError(f"state.json holds an RNG state that does not restore ({err})") from None


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(state.json, weights, optimizer bundle) from disk; raises on any damage. No code is executed."""
    state = json.loads((path / "state.json").read_text())
    check_state(state, path)
    weights = load_file(str(path / "model.safetensors"))
    bundle = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    return state, weights, bundle


def restore_checkpoint(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], loaded: tuple | None,
                       runtime: Runtime) -> None:
    """Load what rank 0 read (`loaded`; None on other ranks) into the (possibly sharded) model and optimizer
    of every rank. A collective when distributed. Rank 0 (or the only process) also restores its RNGs."""
    api = _state_dicts()
    options = api.StateDictOptions(full_state_dict=True, broadcast_from_rank0=runtime.distributed, strict=True)
    weights, optimizer_state = {}, {}
    if loaded is not None:
        state, weights, bundle = loaded
        weights = {**weights, **{alias: weights[name] for alias, name in tied_aliases(model).items()}}
        optimizer_state = bundle["optimizer"]
    api.set_model_state_dict(model, weights, options=options)
    api.set_optimizer_state_dict(model, optimizers, optimizer_state, options=options)
    if loaded is not None:
        torch.set_rng_state(bundle["torch_rng"])
        np.random.set_state(_from_json_numpy(state["numpy_rng"]))
        random.setstate(_from_json_python(state["python_rng"]))


def read_state(path: Path) -> dict[str, Any] | None:
    """A checkpoint's state.json when it reads as a JSON object, else None."""
    try:
        state = json.loads((Path(path) / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return state if isinstance(state, dict) else None


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
