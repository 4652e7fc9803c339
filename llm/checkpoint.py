"""Checkpoints that resume exactly and never execute code when loaded.

A checkpoint is a folder step_NNNNNNNN/ written whole and atomically (temp folder, fsync, rename):
  model.safetensors   weights (float32)
  optimizer.pt        optimizer state and RNG tensors, read back with torch.load(weights_only=True)
  state.json          step, tokens seen, fingerprint of the run's config, numpy/python RNG states
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

from llm.fileio import atomic_dir

log = logging.getLogger(__name__)

_NAME = re.compile(r"step_(\d{8})")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, newest first."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """safetensors needs each storage once: tied weights are saved under their first name only."""
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    save_file(tensors, str(path))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    tensors = load_file(str(path))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {name for name in missing if _is_tied(model, name)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path}: weights do not fit the model (missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)})")


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    state = model.state_dict()
    return any(other != name and state[other].data_ptr() == state[name].data_ptr() for other in state)


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int) -> Path:
    """Write step_NNNNNNNN/ atomically, then delete all but the newest `keep` checkpoints."""
    path = Path(root) / f"step_{step:08d}"
    with atomic_dir(path) as tmp:
        save_weights(model, tmp / "model.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        full_state = {**state, "step": step, "numpy_rng": _numpy_rng_state(), "python_rng": _python_rng_state()}
        (tmp / "state.json").write_text(json.dumps(full_state, indent=2))
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    for old in checkpoint_dirs(root)[keep:]:
        shutil.rmtree(old)
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG states from `path`; return its state.json. Raises on any damage."""
    state = json.loads((path / "state.json").read_text())
    bundle = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    load_weights(model, path / "model.safetensors")
    optimizer.load_state_dict(bundle["optimizer"])
    torch.set_rng_state(bundle["torch_rng"])
    np.random.set_state(_from_json_numpy(state["numpy_rng"]))
    random.setstate(_from_json_python(state["python_rng"]))
    return state


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


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
