"""A decoder-only transformer built from small named parts.

Each architectural choice is a field of the config (positions, norm, norm_gain, mlp, head, bias, qk_norm,
logit_softcap, zero_init, n_kv_head), resolved once from a preset (llm.config.PRESETS: gpt2, llama, modern)
and read here in one place each: `make_norm`, `MLPS`, `GPT.__init__` (positions, head), `_init_weights`.

The model knows nothing of parallelism, compilation or activation checkpointing (see llm/parallel.py),
and does no I/O. For generation, `forward` takes a KVCache: the keys and values of earlier positions, so
each new token costs one position's work instead of the whole context's.
"""

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.configs.model import ModelConfig
from llm.errors import ConfigError

NORM_EPS = 1e-5
ROPE_THETA = 10_000.0  # the rotary base (RoPE, Llama): rope_tables' default, and what the HF export declares
INIT_STD = 0.02  # standard deviation of the weights drawn at init (GPT-2's); residual projections' is smaller
FLOPS_PER_WEIGHT = 6  # training FLOPs per token of each matmul weight: forward 2, backward 4
IGNORE = -1  # a target that adds no loss (a masked token: fine-tuning trains on the answers' tokens only)


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
        if self.mlp != "swiglu":
            return 4 * self.n_embd
        # SwiGLU: 2/3 of 4x keeps the parameter count of a 4x MLP; rounded up to a multiple of 64.
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)

    @property
    def attention_flops_per_token(self) -> int:
        """Training FLOPs per token of what attention computes without weights (the scores and the weighted sum
        of values): 12 * n_layer * n_embd * block_size, the PaLM appendix B estimate."""
        return 12 * self.n_layer * self.n_embd * self.block_size


def make_norm(config: GPTConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over the last `dim` features (default n_embd)."""
    dim = dim or config.n_embd
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, eps=NORM_EPS, elementwise_affine=config.norm_gain, bias=config.bias)
    return nn.RMSNorm(dim, eps=NORM_EPS, elementwise_affine=config.norm_gain)


def rope_tables(head_dim: int, length: int, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables of shape (length, head_dim): cos of each pair's angle, twice, and sin with the sign that
    rotates the first half, (-sin, sin). Pair j is (channel j, channel j + head_dim / 2), turned by
    position / theta^(2j / head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return torch.cat([angles.cos(), angles.cos()], dim=-1), torch.cat([-angles.sin(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x1, x2) of the head dimension to (x1 cos - x2 sin, x2 cos + x1 sin); x is
    (B, n_head, T, head_dim). Two multiplies and an add over whole heads, computed in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    swapped = torch.cat([x2, x1], dim=-1)
    return (x.float() * cos + swapped * sin).type_as(x)


class KVCache:
    """Keys and values of the positions seen so far, one preallocated (B, n_kv_head, block_size, head_dim) pair
    per layer. `pos` is the number of positions filled; GPT.forward advances it."""

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch_size, config.n_kv_head, config.block_size, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0
        self.last_embedding: torch.Tensor | None = None  # (B, 1, n_embd): the token shift's input for position pos

    def fill_from(self, prefix: "KVCache") -> None:
        """Start from a batch-1 cache's positions, copied into every row of this one."""
        for layer in range(len(self.keys)):
            self.keys[layer][:, :, :prefix.pos] = prefix.keys[layer][:, :, :prefix.pos]
            self.values[layer][:, :, :prefix.pos] = prefix.values[layer][:, :, :prefix.pos]
        self.pos = prefix.pos
        self.last_embedding = prefix.last_embedding

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_head, T, head_dim) at positions pos..pos+T; return all keys and values so far."""
        end = self.pos + k.size(2)
        self.keys[layer][:, :, self.pos:end] = k
        self.values[layer][:, :, self.pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head attention; with n_kv_head < n_head, each key/value head serves n_head / n_kv_head query
    heads (grouped-query attention)."""

    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.dropout, self.layer = config.dropout, layer
        # One matrix for q, k and v: rows n_head * head_dim of q, then n_kv_head * head_dim each of k and v.
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim,
                                bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual = True
        self.q_norm = make_norm(config, config.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = make_norm(config, config.head_dim) if config.qk_norm else nn.Identity()
        self.resid_dropout = nn.Dropout(config.dropout)

    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        """Queries (B, n_head, T, head_dim), keys and values (B, n_kv_head, T, head_dim): normalised when the
        config says qk_norm, then rotated when rope tables are given."""
        B, T, _ = x.size()
        kv_width = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([self.n_head * self.head_dim, kv_width, kv_width], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))
        q, k = self.q_norm(q), self.k_norm(k)
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
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def attention_probs(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The causal attention pattern (B, n_head, T, T) that forward applies to x, each row summing to 1."""
        q, k, _ = self.qkv(x, rope)
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # the key head each query head reads
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))
        T = x.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


class MLP(nn.Module):
    """Two matrices with an activation between: GELU (gpt2) or squared ReLU (modern)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual = True
        self.squared_relu = config.mlp == "relu2"
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        h = F.relu(h).square() if self.squared_relu else F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))


class SwiGLU(nn.Module):
    """Gated SiLU MLP (llama)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.up = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.down = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.down.residual = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


MLPS = {"gelu": MLP, "relu2": MLP, "swiglu": SwiGLU}


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = make_norm(config), make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLPS[config.mlp](config)

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
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.token_shift = nn.Linear(config.n_embd, config.n_embd, bias=False) if config.token_shift else None
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.head == "tied":
            self.lm_head.weight = self.wte.weight
        if config.positions == "rope":
            cos, sin = rope_tables(config.head_dim, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        if self.token_shift is not None:
            nn.init.zeros_(self.token_shift.weight)  # the model starts as if it had no shift

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            residual = getattr(module, "residual", False)
            untied_head = module is self.lm_head and self.config.head == "untied"
            if self.config.zero_init and (residual or untied_head):
                # Each block starts as the identity and the logits at uniform: the loss at init is ln(vocab).
                nn.init.zeros_(module.weight)
            else:
                # Residual projections are scaled so the residual stream's variance does not grow with depth.
                std = INIT_STD / math.sqrt(2 * self.config.n_layer) if residual else INIT_STD
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, vocab), None); with targets (B, T), the mean cross-entropy in
        place of None. While training (train mode, gradients on), targets give (None, loss): the logits are not
        kept (ChunkedHeadLoss). With a cache, idx continues the sequence the cache holds (positions cache.pos
        onwards)."""
        x, rope = self.embed(idx, start=cache.pos if cache is not None else 0, cache=cache)
        for block in self.blocks:
            x = block(x, rope, cache)
        if cache is not None:
            cache.pos += idx.size(1)
        x = self.ln_f(x)
        if targets is not None and self.training and torch.is_grad_enabled():
            # Training: the loss and its gradients chunk by chunk, never the whole batch's logits.
            loss = ChunkedHeadLoss.apply(x.view(-1, x.size(-1)), self.lm_head.weight, targets.view(-1),
                                         self.config.logit_softcap)
            return None, loss
        logits = self.lm_head(x)  # (B, T, vocab)
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)  # bounded to (-cap, cap), near-identity below it
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=IGNORE)
        return logits, loss

    def embed(
        self, idx: torch.Tensor, start: int = 0, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Token (and learned position) embeddings of positions start..start+T, and the rope tables for them. The
        token shift's previous embedding before idx comes from `cache` (none before position 0)."""
        T = idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"positions up to {start + T} exceed block_size {self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.token_shift is not None:
            before = cache.last_embedding if cache is not None and start > 0 else None
            if before is None:
                before = torch.zeros_like(x[:, :1])
            if cache is not None:
                cache.last_embedding = x[:, -1:]
            x = x + self.token_shift(torch.cat([before.expand(x.size(0), -1, -1), x[:, :-1]], dim=1))
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        if self.config.positions == "rope":
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        return self.drop(x), rope

    @property
    def device(self) -> torch.device:
        """Where the model's weights are: every caller that makes tensors for it asks here."""
        return self.wte.weight.device

    def new_cache(self, batch_size: int = 1) -> KVCache:
        return KVCache(self.config, batch_size, self.device, self.wte.weight.dtype)

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
        """Training FLOPs per token: FLOPS_PER_WEIGHT (6) per weight of every matmul, plus attention's scores
        and values (GPTConfig.attention_flops_per_token)."""
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return FLOPS_PER_WEIGHT * matmul_weights + self.config.attention_flops_per_token


class ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of softcap(hidden @ weight^T) against targets, and its gradients, computed in chunks of
    rows during the forward pass: what F.cross_entropy over the whole (rows, vocab) logits computes, without ever
    holding them. Each chunk's logits are made, softmaxed, turned into their gradient in place and multiplied
    back while they are still in cache; the vocabulary-sized elementwise passes (log-softmax, its backward, the
    softcap's tanh and their temporaries) cost half or more of a small model's step otherwise. Matmuls run in
    autocast's dtype when it is on; the softmax in float32."""

    CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 16 MB of float32, in the last-level cache of most CPUs

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                softcap: float) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        rows = hidden.size(0)
        chunk = max(1, ChunkedHeadLoss.CHUNK_ELEMENTS // weight.size(0))
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        # Targets equal to IGNORE (masked, as in fine-tuning) add no loss and no gradient, and the mean is over
        # the others: a masked row's gradient is divided by inf (0), the others' by the count, as a plain mean
        # divides them, so with nothing masked this is the plain mean to the bit, and no device sync is needed.
        kept = targets != IGNORE
        counted = kept.sum().clamp(min=1).float()
        divisors = torch.where(kept, counted, math.inf)
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            for start in range(0, rows, chunk):
                h, t = hidden[start:start + chunk].to(dtype), targets[start:start + chunk].clamp(min=0)
                logits = (h @ w.T).float()  # (chunk, vocab)
                if softcap:
                    squashed = logits.div_(softcap).tanh_()  # in place: logits now holds tanh(z / cap)
                    logits = squashed * softcap
                log_norm = torch.logsumexp(logits, dim=-1)
                row_loss = log_norm - logits.gather(1, t[:, None]).squeeze(1)
                total += torch.where(kept[start:start + chunk], row_loss, 0.0).sum()
                grad = logits.sub_(log_norm[:, None]).exp_()  # softmax
                grad[torch.arange(len(t), device=t.device), t] -= 1  # d loss / d logits, per row
                if softcap:
                    grad.mul_(squashed.square_().neg_().add_(1))  # d cap tanh(z / cap) / dz = 1 - tanh^2
                grad = grad.div_(divisors[start:start + chunk, None]).to(dtype)
                grad_hidden[start:start + chunk] = grad @ w
                if dtype == torch.float32:
                    grad_weight.addmm_(grad.T, h)
                else:
                    grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / counted

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


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
