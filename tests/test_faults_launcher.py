"""Faults around the training's processes: the launcher of two workers signalled or killed, a bad input found
by the workers (tests/test_faults.py has the signals and kills of one process, and the resume they are
followed by; tests/test_mlflow_server.py a tracking server that dies mid-run). Split in two files so that the
test processes share them out."""

import signal

import psutil
import pytest

from tests.conftest import TINY_MODEL, TINY_TRAIN, read_json
from tests.test_faults import LONG, start_train, wait_for

pytestmark = pytest.mark.slow


def test_a_bad_input_found_by_the_workers_is_one_line_per_rank_and_exit_2(tmp_path, data_project):
    """The launcher checks params and the tokenizer and meta.json before starting anyone; what only the workers
    read (here a shard whose header lies) still ends as exit 2 and a line, not a launcher's traceback."""
    work = data_project(tmp_path, model=TINY_MODEL, train={**TINY_TRAIN, "nproc_per_node": 2})
    shard = next((work / "data" / "tokens").glob("val_*.bin"))
    header = bytearray(shard.read_bytes())
    header[0:4] = (12345).to_bytes(4, "little")  # not the llm.c magic
    shard.write_bytes(bytes(header))
    process, log = start_train(work)
    assert process.wait(timeout=300) == 2, log.read_text()[-3000:]
    errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    assert 1 <= len(errors) <= 2 and all(shard.name in line for line in errors), log.read_text()[-3000:]
    assert "Traceback" not in log.read_text() and "ChildFailedError" not in log.read_text()
    assert not (work / "models" / "final").exists()


def test_sigterm_to_the_launcher_of_two_workers_checkpoints_and_exits_143(tmp_path, data_project):
    work = data_project(tmp_path, model=TINY_MODEL, train={**LONG, "nproc_per_node": 2, "max_steps": 3000})
    process, log = start_train(work)
    wait_for(log, "step 50/", process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143, log.read_text()[-3000:]
    lines = [line for line in log.read_text().splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and "SIGTERM" in lines[0], "rank 0 alone says it"
    [checkpoint] = [p for p in (work / "models" / "checkpoints").iterdir() if p.name in lines[0]]
    assert read_json(checkpoint / "state.json")["step"] == int(checkpoint.name[5:])
    assert not (work / "models" / "final").exists()


def test_kill_9_of_the_launcher_leaves_no_worker_running(tmp_path, data_project):
    work = data_project(tmp_path, model=TINY_MODEL, train={**LONG, "nproc_per_node": 2, "max_steps": 100_000})
    process, log = start_train(work)
    wait_for(log, "step 50/", process)
    workers = psutil.Process(process.pid).children(recursive=True)
    assert len([w for w in workers if "stages" in w.cmdline()]) == 2
    process.kill()
    process.wait()
    gone, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"workers outlived their launcher: {alive}"
    assert not (work / "models" / "final").exists() and not (work / "metrics" / "train.json").exists()
    # They stopped as on SIGTERM: the checkpoint of the step they reached is there, whole.
    [checkpoint] = (work / "models" / "checkpoints").iterdir()
    assert read_json(checkpoint / "state.json")["step"] > 50
