"""The guide's arithmetic, part by part, on tiny models and tokenizers (no trained project needed)."""

import numpy as np
import pytest
from PIL import Image

from llm.config import EOT
from llm.configs.tokenizer import TokenizerConfig
from llm.guide.data_chapters import memmap_growth, specimen_spans
from llm.guide.document import Chapter, Figure, Pre, Table, Text, Tokens, write_html
from llm.guide.evolution_chapter import mean_distance
from llm.guide.model_chapters import activation_shapes, component_table, row_entropy, weight_stds
from llm.guide.sft_chapter import copying_meaning, name_spellings
from llm.model import GPT, GPTConfig
from llm.shards import ShardWriter
from llm.tokenizer import BYTES, load_tokenizer, token_bytes, token_label, token_text, train_tokenizer


def test_the_byte_alphabet_maps_back_to_every_byte_once():
    from tokenizers.pre_tokenizers import ByteLevel

    assert set(BYTES) == set(ByteLevel.alphabet()) and sorted(BYTES.values()) == list(range(256))


def test_token_bytes_are_what_the_tokenizer_decodes(sample_tokenizer_path):
    tokenizer = load_tokenizer(sample_tokenizer_path)
    special = set(tokenizer.get_added_tokens_decoder())
    for token_id in range(tokenizer.get_vocab_size()):
        if token_id in special:
            assert token_text(tokenizer, token_id) == tokenizer.id_to_token(token_id)
            continue
        raw = token_bytes(tokenizer, token_id)
        assert 1 <= len(raw) and token_text(tokenizer, token_id) == raw.decode("utf-8", errors="backslashreplace")
    eot = tokenizer.token_to_id("<|endoftext|>")
    spans = specimen_spans(tokenizer, eot)
    assert [i for _, i in spans].count(eot) == 1, "only the control token the pipeline inserts has its id"
    joined = b"".join(token_bytes(tokenizer, i) for _, i in spans if i != eot).decode()
    assert joined == "To be,   or not\tto be:\n<|endoftext|> Быть или не быть; être ou ne pas être."


def test_a_token_label_is_its_text_on_one_line(sample_tokenizer_path):
    """The one label of a token on a figure's axis (reports/ heatmaps and the guide's alike)."""
    tokenizer = load_tokenizer(sample_tokenizer_path)
    labels = [token_label(tokenizer, token_id) for token_id in range(tokenizer.get_vocab_size())]
    assert all("\n" not in label for label in labels)
    assert labels == [token_text(tokenizer, i).replace("\n", "↵") for i in range(tokenizer.get_vocab_size())]
    assert any("↵" in label for label in labels), "the sample tokenizer has tokens with a newline"
    assert token_label(tokenizer, tokenizer.token_to_id("<|endoftext|>")) == "<|endoftext|>"


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_guides_lr_curves_are_the_lrs_training_sets_at_every_step(optimizer):
    import torch

    from llm.configs.train import TrainConfig
    from llm.guide.run_chapters import lr_curves
    from llm.optim import configure_optimizers, lr_at, set_lr

    cfg = TrainConfig(optimizer=optimizer, lr=3e-3, min_lr=3e-4, muon_lr=0.02, warmup_steps=4, max_steps=23)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100))
    optimizers = configure_optimizers(model, cfg, torch.device("cpu"))
    trained: list[list[float]] = [[] for _ in optimizers]
    for step in range(cfg.max_steps):
        set_lr(optimizers, lr_at(step, cfg) / cfg.lr)  # as the training loop sets them before each step
        for lrs, opt in zip(trained, optimizers, strict=True):
            assert len({group["lr"] for group in opt.param_groups}) == 1
            lrs.append(opt.param_groups[0]["lr"])
    curves = lr_curves(cfg)
    assert [label for label, *_ in curves] == ["train.lr (AdamW)", "train.muon_lr (Muon)"][:len(optimizers)]
    for (_, steps, lrs, _), expected in zip(curves, trained, strict=True):
        assert steps == list(range(1, cfg.max_steps + 1)) and lrs == expected  # to the last bit


@pytest.mark.parametrize("parts", [{"arch": "gpt2"}, {"arch": "llama"}, {"arch": "modern"},
                                   {"arch": "gpt2", "n_kv_head": 1, "head": "untied"}])
def test_the_component_table_adds_up_to_the_model(parts):
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0, vocab_size=100, **parts))
    rows = component_table(model)
    assert sum(r[2] for r in rows) == model.num_params()
    assert sum(r[3] for r in rows) == model.flops_per_token()
    # Chapter 4's other two tables, taken from the real modules whatever the MLP and positions are.
    shapes = dict(activation_shapes(model, [1, 2, 3, 4, 5]))
    assert shapes["logits"] == (1, 5, 100) and shapes["block 0: MLP hidden"] == (1, 5, model.config.mlp_hidden)
    assert shapes["block 1 out (residual stream)"] == (1, 5, 32)
    assert shapes["block 0: q, k, v together"] == (1, 5, (2 + 2 * model.config.n_kv_head) * 16)
    assert all(len(stds) == 2 for stds in weight_stds(model).values())


def test_entropy_and_distance_of_known_patterns():
    T = 5
    uniform = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
    previous = np.eye(T, k=-1)
    previous[0, 0] = 1.0
    maps = np.stack([uniform, previous])[None]  # (1 layer, 2 heads, T, T)
    np.testing.assert_allclose(row_entropy(maps)[0], [np.mean(np.log2(np.arange(2, T + 1))), 0.0])
    np.testing.assert_allclose(mean_distance(maps)[0], [np.mean(np.arange(1, T) / 2), 1.0])


def test_a_memory_mapped_shard_is_read_only_where_batches_touch_it(tmp_path):
    writer = ShardWriter(tmp_path, "train", np.dtype("<u2"), shard_tokens=32_000_000)
    writer.write(np.arange(32_000_000) % 1000)
    [path] = writer.close()
    resident = memmap_growth(path, block_size=32, batch_size=2, batches=[0, 1, 2000])
    if resident is None:
        pytest.skip("no /proc/self/smaps on this system: the guide says so and draws no figure")
    size = path.stat().st_size  # 64 MB
    # The kernel maps the pages a window touches and some around them (up to a large folio, 2 MB, here).
    assert resident[0] < size / 100 and resident[1] < size / 4, "a batch maps a few pages, not the file"
    assert resident[0] <= resident[1] <= resident[2] <= size + 4096  # the last page counts whole


def test_the_html_escapes_text_and_marks_code(tmp_path):
    chapter = Chapter("one", "A <b> title", [Text("`x < y` & z"), Table(("a",), [("<td>",)]),
                                             Figure("figures/f.png", "cap \"q\""), Tokens([("<", 5)], frozenset({5})),
                                             Pre("</pre>")])
    (tmp_path / "figures").mkdir()
    Image.new("RGB", (40, 20)).save(tmp_path / "figures/f.png")  # the page states each figure's size
    write_html(tmp_path / "index.html", "T", "sub", [chapter])
    page = (tmp_path / "index.html").read_text()
    assert "<code>x &lt; y</code> &amp; z" in page and "<td>&lt;td&gt;</td>" in page
    assert "A &lt;b&gt; title" in page and "&lt;/pre&gt;" in page and 'class="tok control"' in page


def test_the_samples_the_evaluate_stage_writes_read_back_as_written(tiny_model_dir):
    """samples.md has one writer and one reader (llm/report.py); the guide shows what read_samples gives."""
    from llm.configs.evaluate import EvaluateConfig
    from llm.model_io import load_model_dir
    from llm.report import Sample, read_samples, sample_text, samples_markdown

    tricky = [Sample(1, 5, "To be", " or not <b>&amp;</b>\n</pre>\n## Sample 9: x"), Sample(2, 6, "", "seed 3"),
              Sample(3, 7, "two\nlines <pre>", "")]
    assert read_samples("\n".join(["# Samples", "", "a model", "", *(line for s in tricky for line in s.markdown())])) \
        == tricky
    model, tokenizer = load_model_dir(tiny_model_dir)
    eot_id = tokenizer.token_to_id("<|endoftext|>")
    cfg = EvaluateConfig(prompts=("To be", "", "Once\nupon"), max_new_tokens=12, temperature=1.0, seed=5)
    samples = read_samples(samples_markdown(model, tokenizer, cfg, eot_id))
    assert [(s.number, s.seed, s.prompt) for s in samples] == [(1, 5, "To be"), (2, 6, ""), (3, 7, "Once\nupon")]
    assert [s.continuation for s in samples] == [sample_text(model, tokenizer, s.prompt, cfg, eot_id, s.seed)
                                                 for s in samples]
    assert [s.title for s in samples] == ["Sample 1: To be", "Sample 2: (empty prompt)", "Sample 3: Once"]


def test_the_sampling_sentence_names_what_is_off():
    from llm.guide.run_chapters import sampling_steps

    on = sampling_steps(0.8, 50, 0.95, [4096, 4096, 50, 25], 0.228)
    assert on.startswith("Dividing the logits by the temperature 0.8 sharpens it (the top token now has 0.228)")
    assert "top-k keeps the 50 most likely tokens and removes the other 4,046 (50 left of 4,096)" in on
    assert "removes 25 more (25 left)" in on
    off = sampling_steps(0.0, 0, 1.0, [4096] * 4, 0.1)
    assert off.startswith("Temperature 0 is greedy") and "top-k is off" in off and "top-p is off" in off
    greedy = sampling_steps(0.0, 50, 0.95, [4096, 1, 1, 1], 1.0)
    assert "top-k (50) changes nothing" in greedy and "top-p (0.95) changes nothing" in greedy, \
        "sample() takes the argmax at temperature 0, before any filter"


def test_the_tokenizer_chapter_says_what_a_character_budget_left_out():
    from llm.guide.data_chapters import trained_on

    report = {"train_documents": 40, "train_documents_used": 12, "train_chars_used": 1000}
    assert trained_on(report, 1000).startswith("`tokenizer.max_train_chars` = 1,000 bounded its training to 1,000 "
                                               "characters: 12 of the 40 train documents")
    assert trained_on({**report, "train_documents_used": 40}, 0).startswith("It was trained on all 40 train")
    everything = {**report, "train_documents_used": 40}
    assert trained_on(everything, 10**8) == ("It was trained on all 40 train documents, 1,000 characters "
                                             "(`tokenizer.max_train_chars`, 100,000,000, is more than they hold).")
    assert trained_on({"vocab_size": 300}, 0) == ""


def test_the_copying_paragraph_follows_the_measured_drop_and_says_where_copying_came_from():
    copies, flat = {"first_read": 4.0, "second_read": 3.0}, {"first_read": 4.0, "second_read": 3.95}
    taught = copying_meaning(copies, 0.3)
    assert "has begun to copy" in taught and "30 % of its rows periodic" in taught
    assert "cannot look a name up" in copying_meaning(flat, 0.3)
    assert "natural text only" in copying_meaning(flat, 0.0) and "has begun" not in copying_meaning(flat, 0.0)


def test_a_name_after_a_space_is_other_tokens_and_after_a_quote_the_heading_s():
    heads = "".join(f"MENENIUS.\nWords of line {i}.\n\n[Enter MENENIUS.]\n\n" for i in range(20))
    tokenizer = train_tokenizer([heads], TokenizerConfig(vocab_size=300, min_frequency=2, special_tokens=(EOT,)))
    spelt = name_spellings(tokenizer, "MENENIUS")
    assert tokenizer.decode(spelt["space"]) == " MENENIUS" and tokenizer.decode(spelt["heading"]) == "MENENIUS"
    assert spelt["space"][0] not in spelt["heading"], "the first token carries the space"
    assert spelt["quote"] == spelt["heading"]
