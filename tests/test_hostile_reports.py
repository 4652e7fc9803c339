"""User text in every report (issue 31, item 9): prompts and the attention text come from params, continuations
from the model; whatever they hold, samples.md, the PNG figures and the guide's HTML and PDF show it as text,
never as markup, and samples.md reads back as written."""

import html.parser
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from llm.configs.evaluate import EvaluateConfig
from llm.guide.document import (
    Aside,
    Chapter,
    Exercise,
    Figure,
    Pre,
    Table,
    Text,
    Tokens,
    literal,
    write_html,
    write_pdf,
)
from llm.guide.run_chapters import generation_chapter
from llm.model_io import load_model_dir
from llm.report import Sample, markdown_text, read_samples, write_reports

HOSTILE = ("<script>alert(1)</script><img src=x onerror=alert(1)> # `code` **b** _i_ [a](javascript:x) ![i](x) "
           "</pre></b> &amp; ~~s~~ | t | $\\frac{$ \\ ## x")
FRAGMENTS = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "# ", "## Sample 9: x", "`", "``", "]",
             "[a](b)", "![i](x)", "*", "_", "~~", "|", "$", "$\\frac{$", "\\", "&amp;", "&", "<", ">", "</pre>",
             "</b>", "<b>", "<!--", "-->", "\n", "\n\n", "seed 3", "\r", "\t", "\u2028", " ", "é", "🎭", "x", "'", '"']


# Any text, weighted towards markup: fragments of HTML and Markdown joined with arbitrary characters.
hostile_text = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=10).map("".join)


class Elements(html.parser.HTMLParser):
    """The tags and attributes of an HTML page, and its text."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


@settings(max_examples=300, deadline=None)
@given(text=hostile_text | st.just(HOSTILE))
def test_samples_md_shows_any_prompt_and_continuation_as_text_and_reads_back(text):
    sample = Sample(1, 5, text, text)
    markdown = "\n".join(["# Samples", "", "a model", "", *sample.markdown()])
    assert read_samples(markdown) == [sample], repr(text)
    rendered = Elements(MarkdownIt("commonmark").enable("table").enable("strikethrough").render(markdown))
    assert {tag for tag, _ in rendered.tags} == {"h1", "h2", "p", "pre", "b"}, repr(text)
    assert not any(attrs for _, attrs in rendered.tags), repr(text)
    tokens = MarkdownIt("commonmark").parse(markdown)
    h2 = next(tokens[i + 1] for i, t in enumerate(tokens) if t.type == "heading_open" and t.tag == "h2").children
    shown = sample.title.replace("\x00", "\ufffd")  # CommonMark shows NUL as U+FFFD; it trims a heading's ends
    assert "".join(t.content for t in h2 if t.type in ("text", "softbreak")).strip() == shown.strip(), repr(text)


@settings(max_examples=300, deadline=None)
@given(text=hostile_text | st.just(HOSTILE))
def test_markdown_text_renders_as_the_text_itself(text):
    md = MarkdownIt("commonmark").enable("table").enable("strikethrough")
    line = " ".join(text.split())  # one line, as a heading is, without the whitespace a heading trims
    if line:
        tokens = md.parseInline(markdown_text(line))[0].children
        assert [t.type for t in tokens] == ["text"] * len(tokens), repr(line)
        assert "".join(t.content for t in tokens) == line.replace("\x00", "\ufffd"), repr(line)  # CommonMark's NUL


@pytest.fixture
def hostile_reports(tmp_path, tiny_model_dir):
    """reports/ written by the evaluate stage's writer with hostile prompts and attention text."""
    model, tokenizer = load_model_dir(tiny_model_dir)
    eot_id = tokenizer.token_to_id("<|endoftext|>")
    cfg = EvaluateConfig(prompts=(HOSTILE, "plain", "$x$ and $\\frac{$"), max_new_tokens=8,
                         attention_text="To $\\frac{$ be <b>`# ]")
    initial = load_model_dir(tiny_model_dir)[0]
    write_reports(tmp_path / "reports", model, initial, tokenizer, cfg, eot_id, tmp_path / "no_checkpoints", None)
    return tmp_path / "reports", model, tokenizer, cfg


def test_the_evaluate_reports_take_hostile_prompts_and_attention_text(hostile_reports):
    reports, _, _, cfg = hostile_reports
    markdown = (reports / "samples.md").read_text()
    assert "<script" not in markdown and "<img" not in markdown
    assert [s.prompt for s in read_samples(markdown)] == list(cfg.prompts)
    assert (reports / "attention" / "final.png").stat().st_size > 0  # matplotlib drew "$\frac{$" as text
    assert (reports / "attention_evolution.png").stat().st_size > 0


def test_the_guide_shows_hostile_text_as_text(tmp_path, hostile_reports):
    """The generation chapter, built from that samples.md as the guide stage builds it, and every kind of block
    holding the hostile string: the page has only the guide's own tags, and the string as its text."""
    reports, model, tokenizer, cfg = hostile_reports
    run = types.SimpleNamespace(settings=types.SimpleNamespace(evaluate=cfg), model=model, tokenizer=tokenizer,
                                eot_id=tokenizer.token_to_id("<|endoftext|>"),
                                samples=(reports / "samples.md").read_text())
    (tmp_path / "guide" / "figures").mkdir(parents=True)
    chapters = [generation_chapter(run, tmp_path / "guide" / "figures"),
                Chapter("hostile", HOSTILE, [Text(literal(HOSTILE)), Table((HOSTILE,), [(HOSTILE,)]),
                                             Figure("figures/next_token.png", HOSTILE), Tokens([(HOSTILE, 5)]),
                                             Pre(HOSTILE), Aside(HOSTILE, (literal(HOSTILE),)),
                                             Exercise(HOSTILE, literal(HOSTILE), literal(HOSTILE),
                                                      result=literal(HOSTILE))])]
    write_html(tmp_path / "guide" / "index.html", HOSTILE, literal(HOSTILE), chapters)
    page = Elements((tmp_path / "guide" / "index.html").read_text())
    assert {tag for tag, _ in page.tags} <= {"html", "head", "meta", "title", "link", "style", "body", "header",
                                             "h1", "p", "a", "nav", "ol", "li", "section", "h2", "pre", "code",
                                             "table", "thead", "tbody", "tr", "th", "td", "figure", "img",
                                             "figcaption", "span", "sub",
                                             # the guide's own: an aside, an exercise's box and headings, a table's
                                             # scrolling frame, a sample's prompt in bold
                                             "aside", "div", "h4", "strong", "b"}
    assert [attrs["src"] for tag, attrs in page.tags if tag == "img"] == ["figures/next_token.png"] * 2
    assert not any(name.startswith("on") for _, attrs in page.tags for name in attrs)
    text = "".join(page.text)
    assert text.count(HOSTILE) >= 12  # title, subtitle, chapter heading and contents, each block (an exercise: 4)
    assert f"Sample 1: {HOSTILE.splitlines()[0]} (seed {cfg.seed})" in text  # the sample's title, backquotes kept
    write_pdf(tmp_path / "guide" / "guide.pdf", tmp_path / "guide", HOSTILE, literal(HOSTILE), chapters)
    assert (tmp_path / "guide" / "guide.pdf").read_bytes().startswith(b"%PDF")
