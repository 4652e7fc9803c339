import numpy as np
import pytest

from llm.clean import clean_corpus
from llm.config import EOT
from llm.configs.clean import CleanConfig
from llm.configs.data import DataConfig
from llm.configs.tokenize import TokenizeConfig
from llm.documents import iter_documents
from llm.errors import ConfigError
from llm.shards import open_shard, read_meta
from llm.split import is_val
from llm.tokenize import tokenize_corpus
from llm.tokenizer import load_tokenizer
from tests.conftest import SAMPLE_TEXTS

DATA = DataConfig(source="unused", val_fraction=0.3, seed=7)


@pytest.fixture
def clean_dir(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for i in range(60):
        picks = rng.choice(len(SAMPLE_TEXTS), size=3)
        text = f"Document {i}.\n" + "".join(SAMPLE_TEXTS[j] for j in picks)
        if i == 5:
            text += f"A writer typed {EOT} right here."
        (raw / f"doc{i:03d}.txt").write_text(text)
    out = tmp_path / "clean"
    clean_corpus(raw, out, CleanConfig(min_chars=10), (EOT,))
    return out


def run(clean_dir, tokenizer_path, out, **overrides):
    cfg = TokenizeConfig(**{"shard_tokens": 700, "batch_chars": 1500, "num_workers": 1, **overrides})
    return tokenize_corpus(clean_dir, tokenizer_path, out, DATA, cfg)


def test_output_is_byte_identical_whatever_the_number_of_workers(clean_dir, sample_tokenizer_path, tmp_path):
    outputs = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"tokens{workers}"
        run(clean_dir, sample_tokenizer_path, out, num_workers=workers)
        outputs[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert len(outputs[1]) > 3, "several shards, so the test covers shard boundaries"
    assert outputs[1] == outputs[2] == outputs[3]


def test_shards_hold_every_document_after_eot_in_its_split(clean_dir, sample_tokenizer_path, tmp_path):
    out = tmp_path / "tokens"
    meta = run(clean_dir, sample_tokenizer_path, out)
    tokenizer = load_tokenizer(sample_tokenizer_path)
    eot_id = tokenizer.token_to_id(EOT)
    assert meta == read_meta(out), "what the stage returns is what meta.json holds"
    assert meta.eot_id == eot_id and meta.dtype == "uint16" and meta.vocab_size == 400

    expected = {"train": [], "val": []}
    for doc_id, text in iter_documents(clean_dir):
        expected["val" if is_val(doc_id, DATA.seed, DATA.val_fraction) else "train"].append(text)
    assert expected["train"] and expected["val"]

    for split, texts in expected.items():
        info = meta.splits[split]
        tokens = np.concatenate([open_shard(path, vocab_size=400) for path in meta.shard_paths(out, split)])
        assert all(open_shard(path).size <= 700 for path in meta.shard_paths(out, split))
        assert tokens.size == info.tokens
        assert tokens[0] == eot_id
        starts = np.flatnonzero(tokens == eot_id)
        assert len(starts) == info.documents == len(texts), "a typed <|endoftext|> must not add a boundary"
        decoded = [tokenizer.decode(doc.tolist()) for doc in np.split(tokens, starts)[1:]]
        assert [d.removeprefix(EOT) for d in decoded] == texts
        assert info.bytes == sum(len(t.encode()) for t in texts)


def test_an_empty_val_split_is_a_config_error_and_writes_nothing(clean_dir, sample_tokenizer_path, tmp_path):
    out = tmp_path / "tokens"
    with pytest.raises(ConfigError, match="data.val_fraction"):
        tokenize_corpus(clean_dir, sample_tokenizer_path, out, DataConfig(val_fraction=1e-9), TokenizeConfig())
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
