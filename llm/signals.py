"""SIGINT and SIGTERM (Ctrl-C; what Slurm, Kubernetes and the launcher send) as a request to stop: the
training loop finishes its step, writes a checkpoint and raises Interrupted. A second Ctrl-C stops at once;
a repeated SIGTERM changes nothing (schedulers follow theirs with SIGKILL when their grace time is over)."""

import logging
import signal
import threading
from types import FrameType, TracebackType

from llm.errors import Interrupted

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While entered (in the main thread), SIGINT and SIGTERM set `received` to the signal's number instead of
    killing the process; the loop reads it between steps."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received and signum == signal.SIGINT:
            raise Interrupted(signum, f"stopped at once by a second {name}, without a checkpoint; the run resumes "
                                      f"from its last checkpoint")
        if self.received:
            return
        self.received = signum
        log.warning("%s: stopping after this step, once a checkpoint is written%s", name,
                    " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
