"""Two trainings with different learning rates against a real MLflow tracking server, checked through its
REST API and in a real browser (headless Chromium on the compare view); then the server is killed during a
third training, which must finish all the same."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from llm.tracking import flatten
from stages.params import load_params
from tests.conftest import TINY_MODEL, TINY_TRAIN, free_port, read_json, run_stage
from tests.test_faults import LONG, history, start_train, wait_for
from tests.test_tracking import mlflow_noise

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TINY = {
    "model": TINY_MODEL,
    "train": {**TINY_TRAIN, "max_steps": 6, "eval_interval": 2, "log_interval": 2, "checkpoint_interval": 3},
    "evaluate": {"max_new_tokens": 8},
}
RATES = {"lr-small": 0.001, "lr-large": 0.01}


def api(base: str, path: str, body: dict | None = None) -> dict:
    """GET (or POST a JSON body to) the MLflow REST API."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server_process(tmp_path_factory, empty_mlflow_db):
    """`mlflow server` on a free loopback port, with its own database and artifact store: (URL, process)."""
    home = tmp_path_factory.mktemp("mlflow")
    shutil.copy(empty_mlflow_db, home / "mlflow.db")
    port = free_port()
    process = subprocess.Popen(
        [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home}/mlflow.db", "--artifacts-destination", str(home / "artifacts")],
        cwd=home, stdout=subprocess.DEVNULL, stderr=open(home / "server.log", "w"),  # noqa: SIM115
        start_new_session=True)  # its own process group: the server and its web workers stop together
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"MLflow server did not start: {(home / 'server.log').read_text()[-2000:]}")
        yield base, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(server_process) -> str:
    return server_process[0]


@pytest.fixture(scope="module")
def runs(server, tmp_path_factory, data_project):
    """Train and evaluate twice on the same data, once per learning rate; (project, {run name: run id})."""
    work = data_project(tmp_path_factory.mktemp("project"), mlflow={"tracking_uri": server, "experiment": "lr"},
                        **TINY)
    ids = {}
    for name, lr in RATES.items():
        params = yaml.safe_load((work / "params.yaml").read_text())
        params["train"]["lr"] = lr
        (work / f"{name}.yaml").write_text(yaml.safe_dump(params))
        out = work / name
        paths = {"train": ["--out", out / "final", "--metrics", out / "train.json", "--plots", out / "train.csv",
                           "--checkpoints", out / "checkpoints"],
                 "evaluate": ["--model", out / "final", "--metrics", out / "eval.json", "--reports", out / "reports",
                              "--checkpoints", out / "checkpoints", "--train-plots", out / "train.csv"]}
        env = {"DVC_EXP_NAME": name}  # the run name, as `dvc exp run` sets it
        for command, options in paths.items():
            result = run_stage(work, command, "--params", f"{name}.yaml", *options, env=env)
            assert result.returncode == 0, result.stderr
        ids[name] = read_json(out / "train.json")["mlflow_run_id"]
        assert read_json(out / "eval.json")["mlflow_run_id"] == ids[name]
    return work, ids


def test_both_runs_carry_params_loss_history_eval_metrics_and_artifacts(server, runs):
    work, ids = runs
    experiment = api(server, "experiments/get-by-name?experiment_name=lr")["experiment"]
    found = api(server, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert sorted(run["info"]["run_name"] for run in found) == sorted(RATES)

    expected_keys = set(flatten(load_params(work / "lr-small.yaml").to_dict()))
    for name, run_id in ids.items():
        run = api(server, f"runs/get?run_id={run_id}")["run"]
        assert run["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert expected_keys <= set(params), expected_keys - set(params)
        assert float(params["train.lr"]) == RATES[name]

        history = api(server, f"metrics/get-history?run_id={run_id}&metric_key=train_loss")["metrics"]
        assert [m["step"] for m in history] == [2, 4, 6]
        assert all(m["value"] > 0 for m in history)
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics["eval/val_bpb"] == pytest.approx(read_json(work / name / "eval.json")["val_bpb"])
        assert {"eval/val_loss", "eval/val_perplexity", "val_loss", "tokens_per_sec"} <= set(metrics)

        top = {f["path"] for f in api(server, f"artifacts/list?run_id={run_id}")["files"]}
        assert {"config.json", "tokenizer.json", "train.csv", "model", "eval"} <= top
        evaluation = {f["path"] for f in api(server, f"artifacts/list?run_id={run_id}&path=eval")["files"]}
        assert {"eval/samples.md", "eval/loss.png", "eval/attention", "eval/eval.json"} <= evaluation
    small, large = (api(server, f"runs/get?run_id={ids[n]}")["run"] for n in RATES)
    assert small["data"]["metrics"] != large["data"]["metrics"], "different learning rates, different runs"


def test_each_final_model_is_a_logged_model_with_its_evaluation_and_the_better_one_is_the_champion(server, runs):
    """On a real server: the registry and the LoggedModels (llm/model_registry.py) as on the sqlite store."""
    from mlflow import MlflowClient

    work, ids = runs
    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("lr").experiment_id
    bpb, versions = {}, {}
    for name, run_id in ids.items():
        [final] = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}' AND "
                                              "name = 'final'")
        linked = {m.key: m for m in final.metrics if m.dataset_name == "tokens/val"}
        bpb[name] = read_json(work / name / "eval.json")["val_bpb"]
        assert linked["eval/val_bpb"].value == pytest.approx(bpb[name])
        [versions[name]] = [v for v in client.search_model_versions("name = 'shakespeare-gpt'")
                            if v.source == f"models:/{final.model_id}"]
    champion = client.get_model_version_by_alias("shakespeare-gpt", "champion")
    assert champion.version == versions[min(bpb, key=bpb.get)].version


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_the_compare_view_shows_both_runs_and_the_metric_in_a_browser(server, runs, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is not installed: `make setup-test` installs it"
    work, ids = runs
    experiment = api(server, "experiments/get-by-name?experiment_name=lr")["experiment"]
    query = urllib.parse.urlencode({"runs": json.dumps(list(ids.values())),
                                    "experiments": json.dumps([experiment["experiment_id"]])})
    url = f"{server}/#/compare-runs?{query}"
    browser = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,1400",
               "--virtual-time-budget=30000"]

    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for name in RATES:
        assert name in dom.stdout, f"run {name} not on the compare page"
    assert "eval/val_bpb" in dom.stdout

    screenshot = tmp_path / "compare.png"
    shot = subprocess.run([*browser, f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=180)
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    if os.environ.get("LLM_SCREENSHOT_DIR"):  # to look at it: LLM_SCREENSHOT_DIR=docs pytest ...
        shutil.copy(screenshot, Path(os.environ["LLM_SCREENSHOT_DIR"]) / "mlflow-compare.png")


def test_a_tracking_server_that_dies_mid_run_does_not_stop_training(server_process, runs, tmp_path, data_project):
    """Last in this file: it kills the module's server (the compare tests above are done with it)."""
    url, server = server_process
    work = data_project(tmp_path / "work", model=TINY_MODEL, train={**LONG, "max_steps": 600},
                        mlflow={"tracking_uri": url, "experiment": "dies"})
    process, log = start_train(work)
    wait_for(log, "step 100/", process)
    os.killpg(server.pid, signal.SIGKILL)  # the server and its workers, at once
    server.wait()
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text and "training goes on" in text
    assert not mlflow_noise(text), "MLflow's own warnings and errors are not printed on top of our line"
    [report] = [line for line in text.splitlines() if "could not be logged" in line]
    assert "outputs" in report and "complete" in report
    assert read_json(work / "metrics" / "train.json")["steps"] == 600 and len(history(work)) == 60
    assert (work / "models" / "final" / "model.safetensors").is_file()
