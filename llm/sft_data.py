"""The built-in conversation set: instruction-tuning conversations and held-out questions generated from the cleaned
corpus (data/clean/), with no network, no model and no judge.

Each document is a play, or a poem (the sonnets, ...). A play is read as speeches: a heading line naming the
speaker ("HAMLET." or "Ham.", or an upper-case name alone) and the lines under it, paragraphs apart; stage
directions in [brackets], ACT and SCENE headings and other paragraphs end a run of consecutive speeches. A heading
counts only for a name that heads MIN_SPEAKER_SPEECHES speeches of the document, so that a line of verse that
looks like a name ("Farewell.") is not taken for one. Documents without speeches (poems) give no task and are
counted as `other_documents`.

The plays are split by a hash of their id salted with sft.seed: held-out plays give only held-out questions, the
others only training conversations, so no held-out play's text is in training. The tasks (TASKS):

  reading comprehension, a passage of 2-5 consecutive short speeches in the prompt:
    first_speaker    who speaks first
    next_speaker     who speaks right after NAME (NAME speaks once in the passage)
    who_said         which character says "<a line of the passage>" (the line occurs once in it)
    speech_count     how many speeches the passage holds (2, 3, 4 or 5)
  knowledge from pretraining, nothing of the answer in the prompt; "well-known" lines are approximated by a
  fixed rule (well_known_lines): the first line of a speech by one of the play's four most frequent speakers,
  of 6 to 14 words, found once in all the plays:
    play_of_line     which play the line comes from (the play's title, its document's first line)
    speaker_of_line  who speaks the line, in the named play (the candidates: those four speakers, so that the
                     answer is not told apart by being a main speaker)
  writing:
    verse_in_voice   write N (2-4) lines of verse in the voice of NAME from a play; the answer is a speech in the
                     play's own format: the heading "NAME." then N lines (a real speech's first N verse lines).

Every answer is an exact string: a speaker as its heading shows it without the final period ("MRS. PAGE"), a
count in digits, a play's title as written. A question also has its candidates: the answer and others of the
same kind (the passage's speakers first, then other speakers of the play; other titles), sft.candidates of
them in a seeded order, chance = 1 / their number; speech_count's candidates are the four counts. The
instructions are drawn from several phrasings per task (TEMPLATES).

A generated conversation or question that does not fit the context (the `fits` check, with the longest
candidate as its answer) is dropped, counted as `too_long` by task, and another is drawn.
"""

import dataclasses
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable

from tokenizers import Tokenizer

from llm import chat
from llm.chat import ChatTokens, Conversation, Message, encode_conversation
from llm.configs.sft import SFTConfig
from llm.errors import ConfigError
from llm.split import is_val

READING_TASKS = ("first_speaker", "next_speaker", "who_said", "speech_count")
KNOWLEDGE_TASKS = ("play_of_line", "speaker_of_line")
WRITING_TASKS = ("verse_in_voice",)
TASKS = READING_TASKS + KNOWLEDGE_TASKS + WRITING_TASKS

MIN_SPEAKER_SPEECHES = 3  # a heading names a speaker only if it heads this many speeches of the document
MAX_HEADING_CHARS = 40
SECTION_WORDS = frozenset({"ACT", "SCENE", "PROLOGUE", "EPILOGUE", "INDUCTION"})  # headings that are no speaker
# A passage: consecutive speeches, each short, so that it fits a 256-token context with the question.
MIN_SPEECHES, MAX_SPEECHES = 2, 5
MAX_SPEECH_LINES, MAX_SPEECH_CHARS, MAX_PASSAGE_CHARS = 4, 200, 560
MAIN_SPEAKERS = 4  # well-known lines, their candidates and writing prompts come from a play's most frequent speakers
SPEAKER_POOL = 8  # other candidates, beyond those a passage or the main speakers give, come from these
WELL_KNOWN_WORDS = (6, 14)
MIN_QUOTED_WORDS = 3  # who_said quotes a line of at least this many words
VERSE_LINES = (2, 4)  # verse_in_voice asks for this many lines, at least and at most
MAX_VERSE_LINE_CHARS = 60  # a verse line: starts with a capital, is at most this long (prose runs to the margin)
DRAW_TRIES = 20  # draws per wanted item before a task gives up on a set of plays

_NAME = re.compile(r"(?:[0-9]+ )?[A-Z][A-Za-z'\-]*\.?(?: (?:[A-Z][A-Za-z'\-]*\.?|of|and|the|de|la|le|du))*")
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}

# A question writes a character's name in quotes. A byte-level BPE token carries the space before it: " MENENIUS"
# is other tokens than the heading "MENENIUS." at a line's start (here ĠM EN ENIUS against MENENIUS), so a small model
# cannot find the name it is asked about by matching tokens, and answers with a name it knows instead. After a quote
# the name has its heading's tokens.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "first_speaker": (
        "{passage}\n\nWho speaks first in this passage?",
        "Read this passage from a play.\n\n{passage}\n\nWhich character speaks first?",
        "Here is part of a scene:\n\n{passage}\n\nName the first speaker.",
        "{passage}\n\nQuestion: who is the first to speak above?",
    ),
    "next_speaker": (
        "{passage}\n\nWho speaks right after \"{name}\"?",
        "Read this passage from a play.\n\n{passage}\n\nWhich character speaks next after \"{name}\"?",
        "Here is part of a scene:\n\n{passage}\n\nWho answers \"{name}\"?",
        "{passage}\n\nQuestion: in the passage above, who speaks after \"{name}\"?",
    ),
    "who_said": (
        "{passage}\n\nWho says \"{line}\"?",
        "Read this passage from a play.\n\n{passage}\n\nWhich character says \"{line}\"?",
        "Here is part of a scene:\n\n{passage}\n\nWho speaks the line \"{line}\"?",
        "{passage}\n\nQuestion: which speaker says \"{line}\"?",
    ),
    "speech_count": (
        "{passage}\n\nHow many speeches are in this passage?",
        "Read this passage from a play.\n\n{passage}\n\nHow many speeches does it hold? Answer with a number.",
        "Here is part of a scene:\n\n{passage}\n\nCount the speeches.",
        "{passage}\n\nQuestion: how many times does a character speak above?",
    ),
    "play_of_line": (
        "Which play is this line from: \"{line}\"?",
        "\"{line}\"\n\nName the play this line comes from.",
        "In which of Shakespeare's plays is this line spoken: \"{line}\"?",
        "Question: what play is \"{line}\" from?",
    ),
    "speaker_of_line": (
        "In {title}, who says \"{line}\"?",
        "\"{line}\"\n\nWhich character says this in {title}?",
        "Who speaks this line in {title}: \"{line}\"?",
        "Question: in {title}, which character speaks the line \"{line}\"?",
    ),
    "verse_in_voice": (
        "Write {n} lines of verse in the voice of \"{name}\" from {title}.",
        "Compose {n_word} lines as \"{name}\" might speak them in {title}.",
        "Give me a speech of {n} lines for \"{name}\", in the style of {title}.",
        "As \"{name}\" from {title}, speak {n_word} lines of verse.",
    ),
}


@dataclasses.dataclass(frozen=True)
class Speech:
    speaker: str  # as its heading names it, without the final period: "HAMLET", "Ham", "MRS. PAGE"
    lines: tuple[str, ...]  # stripped, non-empty; lines that are only a [stage direction] left out
    run: int  # speeches with the same run follow each other in the play with nothing between them


@dataclasses.dataclass(frozen=True)
class Play:
    doc_id: str
    title: str  # the document's first line: "HAMLET, PRINCE OF DENMARK"
    speeches: tuple[Speech, ...]

    def speakers_by_count(self) -> list[str]:
        """Speakers, the most frequent first (ties by first appearance)."""
        return [name for name, _ in Counter(speech.speaker for speech in self.speeches).most_common()]


@dataclasses.dataclass(frozen=True)
class Question:
    task: str
    messages: tuple[Message, ...]  # the prompt, without the answer: one user turn
    answer: str
    # multiple choice: the answer among others, in a seeded order; None: the reply is generated (writing), and
    # `answer` is a reference of the right shape
    candidates: tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class SFTSet:
    train: list[Conversation]  # the tasks in equal shares, in a seeded order
    questions: dict[str, list[Question]]  # by task, from the held-out plays only
    shots: dict[str, list[Conversation]]  # by task: sft.shots of its shortest training conversations (few-shot)
    counts: dict[str, int]  # plays, held-out plays, other documents, and what was dropped, by reason and task


@dataclasses.dataclass(frozen=True)
class _Item:
    """One generated prompt, its answer and (multiple choice) candidates."""

    prompt: str
    answer: str
    candidates: tuple[str, ...] | None


def speaker_heading(line: str) -> str | None:
    """The speaker a paragraph's first line names ("Ham." -> "Ham"), or None when it is no heading. A name in
    mixed case must end with a period (a line of verse may be one capitalised word); one in upper case need not
    (some plays head speeches "THESEUS")."""
    if len(line) > MAX_HEADING_CHARS or not _NAME.fullmatch(line):
        return None
    if not line.endswith(".") and line.upper() != line:
        return None
    name = line.removesuffix(".")
    first = name.split()[0]
    if first.upper() in SECTION_WORDS or re.fullmatch(r"[IVXLC]+", first):
        return None
    return name


def parse_play(doc_id: str, text: str) -> Play | None:
    """The speeches of a document, or None when it has fewer than two speakers (a poem)."""
    paragraphs = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        head, *rest = paragraph.split("\n")
        lines = tuple(kept for line in rest if (kept := line.strip()) and not re.fullmatch(r"\[.*\]", kept))
        paragraphs.append((speaker_heading(head.rstrip()), lines))
    heads = Counter(name for name, lines in paragraphs if name and lines)
    speeches, run = [], 0
    for name, lines in paragraphs:
        if name and lines and heads[name] >= MIN_SPEAKER_SPEECHES:
            speeches.append(Speech(name, lines, run))
        else:
            run += 1
    if len({speech.speaker for speech in speeches}) < 2:
        return None
    title = next((line.strip() for line in text.splitlines() if line.strip()), doc_id)
    return Play(doc_id, title, tuple(speeches))


def render_passage(speeches: Iterable[Speech]) -> str:
    """Speeches as the corpus writes them: "NAME.", its lines, a blank line between speeches."""
    return "\n\n".join(f"{speech.speaker}.\n" + "\n".join(speech.lines) for speech in speeches)


def is_heldout(doc_id: str, cfg: SFTConfig) -> bool:
    """A play kept for held-out questions: the split's keyed hash (llm/split.py) of the id, prefixed so that the
    choice is independent of data's train/val split even when sft.seed equals data.seed."""
    return is_val(f"sft:{doc_id}", cfg.seed, cfg.heldout_fraction)


class _PlayTasks:
    """What one play offers each task: passages by length, well-known lines, verse speeches by speaker."""

    def __init__(self, play: Play, corpus_lines: Counter) -> None:
        self.play = play
        speeches = play.speeches
        ranked = play.speakers_by_count()
        self.main_speakers, self.speaker_pool = ranked[:MAIN_SPEAKERS], ranked[:SPEAKER_POOL]
        self.windows: dict[int, list[int]] = {length: [] for length in range(MIN_SPEECHES, MAX_SPEECHES + 1)}
        for start in range(len(speeches)):
            chars = 0
            for length in range(1, MAX_SPEECHES + 1):
                end = start + length
                if end > len(speeches) or speeches[end - 1].run != speeches[start].run:
                    break
                speech = speeches[end - 1]
                chars += sum(map(len, speech.lines))
                if len(speech.lines) > MAX_SPEECH_LINES or sum(map(len, speech.lines)) > MAX_SPEECH_CHARS \
                        or chars > MAX_PASSAGE_CHARS:
                    break
                if length >= MIN_SPEECHES:
                    self.windows[length].append(start)
        self.well_known = well_known_lines(play, self.main_speakers, corpus_lines)
        self.verse: dict[str, list[tuple[str, ...]]] = {name: [] for name in self.main_speakers}
        for speech in speeches:
            if speech.speaker in self.verse:
                verse = tuple(line for line in speech.lines[:VERSE_LINES[1]] if _is_verse(line))
                if len(verse) >= VERSE_LINES[0] and verse == speech.lines[:len(verse)]:
                    self.verse[speech.speaker].append(verse)

    def passage(self, rng: random.Random, length: int | None = None) -> tuple[Speech, ...] | None:
        length = length or rng.randint(MIN_SPEECHES, MAX_SPEECHES)
        starts = self.windows[length]
        if not starts:
            return None
        start = rng.choice(starts)
        return self.play.speeches[start:start + length]


def _is_verse(line: str) -> bool:
    return line[:1].isupper() and len(line) <= MAX_VERSE_LINE_CHARS and len(line.split()) >= MIN_QUOTED_WORDS


def line_counts(plays: Iterable[Play]) -> Counter:
    """How often each line occurs in all the plays' speeches."""
    return Counter(line for play in plays for speech in play.speeches for line in speech.lines)


def well_known_lines(play: Play, main_speakers: list[str], occurrences: Counter) -> list[tuple[str, str]]:
    """(speaker, line) pairs standing in for a play's well-known lines: the first line of a speech by one of its
    main speakers, WELL_KNOWN_WORDS words long, that occurs once in all the plays (`occurrences`: line_counts),
    so that its play and speaker are one."""
    low, high = WELL_KNOWN_WORDS
    return [(speech.speaker, speech.lines[0]) for speech in play.speeches
            if speech.speaker in main_speakers and low <= len(speech.lines[0].split()) <= high
            and occurrences[speech.lines[0]] == 1]


def _choices(answer: str, first: Iterable[str], pool: Iterable[str], count: int, rng: random.Random) -> tuple[str, ...]:
    """`count` candidates: the answer, then others from `first` (drawn), then from `pool` (drawn), shuffled."""
    others: list[str] = []
    for group in (first, pool):
        fresh = sorted({name for name in group if name != answer and name not in others})
        rng.shuffle(fresh)
        others.extend(fresh[:count - 1 - len(others)])
    chosen = [answer, *others]
    rng.shuffle(chosen)
    return tuple(chosen)


def _template(task: str, rng: random.Random, **fields: object) -> str:
    return rng.choice(TEMPLATES[task]).format(**fields)


def _reading_item(task: str, tasks: _PlayTasks, k: int, rng: random.Random) -> _Item | None:
    """A reading-comprehension item on a passage drawn from the play, or None when the draw gives none."""
    speeches = tasks.passage(rng)
    if speeches is None:
        return None
    passage, names = render_passage(speeches), [speech.speaker for speech in speeches]
    if task == "first_speaker":
        return _Item(_template(task, rng, passage=passage), names[0],
                     _choices(names[0], names, tasks.speaker_pool, k, rng))
    if task == "next_speaker":
        once = [i for i, name in enumerate(names[:-1]) if names.count(name) == 1]
        if not once:
            return None
        i = rng.choice(once)
        return _Item(_template(task, rng, passage=passage, name=names[i]), names[i + 1],
                     _choices(names[i + 1], names, tasks.speaker_pool, k, rng))
    if task == "who_said":
        lines = [line for speech in speeches for line in speech.lines]
        quotable = [(speech.speaker, line) for speech in speeches for line in speech.lines
                    if len(line.split()) >= MIN_QUOTED_WORDS and lines.count(line) == 1 and '"' not in line]
        if not quotable:
            return None
        speaker, line = rng.choice(quotable)
        return _Item(_template(task, rng, passage=passage, line=line), speaker,
                     _choices(speaker, names, tasks.speaker_pool, k, rng))
    counts = [str(n) for n in range(MIN_SPEECHES, MAX_SPEECHES + 1)]  # speech_count
    return _Item(_template(task, rng, passage=passage), str(len(speeches)),
                 _choices(str(len(speeches)), counts, (), len(counts), rng))


def _knowledge_item(task: str, tasks: _PlayTasks, titles: list[str], k: int, rng: random.Random) -> _Item | None:
    """A question on one of the play's well-known lines, which the prompt quotes without its play or speaker."""
    if not tasks.well_known:
        return None
    speaker, line = rng.choice(tasks.well_known)
    title = tasks.play.title
    if task == "play_of_line":
        choices = _choices(title, (), titles, k, rng)
        # With one title on its side of the split there is nothing to choose among.
        return _Item(_template(task, rng, line=line), title, choices) if len(choices) > 1 else None
    return _Item(_template(task, rng, line=line, title=title), speaker,
                 _choices(speaker, tasks.main_speakers, tasks.speaker_pool, k, rng))


def _writing_item(task: str, tasks: _PlayTasks, rng: random.Random) -> _Item | None:
    """Lines of verse in a main speaker's voice; the answer is the first lines of one of their speeches."""
    name = rng.choice(tasks.main_speakers)
    count = rng.randint(*VERSE_LINES)
    speeches = [verse for verse in tasks.verse[name] if len(verse) >= count]
    if not speeches:
        return None
    answer = f"{name}.\n" + "\n".join(rng.choice(speeches)[:count])
    prompt = _template(task, rng, n=count, n_word=_NUMBER_WORDS[count], name=name, title=tasks.play.title)
    return _Item(prompt, answer, None)


def _make(task: str, tasks: _PlayTasks, titles: list[str], cfg: SFTConfig, rng: random.Random) -> _Item | None:
    """One item of `task` from this play, or None when the draw finds none (the caller draws again)."""
    if task in READING_TASKS:
        return _reading_item(task, tasks, cfg.candidates, rng)
    if task in KNOWLEDGE_TASKS:
        return _knowledge_item(task, tasks, titles, cfg.candidates, rng)
    if task in WRITING_TASKS:
        return _writing_item(task, tasks, rng)
    raise ValueError(f"unknown task {task!r}")


def _conversation(prompt: str, answer: str) -> Conversation:
    return Conversation((Message("user", prompt), Message("assistant", answer)))


def _longest(item: _Item) -> Conversation:
    """The item's conversation with its longest candidate as the answer: what must fit the context."""
    return _conversation(item.prompt, max(item.candidates or (item.answer,), key=len))


def _draw(task: str, plays: list[_PlayTasks], titles: list[str], cfg: SFTConfig, rng: random.Random,
          fits: Callable[[Conversation], bool], counts: Counter, seen: set[str]) -> _Item | None:
    """An item of `task` from a play drawn from `plays`, new (its prompt not in `seen`) and fitting the context;
    None after DRAW_TRIES draws find none."""
    for _ in range(DRAW_TRIES):
        item = _make(task, rng.choice(plays), titles, cfg, rng)
        if item is None or item.prompt in seen:
            continue
        if not fits(_longest(item)):
            counts[f"too_long.{task}"] += 1
            continue
        seen.add(item.prompt)
        return item
    return None


def load_plays(documents: Iterable[tuple[str, str]], cfg: SFTConfig) -> tuple[list[Play], list[Play], Counter]:
    """(training plays, held-out plays, counts) of (id, text) documents: both empty when no document is a play (the
    caller decides what that means); one side empty is a ConfigError naming sft.heldout_fraction."""
    train, heldout, counts = [], [], Counter()
    for doc_id, text in documents:
        play = parse_play(doc_id, text)
        if play is None:
            counts["other_documents"] += 1
            continue
        (heldout if is_heldout(doc_id, cfg) else train).append(play)
    counts["train_plays"], counts["heldout_plays"] = len(train), len(heldout)
    if (train or heldout) and not (train and heldout):
        side = "held-out" if not heldout else "training"
        raise ConfigError("sft.heldout_fraction", f"no {side} plays ({len(train) + len(heldout)} plays in all); "
                          "change sft.heldout_fraction or sft.seed, or add plays")
    return train, heldout, counts


def fits_context(tokenizer: Tokenizer, tokens: ChatTokens, block_size: int) -> Callable[[Conversation], bool]:
    """Whether a conversation fits the context, by training's too_long rule (llm.chat.fits_context)."""
    return lambda conversation: chat.fits_context(encode_conversation(tokenizer, tokens, conversation), block_size)


def build_sft_set(documents: Iterable[tuple[str, str]], cfg: SFTConfig,
                  fits: Callable[[Conversation], bool] = lambda conversation: True,
                  pretrained: Callable[[str], bool] = lambda doc_id: True) -> SFTSet:
    """The built-in set from (id, text) documents (llm.documents.iter_documents of data/clean/): sft.
    train_conversations training conversations from the training plays, sft.questions_per_task questions per
    task from the held-out plays, and sft.shots few-shot conversations per task. `fits` (fits_context) drops
    what is longer than the context; `pretrained(doc_id)` says whether the base model trained on a document
    (not in data's val split): knowledge questions are asked only of held-out plays it did, as only those can
    be answered from pretraining. A pure function of its arguments."""
    train_plays, heldout_plays, counts = load_plays(documents, cfg)
    if not train_plays:  # no document is a play: nothing to make conversations or questions from
        return SFTSet([], {task: [] for task in TASKS}, {task: [] for task in TASKS}, dict(sorted(counts.items())))
    # A question's other candidate titles come from its own side of the split: tuning teaches the training plays'
    # titles as answers and never a held-out one, so held-out questions offered training titles beside the right,
    # held-out one would measure that prior, not what the model knows.
    train_titles = sorted({play.title for play in train_plays})
    heldout_titles = sorted({play.title for play in heldout_plays})
    corpus_lines = line_counts(train_plays + heldout_plays)
    train_tasks = [_PlayTasks(play, corpus_lines) for play in train_plays]
    heldout_tasks = [_PlayTasks(play, corpus_lines) for play in heldout_plays]
    known_tasks = [tasks for tasks in heldout_tasks if pretrained(tasks.play.doc_id)]
    counts["heldout_plays_pretrained"] = len(known_tasks)

    rng = random.Random(f"sft-train:{cfg.seed}")
    by_task: dict[str, list[Conversation]] = {task: [] for task in TASKS}
    train, seen = [], set()
    for index in range(cfg.train_conversations):
        task = TASKS[index % len(TASKS)]
        item = _draw(task, train_tasks, train_titles, cfg, rng, fits, counts, seen)
        if item is None:
            counts[f"not_found.train.{task}"] += 1
            continue
        conversation = _conversation(item.prompt, item.answer)
        by_task[task].append(conversation)
        train.append(conversation)
    rng.shuffle(train)

    rng = random.Random(f"sft-questions:{cfg.seed}")
    questions: dict[str, list[Question]] = {}
    for task in TASKS:
        questions[task] = []
        plays = known_tasks if task in KNOWLEDGE_TASKS else heldout_tasks
        for _ in range(cfg.questions_per_task if plays else 0):
            item = _draw(task, plays, heldout_titles, cfg, rng, fits, counts, seen)
            if item is None:
                counts[f"not_found.questions.{task}"] += 1
                break
            questions[task].append(Question(task, (Message("user", item.prompt),), item.answer, item.candidates))
    counts["train_conversations"] = len(train)
    counts["questions"] = sum(map(len, questions.values()))
    shots = {task: pick_shots(conversations, cfg.shots) for task, conversations in by_task.items()}
    return SFTSet(train, questions, shots, dict(sorted(counts.items())))


def pick_shots(conversations: list[Conversation], count: int) -> list[Conversation]:
    """`count` few-shot examples, shortest first (so that more of them fit the context beside a question), with
    answers of different shapes while there are such: different answers, or for a writing answer a different
    number of lines. The shortest passages all hold two speeches: shots of only those would teach a base model
    that the count is always 2."""
    def chars(conversation: Conversation) -> int:
        return sum(len(message.content) for message in conversation.messages)

    def shape(conversation: Conversation) -> str | int:
        answer = conversation.messages[-1].content
        return answer if "\n" not in answer else answer.count("\n")

    ordered = sorted(conversations, key=chars)
    picked, shapes = [], set()
    for conversation in ordered:
        if len(picked) < count and shape(conversation) not in shapes:
            picked.append(conversation)
            shapes.add(shape(conversation))
    picked += [c for c in ordered if c not in picked][:count - len(picked)]
    return sorted(picked, key=chars)
