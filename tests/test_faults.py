"""Faults during training, injected for real: SIGINT and SIGTERM, kill -9 of the launcher, a diverging loss, a
tracking server that dies mid-run. Each leaves what the contract promises: a checkpoint, the right exit code,
no orphan, nothing half-written, and a resumed run equal to an uninterrupted one."""

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY_MODEL, TINY_TRAIN, free_port, only_mlflow_run, read_json

pytestmark = pytest.mark.slow

# Long enough to be stopped mid-run (about a second per 100 steps of the tiny model), short enough to rerun.
LONG = {**TINY_TRAIN, "max_steps": 300, "log_interval": 10, "eval_interval": 100, "checkpoint_interval": 100}


def start_train(work: Path, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """The train stage in its own session (so a signal reaches only the process it is sent to); its stderr
    goes to a file, returned."""
    log = work / f"train-{time.monotonic_ns()}.log"
    process = subprocess.Popen([sys.executable, "-m", "stages", "train"], cwd=work, stdout=subprocess.DEVNULL,
                               stderr=open(log, "w"), start_new_session=True,  # noqa: SIM115
                               env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})})
    return process, log


def wait_for(log: Path, text: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert process.poll() is None, f"exited with {process.returncode} before {text!r}: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout} s: {log.read_text()[-2000:]}"
        time.sleep(0.1)


def history(work: Path) -> list[dict]:
    """plots/train.csv without the timing columns (which differ between any two runs)."""
    with open(work / "plots" / "train.csv") as f:
        return [{k: v for k, v in row.items() if k not in ("tokens_per_sec", "mfu")} for row in csv.DictReader(f)]


def outcome(work: Path) -> tuple:
    """What an interrupted and resumed run must share with an uninterrupted one."""
    metrics = read_json(work / "metrics" / "train.json")
    weights = load_file(str(work / "models" / "final" / "model.safetensors"))
    return ({k: metrics[k] for k in ("train_loss", "val_loss", "steps", "tokens_seen")}, history(work),
            {name: tensor.tolist() for name, tensor in weights.items()})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_project):
    work = data_project(tmp_path_factory.mktemp("whole"), model=TINY_MODEL, train=LONG)
    process, log = start_train(work)
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    return outcome(work)


def test_sigint_checkpoints_marks_the_run_killed_exits_130_and_the_resume_equals_an_uninterrupted_run(
        tmp_path, data_project, uninterrupted):
    work = data_project(tmp_path, model=TINY_MODEL, train=LONG)
    process, log = start_train(work)
    wait_for(log, "step 130/", process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    lines = [line for line in log.read_text().splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and "SIGINT" in lines[0], log.read_text()[-2000:]
    assert "Traceback" not in log.read_text()
    [checkpoint] = [p for p in (work / "models" / "checkpoints").iterdir() if int(p.name[5:]) > 130]
    assert checkpoint.name in lines[0]
    assert not (work / "models" / "final").exists() and not (work / "metrics" / "train.json").exists()
    _, run = only_mlflow_run(f"sqlite:///{work}/mlflow.db", "gpt-from-scratch")
    assert run.info.status == "KILLED"

    process, log = start_train(work)
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert read_json(work / "metrics" / "train.json")["resumed_from_step"] == int(checkpoint.name[5:])
    assert outcome(work) == uninterrupted, "metrics, every history row and the weights as if never stopped"
    client, run = only_mlflow_run(f"sqlite:///{work}/mlflow.db", "gpt-from-scratch")
    assert run.info.status == "FINISHED", "the resumed training reopened the killed run"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")} == set(range(10, 301, 10))


# The train stage with safetensors' writer patched to die (kill -9 of itself) right after it wrote the weights
# of the checkpoint at step {step}, before the optimizer state, state.json and the rename.
DIES_IN_CHECKPOINT = """
import os, signal, sys
import llm.checkpoint
real_save = llm.checkpoint.save_file
def save_then_die(weights, path):
    real_save(weights, path)
    if ".step_{step:08d}." in path:
        os.kill(os.getpid(), signal.SIGKILL)
llm.checkpoint.save_file = save_then_die
sys.argv = ["stages", "train"]
from stages.__main__ import app
app()
"""


@pytest.mark.parametrize("where", ["at a random step", "inside a checkpoint write"])
def test_kill_9_then_a_rerun_equals_an_uninterrupted_run(tmp_path, data_project, uninterrupted, where):
    work = data_project(tmp_path, model=TINY_MODEL, train=LONG)
    if where == "at a random step":
        process, log = start_train(work)
        wait_for(log, f"step {random.choice(range(110, 190, 10))}/", process)
        process.kill()
    else:
        log = work / "dies.log"
        process = subprocess.Popen([sys.executable, "-c", DIES_IN_CHECKPOINT.format(step=200)], cwd=work,
                                   stderr=open(log, "w"), env={**os.environ, "PYTHONPATH": str(ROOT)})  # noqa: SIM115
    assert process.wait(timeout=300) == -signal.SIGKILL
    if where == "inside a checkpoint write":
        assert [p.name for p in (work / "models" / "checkpoints").glob(".step_00000200.*.tmp")], "died mid-write"
    process, log = start_train(work)
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert read_json(work / "metrics" / "train.json")["resumed_from_step"] == 100
    assert outcome(work) == uninterrupted
    assert not list((work / "models" / "checkpoints").glob(".*")), "the killed write's temp folder is removed"


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


def test_a_diverging_loss_stops_with_exit_2_and_keeps_only_finite_checkpoints(tmp_path, data_project):
    work = data_project(tmp_path, model=TINY_MODEL, train={**TINY_TRAIN, "lr": 1e6, "max_steps": 40,
                                                           "checkpoint_interval": 2, "log_interval": 5})
    process, log = start_train(work)
    assert process.wait(timeout=300) == 2, log.read_text()[-3000:]
    error = log.read_text().splitlines()[-1]
    assert error.startswith("error: training diverged") and "train.lr" in error
    assert not (work / "models" / "final").exists()
    for checkpoint in (work / "models" / "checkpoints").iterdir():
        assert all(t.isfinite().all() for t in load_file(str(checkpoint / "model.safetensors")).values())
    _, run = only_mlflow_run(f"sqlite:///{work}/mlflow.db", "gpt-from-scratch")
    assert run.info.status == "FAILED"


def test_a_tracking_server_that_dies_mid_run_does_not_stop_training(tmp_path, data_project, empty_mlflow_db):
    home = tmp_path / "server"
    home.mkdir()
    shutil.copy(empty_mlflow_db, home / "mlflow.db")
    port = free_port()
    server = subprocess.Popen(
        [Path(sys.executable).parent / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers",
         "1", "--backend-store-uri", f"sqlite:///{home}/mlflow.db", "--artifacts-destination", str(home / "art")],
        cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        work = data_project(tmp_path / "work", model=TINY_MODEL, train={**LONG, "max_steps": 600},
                            mlflow={"tracking_uri": base, "experiment": "dies"})
        process, log = start_train(work)
        wait_for(log, "step 100/", process)
        os.killpg(server.pid, signal.SIGKILL)
        assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    text = log.read_text()
    assert "Traceback" not in text
    assert "training goes on" in text
    [report] = [line for line in text.splitlines() if "could not be logged" in line]
    assert "outputs" in report and "complete" in report
    metrics = read_json(work / "metrics" / "train.json")
    assert metrics["steps"] == 600 and len(history(work)) == 60
    assert (work / "models" / "final" / "model.safetensors").is_file()
