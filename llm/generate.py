"""Autoregressive sampling: temperature, top-k, top-p (nucleus), seeded, with or without a KV cache.

With the cache, the prompt is run once (prefill) and every later step feeds only the newest token. When
the context window fills up, the cache is re-primed with the most recent half window, so a long generation
costs one prefill per block_size / 2 tokens. Without the cache every step reruns the last block_size tokens;
the two agree token for token as long as prompt and continuation fit the window.
"""

import dataclasses
from collections.abc import Iterable, Iterator

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from llm.configs.evaluate import check_sampling
from llm.model import GPT


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to sample a continuation: generate's and chat's flags, checked as their params are."""

    max_new_tokens: int  # the longest continuation, in tokens
    temperature: float  # 0 is greedy
    top_k: int  # 0 turns it off
    top_p: float  # 1.0 turns it off
    seed: int | None  # the same seed, the same text (chat: answer i samples with seed + i); None: a random one


def prompt_ids(tokenizer: Tokenizer, prompt: str, eot_id: int) -> list[int]:
    """Token ids of a prompt; an empty prompt starts from <|endoftext|>, as every training document does."""
    return tokenizer.encode(prompt).ids or [eot_id]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (V,) with everything outside the top-k tokens, then outside the smallest set of tokens whose
    probability reaches top_p, set to -inf. top_k=0 and top_p=1.0 turn each filter off."""
    if top_k > 0 and top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        outside = mass_before >= top_p
        outside[..., 0] = False  # the most likely token stays, also for a top_p float32 rounds to 0 (1e-320)
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.empty_like(logits).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> int:
    """One token id from logits (V,); temperature 0 is greedy (argmax), and so is a temperature so close to 0
    that logits / temperature overflow float32 (1e-300): the distribution sampling tends to as it goes to 0."""
    scaled = logits.float() / temperature if temperature != 0.0 else None
    if scaled is None or not torch.isfinite(scaled).all():
        return int(logits.argmax())
    return int(torch.multinomial(filter_logits(scaled, top_k, top_p).softmax(dim=-1), 1, generator=generator))


@torch.no_grad()
def generate(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eot_id: int | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids continuing prompt_ids (cropped from the left to the context
    window); stop after yielding eot_id. The same seed gives the same tokens."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token (start from <|endoftext|>)")
    check_sampling(temperature, top_k, top_p)
    model.eval()
    device = model.device
    block = model.config.block_size
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    ids = list(prompt_ids)[-block:]
    cache = model.new_cache() if use_cache else None
    pending = ids  # tokens the cache has not seen yet
    for _ in range(max_new_tokens):
        if cache is None:
            context = ids[-block:]
        else:
            if cache.pos + len(pending) > block:  # window full: re-prime with the recent half
                cache.pos = 0
                pending = ids[-max(1, block // 2):]
            context = pending
        logits, _ = model(torch.tensor([context], device=device), cache=cache)
        token = sample(logits[0, -1], temperature, top_k, top_p, generator)
        yield token
        if token == eot_id:
            return
        ids.append(token)
        pending = [token]


def stream_text(tokenizer: Tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Text of `ids` (special tokens skipped) piece by piece, as soon as each piece decodes: a character split
    over several byte tokens comes out once its last byte arrives. The pieces join to tokenizer.decode(ids)."""
    stream = DecodeStream(skip_special_tokens=True)
    seen, printed = [], []
    for token in ids:
        seen.append(token)
        piece = stream.step(tokenizer, token)  # None while a character's bytes are incomplete
        if piece:
            printed.append(piece)
            yield piece
    # Bytes of a character the ids stop inside of: decode renders them (as U+FFFD), so the stream does too.
    tail = tokenizer.decode(seen, skip_special_tokens=True).removeprefix("".join(printed))
    if tail:
        yield tail
