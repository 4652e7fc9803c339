"""The engines behind clean and tokenize: a local process pool and a Ray cluster (started here, on this
machine) give the same bytes as one process."""

import dataclasses
import os
import sys

import numpy as np
import pytest

from llm.clean import clean_corpus
from llm.config import EOT
from llm.configs.clean import CleanConfig
from llm.configs.data import DataConfig
from llm.configs.tokenize import TokenizeConfig
from llm.engine import batches_by_chars, map_ordered
from llm.errors import ConfigError
from llm.tokenize import tokenize_corpus
from tests.conftest import SAMPLE_TEXTS


@dataclasses.dataclass(frozen=True)
class Offset:
    """A setup whose state is built once per worker: it records the process that built it."""

    offset: int

    def build(self) -> tuple[int, int]:
        return self.offset, os.getpid()


def add_offset(state: tuple[int, int], item: int) -> tuple[int, int]:
    offset, built_in = state
    assert built_in == os.getpid(), "the state was built in the worker that uses it"
    return item + offset, os.getpid()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_local_results_come_back_in_order(workers):
    items = range(40)
    results = list(map_ordered(add_offset, iter(items), Offset(1000), "local", workers))
    assert [value for value, _ in results] == [item + 1000 for item in items]
    pids = {pid for _, pid in results}
    if workers == 1:
        assert pids == {os.getpid()}
    else:
        assert os.getpid() not in pids and 1 <= len(pids) <= workers


def test_a_single_item_runs_in_this_process():
    assert list(map_ordered(add_offset, [5], Offset(1), "local", 2)) == [(6, os.getpid())]
    assert list(map_ordered(add_offset, [], Offset(1), "local", 2)) == []


def test_batches_close_at_the_item_that_reaches_the_size_and_keep_every_item_in_order():
    texts = ["abc", "de", "fghij", "k", "lmnopqrstu", "vw", "x"]
    batches = list(batches_by_chars(texts, 5, len))
    assert batches == [["abc", "de"], ["fghij"], ["k", "lmnopqrstu"], ["vw", "x"]]
    assert list(batches_by_chars(iter([]), 5, len)) == []
    pairs = [(i % 2 == 0, text) for i, text in enumerate(texts)]  # tokenize's (is_val, text): sized by the text
    assert list(batches_by_chars(pairs, 5, lambda pair: len(pair[1]))) == [
        pairs[:2], pairs[2:3], pairs[3:5], pairs[5:]]


def test_an_unknown_engine_is_a_config_error():
    with pytest.raises(ConfigError, match="clean.engine"):
        CleanConfig(engine="spark")
    with pytest.raises(ConfigError, match="tokenize.engine"):
        TokenizeConfig(engine="dask")


def make_raw(folder):
    """Distinct documents of random words and sample sentences, one exact and one near duplicate, one too
    short, literal <|endoftext|>s."""
    folder.mkdir()
    rng = np.random.default_rng(3)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9))) for _ in range(3000)]
    for i in range(80):
        text = " ".join(rng.choice(words, size=int(rng.integers(50, 400)))) + "\n" + SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]
        if i % 7 == 0:
            text += f" A writer typed {EOT} here."
        (folder / f"doc{i:03d}.txt").write_text(text)
    (folder / "copy.txt").write_text((folder / "doc003.txt").read_text())
    (folder / "near.txt").write_text("Four more words. " + (folder / "doc004.txt").read_text())
    (folder / "short.txt").write_text("too short")
    return folder


def outputs(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray instance on this machine, as `ray start --head` would give; the stages connect to it because
    it is already initialised (a stage run on its own reads RAY_ADDRESS, or starts one itself)."""
    ray = pytest.importorskip("ray", reason="ray is a dev dependency: make setup installs it")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_tasks_run_in_ray_workers_in_order(ray_cluster):
    results = list(map_ordered(add_offset, range(30), Offset(7), "ray"))
    assert [value for value, _ in results] == [item + 7 for item in range(30)]
    assert os.getpid() not in {pid for _, pid in results}


def test_ray_clean_and_tokenize_are_byte_identical_to_local(ray_cluster, tmp_path, sample_tokenizer_path):
    raw = make_raw(tmp_path / "raw")
    data = DataConfig(source="unused", val_fraction=0.3, seed=7)
    runs = {}
    for engine, workers in (("local", 1), ("local", 2), ("ray", 0)):
        name = f"{engine}{workers}"
        clean_cfg = CleanConfig(min_chars=20, shard_mb=1, near_dedup=0.8, batch_chars=3000, engine=engine,
                                num_workers=workers)
        stats = clean_corpus(raw, tmp_path / name / "clean", clean_cfg, (EOT,))
        tokenize_cfg = TokenizeConfig(shard_tokens=700, batch_chars=1500, engine=engine, num_workers=workers)
        tokenize_corpus(tmp_path / name / "clean", sample_tokenizer_path, tmp_path / name / "tokens", data,
                        tokenize_cfg)
        runs[name] = (stats.to_dict(), outputs(tmp_path / name / "clean"), outputs(tmp_path / name / "tokens"))
    stats, clean_files, token_files = runs["local1"]
    assert stats["dropped"] == {"duplicate": 1, "near_duplicate": 1, "too_short": 1}
    assert stats["special_tokens_neutralised"] == 12
    assert len(token_files) > 4, "several token shards, so shard boundaries are covered"
    assert runs["local2"] == runs["ray0"] == runs["local1"]
