"""The guide stage on a tiny project: every chapter and figure present, numbers that are the run's, attention
that is the model's (recomputed here independently), a page that loads whole in headless Chromium, a PDF with
a page per chapter, the folder logged to the training's MLflow run."""

import html
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from llm.attention import probe_ids, read_record
from llm.chat import ChatTokens, Conversation, Message, encode_conversation, encode_prompt
from llm.configs.data import DataConfig
from llm.configs.sft import SFTConfig
from llm.evaluate import token_byte_lengths
from llm.generate import generate
from llm.guide.model_chapters import attention_steps
from llm.history import read_history_csv
from llm.model import initial_model
from llm.model_io import load_model_dir
from llm.sft import read_tuning_data
from llm.shards import open_shard, read_meta
from llm.tasks import MAX_ANSWER_TOKENS
from tests.conftest import caught_attention, make_model_dir, only_mlflow_run, read_json, run_stage

pytestmark = pytest.mark.slow

CHAPTERS = ["What a language model is", "The corpus", "The tokenizer", "Token shards", "The model",
            "Attention, step by step", "Attention over training", "Training", "Generation", "Instruction tuning",
            "Your experiments"]

@pytest.fixture(scope="module")
def project(guide_project: Path) -> Path:
    return guide_project


def page(project: Path) -> str:
    return (project / "reports/guide/index.html").read_text()


def text_of(html: str) -> str:
    """The page's words, tags removed and whitespace collapsed."""
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def test_every_chapter_and_figure_is_there(project):
    html = page(project)
    titles = re.findall(r'<section id="[^"]+"><h2>\d+\. ([^<]+)</h2>', html)
    assert [t.replace("&#x27;", "'") for t in titles] == CHAPTERS
    guide = project / "reports/guide"
    images = re.findall(r'<img src="([^"]+)"', html)
    expected = {"pipeline", "corpus_files", "token_lengths", "memmap", "weight_std", "attention_qkv",
                "attention_scores", "attention_output", "attention_heads", "attention_curves", "training",
                "next_token", "sft_loss", "sft_accuracy", "runs",
                "model_diagram", "attention_shapes",  # chapters 4 and 5: the block diagram, the shapes of Q, K, V
                # chapter 6 on the tiny model (2 layers x 2 heads): a figure of each layer's heads over training
                "attention_filmstrip", "attention_roles", "attention_heads_1", "attention_heads_2"}
    assert sorted(images) == sorted([*(f"figures/{name}.png" for name in expected), "attention_evolution.gif"])
    for src in images:
        with Image.open(guide / src) as image:
            assert image.size[0] > 200 and image.size[1] > 100, src
    drawn = {f"figures/{p.name}" for p in (guide / "figures").iterdir()}
    assert drawn == set(images) - {"attention_evolution.gif"}, "every figure drawn is shown, and only those"


def test_the_numbers_are_the_runs(project):
    words = text_of(page(project))
    meta = read_meta(project / "data/tokens")
    model, tokenizer = load_model_dir(project / "models/final")
    lengths = token_byte_lengths(tokenizer)
    val = np.concatenate([open_shard(p) for p in meta.shard_paths(project / "data/tokens", "val")])
    val_bytes = int(lengths[val].sum())
    assert val_bytes == meta.splits["val"].bytes, "the tokens decode to every byte of the val text"
    assert f"{val_bytes / len(val):.2f} bytes per token" in words
    assert f"byte-level BPE with {tokenizer.get_vocab_size():,} ids" in words
    assert f"{model.num_params():,} parameters" in words
    assert f"{read_json(project / 'metrics/eval.json')['val_bpb']:.4f} bits per byte" in words
    train = read_json(project / "metrics/train.json")
    assert f"Training ran {train['steps']:,} steps of {train['tokens_seen'] // train['steps']:,} tokens" in words
    tokenizer_report = read_json(project / "metrics/tokenizer.json")
    assert (f"trained on all {tokenizer_report['train_documents']:,} train documents, "
            f"{tokenizer_report['train_chars_used']:,} characters") in words
    clean = read_json(project / "metrics/clean.json")
    assert f"kept {clean['documents_out']:,} ({clean['bytes_out']:,} bytes)" in words


def test_the_recorded_attention_is_the_models_at_each_evaluation(project):
    record, text = read_record(project / "plots/attention.safetensors")
    assert record.steps == [0, 6, 12], "step 0, then every eval_interval = 6 steps and the end"
    model, tokenizer = load_model_dir(project / "models/final")
    ids = probe_ids(tokenizer, text, tokenizer.token_to_id("<|endoftext|>"), model.config.block_size)
    assert record.ids == ids and text == "To be, or not to be, that is the question"
    for maps in record.maps:
        T = len(ids)
        assert maps.shape == (model.config.n_layer, model.config.n_head, T, T)
        np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
        assert np.all(np.triu(maps, k=1) == 0), "causal: no weight on later tokens"
    seed = yaml.safe_load((project / "params.yaml").read_text())["train"]["seed"]
    np.testing.assert_allclose(record.maps[0], initial_model(model.config, seed).attention_maps(
        torch.tensor([ids])).numpy(), atol=1e-6)
    np.testing.assert_allclose(record.maps[-1], model.attention_maps(torch.tensor([ids])).numpy(), atol=1e-5)
    with Image.open(project / "reports/guide/attention_evolution.gif") as gif:
        assert gif.n_frames == len(record.steps)


@pytest.mark.parametrize("parts", [{"arch": "modern"}, {"arch": "gpt2", "n_kv_head": 1}, {"arch": "llama"}])
def test_attention_step_by_step_is_what_the_model_computes(tmp_path, sample_tokenizer_path, monkeypatch, parts):
    """Q, K, V, the weights and the output shown are the tensors the model's own forward pass gives
    scaled_dot_product_attention (caught there), and the weights are softmax(QK^T / sqrt(d)) under the mask."""
    model, tokenizer = load_model_dir(make_model_dir(tmp_path / "model", sample_tokenizer_path, **parts))
    ids = tokenizer.encode("To be, or not to be").ids
    caught = caught_attention(model, ids, monkeypatch)
    n_rep = model.config.n_head // model.config.n_kv_head
    for layer, (q, k, v, out) in enumerate(caught):
        for head in range(model.config.n_head):
            steps = attention_steps(model, ids, layer, head)
            np.testing.assert_allclose(steps["q"], q[0, head].numpy(), atol=1e-5)
            np.testing.assert_allclose(steps["k"], k[0, head // n_rep].numpy(), atol=1e-5)
            np.testing.assert_allclose(steps["v"], v[0, head // n_rep].numpy(), atol=1e-5)
            d = q.size(-1)
            scores = q[0, head] @ k[0, head // n_rep].T / math.sqrt(d)
            causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
            np.testing.assert_allclose(steps["scores"], scores.numpy(), atol=1e-5)
            assert (steps["mask"] == causal.numpy()).all()
            np.testing.assert_allclose(steps["weights"], scores.masked_fill(~causal, -math.inf).softmax(-1).numpy(),
                                       atol=1e-5)
            np.testing.assert_allclose(steps["out"], out[0, head].numpy(), atol=1e-5)


def test_the_page_loads_every_image_in_headless_chromium_without_errors(served_guide, project):
    from playwright.sync_api import sync_playwright

    problems = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        tab = browser.new_page()
        tab.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        tab.on("pageerror", lambda error: problems.append(str(error)))
        tab.on("requestfailed", lambda request: problems.append(f"failed: {request.url}"))
        tab.goto(f"{served_guide}/index.html", wait_until="load")
        images = tab.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, "
                              "i.naturalWidth])")
        sections = tab.evaluate("document.querySelectorAll('section h2').length")
        browser.close()
    assert problems == []
    assert len(images) == len(re.findall(r"<img ", page(project)))
    assert all(complete and width > 0 for _, complete, width in images), images
    assert sections == len(CHAPTERS)


def test_the_pdf_opens_with_a_page_per_chapter(project):
    from pypdf import PdfReader

    reader = PdfReader(project / "reports/guide/guide.pdf")
    assert len(reader.pages) >= 1 + len(CHAPTERS)
    starts = {}
    for number, pdf_page in enumerate(reader.pages):
        first = " ".join(pdf_page.extract_text().split())
        for i, title in enumerate(CHAPTERS, 1):
            if first.startswith(f"{i}. {title}"):
                starts[title] = number
    assert list(starts) == CHAPTERS, "each chapter starts a page of its own, in order"
    assert [item.title for item in reader.outline] == [f"{i}. {t}" for i, t in enumerate(CHAPTERS, 1)]


def test_the_guide_is_logged_to_the_training_run(project):
    client, run = only_mlflow_run(f"sqlite:///{project}/mlflow.db", "guide")
    assert run.info.run_id == read_json(project / "metrics/eval.json")["mlflow_run_id"]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "guide")}
    assert {"guide/index.html", "guide/guide.pdf", "guide/attention_evolution.gif", "guide/figures"} <= logged
    assert f"{run.info.run_name} (this run)" in text_of(page(project)), "chapter 9 marks the run the guide explains"


def test_a_missing_input_is_one_line_and_exit_2_and_nothing_is_written(project, tmp_path):
    result = run_stage(project, "guide", "--attention", tmp_path / "absent.safetensors", "--out", tmp_path / "guide")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: {tmp_path / 'absent.safetensors'}: not found; run the train stage first"
    assert not (tmp_path / "guide").exists()


# --- the instruction-tuning chapter ---------------------------------------------------------------------------

def sft_section(html: str) -> str:
    start = html.index('<section id="sft">')
    return html[start:html.index("</section>", start)]


def heldout_questions(project: Path) -> tuple:
    """The tokenizer, its chat tokens and the held-out questions, generated here as the sft stage generates them."""
    from stages.params import load_params

    cfg = load_params(project / "params.yaml", sft=SFTConfig, data=DataConfig)
    model, tokenizer = load_model_dir(project / "models/sft")
    tokens = ChatTokens.from_tokenizer(tokenizer, project / "models/sft/tokenizer.json")
    data = read_tuning_data(cfg.sft, cfg.data, project / "plays", tokenizer, tokens, model.config.block_size, None)
    return model, tokenizer, tokens, data.sft_set.questions


def percent(value: float | None) -> str:
    return "not scored" if value is None else f"{100 * value:.1f} %"


def test_the_sft_chapter_shows_the_tunings_numbers(project):
    words = html.unescape(text_of(sft_section(page(project))))
    metrics = read_json(project / "metrics/sft.json")
    assert metrics["tasks"], "the tiny tuning scored some task"
    for task, score in metrics["tasks"].items():
        row = " ".join([f"{score['n']:,}", *(percent(score[k]) for k in ("chance", "base_accuracy", "sft_accuracy"))])
        scoring = "choice" if score["scoring"].startswith("choice") else "format"  # the table's word for it
        assert re.search(rf"{task} (reading|knowledge|writing|other) {re.escape(row)} {scoring}\b", words), task
    compared = [s for s in metrics["tasks"].values() if s["base_accuracy"] is not None]
    better = sum(s["sft_accuracy"] > s["base_accuracy"] for s in compared)
    assert f"beats the base model on {better} of the {len(compared)} tasks" in words
    history = read_history_csv(project / "plots/sft.csv")
    base_steps = read_json(project / "metrics/train.json")["steps"]
    assert f"The tuning ran {metrics['steps']:,} steps after pretraining's {base_steps:,}" in words
    assert f"from {history[0].train_loss:.3f} to {history[-1].train_loss:.3f} nats per trained token" in words
    copying = metrics["context_copying"]
    for name in ("base", "tuned"):  # the copying table: each model's two readings and how much the second gains
        which = copying[name]
        drop = 100 * (1 - which["second_read"] / which["first_read"])
        assert f"{name} {which['first_read']:.3f} {which['second_read']:.3f} {drop:.1f} %" in words, name
    assert f"dvc exp run -S sft.max_steps={2 * metrics['steps']}" in words


def test_context_copying_in_the_sft_metrics_is_what_the_models_do(project):
    """metrics/sft.json's copying figures, recomputed from the base and tuned models on the held-out reading
    prompts the sft stage reads twice."""
    from llm.sft import copying_texts
    from llm.sft_data import SFTSet
    from llm.tasks import context_copying

    tuned, tokenizer, tokens, questions = heldout_questions(project)
    base, _ = load_model_dir(project / "models/final")
    texts = copying_texts(SFTSet([], questions, {}, {}), tokenizer, tokens)
    copying = read_json(project / "metrics/sft.json")["context_copying"]
    for name, model in (("base", base), ("tuned", tuned)):
        recomputed = context_copying(model, texts)
        assert copying[name]["texts"] == recomputed.texts == len(texts) > 0
        assert copying[name]["first_read"] == pytest.approx(recomputed.first_read, rel=1e-4)
        assert copying[name]["second_read"] == pytest.approx(recomputed.second_read, rel=1e-4)


SPAN = re.compile(r'<span class="tok(?: control)?( trained| masked)" style="[^"]*" title="id (\d+)">')


def test_the_trained_and_masked_tokens_drawn_are_the_loss_mask(project):
    spans = SPAN.findall(sft_section(page(project)))
    ids, trained = [int(i) for _, i in spans], [kind == " trained" for kind, _ in spans]
    _, tokenizer, tokens, questions = heldout_questions(project)
    shown = [q for task in questions.values() for q in task
             if encode_conversation(tokenizer, tokens, Conversation((*q.messages, Message("assistant", q.answer)))).ids
             == ids]
    assert shown, "the conversation drawn is a held-out question with its answer"
    encoded = encode_conversation(tokenizer, tokens, Conversation((*shown[0].messages,
                                                                   Message("assistant", shown[0].answer))))
    assert trained == encoded.trained
    # Trained: the answer's tokens and the <|end|> closing it, nothing before.
    first = trained.index(True)
    assert all(trained[first:]) and ids[first - 1] == tokens.assistant
    assert ids[first:] == [*tokenizer.encode(shown[0].answer, add_special_tokens=False).ids, tokens.end]
    assert f"{len(ids)} tokens, of which {sum(trained)} green ones are trained" in text_of(sft_section(page(project)))


def test_the_sample_conversations_are_the_tuned_models_greedy_answers(project):
    section = html.unescape(sft_section(page(project)))
    model, tokenizer, tokens, questions = heldout_questions(project)
    shown = [task_questions[0] for task_questions in questions.values() if task_questions]
    assert shown
    for question in shown:
        prompt = encode_prompt(tokenizer, tokens, question.messages)
        budget = min(MAX_ANSWER_TOKENS, model.config.block_size + 1 - len(prompt))
        written = [t for t in generate(model, prompt, budget, temperature=0.0, eot_id=tokens.end) if t != tokens.end]
        reply = tokenizer.decode(written, skip_special_tokens=True)
        assert "user: " + question.messages[-1].content in section
        assert f"tuned model (greedy): {reply}" in section, question.task
        assert question.answer in section


def test_without_the_sft_outputs_the_chapter_says_how_to_make_them(project, tmp_path):
    result = run_stage(project, "guide", "--clean", project / "plays", "--sft-metrics", tmp_path / "absent.json",
                       "--out", tmp_path / "guide", env={"HOME": str(project)})
    assert result.returncode == 0, result.stderr[-3000:]
    written = (tmp_path / "guide/index.html").read_text()
    words = text_of(sft_section(written))
    assert f"{tmp_path / 'absent.json'} is not there" in words and "dvc repro sft" in words
    assert not list((tmp_path / "guide/figures").glob("sft_*")), "no tuning, no tuning figures"
    titles = re.findall(r'<section id="[^"]+"><h2>\d+\. ([^<]+)</h2>', written)
    assert [t.replace("&#x27;", "'") for t in titles] == CHAPTERS


def test_sft_metrics_without_the_tuned_model_is_one_line_and_exit_2(project, tmp_path):
    result = run_stage(project, "guide", "--clean", project / "plays", "--sft-model", tmp_path / "absent",
                       "--out", tmp_path / "guide")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: {tmp_path / 'absent'}: not found; run the sft stage first"
    assert not (tmp_path / "guide").exists()
