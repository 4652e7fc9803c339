"""Training batches: random windows of block_size + 1 tokens from memory-mapped token shards.

A batch is a pure function of (seed, step, micro_step, rank, world size): runs are reproducible, and a resumed run
draws exactly the windows an uninterrupted one would, with no data position to save.

Periodic rows (train.periodic_rows): a share of the training windows is replaced by its own first few tokens (a
period of PERIOD_TOKENS) repeated to the row's end. Every token after the first period is then predictable only by
finding where the current token came before in the row and copying what followed it: an induction head, the
skill a reading question needs (answer with a name found in the passage). Natural text rewards it too seldom for
a small model to learn it in a short run (docs/benchmarks.md, "Teaching the base model to copy").
"""

from pathlib import Path

import numpy as np
import torch

from llm.errors import InputError
from llm.shards import open_shard

VAL_STREAM = 1 << 30  # step number reserved for the fixed validation batches
PERIOD_TOKENS = (8, 64)  # a periodic row's period, drawn uniformly between these (inclusive)


class TokenWindows:
    """Samples (x, y) windows from one split's shards; a window never crosses a shard boundary."""

    def __init__(self, shard_paths: list[Path], block_size: int, vocab_size: int, name: str,
                 periodic_rows: float = 0.0) -> None:
        """`name` says which shards these are in errors ("data/tokens: the val split"); `periodic_rows` is the
        share of rows made periodic (module docstring)."""
        self.shards = [open_shard(path, vocab_size=vocab_size) for path in shard_paths]
        self.block_size = block_size
        # Number of window starts in each shard; shards too short for one window are never drawn.
        self.window_starts = np.array([max(len(s) - block_size, 0) for s in self.shards], dtype=np.int64)
        if self.window_starts.sum() == 0:
            raise InputError(f"{name} has fewer than block_size + 1 = {block_size + 1} tokens in every shard; "
                             "lower model.block_size or add data")
        self.shard_weights = self.window_starts / self.window_starts.sum()
        self.num_tokens = sum(len(s) for s in self.shards)
        self.periodic_rows = periodic_rows

    def batch(self, batch_size: int, seed: int, step: int, rank: int = 0, world_size: int = 1, micro_step: int = 0,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's x, y of shape (batch_size, block_size), y shifted by one token; int64 on `device`.

        The global batch of batch_size * world_size windows depends on (seed, step, micro_step) alone and
        rank r takes rows [r * batch_size, (r + 1) * batch_size): N ranks see exactly the windows one
        process with an N times larger batch would."""
        rng = np.random.default_rng([seed, step, micro_step])
        size = batch_size * world_size
        which = rng.choice(len(self.shards), size=size, p=self.shard_weights)
        starts = rng.integers(0, self.window_starts[which])
        rows = np.empty((batch_size, self.block_size + 1), dtype=np.int64)
        if self.periodic_rows:  # drawn after the windows: a share of 0 draws the windows it always did
            chosen = rng.random(size) < self.periodic_rows
            periods = np.where(chosen, rng.integers(*PERIOD_TOKENS, size, endpoint=True), 0)
        for i, row in enumerate(range(rank * batch_size, (rank + 1) * batch_size)):
            rows[i] = self.shards[which[row]][starts[row] : starts[row] + self.block_size + 1]
            if self.periodic_rows and periods[row]:
                rows[i] = np.resize(rows[i, :periods[row]], self.block_size + 1)  # the period, repeated
        window = torch.from_numpy(rows)
        x, y = window[:, :-1], window[:, 1:]
        if torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.contiguous(), y.contiguous()
