"""Chapter 1: what a language model is. Next-token prediction shown on the reader's own validation text with
their model's own probabilities, a page of history, the whole pipeline as one diagram carrying the run's figures,
and a reading path: per chapter, the code that implements it and one thing to try."""

import dataclasses
from pathlib import Path

import torch

from llm.guide.data_chapters import first_document
from llm.guide.document import Chapter, Exercise, Figure, Table, Text, Tokens, literal
from llm.guide.inputs import Run
from llm.plots import plt, save_figure
from llm.tokenizer import token_text

TOP = 8  # next tokens listed with their probabilities
LINE_TOKENS = 6  # the shortest line of the val text the example is taken from

# Where each chapter lives in llm/, by chapter slug (the reading path's middle column).
MODULES = {
    "corpus": "llm/fetch.py, llm/clean.py, llm/split.py",
    "tokenizer": "llm/tokenizer.py",
    "shards": "llm/tokenize.py, llm/shards.py, llm/data.py",
    "model": "llm/model.py",
    "attention": "llm/model.py (CausalSelfAttention)",
    "attention-over-training": "llm/attention.py",
    "training": "llm/train.py, llm/optim.py",
    "generation": "llm/generate.py",
    "sft": "llm/sft.py, llm/chat.py",
    "experiments": "llm/tracking.py",
}


@dataclasses.dataclass(frozen=True)
class NextToken:
    """One position of the reader's val text and what their model predicts there."""

    context: list[int]  # what the model reads: the document from its <|endoftext|>, at most block_size tokens
    line_start: int  # index in `context` where the line shown begins
    target: int  # the token that comes next in the text
    top: list[tuple[int, float]]  # the model's most probable next tokens, most probable first
    target_probability: float
    target_rank: int  # 1: the model's first guess was the right one


def next_token(run: Run) -> NextToken:
    """The model's prediction at one position of the first val document, the softmax of its logits there. The
    model reads a context from the document's middle (in a play, dialogue); the position is the first, in the
    second half of that context, where a word starts at least LINE_TOKENS tokens into a line and the model ranks
    the true next token among its first three guesses (else the context's last position): one place where it
    guesses well, to show what a good guess looks like."""
    document = first_document(run, "val")
    block = run.model.config.block_size
    begin = max(0, min(len(document) // 2, len(document) - block - 1))
    window = document[begin:begin + block + 1].tolist()
    with torch.no_grad():
        logits, _ = run.model(torch.tensor([window[:-1]]))
    # row j of the softmax: the model's next-token probabilities after reading window[:j + 1]; causal, so the
    # same as reading window[:j + 1] alone
    probabilities = logits[0].float().softmax(-1)
    texts = [token_text(run.tokenizer, i) for i in window]
    line_starts = [0] + [j + 1 for j, text in enumerate(texts) if "\n" in text]

    def line_start(position: int) -> int:
        return max(start for start in line_starts if start <= position)

    def rank(position: int) -> int:
        row = probabilities[position - 1]
        return int((row > row[window[position]]).sum()) + 1

    candidates = [j for j in range(max(1, len(window) // 2), len(window))
                  if texts[j].startswith(" ") and j - line_start(j) >= LINE_TOKENS]
    position = next((j for j in candidates if rank(j) <= 3), len(window) - 1)
    row = probabilities[position - 1]
    order = torch.argsort(row, descending=True)
    target = window[position]
    return NextToken(context=window[:position], line_start=line_start(position), target=target,
                     top=[(int(i), float(row[i])) for i in order[:TOP]], target_probability=float(row[target]),
                     target_rank=rank(position))


def probability(value: float) -> str:
    return f"{value:.4f}" if value >= 1e-3 else f"{value:.6f}"


def shown_token(run: Run, token_id: int) -> str:
    """A token as a table cell: its text in quotes, whitespace made visible."""
    text = token_text(run.tokenizer, token_id)
    return '"' + text.replace("\n", "↵").replace("\t", "→") + '"'


def prediction_blocks(run: Run) -> list:
    example = next_token(run)
    line = example.context[example.line_start:]
    vocab = run.tokenizer.get_vocab_size()
    right = "its first guess" if example.target_rank == 1 else f"its guess number {example.target_rank:,}"
    rows = [(f"{rank}", shown_token(run, token_id), probability(p),
             "← the text's next token" if token_id == example.target else "")
            for rank, (token_id, p) in enumerate(example.top, 1)]
    if example.target_rank > TOP:
        rows.append((f"{example.target_rank:,}", shown_token(run, example.target),
                     probability(example.target_probability), "← the text's next token"))
    return [
        Text("A language model does one thing: given a stretch of text cut into tokens, it gives a probability to "
             f"every token of its vocabulary ({vocab:,} of them here) for being the next one. Everything else, "
             "writing a whole reply included, is that one step repeated: pick a token from the probabilities, append "
             "it, ask again. Training is the same step too: at every position of the training text the model is "
             "scored by how much probability it gave the token that really came next, and its weights are nudged "
             "to give that token more."),
        Text("Here is that step on your own data. The tokens below are the start of a line in the middle of the "
             "first document of your validation split (text the model never trained on), cut by your tokenizer. "
             f"The model read them and the {example.line_start:,} tokens before them. "
             + ("The place was chosen as the first, in that stretch, where a word starts and the model ranks the "
                "true next token among its first three guesses: an example of a good guess, not of an average one "
                "(the training chapter has the average)." if example.target_rank <= 3 else
                "Nowhere in that stretch did the model rank the true next token among its first three guesses where "
                "a word starts, so this is simply the stretch's last place.")),
        Tokens([(token_text(run.tokenizer, i), i) for i in line], control=frozenset({run.eot_id})),
        Text(f"Your trained model's probabilities for the token that follows, the softmax of its output at this "
             f"position. The token that really comes next in the text is {literal(shown_token(run, example.target))}"
             f", which the model gives probability {probability(example.target_probability)}: {right} among the "
             f"{vocab:,}. A uniform guess would give every token 1/{vocab:,} = {1 / vocab:.5f}."),
        Table(("rank", "next token", "probability", ""), rows),
    ]


def history_blocks(run: Run) -> list:
    cfg = run.model.config
    return [
        Text("Where this design comes from, in a page. Language models are old: for decades they counted which "
             "word follows which (n-grams), then recurrent neural networks read text one token at a time, carrying "
             "what they had read in a fixed-size state. That state was the bottleneck: by the end of a long "
             "sentence, its beginning had faded, and the reading could not be spread over many processors because "
             "each step waited for the one before."),
        Text("Attention (Bahdanau, Cho and Bengio, 2014, for translation) let the network look back: at each step "
             "it scores every earlier position for relevance, turns the scores into weights that sum to one, and "
             "takes the weighted average of what is stored there. Nothing has to be squeezed through one state. "
             "The Transformer (Vaswani and others, \"Attention is all you need\", 2017) kept only that: no "
             "recurrence at all, just layers of attention and small per-position networks, with the order of the "
             "words given as extra information. Every position of a text is then processed at once, which is what "
             "made training on billions of tokens practical."),
        Text("The 2017 Transformer had two halves, built for translation: an encoder that reads the whole source "
             "sentence, every word seeing every other, and a decoder that writes the translation one token at a "
             "time, each token seeing only the ones before it (a causal mask) plus the encoder's output. A language "
             "model has no source sentence, only text to continue, so GPT (Radford and others, 2018) kept the "
             "decoder alone: a stack of identical blocks of causal self-attention and a per-position network. "
             "Because each position sees only its past, one pass over a training text scores a prediction at every "
             "position at once, and the same network then writes text token by token. GPT-2 (2019) and GPT-3 "
             "(2020) showed that this one recipe keeps improving with more data, parameters and compute; today's "
             "open models (Llama and its relatives) are the same decoder with refined parts."),
        Text(f"Your model is such a decoder: {cfg.n_layer} blocks, {cfg.n_head} attention heads each, vectors of "
             f"{cfg.n_embd} numbers per token, a context of {cfg.block_size} tokens, {run.model.num_params():,} "
             "parameters in all. The model chapter takes it apart."),
    ]


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    made: str  # what the run's stage made, in a few words with its numbers (drawn in the diagram's box)


def pipeline_stages(run: Run, chapters: int) -> list[Stage]:
    """The eight stages and what each made in this run, from their metrics and meta.json."""
    files = [p for p in run.paths.raw.rglob("*") if p.is_file()]
    clean, splits, train = run.clean, run.meta.splits, run.train_metrics
    sft = (f"{run.sft.metrics['steps']:,} steps;\n{len(run.sft.metrics['tasks'])} tasks scored" if run.sft
           else "not run yet")
    return [
        Stage("fetch", f"{len(files):,} files,\n{sum(p.stat().st_size for p in files) / 1e6:.1f} MB"),
        Stage("clean", f"{clean['documents_out']:,} of {clean['documents_in']:,}\ndocuments kept"),
        Stage("tokenizer", f"vocabulary of\n{run.tokenizer.get_vocab_size():,} tokens"),
        Stage("tokenize", f"{splits['train'].tokens:,} train,\n{splits['val'].tokens:,} val tokens"),
        Stage("train", f"{run.model.num_params():,} parameters,\n{train['steps']:,} steps"),
        Stage("evaluate", f"val: {run.eval_metrics['val_bpb']:.4f}\nbits per byte"),
        Stage("sft", sft),
        Stage("guide", f"this guide:\n{chapters} chapters"),
    ]


def pipeline_figure(stages: list[Stage], path: Path) -> None:
    """The stages as boxes in two rows of four, joined by arrows in the order they run, each box its stage's
    name over what it made. Drawn a little narrower than the PDF's text width (6.85 in), so that it is set at its
    own size there, with no text under 8 pt."""
    fig, ax = plt.subplots(figsize=(6.7, 3.0))
    ax.set_xlim(0, 4)
    ax.set_ylim(0, 2)
    ax.axis("off")
    width, height = 0.8, 0.72
    centres = [(0.5 + i % 4, 1.5 - i // 4) for i in range(len(stages))]
    for (x, y), stage in zip(centres, stages, strict=True):
        ax.add_patch(plt.Rectangle((x - width / 2, y - height / 2), width, height, facecolor="#eaf1fb",
                                   edgecolor="#4c72b0", linewidth=1.2))
        ax.text(x, y + 0.2, stage.name, ha="center", va="center", fontsize=10, fontweight="bold")
        ax.text(x, y - 0.1, stage.made, ha="center", va="center", fontsize=8, linespacing=1.3)
    arrow = {"arrowstyle": "-|>", "color": "#333", "linewidth": 1.2, "shrinkA": 0, "shrinkB": 0}
    for (x0, y0), (x1, y1) in zip(centres, centres[1:], strict=False):
        if y0 == y1:
            ax.annotate("", (x1 - width / 2, y1), (x0 + width / 2, y0), arrowprops=arrow)
        else:  # from the end of the top row down, across and down to the start of the bottom one
            between = (y0 + y1) / 2
            ax.plot([x0, x0, x1], [y0 - height / 2, between, between], color="#333", linewidth=1.2)
            ax.annotate("", (x1, y1 + height / 2), (x1, between), arrowprops=arrow)
    fig.tight_layout(pad=0.2)
    save_figure(fig, path)


def pipeline_blocks(run: Run, figure_dir: Path, later: list[Chapter]) -> list:
    stages = pipeline_stages(run, len(later) + 1)
    pipeline_figure(stages, figure_dir / "pipeline.png")
    return [
        Text("The pipeline that made your model is eight stages, each a command (`python -m stages NAME`) that "
             "DVC runs when its inputs, code or params changed (`dvc repro`). Each box below is a stage, with what "
             "it made in your run; the chapters that follow go through them in this order."),
        Figure("figures/pipeline.png", "The stages of the pipeline in the order they run, each with what it made in "
                                       "this run."),
        Table(("stage", "what it made in your run"), [(s.name, s.made.replace("\n", " ")) for s in stages]),
    ]


def first_exercise(chapter: Chapter) -> str:
    return next((b.command for b in chapter.blocks if isinstance(b, Exercise)), "")


def reading_path(later: list[Chapter]) -> list:
    rows = [(f"{i}. {c.title}", MODULES.get(c.slug, ""), first_exercise(c)) for i, c in enumerate(later, 2)]
    return [
        Text("A reading path: each chapter, the code in `llm/` that does what it explains (the `stages/` command "
             "of the same name only reads params and calls it), and one thing to try on your own pipeline. Every "
             "chapter ends with its exercises: the exact command, what to look at afterwards and what to expect; "
             "once you have run one, the next build of this guide shows your result beside the default."),
        Table(("chapter", "code", "try"), rows),
    ]


def intro_chapter(run: Run, figure_dir: Path, later: list[Chapter]) -> Chapter:
    """The first chapter; `later` are the chapters after it (the reading path lists them and their exercises)."""
    blocks = [*prediction_blocks(run), *history_blocks(run), *pipeline_blocks(run, figure_dir, later),
              *reading_path(later)]
    return Chapter("language-model", "What a language model is", blocks)
