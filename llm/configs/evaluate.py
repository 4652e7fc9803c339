"""The `evaluate` section: how the model is scored and sampled, and the one rule for sampling parameters."""

import dataclasses
from collections.abc import Callable
from dataclasses import InitVar

from llm.config import Validated, check_field, param

# The most tokens one sample (or one generate command) may ask for: a bound, so that a typo (10**12) cannot run
# for days. 100,000 tokens are about 400 KB of text, minutes on a CPU for a small model.
MAX_NEW_TOKENS = 100_000


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(Validated):
    # one sample per prompt in reports/samples.md; "" starts from EOT
    prompts: tuple[str, ...] = param(("ROMEO.\n",), nonempty=True)
    max_new_tokens: int = param(200, ge=1, le=MAX_NEW_TOKENS)  # tokens generated per sample
    temperature: float = param(0.8, ge=0, note="0 is greedy")
    top_k: int = param(50, ge=0, note="0 turns it off")  # sample among the k most likely tokens
    # nucleus: the smallest set of tokens holding this much probability
    top_p: float = param(0.95, gt=0, le=1, note="1 turns it off")
    seed: int = param(1337, ge=0)  # the same seed gives the same samples; prompt i (from 0) samples with seed + i
    # text of the attention heatmaps
    attention_text: str = param("To be, or not to be, that is the question", nonempty=True)
    max_tokens: int = param(0, ge=0)  # val tokens scored: 0 = all of them, else that many from evenly spaced windows
    batch_size: int = param(16, ge=1)  # windows of block_size tokens per forward pass
    section: InitVar[str] = "evaluate"  # the params section named in errors (from_mapping passes the one it read)


def check_sampling(temperature: float, top_k: int, top_p: float,
                   key: Callable[[str], str] = lambda param: param) -> None:
    """The one rule for sampling parameters: the bounds EvaluateConfig declares for them. An error names
    `key(param)`: the command-line flag (--top-p) the value came from, say."""
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        check_field(EvaluateConfig, name, value, key(name))
