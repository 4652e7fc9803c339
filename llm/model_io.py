"""The trained-model folder that train writes and evaluate, generate and export-hf read:

  config.json        the model config (GPTConfig as JSON, vocab_size included)
  model.safetensors  float32 weights by parameter name (a tied alias such as lm_head.weight is stored once)
  tokenizer.json     the tokenizer the model was trained with
"""

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from llm.config import from_mapping
from llm.errors import ConfigError, InputError, first_line
from llm.fileio import atomic_dir
from llm.model import GPT, GPTConfig, tied_aliases
from llm.tokenizer import load_tokenizer


def save_model_dir(out: Path, model_cfg: GPTConfig, weights: dict[str, torch.Tensor], tokenizer_path: Path,
                   extra: dict[str, dict] | None = None) -> None:
    """Write the folder atomically; `extra` adds small JSON files by name."""
    with atomic_dir(out) as staging:
        (staging / "config.json").write_text(json.dumps(dataclasses.asdict(model_cfg), indent=2) + "\n")
        save_file(weights, str(staging / "model.safetensors"))
        shutil.copyfile(tokenizer_path, staging / "tokenizer.json")
        for name, content in (extra or {}).items():
            (staging / name).write_text(json.dumps(content, indent=2) + "\n")


def read_model_config(model_dir: Path) -> GPTConfig:
    path = Path(model_dir) / "config.json"
    try:
        values = json.loads(path.read_text())
        if isinstance(values, dict):  # a model saved before the token shift existed has none: no token_shift key
            values = {"token_shift": False, **values}
        return from_mapping(GPTConfig, values, "config.json")
    except FileNotFoundError:
        raise InputError(f"{path}: not found; train a model first (the train stage writes models/final/)") from None
    except (OSError, ValueError, ConfigError) as err:
        raise InputError(f"{path}: not a valid model config ({err})") from None


def check_shapes(cfg: GPTConfig, path: Path) -> None:
    """Compare the tensor shapes the config implies (a model built on the meta device: no memory) with those
    in the weights file's header, before a config.json asking for absurd sizes allocates anything."""
    with torch.device("meta"):
        model = GPT(cfg)
    aliases = tied_aliases(model)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in aliases}
    try:
        with safe_open(str(path), "pt") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    except (OSError, SafetensorError) as err:
        raise InputError(f"{path}: not a readable safetensors file ({first_line(err)})") from None
    for name, shape in expected.items():
        if stored.get(name) != shape:
            raise InputError(f"{path}: weights do not fit config.json: {name} is "
                             f"{stored.get(name, 'missing')}, the config needs {shape}")


def load_weights(model: GPT, path: Path) -> GPT:
    """Load model.safetensors (from a model folder or a checkpoint) into `model`, strictly."""
    try:
        weights = load_file(str(path))
        weights.update({alias: weights[name] for alias, name in tied_aliases(model).items() if name in weights})
        model.load_state_dict(weights, strict=True)
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    except (OSError, SafetensorError, RuntimeError) as err:
        raise InputError(f"{path}: weights do not fit the model config ({first_line(err)})") from None
    return model


def load_model_dir(model_dir: Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """The model (float32, eval mode, on `device`) and its tokenizer."""
    model_dir = Path(model_dir)
    cfg = read_model_config(model_dir)
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    if tokenizer.get_vocab_size() != cfg.vocab_size:
        raise InputError(f"{model_dir}/tokenizer.json: {tokenizer.get_vocab_size()} tokens, but config.json "
                         f"says vocab_size {cfg.vocab_size}")
    check_shapes(cfg, model_dir / "model.safetensors")
    model = load_weights(GPT(cfg), model_dir / "model.safetensors")
    return model.to(device).eval(), tokenizer
