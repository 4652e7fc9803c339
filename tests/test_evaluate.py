"""Scoring: bits-per-byte arithmetic, windows, exact agreement with a token-by-token computation; --text mode."""

import json
import math
import re
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm.config import EOT
from llm.configs.evaluate import EvaluateConfig
from llm.evaluate import Score, score_shards, score_text, stream_windows, token_byte_lengths
from llm.model_io import load_model_dir
from llm.report import samples_markdown
from llm.shards import ShardWriter, token_dtype
from tests.conftest import ROOT, SAMPLE_TEXTS, run_stage


def test_score_arithmetic_on_a_hand_checkable_case():
    # 3 tokens at 2 bits each = 6 bits over 2 bytes: 3 bits per byte; 2 ln 2 nats per token; perplexity 4.
    score = Score(nats=6 * math.log(2), tokens=3, bytes=2)
    assert score.bpb == pytest.approx(3.0)
    assert score.loss == pytest.approx(2 * math.log(2))
    assert score.perplexity == pytest.approx(4.0)
    assert (score + Score(0.0, 1, 6)).bpb == pytest.approx(0.75)


def test_a_uniform_model_scores_ln_vocab_per_token(tiny_model_dir):
    model, tokenizer = load_model_dir(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: each token has probability 1 / V
    text = "Hello, world: ça va? 東京"
    score = score_text(model, tokenizer, text, tokenizer.token_to_id(EOT))
    V, n = model.config.vocab_size, len(tokenizer.encode(text).ids)
    assert score.tokens == n and score.bytes == len(text.encode("utf-8"))
    assert score.loss == pytest.approx(math.log(V))
    assert score.bpb == pytest.approx(n * math.log2(V) / len(text.encode("utf-8")))


@pytest.mark.parametrize("text", SAMPLE_TEXTS + ["", "\r\n\t  ", "a" * 300])
def test_token_byte_lengths_add_up_to_the_utf8_length(sample_tokenizer_path, text):
    from llm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(sample_tokenizer_path)
    lengths = token_byte_lengths(tokenizer)
    assert lengths[tokenizer.encode(text).ids].sum() == len(text.encode("utf-8"))
    assert lengths[tokenizer.token_to_id(EOT)] == 0


@pytest.mark.parametrize("n, block", [(2, 4), (5, 4), (9, 4), (10, 4), (33, 8)])
def test_windows_predict_every_token_but_the_first_exactly_once(n, block):
    targets = [t for start, end in stream_windows(n, block) for t in range(start + 1, end)]
    assert targets == list(range(1, n))
    assert all(end - start <= block + 1 for start, end in stream_windows(n, block))


def write_shard(folder, tokens: np.ndarray, vocab_size: int):
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, "val", token_dtype(vocab_size), shard_tokens=10**6)
    writer.write(tokens)
    return writer.close()


def test_shard_scores_match_a_token_by_token_computation(tiny_model_dir, tmp_path):
    model, tokenizer = load_model_dir(tiny_model_dir)
    block, V = model.config.block_size, model.config.vocab_size
    rng = np.random.default_rng(0)
    streams = [rng.integers(0, V, size=n) for n in (3 * block + 5, block + 1)]
    paths = [p for i, s in enumerate(streams) for p in write_shard(tmp_path / f"s{i}", s, V)]
    lengths = token_byte_lengths(tokenizer)

    score = score_shards(model, paths, lengths, batch_size=3)

    nats, count, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for stream in streams:
            for t in range(1, len(stream)):
                start = (t - 1) // block * block  # the window holding target t; its context is stream[start:t]
                logits, _ = model(torch.tensor(stream[start:t][None], dtype=torch.long))
                nats += F.cross_entropy(logits[0, -1:], torch.tensor([stream[t]])).item()
                count, nbytes = count + 1, nbytes + int(lengths[stream[t]])
    assert score.tokens == count == sum(len(s) - 1 for s in streams)
    assert score.bytes == nbytes
    assert score.nats == pytest.approx(nats, rel=1e-5)


def test_a_token_budget_scores_evenly_spaced_windows_deterministically(tiny_model_dir, tmp_path):
    model, tokenizer = load_model_dir(tiny_model_dir)
    block = model.config.block_size
    tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, size=20 * block + 1)
    paths = write_shard(tmp_path, tokens, model.config.vocab_size)
    lengths = token_byte_lengths(tokenizer)
    first = score_shards(model, paths, lengths, max_tokens=5 * block)
    assert first.tokens == 5 * block
    assert score_shards(model, paths, lengths, max_tokens=5 * block) == first
    assert score_shards(model, paths, lengths).tokens == 20 * block


def evaluate_text(*args: str) -> subprocess.CompletedProcess:
    return run_stage(ROOT / "tests", "evaluate", *args)


def test_text_mode_prints_one_json_object_and_writes_nothing(tiny_model_dir, tmp_path):
    text = tmp_path / "play.txt"
    text.write_text("\n".join(SAMPLE_TEXTS))
    before = sorted(p for p in tmp_path.rglob("*"))
    result = evaluate_text("--model", str(tiny_model_dir), "--text", str(text))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert {"loss", "bpb", "tokens", "bytes"} <= set(out)
    assert out["bytes"] == len(text.read_bytes())
    model, tokenizer = load_model_dir(tiny_model_dir)
    expected = score_text(model, tokenizer, text.read_text(), tokenizer.token_to_id(EOT))
    assert out["tokens"] == expected.tokens
    assert out["loss"] == pytest.approx(expected.loss, rel=1e-6) and out["bpb"] == pytest.approx(expected.bpb, rel=1e-6)
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_text_mode_rejects_a_file_that_is_not_utf8(tiny_model_dir, tmp_path):
    text = tmp_path / "latin1.txt"
    text.write_bytes("café".encode("latin-1"))
    result = evaluate_text("--model", str(tiny_model_dir), "--text", str(text))
    assert result.returncode == 2
    assert "latin1.txt" in result.stderr and "UTF-8" in result.stderr and result.stdout == ""


def test_text_mode_rejects_an_empty_file_naming_it(tiny_model_dir, tmp_path):
    text = tmp_path / "empty.txt"
    text.write_text("")
    result = evaluate_text("--model", str(tiny_model_dir), "--text", str(text))
    assert result.returncode == 2 and result.stdout == ""
    assert "empty.txt" in result.stderr and result.stderr.count("\n") == 1


def test_each_prompt_samples_with_its_own_seed_and_the_samples_repeat(tiny_model_dir):
    model, tokenizer = load_model_dir(tiny_model_dir)
    cfg = EvaluateConfig(prompts=("To be", "To be"), max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0, seed=5)
    markdown = samples_markdown(model, tokenizer, cfg, tokenizer.token_to_id(EOT))
    first, second = re.findall(r"<pre>\n(.*?)\n</pre>", markdown, flags=re.S)
    assert first != second, "the same prompt twice: two seeds, two different samples"
    assert "seed 5" in markdown and "seed 6" in markdown
    assert samples_markdown(model, tokenizer, cfg, tokenizer.token_to_id(EOT)) == markdown
