"""No process outlives its stage (issue 31, item 2): clean and tokenize with 2 local workers, stopped mid-run by
SIGTERM, SIGINT or kill -9. SIGTERM and SIGINT unwind the stage (one line, the temp output removed, 143 or 130);
whatever stops it, its worker processes and multiprocessing's resource tracker are gone a moment later.

The stages run as real processes from a script (written here) that slows every batch down, so that the stage
is surely mid-run when the signal comes: the workers import the script too (spawn runs the parent's main
file), so they run the slowed function, which also says that a worker is at work (a file working.PID)."""

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from llm.documents import DocumentShardWriter
from tests.conftest import SAMPLE_TEXTS, stage_env, write_params

SLOW_STAGES = '''
import os
import sys
import time
from pathlib import Path

import llm.clean
import llm.tokenize

_clean_batch, _encode = llm.clean.clean_batch, llm.tokenize._encode


def slow_clean_batch(setup, docs):
    Path(f"working.{os.getpid()}").touch()
    time.sleep(0.2)
    return _clean_batch(setup, docs)


def slow_encode(state, docs):
    Path(f"working.{os.getpid()}").touch()
    time.sleep(0.2)
    return _encode(state, docs)


llm.clean.clean_batch, llm.tokenize._encode = slow_clean_batch, slow_encode

if __name__ == "__main__":
    from stages.__main__ import app

    app(sys.argv[1:])
'''

DOCUMENTS = 80  # one batch each: 80 batches of 0.2 s on 2 workers, 8 s if nothing stops the stage


def texts() -> list[str]:
    return [f"Document {i}.\n" + SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] * 3 for i in range(DOCUMENTS)]


@pytest.fixture
def work(tmp_path: Path, sample_tokenizer_path: Path) -> Path:
    """A project folder: params with 2 workers, raw files, cleaned shards and tokenizer.json (the fixture's)."""
    (tmp_path / "slow_stages.py").write_text(SLOW_STAGES)
    write_params(tmp_path / "params.yaml", clean={"num_workers": 2, "batch_chars": 10, "min_chars": 1},
                 tokenize={"num_workers": 2, "batch_chars": 10})
    raw = tmp_path / "raw"
    raw.mkdir()
    for i, text in enumerate(texts()):
        (raw / f"doc{i:03d}.txt").write_text(text)
    clean = tmp_path / "clean"
    clean.mkdir()
    writer = DocumentShardWriter(clean, 1 << 20)
    for i, text in enumerate(texts()):
        writer.add(f"doc{i:03d}.txt", f"doc{i:03d}.txt", text, len(text.encode()))
    writer.close()
    return tmp_path


COMMANDS = {
    "clean": ["clean", "--raw", "raw", "--out", "out", "--metrics", "clean.json"],
    "tokenize": ["tokenize", "--clean", "clean", "--tokenizer", "tokenizer.json", "--out", "out"],
}


@pytest.fixture
def started() -> Iterator[list[psutil.Process]]:
    """The processes a test's stage started, killed at the end if any is left, so none outlives the test."""
    processes: list[psutil.Process] = []
    yield processes
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def default_sigint() -> None:
    """In the child: SIGINT as a shell's foreground job has it. A test process may ignore SIGINT (pytest-xdist's
    workers do), and an ignored SIGINT is inherited: Python then, rightly, leaves it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(work: Path, stage: str, started: list[psutil.Process], at_work: bool = True) -> subprocess.Popen:
    """The stage in its own session (a signal reaches only the process it is sent to), its stderr to a file
    (stage.err: a pipe would stay open while a worker holds it), once both of its workers are at work on a
    batch (at_work) or as soon as both exist, still starting; every process it started is added to `started`."""
    process = subprocess.Popen([sys.executable, "slow_stages.py", *COMMANDS[stage], "--params", "params.yaml"],
                               cwd=work, stdout=subprocess.DEVNULL, stderr=open(work / "stage.err", "w"),  # noqa: SIM115
                               start_new_session=True, env=stage_env(), preexec_fn=default_sigint)
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, f"{stage} exited with {process.returncode}: {stderr(work)}"
        assert time.monotonic() < deadline, f"{stage}: no 2 workers after 60 s"
        children = psutil.Process(process.pid).children(recursive=True)
        workers = [child for child in children if "spawn_main" in " ".join(child.cmdline())]
        if len(workers) == 2 and (not at_work or all((work / f"working.{w.pid}").exists() for w in workers)):
            started.extend(children)
            return process
        time.sleep(0.05)


def stderr(work: Path) -> str:
    return (work / "stage.err").read_text()


def still_alive(processes: list[psutil.Process], timeout: float) -> list[str]:
    """The command lines of those of `processes` still alive after `timeout` seconds."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return [" ".join(process.cmdline()) for process in alive]


# SIGINT shares the unwinding with SIGTERM (Terminated is a KeyboardInterrupt): one stage checks it.
@pytest.mark.parametrize(("stage", "signum"), [("clean", signal.SIGTERM), ("tokenize", signal.SIGTERM),
                                               ("clean", signal.SIGINT)])
def test_a_signal_stops_the_stage_with_one_line_no_temp_output_and_no_process_left(work, stage, signum, started):
    process = start(work, stage, started)
    assert any("resource_tracker" in " ".join(child.cmdline()) for child in started), "the tracker is covered"
    process.send_signal(signum)
    process.wait(timeout=30)
    assert process.returncode == 128 + signum, stderr(work)
    lines = stderr(work).strip().splitlines()
    assert lines[-1] == f"interrupted: stopped by {signal.Signals(signum).name}", stderr(work)
    assert "Traceback" not in stderr(work) and stderr(work).count("interrupted") == 1, stderr(work)
    assert not list(work.glob(".out*")) and not (work / "out").exists(), "no temp or partial output left"
    assert not still_alive(started, timeout=5), "every worker and the resource tracker end with the stage"


@pytest.mark.parametrize(("stage", "at_work"), [("clean", True), ("tokenize", True), ("clean", False)])
def test_kill_9_of_the_stage_takes_its_workers_and_the_resource_tracker_with_it(work, stage, at_work, started):
    process = start(work, stage, started, at_work)
    process.kill()
    process.wait(timeout=10)
    assert not still_alive(started, timeout=5)
