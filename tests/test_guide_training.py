"""The guide's training and generation chapters on the shared trained tiny project: every number their prose
states is recomputed here from the run's files (the uniform-guess loss, nats in bits, the train/val gap, the
tokens each sampling filter removes), the figures are read back as drawn, and the memory prose agrees with
its table."""

import html
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from llm.configs.evaluate import EvaluateConfig
from llm.configs.train import TrainConfig
from llm.data import VAL_STREAM, TokenWindows
from llm.generate import filter_logits, prompt_ids
from llm.guide import run_chapters
from llm.guide.run_chapters import Variant, bf16_text, memory_and_time, sampling_path, sampling_plot, training_plot
from llm.guide.run_figures import UNIFORM_LABEL
from llm.history import read_history_csv
from llm.model import GPT, GPTConfig, initial_model
from llm.model_io import load_model_dir
from llm.plots import plt
from llm.report import read_samples
from llm.shards import read_meta
from llm.tokenizer import token_text
from stages.params import load_params
from tests.conftest import read_json

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(guide_project: Path) -> Path:
    return guide_project


def section(project: Path, slug: str) -> str:
    """The HTML of one chapter of the built guide."""
    page = (project / "reports/guide/index.html").read_text()
    return re.search(rf'<section id="{slug}">.*?</section>', page, re.S).group(0)


def words(markup: str) -> str:
    """The words of some HTML, tags removed (`code` marks joined to their text), entities decoded and whitespace
    collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"</?code>", "", markup))).split())


def table_rows(markup: str) -> list[list[str]]:
    """The cells of every table row (not the header) in some HTML, as the reader sees them."""
    return [[html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r"<td>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", markup, re.S) if "<td>" in row]


def settings(project: Path) -> tuple[TrainConfig, EvaluateConfig]:
    cfg = load_params(project / "params.yaml", train=TrainConfig, evaluate=EvaluateConfig)
    return cfg.train, cfg.evaluate


def test_the_uniform_guess_is_ln_of_the_vocabulary_and_drawn_on_the_loss(project):
    model, _ = load_model_dir(project / "models/final")
    vocab = model.config.vocab_size
    train_cfg, _ = settings(project)
    text = words(section(project, "training"))
    assert f"ln {vocab:,} = {math.log(vocab):.3f} nats at every position" in text
    fig = training_plot(read_history_csv(project / "plots/train.csv"), train_cfg, vocab)
    try:
        loss = fig.axes[0]
        [uniform] = [line for line in loss.lines if line.get_label().startswith(UNIFORM_LABEL)]
        assert list(uniform.get_ydata()) == [math.log(vocab)] * 2
        bits = next(ax for ax in fig.axes if ax is not loss and ax.bbox.bounds == loss.bbox.bounds)
        assert bits.get_ylim() == pytest.approx(tuple(limit / math.log(2) for limit in loss.get_ylim()))
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert len(titles) == len(set(titles)) == 4 and not any("utilisation" in t for t in titles), \
            "MFU is the speed in other units: one panel draws it"
    finally:
        plt.close(fig)


def test_the_worked_window_is_the_first_val_window_and_its_losses_are_the_models(project):
    """The objective on the reader's tokens: inputs and targets one token apart in a window of block_size + 1,
    the final and the initial model's mean cross-entropy over it."""
    model, tokenizer = load_model_dir(project / "models/final")
    train_cfg, _ = settings(project)
    cfg = model.config
    meta = read_meta(project / "data/tokens")
    windows = TokenWindows(meta.shard_paths(project / "data/tokens", "val"), cfg.block_size, cfg.vocab_size, "val")
    x, y = windows.batch(train_cfg.batch_size, train_cfg.seed, VAL_STREAM)
    assert torch.equal(x[0, 1:], y[0, :-1]), "the targets are the inputs moved one token"
    with torch.no_grad():
        final = model.eval()(x[:1], y[:1])[1].item()
        initial = initial_model(cfg, train_cfg.seed).eval()(x[:1], y[:1])[1].item()
    text = words(section(project, "training"))
    assert f"windows of model.block_size + 1 = {cfg.block_size + 1} tokens" in text
    assert f"the final model's mean is {final:.3f} nats" in text
    assert f"(train.seed) score {initial:.3f} on this window" in text
    first = next(row for row in table_rows(section(project, "training")) if row[0] == "0")
    assert first[1:3] == [repr(token_text(tokenizer, int(x[0, 0]))), repr(token_text(tokenizer, int(y[0, 0])))]
    with torch.no_grad():
        probability = torch.softmax(model(x[:1])[0][0, 0].float(), -1)[y[0, 0]].item()
    assert first[4] == f"{-math.log(probability):.2f}", "the loss at position 0 is -ln p(target)"


def test_bits_are_nats_over_ln_2_and_give_the_val_bpb(project):
    evaluation = read_json(project / "metrics/eval.json")
    loss = evaluation["val_loss"]
    bits = loss / math.log(2)
    per_token = evaluation["val_bytes"] / evaluation["val_tokens"]
    text = words(section(project, "training"))
    assert f"{loss:.4f} nats per token, is {bits:.4f} bits per token" in text
    assert f"so that is {bits / per_token:.4f} bits per byte" in text
    assert f"{bits / per_token:.4f}" == f"{evaluation['val_bpb']:.4f}", "the evaluate stage's bpb, the same way"


def test_the_stated_train_val_gap_is_the_historys(project):
    rows = [r for r in read_history_csv(project / "plots/train.csv") if r.val_loss is not None]
    assert len(rows) >= 2
    first, last = rows[0], rows[-1]
    gap, first_gap = last.val_loss - last.train_loss, first.val_loss - first.train_loss
    text = words(section(project, "training"))
    assert (f"At step {last.step:,} the val loss was {last.val_loss:.3f} nats and the train loss "
            f"{last.train_loss:.3f}: a gap of {gap:.3f} nats") in text
    change = "grew" if gap > first_gap + 0.01 else "shrank" if gap < first_gap - 0.01 else "stayed about the same"
    assert f"which {change} from {first_gap:.3f} at the first evaluation (step {first.step:,})" in text
    train = read_json(project / "metrics/train.json")
    passes = train["tokens_seen"] / read_meta(project / "data/tokens").splits["train"].tokens
    assert f"1 − e^−{passes:.2f} = {1 - math.exp(-passes):.0%}" in text


def test_the_memory_prose_agrees_with_its_table(project):
    """Every ratio the prose states is the table's, and bf16 is called faster or slower by its measured time."""
    markup = section(project, "training")
    text = words(markup)
    table = {row[0]: row for row in table_rows(markup)}  # variant, tokens, MB, vs float32, ms, vs float32
    for name in ("float32, gradient accumulation", "float32, activation checkpointing", "bf16 autocast"):
        memory, seconds = table[name][3], table[name][5]
        ratio = float(seconds.rstrip("x"))
        word = "about the same" if abs(ratio - 1) <= 0.05 else "faster" if ratio < 1 else "slower"
        took = f"took {seconds} the time of float32 ({word})"
        stated = took if name == "bf16 autocast" else f"kept {memory} the activations and {took}"
        assert stated in text, name
    assert f"it kept {table['bf16 autocast'][3]} the activations of float32" in text
    fast = run_chapters.has_fast_bf16(torch.device("cpu"))
    assert ("This CPU has bf16 units" in text) == fast and ("emulates bf16 in software" in text) == (not fast)


def variant(seconds: float) -> Variant:
    return Variant("bf16 autocast", 1, 64, 1, 600, seconds, 1000, 1.0)


def test_bf16_is_called_emulated_and_slower_or_faster_by_what_was_measured():
    emulated = bf16_text(variant(40.0), False, "float32")
    assert "torch emulates bf16 in software here" in emulated and "40.00x the time of float32 (slower)" in emulated
    assert "measured on 1 sequence of 64 tokens" in emulated
    fast = bf16_text(variant(0.5), True, "bfloat16")
    assert "This CPU has bf16 units" in fast and "0.50x the time of float32 (faster)" in fast
    assert "emulates" not in fast and "0.60x the activations" in fast
    assert "(slower)" in bf16_text(variant(1.2), True, "bfloat16"), "units do not make it faster by assumption"
    same = bf16_text(variant(1.03), True, "bfloat16")
    assert "1.03x the time of float32 (about the same)" in same and "cost more" not in same, "noise is not a verdict"


def test_where_bf16_is_emulated_it_is_timed_briefly_against_float32_on_the_same_tokens(monkeypatch):
    monkeypatch.setattr(run_chapters, "has_fast_bf16", lambda device: False)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=96, vocab_size=64, dropout=0.0))
    plain, accumulation, checkpointing, bf16 = memory_and_time(SimpleNamespace(model=model))
    assert (bf16.sequences, bf16.length) == (1, run_chapters.EMULATED_TOKENS)
    assert (plain.sequences, plain.length) == (run_chapters.MEASURED_SEQUENCES, 96)
    assert bf16.float32_seconds != plain.seconds and bf16.float32_bytes < plain.activation_bytes
    assert accumulation.float32_bytes == plain.activation_bytes and accumulation.micro_steps == 2
    assert accumulation.activation_bytes < plain.activation_bytes
    assert checkpointing.activation_bytes < plain.activation_bytes


def sampling_of(project: Path):
    model, tokenizer = load_model_dir(project / "models/final")
    _, cfg = settings(project)
    ids = prompt_ids(tokenizer, cfg.prompts[0], tokenizer.token_to_id("<|endoftext|>"))
    return model.eval(), tokenizer, cfg, ids


def test_the_tokens_each_filter_removes_are_what_generate_removes(project):
    model, _, cfg, ids = sampling_of(project)
    assert cfg.temperature > 0 and 0 < cfg.top_k < model.config.vocab_size and cfg.top_p < 1
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0][0, -1].float()
    scaled = logits / cfg.temperature
    vocab = len(logits)
    by_k = int(torch.isneginf(filter_logits(scaled, cfg.top_k, 1.0)).sum())
    by_both = int(torch.isneginf(filter_logits(scaled, cfg.top_k, cfg.top_p)).sum())
    assert by_k == vocab - cfg.top_k
    steps = sampling_path(model, ids, cfg.temperature, cfg.top_k, cfg.top_p)
    assert [int(s.removed.sum()) for s in steps] == [0, 0, by_k, by_both - by_k]
    text = words(section(project, "generation"))
    assert f"removes the other {by_k:,} ({vocab - by_k:,} left of {vocab:,})" in text
    by_p = by_both - by_k
    assert f"removes {f'{by_p:,} more' if by_p else 'none'} ({vocab - by_both:,} left)" in text
    fig = sampling_plot(steps, [str(i) for i in range(20)], list(range(20)))
    try:
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert f"removed {by_k:,}, {vocab - by_k:,} left" in titles[2]
        assert (f"removed {by_p:,}, " if by_p else "none removed, ") + f"{vocab - by_both:,} left" in titles[3]
    finally:
        plt.close(fig)


def test_the_sampling_panels_share_one_axis_and_grey_what_they_remove(project):
    model, tokenizer, cfg, ids = sampling_of(project)
    steps = sampling_path(model, ids, cfg.temperature, cfg.top_k, cfg.top_p)
    shown = torch.argsort(steps[0].probs, descending=True)[:run_chapters.SHOWN_TOKENS[1]].tolist()
    fig = sampling_plot(steps, [repr(token_text(tokenizer, i)) for i in shown], shown)
    try:
        panels = [ax for ax in fig.axes if ax.get_title()]
        assert len(panels) == 4
        assert len({ax.get_xlim() for ax in panels}) == 1 and len({ax.get_ylim() for ax in panels}) == 1
        for ax, step in zip(panels, steps, strict=True):
            removed = int(step.removed[shown].sum())
            grey = [bar for bar in ax.patches if bar.get_hatch()]
            assert len(grey) == removed
            for bar in grey:  # drawn at the probability the token had before the step
                assert any(math.isclose(bar.get_x() + bar.get_width(), float(step.before[i]), rel_tol=1e-5)
                           for i in shown)
    finally:
        plt.close(fig)


def test_the_prompt_is_marked_in_every_sample(project):
    markup = section(project, "generation")
    samples = read_samples((project / "reports/samples.md").read_text())
    assert samples
    for sample in samples:
        if sample.prompt:
            assert f"<pre><b>{html.escape(sample.prompt)}</b>{html.escape(sample.continuation)}</pre>" in markup


def test_the_exercises_set_real_params(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    for slug in ("training", "generation"):
        commands = re.findall(r'<div class="exercise"><h4>Try it</h4><pre>(.*?)</pre>', section(project, slug))
        assert 1 <= len(commands) <= 2, slug
        for command in commands:
            assert command.startswith("dvc exp run -S ")
            for key, _ in re.findall(r"-S (\S+?)=(\S+)", command):
                group, name = key.split(".")
                assert name in params[group], key


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "removed"),
                         [(0.0, 5, 0.9, [0, 63]), (1.0, 0, 1.0, [0, 0, 0, 0]), (0.7, 64, 0.5, [0, 0, 0, None])])
def test_the_sampling_path_is_samples_at_any_setting(temperature, top_k, top_p, removed):
    """Greedy at temperature 0 (sample() takes the argmax before any filter); filters that are off, or that keep
    every token (top-k of the whole vocabulary), remove nothing; the figure draws every setting."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64, dropout=0.0)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    steps = sampling_path(model, [1, 2, 3], temperature, top_k, top_p)
    counts = [int(step.removed.sum()) for step in steps]
    assert counts[:len(removed) - 1] == removed[:-1]
    if removed[-1] is not None:
        assert counts[-1] == removed[-1]
    else:
        assert 0 < counts[-1] < 64 and steps[-1].kept.sum() >= 1
    for step in steps:
        assert torch.allclose(step.probs.sum(), torch.tensor(1.0)) and (step.probs[~step.kept] == 0).all()
    fig = sampling_plot(steps, [str(i) for i in range(15)], list(range(15)))
    plt.close(fig)
