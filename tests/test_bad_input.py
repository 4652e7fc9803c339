"""Bad input of every kind: invalid params, bad raw records, damaged artifacts, a full disk. Each is refused
with exit code 2 and one line naming the key or file (or, for a bad record, counted and skipped), and
nothing is half-written."""

import json
import os
import random
import shutil
import socket
import string
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llm.checkpoint import checkpoint_dirs, read_checkpoint, weight_shapes
from llm.clean import clean_corpus
from llm.config import EOT
from llm.configs.clean import CleanConfig
from llm.configs.mlflow import MlflowConfig
from llm.documents import iter_documents
from llm.errors import InputError
from llm.model import GPT
from llm.model_io import load_model_dir
from llm.tracking import MODEL_RUN_FILE, Job, run_of_model
from stages.__main__ import app
from tests.conftest import ROOT, make_model_dir, write_params
from tests.test_train import model_config, run, tokens_dir  # noqa: F401  (a fixture)

INVALID = [  # (section, key, value): each is refused, the error naming section.key
    ("data", "val_fraction", 0.0), ("data", "val_fraction", float("nan")), ("data", "seed", -1),
    ("data", "seed", 2**64), ("data", "source", " "), ("clean", "min_chars", -1), ("clean", "shard_mb", 0),
    ("tokenizer", "vocab_size", 256), ("tokenizer", "vocab_size", 2**20 + 1), ("tokenizer", "vocab_size", 2 * 10**9),
    ("tokenizer", "special_tokens", []),
    ("tokenizer", "special_tokens", ["<|pad|>"]), ("tokenizer", "max_train_chars", -1),
    ("clean", "near_dedup", 1.5), ("clean", "engine", "spark"), ("tokenize", "engine", "dask"), ("model", "n_layer", 0),
    ("model", "n_head", 5),
    ("model", "block_size", 0), ("model", "dropout", 1.5), ("model", "arch", "gpt5"),
    ("model", "norm", "batchnorm"), ("model", "mlp", "tanh"), ("model", "n_kv_head", 2),
    ("model", "n_layer", 2.5), ("train", "lr", float("inf")), ("train", "lr", float("nan")), ("train", "lr", -1.0),
    ("train", "lr", "fast"), ("train", "min_lr", 1.0), ("train", "warmup_steps", 10**6),
    ("train", "batch_size", 0), ("train", "max_steps", True), ("train", "optimizer", "sgd"),
    ("train", "dtype", "fp8"), ("train", "strategy", "zero"), ("train", "muon_momentum", 1.0),
    ("train", "grad_clip", -1.0), ("train", "grad_clip", float("inf")), ("train", "weight_decay", float("nan")),
    ("train", "seed", -5), ("train", "max_restarts", -1), ("train", "beta2", 1.0), ("train", "compile", "yes"),
    ("train", "periodic_rows", 1.5), ("train", "periodic_rows", -0.1), ("model", "token_shift", "yes"),
    ("evaluate", "temperature", float("nan")), ("evaluate", "temperature", -1.0), ("evaluate", "top_p", 0.0),
    ("evaluate", "top_k", -1), ("evaluate", "prompts", []), ("evaluate", "max_new_tokens", 0),
    ("evaluate", "seed", 2**63), ("mlflow", "tracking_uri", ""), ("mlflow", "experiment", " "),
    ("mlflow", "registered_model", "team/gpt@v1"),
]


# A stage validates the sections it reads (stages/params.py): each section is tried on a stage that reads it.
READER = {"data": "fetch", "clean": "clean", "tokenizer": "tokenizer", "tokenize": "tokenize", "model": "train",
          "train": "train", "evaluate": "evaluate", "mlflow": "train"}


@pytest.mark.parametrize(("section", "key", "value"), INVALID, ids=[f"{s}.{k}={v!r}" for s, k, v in INVALID])
@pytest.mark.parametrize("command", ["reader", "check-params"])
def test_an_invalid_param_is_refused_naming_its_key_before_any_work(tmp_path, monkeypatch, section, key, value,
                                                                   command):
    params = write_params(tmp_path / "params.yaml", **{section: {key: value}})
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [READER[section] if command == "reader" else command, "--params", str(params)])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and f"{section}.{key}" in result.stderr, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"], "nothing written"


def test_check_params_accepts_the_default_file_and_a_stage_ignores_a_section_it_does_not_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["check-params", "--params", str(ROOT / "params.yaml")])
    assert result.exit_code == 0 and "valid" in result.stdout, result.output
    params = write_params(tmp_path / "params.yaml", train={"lr": -1.0})
    result = CliRunner().invoke(app, ["tracking-uri", "--params", str(params)])
    assert result.exit_code == 0, result.output


def test_yaml_infinities_and_huge_numbers_are_not_finite_params(tmp_path, monkeypatch):
    params = write_params(tmp_path / "params.yaml")
    for literal, message in ((".inf", "finite"), ("1.0e+400", "finite"), (".NaN", "finite"), ("-.inf", "finite")):
        params.write_text(params.read_text().replace("\n  lr: 0.016", f"\n  lr: {literal}"))
        monkeypatch.chdir(tmp_path)
        result = CliRunner().invoke(app, ["train", "--params", str(params)])
        assert result.exit_code == 2 and "train.lr" in result.stderr and message in result.stderr, result.stderr
        params = write_params(tmp_path / "params.yaml")


# Raw documents of every kind of damage, each a (file name, bytes) and the reason it is dropped; "kept" if not.
RAW = [
    ("nul.txt", b"text with a NUL \x00 byte in it, long enough to count as a document", "binary"),
    ("png.txt", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "binary"),
    ("latin1.txt", "caf\xe9 au lait, written in Latin-1, long enough here".encode("latin-1"), "invalid_utf8"),
    ("cut.txt", "a text cut inside a character: caf\u00e9".encode()[:-1] + b" more words follow here", "invalid_utf8"),
    ("overlong.txt", b"an overlong encoding \xc0\xaf of a slash, which UTF-8 forbids outright", "invalid_utf8"),
    ("surrogate.txt", b"a CESU-style surrogate \xed\xa0\x80 in UTF-8 bytes, which is invalid", "invalid_utf8"),
    ("empty.txt", b"", "empty"),
    ("spaces.txt", b"   \n\t\n   ", "empty"),
    ("controls.txt", b"\x01\x02\x03\x1b\x08\x0b", "empty"),
    ("short.md", b"tiny", "too_short"),
    ("bom-only.txt", b"\xef\xbb\xbf", "empty"),
    ("image.png", b"\x89PNG", "unsupported_file"),
    ("notes.csv", b"a,b\n1,2\n", "unsupported_file"),
    ("no-suffix", b"a file without a suffix we read", "unsupported_file"),
    ("bad.parquet", b"PAR1 this is not really parquet PAR1", "unreadable_parquet"),
]
JSONL = [  # one line each of docs.jsonl, and what happens to it
    (json.dumps({"text": "a good JSONL record that is long enough to keep"}), "kept"),
    ('{"text": "the closing brace is missing"', "malformed_jsonl"),
    ("[" * 100_000 + "]" * 100_000, "malformed_jsonl"),  # deeper than Python's recursion limit
    ('{"text": "a lone surrogate \\ud800 escaped in JSON, long enough to keep"}', "lone_surrogate"),
    (json.dumps({"body": "no text field"}), "missing_text"),
    (json.dumps({"text": 42}), "missing_text"),
    (json.dumps({"text": None}), "missing_text"),
    (json.dumps(["a", "list"]), "missing_text"),
    (json.dumps("a bare string"), "missing_text"),
    ("NaN", "missing_text"),
    ("\xff\xfe not utf-8", "invalid_utf8"),
    (json.dumps({"text": "x" * 5}), "too_short"),
]


def test_every_kind_of_bad_raw_record_is_counted_and_skipped_the_good_ones_kept(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, data, _ in RAW:
        (raw / name).write_bytes(data)
    (raw / "good.txt").write_text("A perfectly good plain document, kept by the clean stage whole.")
    lines = [line.encode("latin-1") if line.startswith("\xff") else line.encode() for line, _ in JSONL]
    (raw / "docs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    stats = clean_corpus(raw, tmp_path / "clean", CleanConfig(min_chars=20), (EOT,))

    expected: dict[str, int] = {}
    for reason in [r for _, _, r in RAW] + [r for _, r in JSONL if r != "kept"]:
        expected[reason] = expected.get(reason, 0) + 1
    assert stats.dropped == expected
    assert sorted(doc_id for doc_id, _ in iter_documents(tmp_path / "clean")) == ["docs.jsonl:1", "good.txt"]
    assert stats.documents_in == stats.documents_out + sum(stats.dropped.values()) == len(RAW) + len(JSONL) + 1


def test_a_checkpoint_whose_state_json_is_damaged_falls_back_to_the_previous_one(tokens_dir, tmp_path):  # noqa: F811
    ckpt = tmp_path / "ckpt"
    run(tokens_dir, ckpt, stop_after=8)
    newest = checkpoint_dirs(ckpt)[0]
    state = json.loads((newest / "state.json").read_text())
    damage = [("step", "eight"), ("step", 4), ("history", None), ("row_losses", ["x"]), ("numpy_rng", [1, 2]),
              ("python_rng", "x"), ("throughput", {}), ("tokens_seen", 1.5), ("history", [{"step": 1}]),
              ("model_config", None)]
    for field, value in damage:
        (newest / "state.json").write_text(json.dumps({**state, field: value}))
        with pytest.raises(ValueError, match="state.json"):
            read_checkpoint(newest)
    assert run(tokens_dir, ckpt).resumed_from == 4, "resumed from the previous checkpoint, and finished"


def test_a_garbage_state_json_is_passed_over_with_a_log_line(tokens_dir, tmp_path, caplog):  # noqa: F811
    """As a damaged optimizer.pt is: the folder is passed over, and the log says so."""
    run(tokens_dir, tmp_path / "pristine", stop_after=8)
    for i, garbage in enumerate([b"", b"{", b"[]", b"null", b"\xff\xfe\x00garbage", b'{"step": 8}']):
        ckpt = shutil.copytree(tmp_path / "pristine", tmp_path / f"ckpt{i}")
        newest = checkpoint_dirs(ckpt)[0]
        (newest / "state.json").write_bytes(garbage)
        caplog.clear()
        assert run(tokens_dir, ckpt, stop_after=1).resumed_from == 4, garbage
        assert f"checkpoint {newest}: state.json does not read" in caplog.text and "passed over" in caplog.text


def test_a_checkpoint_holding_another_models_weights_falls_back_to_the_previous_one(tokens_dir, tmp_path,  # noqa: F811
                                                                                   caplog):
    """Restoring them failed with a size-mismatch traceback on every rerun; now they are damage, found on read."""
    ckpt = tmp_path / "ckpt"
    run(tokens_dir, ckpt, stop_after=8)
    newest = checkpoint_dirs(ckpt)[0]
    ours = load_file(newest / "model.safetensors")
    wider = {name: torch.zeros([size + 2 for size in tensor.shape]) for name, tensor in ours.items()}
    first = min(ours)
    for weights, problem in ((wider, f"{first} is {[size + 2 for size in ours[first].shape]}, this model's is "
                                     f"{list(ours[first].shape)}"),
                             ({**ours, "extra.weight": torch.zeros(2)}, "extra.weight is not in this model"),
                             ({k: v for k, v in ours.items() if k != first}, f"{first} is missing")):
        save_file(weights, newest / "model.safetensors")
        with pytest.raises(ValueError, match="another model's weights") as error:
            read_checkpoint(newest, weight_shapes(GPT(model_config())))
        assert problem in str(error.value), error.value
    save_file(wider, newest / "model.safetensors")
    assert run(tokens_dir, ckpt).resumed_from == 4, "resumed from the previous checkpoint, and finished"
    assert f"checkpoint {newest} is damaged (model.safetensors holds another model's weights" in caplog.text
    for path in checkpoint_dirs(ckpt):
        save_file(wider, path / "model.safetensors")
    assert run(tokens_dir, ckpt).resumed_from == 0, "none of this model's: a fresh start"


def test_a_model_config_asking_for_absurd_shapes_is_refused_before_allocating(tmp_path, sample_tokenizer_path):
    model_dir = make_model_dir(tmp_path / "model", sample_tokenizer_path)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "n_embd": 2**20, "n_head": 2**10, "n_layer": 96}))
    # Petabytes of weights: building the model would fail with an allocation error, not this one.
    with pytest.raises(InputError, match="do not fit config.json"):
        load_model_dir(model_dir)


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.argv = ["stages", *sys.argv[1:]]
from stages.__main__ import app
app()
"""


def test_a_full_disk_is_one_line_naming_the_file_and_exit_2_with_nothing_half_written(tmp_path):
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    words = random.Random(0)
    for i in range(4):  # random letters: Parquet cannot compress them below the limit
        (raw / f"{i}.txt").write_text(" ".join("".join(words.choices(string.ascii_lowercase, k=7))
                                               for _ in range(50_000)))
    write_params(tmp_path / "params.yaml")
    result = subprocess.run([sys.executable, "-c", FULL_DISK.format(limit=200_000), "clean"], cwd=tmp_path,
                            capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "no space" in result.stderr and "data/clean" in result.stderr
    assert not (tmp_path / "data" / "clean").exists() and not (tmp_path / "metrics").exists()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"], "no temp folder left behind"


NESTED_WRITE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
from llm.errors import InputError
from llm.fileio import atomic_dir, write_bytes_atomic
try:
    with atomic_dir("reports/guide") as staging:  # as the guide writes: files into a folder that replaces its output
        write_bytes_atomic(staging / "figures" / "loss.png", bytes(200_000))
except InputError as err:
    print(err)
"""


def test_a_full_disk_under_a_folder_written_whole_names_the_output_not_its_temp_folder(tmp_path):
    """The guide's error named `.guide.pid123.x.tmp/index.html`, a path gone by the time the user reads it."""
    result = subprocess.run([sys.executable, "-c", NESTED_WRITE], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.stdout.startswith("reports/guide/figures/loss.png: no space to write it"), result
    assert ".tmp" not in result.stdout and result.stdout.count("\n") == 1, result.stdout
    assert not (tmp_path / "reports" / "guide").exists() and list((tmp_path / "reports").iterdir()) == []


def test_what_a_killed_writer_left_is_removed_by_the_next_write_and_a_live_ones_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    data = tmp_path / "data"
    data.mkdir()
    leftovers = [f".clean.pid{dead.pid}.x1.tmp", f".clean.old-{dead.pid}"]
    live = f".clean.pid{os.getpid()}.x2.tmp"  # this process, as if writing now
    for name in [*leftovers, live]:
        (data / name).mkdir()
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("a document long enough to be kept by the clean stage")
    clean_corpus(raw, data / "clean", CleanConfig(min_chars=10), (EOT,))
    assert sorted(p.name for p in data.iterdir()) == sorted([live, "clean"])


def test_a_model_folder_naming_a_foreign_tracking_server_is_never_contacted(tmp_path, monkeypatch, empty_mlflow_db):
    """Evaluation looks for the training's run at params' mlflow.tracking_uri only."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    model_dir = tmp_path / "final"
    model_dir.mkdir()
    (model_dir / MODEL_RUN_FILE).write_text(json.dumps(
        {"run_id": "0123456789abcdef", "tracking_uri": f"http://127.0.0.1:{listener.getsockname()[1]}"}))
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    ours = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    evaluation = Job("evaluation", "metrics/eval.json, reports")
    assert run_of_model(model_dir, ours, evaluation).run_id is None, "that run is not in our database: not logged"
    (model_dir / MODEL_RUN_FILE).write_text(json.dumps({"run_id": None, "tracking_uri": "http://127.0.0.1:9"}))
    assert run_of_model(model_dir, ours, evaluation).run_id is None, "an untracked training: nothing to log to"
    with pytest.raises(TimeoutError):
        listener.accept()  # nobody connected to the server the folder names
    listener.close()
