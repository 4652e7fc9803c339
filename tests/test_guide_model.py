"""Chapters 4 and 5 of the guide, the model and attention step by step: the block diagram's shapes are the
config's, the aside names exactly the preset's newer parts, the worked row of attention is the model's own
(recomputed here independently), the exercises set real params and expect what a model built so would have, and
every heatmap has its colour bar."""

import dataclasses
import html
import math
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from llm.attention import probe_ids, read_record
from llm.configs.evaluate import EvaluateConfig
from llm.guide import figures
from llm.guide.document import Aside, Exercise, Figure
from llm.guide.model_chapters import (
    attention_chapter,
    model_chapter,
    model_diagram,
    modern_parts,
    worked_row,
    worked_table,
)
from llm.model import GPT, GPTConfig, initial_model
from llm.model_io import load_model_dir
from tests.conftest import caught_attention, make_model_dir

MODERN = {"gpt2": [], "llama": ["SwiGLU", "untied head"],
          "modern": ["QK-norm", "ReLU²", "untied head", "logit softcap", "zero-init", "token shift"]}


def section(project: Path, slug: str) -> str:
    page = (project / "reports/guide/index.html").read_text()
    start = page.index(f'<section id="{slug}">')
    return page[start:page.index("</section>", start)]


def words(fragment: str) -> str:
    return html.unescape(" ".join(re.sub(r"<[^>]+>", " ", fragment).split()))


def table_after(fragment: str, header: str) -> list[list[str]]:
    """The body rows of the first table whose header holds `header`, cells unescaped."""
    for table in re.findall(r"<table>.*?</table>", fragment, flags=re.S):
        if header in html.unescape(table):
            body = table[table.index("<tbody>"):]
            return [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row)]
                    for row in re.findall(r"<tr>(.*?)</tr>", body)]
    raise AssertionError(f"no table with {header!r}")


def final_model(project: Path) -> tuple[GPT, list[int]]:
    model, tokenizer = load_model_dir(project / "models/final")
    _, text = read_record(project / "plots/attention.safetensors")
    ids = probe_ids(tokenizer, text, tokenizer.token_to_id("<|endoftext|>"), model.config.block_size)
    return model.eval(), ids


def test_the_worked_row_is_the_models_own_attention(guide_project, monkeypatch):
    attention = section(guide_project, "attention")
    text = words(attention)
    layer, head = (int(n) for n in re.search(r"Here is one head, layer (\d+) head (\d+)", text).groups())
    row = int(re.search(r"One row worked through: the query of token (\d+)", text).group(1))
    model, ids = final_model(guide_project)
    T, d = len(ids), model.config.head_dim
    table = table_after(attention, "e^(s − max)")
    keys = [r for r in table if r[0].isdigit()]
    assert [int(r[0]) for r in keys] == list(range(len(keys))), "the keys, in order"
    if len(keys) < T:  # a long text: the masked keys after the first few are one line
        assert [r for r in table if not r[0].isdigit()][0][:6] == [f"{len(keys)}-{T - 1}", "…", "…", "−∞", "0", "0"]
    assert row + 1 < len(keys), "the row shows masked keys"
    scores = np.array([float(r[2]) for r in keys])
    weights = np.array([float(r[5]) for r in keys])
    exps = np.array([float(r[4]) for r in keys])
    # Masked: every key after the query, −∞ and weight 0; the others kept as they were.
    assert all(r[3] == "−∞" and r[4] == "0" and r[5] == "0" for r in keys[row + 1:])
    assert [float(r[3]) for r in keys[:row + 1]] == list(scores[:row + 1])
    # The weights sum to 1 and are the model's own, from its attention_probs path (not the chapter's).
    total = next(r for r in table if r[0] == "sum")
    assert float(total[5]) == pytest.approx(1.0, abs=1e-4) and weights.sum() == pytest.approx(1.0, abs=T * 5e-5)
    maps = model.attention_maps(torch.tensor([ids])).numpy()
    np.testing.assert_allclose(weights, maps[layer, head, row, :len(keys)], atol=5e-5)
    assert maps[layer, head, row, len(keys):].sum() == 0
    # The softmax, worked: e^(s - max) over their sum, the largest score giving 1 (the scores shown to 3 decimals
    # put each exponential within 1e-3 of its share).
    kept = scores[:row + 1]
    np.testing.assert_allclose(exps[:row + 1], np.exp(kept - kept.max()), rtol=1.5e-3, atol=5e-5)
    assert float(total[4]) == pytest.approx(np.exp(kept - kept.max()).sum(), rel=1.5e-3)
    assert float(total[4]) == pytest.approx(exps.sum(), abs=(row + 2) * 5e-5)
    np.testing.assert_allclose(weights[:row + 1], exps[:row + 1] / exps.sum(), atol=2e-4)
    # The scores, the values and the output: the tensors the forward pass hands to scaled_dot_product_attention.
    q, k, v, out = caught_attention(model, ids, monkeypatch)[layer]
    kv_head = head // (model.config.n_head // model.config.n_kv_head)
    raw = (q[0, head, row] @ k[0, kv_head].T / math.sqrt(d)).numpy()
    np.testing.assert_allclose(scores, raw[:len(keys)], atol=5e-4)
    values = np.array([[float(c) for c in r[6:8]] for r in keys])
    np.testing.assert_allclose(values, v[0, kv_head, :len(keys), :2].numpy(), atol=5e-4)
    output = next(r for r in table if r[0] == "output")
    np.testing.assert_allclose([float(c) for c in output[6:8]], out[0, head, row, :2].numpy(), atol=5e-4)
    assert "The softmax gives a −∞ score the weight 0, since e^−∞ = 0" in text


def test_a_long_row_sums_its_later_keys_in_one_line():
    T = 30
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(T, T))
    mask = np.tril(np.ones((T, T), dtype=bool))
    weights = np.exp(np.where(mask, scores, -np.inf))
    weights /= weights.sum(-1, keepdims=True)
    v = rng.normal(size=(T, 8))
    worked = worked_row({"scores": scores, "mask": mask, "weights": weights, "v": v, "out": weights @ v}, 5)
    rows = worked_table(worked, [f"t{i}" for i in range(T)])
    assert [r[0] for r in rows] == [*map(str, range(9)), "9-29", "sum", "output"]
    assert float(rows[-2][5]) == pytest.approx(1.0, abs=1e-4)
    assert [float(c) for c in rows[-1][6:8]] == pytest.approx((weights[5] @ v)[:2], abs=5e-4)


def test_the_diagram_carries_the_configs_shapes(guide_project):
    model, ids = final_model(guide_project)
    cfg, T = model.config, len(ids)
    diagram = model_diagram(model, ids)
    stream = f"1 × {T} × {cfg.n_embd}"
    assert diagram.stream == stream
    boxes = [box for box, _, _ in diagram.flow]
    assert [b for b in boxes if b.startswith("block ")] == [f"block {i}" for i in range(cfg.n_layer)]
    assert boxes[diagram.expanded] == "block 0"
    arrows = dict((box.split("\n")[0], shape) for box, _, shape in diagram.flow)
    assert arrows["input ids"] == f"1 × {T}"
    assert all(arrows[f"block {i}"] == stream for i in range(cfg.n_layer))
    assert arrows["softmax"] == f"1 × {T} × {cfg.vocab_size:,}  probabilities"
    assert f"head (lm_head, {cfg.head})" in arrows and f"{cfg.n_embd} × {cfg.vocab_size:,}" in boxes[-3]
    (norm, _, normed), (attention, _, attended), (_, _, _), (mlp, _, mlp_out) = diagram.block
    assert normed == attended == mlp_out == stream
    assert f"q, k, v 1 × {T} × {(cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim}" in attention
    assert f"weights 1 × {cfg.n_head} × {T} × {T}" in attention
    assert f"hidden 1 × {T} × {cfg.mlp_hidden}" in mlp
    model_section = section(guide_project, "model")
    assert '<img src="figures/model_diagram.png"' in model_section
    assert f"B × T × C = {stream}" in words(model_section)


def test_a_deep_model_with_learned_positions_is_drawn_short():
    model = GPT(GPTConfig(arch="gpt2", n_layer=6, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    diagram = model_diagram(model, [1, 2, 3])
    boxes = [box.split("\n")[0] for box, _, _ in diagram.flow]
    assert boxes[:6] == ["input ids", "token embedding (wte)", "+ position embedding (wpe)", "block 0", "block 1",
                         "⋮  3 more blocks"]
    assert boxes[6] == "block 5"


@pytest.mark.parametrize("arch", list(MODERN))
def test_the_newer_parts_are_the_presets(arch):
    cfg = GPTConfig(arch=arch, n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50)
    assert [name for name, _ in modern_parts(cfg)] == MODERN[arch]
    # A part set by hand on top of a preset counts: the aside follows the resolved config, not the preset's name.
    changed = GPTConfig(arch=arch, n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50, logit_softcap=30.0)
    assert "logit softcap" in [name for name, _ in modern_parts(changed)]


def test_the_aside_names_the_runs_newer_parts(guide_project):
    model, _ = final_model(guide_project)
    asides = re.findall(r"<aside>(.*?)</aside>", section(guide_project, "model"), flags=re.S)
    names = [words(p).split(":")[0] for p in re.findall(r"<p>(.*?)</p>", asides[0])[1:]] if asides else []
    assert names == [name for name, _ in modern_parts(model.config)]
    assert names, "the test project's preset (modern) has newer parts"


def small_run(tmp_path: Path, tokenizer_path: Path, **parts) -> types.SimpleNamespace:
    """What the two chapters read of a Run, for a tiny random model: no trained project needed."""
    model, tokenizer = load_model_dir(make_model_dir(tmp_path / "model", tokenizer_path, **parts))
    return types.SimpleNamespace(model=model.eval(), initial=initial_model(model.config, 0).eval(),
                                 tokenizer=tokenizer, settings=types.SimpleNamespace(evaluate=EvaluateConfig()),
                                 eot_id=tokenizer.token_to_id("<|endoftext|>"))


@pytest.mark.parametrize("parts", [{"arch": "gpt2"}, {"arch": "llama", "n_kv_head": 1}])
def test_the_chapters_follow_the_preset(tmp_path, sample_tokenizer_path, parts):
    run = small_run(tmp_path, sample_tokenizer_path, **parts)
    (tmp_path / "figures").mkdir()
    model = model_chapter(run, tmp_path / "figures")
    asides = [b for b in model.blocks if isinstance(b, Aside)]
    expected = MODERN[parts["arch"]]
    assert [p.split(":")[0] for a in asides for p in a.paragraphs[1:]] == expected
    assert len(asides) == (1 if expected else 0), "no aside for a preset without newer parts"
    attention = attention_chapter(run, tmp_path / "figures")
    for chapter in (model, attention):
        for figure in (b for b in chapter.blocks if isinstance(b, Figure)):
            assert (tmp_path / figure.file).is_file()
    for chapter in (model, attention):  # the params a later build looks the reader's runs up by
        exercises = [b for b in chapter.blocks if isinstance(b, Exercise)]
        assert exercises and all(exercise.overrides for exercise in exercises)
        for exercise in exercises:
            for key, value in exercise.overrides:
                assert f"{key}={value}" in exercise.command or f'{key}="{value}"' in exercise.command
    text = " ".join(getattr(b, "text", "") for b in attention.blocks)
    if parts.get("n_kv_head") == 1:
        assert "1 key/value heads shared by 2 query heads each (grouped-query attention)" in text


def test_the_exercises_set_real_params_and_expect_the_models_counts(guide_project):
    params = yaml.safe_load((guide_project / "params.yaml").read_text())
    model, _ = final_model(guide_project)
    chapters = (section(guide_project, "model"), section(guide_project, "attention"))
    exercises = [re.findall(r'<div class="exercise">.*?</div>', c, flags=re.S) for c in chapters]
    assert [len(e) for e in exercises] == [2, 2]
    for exercise in sum(exercises, []):
        command = html.unescape(re.search(r"<pre>(.*?)</pre>", exercise, flags=re.S).group(1))
        assert command.startswith("dvc exp run -S ")
        key = re.match(r"dvc exp run -S '?([\w.]+)=", command).group(1)
        section_name, name = key.split(".")
        assert name in params[section_name], f"{key} is a params.yaml key"
    stated = {}
    for exercise in sum(exercises, []):
        command = html.unescape(re.search(r"<pre>(.*?)</pre>", exercise, flags=re.S).group(1))
        found = re.search(r"Expect:</strong> (?:\d+ heads of \d+ channels each instead of \d+ of \d+, and the same )?"
                          r"([\d,]+) parameters", exercise)
        if found:
            stated[command] = int(found.group(1).replace(",", ""))
    cfg = model.config
    deeper = GPT(dataclasses.replace(cfg, n_layer=cfg.n_layer + 1)).num_params()
    assert stated[f"dvc exp run -S model.n_layer={cfg.n_layer + 1}"] == deeper
    other = "tied" if cfg.head == "untied" else "untied"
    assert stated[f"dvc exp run -S model.head={other}"] == GPT(dataclasses.replace(cfg, head=other)).num_params()
    heads = [c for c in stated if "model.n_head=" in c]
    for command in heads:
        n_head = int(command.rsplit("=", 1)[1])
        assert stated[command] == GPT(dataclasses.replace(cfg, n_head=n_head, n_kv_head=n_head)).num_params()


def test_every_heatmap_has_its_colour_bar_and_minus_infinity_its_own_colour(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: drawn.append(fig))
    scores = np.arange(16.0).reshape(4, 4) - 8
    masked = np.where(np.tril(np.ones((4, 4), dtype=bool)), scores, -np.inf)
    labels = ["a", "b", "c", "d"]
    mask = np.where(np.tril(np.ones((4, 4), dtype=bool)), 0.0, -np.inf)
    figures.matrices([("scores", scores, "RdBu_r"), ("masked", masked, "RdBu_r"), ("w", np.eye(4), "viridis"),
                      ("mask", mask, "RdBu_r")], labels, tmp_path / "m.png", col_labels=labels, columns=2)
    figures.attention_heads(np.ones((2, 3, 4, 4)) / 4, labels, "heads", tmp_path / "h.png")
    matrices, heads = drawn
    images = [ax.images[0] for ax in matrices.axes if ax.images]
    bars = [ax for ax in matrices.axes if ax.get_label() == "<colorbar>"]
    assert len(images) == 4 and len(bars) == 4
    # A mask (only 0 and −∞) is two colours, and its bar names them, not a scale of values it does not hold.
    assert [label.get_text() for label in bars[3].get_yticklabels()] == ["−∞", "0"]
    kept, removed = images[3].cmap(images[3].norm(1.0)), images[3].cmap(images[3].norm(0.0))
    assert np.allclose(kept[:3], 1) and np.allclose(removed[:3], images[1].cmap.get_bad()[:3])
    assert sum(1 for ax in heads.axes if ax.get_label() == "<colorbar>") == 1 and len(heads.axes) == 2 * 3 + 1
    bad = images[1].cmap.get_bad()
    assert tuple(np.round(bad[:3], 3)) == tuple(np.round([int(figures.MASKED_COLOUR[i:i + 2], 16) / 255
                                                          for i in (1, 3, 5)], 3))
    data = images[1].get_array()
    assert data.mask.sum() == 6 and not data.mask[np.tril_indices(4)].any(), "the −∞ cells, and only those"
    zero = images[0].cmap(images[0].norm(0.0))
    assert not np.allclose(zero[:3], bad[:3], atol=0.1), "−∞ is a colour apart from 0"
    for fig in drawn:
        for text in fig.findobj(lambda artist: hasattr(artist, "get_fontsize") and artist.get_visible()):
            if getattr(text, "get_text", lambda: "")():
                assert text.get_fontsize() >= 7, text.get_text()
