"""The guide's first chapter and the corpus chapter on the shared tiny project: the next-token probabilities shown
are the model's own softmax at that place of the val text (recomputed here), the pipeline's figures are the run's,
the reading path lists every chapter with its code and first exercise, the validation documents and the excerpt
are the shards' own, and every exercise command sets keys that params.yaml has."""

import html
import re
import shlex
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from llm.evaluate import token_byte_lengths
from llm.model_io import load_model_dir
from llm.shards import open_shard, read_meta
from llm.tokenizer import token_text
from tests.conftest import ROOT, read_json, run_stage

pytestmark = pytest.mark.slow

INTRO = "What a language model is"


def section(project: Path, slug: str) -> str:
    page = (project / "reports/guide/index.html").read_text()
    start = page.index(f'<section id="{slug}">')
    return page[start:page.index("</section>", start)]


def words(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def tables(fragment: str) -> list[list[list[str]]]:
    """Each table's rows (header first) as lists of cell texts."""
    return [[[html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r"<t[hd]>(.*?)</t[hd]>", row)]
             for row in re.findall(r"<tr>(.*?)</tr>", table)]
            for table in re.findall(r"<table>(.*?)</table>", fragment)]


def documents(project: Path, split: str) -> list[np.ndarray]:
    """A split's documents, each from its <|endoftext|>, read straight from the shards."""
    meta = read_meta(project / "data/tokens")
    tokens = np.concatenate([open_shard(p) for p in meta.shard_paths(project / "data/tokens", split)])
    starts = [*np.flatnonzero(tokens == meta.eot_id).tolist(), len(tokens)]
    return [tokens[a:b] for a, b in zip(starts, starts[1:], strict=False)]


def test_the_first_chapter_comes_first(guide_project):
    page = (guide_project / "reports/guide/index.html").read_text()
    titles = re.findall(r'<section id="[^"]+"><h2>\d+\. ([^<]+)</h2>', page)
    assert titles[0] == INTRO and titles[1] == "The corpus"
    assert '<img src="figures/pipeline.png"' in section(guide_project, "language-model")


def test_the_next_token_probabilities_are_the_models_softmax_there(guide_project):
    intro = section(guide_project, "language-model")
    model, tokenizer = load_model_dir(guide_project / "models/final")
    line = [int(i) for i in re.findall(r'title="id (\d+)"', intro)]
    before = re.search(r"The model read them and the ([\d,]+) tokens before them", words(intro))[1]
    before = int(before.replace(",", ""))
    document = documents(guide_project, "val")[0].tolist()
    found = [i for i in range(before, len(document) - len(line)) if document[i:i + len(line)] == line]
    assert found, "the line shown is in the first val document"
    prediction = next(t for t in tables(intro) if t[0][:3] == ["rank", "next token", "probability"])[1:9]

    def label(token_id: int) -> str:
        return '"' + token_text(tokenizer, token_id).replace("\n", "↵").replace("\t", "→") + '"'

    places = []  # where the line is (it may occur more than once): the model's prediction after it, by softmax
    for start in found:
        context = document[start - before:start + len(line)]
        assert len(context) <= model.config.block_size
        with torch.no_grad():
            probabilities = model(torch.tensor([context]))[0][0, -1].softmax(-1)
        order = torch.argsort(probabilities, descending=True).tolist()
        if [label(i) for i in order[:8]] == [row[1] for row in prediction]:
            places.append((start, probabilities, order))
    assert places, "the tokens listed are the model's most probable after the line, in order"
    start, probabilities, order = places[0]
    target = document[start + len(line)]
    for rank, (cell_rank, _, cell_probability, mark) in enumerate(prediction, 1):
        token_id = order[rank - 1]
        assert cell_rank == str(rank)
        assert float(cell_probability) == pytest.approx(float(probabilities[token_id]), abs=1e-4)
        assert (mark != "") == (token_id == target)
    rank = order.index(target) + 1
    assert f"its {'first guess' if rank == 1 else f'guess number {rank:,}'} among the" in words(intro)
    assert rank <= 3 or "so this is simply the stretch's last place" in words(intro)
    vocab = tokenizer.get_vocab_size()
    assert f"1/{vocab:,} = {1 / vocab:.5f}" in words(intro)


def test_the_pipeline_shows_the_runs_own_figures(guide_project):
    rows = dict(tuple(row) for row in tables(section(guide_project, "language-model"))[1][1:])
    assert list(rows) == ["fetch", "clean", "tokenizer", "tokenize", "train", "evaluate", "sft", "guide"]
    clean, train = read_json(guide_project / "metrics/clean.json"), read_json(guide_project / "metrics/train.json")
    meta = read_meta(guide_project / "data/tokens")
    model, _ = load_model_dir(guide_project / "models/final")
    raw = [p for p in (guide_project / "data/raw").rglob("*") if p.is_file()]
    assert rows["fetch"].startswith(f"{len(raw):,} files")
    assert rows["clean"] == f"{clean['documents_out']:,} of {clean['documents_in']:,} documents kept"
    assert rows["tokenizer"] == f"vocabulary of {meta.vocab_size:,} tokens"
    assert rows["tokenize"] == f"{meta.splits['train'].tokens:,} train, {meta.splits['val'].tokens:,} val tokens"
    assert rows["train"] == f"{model.num_params():,} parameters, {train['steps']:,} steps"
    assert rows["evaluate"] == f"val: {read_json(guide_project / 'metrics/eval.json')['val_bpb']:.4f} bits per byte"
    assert rows["sft"].startswith(f"{read_json(guide_project / 'metrics/sft.json')['steps']:,} steps")


def test_the_reading_path_gives_each_chapter_its_code_and_first_exercise(guide_project):
    page = (guide_project / "reports/guide/index.html").read_text()
    slugs = re.findall(r'<section id="([^"]+)"><h2>\d+\. ', page)[1:]
    path = tables(section(guide_project, "language-model"))[-1]
    assert path[0] == ["chapter", "code", "try"] and len(path) == 1 + len(slugs)
    for (chapter, code, command), slug in zip(path[1:], slugs, strict=True):
        assert code, chapter
        for module in re.findall(r"llm/[\w/]+\.py", code):
            assert (ROOT / module).is_file(), module
        commands = re.findall(r'<div class="exercise"><h4>Try it</h4><pre>(.*?)</pre>', section(guide_project, slug))
        assert command == (html.unescape(commands[0]) if commands else ""), chapter


def test_the_corpus_chapter_names_the_val_documents_and_shows_the_text(guide_project):
    corpus = section(guide_project, "corpus")
    _, tokenizer = load_model_dir(guide_project / "models/final")
    lengths = token_byte_lengths(tokenizer)
    val = documents(guide_project, "val")
    named = next(t for t in tables(corpus) if t[0][0] == "validation document")[1:]
    assert f"The {len(val):,} validation documents" in words(corpus)
    for row, document in zip(named, val, strict=False):
        first_line = next(x.strip() for x in tokenizer.decode(document[:64].tolist()).split("\n") if x.strip())
        assert row == [first_line, f"{len(document):,}", f"{int(lengths[document].sum()):,}"]
    train_text = tokenizer.decode(documents(guide_project, "train")[0][:1 << 16].tolist())
    excerpt = html.unescape(re.search(r"<pre>(.*?)</pre>", corpus, re.S)[1])
    assert excerpt.strip() and excerpt in train_text


def test_val_documents_are_named_by_id_when_the_clean_folder_is_the_one_tokenized(guide_project):
    from llm.configs.data import DataConfig
    from llm.guide.data_chapters import val_document_ids, val_documents
    from llm.split import is_val
    from stages.params import load_params

    data = load_params(guide_project / "params.yaml", data=DataConfig).data
    meta = read_meta(guide_project / "data/tokens")
    _, tokenizer = load_model_dir(guide_project / "models/final")
    paths = types.SimpleNamespace(tokens=guide_project / "data/tokens", clean=guide_project / "data/clean")
    run = types.SimpleNamespace(tokenizer=tokenizer, meta=meta, eot_id=meta.eot_id, paths=paths,
                                settings=types.SimpleNamespace(data=data))
    found = val_documents(run)
    assert [d.tokens for d in found] == [len(d) for d in documents(guide_project, "val")]
    from llm.documents import iter_documents

    expected = [doc_id for doc_id, _ in iter_documents(guide_project / "data/clean")
                if is_val(doc_id, data.seed, data.val_fraction)]
    assert val_document_ids(run, found) == expected
    run.paths.clean = guide_project / "plays"  # another corpus: its documents are not these
    assert val_document_ids(run, found) is None


def test_every_exercise_of_the_data_chapters_sets_keys_params_yaml_has(guide_project, tmp_path):
    params = yaml.safe_load((guide_project / "params.yaml").read_text())
    commands = [html.unescape(c) for slug in ("corpus", "tokenizer", "shards")
                for c in re.findall(r'<div class="exercise"><h4>Try it</h4><pre>(.*?)</pre>', section(guide_project,
                                                                                                  slug))]
    assert len(commands) >= 3
    for command in commands:
        words_ = shlex.split(command)
        assert words_[:3] == ["dvc", "exp", "run"] and words_[3::2] == ["-S"] * len(words_[3::2]), command
        changed = yaml.safe_load(yaml.safe_dump(params))
        for setting in words_[4::2]:
            key, value = setting.split("=", 1)
            section_name, name = key.split(".")
            assert name in params[section_name], key
            changed[section_name][name] = yaml.safe_load(value)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(changed))
        result = run_stage(guide_project, "check-params", "--params", tmp_path / "params.yaml")
        assert result.returncode == 0, (command, result.stderr)
