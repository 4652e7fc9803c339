"""What a training run records of its inputs and its changes (llm/lineage.py): DVC's hashes computed as DVC computes
them, a digest that follows the corpus, run names from the params that differ from the committed ones. The tracked
run itself is checked in tests/test_train_stage.py (datasets, system metrics, run card) and tests/test_dvc.py (the name
under `dvc exp run`, the digest dvc.lock records)."""

import os
import subprocess

import pytest
import yaml

from llm.clean import clean_corpus
from llm.config import EOT
from llm.configs.clean import CleanConfig
from llm.configs.data import DataConfig
from llm.configs.tokenize import TokenizeConfig
from llm.documents import iter_documents
from llm.lineage import (
    ABSENT,
    LockedStage,
    RunCard,
    change_tags,
    changed_params,
    committed_text,
    dir_md5,
    dvc_hash,
    folder_md5s,
    read_lock,
    run_name,
    token_datasets,
    upstream_stages,
)
from llm.project import dirty_files
from llm.split import is_val
from llm.tokenize import tokenize_corpus
from stages.params import committed_params
from tests.conftest import SAMPLE_TEXTS

DATA = DataConfig(source="unused", val_fraction=0.3, seed=7)


def test_a_folder_hash_is_dvcs():
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    entries = {"train_000000.bin": "0" * 32, "val_000000.bin": "f" * 32, "meta.json": "a" * 32, "sub/x": "b" * 32}
    tree = Tree()
    for relpath, md5 in entries.items():
        tree.add(tuple(relpath.split("/")), Meta(), HashInfo("md5", md5))
    tree.digest()
    assert dir_md5(entries.items()) == tree.hash_info.value


def tokens_of(tmp_path, name: str, documents: list[str], tokenizer) -> tuple:
    raw = tmp_path / name / "raw"
    raw.mkdir(parents=True)
    for i, text in enumerate(documents):
        (raw / f"doc{i:02d}.txt").write_text(text)
    clean_corpus(raw, tmp_path / name / "clean", CleanConfig(min_chars=10), (EOT,))
    out = tmp_path / name / "tokens"
    meta = tokenize_corpus(tmp_path / name / "clean", tokenizer, out, DATA, TokenizeConfig(num_workers=1))
    return out, meta, dict(iter_documents(tmp_path / name / "clean"))


def test_changing_one_document_changes_the_digest_of_its_split_only(tmp_path, sample_tokenizer_path):
    documents = [f"Document {i}.\n" + SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] * 2 for i in range(12)]
    edited = [*documents[:-1], documents[-1] + " One more line."]
    before_dir, before_meta, ids = tokens_of(tmp_path, "before", documents, sample_tokenizer_path)
    after_dir, after_meta, _ = tokens_of(tmp_path, "after", edited, sample_tokenizer_path)
    before = {d.name: d for d in token_datasets(before_dir, before_meta, sample_tokenizer_path)}
    after = {d.name: d for d in token_datasets(after_dir, after_meta, sample_tokenizer_path)}
    assert {d.context for d in before.values()} == {"training", "validation", "tokenizer"}
    assert all(len(d.digest) <= 36 for d in before.values()), "MLflow's longest digest"

    assert before["tokens"].digest != after["tokens"].digest
    assert before["tokens"].digest == dvc_hash(before_dir) == dir_md5(folder_md5s(before_dir).items())
    assert before["tokenizer"].digest == after["tokenizer"].digest
    edited_id = next(doc_id for doc_id in ids if doc_id.endswith(f"doc{len(documents) - 1:02d}.txt"))
    in_val = is_val(edited_id, DATA.seed, DATA.val_fraction)
    assert (before["tokens/val"].digest != after["tokens/val"].digest) == in_val
    assert before["tokens"].profile["train_tokens"] == before_meta.splits["train"].tokens
    assert before["tokens/val"].profile["tokens"] == before_meta.splits["val"].tokens
    again = token_datasets(before_dir, before_meta, sample_tokenizer_path)
    assert again == list(before.values()), "the same shards, the same digests"


def test_run_names_say_what_changed():
    assert run_name({}) == "baseline"
    assert run_name(None) is None, "no committed params: MLflow names it"
    assert run_name({"train.lr": (0.016, 0.004), "tokenizer.vocab_size": (4096, 8192)}) == "lr=0.004 vocab_size=8192"
    assert run_name({"train.lr": (0.016, 0.004), "sft.lr": (3e-4, 1e-4)}) == "train.lr=0.004 sft.lr=0.0001"
    assert run_name({"train.lr": (0.016, 0.004)}, experiment="lr-low") == "lr-low"
    many = {f"model.key{i}": (0, 10 ** 6 + i) for i in range(12)}
    name = run_name(many)
    assert len(name) <= 60 and name.startswith("key0=1000000 key1=1000001") and name.endswith(" more")
    assert int(name.split("+")[1].split()[0]) == 12 - name.count("=")
    assert run_name({"train.dtype": ("auto", "float32")}) == "dtype=float32"


def test_changes_against_the_committed_params_file(tmp_path, monkeypatch):
    committed = {"train": {"lr": 0.016, "max_steps": 360}, "model": {"arch": "modern"}}
    current = {"train": {"lr": 0.004, "max_steps": 360}, "model": {"arch": "modern", "n_layer": 4}}
    changes = changed_params(current, committed)
    assert changes == {"model.n_layer": (ABSENT, 4), "train.lr": (0.016, 0.004)}
    assert change_tags(changes) == {"params_changed": "2", "params_changed.model.n_layer": "(absent) -> 4",
                                    "params_changed.train.lr": "0.016 -> 0.004"}
    assert change_tags({"data.a:b": (1, 2)}) == {"params_changed": "1", "params_changed.data.a_b": "1 -> 2"}

    params = tmp_path / "params.yaml"
    assert committed_params(committed_text(params)) is None and dirty_files(tmp_path) is None, "outside git"
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    params.write_text(yaml.safe_dump(committed))
    for command in (["init", "-q"], ["add", "params.yaml"], ["commit", "-qm", "params"]):
        subprocess.run(["git", *command], cwd=tmp_path, check=True, env={**os.environ, **env})
    assert dirty_files(tmp_path) == []
    params.write_text(yaml.safe_dump(current))
    assert changed_params(current, committed_params(committed_text(params))) == changes
    assert dirty_files(tmp_path) == ["params.yaml"] and dirty_files(tmp_path, ("params.yaml",)) == []
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "HEAD")  # `dvc exp run` compares with its baseline commit
    assert committed_params(committed_text(params)) == committed


def test_the_upstream_stages_of_the_training_inputs_from_dvc_lock(tmp_path):
    lock = {"schema": "2.0", "stages": {
        "fetch": {"deps": [], "outs": [{"path": "data/raw", "md5": "r.dir"}]},
        "clean": {"deps": [{"path": "data/raw", "md5": "r.dir"}, {"path": "llm/clean.py", "md5": "c"}],
                  "outs": [{"path": "data/clean", "md5": "c.dir"}, {"path": "metrics/clean.json", "md5": "m"}]},
        "tokenize": {"deps": [{"path": "data/clean", "md5": "c.dir"}],
                     "outs": [{"path": "data/tokens", "md5": "t.dir"}]},
        "evaluate": {"deps": [{"path": "models/final", "md5": "f.dir"}], "outs": [{"path": "reports", "md5": "x"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    stages = read_lock(tmp_path / "dvc.lock")
    assert stages["tokenize"] == LockedStage({"data/clean": "c.dir"}, {"data/tokens": "t.dir"})
    assert set(upstream_stages(stages, ["data/tokens"])) == {"tokenize", "clean", "fetch"}
    assert read_lock(tmp_path / "missing.lock") == {}
    (tmp_path / "bad.lock").write_text("stages: [not, a, mapping")
    assert read_lock(tmp_path / "bad.lock") == {}


def test_a_run_card_says_what_ran_where():
    card = RunCard("Some CPU", False, 2, "none", "cpu", "float32", 1, "2.13.0", "3.11.9", {"clean": 1.25})
    tags = card.tags()
    assert tags["card.cpu_model"] == "Some CPU" and tags["card.cpu_bf16"] == "false"
    assert tags["card.wall_seconds.clean"] == "1.2" and tags["card.torch"] == "2.13.0"
    text = card.markdown(train_seconds=61.0)
    assert "| CPU bf16 in hardware | no |" in text and "| train | 61.0 |" in text and "| clean | 1.2 |" in text


@pytest.mark.parametrize("value", ["data: [", "- a list", ""])
def test_a_committed_params_file_that_does_not_read_names_nothing(value):
    assert committed_params(value) is None
