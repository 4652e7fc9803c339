"""The `sft` section: the conversations instruction tuning trains on, and the held-out questions it is scored on."""

import dataclasses
from dataclasses import InitVar
from typing import Literal

from llm.config import Validated, param
from llm.configs.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class SFTConfig(Validated):
    # "builtin": conversations generated from data/clean/ (llm/sft_data.py); else a local folder / file / glob or
    # a URL of .jsonl conversations, as data.source takes. Held-out questions always come from the builtin
    # generator, so that metrics/sft.json compares across sources.
    source: str = param("builtin", nonempty=True)
    seed: int = param(1337, ge=0)  # salts the held-out split of plays and draws the generated conversations
    heldout_fraction: float = param(0.25, gt=0, lt=1)  # share of plays (by hash of their id) kept for questions
    train_conversations: int = param(4000, ge=1)  # generated training conversations, the tasks in equal shares
    questions_per_task: int = param(60, ge=1)  # held-out questions per task (fewer if the held-out plays run out)
    candidates: int = param(4, ge=2, le=16)  # answer choices of a multiple-choice question (chance = 1 / this)
    shots: int = param(3, ge=0, le=16)  # solved examples before each question when the base model is scored
    # The tuning: the Trainer's settings (llm/configs/train.py says what each means); the others are its defaults.
    max_steps: int = param(300, ge=1)  # optimizer steps
    batch_size: int = param(16, ge=1)  # packed rows of block_size tokens per micro-step, per process
    grad_accum_steps: int = param(1, ge=1)
    lr: float = param(3e-4, gt=0)  # peak learning rate (AdamW; Muon's is lr x train.muon_lr / train.lr)
    min_lr: float = param(3e-5, ge=0)  # at max_steps, after cosine decay; at most lr
    warmup_steps: int = param(20, ge=0)
    weight_decay: float = param(0.0, ge=0)
    optimizer: Literal["adamw", "muon"] = "adamw"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    eval_interval: int = param(50, ge=1)  # steps between val losses on the held-out questions' answers
    eval_batches: int = param(4, ge=1)
    log_interval: int = param(10, ge=1)
    checkpoint_interval: int = param(100, ge=1)
    section: InitVar[str] = "sft"  # the params section named in errors (from_mapping passes the one it read)

    def training(self) -> TrainConfig:
        """The tuning's settings as the Trainer takes them: this section's, the rest TrainConfig's defaults."""
        return TrainConfig(
            batch_size=self.batch_size, grad_accum_steps=self.grad_accum_steps, max_steps=self.max_steps,
            lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
            optimizer=self.optimizer, dtype=self.dtype, eval_interval=self.eval_interval,
            eval_batches=self.eval_batches, log_interval=self.log_interval,
            checkpoint_interval=self.checkpoint_interval, seed=self.seed, section="sft")

    def validate(self) -> None:
        self.training()  # the training's cross-field rules (min_lr <= lr, warmup_steps <= max_steps), as sft.*
