"""Faults during training, injected for real: SIGINT, kill -9 at a random step and inside a checkpoint write
(tests/test_faults_launcher.py has those around the launcher of several workers and a dying tracking
server; tests/test_train.py a diverging loss). Each leaves what the contract promises: a checkpoint, the
right exit code, nothing half-written, and a resumed run equal to an uninterrupted one."""

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY_MODEL, TINY_TRAIN, only_mlflow_run, read_json, run_stage

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
    result = run_stage(work, "train")  # the reference: no signal is sent to it, so it runs in this process
    assert result.returncode == 0, result.stderr[-3000:]
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


def test_kill_9_at_a_random_step_then_inside_a_checkpoint_write_and_the_rerun_equals_an_uninterrupted_run(
        tmp_path, data_project, uninterrupted):
    work = data_project(tmp_path, model=TINY_MODEL, train=LONG)
    process, log = start_train(work)
    wait_for(log, f"step {random.choice(range(110, 190, 10))}/", process)
    process.kill()
    assert process.wait(timeout=300) == -signal.SIGKILL
    assert [p.name for p in (work / "models" / "checkpoints").iterdir()] == ["step_00000100"]

    # The rerun resumes at step 100 and dies in its next checkpoint write, leaving a temp folder.
    log = work / "dies.log"
    process = subprocess.Popen([sys.executable, "-c", DIES_IN_CHECKPOINT.format(step=200)], cwd=work,
                               stderr=open(log, "w"), env={**os.environ, "PYTHONPATH": str(ROOT)})  # noqa: SIM115
    assert process.wait(timeout=300) == -signal.SIGKILL, log.read_text()[-3000:]
    assert list((work / "models" / "checkpoints").glob(".step_00000200.*.tmp")), "died mid-write"

    process, log = start_train(work)
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert read_json(work / "metrics" / "train.json")["resumed_from_step"] == 100
    assert outcome(work) == uninterrupted
    assert not list((work / "models" / "checkpoints").glob(".*")), "the killed write's temp folder is removed"
