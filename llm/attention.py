"""Attention on one text (evaluate.attention_text) as training goes: the tokens it is measured on, one frame of
every layer's and head's attention, and the record the train stage keeps of them, at step 0 and at every
evaluation (plots/attention.safetensors). This module is the record's one reader and writer.

The record travels inside each checkpoint, so a resumed run's record equals an uninterrupted run's.
"""

import dataclasses
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from llm.errors import InputError
from llm.fileio import atomic_path
from llm.model import GPT

MAX_TOKENS = 48  # heatmaps beyond this many tokens are unreadable


def probe_ids(tokenizer: Tokenizer, text: str, eot_id: int, block_size: int) -> list[int]:
    """The ids attention is shown on: <|endoftext|> (where every training document starts), then the text,
    cut to MAX_TOKENS and to the context window."""
    return [eot_id, *tokenizer.encode(text).ids][:min(MAX_TOKENS, block_size)]


@dataclasses.dataclass
class AttentionRecord:
    """Attention frames of one text: frame i, (n_layer, n_head, T, T), was taken after steps[i] steps."""

    ids: list[int]
    steps: list[int] = dataclasses.field(default_factory=list)
    maps: list[np.ndarray] = dataclasses.field(default_factory=list)

    def add(self, step: int, maps: torch.Tensor) -> None:
        self.steps.append(step)
        self.maps.append(maps.detach().float().cpu().numpy())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The record as named tensors: what a checkpoint and plots/attention.safetensors hold."""
        tensors = {"ids": torch.tensor(self.ids, dtype=torch.int64),
                   "steps": torch.tensor(self.steps, dtype=torch.int64)}
        if self.maps:
            tensors["maps"] = torch.from_numpy(np.stack(self.maps))
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "AttentionRecord":
        maps = tensors.get("maps")
        return cls(tensors["ids"].tolist(), tensors["steps"].tolist(),
                   [] if maps is None else list(maps.float().numpy()))


@torch.no_grad()
def attention_frame(model: GPT, ids: list[int]) -> torch.Tensor:
    """Every layer's and head's attention on `ids`, (n_layer, n_head, T, T), with dropout off: the model is put
    back in the mode it was in. `model` holds whole weights (not an FSDP shard)."""
    training = model.training
    model.eval()
    maps = model.attention_maps(torch.tensor([ids], device=model.device))
    model.train(training)
    return maps


def write_record(path: Path, record: AttentionRecord, text: str) -> None:
    with atomic_path(path) as tmp:
        save_file(record.tensors(), str(tmp), metadata={"text": text})


def read_record(path: Path) -> tuple[AttentionRecord, str]:
    """(record, the text it was measured on); a missing or damaged file is an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not found; run the train stage first")
    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get("text", "")
            record = AttentionRecord.from_tensors({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118 (not a dict)
    except (SafetensorError, KeyError, ValueError, OSError) as err:
        raise InputError(f"{path}: not an attention record ({err})") from None
    if len(record.maps) != len(record.steps) or any(m.shape[-1] != len(record.ids) for m in record.maps):
        raise InputError(f"{path}: its frames do not match its steps and tokens")
    return record, text


def frame_model(model: GPT, weights: dict[str, torch.Tensor] | None) -> GPT:
    """The model to measure a frame on: `model` itself, or (under FSDP, where `model` holds a shard) a whole
    copy on the CPU built from its gathered `weights`."""
    if weights is None:
        return model
    with torch.random.fork_rng(devices=[]):  # building it draws initial weights: leave training's RNG alone
        whole = GPT(model.config)
    whole.load_state_dict(weights, strict=False)  # tied aliases are stored once
    return whole
