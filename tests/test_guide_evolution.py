"""The chapter "Attention over training" on the shared tiny guide project: every head's name and every "sharpens" /
"spreads out" agrees with the recorded attention (recomputed here, independently of the chapter's code), the
even-attention line is the entropy of attention spread evenly, the panels are the first, a middle and the last
recorded step, and the PDF prints the filmstrip, not a frame of the GIF."""

import html
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from llm.attention import AttentionRecord, read_record
from llm.guide import evolution_chapter as chapter
from llm.guide import evolution_figures
from llm.guide.document import Exercise, Figure, Table, Text
from llm.guide.inputs import GuidePaths, GuideSettings, load_run
from llm.history import read_history_csv
from tests.test_guide import page, text_of

pytestmark = pytest.mark.slow

NAMES = {"previous-token head", "first-token head", "current-token head", "spreading head", "no single pattern"}


@pytest.fixture(scope="module")
def project(guide_project: Path) -> Path:
    return guide_project


def record_of(project: Path):
    return read_record(project / "plots/attention.safetensors")[0]


def entropy_bits(maps: np.ndarray) -> np.ndarray:
    """Mean over rows 1..T-1 of -sum w log2 w, per head."""
    T = maps.shape[-1]
    out = np.zeros(maps.shape[:2])
    for layer, head in np.ndindex(*maps.shape[:2]):
        rows = [maps[layer, head, i, :i + 1] for i in range(1, T)]
        out[layer, head] = np.mean([-sum(w * math.log2(w) for w in row if w > 0) for row in rows])
    return out


def even_entropy(T: int) -> float:
    """Row i of even attention spreads over i + 1 tokens: log2(i + 1) bits, averaged over rows 1..T-1."""
    return sum(math.log2(i + 1) for i in range(1, T)) / (T - 1)


def chapter_table(project: Path) -> list[list[str]]:
    """The rows of the table of heads of "Attention over training", as the page shows them."""
    text = page(project)
    section = text[text.index('<section id="attention-over-training">'):]
    section = section[:section.index("</section>")]
    table = section[section.index("<table>"):section.index("</table>")]
    return [[html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r"<td>(.*?)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", table) if "<td>" in row]


def check_names(table: list[list[str]], summary: str, final: np.ndarray) -> None:
    """Every row of the table of heads (label, name, weights on previous / first / itself, ...) and the summary
    sentence that counts the named heads agree with the final frame `final`, (n_layer, n_head, T, T), recomputed
    here: a head named for a position gives it the most weight, at least the stated threshold; an unnamed one
    gives no position that much; a spreading head has at least 90% of even attention's entropy."""
    T = final.shape[-1]
    rows = np.arange(2, T)
    threshold = max(2 * float(np.mean(1 / (rows + 1))), 0.3)
    n_layer, n_head = final.shape[:2]
    assert [r[0] for r in table] == [f"L{li} H{h}" for li in range(n_layer) for h in range(n_head)]
    entropy = entropy_bits(final)
    for label, name, previous, first, current, *_ in table:
        layer, head = (int(n) for n in re.findall(r"\d+", label))
        weights = {"previous-token head": final[layer, head, rows, rows - 1].mean(),
                   "first-token head": final[layer, head, rows, 0].mean(),
                   "current-token head": final[layer, head, rows, rows].mean()}
        assert [previous, first, current] == [f"{w:.2f}" for w in weights.values()], label
        assert name in NAMES
        best = max(weights, key=weights.get)
        if name in weights:
            assert name == best and weights[name] >= threshold, label
        else:
            assert weights[best] < threshold, f"{label} clears the threshold but is not named for it"
            assert (name == "spreading head") == (entropy[layer, head] >= 0.9 * even_entropy(T)), label
    said = {kind: labels.split(", ") for _, kind, labels in re.findall(r"(\d+) ([a-z-]+ head)s? \(([^)]*)\)",
                                                                     summary)}
    assert said == {name: [r[0] for r in table if r[1] == name] for name in {r[1] for r in table}
                    if name != "no single pattern"}


def test_every_named_head_does_what_its_name_says_in_the_record(project):
    record = record_of(project)
    rows = np.arange(2, len(record.ids))
    threshold = max(2 * float(np.mean(1 / (rows + 1))), 0.3)
    words = text_of(page(project))
    assert f"at least {threshold:.2f} of its weight on the token just before" in words
    summary = re.search(r"the last recorded, (.*?)(;|\. The table)", words)
    check_names(chapter_table(project), summary.group(1), record.maps[-1])


def test_the_table_names_made_up_heads_as_they_measure():
    """The tiny run's heads may hold no pattern yet: the same check on a record of heads of known shape, one of
    each kind, the table and the sentence made by the chapter's own code."""
    T = 10
    even = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
    previous = np.eye(T, k=-1)
    previous[0, 0] = 1.0
    first = np.zeros((T, T))
    first[:, 0] = 1.0
    current = np.eye(T)
    mixed = 0.5 * even + 0.25 * previous + 0.25 * current  # below the threshold everywhere, and not even
    final = np.stack([np.stack([previous, first, current]), np.stack([even, mixed, 0.7 * previous + 0.3 * first])])
    np.testing.assert_allclose(final.sum(-1), 1.0)
    record = AttentionRecord(list(range(T)), [0, 10], [np.broadcast_to(even, final.shape).copy(), final])
    frames = [chapter.measures(m) for m in record.maps]
    measures_even = chapter.even_measures(T)
    roles = chapter.head_roles(frames[-1], measures_even)
    assert [r.name for r in roles] == ["previous-token head", "first-token head", "current-token head",
                                       "spreading head", None, "previous-token head"]
    blocks = chapter.role_blocks(record, frames, measures_even, roles)
    [table] = [b for b in blocks if isinstance(b, Table)]
    [summary] = [b.text for b in blocks if isinstance(b, Text) and "the last recorded" in b.text]
    check_names([list(row) for row in table.rows], summary, final)
    assert "2 previous-token heads (L0 H0, L1 H2)" in summary
    [changes] = [b.text for b in blocks if isinstance(b, Text) and "from the first recorded step" in b.text]
    check_changes([list(row) for row in table.rows], changes, record.maps[0], final)
    backwards = AttentionRecord(record.ids, record.steps, record.maps[::-1])  # every focused head spreads out
    blocks = chapter.role_blocks(backwards, frames[::-1], measures_even, roles)
    [table] = [b for b in blocks if isinstance(b, Table)]
    [changes] = [b.text for b in blocks if isinstance(b, Text) and "from the first recorded step" in b.text]
    check_changes([list(row) for row in table.rows], changes, final, record.maps[0])
    assert {row[-1] for row in table.rows} == {"spreads out", "barely changes"}


def test_the_even_attention_line_is_the_entropy_of_even_attention(project, rebuilt):
    record = record_of(project)
    T = len(record.ids)
    assert f"{even_entropy(T):.2f} bits for these {T} tokens" in text_of(page(project))
    _, _, drawn = rebuilt
    (_, recorded, entropy, even, _), _ = drawn["loss_and_entropy"][0]
    assert recorded == record.steps
    assert even == pytest.approx(even_entropy(T), abs=1e-12)
    np.testing.assert_allclose(np.array([values for _, values in entropy]).T,
                               np.stack([entropy_bits(m).ravel() for m in record.maps]), atol=1e-5)
    (_, panels, _), _ = drawn["role_curves"][0]
    evens = {title: line for title, _, _, line in panels}
    rows = np.arange(2, T)
    assert evens["weight on the previous token"] == pytest.approx(np.mean(1 / (rows + 1)))
    assert evens["mean distance attended"] == pytest.approx(np.mean(np.arange(1, T) / 2))


def check_changes(table: list[list[str]], words: str, first: np.ndarray, last: np.ndarray) -> None:
    """Each head's word in the table and in the sentence after it ("sharpens", "spreads out", "barely changes")
    follows the sign of its entropy change from frame `first` to frame `last`, recomputed here."""
    before, after = entropy_bits(first), entropy_bits(last)
    said = {}  # head -> the verb the sentence after the table gives it
    body = words.split("from the first recorded step to the last: ")[1].split(". A head sharpens")[0]
    for group in body.split("; "):
        verb = re.search(r"(sharpens?|spreads? out|barely changes?)$", group).group(1)
        singular = {"sharpen": "sharpens", "spread out": "spreads out", "barely change": "barely changes"}
        said |= {label: singular.get(verb, verb) for label in re.findall(r"(L\d+ H\d+) \(", group)}
    assert sorted(said) == sorted(row[0] for row in table)
    for label, *_, entropies, word in table:
        layer, head = (int(n) for n in re.findall(r"\d+", label))
        assert entropies == f"{abs(before[layer, head]):.2f} -> {abs(after[layer, head]):.2f}", label
        change = after[layer, head] - before[layer, head]
        assert word == ("spreads out" if change > 0.05 else "sharpens" if change < -0.05 else "barely changes"), label
        assert said[label] == word, label


def test_sharpens_and_spreads_out_follow_the_sign_of_the_entropy_change(project):
    record = record_of(project)
    check_changes(chapter_table(project), html.unescape(text_of(page(project))), record.maps[0], record.maps[-1])


def test_why_attention_changes_is_told_with_the_runs_loss_and_entropy(project):
    record = record_of(project)
    history = read_history_csv(project / "plots/train.csv")
    at = {row.step: row.train_loss for row in history}
    entropy = [entropy_bits(m).mean() for m in record.maps]
    words = text_of(page(project))
    assert "its gradient flows back through every head to W_q and W_k" in words
    assert (f"the training loss went from {history[0].train_loss:.2f} (step {history[0].step:,}) to "
            f"{at[record.steps[1]]:.2f} by step {record.steps[1]:,}, the first recorded step after 0, and "
            f"{history[-1].train_loss:.2f} at the end; over the same steps the heads' mean entropy went from "
            f"{entropy[0]:.2f} to {entropy[1]:.2f} bits, and ended at {entropy[-1]:.2f}") in html.unescape(words)


def test_the_pdf_prints_the_filmstrip_of_every_frame_not_the_gif(project, rebuilt):
    from pypdf import PdfReader

    guide = project / "reports/guide"
    assert 'src="figures/attention_filmstrip.png"' in page(project)
    record = record_of(project)
    _, _, drawn = rebuilt
    (frames, _), _ = drawn["filmstrip"][0]
    assert [title for title, _ in frames] == [f"step {s:,}" for s in record.steps]
    for (_, maps), recorded in zip(frames, record.maps, strict=True):
        np.testing.assert_array_equal(maps, recorded)
    reader = PdfReader(guide / "guide.pdf")
    starts = {item.title: reader.get_destination_page_number(item) for item in reader.outline}
    first = next(page for title, page in starts.items() if title.endswith(". Attention over training"))
    end = min([page for page in starts.values() if page > first] or [len(reader.pages)])
    sizes = [image.image.size for p in reader.pages[first:end] for image in p.images]
    with Image.open(guide / "figures/attention_filmstrip.png") as strip, \
            Image.open(guide / "attention_evolution.gif") as gif:
        assert strip.size in sizes, "the filmstrip is printed in its chapter"
        assert gif.size not in sizes, "no frame of the animation in the PDF"


def test_the_panels_are_the_first_a_middle_and_the_last_recorded_step(project, rebuilt):
    record = record_of(project)
    picked = [0, len(record.steps) // 2, len(record.steps) - 1]
    _, _, drawn = rebuilt
    shown = []
    for (rows, steps, labels, _), _ in drawn["head_panels"]:
        assert steps == [f"step {record.steps[i]:,}" for i in sorted(set(picked))]
        assert len(labels) == len(record.ids)
        for name, maps in rows:
            layer, head = (int(n) for n in re.findall(r"L(\d+) H(\d+)", name)[0])
            shown.append((layer, head))
            for maps_at, i in zip(maps, sorted(set(picked)), strict=True):
                np.testing.assert_array_equal(maps_at, record.maps[i][layer, head])
    n_layer, n_head = record.maps[0].shape[:2]
    assert sorted(shown) == [(li, h) for li in range(n_layer) for h in range(n_head)], "every head of a tiny model"
    for number in range(1, len(drawn["head_panels"]) + 1):
        assert f'src="figures/attention_heads_{number}.png"' in page(project)


def test_the_exercises_set_real_params_and_count_the_frames_by_the_trainers_rule(project, rebuilt):
    params = yaml.safe_load((project / "params.yaml").read_text())
    run, made, _ = rebuilt
    assert chapter.recorded_steps(run.settings.train) == record_of(project).steps
    exercises = [b for b in made.blocks if isinstance(b, Exercise)]
    assert 1 <= len(exercises) <= 2
    for exercise in exercises:
        assert exercise.command.startswith("dvc exp run -S ")
        for key, value in exercise.overrides:
            section, name = key.split(".")
            assert name in params[section], key
            assert f"{key}={value}" in exercise.command or f"{key}='{value}'" in exercise.command
    assert any(isinstance(b, Table) for b in made.blocks)
    assert {b.file for b in made.blocks if isinstance(b, Figure)} >= {"figures/attention_filmstrip.png",
                                                                       "figures/attention_curves.png",
                                                                       "figures/attention_roles.png"}


# --- the chapter rebuilt here, its figure functions watched ------------------------------------------------

def load_project_run(project: Path):
    from llm.configs.data import DataConfig
    from llm.configs.evaluate import EvaluateConfig
    from llm.configs.mlflow import MlflowConfig
    from llm.configs.sft import SFTConfig
    from llm.configs.tokenizer import TokenizerConfig
    from llm.configs.train import TrainConfig
    from stages.params import load_params

    cfg = load_params(project / "params.yaml", data=DataConfig, tokenizer=TokenizerConfig, train=TrainConfig,
                      evaluate=EvaluateConfig, mlflow=MlflowConfig, sft=SFTConfig)
    p = project
    paths = GuidePaths(p / "data/raw", p / "metrics/clean.json", p / "metrics/tokenizer.json", p / "data/tokens",
                       p / "models/final", p / "metrics/train.json", p / "plots/train.csv",
                       p / "plots/attention.safetensors", p / "metrics/eval.json", p / "reports/samples.md",
                       p / "unused", p / "data/clean", p / "models/sft", p / "no-sft.json", p / "plots/sft.csv")
    return load_run(paths, GuideSettings(cfg.data, cfg.tokenizer, cfg.train, cfg.evaluate, cfg.mlflow, cfg.sft))


@pytest.fixture(scope="module")
def rebuilt(project, tmp_path_factory):
    """The chapter built again, once, with the run loaded as the stage loads it: (the run, the chapter, the arguments
    each of its figure functions was called with)."""
    calls: dict[str, list] = {}
    with pytest.MonkeyPatch.context() as patch:
        for name in ("filmstrip", "loss_and_entropy", "role_curves", "head_panels"):
            original = getattr(evolution_figures, name)

            def watching(*args, _name=name, _original=original, **kwargs):
                calls.setdefault(_name, []).append((args, kwargs))
                return _original(*args, **kwargs)

            patch.setattr(evolution_figures, name, watching)
        figures = tmp_path_factory.mktemp("chapter6") / "figures"
        figures.mkdir()
        run = load_project_run(project)
        made = chapter.evolution_chapter(run, figures)
    return run, made, calls
