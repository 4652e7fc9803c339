"""The trained model as an MLflow model: logged by the train stage as a LoggedModel (a pyfunc from code, nothing
pickled), its evaluation linked to it, the alias `champion` moved only when the val bpb improves on the same val set,
`generate --model models:/NAME@champion`, and `mlflow models serve` answering as `generate` does. One project (the
default sqlite store) with two trainings, and one served model, shared by every test of the file."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY_MODEL, TINY_TRAIN, free_port, read_json, run_stage

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
NAME = "tiny-gpt"
PROMPT = "But soft"
SAMPLING = {"max_new_tokens": 12, "temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 7}
# Two trainings on the same data: a short one (2 steps), then the full one, which scores a lower val bpb.
TRAININGS = {"short": {"max_steps": 2, "checkpoint_interval": 1}, "full": {}}


def stage(work: Path, *args: object, params: str = "params.yaml") -> subprocess.CompletedProcess:
    result = run_stage(work, *args, "--params", params)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def paths(work: Path, name: str) -> dict[str, list]:
    out = work / name
    return {"train": ["--out", out / "final", "--metrics", out / "train.json", "--plots", out / "train.csv",
                      "--checkpoints", out / "checkpoints"],
            "evaluate": ["--model", out / "final", "--metrics", out / "eval.json", "--reports", out / "reports",
                         "--checkpoints", out / "checkpoints", "--train-plots", out / "train.csv"]}


@pytest.fixture(scope="module")
def project(tmp_path_factory, data_project) -> dict:
    """The short training evaluated (the first champion), the full one evaluated (the better: the new champion),
    then the short one evaluated again (no better: the alias stays). Its stderr per evaluation, by name."""
    work = data_project(tmp_path_factory.mktemp("models"), model=TINY_MODEL, train=TINY_TRAIN, evaluate={
        "max_new_tokens": 8}, mlflow={"experiment": "models", "registered_model": NAME})
    params = yaml.safe_load((work / "params.yaml").read_text())
    for name, train in TRAININGS.items():
        (work / f"{name}.yaml").write_text(yaml.safe_dump({**params, "train": {**params["train"], **train}}))
    logs = {}
    for name in TRAININGS:
        stage(work, "train", *paths(work, name)["train"], params=f"{name}.yaml")
        logs[name] = stage(work, "evaluate", *paths(work, name)["evaluate"], params=f"{name}.yaml").stderr
    logs["short again"] = stage(work, "evaluate", *paths(work, "short")["evaluate"], params="short.yaml").stderr
    return {"work": work, "uri": f"sqlite:///{work}/mlflow.db", "logs": logs,
            "runs": {name: read_json(work / name / "train.json")["mlflow_run_id"] for name in TRAININGS},
            "bpb": {name: read_json(work / name / "eval.json")["val_bpb"] for name in TRAININGS}}


def logged_models(project: dict, run: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(project["uri"])
    experiment = client.get_experiment_by_name("models").experiment_id
    return client.search_logged_models([experiment], filter_string=f"source_run_id = '{project['runs'][run]}'")


def generated(work: Path, model: object) -> str:
    flags = [f"--{key.replace('_', '-')}" if i == 0 else str(value)
             for key, value in SAMPLING.items() for i in (0, 1)]
    return stage(work, "generate", "--model", model, "--prompt", PROMPT, *flags).stdout


def test_the_final_model_and_each_earlier_checkpoint_are_logged_models_of_the_run_with_nothing_pickled(project):
    import mlflow
    from mlflow.models import Model

    by_name = {model.name: model for model in logged_models(project, "short")}
    # checkpoints after steps 1 and 2 are kept (3 at most); the one at the last step is the final model itself
    assert sorted((name, model.tags["llm.role"]) for name, model in by_name.items()) == \
        [("final", "final"), ("step_00000001", "checkpoint")]
    outputs = mlflow.MlflowClient(project["uri"]).get_run(project["runs"]["short"]).outputs.model_outputs
    steps = {output.model_id: output.step for output in outputs}
    assert steps == {by_name["final"].model_id: 2, by_name["step_00000001"].model_id: 1}
    assert all(model.source_run_id == project["runs"]["short"] for model in by_name.values())

    folder = Path(by_name["final"].artifact_location.removeprefix("file://"))
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle", ".pt", ".pth", ".bin"))], files
    assert sorted(f for f in files if f.startswith("artifacts/")) == \
        ["artifacts/model/config.json", "artifacts/model/model.safetensors", "artifacts/model/tokenizer.json"]
    pyfunc = Model.load(folder / "MLmodel").flavors["python_function"]
    assert pyfunc["model_code_path"].endswith("mlflow_model.py") and "python_model" not in pyfunc
    final = project["work"] / "short" / "final"
    assert (folder / "artifacts/model/model.safetensors").read_bytes() == (final / "model.safetensors").read_bytes()


def test_predict_generates_what_the_generate_command_does_for_the_seed(project):
    import mlflow
    import pandas as pd

    [final] = [model for model in logged_models(project, "full") if model.name == "final"]
    mlflow.set_tracking_uri(project["uri"])
    try:
        loaded = mlflow.pyfunc.load_model(f"models:/{final.model_id}")
    finally:
        mlflow.set_tracking_uri(None)
    assert {p.name for p in loaded.metadata.signature.params} == set(SAMPLING)
    texts = loaded.predict(pd.DataFrame({"prompt": [PROMPT, PROMPT]}), params=SAMPLING)
    expected = generated(project["work"], project["work"] / "full" / "final")
    assert list(texts) == [expected, expected] and expected


def test_the_evaluation_is_linked_to_the_model_and_the_val_set_so_a_search_finds_the_best(project):
    import mlflow

    client = mlflow.MlflowClient(project["uri"])
    experiment = client.get_experiment_by_name("models").experiment_id
    [val] = [d.dataset for d in client.get_run(project["runs"]["full"]).inputs.dataset_inputs
             if d.dataset.name == "val"]
    mlflow.set_tracking_uri(project["uri"])
    try:
        [best, *_] = mlflow.search_logged_models(
            experiment_ids=[experiment], datasets=[{"dataset_name": "val", "dataset_digest": val.digest}],
            order_by=[{"field_name": "metrics.eval/val_bpb", "ascending": True}], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    assert best.source_run_id == project["runs"]["full"] and best.name == "final"
    linked = {m.key: m for m in best.metrics}
    assert linked["eval/val_bpb"].value == pytest.approx(project["bpb"]["full"])
    assert linked["eval/val_bpb"].dataset_digest == val.digest and linked["eval/val_bpb"].dataset_name == "val"
    assert linked["eval/val_loss"].value == pytest.approx(read_json(project["work"] / "full" / "eval.json")["val_loss"])


def test_the_champion_alias_moves_only_when_the_val_bpb_improves(project):
    import mlflow

    assert project["bpb"]["full"] < project["bpb"]["short"], "the premise: more steps, a better model"
    client = mlflow.MlflowClient(project["uri"])
    versions = sorted(client.search_model_versions(f"name = '{NAME}'"), key=lambda v: int(v.version))
    assert [v.run_id for v in versions] == [project["runs"]["short"], project["runs"]["full"]], "registered once each"
    assert client.get_model_version_by_alias(NAME, "champion").version == versions[1].version
    logs = project["logs"]
    assert f"{NAME}@champion is now version 1" in logs["short"]
    assert f"{NAME}@champion is now version 2" in logs["full"] and "replacing version 1" in logs["full"]
    [line] = [line for line in logs["short again"].splitlines() if "alias stays" in line]
    assert f"version 1: val bpb {project['bpb']['short']:.4f} does not beat {NAME}@champion (version 2" in line


def test_a_champion_scored_on_another_val_set_is_not_compared(project, tmp_path):
    """Scored on evenly spaced windows (evaluate.max_tokens), the val set is another one: one line says so."""
    import mlflow

    work = project["work"]
    params = yaml.safe_load((work / "short.yaml").read_text())
    (work / "sampled.yaml").write_text(yaml.safe_dump({**params, "evaluate": {**params["evaluate"],
                                                                              "max_tokens": 64}}))
    options = paths(work, "short")["evaluate"]
    options[options.index("--metrics") + 1] = tmp_path / "eval.json"
    options[options.index("--reports") + 1] = tmp_path / "reports"
    stderr = stage(work, "evaluate", *options, params="sampled.yaml").stderr
    [line] = [line for line in stderr.splitlines() if "not compared" in line]
    assert f"{NAME}@champion (version 2) was not scored on this val set" in line and "the alias stays" in line
    assert str(mlflow.MlflowClient(project["uri"]).get_model_version_by_alias(NAME, "champion").version) == "2"


def test_generate_loads_the_champion_from_the_registry(project):
    work = project["work"]
    assert generated(work, f"models:/{NAME}@champion") == generated(work, work / "full" / "final")


@pytest.fixture(scope="module")
def served(project):
    """`mlflow models serve -m models:/NAME@champion --env-manager local` on a free loopback port: its URL."""
    work, port = project["work"], free_port()
    log = open(work / "serve.log", "w")  # noqa: SIM115
    process = subprocess.Popen(
        [BIN / "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={"PATH": f"{BIN}:/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
             "MLFLOW_TRACKING_URI": project["uri"], "HOME": str(work)})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2):
                    break
            except OSError:
                if process.poll() is not None:
                    break
                time.sleep(0.5)
        else:
            pytest.fail("mlflow models serve did not start")
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited: {(work / 'serve.log').read_text()[-3000:]}")
        yield base
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


def test_the_served_champion_answers_as_generate_does(project, served):
    body = json.dumps({"inputs": {"prompt": [PROMPT]}, "params": SAMPLING}).encode()
    request = urllib.request.Request(f"{served}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    work = project["work"]
    assert answer == {"predictions": [generated(work, work / "full" / "final")]}
