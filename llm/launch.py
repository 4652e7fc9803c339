"""Worker processes for a training on several processes of one machine: the train stage validates its
inputs, then starts `nproc_per_node` copies of itself through torch's elastic launch API (what torchrun
runs), so no shell command is built from params. Under torchrun (several machines) the stage is a worker.
A worker never outlives its launcher: it asks the kernel for SIGTERM when its parent dies, which the
training takes as a request to checkpoint and stop."""

import ctypes
import logging
import os
import signal
import sys
import uuid

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h
LAUNCHER_PID = "LLM_LAUNCHER_PID"  # set by launch_workers: the parent a worker must have


def is_worker() -> bool:
    """Started by a launcher (ours, or torchrun on each machine of a multi-node run)."""
    return "LOCAL_RANK" in os.environ


def die_with_launcher() -> None:
    """SIGTERM to this worker when its launcher dies (even by kill -9): Linux's parent-death signal. Checked
    once after asking, in case the launcher died before."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    expected = os.environ.get(LAUNCHER_PID)
    if expected and os.getppid() != int(expected):
        log.error("the launcher (pid %s) is gone: not starting", expected)
        sys.exit(143)


def launch_workers(nproc: int, command: list[str], max_restarts: int) -> tuple[int, str | None]:
    """Run `command` as `nproc` workers of one machine (rendezvous on loopback, restarted up to
    `max_restarts` times as a group when one fails). Returns (exit code, a line to print or None): 0 when
    all succeed; a worker's 2 (bad input, which the worker has said); 128 + n after signal n; else 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=max_restarts,
                          monitor_interval=0.5)
    os.environ[LAUNCHER_PID] = str(os.getpid())
    try:
        elastic_launch(config, command[0])(*command[1:])
    except SignalException as err:
        return 128 + err.sigval, None  # the workers checkpointed and said so
    except ChildFailedError as err:
        # A worker killed by signal n has exit code -n; one that stopped on it, 128 + n.
        codes = {rank: 128 - f.exitcode if f.exitcode < 0 else f.exitcode for rank, f in err.failures.items()}
        if 2 in codes.values():
            return 2, None
        if set(codes.values()) <= {128 + signal.SIGINT, 128 + signal.SIGTERM}:
            return max(codes.values()), None
        rank, code = min(codes.items())
        return 1, f"training failed: worker {rank} exited with code {code} (its output is above)"
    finally:
        os.environ.pop(LAUNCHER_PID, None)
    return 0, None
