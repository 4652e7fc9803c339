"""Where the per-batch work of clean and tokenize runs: in this process, in a pool of local processes, or as
tasks on a Ray cluster (`engine: ray`).

Each stage is a driver that reads its input in order, hands batches to `map_ordered`, and writes what
comes back. Results come back in the order the batches went in, whatever the engine or the number of
workers, so the files the driver writes are the same bytes everywhere: the engine decides only where the
CPU work happens. At most a few batches per worker are in flight, so the driver's RAM does not grow with
the corpus.

A worker builds its state once (a tokenizer, say) from a `setup`: a frozen, picklable dataclass with a
`build()` method. Local pool workers build it in their initializer; a Ray worker process builds it on its
first task and keeps it for the tasks that follow (keyed by the setup's value).
"""

import collections
import contextlib
import itertools
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Protocol, TypeVar

from llm.launch import die_with_launcher

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2  # batches submitted per worker: one being worked on, one queued behind it

Item = TypeVar("Item")
Result = TypeVar("Result")


class Setup(Protocol):
    """A frozen dataclass (hashable, picklable) that builds a worker's state."""

    def build(self) -> Any: ...


def map_ordered(fn: Callable[[Any, Item], Result], items: Iterable[Item], setup: Setup, engine: str = "local",
                workers: int = 0) -> Iterator[Result]:
    """Yield `fn(state, item)` for each item, in order, where `state = setup.build()` in the worker that runs
    it. `workers`: local processes (0 = one per core; 1 = this process); ignored by Ray, which runs as many
    tasks at once as the cluster has CPUs. Locally, input of a single item runs in this process: a pool
    would cost more to start than the work (a tiny corpus, a test)."""
    items = iter(items)
    head = list(itertools.islice(items, 2))
    items = itertools.chain(head, items)
    if engine == "ray":
        yield from _map_ray(fn, items, setup)
        return
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(head) < 2:
        state = setup.build()
        yield from (fn(state, item) for item in items)
        return
    with _local_pool(workers, setup) as pool:
        yield from _bounded(lambda item: pool.submit(_call_local, fn, item), items, workers,
                            lambda future: future.result())


def batches_by_chars(items: Iterable[Item], batch_chars: int, chars: Callable[[Item], int]) -> Iterator[list[Item]]:
    """Group items, in order, into lists of about `batch_chars` characters (an item holds `chars(item)`): the units
    of work handed to workers. A list ends with the item that brings it to `batch_chars` or more."""
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += chars(item)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _bounded(submit: Callable, items: Iterable, workers: int, wait: Callable) -> Iterator:
    """Submit items lazily, at most IN_FLIGHT_PER_WORKER * workers not yet yielded; yield in order."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(submit(item))
        if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
            yield wait(pending.popleft())
    while pending:
        yield wait(pending.popleft())


# Parallelism comes from the workers: a library that starts its own thread pool (the tokenizer's Rust one)
# gets one thread in each. Set in a worker before its setup is built, never in the driver.
WORKER_ENV = {"RAYON_NUM_THREADS": "1"}

_local_state: dict = {}


@contextlib.contextmanager
def _local_pool(workers: int, setup: Setup) -> Iterator[ProcessPoolExecutor]:
    """A pool of `workers` processes that ends with the stage: when the stage stops early (an error, SIGINT,
    SIGTERM as stages/cli.py raises it, the consumer closing the generator), the workers are killed at once
    instead of finishing the batches in flight; when the stage dies (kill -9), the kernel stops them
    (_init_local). Once the workers are gone, multiprocessing's resource tracker reads the end of its pipe
    and exits too."""
    # spawn, not fork: a forked child would inherit the tokenizer's Rust thread pool in an unknown state.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_local,
                               initargs=(setup, os.getpid()))
    try:
        yield pool
    except BaseException:
        # Python 3.14 has pool.terminate_workers(); before it, the pool's own table of its processes.
        for process in list(pool._processes.values()):
            process.kill()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _init_local(setup: Setup, stage_pid: int) -> None:
    die_with_launcher()  # SIGTERM (which a worker does not handle: it ends it) when the stage dies, even by kill -9
    if os.getppid() != stage_pid:  # it died before that, while this worker started: no work will come
        os._exit(0)
    os.environ.update(WORKER_ENV)
    _local_state["state"] = setup.build()


def _call_local(fn: Callable, item: Any) -> Any:
    return fn(_local_state["state"], item)


# A Ray worker process runs many tasks: it builds each distinct setup once.
_ray_states: dict = {}


def _call_ray(setup: Setup, fn: Callable, item: Any) -> Any:
    if setup not in _ray_states:
        _ray_states.clear()  # one stage's setup at a time: do not keep an old tokenizer alive
        os.environ.update(WORKER_ENV)
        _ray_states[setup] = setup.build()
    return fn(_ray_states[setup], item)


@contextlib.contextmanager
def _ray_session() -> Iterator[Any]:
    """Connect to the cluster named by RAY_ADDRESS (Ray's own variable: `auto`, or `HOST:6379`), or start a
    local one on this machine for the length of the stage when it is unset."""
    import ray

    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
        log.info("ray: %s, %d CPUs", f"cluster at {address}" if address else "a local instance",
                 int(ray.cluster_resources().get("CPU", 1)))
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _map_ray(fn: Callable, items: Iterable, setup: Setup) -> Iterator:
    with _ray_session() as ray:
        call = ray.remote(num_cpus=1)(_call_ray)
        setup_ref = ray.put(setup)  # stored once in the object store, not shipped with every task
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        yield from _bounded(lambda item: call.remote(setup_ref, fn, item), items, cpus, ray.get)
