"""The guide as a document: chapters made of a few kinds of block, written as one HTML page and one PDF.

The PDF is made with fpdf2: pure Python (no Cairo, Pango or browser to install, unlike WeasyPrint or printing
the HTML from Chromium), maintained, and it embeds the PNG figures and TrueType fonts directly. The fonts
are the DejaVu faces matplotlib ships, so every machine that draws the figures can also set the text.
"""

import dataclasses
import html
import logging
import re
from pathlib import Path

from llm.fileio import atomic_path


@dataclasses.dataclass(frozen=True)
class Text:
    """A paragraph; `code` in backquotes."""

    text: str


@dataclasses.dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class Figure:
    file: str  # relative to the guide's folder: figures/NAME.png
    caption: str


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Text as the tokenizer cut it: (what the token stands for, its id) in order; control tokens are marked."""

    spans: list[tuple[str, int]]
    control: frozenset[int] = frozenset()
    # A conversation's loss mask (llm.chat.EncodedConversation.trained), one per span: each token is coloured as
    # trained or masked instead of by turns of the palette; None: no mask to show.
    trained: tuple[bool, ...] | None = None

    def colour(self, index: int) -> str:
        if self.trained is not None:
            return TRAINED_COLOUR if self.trained[index] else MASKED_COLOUR
        return SPAN_COLOURS[index % len(SPAN_COLOURS)]


@dataclasses.dataclass(frozen=True)
class Pre:
    """Monospaced text: a hex dump, a sample."""

    text: str
    prompt_chars: int = 0  # a sample: its first this many characters are the prompt, set in bold


@dataclasses.dataclass(frozen=True)
class Aside:
    """A boxed digression the main text does not depend on (the modern parts of a block, say), titled."""

    title: str
    paragraphs: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Exercise:
    """Something to try on the reader's own pipeline: the exact command, what to look at afterwards and what to
    expect. `overrides` are the params the command sets (key -> value, as `dvc exp run -S` writes them), so a
    later build of the guide can find the reader's run of it; `result` is what that run gave, once there is one."""

    command: str
    look: str
    expect: str
    overrides: tuple[tuple[str, str], ...] = ()
    result: str | None = None


Block = Text | Table | Figure | Tokens | Pre | Aside | Exercise


@dataclasses.dataclass(frozen=True)
class Chapter:
    slug: str  # the HTML anchor
    title: str
    blocks: list[Block]


def visible(text: str) -> str:
    """Whitespace a reader can see inside a token: newline, tab, and (as the only content) a space."""
    return text.replace("\n", "↵").replace("\t", "→").replace("\r", "␍")


SPAN_COLOURS = ["#fde2a7", "#c9e7f5", "#d6f0c8", "#f6cde0", "#e0d7f5", "#f9d3b8"]  # pale, readable under text
TRAINED_COLOUR, MASKED_COLOUR = "#a8e0a0", "#e4e4e4"  # a loss mask: green where the loss counts, grey where not

CSS = """
body { font-family: DejaVu Sans, Verdana, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       line-height: 1.5; color: #222; overflow-wrap: break-word; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ccc; margin-top: 3rem; }
nav ol { columns: 2; } figure { margin: 1.5rem 0; }
.scroll { overflow-x: auto; max-width: 100%; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.9rem; color: #555; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } code, pre { font-family: DejaVu Sans Mono, monospace; font-size: 0.85rem; }
code { overflow-wrap: anywhere; } td code { overflow-wrap: normal; }
pre { background: #f7f7f7; padding: 0.7rem; overflow-x: auto; white-space: pre-wrap; overflow-wrap: anywhere; }
.tokens { line-height: 2.6; } .tok { display: inline-block; line-height: 1.4; white-space: pre-wrap;
        overflow-wrap: anywhere; max-width: 100%; padding: 0.15rem 0.1rem; margin: 0 1px 0.3rem 0;
        border-radius: 3px; }
.tok sub { font-size: 0.6rem; color: #555; margin-left: 0.1rem; } .control { outline: 2px solid #c00; }
aside { border-left: 4px solid #8fb3d9; background: #f2f7fc; padding: 0.3rem 1rem; margin: 1rem 0; }
.exercise { border: 1px solid #b7d7a8; background: #f5fbf2; padding: 0.3rem 1rem; margin: 1rem 0; }
.exercise pre { background: #fff; }
@media (max-width: 40rem) { nav ol { columns: 1; } body { margin: 1rem auto; } }
"""


# A backquote that is a character of the text, not a mark of `code`: a private-use character, which no text of
# ours holds, put in by `literal` and turned back into a backquote as the page or the PDF is written.
_BACKQUOTE = "\ue000"


def literal(text: str) -> str:
    """`text` (a prompt, a sample: what a user or the model wrote) for a Text paragraph, its backquotes shown as
    they are rather than read as `code` marks."""
    return text.replace("`", _BACKQUOTE)


def _inline(text: str) -> str:
    """A paragraph's HTML: escaped, `code` set as code."""
    parts = re.split(r"`([^`]*)`", text)
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p)
                   for i, p in enumerate(parts)).replace(_BACKQUOTE, "`")


# The shortest a figure is drawn on the page, in CSS pixels: a wide figure shrunk to a phone's width would be a
# strip too thin to read, so below this it keeps its height and scrolls sideways inside its frame instead (and a
# figure drawn shorter than this is enlarged to it).
MIN_FIGURE_PX = 160


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def _figure_html(block: Figure, folder: Path) -> str:
    """The image at the page's width (at most its own), never under MIN_FIGURE_PX tall, and a link to it at full
    size, where a reader zooms into a dense figure."""
    width, height = _image_size(folder / block.file)
    caption, src = html.escape(block.caption), html.escape(block.file)
    least = -(-MIN_FIGURE_PX * width // height)  # the width at which it is MIN_FIGURE_PX tall (a short one grows)
    image = (f'<img src="{src}" alt="{caption}" width="{width}" height="{height}" '
             f'style="min-width:{least}px">')
    return (f'<figure><div class="scroll"><a href="{src}" title="the figure at full size">{image}</a></div>'
            f"<figcaption>{caption}</figcaption></figure>")


def _block_html(block: Block, folder: Path) -> str:
    if isinstance(block, Text):
        return f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows)
        # a wide table scrolls inside its frame: the page itself never gets wider than the screen
        return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    if isinstance(block, Figure):
        return _figure_html(block, folder)
    if isinstance(block, Tokens):
        masks = ["" if block.trained is None else " trained" if trained else " masked"
                 for trained in (block.trained or [None] * len(block.spans))]
        spans = "".join(
            f'<span class="tok{" control" if token_id in block.control else ""}{masks[i]}" '
            f'style="background:{block.colour(i)}" title="id {token_id}">'
            f"{html.escape(visible(text))}<sub>{token_id}</sub></span>"
            for i, (text, token_id) in enumerate(block.spans))
        return f'<p class="tokens">{spans}</p>'
    if isinstance(block, Aside):
        paragraphs = "".join(f"<p>{_inline(text)}</p>" for text in block.paragraphs)
        return f"<aside><h4>{html.escape(block.title)}</h4>{paragraphs}</aside>"
    if isinstance(block, Exercise):
        result = f"<p><strong>Your run:</strong> {_inline(block.result)}</p>" if block.result else ""
        return (f'<div class="exercise"><h4>Try it</h4><pre>{html.escape(block.command)}</pre>'
                f"<p><strong>Then look at:</strong> {_inline(block.look)}</p>"
                f"<p><strong>Expect:</strong> {_inline(block.expect)}</p>{result}</div>")
    prompt = f"<b>{html.escape(block.text[:block.prompt_chars])}</b>" if block.prompt_chars else ""
    return f"<pre>{prompt}{html.escape(block.text[block.prompt_chars:])}</pre>"


def write_html(path: Path, title: str, subtitle: str, chapters: list[Chapter]) -> None:
    """One page: a table of contents, then a section per chapter with its figures beside the text."""
    toc = "".join(f'<li><a href="#{c.slug}">{html.escape(c.title)}</a></li>' for c in chapters)
    sections = "".join(
        f'<section id="{c.slug}"><h2>{i}. {html.escape(c.title)}</h2>'
        + "".join(_block_html(b, path.parent) for b in c.blocks) + "</section>"
        for i, c in enumerate(chapters, 1))
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><style>{CSS}</style></head><body>'
            f"<header><h1>{html.escape(title)}</h1><p>{_inline(subtitle)}</p>"
            f'<p>The same guide as one printable file: <a href="guide.pdf">guide.pdf</a>.</p>'
            f"<nav><ol>{toc}</ol></nav></header>{sections}</body></html>\n")
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")


# --- the PDF -----------------------------------------------------------------------------------------------

def _fonts_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


FIGURE_DPI = 110  # what llm.plots.save_figure draws at, for a PNG that does not say
# A figure that nearly fits the rest of a page is shrunk to fit (by at most this factor) rather than leave the
# space empty; one that fits less waits for the next page while the paragraphs after it fill this one.
NEARLY_FITS = 0.9


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


class _Pdf:
    """fpdf2 with this guide's fonts and the few layouts its blocks need."""

    def __init__(self, folder: Path) -> None:
        from fpdf import FPDF

        logging.getLogger("fontTools").setLevel(logging.WARNING)  # its font subsetting logs every glyph

        self.folder = folder
        self.pdf = FPDF(format="A4")
        self.pdf.set_margins(18, 16, 18)
        self.pdf.set_auto_page_break(True, margin=16)
        fonts = _fonts_dir()
        self.pdf.add_font("Sans", "", fonts / "DejaVuSans.ttf")
        self.pdf.add_font("Sans", "B", fonts / "DejaVuSans-Bold.ttf")
        self.pdf.add_font("Mono", "", fonts / "DejaVuSansMono.ttf")
        self.pdf.add_font("Mono", "B", fonts / "DejaVuSansMono-Bold.ttf")

    def heading(self, text: str, size: int) -> None:
        self.pdf.set_font("Sans", "B", size)
        self.pdf.multi_cell(0, size * 0.5, text, new_x="LMARGIN", new_y="NEXT")
        self.pdf.ln(3)

    def paragraph(self, text: str, size: float = 10) -> None:
        self.pdf.set_font("Sans", "", size)
        self.pdf.multi_cell(0, 5, text.replace("`", "").replace(_BACKQUOTE, "`"), new_x="LMARGIN", new_y="NEXT")
        self.pdf.ln(2)

    def table(self, block: Table) -> None:
        self.pdf.set_font("Sans", "", 7.5)
        with self.pdf.table(line_height=4, text_align="LEFT", first_row_as_headings=True) as table:
            for row in [block.header, *block.rows]:
                cells = table.row()
                for value in row:
                    cells.cell(value)
        self.pdf.ln(3)

    def figure_size(self, block: Figure) -> tuple[float, float]:
        """Width and height (mm) of a figure at its natural size, the size its fonts were set for (the PNG's own
        dpi), shrunk only to fit the text width and most of a page."""
        from PIL import Image

        with Image.open(self.folder / block.file) as image:
            (width_px, height_px), dpi = image.size, image.info.get("dpi", (FIGURE_DPI,))[0]
        width = min(self.pdf.epw, width_px / dpi * 25.4)
        height = width * height_px / width_px
        if height > 0.8 * self.pdf.eph:
            height = 0.8 * self.pdf.eph
            width = height * width_px / height_px
        return width, height

    def caption_height(self, block: Figure) -> float:
        self.pdf.set_font("Sans", "", 8)
        return self.pdf.multi_cell(0, 4, block.caption, dry_run=True, output="HEIGHT") + 3

    def room(self) -> float:
        """Height (mm) left on the page."""
        return self.pdf.page_break_trigger - self.pdf.get_y()

    def at_page_top(self) -> bool:
        return self.pdf.get_y() <= self.pdf.t_margin + 1

    def figure(self, block: Figure, *, anywhere: bool = True) -> bool:
        """Place the figure here if it fits what is left of the page, shrunk by at most NEARLY_FITS; else, when
        `anywhere`, at the top of a new page. Returns whether it was placed."""
        width, height = self.figure_size(block)
        caption = self.caption_height(block)
        if height + caption > self.room() and not self.at_page_top():
            scale = (self.room() - caption) / height
            if scale >= NEARLY_FITS:
                width, height = width * scale, height * scale
            elif anywhere:
                self.pdf.add_page()
            else:
                return False
        path = self.folder / block.file
        self.pdf.image(str(path), x=self.pdf.l_margin + (self.pdf.epw - width) / 2, w=width, h=height)
        self.pdf.set_font("Sans", "", 8)
        self.pdf.multi_cell(0, 4, block.caption, new_x="LMARGIN", new_y="NEXT", align="C")
        self.pdf.ln(3)
        return True

    def paragraph_fits(self, text: str, size: float = 10) -> bool:
        self.pdf.set_font("Sans", "", size)
        lines = self.pdf.multi_cell(0, 5, text.replace("`", "").replace(_BACKQUOTE, "`"), dry_run=True,
                                    output="HEIGHT")
        return lines + 2 <= self.room()

    def tokens(self, block: Tokens) -> None:
        pdf = self.pdf
        pdf.ln(1)
        for i, (text, token_id) in enumerate(block.spans):
            label = visible(text) or " "
            pdf.set_font("Mono", "", 9)
            width = max(pdf.get_string_width(label), 4) + 1.5
            if pdf.get_x() + width > pdf.l_margin + pdf.epw:
                pdf.ln(10)
            if pdf.get_y() + 10 > pdf.page_break_trigger:
                pdf.add_page()
            x, y = pdf.get_x(), pdf.get_y()
            pdf.set_fill_color(*_hex(block.colour(i)))
            pdf.set_draw_color(*((200, 0, 0) if token_id in block.control else (255, 255, 255)))
            pdf.cell(width, 5.5, label, border=1, fill=True, align="C")
            pdf.set_xy(x, y + 5.5)
            pdf.set_font("Sans", "", 5.5)
            pdf.cell(width, 3, str(token_id), align="C")
            pdf.set_xy(x + width + 0.4, y)
        pdf.set_draw_color(0, 0, 0)
        pdf.ln(12)

    def pre(self, block: Pre) -> None:
        if block.prompt_chars:  # the prompt in bold, then the rest: write() flows on where the prompt ends
            self.pdf.set_font("Mono", "B", 7)
            self.pdf.write(3.5, block.text[:block.prompt_chars])
            self.pdf.set_font("Mono", "", 7)
            self.pdf.write(3.5, block.text[block.prompt_chars:])
            self.pdf.ln(6.5)
            return
        self.pdf.set_font("Mono", "", 7)
        self.pdf.set_fill_color(245, 245, 245)
        self.pdf.multi_cell(0, 3.5, block.text, fill=True, new_x="LMARGIN", new_y="NEXT")
        self.pdf.ln(3)


def _write_block(doc: _Pdf, block: Block) -> None:
    if isinstance(block, Text):
        doc.paragraph(block.text)
    elif isinstance(block, Table):
        doc.table(block)
    elif isinstance(block, Figure):
        doc.figure(block)
    elif isinstance(block, Tokens):
        doc.tokens(block)
    elif isinstance(block, Aside):
        doc.paragraph(f"Aside: {block.title}", size=9.5)
        for text in block.paragraphs:
            doc.paragraph(text, size=9)
    elif isinstance(block, Exercise):
        doc.paragraph("Try it:", size=9.5)
        doc.pre(Pre(block.command))
        doc.paragraph(f"Then look at: {block.look}", size=9)
        doc.paragraph(f"Expect: {block.expect}", size=9)
        if block.result:
            doc.paragraph(f"Your run: {block.result}", size=9)
    else:
        doc.pre(block)


def _write_chapter(doc: _Pdf, blocks: list[Block]) -> None:
    """The blocks in order, except that a figure too tall for the rest of its page floats to the top of the next
    while the paragraphs after it fill this one, as a book sets figures; no page is left mostly empty for it."""
    waiting: Figure | None = None
    for block in blocks:
        if isinstance(block, Figure) and block.file.endswith(".gif"):
            continue  # an animation does not print: its chapter shows its frames as a filmstrip beside it
        if waiting is not None:
            if isinstance(block, Text) and doc.paragraph_fits(block.text):
                doc.paragraph(block.text)
                continue
            doc.figure(waiting)
            waiting = None
        if isinstance(block, Figure):
            if not doc.figure(block, anywhere=False):
                waiting = block
            continue
        _write_block(doc, block)
    if waiting is not None:
        doc.figure(waiting)


def write_pdf(path: Path, folder: Path, title: str, subtitle: str, chapters: list[Chapter]) -> None:
    """The same chapters as the HTML, each starting on a new page (an outline entry each); figures from
    `folder`, at their natural size where the page allows."""
    doc = _Pdf(folder)
    doc.pdf.set_title(title)
    doc.pdf.add_page()
    doc.heading(title, 20)
    doc.paragraph(subtitle)
    for i, chapter in enumerate(chapters, 1):
        doc.paragraph(f"{i}. {chapter.title}")
    for i, chapter in enumerate(chapters, 1):
        doc.pdf.add_page()
        doc.pdf.start_section(f"{i}. {chapter.title}")
        doc.heading(f"{i}. {chapter.title}", 15)
        _write_chapter(doc, chapter.blocks)
    with atomic_path(path) as tmp:
        doc.pdf.output(str(tmp))
