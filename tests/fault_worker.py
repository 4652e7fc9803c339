"""A train-stage worker for the restart tests, run by torchrun as `-m tests.fault_worker STEP ARGS...`: the train
stage with ARGS, where rank 0 dies (exit 17) once it has logged step STEP, on the launcher's first attempt only
(torchrun counts restarts in TORCHELASTIC_RESTART_COUNT). The fault is injected here, as a callback, not read
by the library from the environment."""

import functools
import os
import sys

import llm.training_run
from llm.history import HistoryRow
from stages.__main__ import app


def die_at(step: int):
    def after_log(row: HistoryRow) -> None:
        if row.step >= step and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os._exit(17)

    return after_log


if __name__ == "__main__":
    fail_at = int(sys.argv.pop(1))
    llm.training_run.run_training = functools.partial(llm.training_run.run_training, after_log=die_at(fail_at))
    app(["train", *sys.argv[1:]])
