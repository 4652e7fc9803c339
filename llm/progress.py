"""Training progress: a rich progress bar on a terminal, plain periodic lines otherwise (DVC, CI)."""

import logging
import sys

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from llm.history import HistoryRow

log = logging.getLogger(__name__)


def describe(row: HistoryRow) -> str:
    val = f" | val {row.val_loss:.4f}" if row.val_loss is not None else ""
    return (f"loss {row.train_loss:.4f}{val} | lr {row.lr:.2e} | {row.tokens_per_sec:,.0f} tok/s"
            f" | mfu {100 * row.mfu:.1f}%")


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int = 0, interactive: bool | None = None) -> None:
        self.total = total_steps
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar: Progress | None = None
        if self.interactive:
            columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                       TimeRemainingColumn())
            self.bar = Progress(*columns)
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, status="")

    def __enter__(self) -> "TrainProgress":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, row: HistoryRow) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=row.step, status=describe(row))
        else:
            log.info("step %d/%d | %s", row.step, self.total, describe(row))
