"""A decoder-only transformer in two named variants.

gpt2:  learned positions, LayerNorm, GELU MLP, biases, tied input/output embeddings.
llama: rotary positions (RoPE), RMSNorm, SwiGLU MLP, no biases, untied output head.

The model knows nothing of parallelism, compilation or activation checkpointing (see llm/parallel.py),
and does no I/O. For generation, `forward` takes a KVCache: the keys and values of earlier positions, so
each new token costs one position's work instead of the whole context's.
"""

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.config import ModelConfig
from llm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class GPTConfig(ModelConfig):
    """ModelConfig plus what comes from artifacts: the vocabulary size, read from the tokenizer."""

    vocab_size: int = 0

    def validate(self) -> None:
        super().validate()
        if self.vocab_size < 1:
            raise ConfigError("model.vocab_size", f"must be >= 1 (read from the tokenizer), got {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        if self.arch == "gpt2":
            return 4 * self.n_embd
        # SwiGLU: 2/3 of 4x keeps the parameter count of a 4x GELU MLP; rounded up to a multiple of 64.
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)


def norm(config: GPTConfig) -> nn.Module:
    return nn.LayerNorm(config.n_embd) if config.arch == "gpt2" else nn.RMSNorm(config.n_embd, eps=1e-5)


def rope_tables(head_dim: int, length: int, theta: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim / 2) for rotary embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dimension; x is (B, n_head, T, head_dim)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.type_as(x)


class KVCache:
    """Keys and values of the positions seen so far, one preallocated (B, n_head, block_size, head_dim) pair
    per layer. `pos` is the number of positions filled; GPT.forward advances it."""

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch_size, config.n_head, config.block_size, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_head, T, head_dim) at positions pos..pos+T; return all keys and values so far."""
        end = self.pos + k.size(2)
        self.keys[layer][:, :, self.pos:end] = k
        self.values[layer][:, :, self.pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        bias = config.arch == "gpt2"
        self.n_head, self.dropout, self.layer = config.n_head, config.dropout, layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=bias)
        self.c_proj.residual = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        """Queries, keys and values, each (B, n_head, T, head_dim), rotated when rope tables are given."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.qkv(x, rope)
        mask, causal = None, True
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer, k, v)
            if past > 0:  # query i sits at position past + i and sees keys 0..past + i
                causal = False
                mask = None if T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def attention_probs(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The causal attention pattern (B, n_head, T, T) that forward applies to x, each row summing to 1."""
        q, k, _ = self.qkv(x, rope)
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))
        T = x.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


class MLP(nn.Module):
    """GELU MLP (gpt2)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd)
        self.c_proj.residual = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class SwiGLU(nn.Module):
    """Gated SiLU MLP (llama)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.up = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)
        self.down.residual = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = norm(config), norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config) if config.arch == "gpt2" else SwiGLU(config)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.arch == "gpt2" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.ln_f = norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.arch == "gpt2":
            self.lm_head.weight = self.wte.weight  # tied
        else:
            cos, sin = rope_tables(config.head_dim, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            # Residual projections are scaled so the residual stream's variance does not grow with depth.
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab); with targets (B, T), also the mean cross-entropy.
        With a cache, idx continues the sequence the cache holds (positions cache.pos onwards)."""
        x, rope = self.embed(idx, start=cache.pos if cache is not None else 0)
        for block in self.blocks:
            x = block(x, rope, cache)
        if cache is not None:
            cache.pos += idx.size(1)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def embed(
        self, idx: torch.Tensor, start: int = 0
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Token (and learned position) embeddings of positions start..start+T, and the rope tables for them."""
        T = idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"positions up to {start + T} exceed block_size {self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        return self.drop(x), rope

    def new_cache(self, batch_size: int = 1) -> KVCache:
        weight = self.wte.weight
        return KVCache(self.config, batch_size, weight.device, weight.dtype)

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of every layer and head for idx (1, T): (n_layer, n_head, T, T)."""
        x, rope = self.embed(idx)
        maps = []
        for block in self.blocks:
            maps.append(block.attn.attention_probs(block.ln_1(x), rope)[0])
            x = block(x, rope)
        return torch.stack(maps)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per weight of every matmul (forward 2, backward 4), plus attention
        scores and values, 12 * n_layer * n_embd * block_size (the PaLM appendix B estimate)."""
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        cfg = self.config
        return 6 * matmul_weights + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def initial_model(config: GPTConfig, seed: int) -> GPT:
    """The weights training starts from: a function of the config and train.seed alone."""
    torch.manual_seed(seed)
    return GPT(config)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: name} for parameters registered under two names (gpt2's lm_head.weight -> wte.weight): stored
    once in weight files, restored as aliases when loaded."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases
