"""Chapter 10 (the experiments) and the exercise results, on runs made directly in a temporary MLflow store: a
sweep of train.lr over three values, two runs of one config, one of a bigger model, one that also changes the
model, a failed and a running run, and two sft runs. No training."""

import shutil
import time
import types

import pytest
from mlflow.entities import Metric, Param

from llm.configs.mlflow import MlflowConfig
from llm.configs.train import TrainConfig
from llm.guide.document import Chapter, Exercise, Figure, Table, Text
from llm.guide.experiments_chapter import (
    ExperimentRun,
    charted,
    differing_params,
    exercise_results,
    experiments_chapter,
    read_runs,
    repeat_takeaway,
    run_params,
    shown_runs,
    sweeps,
    takeaway,
    with_experiments,
    with_overrides,
)

# What a training records (the default model preset resolved); the runs below change a few keys.
BASE = {"train.lr": "0.01", "train.seed": "1337", "model.arch": "gpt2", "model.mlp": "gelu", "model.n_layer": "2",
        "evaluate.prompts": "('ROMEO.', 'JULIET.')", "data.source": "shakespeare", "git_commit": "aaaa"}
# (name, params changed (None: left out), status, metrics): oldest first.
RUNS = [
    ("lr-0.004", {"train.lr": "0.004"}, "FINISHED", {"eval/val_bpb": 2.30}),
    ("this", {}, "FINISHED", {"eval/val_bpb": 2.10}),
    ("lr-0.03", {"train.lr": "0.03"}, "FINISHED", {"eval/val_bpb": 2.20}),
    # the same config as "this": arch and mlp not recorded (an older run: their defaults), max_steps recorded at
    # its default, the prompts as a list, another commit
    ("this-again", {"model.arch": None, "model.mlp": "None", "train.max_steps": str(TrainConfig().max_steps),
                    "evaluate.prompts": "['ROMEO.', 'JULIET.']", "git_commit": "bbbb"}, "FINISHED",
     {"eval/val_bpb": 2.102}),
    ("deeper", {"model.n_layer": "4"}, "FINISHED", {"eval/val_bpb": 2.05}),
    ("lr-0.004-deeper", {"train.lr": "0.004", "model.n_layer": "4"}, "FINISHED", {"eval/val_bpb": 2.40}),
    ("crashed", {"train.lr": "0.05"}, "FAILED", {"val_bpb_estimate": 3.0}),
    ("running", {"train.lr": "0.02"}, "RUNNING", {}),
]
SFT_RUNS = [("sft-this", {"sft.lr": "0.0003"}, {"who_said_sft": 0.5, "speech_count_sft": 0.3, "sft_val_loss": 1.0}),
            ("sft-faster", {"sft.lr": "0.001"}, {"who_said_sft": 0.7, "speech_count_sft": 0.5, "sft_val_loss": 0.9})]


@pytest.fixture(scope="module")
def store(tmp_path_factory, empty_mlflow_db):
    """(MlflowConfig, run ids by name) of an experiment holding RUNS and SFT_RUNS."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("runs")
    shutil.copy(empty_mlflow_db, folder / "mlflow.db")
    settings = MlflowConfig(tracking_uri=f"sqlite:///{folder}/mlflow.db", experiment="guide-experiments")
    client = MlflowClient(settings.tracking_uri)
    experiment = client.create_experiment(settings.experiment, artifact_location=(folder / "mlruns").as_uri())
    start = int(time.time() * 1000) - 10_000
    ids = {}
    made = [(name, {**BASE, **changed}, status, metrics, {}) for name, changed, status, metrics in RUNS]
    made += [(name, {**BASE, "model.mlp": "None", **changed}, "FINISHED", metrics, {"stage": "sft"})
             for name, changed, metrics in SFT_RUNS]
    for i, (name, params, status, metrics, tags) in enumerate(made):
        run = client.create_run(experiment, start_time=start + 1000 * i, tags=tags, run_name=name)
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, start, 0) for k, v in metrics.items()],
                         params=[Param(k, v) for k, v in params.items() if v is not None])
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
        ids[name] = run.info.run_id
    return settings, ids


@pytest.fixture(scope="module")
def runs(store):
    return read_runs(store[0])


def by_name(runs: list[ExperimentRun]) -> dict[str, ExperimentRun]:
    return {run.name: run for run in runs}


def test_params_are_read_as_the_configs_read_them(runs):
    params = by_name(runs)
    this, again = params["this"].params, params["this-again"].params
    assert this == again, "defaults for what a run did not record, presets resolved, tuples equal to lists"
    assert this["train.max_steps"] == TrainConfig().max_steps and this["model.mlp"] == "gelu"
    assert this["evaluate.prompts"] == ("ROMEO.", "JULIET.") and this["train.lr"] == 0.01
    assert "git_commit" not in this, "a record of the run, not a param"
    assert run_params({"model.arch": "llama"})["model.mlp"] == "swiglu"
    lr = with_overrides(this, (("train.lr", "0.004"),))
    assert lr == {**this, "train.lr": 0.004}, "the override read as dvc exp run -S reads it"
    assert with_overrides(this, (("train.lr", "1e-3"),))["train.lr"] == 0.001, "Hydra's grammar, as DVC's"
    llama = with_overrides(this, (("model.arch", "llama"),))
    assert llama["model.mlp"] == "swiglu" and llama["model.positions"] == "rope", "parts follow the new preset"
    assert with_overrides(run_params({"model.mlp": "relu2"}), (("model.arch", "llama"),))["model.mlp"] == "relu2", \
        "a part set explicitly stays"


def test_only_the_params_that_differ_are_shown_a_missing_one_at_its_default(runs, store):
    shown = shown_runs(runs, store[1]["this"])
    assert [r.name for r in shown] == [name for name, *_ in RUNS][::-1], "newest first, sft runs apart"
    assert differing_params(shown) == ["model.n_layer", "train.lr"]


def test_unfinished_runs_are_marked_and_kept_out_of_the_chart(runs, store, tmp_path):
    shown = shown_runs(runs, store[1]["this"])
    assert {r.name for r in shown if r.finished} == {r.name for r in charted(shown)}
    assert {r.name for r in shown} - {r.name for r in charted(shown)} == {"crashed", "running"}
    chapter = experiments_chapter(guide_run(store[0]), tmp_path, store[1]["this"], runs)
    [table] = [b for b in chapter.blocks if isinstance(b, Table)]
    assert table.header == ("run", "status", "val bpb", "model.n_layer", "train.lr")
    rows = {row[0]: row for row in table.rows}
    assert rows["crashed"][1] == "failed (unfinished)" and rows["running"][1] == "running (unfinished)"
    assert rows["this (this run)"][1:] == ("finished", "2.1000", "2", "0.01")
    assert rows["this-again"][1:] == ("finished", "2.1020", "2", "0.01")
    figures = [b.file for b in chapter.blocks if isinstance(b, Figure)]
    assert figures == ["figures/runs.png", "figures/sweeps.png"]
    assert (tmp_path / "runs.png").is_file() and (tmp_path / "sweeps.png").is_file()
    words = " ".join(b.text for b in chapter.blocks if isinstance(b, Text))
    assert "2 of them are unfinished" in words and "1 run of the sft stage" not in words
    assert "2 runs of the sft stage" in words


def guide_run(settings: MlflowConfig, sft_run_id: str | None = None):
    """What the chapter reads of a Run: the mlflow and train settings, the sft stage's run id."""
    sft = types.SimpleNamespace(metrics={"mlflow_run_id": sft_run_id}) if sft_run_id else None
    return types.SimpleNamespace(settings=types.SimpleNamespace(mlflow=settings, train=TrainConfig()), sft=sft)


def test_the_takeaway_names_the_best_value_of_a_sweep_and_whether_repeats_agree(runs, store):
    shown = shown_runs(runs, store[1]["this"])
    found = {sweep.param: sweep for sweep in sweeps(shown)}
    assert set(found) == {"train.lr", "model.n_layer"}
    assert sorted(r.name for r in found["train.lr"].runs) == ["lr-0.004", "lr-0.03", "this", "this-again"]
    assert found["train.lr"].best() == (0.01, pytest.approx(2.101))
    lines = takeaway(shown)
    [lr] = [line for line in lines if line.startswith("`train.lr`")]
    assert "swept over 0.004, 0.01 and 0.03 in 4 runs" in lr and "2.1010, came at 0.01" in lr
    assert "the highest, 2.3000, at 0.004" in lr
    assert "lead over the next value, 0.0990, is more than the spread of repeated runs (0.0020)" in lr
    [repeat] = [line for line in lines if "repeat one config" in line]
    assert "`this-again` and `this`" in repeat and "spread over 0.0020" in repeat
    assert "small next to the 0.3500 between the best and the worst config: runs of one config agree" in repeat


def test_a_repeat_with_the_same_seed_and_the_same_result_says_it_measures_no_noise(runs):
    run = by_name(runs)["this"]
    twin = ExperimentRun("twin", "x", "FINISHED", "train", run.params, run.metrics)
    assert "to every digit: training is deterministic here" in repeat_takeaway([run, twin], 0.2)
    noisy = ExperimentRun("noisy", "y", "FINISHED", "train", {**run.params, "train.seed": 7},
                          {"eval/val_bpb": 2.3})
    assert "as much as the 0.2000 between the best and the worst config" in repeat_takeaway([run, noisy], 0.2)


def test_an_exercise_shows_the_readers_run_of_it_and_only_that_run(runs, store):
    ids = store[1]

    def exercise(*overrides):
        return Exercise("dvc exp run " + " ".join(f"-S {k}={v}" for k, v in overrides), "look", "expect", overrides)

    chapters = [Chapter("a", "A", [Text("x"), exercise(("train.lr", "0.004"))]),
                Chapter("b", "B", [exercise(("train.lr", "0.005")), exercise(("train.lr", "0.01"))]),
                Chapter("c", "C", [exercise(("sft.lr", "0.001")), exercise(("model.n_layer", "4"))])]
    filled = exercise_results(chapters, runs, ids["this"], ids["sft-this"])
    assert [c.slug for c in filled] == ["a", "b", "c"] and filled[0].blocks[0] == Text("x")
    results = [b.result for c in filled for b in c.blocks if isinstance(b, Exercise)]
    assert results[0] == "val bpb 2.3000 (this run's: 2.1000), run `lr-0.004`", \
        "lr-0.004-deeper, newer, also sets n_layer: not a run of this exercise"
    assert results[1] is None, "no run of it"
    assert results[2] is None, "this run's own value: nothing to compare"
    assert results[3] == "mean held-out accuracy 0.600 (this run's: 0.400), run `sft-faster`"
    assert results[4] == "val bpb 2.0500 (this run's: 2.1000), run `deeper`"
    assert all(b.result is None for c in chapters for b in c.blocks if isinstance(b, Exercise)), "frozen, replaced"


def test_the_guide_reads_the_runs_once_for_the_chapter_and_every_exercise(store, tmp_path, monkeypatch):
    import llm.guide.experiments_chapter as module

    reads = []
    monkeypatch.setattr(module, "read_runs", lambda settings: reads.append(settings) or read_runs(settings))
    settings, ids = store
    overrides = (("train.lr", "0.03"),)
    made = with_experiments([Chapter("a", "A", [Exercise("dvc exp run -S train.lr=0.03", "l", "e", overrides)])],
                            guide_run(settings, ids["sft-this"]), tmp_path, ids["this"])
    assert len(reads) == 1
    assert [c.slug for c in made] == ["a", "experiments"]
    assert made[0].blocks[0].result == "val bpb 2.2000 (this run's: 2.1000), run `lr-0.03`"
    own = [b for b in made[1].blocks if isinstance(b, Exercise)]
    assert [b.overrides for b in own] == [(("train.lr", "0.0005"),), (("train.seed", "1338"),)], \
        "half the default lr (adamw), the next seed"
    assert all(b.result is None for b in own), "not run yet"
