"""The training's history: one `HistoryRow` per log step, kept in checkpoints (state.json) and written to
plots/train.csv. This module owns the row and the CSV: their one writer and reader."""

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any

from llm.errors import InputError
from llm.fileio import write_bytes_atomic


@dataclasses.dataclass(frozen=True)
class HistoryRow:
    step: int  # optimizer steps done
    tokens_seen: int  # training tokens consumed so far, over all ranks
    train_loss: float  # mean training loss of the steps since the previous row (nats per token)
    val_loss: float | None  # validation loss at this step; None where the step did not evaluate
    lr: float  # the learning rate of the row's last step (train.lr's schedule)
    grad_norm: float  # global gradient norm of the row's last step, before clipping
    tokens_per_sec: float  # speed over the steps since the previous row
    mfu: float  # model FLOPs utilisation at that speed, a fraction of the peak

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: Any) -> "HistoryRow":
        """A row read back (state.json, the CSV); ValueError names the field that is missing or of the wrong
        type, for the caller to say which file it came from."""
        if not isinstance(row, dict):
            raise ValueError("a history row is not an object")
        values = {}
        for field in dataclasses.fields(cls):
            value = row.get(field.name)
            if value is None and field.name == "val_loss":
                values[field.name] = None
                continue
            integral = field.type is int
            if isinstance(value, bool) or not isinstance(value, int if integral else int | float):
                raise ValueError(f"history field {field.name!r} is missing or not a number")
            values[field.name] = value if integral else float(value)
        return cls(**values)


COLUMNS = [field.name for field in dataclasses.fields(HistoryRow)]


def write_history_csv(path: Path, history: list[HistoryRow]) -> None:
    """One line per row; a step without evaluation has an empty val_loss."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row.to_dict(), "val_loss": "" if row.val_loss is None else row.val_loss} for row in history)
    write_bytes_atomic(path, table.getvalue().encode())


def read_history_csv(path: Path) -> list[HistoryRow]:
    """The rows of a plots/train.csv; a row that does not read is an InputError naming the file and line."""
    rows = []
    with open(path, newline="") as f:
        for line, raw in enumerate(csv.DictReader(f), start=2):
            try:
                rows.append(HistoryRow.from_dict({key: _number(key, value) for key, value in raw.items()}))
            except ValueError as err:
                raise InputError(f"{path}, line {line}: {err}") from None
    return rows


def _number(column: str | None, text: str | None) -> int | float | str | None:
    """A CSV cell as the row's type; text that is no number is kept, for from_dict to name its field."""
    if not text:
        return None
    try:
        return int(text) if column in ("step", "tokens_seen") else float(text)
    except ValueError:
        return text
