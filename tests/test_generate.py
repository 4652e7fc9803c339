"""Sampling and the KV cache: cached decoding equals full recomputation; filters, seeds, stops, cropping."""

import subprocess

import pytest
import torch

from llm.config import EOT
from llm.generate import filter_logits, generate, sample
from llm.model_io import load_model_dir
from tests.conftest import ROOT, make_model_dir, run_stage


@pytest.fixture(params=["gpt2", "llama", "modern"])  # modern: the token shift's state crosses cache calls
def model_and_tokenizer(request, tmp_path, sample_tokenizer_path):
    return load_model_dir(make_model_dir(tmp_path / request.param, sample_tokenizer_path, arch=request.param))


def test_cached_forward_gives_the_logits_of_a_full_forward(model_and_tokenizer):
    model, _ = model_and_tokenizer
    idx = torch.randint(0, model.config.vocab_size, (2, 30))
    full, _ = model(idx)
    cache = model.new_cache(batch_size=2)
    pieces = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 11), (11, 12), (12, 20), (20, 30))]
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_with_cache_equals_greedy_without_token_for_token(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("To be, or not").ids
    new = model.config.block_size - len(prompt)  # the whole text fits the window
    with_cache = list(generate(model, prompt, new, use_cache=True))
    without = list(generate(model, prompt, new, use_cache=False))
    assert len(with_cache) == new and with_cache == without
    assert len(set(with_cache)) > 3, "a degenerate model would make this comparison weak"


def test_generation_continues_past_the_context_window(model_and_tokenizer):
    model, _ = model_and_tokenizer
    ids = list(generate(model, [1, 2, 3], 3 * model.config.block_size, temperature=1.0, seed=0))
    assert len(ids) == 3 * model.config.block_size


def test_a_prompt_longer_than_the_context_is_cropped_from_the_left(model_and_tokenizer):
    model, _ = model_and_tokenizer
    block = model.config.block_size
    prompt = torch.randint(1, model.config.vocab_size, (3 * block,)).tolist()
    assert list(generate(model, prompt, 5)) == list(generate(model, prompt[-block:], 5))


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others(model_and_tokenizer):
    model, _ = model_and_tokenizer
    runs = [list(generate(model, [5], 40, temperature=1.0, seed=seed)) for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_generation_stops_after_the_end_of_text_token(model_and_tokenizer):
    model, _ = model_and_tokenizer
    first = next(generate(model, [5], 1))
    assert list(generate(model, [5], 50, eot_id=first)) == [first]


def test_an_empty_prompt_is_refused(model_and_tokenizer):
    model, _ = model_and_tokenizer
    with pytest.raises(ValueError, match="at least one token"):
        next(generate(model, [], 5))


def test_top_k_never_samples_outside_the_k_most_likely_tokens():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    allowed = set(torch.topk(logits, 5).indices.tolist())
    generator = torch.Generator().manual_seed(1)
    drawn = {sample(logits, 1.0, 5, 1.0, generator) for _ in range(2000)}
    assert drawn == allowed  # inside the set, and every member reachable


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, top_p=0.75)).tolist() == [True, True, False, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.85)).tolist() == [True, True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.3)).tolist() == [True, False, False, False, False]
    generator = torch.Generator().manual_seed(0)
    shuffled = torch.tensor([0.1, 0.04, 0.5, 0.06, 0.3]).log()
    drawn = {sample(shuffled, 1.0, 0, 0.85, generator) for _ in range(2000)}
    assert drawn == {0, 2, 4}


def test_top_k_and_top_p_combine_and_temperature_zero_is_argmax():
    logits = torch.tensor([3.0, 2.9, 2.8, -1.0, 0.5])
    generator = torch.Generator().manual_seed(0)
    drawn = {sample(logits, 1.0, 2, 0.99, generator) for _ in range(500)}
    assert drawn == {0, 1}
    assert sample(logits, 0.0, 0, 1.0, generator) == 0


def run_generate(*args: str) -> subprocess.CompletedProcess:
    return run_stage(ROOT / "tests", "generate", *args)


def test_generate_command_prints_only_the_continuation_and_repeats_with_a_seed(tiny_model_dir):
    common = ["--model", str(tiny_model_dir), "--prompt", "To be", "--max-new-tokens", "20", "--seed", "3",
              "--temperature", "1.0", "--top-k", "0", "--top-p", "1.0"]
    first, second = run_generate(*common), run_generate(*common)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout

    model, tokenizer = load_model_dir(tiny_model_dir)
    eot = tokenizer.token_to_id(EOT)
    ids = list(generate(model, tokenizer.encode("To be").ids, 20, temperature=1.0, seed=3, eot_id=eot))
    assert first.stdout == tokenizer.decode([i for i in ids if i != eot])


def test_generate_command_starts_an_empty_prompt_from_end_of_text(tiny_model_dir):
    result = run_generate("--model", str(tiny_model_dir), "--max-new-tokens", "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    model, tokenizer = load_model_dir(tiny_model_dir)
    eot = tokenizer.token_to_id(EOT)
    ids = list(generate(model, [eot], 8, eot_id=eot))
    assert result.stdout == tokenizer.decode([i for i in ids if i != eot])


def test_generate_command_with_a_missing_model_exits_2(tmp_path):
    result = run_generate("--model", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "config.json" in result.stderr and result.stderr.count("\n") == 1
