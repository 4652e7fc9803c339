"""plots/train.csv: the training's history, one row per log step. Its one writer and reader."""

import csv
import io
from pathlib import Path
from typing import Any

from llm.fileio import write_bytes_atomic

COLUMNS = ["step", "tokens_seen", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_sec", "mfu"]


def write_history_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """The COLUMNS of each history row; a step without evaluation has an empty val_loss."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "val_loss": "" if row["val_loss"] is None else row["val_loss"]} for row in history)
    write_bytes_atomic(path, table.getvalue().encode())


def read_history_csv(path: Path) -> list[dict[str, float | None]]:
    """Rows of floats (step as int); None where a value is empty."""
    with open(path, newline="") as f:
        return [{key: (int(value) if key in ("step", "tokens_seen") else float(value)) if value else None
                 for key, value in row.items()}
                for row in csv.DictReader(f)]
