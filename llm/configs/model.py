"""The `model` section: the transformer's size and its architectural parts, named by a preset."""

import dataclasses
import typing
from dataclasses import InitVar
from typing import Any, Literal

from llm.config import MAX_BLOCK_SIZE, FieldError, Validated, param

# The architectural parts a model is built from, each a small named choice, and the presets that name a set
# of them. A model key left null (or out) takes its preset's value; config.json stores the resolved parts.
Positions = Literal["learned", "rope"]  # learned absolute embeddings | rotary (applied to q and k)
Norm = Literal["layernorm", "rmsnorm"]
Mlp = Literal["gelu", "swiglu", "relu2"]  # GELU (4x) | gated SiLU (8/3 x) | squared ReLU (4x)
Head = Literal["tied", "untied"]  # output head shares the token embedding, or has its own weights
PART_CHOICES = {name: typing.get_args(kind) for name, kind in
                (("positions", Positions), ("norm", Norm), ("mlp", Mlp), ("head", Head))}
PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 (2019), as nanoGPT builds it.
    "gpt2": {"positions": "learned", "norm": "layernorm", "norm_gain": True, "mlp": "gelu", "head": "tied",
             "bias": True, "qk_norm": False, "logit_softcap": 0.0, "zero_init": False, "token_shift": False},
    # Llama (2023).
    "llama": {"positions": "rope", "norm": "rmsnorm", "norm_gain": True, "mlp": "swiglu", "head": "untied",
              "bias": False, "qk_norm": False, "logit_softcap": 0.0, "zero_init": False, "token_shift": False},
    # What the strongest small-model recipes of 2024-25 share (modded-nanogpt's speedrun, nanochat): norms
    # without gains, queries and keys normalised, squared ReLU, a logit softcap, and every output
    # projection (and the head) starting at zero, so each block starts as the identity; and a token shift
    # (modded-nanogpt's "smear"), which lets one attention layer copy from the context.
    "modern": {"positions": "rope", "norm": "rmsnorm", "norm_gain": False, "mlp": "relu2", "head": "untied",
               "bias": False, "qk_norm": True, "logit_softcap": 15.0, "zero_init": True, "token_shift": True},
}
ARCHS = tuple(PRESETS)
Arch = Literal[ARCHS]  # the preset names


@dataclasses.dataclass(frozen=True)
class ModelConfig(Validated):
    arch: Arch = "gpt2"  # preset naming the parts below: gpt2 | llama | modern
    n_layer: int = param(6, ge=1)  # transformer blocks
    n_head: int = param(6, ge=1)  # query heads; n_embd must divide evenly
    n_embd: int = param(384, ge=1)  # width of the residual stream
    block_size: int = param(256, ge=1, le=MAX_BLOCK_SIZE)  # context length in tokens
    dropout: float = param(0.0, ge=0, lt=1)  # on embeddings, attention and residual branches while training
    n_kv_head: int | None = param(None, ge=1)  # key/value heads (grouped-query attention); null = n_head
    # The parts; null = the preset's choice.
    positions: Positions | None = None  # learned | rope
    norm: Norm | None = None  # layernorm | rmsnorm
    norm_gain: bool | None = None  # norms have a learned per-channel gain
    mlp: Mlp | None = None  # gelu | swiglu | relu2
    head: Head | None = None  # tied | untied
    bias: bool | None = None  # biases in linear layers and LayerNorm
    qk_norm: bool | None = None  # RMS-normalise each head's queries and keys before attention
    logit_softcap: float | None = param(None, ge=0, note="0 turns it off")  # logits = c * tanh(logits / c)
    zero_init: bool | None = None  # output projections (and an untied head) start at zero
    # Each position's input adds a learned linear map (starting at zero) of the previous token's embedding, so
    # a key can say which token came before it: attention can then find where the current token came before and
    # copy what followed it (an induction head) in one layer instead of two.
    token_shift: bool | None = None
    section: InitVar[str] = "model"  # the params section named in errors (from_mapping passes the one it read)

    def resolve(self) -> None:
        """Every part left null takes the preset's value, once: the config then names the model fully."""
        for name, value in PRESETS[self.arch].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise FieldError("n_head", f"must divide n_embd ({self.n_embd} % {self.n_head})")
        if self.n_head % self.n_kv_head:
            raise FieldError("n_kv_head", f"must divide n_head ({self.n_head} % {self.n_kv_head})")
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            raise FieldError("n_head", "rotary positions need an even head size (n_embd / n_head)")
