"""Typed, frozen configs for each stage, built from plain mappings and validated before any work.

`llm` never reads params.yaml: `stages` loads it and hands each section to `from_mapping`. Every config
checks itself when it is constructed (Validated), so a config object that exists is a valid one.
"""

import dataclasses
import importlib.util
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from llm.errors import ConfigError

EOT = "<|endoftext|>"
MAX_VOCAB = 2**32  # token ids are stored as uint32 at most
MAX_BLOCK_SIZE = 1 << 16  # positions (learned or rotary tables) are allocated up front
MAX_INT = 2**63 - 1  # every integer param fits an int64 (seeds reach numpy and torch generators)


def check_seed(key: str, seed: int) -> None:
    """Seeds reach numpy's generators, which take non-negative integers only."""
    if seed < 0:
        raise ConfigError(key, f"must be >= 0, got {seed}")


ENGINES = ("local", "ray")  # where clean and tokenize run their per-batch work (llm/engine.py)


def check_engine(key: str, engine: str) -> None:
    """An `engine` param; `ray` needs its package, an optional dependency."""
    if engine not in ENGINES:
        raise ConfigError(key, f"must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(key, "the ray engine needs the ray package: pip install -e '.[ray]'")


class Validated:
    """Runs the subclass's `validate` (cross-field checks that raise ConfigError) at construction."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        pass


def check_sampling(temperature: float, top_k: int, top_p: float,
                   key: Callable[[str], str] = lambda param: param) -> None:
    """The one rule for sampling parameters. An error names `key(param)`: the params key
    (evaluate.top_p) or the command-line flag (--top-p) the value came from."""
    if not temperature >= 0:  # also refuses nan
        raise ConfigError(key("temperature"), f"must be >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise ConfigError(key("top_k"), f"must be >= 0 (0 turns it off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(key("top_p"), f"must be in (0, 1] (1 turns it off), got {top_p}")


@dataclasses.dataclass(frozen=True)
class DataConfig(Validated):
    source: str = "shakespeare"  # builtin corpus name, a local folder / file / glob, or a URL (llm/remote.py)
    val_fraction: float = 0.1  # share of documents (by hash of their id) held out for validation
    seed: int = 1337  # salts the document hash that assigns train/val

    def validate(self) -> None:
        if not self.source.strip():
            raise ConfigError("data.source", "must not be empty")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        check_seed("data.seed", self.seed)


@dataclasses.dataclass(frozen=True)
class CleanConfig(Validated):
    min_chars: int = 64  # documents shorter than this after cleaning are dropped
    shard_mb: int = 128  # UTF-8 megabytes of text per Parquet shard in data/clean/
    # Drop a document whose estimated Jaccard similarity (MinHash, word 5-grams) with an earlier kept one is
    # at least this; 0 turns near-duplicate removal off (exact duplicates are always dropped).
    near_dedup: float = 0.0
    num_workers: int = 0  # local cleaning processes; 0 means one per CPU core
    batch_chars: int = 1_000_000  # characters of text handed to a worker at a time (bounds RAM)
    engine: str = "local"  # local (processes on this machine) | ray (tasks on a Ray cluster): same output

    def validate(self) -> None:
        if self.min_chars < 0:
            raise ConfigError("clean.min_chars", f"must be >= 0, got {self.min_chars}")
        if self.shard_mb < 1:
            raise ConfigError("clean.shard_mb", f"must be >= 1, got {self.shard_mb}")
        if not (self.near_dedup == 0 or 0 < self.near_dedup <= 1):
            raise ConfigError("clean.near_dedup", f"must be 0 (off) or in (0, 1], got {self.near_dedup}")
        if self.num_workers < 0:
            raise ConfigError("clean.num_workers", f"must be >= 0, got {self.num_workers}")
        if self.batch_chars < 1:
            raise ConfigError("clean.batch_chars", f"must be >= 1, got {self.batch_chars}")
        check_engine("clean.engine", self.engine)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig(Validated):
    vocab_size: int = 8192  # target vocabulary: 256 byte tokens + merges + special tokens
    min_frequency: int = 2  # a pair must occur this often to be merged
    special_tokens: tuple[str, ...] = (EOT,)  # added with the lowest ids; must include <|endoftext|>
    max_train_chars: int = 100_000_000  # train on at most this many characters of the train split (0 = all of it)

    def validate(self) -> None:
        if EOT not in self.special_tokens:
            raise ConfigError("tokenizer.special_tokens", f"must include {EOT}")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ConfigError("tokenizer.special_tokens", "must not repeat a token")
        if any(not token for token in self.special_tokens):
            raise ConfigError("tokenizer.special_tokens", "must not contain an empty string")
        smallest = 256 + len(self.special_tokens)
        if not smallest <= self.vocab_size <= MAX_VOCAB:
            raise ConfigError(
                "tokenizer.vocab_size",
                f"must be in [{smallest}, {MAX_VOCAB}] (256 bytes + special tokens), got {self.vocab_size}",
            )
        if self.min_frequency < 1:
            raise ConfigError("tokenizer.min_frequency", f"must be >= 1, got {self.min_frequency}")
        if self.max_train_chars < 0:
            raise ConfigError("tokenizer.max_train_chars", f"must be >= 0 (0 = the whole train split), got "
                              f"{self.max_train_chars}")


@dataclasses.dataclass(frozen=True)
class TokenizeConfig(Validated):
    shard_tokens: int = 100_000_000  # tokens per shard file (llm.c uses 1e8)
    num_workers: int = 0  # local encoding processes; 0 means one per CPU core
    max_piece_chars: int = 4096  # longest run encoded at once; a longer run with no space in it is cut
    batch_chars: int = 1_000_000  # characters of text handed to a worker at a time (bounds RAM)
    engine: str = "local"  # local (processes on this machine) | ray (tasks on a Ray cluster): same output

    def validate(self) -> None:
        for name in ("shard_tokens", "max_piece_chars", "batch_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tokenize.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError("tokenize.num_workers", f"must be >= 0, got {self.num_workers}")
        check_engine("tokenize.engine", self.engine)


DTYPES = ("auto", "float32", "bfloat16")
STRATEGIES = ("ddp", "fsdp")
OPTIMIZERS = ("adamw", "muon")

# The architectural parts a model is built from, each a small named choice, and the presets that name a set
# of them. A model key left null (or out) takes its preset's value; config.json stores the resolved parts.
PART_CHOICES = {
    "positions": ("learned", "rope"),  # learned absolute embeddings | rotary (applied to q and k)
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu", "relu2"),  # GELU (4x) | gated SiLU (8/3 x) | squared ReLU (4x)
    "head": ("tied", "untied"),  # output head shares the token embedding, or has its own weights
}
PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 (2019), as nanoGPT builds it.
    "gpt2": {"positions": "learned", "norm": "layernorm", "norm_gain": True, "mlp": "gelu", "head": "tied",
             "bias": True, "qk_norm": False, "logit_softcap": 0.0, "zero_init": False},
    # Llama (2023).
    "llama": {"positions": "rope", "norm": "rmsnorm", "norm_gain": True, "mlp": "swiglu", "head": "untied",
              "bias": False, "qk_norm": False, "logit_softcap": 0.0, "zero_init": False},
    # What the strongest small-model recipes of 2024-25 share (modded-nanogpt's speedrun, nanochat): norms
    # without gains, queries and keys normalised, squared ReLU, a logit softcap, and every output
    # projection (and the head) starting at zero, so each block starts as the identity.
    "modern": {"positions": "rope", "norm": "rmsnorm", "norm_gain": False, "mlp": "relu2", "head": "untied",
               "bias": False, "qk_norm": True, "logit_softcap": 15.0, "zero_init": True},
}
ARCHS = tuple(PRESETS)


@dataclasses.dataclass(frozen=True)
class ModelConfig(Validated):
    arch: str = "gpt2"  # preset naming the parts below: gpt2 | llama | modern
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # query heads; n_embd must divide evenly
    n_embd: int = 384  # width of the residual stream
    block_size: int = 256  # context length in tokens
    dropout: float = 0.0  # on embeddings, attention and residual branches while training
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); null = n_head
    # The parts; null = the preset's choice.
    positions: str | None = None  # learned | rope
    norm: str | None = None  # layernorm | rmsnorm
    norm_gain: bool | None = None  # norms have a learned per-channel gain
    mlp: str | None = None  # gelu | swiglu | relu2
    head: str | None = None  # tied | untied
    bias: bool | None = None  # biases in linear layers and LayerNorm
    qk_norm: bool | None = None  # RMS-normalise each head's queries and keys before attention
    logit_softcap: float | None = None  # logits = c * tanh(logits / c); 0 turns it off
    zero_init: bool | None = None  # output projections (and an untied head) start at zero

    def __post_init__(self) -> None:
        """Resolve every part left null from the preset, once: the config then names the model fully."""
        if self.arch not in PRESETS:
            raise ConfigError("model.arch", f"must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        for name, value in PRESETS[self.arch].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        super().__post_init__()

    def validate(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "n_kv_head"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError("model.n_embd", f"must be divisible by model.n_head ({self.n_embd} % {self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ConfigError("model.n_kv_head", f"must divide model.n_head ({self.n_head} % {self.n_kv_head})")
        for name, choices in PART_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"model.{name}", f"must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError("model.n_head", "rotary positions need an even head size (n_embd / n_head)")
        if not 0.0 <= self.logit_softcap < math.inf:
            raise ConfigError("model.logit_softcap", f"must be a finite value >= 0 (0 turns it off), "
                              f"got {self.logit_softcap}")
        if self.block_size > MAX_BLOCK_SIZE:
            raise ConfigError("model.block_size", f"must be <= {MAX_BLOCK_SIZE}, got {self.block_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Validated):
    nproc_per_node: int = 1  # processes per machine, as torchrun's --nproc_per_node
    strategy: str = "ddp"  # ddp | fsdp, when more than one process
    batch_size: int = 16  # sequences per micro-step, per process
    grad_accum_steps: int = 1  # micro-steps per optimizer step
    max_steps: int = 1000  # optimizer steps
    lr: float = 1e-3  # peak learning rate, after warmup
    min_lr: float = 1e-4  # learning rate at max_steps, after cosine decay
    warmup_steps: int = 100  # linear warmup from 0
    weight_decay: float = 0.1  # AdamW decay, on weights with 2 or more dimensions only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # adamw: AdamW for every weight. muon: Muon for the 2-D weights inside the blocks, AdamW (lr above) for
    # embeddings, the head, norms and biases.
    optimizer: str = "adamw"
    muon_lr: float = 0.02  # Muon's peak learning rate, on the same warmup and cosine schedule as lr
    muon_momentum: float = 0.95  # Nesterov momentum of Muon
    muon_ns_steps: int = 5  # Newton-Schulz iterations that orthogonalise each update
    # auto | float32 | bfloat16 (autocast; weights and optimizer stay float32); auto: bf16 where the device
    # multiplies bf16 in hardware, else float32
    dtype: str = "auto"
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    eval_interval: int = 100  # steps between validation losses (and at the end)
    eval_batches: int = 8  # fixed validation batches per evaluation
    log_interval: int = 10  # steps between log lines and MLflow metrics
    checkpoint_interval: int = 200  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept in models/checkpoints/
    seed: int = 1337  # initial weights, data windows and dropout
    max_restarts: int = 0  # with nproc_per_node > 1: restarts of all workers (from the last checkpoint) when one fails

    def validate(self) -> None:
        for name in ("nproc_per_node", "batch_size", "grad_accum_steps", "max_steps", "eval_interval",
                     "eval_batches", "log_interval", "checkpoint_interval", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError("train.strategy", f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("train.optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not self.muon_lr > 0:
            raise ConfigError("train.muon_lr", f"must be > 0, got {self.muon_lr}")
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError("train.muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        if not 1 <= self.muon_ns_steps <= 20:
            raise ConfigError("train.muon_ns_steps", f"must be in [1, 20], got {self.muon_ns_steps}")
        if self.dtype not in DTYPES:
            raise ConfigError("train.dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.lr <= 0:
            raise ConfigError("train.lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("train.min_lr", f"must be in [0, train.lr], got {self.min_lr}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ConfigError("train.warmup_steps", f"must be in [0, train.max_steps], got {self.warmup_steps}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        check_seed("train.seed", self.seed)
        if self.max_restarts < 0:
            raise ConfigError("train.max_restarts", f"must be >= 0, got {self.max_restarts}")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(Validated):
    prompts: tuple[str, ...] = ("ROMEO.\n",)  # one sample per prompt in reports/samples.md; "" starts from EOT
    max_new_tokens: int = 200  # tokens generated per sample
    temperature: float = 0.8  # 0 is greedy
    top_k: int = 50  # sample among the k most likely tokens; 0 turns it off
    top_p: float = 0.95  # nucleus: the smallest set of tokens holding this much probability; 1.0 turns it off
    seed: int = 1337  # the same seed gives the same samples; prompt i (from 0) samples with seed + i
    attention_text: str = "To be, or not to be, that is the question"  # text of the attention heatmaps
    max_tokens: int = 0  # val tokens scored: 0 = all of them, else that many from evenly spaced windows
    batch_size: int = 16  # windows of block_size tokens per forward pass

    def validate(self) -> None:
        if not self.prompts:
            raise ConfigError("evaluate.prompts", "must list at least one prompt")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluate.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.max_tokens < 0:
            raise ConfigError("evaluate.max_tokens", f"must be >= 0, got {self.max_tokens}")
        check_sampling(self.temperature, self.top_k, self.top_p, key=lambda param: f"evaluate.{param}")
        if not self.attention_text.strip():
            raise ConfigError("evaluate.attention_text", "must not be empty")
        check_seed("evaluate.seed", self.seed)


@dataclasses.dataclass(frozen=True)
class MlflowConfig(Validated):
    tracking_uri: str = "sqlite:///mlflow.db"  # a relative sqlite path is taken from the repository root
    experiment: str = "gpt-from-scratch"  # MLflow experiment the runs go into

    def validate(self) -> None:
        if not self.tracking_uri.strip():
            raise ConfigError("mlflow.tracking_uri", "must not be empty")
        if not self.experiment.strip():
            raise ConfigError("mlflow.experiment", "must not be empty")


T = TypeVar("T")


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check one value against a field's type; ints are accepted for floats, lists become tuples."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        kind = next(option for option in options if option is not type(None))
        origin = typing.get_origin(kind)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"must be a list, got {type(value).__name__}")
        (item_kind, _) = typing.get_args(kind)
        return tuple(_coerce(f"{key}[{i}]", item, item_kind) for i, item in enumerate(value))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2**1023 else math.inf
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(key, f"must be {kind.__name__}, got {type(value).__name__} {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value}")
    if kind is int and not -MAX_INT <= value <= MAX_INT:
        raise ConfigError(key, f"must be an integer within +-2**63, got {value}")
    return value


def from_mapping(cls: type[T], values: Mapping[str, Any], section: str, *, require_all: bool = True) -> T:
    """Build config `cls` from `values`; unknown keys, missing keys and wrong types are errors."""
    if not isinstance(values, Mapping):
        raise ConfigError(section, f"must be a mapping of keys, got {type(values).__name__}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}", f"unknown key (known: {', '.join(fields)})")
    # A key whose default is None (null: "from the preset", "off") may be left out.
    missing = [name for name, field in fields.items() if name not in values and field.default is not None]
    if require_all and missing:
        raise ConfigError(f"{section}.{missing[0]}", "missing key")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(f"{section}.{name}", values[name], hints[name]) for name in fields if name in values}
    return cls(**kwargs)
