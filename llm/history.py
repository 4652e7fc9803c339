"""The training's history: one `HistoryRow` per log step, kept in checkpoints (state.json) and written to
plots/train.csv. This module owns the row and the CSV: their one writer and reader."""

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Any

from llm.errors import InputError, first_line
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
    """The rows of a plots/train.csv. A file that does not read, a header that is not COLUMNS, a row that does not
    read (a cell missing or extra, text for a number, a non-finite number) or no row at all (a run logs its last
    step) is an InputError naming the file, and the line."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != COLUMNS:
                header = ",".join(reader.fieldnames or [])[:80]
                raise InputError(f"{path}: not the train stage's history (its header is {header!r}, not "
                                 f"{','.join(COLUMNS)!r}); rerun the train stage")
            for line, raw in enumerate(reader, start=2):
                try:
                    rows.append(_row(raw))
                except ValueError as err:
                    raise InputError(f"{path}, line {line}: {err}; rerun the train stage") from None
    except FileNotFoundError:
        raise InputError(f"{path}: not found; run the train stage first") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start}); rerun the train stage") from None
    except (OSError, csv.Error) as err:
        raise InputError(f"{path}: does not read as CSV ({first_line(err)}); rerun the train stage") from None
    if not rows:
        raise InputError(f"{path}: holds no rows (a run logs at least its last step); rerun the train stage")
    return rows


def _row(raw: dict[str | None, Any]) -> HistoryRow:
    if None in raw:
        raise ValueError("more cells than the header")
    row = HistoryRow.from_dict({key: _number(key, value) for key, value in raw.items()})
    if not all(math.isfinite(value) for value in dataclasses.astuple(row) if value is not None):
        raise ValueError("a number that is not finite (a run that diverged writes no history)")
    return row


def _number(column: str | None, text: str | None) -> int | float | str | None:
    """A CSV cell as the row's type; text that is no number is kept, for from_dict to name its field."""
    if not text:
        return None
    try:
        return int(text) if column in ("step", "tokens_seen") else float(text)
    except ValueError:
        return text
