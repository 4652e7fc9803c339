"""The guide's layout on the shared tiny project, as a reader meets it: the page in headless Chromium at a desktop
(1280 px) and a phone (390 px) width, and every page of the PDF (read with pypdf: no PDF renderer is installed
here, so a page counts as rendered when its content stream parses and yields its text and images)."""

import hashlib
import html
import re
from pathlib import Path

import pytest
from pypdf import PdfReader

pytestmark = pytest.mark.slow

SMALLEST_PT = 7.0  # no text in a figure smaller than this on an A4 page
FIGURE_DPI = 110  # what the guide's PNGs are drawn at (llm.plots.save_figure)


def look(url: str, width: int) -> dict:
    """What Chromium shows of the page at `width` CSS pixels: the page's and window's widths, each image (src,
    loaded, natural width, drawn height, the link around it), and every console error or failed request."""
    from playwright.sync_api import sync_playwright

    problems = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        tab = browser.new_page(viewport={"width": width, "height": 900})
        tab.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        tab.on("pageerror", lambda error: problems.append(str(error)))
        tab.on("requestfailed", lambda request: problems.append(f"failed: {request.url}"))
        tab.goto(url, wait_until="load")
        seen = tab.evaluate("""() => ({
            scroll: document.scrollingElement.scrollWidth, inner: innerWidth,
            images: Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete,
                natural: i.naturalWidth, height: i.getBoundingClientRect().height,
                link: i.closest('a') ? i.closest('a').getAttribute('href') : null})),
            tables: Array.from(document.querySelectorAll('table')).map(t => getComputedStyle(t.parentElement)
                .overflowX)})""")
        browser.close()
    return {**seen, "problems": problems}


@pytest.mark.parametrize("width", [1280, 390])
def test_the_page_fits_the_screen_and_shows_every_image(served_guide, width):
    seen = look(f"{served_guide}/index.html", width)
    assert seen["problems"] == []
    assert seen["scroll"] <= seen["inner"], "nothing makes the page wider than the window"
    assert seen["images"], "the guide has figures"
    for image in seen["images"]:
        assert image["complete"] and image["natural"] > 0, image
        assert image["height"] >= 150, image
        assert image["link"] == image["src"], "each figure links to itself at full size"
    assert set(seen["tables"]) == {"auto"}, "a wide table scrolls inside its frame"


def pdf_pages(path: Path) -> list[dict]:
    """Per page of the PDF: its text, its height, the lowest point anything is drawn at (pt from the bottom), and
    each image as (pixel width, pixel height, placed width in pt)."""
    pages = []
    for page in PdfReader(path).pages:
        xobjects = page["/Resources"].get("/XObject", {})
        images, lows = [], []

        def before(operator, args, cm, tm, xobjects=xobjects, images=images, lows=lows):
            if operator == b"Do":
                image = xobjects[args[0]].get_object()
                images.append((int(image["/Width"]), int(image["/Height"]), cm[0]))
                lows.append(cm[5])

        def text(content, cm, tm, font, size, lows=lows):
            if content.strip():
                lows.append(tm[5] * cm[3] + cm[5])

        words = page.extract_text(visitor_operand_before=before, visitor_text=text)
        pages.append({"text": " ".join(words.split()), "height": float(page.mediabox.height),
                      "lowest": min(lows, default=float(page.mediabox.height)), "images": images})
    return pages


def chapter_titles(guide_project: Path) -> list[str]:
    page = (guide_project / "reports/guide/index.html").read_text()
    return [html.unescape(t) for t in re.findall(r'<section id="[^"]+"><h2>(\d+\. [^<]+)</h2>', page)]


def test_the_pdf_has_every_chapter_the_first_chapter_and_every_exercise_command(guide_project):
    pages = pdf_pages(guide_project / "reports/guide/guide.pdf")
    assert all(p["text"] for p in pages), "every page has text"
    whole = " ".join(p["text"] for p in pages)
    titles = chapter_titles(guide_project)
    assert titles[0] == "1. What a language model is"
    for title in titles:
        assert title in whole
    first = next(i for i, p in enumerate(pages) if p["text"].startswith(titles[0]))
    assert "next token" in pages[first]["text"] and "probability" in pages[first]["text"]
    page = (guide_project / "reports/guide/index.html").read_text()
    commands = [html.unescape(c) for c in re.findall(r'<div class="exercise"><h4>Try it</h4><pre>(.*?)</pre>', page)]
    assert commands, "the chapters have exercises"
    squeezed = "".join(whole.split())
    for command in commands:  # the PDF wraps a long command: compare without the breaks
        assert "".join(command.split()) in squeezed, command


def test_no_pdf_page_is_left_mostly_empty_but_a_chapters_last(guide_project):
    pages = pdf_pages(guide_project / "reports/guide/guide.pdf")
    titles = chapter_titles(guide_project)
    starts = [i for i, p in enumerate(pages) if any(p["text"].startswith(t) for t in titles)]
    assert len(starts) == len(titles)
    last_of_chapter = {s - 1 for s in starts[1:]} | {len(pages) - 1}
    for number, page in enumerate(pages[starts[0]:], starts[0]):
        if number not in last_of_chapter:
            assert page["lowest"] < page["height"] / 2, f"page {number + 1} is more than half empty"


def drawn_font_sizes(guide_project: Path, out: Path, monkeypatch) -> dict[str, float]:
    """Build every chapter's figures again, in this process, and note the smallest text each figure draws (in
    points at the figure's own size): by its file name."""
    import matplotlib.figure
    from matplotlib.backends.backend_agg import RendererAgg

    from llm.configs.data import DataConfig
    from llm.configs.evaluate import EvaluateConfig
    from llm.configs.mlflow import MlflowConfig
    from llm.configs.sft import SFTConfig
    from llm.configs.tokenizer import TokenizerConfig
    from llm.configs.train import TrainConfig
    from llm.guide.build import chapters
    from llm.guide.inputs import GuidePaths, GuideSettings, load_run
    from stages.params import load_params

    drawn: list[float] = []
    by_content: dict[str, float] = {}
    draw_text, savefig = RendererAgg.draw_text, matplotlib.figure.Figure.savefig

    def noting_text(self, gc, x, y, s, prop, *args, **kwargs):
        if str(s).strip():
            drawn.append(prop.get_size_in_points())
        return draw_text(self, gc, x, y, s, prop, *args, **kwargs)

    def noting_figure(self, fname, *args, **kwargs):
        drawn.clear()
        result = savefig(self, fname, *args, **kwargs)
        if isinstance(fname, str | Path) and drawn:
            by_content[hashlib.sha256(Path(fname).read_bytes()).hexdigest()] = min(drawn)
        return result

    monkeypatch.setattr(RendererAgg, "draw_text", noting_text)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", noting_figure)
    project = guide_project
    cfg = load_params(project / "params.yaml", data=DataConfig, tokenizer=TokenizerConfig, train=TrainConfig,
                      evaluate=EvaluateConfig, mlflow=MlflowConfig, sft=SFTConfig)
    paths = GuidePaths(project / "data/raw", project / "metrics/clean.json", project / "metrics/tokenizer.json",
                       project / "data/tokens", project / "models/final", project / "metrics/train.json",
                       project / "plots/train.csv", project / "plots/attention.safetensors",
                       project / "metrics/eval.json", project / "reports/samples.md", out, project / "plays",
                       project / "models/sft", project / "metrics/sft.json", project / "plots/sft.csv")
    run = load_run(paths, GuideSettings(cfg.data, cfg.tokenizer, cfg.train, cfg.evaluate, cfg.mlflow, cfg.sft))
    out.mkdir()
    chapters(run, out, None)
    monkeypatch.undo()
    return {p.name: by_content[hashlib.sha256(p.read_bytes()).hexdigest()] for p in out.glob("*.png")}


def test_no_text_in_a_pdf_figure_is_under_7_points(guide_project, tmp_path, monkeypatch):
    """A figure's text is set in points for the figure at its own size (its PNG's pixels at FIGURE_DPI); placed
    narrower in the PDF, it shrinks by the same factor. The smallest text of each figure, times that factor, must
    be at least SMALLEST_PT."""
    from PIL import Image

    smallest = drawn_font_sizes(guide_project, tmp_path / "figures", monkeypatch)
    sizes = {}
    for name in smallest:
        with Image.open(guide_project / "reports/guide/figures" / name) as image:
            sizes.setdefault(image.size, []).append(name)
    placed = [image for page in pdf_pages(guide_project / "reports/guide/guide.pdf") for image in page["images"]]
    assert {(w, h) for w, h, _ in placed} == set(sizes), "every figure is in the PDF, and only those"
    too_small = {}
    for width, height, placed_pt in placed:
        scale = placed_pt / (width / FIGURE_DPI * 72)
        assert scale <= 1.001, "a figure is never enlarged past its own size"
        for name in sizes[(width, height)]:
            if smallest[name] * scale < SMALLEST_PT - 0.05:  # 7 pt drawn at 0.999 of its size is 7 pt
                too_small[name] = round(smallest[name] * scale, 1)
    assert too_small == {}, f"text under {SMALLEST_PT} pt in the PDF (pt, by figure)"
