"""The commands as users and DVC run them: `python -m stages ...`, exit codes, one-line errors. The entry point
is run as a process once (the help); the rest run in the test process (tests/conftest.py: run_stage)."""

import pytest

from tests.conftest import read_json, run_stage_process, write_params
from tests.conftest import run_stage as stage

COMMANDS = ["fetch", "clean", "tokenizer", "tokenize"]


ALL_COMMANDS = [*COMMANDS, "train", "evaluate", "generate", "export-hf", "tracking-uri", "check-params"]


def test_help_lists_every_command_and_each_command_has_help(tmp_path):
    result = run_stage_process(tmp_path, "--help")  # a new interpreter: `python -m stages` registers them all
    assert result.returncode == 0
    for command in ALL_COMMANDS:
        assert command in result.stdout
        help_text = stage(tmp_path, command, "--help")
        assert help_text.returncode == 0, help_text.stderr
        assert "--params" in help_text.stdout, f"{command}: every command takes --params"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "--help writes nothing"


@pytest.mark.parametrize(("command", "overrides", "key"), [
    ("clean", {"tokenizer": {"vocab_size": 256}}, "tokenizer.vocab_size"),
    ("tokenizer", {"data": {"val_fraction": 0.0}}, "data.val_fraction"),  # clean reads no data section
    ("tokenizer", {"data": {"val_fraction": 1.5}}, "data.val_fraction"),
    ("clean", {"clean": {"min_char": 10}}, "clean.min_char"),
    ("clean", {"clean": {"min_chars": "ten"}}, "clean.min_chars"),
    ("clean", {"tokenizer": {"special_tokens": ["<|pad|>"]}}, "tokenizer.special_tokens"),
    ("clean", {"trian": {"lr": 1.0}}, "trian"),
])
def test_invalid_params_exit_2_naming_the_key_before_any_work(tmp_path, command, overrides, key):
    assert_rejected(tmp_path, command, overrides, key)


# Each command validates the sections it reads, before any work: one of them, broken, for each.
READS = {"fetch": ("data", "val_fraction", 0.0), "clean": ("tokenizer", "vocab_size", 100),
         "tokenizer": ("tokenizer", "vocab_size", 100), "tokenize": ("tokenize", "shard_tokens", 0)}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_validates_params_first(tmp_path, command):
    section, key, value = READS[command]
    assert_rejected(tmp_path, command, {section: {key: value}}, f"{section}.{key}")


def assert_rejected(tmp_path, command, overrides, key):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("some text")
    overrides = {**overrides, "data": {"source": str(src), **overrides.get("data", {})}}
    params = write_params(tmp_path / "params.yaml", **overrides)
    result = stage(tmp_path, command, "--params", str(params))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and key in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "params.yaml"], "nothing written"


def test_missing_params_file_and_missing_key(tmp_path):
    result = stage(tmp_path, "clean", "--params", "nope.yaml")
    assert result.returncode == 2 and "nope.yaml" in result.stderr
    params = write_params(tmp_path / "params.yaml")
    params.write_text(params.read_text().replace("  min_chars:", "  # min_chars:"))
    result = stage(tmp_path, "clean")
    assert result.returncode == 2 and "clean.min_chars: missing key" in result.stderr


def test_stage_run_before_its_inputs_exist_exits_2(tmp_path):
    write_params(tmp_path / "params.yaml")
    for command, missing in [("clean", "data/raw"), ("tokenizer", "data/clean"), ("tokenize", "tokenizer.json")]:
        result = stage(tmp_path, command)
        assert result.returncode == 2, result.stderr
        assert missing in result.stderr and "Traceback" not in result.stderr


def test_corrupt_tokenizer_exits_2(tmp_path, sample_tokenizer_path):
    write_params(tmp_path / "params.yaml")
    (tmp_path / "bad.json").write_text("{not json")
    result = stage(tmp_path, "tokenize", "--tokenizer", "bad.json")
    assert result.returncode == 2 and "bad.json" in result.stderr


def test_data_stages_end_to_end_on_a_local_corpus(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(30):
        (src / f"{i}.txt").write_text(f"Play number {i}. " + "Now is the winter of our discontent. " * (i + 5))
    write_params(tmp_path / "params.yaml", data={"source": str(src), "val_fraction": 0.2},
                 tokenizer={"vocab_size": 300, "min_frequency": 1}, clean={"min_chars": 10})
    for command in COMMANDS:
        result = stage(tmp_path, command)
        assert result.returncode == 0, result.stderr
    clean = read_json(tmp_path / "metrics/clean.json")
    assert clean["documents_in"] == clean["documents_out"] == 30
    tok = read_json(tmp_path / "metrics/tokenizer.json")
    assert tok["vocab_size"] == 300 and tok["val_bytes_per_token"] > 1.5
    meta = read_json(tmp_path / "data/tokens/meta.json")
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 30
    assert (tmp_path / "models/tokenizer/tokenizer.json").is_file()


def test_the_launcher_relaunches_train_with_every_option_the_user_gave(tmp_path, monkeypatch):
    """With train.nproc_per_node > 1 the stage starts workers running itself: each must get the params file and
    every path the user gave (not the defaults), read from the command's own options."""
    import llm.launch
    import llm.training_run

    launched = []
    monkeypatch.setattr(llm.training_run, "read_inputs", lambda *args: None)
    monkeypatch.setattr(llm.launch, "launch_workers", lambda n, command, restarts: launched.append(command) or (0, ""))
    params = write_params(tmp_path / "mine.yaml", train={"nproc_per_node": 2})
    result = stage(tmp_path, "train", "--params", params, "--tokens", "t", "--out", "o", "--metrics", "m.json")
    assert result.returncode == 0, result.stderr
    [command] = launched
    assert command[1:4] == ["-m", "stages", "train"]
    given = dict(zip(command[4::2], command[5::2], strict=True))
    assert given["--params"] == str(params) and given["--tokens"] == "t" and given["--out"] == "o"
    assert given["--metrics"] == "m.json" and given["--checkpoints"] == "models/checkpoints", "defaults made explicit"
