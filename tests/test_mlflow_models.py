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
    # the training's, which evaluation links its metrics to
    [digest] = {d.dataset.digest for d in client.get_run(project["runs"]["full"]).inputs.dataset_inputs
                if d.dataset.name == "tokens/val"}
    mlflow.set_tracking_uri(project["uri"])
    try:
        [best, *_] = mlflow.search_logged_models(
            experiment_ids=[experiment], datasets=[{"dataset_name": "tokens/val", "dataset_digest": digest}],
            order_by=[{"field_name": "metrics.eval/val_bpb", "ascending": True}], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    assert best.source_run_id == project["runs"]["full"] and best.name == "final"
    linked = {m.key: m for m in best.metrics}
    assert linked["eval/val_bpb"].value == pytest.approx(project["bpb"]["full"])
    assert linked["eval/val_bpb"].dataset_digest == digest and linked["eval/val_bpb"].dataset_name == "tokens/val"
    assert linked["eval/val_loss"].value == pytest.approx(read_json(project["work"] / "full" / "eval.json")["val_loss"])


def test_the_champion_alias_moves_only_when_the_val_bpb_improves(project):
    import mlflow

    assert project["bpb"]["full"] < project["bpb"]["short"], "the premise: more steps, a better model"
    client = mlflow.MlflowClient(project["uri"])
    versions = sorted(client.search_model_versions(f"name = '{NAME}'"), key=lambda v: int(v.version))
    assert [v.run_id for v in versions] == [project["runs"]["short"], project["runs"]["full"]], "registered once each"
    assert client.get_model_version_by_alias(NAME, "champion").version == versions[1].version
    for run, version in zip(TRAININGS, versions, strict=True):  # each LoggedModel names its version, for the UI
        [final] = [model for model in logged_models(project, run) if model.name == "final"]
        assert json.loads(final.tags["mlflow.modelVersions"]) == [{"name": NAME, "version": str(version.version)}]
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
    assert f"{NAME}@champion (version 2) was not scored on this val set (tokens/val (max_tokens=64)" in line
    assert "the alias stays" in line
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


def with_params(work: Path, base: str, name: str, **sections: dict) -> str:
    """A params file `name` in `work`: the params file `base` with `sections` updated."""
    params = yaml.safe_load((work / base).read_text())
    for section, values in sections.items():
        params[section] = {**params[section], **values}
    (work / name).write_text(yaml.safe_dump(params))
    return name


def evaluate_elsewhere(project: dict, tmp_path: Path, params: str) -> subprocess.CompletedProcess:
    """The evaluate stage on the short training's model, its outputs in tmp_path."""
    options = paths(project["work"], "short")["evaluate"]
    options[options.index("--metrics") + 1] = tmp_path / "eval.json"
    options[options.index("--reports") + 1] = tmp_path / "reports"
    return stage(project["work"], "evaluate", *options, params=params)


def test_an_empty_registered_model_turns_the_registry_step_off(project, tmp_path):
    import mlflow

    params = with_params(project["work"], "short.yaml", "unregistered.yaml", mlflow={"registered_model": ""})
    stderr = evaluate_elsewhere(project, tmp_path, params).stderr
    assert "champion" not in stderr and "version" not in stderr
    assert len(mlflow.MlflowClient(project["uri"]).search_model_versions(f"name = '{NAME}'")) == 2


def test_an_unreachable_tracker_skips_the_registry_step_in_one_line_and_generate_says_why(project, tmp_path):
    work, url = project["work"], f"http://127.0.0.1:{free_port()}"  # nothing listens there
    params = with_params(work, "short.yaml", "unreachable.yaml", mlflow={"tracking_uri": url})
    result = evaluate_elsewhere(project, tmp_path, params)
    assert read_json(tmp_path / "eval.json")["val_bpb"] == pytest.approx(project["bpb"]["short"])
    [line] = [line for line in result.stderr.splitlines() if "registry step" in line]
    assert "the evaluation was not tracked" in line and "nor the evaluation's link to the model and the registry " \
        "step" in line and "are complete" in line
    assert "Traceback" not in result.stderr

    failed = run_stage(work, "generate", "--params", params, "--model", f"models:/{NAME}@champion", "--seed", "1")
    assert failed.returncode == 2 and failed.stdout == ""
    [error] = failed.stderr.strip().splitlines()
    assert f"models:/{NAME}@champion: cannot be downloaded from MLflow at {url}" in error


def test_a_registered_model_name_a_models_uri_cannot_carry_is_refused(project):
    work = project["work"]
    params = with_params(work, "short.yaml", "bad-name.yaml", mlflow={"registered_model": "team/gpt@v1"})
    result = run_stage(work, "evaluate", "--params", params)
    assert result.returncode == 2
    assert "mlflow.registered_model" in result.stderr and "team/gpt@v1" in result.stderr


def test_the_tuned_model_answers_chat_messages_as_the_chat_command_does(tmp_path, chat_tokenizer_path,
                                                                         empty_mlflow_db):
    """The sft stage logs its model with log_tuned_model: logged so here, from a tiny model with the chat tokens; its
    answer, in process and over HTTP from MLflow's scoring server, is the chat command's."""
    import shutil

    import mlflow

    from llm.model_registry import SFT, ModelFiles, log_model_now
    from tests.conftest import make_model_dir

    model_dir = make_model_dir(tmp_path / "sft", chat_tokenizer_path, block_size=64)
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        mlflow.set_experiment(mlflow.create_experiment("chat", artifact_location=(tmp_path / "mlruns").as_uri()))
        with mlflow.start_run() as run:
            model_id = log_model_now(ModelFiles.of_dir(model_dir), SFT, 4, SFT, run.info.run_id)
        loaded = mlflow.pyfunc.load_model(f"models:/{model_id}")
    finally:
        mlflow.set_tracking_uri(None)
    assert not list((tmp_path / "mlruns").rglob("*.pkl"))
    request = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
               "temperature": SAMPLING["temperature"], "max_tokens": SAMPLING["max_new_tokens"],
               "top_k": SAMPLING["top_k"], "top_p": SAMPLING["top_p"], "custom_inputs": {"seed": SAMPLING["seed"]}}
    answer = loaded.predict(request)["choices"][0]["message"]
    chat = run_stage(tmp_path, "chat", "--model", model_dir, "--system", "Be brief.", "--prompt", PROMPT,
                     "--temperature", SAMPLING["temperature"], "--max-new-tokens", SAMPLING["max_new_tokens"],
                     "--top-k", SAMPLING["top_k"], "--top-p", SAMPLING["top_p"], "--seed", SAMPLING["seed"])
    assert chat.returncode == 0, chat.stderr
    assert answer["role"] == "assistant" and answer["content"] == chat.stdout.removesuffix("\n")
    assert answer["content"], "the tiny model answers something: the test compares text"
    assert served_answer(loaded, request) == {"role": "assistant", "content": answer["content"]}


def served_answer(loaded, request: dict) -> dict:
    """The message MLflow's scoring server (what `mlflow models serve` runs) answers `request` with, served on a free
    loopback port from this process: the served champion above already costs the suite a process of its own."""
    import threading

    import uvicorn
    from mlflow.pyfunc import scoring_server

    server = uvicorn.Server(uvicorn.Config(scoring_server.init(loaded), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the scoring server did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.config.port}/invocations"
        post = urllib.request.Request(url, data=json.dumps(request).encode(),
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(post, timeout=60) as response:
            return json.loads(response.read())["choices"][0]["message"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
