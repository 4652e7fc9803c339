"""Every file a stage reads, damaged every way, gives exit 2 and one line naming the file: never a traceback.

One small project is built (data stages, train, evaluate); each case damages one of its files in place (empty,
cut short, random bytes, valid JSON / CSV / safetensors / Parquet of the wrong shape), runs a stage that reads
it with its outputs sent elsewhere, and puts the file back."""

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import TINY_MODEL, TINY_TRAIN, run_stage

pytestmark = pytest.mark.slow

TINY_EVALUATE = {"prompts": ["But soft"], "max_new_tokens": 4, "batch_size": 4}


@pytest.fixture(scope="module")
def project(tmp_path_factory, data_project) -> Path:
    work = tmp_path_factory.mktemp("hostile-files")
    data_project(work, mlflow={"tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "hostile"},
                 model=TINY_MODEL, train=TINY_TRAIN, evaluate=TINY_EVALUATE)
    for command in ("train", "evaluate"):
        result = run_stage(work, command, env={"HOME": str(work)})
        assert result.returncode == 0, result.stderr[-3000:]
    return work


def wrong_json_types(data: bytes, rng: random.Random) -> bytes:
    """The same JSON object with one field's value of another type (a number for a string, a list for a number)."""
    value = json.loads(data)
    if not isinstance(value, dict) or not value:
        return b"[]"
    key = rng.choice(sorted(value))
    value[key] = rng.choice([["a list"], "a string", None, {"an": "object"}, -1, 1.5]) if not isinstance(
        value[key], str) else rng.choice([42, None, ["a"]])
    return json.dumps(value).encode()


def nested_wrong(data: bytes, rng: random.Random) -> bytes:
    """Every value of the object replaced by one of another type: the readers must check each field they use."""
    value = json.loads(data)
    if not isinstance(value, dict):
        return b"{}"
    return json.dumps({key: "x" if not isinstance(v, str) else [] for key, v in value.items()}).encode()


def csv_damage(data: bytes, rng: random.Random) -> bytes:
    lines = data.decode().splitlines()
    return rng.choice([lines[0] + "\n", "a,b,c\n1,2,3\n", lines[0] + "\n" + lines[1].replace(",", ",x", 1) + "\n",
                       "\n".join(lines[:2]) + ",extra\n", lines[0] + "\n" + ",".join(["nan"] * 8) + "\n",
                       "\n".join(lines[:-1] + [lines[-1][:len(lines[-1]) // 2]]) + "\n"]).encode()


def other_safetensors(data: bytes, rng: random.Random) -> bytes:
    path = Path("/tmp") / f"hostile-{rng.random()}.safetensors"
    save_file({"unrelated": torch.zeros(3, 2)}, str(path))
    content = path.read_bytes()
    path.unlink()
    return content


def other_parquet(data: bytes, rng: random.Random) -> bytes:
    sink = pa.BufferOutputStream()
    table = rng.choice([pa.table({"wrong": ["a column of another name"]}),
                        pa.table({"text": [1, 2, 3], "id": ["a", "b", "c"]}),
                        pa.table({"text": pa.array([], pa.string())})])
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def bad_shard_header(data: bytes, rng: random.Random) -> bytes:
    header = bytearray(data[:1024])
    field = rng.choice([0, 4, 8])
    header[field:field + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x01\x02\x03\x04"])
    return bytes(header) + data[1024:]


COMMON: list[Callable[[bytes, random.Random], bytes]] = [
    lambda data, rng: b"",
    lambda data, rng: data[:len(data) // 2],
    lambda data, rng: data[:7],
    lambda data, rng: bytes(rng.randrange(256) for _ in range(max(len(data), 64) if len(data) < 4096 else 4096)),
]
JSON = [lambda data, rng: rng.choice([b"[]", b"null", b'"a string"', b"42"]), lambda data, rng: b"{}",
        lambda data, rng: b"\xff\xfe{}", wrong_json_types, nested_wrong]

# file -> (damages, stages that read it)
FILES: dict[str, tuple[list, list[str]]] = {
    "data/clean/part-000000.parquet": (COMMON + [other_parquet], ["tokenizer", "tokenize"]),
    "models/tokenizer/tokenizer.json": (COMMON + JSON, ["tokenize", "train"]),
    "data/tokens/meta.json": (COMMON + JSON, ["train", "evaluate", "guide"]),
    "data/tokens/train_000000.bin": (COMMON + [bad_shard_header], ["train"]),
    "data/tokens/val_000000.bin": (COMMON + [bad_shard_header], ["train", "evaluate"]),
    "models/final/config.json": (COMMON + JSON, ["generate", "evaluate", "export-hf", "guide"]),
    "models/final/model.safetensors": (COMMON + [other_safetensors], ["generate", "evaluate", "export-hf", "guide"]),
    "models/final/tokenizer.json": (COMMON + JSON, ["generate", "evaluate", "export-hf", "guide"]),
    # (the guide reads it as evaluate does, llm/tracking.py; a record passed over runs the whole guide: 18 s)
    "models/final/mlflow_run.json": (COMMON + JSON, ["evaluate"]),
    "plots/train.csv": (COMMON + [csv_damage] * 4, ["evaluate", "guide"]),
    "plots/attention.safetensors": (COMMON + [other_safetensors], ["guide"]),
    "metrics/clean.json": (COMMON + JSON, ["guide"]),
    "metrics/tokenizer.json": (COMMON + JSON, ["guide"]),
    "metrics/train.json": (COMMON + JSON, ["guide"]),
    "metrics/eval.json": (COMMON + JSON, ["guide"]),
    "reports/samples.md": (COMMON[3:], ["guide"]),
}
# A tracker's record may also be passed over (the stage goes on untracked, saying so): tracking never stops a stage.
MAY_PASS = {"models/final/mlflow_run.json"}

# Each damage of a file goes through one of the stages that read it, in turn (each reader is one module's: a
# reader that holds for one stage holds for all).
CASES = [(file, index, stages[index % len(stages)]) for file, (damages, stages) in FILES.items()
         for index in range(len(damages))]


def stage_args(stage: str, out: Path) -> list[str]:
    """The stage, its outputs sent to `out` (the project's own are other cases' inputs)."""
    return {
        "tokenizer": ["tokenizer", "--out", out / "tokenizer.json", "--metrics", out / "tokenizer-metrics.json"],
        "tokenize": ["tokenize", "--out", out / "tokens"],
        "train": ["train", "--checkpoints", out / "ckpt", "--out", out / "final", "--metrics", out / "train.json",
                  "--plots", out / "train.csv", "--attention", out / "attention.safetensors"],
        "evaluate": ["evaluate", "--metrics", out / "eval.json", "--reports", out / "reports"],
        "generate": ["generate", "--prompt", "But", "--max-new-tokens", "2"],
        "export-hf": ["export-hf", "--out", out / "hf"],
        "guide": ["guide", "--out", out / "guide"],
    }[stage]


@pytest.mark.parametrize(("file", "index", "stage"), CASES, ids=[f"{f}-{i}-{s}" for f, i, s in CASES])
def test_a_damaged_input_is_one_line_naming_it(project, tmp_path, file, index, stage):
    path = project / file
    original = path.read_bytes()
    damaged = FILES[file][0][index](original, random.Random(index))
    path.write_bytes(damaged)
    try:
        result = run_stage(project, *stage_args(stage, tmp_path / "out"), env={"HOME": str(project)})
    finally:
        path.write_bytes(original)
    context = f"{file} <- {damaged[:200]!r}\nstderr: {result.stderr[-3000:]}"
    if file in MAY_PASS and result.returncode == 0:
        assert path.name in result.stderr, context
        return
    assert result.returncode == 2, context
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.endswith(errors[0] + "\n"), context
    assert path.name in errors[0], context
    assert not (tmp_path / "out").exists() or not any(
        p.is_file() for p in (tmp_path / "out").rglob("*")), f"nothing written\n{context}"
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
