"""torchrun on CPU (Gloo): DDP and FSDP2 match one process, resume across world sizes, survive a dead rank,
log one MLflow run, and run as two "nodes" on loopback."""

import concurrent.futures
import contextlib
import csv
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, TINY_MODEL, free_port, only_mlflow_run, read_json, run_stage, write_params

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT_S = 300

TRAIN = {"batch_size": 4, "grad_accum_steps": 2, "max_steps": 8, "warmup_steps": 2, "eval_interval": 4,
         "eval_batches": 2, "log_interval": 1, "checkpoint_interval": 4, "dtype": "float32", "lr": 0.003,
         "optimizer": "muon"}  # Muon for the block matrices, AdamW for the rest: both optimizers under DDP and FSDP2


@pytest.fixture(scope="module")
def project(tmp_path_factory, data_project):
    """A project folder with the data stages run on a small corpus."""
    return data_project(tmp_path_factory.mktemp("dist"))


def prepare(project: Path, name: str, train: dict | None = None) -> Path:
    """project/name/ with a params.yaml for a tiny model; train outputs go there too."""
    out = project / name
    out.mkdir(exist_ok=True)
    if not (out / "mlflow.db").exists():
        shutil.copy(project / "mlflow.db", out / "mlflow.db")  # an empty database, its tables made
    write_params(out / "params.yaml", data={"val_fraction": 0.25}, tokenizer={"vocab_size": 300}, model=TINY_MODEL,
                 train={**TRAIN, **(train or {})},
                 mlflow={"tracking_uri": f"sqlite:///{out}/mlflow.db", "experiment": name})
    return out


def train_options(out: Path) -> list[str]:
    """The train stage's options that put its inputs and outputs in `out`."""
    return ["--params", str(out / "params.yaml"), "--checkpoints", str(out / "ckpt"), "--out", str(out / "final"),
            "--metrics", str(out / "train.json"), "--plots", str(out / "train.csv")]


def launch(project: Path, out: Path, launcher: list[str], env: dict | None = None,
           fail_at: int | None = None) -> subprocess.CompletedProcess:
    """The train stage under torchrun; with `fail_at`, rank 0 dies after logging that step (tests/fault_worker.py).
    A launch that runs past LAUNCH_TIMEOUT_S fails the test with every worker's Python stacks (see stop_hung)."""
    entry = ["stages", "train"] if fail_at is None else ["tests.fault_worker", str(fail_at)]
    cmd = [str(BIN / "torchrun"), *launcher, "-m", *entry, *train_options(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    with subprocess.Popen(cmd, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stdout, stderr = stop_hung(process)
            first_dump = stderr.find("Fatal Python error")
            stacks = stderr[first_dump:] if first_dump >= 0 else stderr[-12000:]
            pytest.fail(f"torchrun ran past {LAUNCH_TIMEOUT_S} s; where its workers were:\n{stacks[:12000]}")
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def stop_hung(process: subprocess.Popen) -> tuple[str, str]:
    """Stop a hung launch and its whole process group, none left behind to load the machine for the tests after
    it. torchrun and its workers get SIGABRT first: faulthandler (PYTHONFAULTHANDLER) prints every thread's
    Python stack to the stderr read here, which says where a hang is."""
    launcher = psutil.Process(process.pid)
    processes = [*launcher.children(recursive=True), launcher]
    for each in processes:  # one at a time, so that their stacks do not interleave
        with contextlib.suppress(psutil.NoSuchProcess):
            each.send_signal(signal.SIGABRT)
            each.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):  # the group's last process may have died of its SIGABRT
        os.killpg(process.pid, signal.SIGKILL)
    return process.communicate()


def torchrun(project: Path, name: str, nproc: int, train: dict | None = None, launcher: list[str] | None = None,
             env: dict | None = None, check: bool = True,
             fail_at: int | None = None) -> tuple[Path, subprocess.CompletedProcess]:
    """Run the train stage under torchrun (standalone, `nproc` processes unless `launcher` says otherwise)."""
    out = prepare(project, name, train)
    result = launch(project, out, launcher or ["--standalone", f"--nproc_per_node={nproc}"], env, fail_at)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def losses(out: Path) -> list[float]:
    with open(out / "train.csv") as f:
        return [float(row["train_loss"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def one_process(project):
    """The run the two-process runs must match: one process with their global batch. A world of one needs no
    launcher: the stage runs in this process."""
    out = prepare(project, "one", {"batch_size": 8})
    result = run_stage(project, "train", *train_options(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_processes(project):
    """two_processes(strategy): the output folder of a two-process run with that strategy, run on first use."""
    runs = {}

    def get(strategy: str) -> Path:
        if strategy not in runs:
            runs[strategy] = torchrun(project, f"two-{strategy}", 2, {"batch_size": 4, "strategy": strategy})[0]
        return runs[strategy]

    return get


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_twice_the_batch(one_process, two_processes, strategy):
    one, two = one_process, two_processes(strategy)
    assert len(losses(one)) == 8
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    assert read_json(two / "train.json")["val_loss"] == pytest.approx(read_json(one / "train.json")["val_loss"],
                                                                       abs=1e-5)
    assert read_json(two / "train.json")["tokens_seen"] == read_json(one / "train.json")["tokens_seen"]


@pytest.mark.parametrize(("first", "second", "strategy"), [(2, 1, "fsdp"), (1, 2, "ddp")])
def test_a_run_checkpointed_on_n_processes_resumes_on_m(project, first, second, strategy):
    name = f"resume-{first}to{second}-{strategy}"
    out, crashed = torchrun(project, name, first, {"strategy": strategy}, fail_at=6, check=False)
    assert crashed.returncode != 0
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["step_00000004"]
    out, _ = torchrun(project, name, second, {"strategy": strategy})
    metrics = read_json(out / "train.json")
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 8
    with open(out / "train.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert steps == list(range(1, 9)), "the history of steps 1-4 comes back from the checkpoint"


def test_a_dead_rank_is_restarted_and_the_run_completes_from_a_checkpoint(project):
    out, result = torchrun(project, "restart", 2, launcher=["--standalone", "--nproc_per_node=2", "--max-restarts=1"],
                           fail_at=6)
    metrics = read_json(out / "train.json")
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 8
    assert (out / "final" / "model.safetensors").is_file()
    # The restarted attempt reopened the run the killed one started (its id is in the checkpoint).
    client, run = only_mlflow_run(f"sqlite:///{out}/mlflow.db", "restart")
    assert run.info.run_id == metrics["mlflow_run_id"] and run.info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")} == set(range(1, 9))


def test_only_rank_0_creates_an_mlflow_run(two_processes):
    out = two_processes("ddp")
    client, run = only_mlflow_run(f"sqlite:///{out}/mlflow.db", out.name)
    assert run.data.tags["world_size"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 8


def test_two_nodes_on_loopback(project):
    port = free_port()
    out = prepare(project, "two-nodes")

    def node(rank: int) -> list[str]:
        return ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}", "--master_addr=127.0.0.1",
                f"--master_port={port}"]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda rank: launch(project, out, node(rank)), (0, 1)))
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:] + results[1].stderr[-2000:]
    metrics = read_json(out / "train.json")
    assert metrics["steps"] == 8 and metrics["tokens_seen"] == 8 * 4 * 2 * 2 * 32, "global batch spans both nodes"
